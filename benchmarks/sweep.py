"""Sweep strategies: wall time of the paper's 7-point LR grid run as one vmapped program,
sequentially with one compilation, and naively (a fresh `stability train` process per run).

    python benchmarks/sweep.py [--steps 100] [--sizes 64,128] [--skip-naive]
        [--out benchmarks/results/sweep.json]

Every strategy trains the same runs (d ∈ sizes, 2 layers, T=64, B=16, stdlib bytes). Each
strategy is timed twice in this process: *cold* (its first sweep, compilation included, as a
user experiences a fresh sweep) and *warm* (the same sweep into a new workdir, every program
already compiled: what dominates a long sweep). *Steady* is the aggregate training throughput
once compiled (median of the logged ``perf/tokens_per_sec`` after the first log step, summed
over the runs that share a program).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import jax  # noqa: E402

from stability.sweep import build_runs, load_sweep, run_sweep  # noqa: E402
from stability.tracking import read_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def sweep_file(tmp: Path, d: int, steps: int) -> Path:
    path = tmp / f"bench_d{d}.py"
    common = {
        "model.d_model": d,
        "model.n_layers": 2,
        "model.n_heads": max(1, d // 32),
        "train.steps": steps,
        "optim.warmup_steps": steps // 10,
        "train.eval_every": steps,
        "train.checkpoint_every": steps,
        "train.log_every": max(1, steps // 10),
        "train.eval_batches": 2,
    }
    path.write_text(
        f"NAME = 'bench_d{d}'\ndef get_sweep(arg=''):\n"
        f"    return [{{**{common!r}, 'optim.lr': lr}} for lr in {LRS!r}]\n"
    )
    return path


def steady_tokens_per_sec(workdir: Path, strategy: str) -> float:
    """Aggregate tokens/s once compiled: per-run medians, summed over the runs of one program
    (vmap) or averaged over runs trained one after another (sequential)."""
    medians = []
    for run_dir in sorted((workdir / "runs").iterdir()):
        tps = [r["perf/tokens_per_sec"] for r in read_jsonl(run_dir / "metrics.jsonl")[0]][1:]
        if tps:
            medians.append(statistics.median(tps))
    return sum(medians) if strategy == "vmap" else statistics.mean(medians)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--sizes", default="64,128")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--out", default="benchmarks/results/sweep.json")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for d in (int(x) for x in a.sizes.split(",")):
            spec = sweep_file(tmp, d, a.steps)
            row = {"d_model": d, "runs": len(LRS), "steps": a.steps}
            for strategy in ("vmap", "sequential"):
                for phase in ("cold", "warm"):
                    workdir = tmp / f"{strategy}{d}{phase}"
                    t = time.perf_counter()
                    run_sweep(
                        str(spec),
                        workdir,
                        strategy=strategy,
                        progress=False,
                        report=False,
                        max_runs_per_program=len(LRS),
                    )
                    row[f"{strategy}_{phase}_s"] = time.perf_counter() - t
                row[f"{strategy}_steady_tok_s"] = steady_tokens_per_sec(workdir, strategy)
            if not a.skip_naive:
                t = time.perf_counter()
                for run in build_runs(load_sweep(str(spec))[1], None, []):
                    overrides = [f"--config.{k}={v}" for k, v in run.overrides.items()]
                    subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "stability",
                            "train",
                            "--no-progress",
                            "--workdir",
                            str(tmp / f"naive{d}" / run.run_id),
                            *overrides,
                        ],
                        cwd=ROOT,
                        check=True,
                        capture_output=True,
                    )
                row["naive_s"] = time.perf_counter() - t
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"backend": jax.default_backend(), "device": str(jax.devices()[0]), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n({result['backend']}; ratios are sequential (or naive) over vmap)")
    print(
        "| d_model | cold vmap / seq s | warm vmap / seq s | steady vmap / seq tok/s "
        "| cold ratio | warm ratio | steady ratio | naive s (ratio) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        naive = r.get("naive_s")
        naive_col = "" if naive is None else f"{naive:.1f} ({naive / r['vmap_cold_s']:.2f}x)"
        print(
            f"| {r['d_model']} | {r['vmap_cold_s']:.1f} / {r['sequential_cold_s']:.1f} "
            f"| {r['vmap_warm_s']:.1f} / {r['sequential_warm_s']:.1f} "
            f"| {r['vmap_steady_tok_s']:.0f} / {r['sequential_steady_tok_s']:.0f} "
            f"| {r['sequential_cold_s'] / r['vmap_cold_s']:.2f}x "
            f"| {r['sequential_warm_s'] / r['vmap_warm_s']:.2f}x "
            f"| {r['vmap_steady_tok_s'] / r['sequential_steady_tok_s']:.2f}x "
            f"| {naive_col} |"
        )


if __name__ == "__main__":
    main()
