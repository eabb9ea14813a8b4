"""Wall time of every shipped sweep at its ``cpu`` preset, as a user runs it.

    python benchmarks/sweep_times.py [--sweeps demo,sizes,...] [--out benchmarks/results/sweep_times_cpu.json]

Each sweep runs from an empty temporary workdir with the command the README gives
(``stability sweep --sweep=sweeps/NAME.py:cpu --workdir=DIR``, default strategy, no W&B),
one after another, compiles included. Writes the wall seconds, the runs and the steps per
run of each, after each sweep (an interrupted benchmark keeps what it measured).
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

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(
    p.stem for p in (ROOT / "sweeps").glob("*.py") if not p.stem.startswith("reproduce_")
)


def time_sweep(name: str, workdir: Path) -> dict:
    cmd = [
        sys.executable, "-m", "stability", "sweep", f"--sweep=sweeps/{name}.py:cpu",
        f"--workdir={workdir}", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    runs = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    return {
        "sweep": f"sweeps/{name}.py:cpu",
        "wall_s": round(seconds, 1),
        "runs": len(runs),
        "steps": sorted({r["config"]["train"]["steps"] for r in runs}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweeps", default=",".join(SHIPPED), help="comma-separated sweep names")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/sweep_times_cpu.json"))
    args = ap.parse_args()
    out = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "sweeps": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sweeps.split(","):
            row = time_sweep(name, Path(tmp) / name)
            out["sweeps"].append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
