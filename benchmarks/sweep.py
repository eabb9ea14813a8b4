"""Sweep speed: steady tokens/s per strategy and updates per call K; cold and cached start.

    python benchmarks/sweep.py [--sizes 32,64,128,256] [--ks 1,10,100] [--steps 200]
        [--start-sizes 32,128] [--log-sizes 32,128] [--out benchmarks/results/sweep_cpu.json]

Every sweep is the paper's 7-point LR grid (d ∈ sizes, 2 layers, d/32 heads, T=64, B=16,
stdlib bytes), run as one vmapped program or sequentially (one program, run after run).

*Steady*: aggregate training tokens/s once compiled, with ``train.steps_per_call=K``: the
``perf/tokens_per_sec`` of each run's last record (logged every 100 steps, so it spans the
last 100 updates, compiled), summed over the runs of one program (vmap) or averaged over runs
trained one after another (sequential).

*Logging cost*: tokens/s of a vmapped 7-run program at K=100 over its whole training (every
run's tokens over the chunk's wall time) with a record every 10 steps (the metrics of 10
updates per call come back from it, and the host writes 70 records and runs the early-warning
detectors on them while the next call runs) and with one record per run at the end
(``log_every=steps``), over ``--log-steps`` steps, best of ``--log-repeats``; their ratio.

*Start*: a fresh ``stability sweep`` process with an empty persistent compilation cache
(*cold*), then a second process with that cache and the executables the first one stored
beside it (*cached*): the seconds each spends compiling or loading its programs, as it reports
them on stderr, and the process's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import jax  # noqa: E402

from stability.sweep import run_sweep  # noqa: E402
from stability.workdir import read_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
LOG_EVERY = 100


def sweep_file(tmp: Path, d: int, steps: int, k: int, log_every: int = LOG_EVERY) -> Path:
    path = tmp / f"bench_d{d}_k{k}_s{steps}_l{log_every}.py"
    common = {
        "data.source": "stdlib",
        "model.d_model": d,
        "model.n_layers": 2,
        "model.n_heads": max(1, d // 32),
        "train.steps": steps,
        "optim.warmup_steps": steps // 10,
        "train.eval_every": steps,
        "train.checkpoint_every": steps,
        "train.log_every": min(log_every, steps),
        "train.eval_batches": 2,
        "train.steps_per_call": k,
    }
    path.write_text(
        f"NAME = 'bench_d{d}'\ndef get_sweep(arg=''):\n"
        f"    return [{{**{common!r}, 'optim.lr': lr}} for lr in {LRS!r}]\n"
    )
    return path


def steady_tokens_per_sec(workdir: Path, strategy: str) -> float:
    last = [
        read_jsonl(run_dir / "metrics.jsonl")[0][-1]["perf/tokens_per_sec"]
        for run_dir in sorted((workdir / "runs").iterdir())
    ]
    return sum(last) if strategy == "vmap" else sum(last) / len(last)


def chunk_tokens_per_sec(workdir: Path) -> float:
    """Tokens/s of a one-chunk sweep over its whole training: every run's tokens over the
    chunk's wall time (init, evals and checkpoints included; compiles are not)."""
    records = read_jsonl(workdir / "results.jsonl")[0]
    cfg = records[0]["config"]
    tokens = (
        len(records) * cfg["train"]["steps"] * cfg["data"]["batch_size"] * cfg["data"]["seq_len"]
    )
    return tokens / records[0]["wall_seconds"]


COMPILE_LINE = re.compile(
    r"^(?:compiled .* in ([\d.]+) s|.*: (?:from cache|loaded executable) \(([\d.]+) s\))$"
)


