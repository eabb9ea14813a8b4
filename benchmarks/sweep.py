"""Sweep strategies: wall time of the paper's 7-point LR grid run as one vmapped program,
sequentially with one compilation, and naively (a fresh `stability train` process per run).

    python benchmarks/sweep.py [--steps 100] [--sizes 64,128] [--skip-naive]
        [--out benchmarks/results/sweep.json]

Every strategy trains the same runs (d ∈ sizes, 2 layers, T=64, B=16, stdlib bytes) and
includes its own compilation, as a user would experience it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import jax  # noqa: E402

from stability.sweep import run_sweep  # noqa: E402

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
                t = time.perf_counter()
                run_sweep(
                    str(spec),
                    tmp / f"{strategy}{d}",
                    strategy=strategy,
                    progress=False,
                    report=False,
                    max_runs_per_program=len(LRS),
                )
                row[f"{strategy}_s"] = time.perf_counter() - t
            if not a.skip_naive:
                t = time.perf_counter()
                from stability.sweep import build_runs, load_sweep

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
    print(
        f"\n| d_model | vmap s | sequential s | naive s | sequential/vmap | naive/vmap |  ({result['backend']})"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        naive = r.get("naive_s")
        print(
            f"| {r['d_model']} | {r['vmap_s']:.1f} | {r['sequential_s']:.1f} | "
            f"{'' if naive is None else f'{naive:.1f}'} | {r['sequential_s'] / r['vmap_s']:.2f}x | "
            f"{'' if naive is None else format(naive / r['vmap_s'], '.2f') + 'x'} |"
        )


if __name__ == "__main__":
    main()
