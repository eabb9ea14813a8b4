"""What a sweep's records cost on an object store: bytes written, and reading them back.

    python benchmarks/results_store.py [--runs 20] [--steps 1000] [--metrics 300]
        [--flush-every 10] [--out benchmarks/results/results_store_cpu.json]

Writes a synthetic record stream (RUNS runs × STEPS logged steps × METRICS float metrics, the
size of a w1024 6-layer run's records) through the real writer (``workdir.Jsonl``) to a fake
``gs://`` bucket (``tests/fake_gcs.py``), one flush per FLUSH_EVERY records: a flush per device
call, the worst case (the loop flushes at most every ``REMOTE_FLUSH_SECONDS`` otherwise, and
before each checkpoint). Counts the bytes every object write puts on the bucket against the
bytes of the records, beside what rewriting the whole object at every flush would write for
the same flushes. Then reads every run's records back, each way in a fresh process, with its
time and peak memory:

- **all**: every history whole into Python dicts (what a sweep's report did before it read
  columns; ``forecast`` and ``reproduce`` still read whole histories);
- **report**: the columns a sweep's report reads (``report.history_keys``: train loss, alive,
  per-layer min entropy), as ``stability report`` reads them; the notebook's
  ``results.history(keys=...)`` reads the same way.

The records' names are a run's: ``train/loss``, ``alive``, per-layer ``attn/entropy_min`` and
``attn/max_logit`` of 6 layers, then filler metrics up to METRICS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import fake_gcs  # noqa: E402

from stability import workdir as W  # noqa: E402


def record(step: int, names: list[str], rng: random.Random) -> dict:
    return {"step": step, "alive": True, **{n: rng.random() * 10 for n in names}}


def metric_names(metrics: int) -> list[str]:
    per_layer = [f"attn/{m}/layer_{i}" for m in ("entropy_min", "max_logit") for i in range(6)]
    named = ["train/loss", *per_layer]
    return named + [f"metric/{i:03d}" for i in range(metrics - 1 - len(named))]


def write(bucket: Path, runs: int, steps: int, metrics: int, flush_every: int) -> dict:
    """Every run's stream through ``W.Jsonl`` on the fake bucket; bytes put vs record bytes."""
    names = metric_names(metrics)
    rng = random.Random(0)
    put = [0, 0]  # bytes, objects
    with fake_gcs.bucket(bucket):
        cls = type(W.path("gs://bench/x"))
        write_text = cls.write_text

        def counting(self, data, *args, **kwargs):
            put[0] += len(data.encode("utf-8"))
            put[1] += 1
            return write_text(self, data, *args, **kwargs)

        cls.write_text = counting
        try:
            data = rewrite = 0
            t0 = time.perf_counter()
            for r in range(runs):
                out = W.Jsonl(f"gs://bench/sweep/runs/run{r:04d}/metrics.jsonl")
                size = 0
                for s in range(0, steps, flush_every):
                    batch = [
                        record(step, names, rng) for step in range(s, min(s + flush_every, steps))
                    ]
                    out.append(batch, force=True)
                    flushed = sum(len(W._line(b).encode("utf-8")) for b in batch)
                    data, size = data + flushed, size + flushed
                    rewrite += size  # the whole object again at this flush
            seconds = time.perf_counter() - t0
        finally:
            cls.write_text = write_text
    return {
        "record_bytes": data,
        "bytes_put": put[0],
        "objects_put": put[1],
        "ratio": put[0] / data,
        "whole_object_rewrite_bytes": rewrite,
        "whole_object_rewrite_ratio": rewrite / data,
        "write_seconds": round(seconds, 1),
    }


def read(bucket: Path, runs: int, how: str) -> dict:
    """In this (fresh) process: every run's records, ``how`` = "all" (whole histories) or
    "report" (the report's columns), all held at once as the report holds them; seconds and
    peak resident memory."""
    from stability.report import history_keys

    keep = history_keys if how == "report" else None
    with fake_gcs.bucket(bucket):
        t0 = time.perf_counter()
        histories = [W.metrics(f"gs://bench/sweep/runs/run{r:04d}", keep)[0] for r in range(runs)]
        n = sum(map(len, histories))
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {
        f"{how}_records_read": n,
        f"{how}_read_seconds": round(seconds, 1),
        f"{how}_read_peak_rss_gib": round(peak, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=1000, help="logged steps per run")
    ap.add_argument("--metrics", type=int, default=300, help="metrics per record")
    ap.add_argument("--flush-every", type=int, default=10, help="records per flush")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/results_store_cpu.json"))
    ap.add_argument("--read-only", metavar="BUCKET", help=argparse.SUPPRESS)
    ap.add_argument("--how", default="all", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.read_only:
        print(json.dumps(read(Path(a.read_only), a.runs, a.how)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "runs": a.runs,
            "logged_steps": a.steps,
            "metrics": a.metrics,
            "records_per_flush": a.flush_every,
            **write(Path(tmp), a.runs, a.steps, a.metrics, a.flush_every),
        }
        env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
        for how in ("all", "report"):
            got = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    f"--runs={a.runs}",
                    f"--read-only={tmp}",
                    f"--how={how}",
                ],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            result.update(json.loads(got.stdout.splitlines()[-1]))
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    mb = result["record_bytes"] / 1e6
    print(f"{a.runs} runs × {a.steps} records × {a.metrics} metrics: {mb:.0f} MB of records")
    print(
        f"written to the bucket: {result['ratio']:.3f}× the records ({result['objects_put']} objects); "
        f"rewriting each object whole at every flush would write {result['whole_object_rewrite_ratio']:.0f}×"
    )
    for how, what in (("all", "every history whole"), ("report", "the report's columns")):
        print(
            f"read back, {what}: {result[f'{how}_read_seconds']} s, "
            f"peak {result[f'{how}_read_peak_rss_gib']} GiB"
        )


if __name__ == "__main__":
    main()
