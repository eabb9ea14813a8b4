"""Train-step throughput and model-FLOPs utilisation (MFU), every metric on, timed on the
training loop's own program: a stack of one run, ``--k`` updates per device call, a metric
record every ``train.log_every`` (10) updates, as `stability train` runs it.

MFU = model FLOPs/s ÷ peak, where the peak is a float32 matmul measured in this process
(so it is the machine's own attainable rate, not a datasheet number). Model FLOPs per token
= 6·N (N = non-embedding parameters + the output head) + 12·L·T·d (attention scores and
weighted sum, forward and backward), as in the PaLM/Chinchilla accounting.

    python benchmarks/train_step.py [--steps 20] [--out benchmarks/results/train_step.json]

``--runs N`` times a stack of N runs (a vmapped sweep chunk: N learning rates sharing each
batch). ``--breakdown`` then profiles the same calls (apart from the timing) and gives the
thread time per update of each part of the step, from XLA:CPU's per-instruction events and
the named scopes the model and step put in the op names: attention core, normalization,
loss, optimizer update, metrics; other matmuls (projections, MLP, head); other ops.

    python benchmarks/train_step.py --d 128 --layers 2 --heads 4 --seq 64 --batch 16 --vocab 256 \
        --runs 7 --k 100 --steps 200 --breakdown --out benchmarks/results/train_step_sweep7.json

``--mesh SPEC ...`` instead times the sharded step (``stability.programs.build``) on
each mesh, same global batch: SPEC is ``1`` (one device), ``dpN`` (N devices, batch split,
state replicated), ``fsdpN`` (batch and state split over N), ``tpM`` (M-way tensor parallel),
``fsdpNxtpM`` (both, N·M devices). On a CPU host the devices are simulated (``--cpu-devices``,
default 8) and share the host's cores, so this measures sharding overhead, not speed-up.

    python benchmarks/train_step.py --mesh 1 dp8 fsdp8 tp8 fsdp4xtp2 --out benchmarks/results/train_step_mesh.json

``--memory SIZE`` compiles (never runs) the train step of the paper's setting at a width-family
size (vocab 32,128, batch 256 × 512, bf16 compute) on every device (``--cpu-devices`` on a CPU
host) and prints XLA's per-device memory (``programs.step_memory``); ``--fsdp``, ``--remat``,
``--tp``, ``--scan`` (``train.scan_layers``) and ``--layers`` choose the sharding and depth.

    python benchmarks/train_step.py --memory w4096 --fsdp --remat block --scan --cpu-devices 8

``--memory-table`` does the same for w1024, w2048, w4096 × remat none / block / full with
scanned layers and FSDP on 8 devices, the unrolled blocks at w4096 beside them, and the
compile time against depth (w1024, 6 / 12 / 24 layers, scanned and unrolled); it writes
``benchmarks/results/memory_cpu.json``.

    python benchmarks/train_step.py --memory-table

``--depth-table`` compiles the same train step (w1024, FSDP on 8 devices, block remat) at 6,
12, 24 and 48 layers, scanned and unrolled, each in a fresh process without the compilation
cache, from the checkout ``--source`` (default this one: an older checkout measures its own
layout); it writes ``benchmarks/results/compile_depth.json`` (``--out``), adding to the rows
of other sources there; ``--repeats N`` keeps the fastest of N compiles.

    python benchmarks/train_step.py --depth-table [--source DIR] [--layouts scanned unrolled]
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

from stability import programs as prog  # noqa: E402
from stability import sharding as S  # noqa: E402
from stability import step as St  # noqa: E402
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


SCOPES = ("attention_core", "normalization", "loss", "optimizer_update", "metrics")
CONTAINERS = {"while", "conditional", "call"}  # their time is their children's


def _closing(text: str) -> int:
    """The index of the parenthesis that closes ``text``'s first one."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return i
    return len(text)


def _instruction(line: str) -> tuple[str, str, str] | None:
    """(name, opcode, rest) of an HLO instruction line, None for other lines."""
    m = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end() :]
    if rest.startswith("("):  # a tuple type: skip to its closing parenthesis
        rest = rest[_closing(rest) + 1 :]
    else:
        rest = rest.split(" ", 1)[1]
    op = re.match(r"\s*([\w\-]+)\(", rest)
    return (m.group(1), op.group(1), rest) if op else None


