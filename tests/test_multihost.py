"""Multi-process runs (jax.distributed on 127.0.0.1, CPU devices forced per process) on a real
tfds ArrayRecord dataset with a SentencePiece tokenizer: the global batch, and so every
result, equals a single-process run's; SIGKILL of every process then a rerun loses nothing.

Both use FSDP. Sweep: 4 processes x 2 devices (a 2x4 run x data mesh: each process feeds 4 of
the 8 batch rows, for one of the two runs), one update per device call (its program compiles in
half the time; every process compiles it, and on the rerun all but process 0 again). Train: 2
processes x 4 devices (parameters and batch split over all 8 devices, each process feeding 4
rows), two updates per call. The children share the test session's persistent compilation
cache."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data import train_sentencepiece
from data.test_tfds import EVAL_DOCS, TRAIN_DOCS, StabilityTestText

from conftest import assert_records_close, free_port, tiny_config, write_config_file
from stability import train as T
from stability.config import DataConfig
from stability.sweep import run_sweep
from stability.tracking import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
STEPS = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tmp dir, config file, sweep file, environment of the children)."""
    tmp = tmp_path_factory.mktemp("multihost")
    StabilityTestText(data_dir=str(tmp / "tfds"), file_format="array_record").download_and_prepare()
    sp_model = train_sentencepiece(tmp, TRAIN_DOCS + EVAL_DOCS)
    cfg = tiny_config(
        model={"vocab_size": 96},
        data={"source": "tfds", "tfds_name": "stability_test_text", "tfds_data_dir": str(tmp / "tfds"),
              "tokenizer": "sentencepiece", "tokenizer_path": sp_model, "batch_size": 8,
              "markov_vocab": DataConfig.markov_vocab, "markov_branching": DataConfig.markov_branching},
        train={"steps": STEPS, "log_every": 2, "eval_every": 8, "checkpoint_every": 4, "fsdp": True},
    )
    config_py = write_config_file(tmp / "config.py", cfg)
    sweep_py = tmp / "sweep.py"
    sweep_py.write_text("def get_sweep(arg=''):\n    return [{'optim.lr': lr} for lr in (3e-3, 3e-2)]\n")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return tmp, cfg, config_py, str(sweep_py), env


def start(args: list[str], n_proc: int, n_dev: int, env: dict) -> list[subprocess.Popen]:
    port = free_port()
    flags = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_dev}"
    return [
        subprocess.Popen(
            [sys.executable, "-m", "stability", *args, "--no-progress",
             "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n_proc),
             "--process-id", str(i)],
            cwd=ROOT, env={**env, "XLA_FLAGS": flags}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        for i in range(n_proc)
    ]


def finish(procs) -> list[str]:
    """Wait for every process; their stderr."""
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[:3000] + "\n...\n" + err[-2000:]
        errs.append(err)
    return errs


def kill_when(procs, ready) -> None:
    """SIGKILL every process once ``ready()`` (polled), before they finish."""
    deadline = time.time() + 600
    while not ready() and time.time() < deadline:
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        assert p.wait() == -signal.SIGKILL


def lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def assert_close(a: list[dict], b: list[dict]) -> None:
    """Equal records up to the float rounding of another device layout: rtol 1e-5 (atol 1e-6
    for near-zero values), except gradient statistics (``grad/*``): a data-parallel gradient is
    a sum in another order, and ``grad/rms_over_eps`` divides its rounding by ε = 1e-8 (a
    norm scale's came out 1.3e-5 apart), so those get rtol 1e-4."""
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rs]
    assert_records_close(strip(a), strip(b), rtol=1e-5, atol=1e-6, rtol_for={"grad/": 1e-4})


def test_sweep_on_4_processes_killed_and_rerun_equals_one_process(setup):
    tmp, _, config_py, sweep_py, env = setup
    one_per_call = ("train.steps_per_call", "1")
    ref = run_sweep(sweep_py, tmp / "one", config_spec=config_py, overrides=[one_per_call],
                    strategy="vmap", progress=False, report=False)
    args = ["sweep", "--sweep", sweep_py, "--config", config_py, "--workdir", str(tmp / "four"),
            "--strategy", "vmap", "--config.{}={}".format(*one_per_call)]
    procs = start(args, 4, 2, env)
    histories = lambda d: sorted((d / "runs").glob("*/metrics.jsonl"))
    kill_when(procs, lambda: any(lines(p) >= 4 for p in histories(tmp / "four")))
    assert lines(tmp / "four" / "results.jsonl") == 0  # killed mid-sweep
    procs = start(args, 4, 2, env)
    errs = finish(procs)
    mesh = "[mesh run×data×model 2×4×1 on 8 cpu device(s) in 4 processes; fsdp on"
    assert f"train step (vmapped, up to 1 per call) {mesh}" in errs[0]
    four = {r["run_id"]: r for r in read_jsonl(tmp / "four" / "results.jsonl")[0]}
    assert sorted(four) == sorted(r["run_id"] for r in ref)
    for r in ref:
        np.testing.assert_allclose(four[r["run_id"]]["final_loss"], r["final_loss"], rtol=1e-5)
        assert four[r["run_id"]]["steps"] == STEPS
        a = read_jsonl(tmp / "one" / "runs" / r["run_id"] / "metrics.jsonl")[0]
        b = read_jsonl(tmp / "four" / "runs" / r["run_id"] / "metrics.jsonl")[0]
        assert_close(a, b)


def test_train_on_2_processes_killed_and_rerun_equals_one_process(setup):
    tmp, cfg, config_py, _, env = setup
    T.train(cfg, tmp / "train_one", progress=False)
    args = ["train", "--config", config_py, "--workdir", str(tmp / "train_two")]
    procs = start(args, 2, 4, env)
    kill_when(procs, lambda: lines(tmp / "train_two" / "metrics.jsonl") >= 4)
    assert lines(tmp / "train_two" / "metrics.jsonl") < STEPS // 2  # killed mid-run
    procs = start(args, 2, 4, env)
    errs = finish(procs)
    mesh = "[mesh run×data×model 1×8×1 on 8 cpu device(s) in 2 processes; fsdp on"
    assert f"train step (up to 2 per call) {mesh}" in errs[0]
    assert_close(T.read_metrics(tmp / "train_one"), T.read_metrics(tmp / "train_two"))
    meta = json.loads(next((tmp / "train_two" / "checkpoints" / str(STEPS)).glob("meta/*")).read_text())
    assert sorted(r[0] for r in meta["stream"]["rows"]) == list(range(8))  # every row's state
