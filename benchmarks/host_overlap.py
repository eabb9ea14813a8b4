"""Does the host delay the device? Host time per call and device idle share of `stability train`
on 2 CPU processes (jax.distributed on this machine, one CPU device each).

    python benchmarks/host_overlap.py [--source DIR] [--steps 300] [--repeats 2]
        [--out benchmarks/results/host_overlap_cpu.json]

``--source``: the checkout whose ``stability`` package is measured (default: this one), so that
another commit (a ``git worktree``) is measured by the same script. Each process trains the same
run (d=64, 4 layers, T=64, B=8, a record at every step, 10 updates per call, W&B offline on
process 0, records on local disk) twice per repeat, in fresh workdirs:

- **full**: the loop as it is;
- **device only**: the same loop with the host work of a call's outputs removed (its
  ``_finish`` reads the outputs and does nothing else): the calls back to back.

Per call it gives the host time on the loop's thread (time in ``_finish`` less the time blocked
reading the outputs) and the loop's wall time; the device idle share is
``1 - device_only / full`` (the part of the full loop's wall time that the calls alone do not
take). Best of ``--repeats`` per process; process 0's numbers (it also writes W&B).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args) -> None:
    import dataclasses

    import jax

    jax.distributed.initialize(f"127.0.0.1:{args.port}", 2, args.worker)
    from stability import loop as L
    from stability import train as T
    from stability.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig

    cfg = Config(
        model=ModelConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4),
        optim=OptimConfig(lr=3e-3, warmup_steps=10),
        data=DataConfig(source="synthetic_markov", seq_len=64, batch_size=8, markov_vocab=256),
        train=TrainConfig(
            steps=args.steps,
            log_every=1,
            eval_every=args.steps,
            eval_batches=1,
            checkpoint_every=args.steps,
            steps_per_call=10,
        ),
    )
    cfg = dataclasses.replace(cfg, wandb=dataclasses.replace(cfg.wandb, mode="offline"))
    clock = {"run": 0.0, "finish": 0.0, "read": 0.0, "calls": 0}
    run, finish, device_get = L._Loop.run, L._Loop._finish, jax.device_get

    def timed_run(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return run(self, *a, **k)
        finally:
            clock["run"] += time.perf_counter() - t0

    def timed_finish(self, call):
        t0, read0 = time.perf_counter(), clock["read"]
        finish(self, call)
        clock["finish"] += time.perf_counter() - t0 - (clock["read"] - read0)
        clock["calls"] += 1

    def read_only(self, call):  # the device only: read the outputs, nothing else
        t0, read0 = time.perf_counter(), clock["read"]
        if isinstance(call.out, L.S.Gathered):  # its gather was dispatched after the call
            L.S.fetch(call.out)
        else:  # the loop's own read, as the loop of this source makes it
            L.S.to_host(call.out)
        clock["finish"] += time.perf_counter() - t0 - (clock["read"] - read0)
        clock["calls"] += 1

    def timed_get(x):
        t0 = time.perf_counter()
        try:
            return device_get(x)
        finally:
            clock["read"] += time.perf_counter() - t0

    jax.device_get = timed_get
    L._Loop.run = timed_run
    out = {"full": [], "device_only": []}
    for rep in range(args.repeats):
        for mode in ("full", "device_only"):
            L._Loop._finish = timed_finish if mode == "full" else read_only
            clock.update(run=0.0, finish=0.0, read=0.0, calls=0)
            workdir = Path(args.workdir) / f"{mode}-{rep}"
            T.train(cfg, workdir, progress=False)
            out[mode].append(
                {
                    "loop_seconds": clock["run"],
                    "calls": clock["calls"],
                    "host_ms_per_call": 1e3 * clock["finish"] / clock["calls"],
                    "loop_ms_per_call": 1e3 * clock["run"] / clock["calls"],
                }
            )
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=str(ROOT))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="")
    p.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker >= 0:
        return worker(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = Path(args.source).resolve()
    commit = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "PYTHONPATH": str(source),
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_PLATFORMS": "cpu",
        }
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, f"--worker={i}", f"--port={port}"]
                + [f"--workdir={tmp}", f"--steps={args.steps}", f"--repeats={args.repeats}"],
                env=env,
                cwd=tmp,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        outs = []
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=1800)
            if proc.returncode != 0:
                sys.exit(f"worker failed:\n{stderr[-3000:]}")
            outs.append(json.loads(stdout.split("RESULT ", 1)[1]))
    best = lambda rows, k: min(r[k] for r in rows)
    p0 = outs[0]
    full, dev = best(p0["full"], "loop_seconds"), best(p0["device_only"], "loop_seconds")
    result = {
        "source_commit": commit,
        "steps": args.steps,
        "calls": p0["full"][0]["calls"],
        "host_ms_per_call": best(p0["full"], "host_ms_per_call"),
        "loop_ms_per_call": best(p0["full"], "loop_ms_per_call"),
        "device_only_ms_per_call": best(p0["device_only"], "loop_ms_per_call"),
        "device_idle_share": 1 - dev / full,
        "processes": outs,
        "wall_seconds": time.time() - t0,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "processes"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