def hlo_categories(text: str) -> dict[str, str]:
    """{instruction name: category} of an optimized HLO module's text. The category is the
    named scope in the instruction's op name (``SCOPES``: the model and step put them there);
    a fusion without one takes its fused ops' scope; else "matmuls (projections, MLP, head)"
    for a dot or a fusion of one, "other" (elementwise glue, copies, data movement) for the rest.
    Control-flow instructions (``CONTAINERS``) are left out: their time is their children's."""
    comps: dict[str, list[tuple[str, str, str]]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
        if head and "=" not in line.split("{")[0]:
            current = comps.setdefault(head.group(1), [])
            continue
        ins = _instruction(line)
        if ins and current is not None:
            current.append(ins)

    def scope(rest: str) -> str | None:
        name = re.search(r'op_name="([^"]*)"', rest)
        words = set(re.findall(r"[A-Za-z_]+", name.group(1))) if name else set()
        return next((s for s in SCOPES if s in words), None)

    def fused(rest: str, seen: set) -> tuple[str | None, bool]:
        """(scope, has a dot) of the computations an instruction calls."""
        found, dot = None, False
        for callee in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", rest):
            if callee in seen:
                continue
            seen.add(callee)
            for _, op, r in comps.get(callee, []):
                dot |= op in ("dot", "convolution")
                s, d = fused(r, seen)
                found, dot = found or scope(r) or s, dot or d
        return found, dot

    out = {}
    for instructions in comps.values():
        for name, op, rest in instructions:
            if op in CONTAINERS:
                continue
            s, dot = fused(rest, set())
            s = scope(rest) or s
            dot = dot or op in ("dot", "convolution")
            out[name] = s or ("matmuls (projections, MLP, head)" if dot else "other")
    return out


def step_breakdown(progs, state, args, calls: int, updates: int) -> dict:
    """Thread time per update of each category (``hlo_categories``) over ``calls`` of the
    loop's call, from a ``jax.profiler`` trace of them (XLA:CPU's per-instruction events)."""
    import glob
    import tempfile

    from jax.profiler import ProfileData

    category = hlo_categories(progs.call.compile(state, *args()).as_text())  # compiled already
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(calls):
                state, out = progs.call(state, *args())
            jax.block_until_ready((state, out))
        (trace,) = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        profile = ProfileData.from_file(trace)
    ns: dict[str, float] = {}
    for plane in profile.planes:
        for line in plane.lines:
            for e in line.events:
                if e.name in category:
                    ns[category[e.name]] = ns.get(category[e.name], 0.0) + e.duration_ns
    total = sum(ns.values())
    return {
        k: {"thread_ms_per_update": v / 1e6 / updates, "share": v / total}
        for k, v in sorted(ns.items(), key=lambda kv: -kv[1])
    }


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
        {"tokens": rng.integers(0, a.vocab, (a.batch, a.seq + 1), dtype=np.int32)} for _ in range(4)
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
                "state_bytes_total": sum(
                    x.nbytes for x in jax.tree.leaves((state.params, state.opt_state))
                ),
                "final_loss": float(out["train/loss"]),
            }
        )
        print(f"{spec}: {dt * 1e3:.0f} ms/step", file=sys.stderr)
    result = {"config": vars(a), "backend": jax.default_backend(), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        "| mesh | run×data×model | ms/step | tokens/s | state MiB/device (of total) | loss after |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        sizes = r["description"].split()[2]
        print(
            f"| {r['mesh']} | {sizes} | {r['seconds_per_step'] * 1e3:.0f} | {r['tokens_per_sec']:.0f} | "
            f"{r['state_bytes_per_device_max'] / 2**20:.1f} ({r['state_bytes_total'] / 2**20:.1f}) | "
            f"{r['final_loss']:.4f} |"
        )


def memory_row(size: str, *, fsdp: bool, remat: str, scan: bool, tp: int = 1, layers: int = 0):
    """XLA's per-device memory (GiB) and the compile time (s) of the paper-setting train step."""
    from stability import programs as P
    from stability import sharding as S
    from stability.config import size_preset

    model = {**size_preset(size), **({"n_layers": layers} if layers else {})}
    cfg = Config(
        model=ModelConfig(vocab_size=32128, dtype="bfloat16", **model),
        data=DataConfig(source="synthetic_markov", seq_len=512, batch_size=256),
        train=TrainConfig(
            steps=10_000, fsdp=fsdp, remat=remat, tensor_parallel=tp, scan_layers=scan
        ),
    )
    t0 = time.perf_counter()
    report = P.step_memory(cfg, S.make_mesh(cfg))
    seconds = time.perf_counter() - t0
    g = 2**30
    row = {
        "size": size, "layers": model["n_layers"], "devices": len(jax.devices()), "fsdp": fsdp,
        "remat": remat, "scan_layers": scan, "arguments_gib": round(report.argument / g, 2),
        "temporaries_gib": round(report.temp / g, 2),
        "peak_gib": round((report.peak - P.STATE_COPIES * report.state) / g, 2),  # XLA's
        "state_copies_gib": round(P.STATE_COPIES * report.state / g, 2),
        "compile_s": round(seconds, 1),
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def memory(a) -> None:
    """XLA's per-device memory of the paper-setting train step at size ``a.memory``."""
    memory_row(a.memory, fsdp=a.fsdp, remat=a.remat, scan=a.scan, tp=a.tp, layers=a.layers_override)


def memory_table(out: str) -> None:
    """Remat and scanned layers per width, then compile time against depth (module doc)."""
    rows = [
        memory_row(size, fsdp=True, remat=remat, scan=True)
        for size in ("w1024", "w2048", "w4096")
        for remat in ("none", "block", "full")
    ]
    rows += [memory_row("w4096", fsdp=True, remat=r, scan=False) for r in ("none", "block")]
    depth = [next(r for r in rows if r["size"] == "w1024" and r["remat"] == "block")]
    depth += [
        memory_row("w1024", fsdp=True, remat="block", scan=scan, layers=n)
        for n in (6, 12, 24)
        for scan in (True, False)
        if (n, scan) != (6, True)  # compiled above (a second compile would hit jit's cache)
    ]
    Path(out).write_text(json.dumps({"memory": rows, "depth": depth}, indent=1) + "\n")


def depth_table(source: str, layouts: list[str], out: str, repeats: int) -> None:
    """Compile time against depth per layout, each compile in a fresh process, the fastest of
    ``repeats`` (module doc)."""
    import subprocess

    src = Path(source).resolve()
    git = lambda *a: subprocess.run(["git", "-C", str(src), *a], capture_output=True, text=True)
    commit = git("rev-parse", "--short", "HEAD").stdout.strip()
    if git("status", "--porcelain", "--untracked-files=no", "stability").stdout.strip():
        commit += "+changes"  # the package differs from its commit
    env = {**os.environ, "PYTHONPATH": str(src), "JAX_PLATFORMS": "cpu"}
    path = Path(out)
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [r for r in old if r["source_commit"] != commit or r["layout"] not in layouts]
    for layers in (6, 12, 24, 48):
        for layout in layouts:
            cmd = [sys.executable, str(src / "benchmarks" / "train_step.py"), "--memory", "w1024"]
            cmd += ["--fsdp", "--remat", "block", f"--layers-override={layers}"]
            cmd += ["--scan"] if layout == "scanned" else []
            tries = []
            for _ in range(repeats):
                run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
                if run.returncode != 0:
                    sys.exit(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
                tries.append(json.loads(run.stdout.strip().splitlines()[-1]))
            row = min(tries, key=lambda r: r["compile_s"])
            row["compile_s_each"] = [r["compile_s"] for r in tries]
            row.update(
                layout=layout,
                source_commit=commit,
                source_subject=git("log", "-1", "--format=%s").stdout.strip()[:80],
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
    }
    path.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="updates timed (whole calls)")
    p.add_argument("--k", type=int, default=10, help="updates per call (train.steps_per_call)")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--runs", type=int, default=1, help="runs in the stack (a sweep's chunk)")
    p.add_argument("--out", default="benchmarks/results/train_step.json")
    p.add_argument("--mesh", nargs="+", help="sharded step on these meshes (see above)")
    p.add_argument("--cpu-devices", type=int, default=8, help="simulated devices on a CPU host")
    p.add_argument("--memory", help="compile-only memory of this size (e.g. w4096)")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--remat", default="none", choices=("none", "block", "full"))
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel devices")
    p.add_argument("--scan", action="store_true", help="train.scan_layers")
    p.add_argument(
        "--layers-override", type=int, default=0, help="--memory: layers (0: the size's)"
    )
    p.add_argument("--memory-table", action="store_true", help="the memory and depth table")
    p.add_argument("--depth-table", action="store_true", help="compile time against depth")
    p.add_argument("--source", default=str(Path(__file__).resolve().parent.parent))
    p.add_argument("--layouts", nargs="+", default=["scanned", "unrolled"])
    p.add_argument("--repeats", type=int, default=1, help="--depth-table: compiles per row")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also profile the timed calls: time by part of the step (attention, matmuls, ...)",
    )
    a = p.parse_args()
    if a.depth_table:
        out = a.out if a.out != p.get_default("out") else "benchmarks/results/compile_depth.json"
        return depth_table(a.source, a.layouts, out, a.repeats)
    if a.mesh or a.memory or a.memory_table:
        jax.config.update("jax_num_cpu_devices", a.cpu_devices)
    if a.memory or a.memory_table:  # compile times without the persistent cache's hits
        os.environ["STABILITY_COMPILATION_CACHE"] = "off"
    if a.memory_table:
        return memory_table("benchmarks/results/memory_cpu.json")
    if a.memory:
        return memory(a)

    cfg = Config(
        model=ModelConfig(vocab_size=a.vocab, d_model=a.d, n_layers=a.layers, n_heads=a.heads),
        data=DataConfig(source="synthetic_markov", seq_len=a.seq, batch_size=a.batch),
        train=TrainConfig(steps=10_000, fsdp=False),
    )
    if a.mesh:
        return bench_meshes(a, cfg)
    # the loop's own program: a stack of one run, K updates per call, a metric row every
    # log_every updates (as `stability train` runs it on one device)
    n = a.runs
    progs = prog.build(cfg, S.make_mesh(cfg, devices=jax.devices()[:1]), runs=n, k_max=a.k)
    state = progs.init(np.arange(n, dtype=np.int32))
    hp = {k: np.full(n, v, np.float32) for k, v in St.hyperparams(cfg).items()}
    rng = np.random.default_rng(0)
    batches = {"tokens": rng.integers(0, a.vocab, (a.k, a.batch, a.seq + 1), dtype=np.int32)}
    logged = np.array([(i + 1) % cfg.train.log_every == 0 for i in range(a.k)])
    args = lambda: (hp, batches, np.int32(a.k), logged)
    state, out = progs.call(state, *args())  # compile
    jax.block_until_ready(out)
    n_metrics = len(out["metrics"])
    calls = max(1, -(-a.steps // a.k))
    t0 = time.perf_counter()
    for _ in range(calls):
        state, out = progs.call(state, *args())
    jax.block_until_ready((state, out))
    dt = (time.perf_counter() - t0) / (calls * a.k)

    n_params = (
        sum(x.size for x in jax.tree.leaves(state.params)) // n - a.vocab * a.d  # one run
    )  # minus input embedding
    tokens = n * a.batch * a.seq  # every run of the stack trains on the shared batch
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
        "metrics_per_record": n_metrics,
        "updates_per_call": a.k,
        "log_every": cfg.train.log_every,
        "params_non_embedding": int(n_params),
    }
    if a.breakdown:  # profiled apart from the timing above (a trace slows the calls)
        result["breakdown"] = step_breakdown(progs, state, args, calls, calls * a.k)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| backend | tokens/s | model TFLOP/s | matmul peak TFLOP/s | MFU | metrics/record |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {result['backend']} | {result['tokens_per_sec']:.0f} | {result['model_tflops_per_sec']:.3f} | "
        f"{result['peak_matmul_tflops_per_sec']:.3f} | {result['mfu']:.1%} | {n_metrics} |"
    )
    if a.breakdown:
        print("\n| part of the step | thread ms per update | share |")
        print("|---|---|---|")
        for k, v in result["breakdown"].items():
            print(f"| {k} | {v['thread_ms_per_update']:.1f} | {v['share']:.1%} |")


if __name__ == "__main__":
    main()
