"""Train-step throughput and model-FLOPs utilisation (MFU), every metric on.

MFU = model FLOPs/s ÷ peak, where the peak is a float32 matmul measured in this process
(so it is the machine's own attainable rate, not a datasheet number). Model FLOPs per token
= 6·N (N = non-embedding parameters + the output head) + 12·L·T·d (attention scores and
weighted sum, forward and backward), as in the PaLM/Chinchilla accounting.

    python benchmarks/train_step.py [--steps 20] [--out benchmarks/results/train_step.json]

``--mesh SPEC ...`` instead times the sharded step (``stability.programs.build``) on
each mesh, same global batch: SPEC is ``1`` (one device), ``dpN`` (N devices, batch split,
state replicated), ``fsdpN`` (batch and state split over N), ``tpM`` (M-way tensor parallel),
``fsdpNxtpM`` (both, N·M devices). On a CPU host the devices are simulated (``--cpu-devices``,
default 8) and share the host's cores, so this measures sharding overhead, not speed-up.

    python benchmarks/train_step.py --mesh 1 dp8 fsdp8 tp8 fsdp4xtp2 --out benchmarks/results/train_step_mesh.json

``--memory SIZE`` compiles (never runs) the train step of the paper's setting at a width-family
size (vocab 32,128, batch 256 × 512, bf16 compute) on every device (``--cpu-devices`` on a CPU
host) and prints XLA's per-device memory (``programs.step_memory``); ``--fsdp``, ``--remat``,
``--tp`` choose the sharding.

    python benchmarks/train_step.py --memory w4096 --fsdp --remat block --cpu-devices 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from stability import step as St  # noqa: E402
from stability.config import Config, DataConfig, ModelConfig, TrainConfig  # noqa: E402
from stability.programs import one_device  # noqa: E402


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Measured float32 matmul FLOP/s (n×n @ n×n)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def parse_mesh(spec: str) -> tuple[int, bool, int]:
    """(devices, fsdp, tensor_parallel) of a --mesh SPEC."""
    m = re.fullmatch(r"(?:(dp|fsdp)(\d+))?x?(?:tp(\d+))?|1", spec)
    if not m or spec in ("", "x"):
        sys.exit(f"--mesh {spec!r}: valid: 1, dpN, fsdpN, tpM, fsdpNxtpM")
    data = int(m.group(2) or 1)
    tp = int(m.group(3) or 1)
    return data * tp, m.group(1) == "fsdp", tp


def bench_meshes(a, cfg: Config) -> None:
    """Step time of the sharded train step on each --mesh, same config and global batch."""
    from stability import programs as P
    from stability import sharding as S

    rng = np.random.default_rng(0)
    batches = [
        {"tokens": rng.integers(0, a.vocab, (a.batch, a.seq + 1), dtype=np.int32)}
        for _ in range(4)
    ]
    rows = []
    for spec in a.mesh:
        n, fsdp, tp = parse_mesh(spec)
        c = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, fsdp=fsdp, tensor_parallel=tp)
        )
        mesh = S.make_mesh(c, devices=jax.devices()[:n])
        fns = P.build(c, mesh)
        state = fns.init(np.int32(0))
        hp = jax.device_put(St.hyperparams(c), fns.hp)
        bs = [jax.device_put(b, fns.batch) for b in batches]
        t0 = time.perf_counter()
        state, out = fns.step(state, hp, bs[0])  # compile
        jax.block_until_ready(out)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(a.steps):
            state, out = fns.step(state, hp, bs[i % 4])
        jax.block_until_ready((state, out))
        dt = (time.perf_counter() - t0) / a.steps
        held = S.per_device_bytes((state.params, state.opt_state))
        rows.append(
            {
                "mesh": spec,
                "description": S.describe(mesh, c.train),
                "seconds_per_step": dt,
                "tokens_per_sec": a.batch * a.seq / dt,
                "first_call_seconds": compile_s,
                "state_bytes_per_device_max": max(held.values()),
                "state_bytes_total": sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state))),
                "final_loss": float(out["train/loss"]),
            }
        )
        print(f"{spec}: {dt * 1e3:.0f} ms/step", file=sys.stderr)
    result = {"config": vars(a), "backend": jax.default_backend(), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| mesh | run×data×model | ms/step | tokens/s | state MiB/device (of total) | loss after |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        sizes = r["description"].split()[2]
        print(
            f"| {r['mesh']} | {sizes} | {r['seconds_per_step'] * 1e3:.0f} | {r['tokens_per_sec']:.0f} | "
            f"{r['state_bytes_per_device_max'] / 2**20:.1f} ({r['state_bytes_total'] / 2**20:.1f}) | "
            f"{r['final_loss']:.4f} |"
        )


def memory(a) -> None:
    """XLA's per-device memory of the paper-setting train step at size ``a.memory``."""
    from stability import programs as P
    from stability import sharding as S
    from stability.config import size_preset

    cfg = Config(
        model=ModelConfig(vocab_size=32128, dtype="bfloat16", **size_preset(a.memory)),
        data=DataConfig(source="synthetic_markov", seq_len=512, batch_size=256),
        train=TrainConfig(steps=10_000, fsdp=a.fsdp, remat=a.remat, tensor_parallel=a.tp),
    )
    t0 = time.perf_counter()
    report = P.step_memory(cfg, S.make_mesh(cfg))
    print(f"{a.memory}: {report.line()}; compiled in {time.perf_counter() - t0:.0f} s")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", default="benchmarks/results/train_step.json")
    p.add_argument("--mesh", nargs="+", help="sharded step on these meshes (see above)")
    p.add_argument("--cpu-devices", type=int, default=8, help="simulated devices on a CPU host")
    p.add_argument("--memory", help="compile-only memory of this size (e.g. w4096)")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--remat", default="none", choices=("none", "block", "full"))
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel devices")
    a = p.parse_args()
    if a.mesh or a.memory:
        jax.config.update("jax_num_cpu_devices", a.cpu_devices)
    if a.memory:
        return memory(a)

    cfg = Config(
        model=ModelConfig(vocab_size=a.vocab, d_model=a.d, n_layers=a.layers, n_heads=a.heads),
        data=DataConfig(source="synthetic_markov", seq_len=a.seq, batch_size=a.batch),
        train=TrainConfig(steps=10_000),
    )
    if a.mesh:
        return bench_meshes(a, cfg)
    progs = one_device(cfg)
    step, state, hp = progs.step, progs.init(np.int32(0)), St.hyperparams(cfg)
    rng = np.random.default_rng(0)
    batches = [{"tokens": rng.integers(0, a.vocab, (a.batch, a.seq + 1), dtype=np.int32)} for _ in range(4)]
    state, out = step(state, hp, batches[0])  # compile
    jax.block_until_ready(out)
    n_metrics = len(out)
    t0 = time.perf_counter()
    for i in range(a.steps):
        state, out = step(state, hp, batches[i % 4])
    jax.block_until_ready((state, out))
    dt = (time.perf_counter() - t0) / a.steps

    n_params = sum(x.size for x in jax.tree.leaves(state.params)) - a.vocab * a.d  # minus input embedding
    tokens = a.batch * a.seq
    flops = tokens * (6 * n_params + 12 * a.layers * a.seq * a.d)
    peak = matmul_peak()
    result = {
        "config": vars(a),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "cpu": platform.processor() or platform.machine(),
        "seconds_per_step": dt,
        "tokens_per_sec": tokens / dt,
        "model_tflops_per_sec": flops / dt / 1e12,
        "peak_matmul_tflops_per_sec": peak / 1e12,
        "mfu": flops / dt / peak,
        "metrics_per_step": n_metrics,
        "params_non_embedding": int(n_params),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| backend | tokens/s | model TFLOP/s | matmul peak TFLOP/s | MFU | metrics/step |")
    print("|---|---|---|---|---|---|")
    print(f"| {result['backend']} | {result['tokens_per_sec']:.0f} | {result['model_tflops_per_sec']:.3f} | "
          f"{result['peak_matmul_tflops_per_sec']:.3f} | {result['mfu']:.1%} | {n_metrics} |")


if __name__ == "__main__":
    main()
