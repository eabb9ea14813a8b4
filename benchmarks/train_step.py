"""Train-step throughput and model-FLOPs utilisation (MFU), every metric on.

MFU = model FLOPs/s ÷ peak, where the peak is a float32 matmul measured in this process
(so it is the machine's own attainable rate, not a datasheet number). Model FLOPs per token
= 6·N (N = non-embedding parameters + the output head) + 12·L·T·d (attention scores and
weighted sum, forward and backward), as in the PaLM/Chinchilla accounting.

    python benchmarks/train_step.py [--steps 20] [--out benchmarks/results/train_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from stability import train as T  # noqa: E402
from stability.config import Config, DataConfig, ModelConfig, TrainConfig  # noqa: E402


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
    a = p.parse_args()

    cfg = Config(
        model=ModelConfig(vocab_size=a.vocab, d_model=a.d, n_layers=a.layers, n_heads=a.heads),
        data=DataConfig(source="synthetic_markov", seq_len=a.seq, batch_size=a.batch),
        train=TrainConfig(steps=10_000),
    )
    _, _, init, step, _ = T.compiled_fns(T.static_config(cfg))
    state = init(0)
    hp = T.hyperparams(cfg)
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