def start_seconds(spec: Path, workdir: Path, strategy: str, cache: Path) -> dict[str, float]:
    """Seconds a fresh `stability sweep` process spends compiling (or loading) its programs,
    and its wall time."""
    import time

    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "stability", "sweep", "--sweep", str(spec), "--workdir",
         str(workdir), "--strategy", strategy, "--no-progress", "--max-runs-per-program",
         str(len(LRS)), f"--compilation-cache={cache}"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    wall = time.perf_counter() - t
    seconds = [
        float(m.group(1) or m.group(2))
        for line in out.stderr.splitlines()
        if (m := COMPILE_LINE.match(line))
    ]
    return {"compile_s": sum(seconds), "programs": len(seconds), "wall_s": wall}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="32,64,128,256")
    p.add_argument("--ks", default="1,10,100")
    p.add_argument("--steps", type=int, default=2 * LOG_EVERY)
    p.add_argument("--start-sizes", default="32,128")
    p.add_argument("--strategies", default="vmap,sequential")
    p.add_argument("--log-sizes", default="32,128", help="sizes of the logging-cost rows")
    p.add_argument("--log-steps", type=int, default=300)
    p.add_argument("--log-repeats", type=int, default=2, help="runs per logging setting (best of)")
    p.add_argument("--out", default="benchmarks/results/sweep_cpu.json")
    a = p.parse_args()
    strategies = a.strategies.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["STABILITY_COMPILATION_CACHE"] = "off"  # in-process: compile as usual
        for d in (int(x) for x in a.sizes.split(",") if x):
            for k in (int(x) for x in a.ks.split(",") if x):
                spec = sweep_file(tmp, d, a.steps, k)
                row = {"d_model": d, "steps_per_call": k, "runs": len(LRS), "steps": a.steps}
                for strategy in strategies:
                    workdir = tmp / f"{strategy}_d{d}_k{k}"
                    run_sweep(
                        str(spec),
                        workdir,
                        strategy=strategy,
                        progress=False,
                        report=False,
                        max_runs_per_program=len(LRS),
                    )
                    row[f"{strategy}_steady_tok_s"] = steady_tokens_per_sec(workdir, strategy)
                rows.append(row)
                print(json.dumps(row), flush=True)
        logging = []
        for d in (int(x) for x in a.log_sizes.split(",") if x):
            row = {"d_model": d, "steps_per_call": 100, "runs": len(LRS), "steps": a.log_steps}
            for log_every in (10, a.log_steps):
                spec = sweep_file(tmp, d, a.log_steps, 100, log_every)
                best = 0.0
                for rep in range(a.log_repeats):  # best of the repeats
                    workdir = tmp / f"log{log_every}_d{d}_{rep}"
                    run_sweep(
                        str(spec),
                        workdir,
                        strategy="vmap",
                        progress=False,
                        report=False,
                        max_runs_per_program=len(LRS),
                    )
                    best = max(best, chunk_tokens_per_sec(workdir))
                key = "steps" if log_every == a.log_steps else log_every
                row[f"log_every_{key}_tok_s"] = best
            row["ratio"] = row["log_every_10_tok_s"] / row["log_every_steps_tok_s"]
            logging.append(row)
            print(json.dumps(row), flush=True)
        starts = []
        for d in (int(x) for x in a.start_sizes.split(",") if x):
            spec = sweep_file(tmp, d, 2, 0)
            for strategy in strategies:
                cache = tmp / f"cache_{strategy}_d{d}"
                cold = start_seconds(spec, tmp / f"cold_{strategy}{d}", strategy, cache)
                cached = start_seconds(spec, tmp / f"cached_{strategy}{d}", strategy, cache)
                row = {"d_model": d, "strategy": strategy, "cold": cold, "cached": cached}
                starts.append(row)
                print(json.dumps(row), flush=True)
    result = {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "steady": rows,
        "logging_cost": logging,
        "start": starts,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n({result['backend']}) steady tokens/s, {len(LRS)} runs")
    print("| d_model | K | " + " | ".join(strategies) + " |")
    print("|---|---|" + "---|" * len(strategies))
    for r in rows:
        cols = " | ".join(f"{r[f'{s}_steady_tok_s']:.0f}" for s in strategies)
        print(f"| {r['d_model']} | {r['steps_per_call']} | {cols} |")
    print("\n| d_model | K | tok/s, log_every=10 | tok/s, log_every=steps | ratio |")
    print("|---|---|---|---|---|")
    for r in logging:
        print(
            f"| {r['d_model']} | 100 | {r['log_every_10_tok_s']:.0f} | "
            f"{r['log_every_steps_tok_s']:.0f} | {r['ratio']:.3f} |"
        )
    print("\n| d_model | strategy | cold compile s (wall s) | cached s (wall s) | cached/cold |")
    print("|---|---|---|---|---|")
    for r in starts:
        c, w = r["cold"], r["cached"]
        print(
            f"| {r['d_model']} | {r['strategy']} | {c['compile_s']:.1f} ({c['wall_s']:.1f}) "
            f"| {w['compile_s']:.1f} ({w['wall_s']:.1f}) | {w['compile_s'] / c['compile_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
