"""Multi-process runs as on a TPU pod: the README's pod command (sweeps/pod_worker.sh, what
sweeps/launch_tpu_pod.sh runs on every worker) on 4 processes, and `stability train` on 2, each
process with its own CPU devices, jax.distributed connecting them (the worker script's
--distributed finds them through SLURM's variables here; on a pod, through the TPU runtime).

The workdir, the tfds ArrayRecord data and the SentencePiece model live on a gs:// bucket
(tests/fake_gcs.py, through tests/pod/sitecustomize.py: only the filesystem scheme is swapped),
and every device answers memory queries as a pod's do (another host's device refuses). Both
runs train up to 8 updates per call, with FSDP. A SIGTERM to ONE process (chosen at random,
sent by that process itself after it has read a call ending at a random step far from the end:
tests/pod/sitecustomize.py, so the notice cannot race the end of the run) stops every process
at the same step, with one checkpoint and the same message, exit 0; the rerun completes. The
pod sweep also takes a notice during its up-front compile: every process stops before its
first update. The records equal a single-process run at one update per call (rtol 1e-5;
1e-4 for gradient statistics: data-parallel sums round differently and
``grad/rms_over_eps`` divides them by ε), and no step is logged twice."""

import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from data import train_sentencepiece
from data.test_tfds import EVAL_DOCS, TRAIN_DOCS, StabilityTestText

from conftest import assert_records_close, free_port, tfds_text_config, write_config_file
from stability import train as T
from stability import workdir as W
from stability.sweep import run_sweep
from stability.workdir import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
POD = Path(__file__).resolve().parent / "pod"
pytestmark = pytest.mark.slow
STEPS = 128
GRACE = 60  # seconds from the SIGTERM to every process's exit


def config(prefix: str):
    train = {"steps": STEPS, "log_every": 4, "eval_every": 64, "checkpoint_every": 8, "fsdp": True}
    return tfds_text_config(prefix, 8, train=train)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tmp dir, bucket root, {"bucket"|"local": config}, their files, sweep file)."""
    tmp = tmp_path_factory.mktemp("pod")
    root = tmp / "bucket"
    data = root / "b"
    StabilityTestText(
        data_dir=str(data / "tfds"), file_format="array_record"
    ).download_and_prepare()
    train_sentencepiece(data, TRAIN_DOCS + EVAL_DOCS)  # data/sp.model
    cfgs = {"bucket": config("gs://b"), "local": config(str(data))}
    files = {k: write_config_file(tmp / f"{k}.py", c) for k, c in cfgs.items()}
    sweep_py = tmp / "sweep.py"
    sweep_py.write_text(
        "def get_sweep(arg=''):\n    return [{'optim.lr': lr} for lr in (1e-3, 3e-3)]\n"
    )
    return tmp, root, cfgs, files, str(sweep_py)


def start(
    cmd: list[str],
    n_proc: int,
    n_dev: int,
    root: Path,
    extra_env: dict[int, dict[str, str]] | None = None,
) -> list[subprocess.Popen]:
    """``cmd`` on ``n_proc`` processes of ``n_dev`` CPU devices each, with the fake bucket and
    pod devices, told their ranks as SLURM tells them (one process per node); ``extra_env``:
    more variables for some ranks."""
    port = str(free_port())
    procs = []
    for i in range(n_proc):
        env = {
            **os.environ,
            "WANDB_MODE": "disabled",
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={n_dev}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(POD), os.environ.get("PYTHONPATH")])),
            "STABILITY_FAKE_GCS": str(root),
            "STABILITY_FAKE_POD": "1",
            "SLURM_JOB_ID": "1",
            "SLURM_STEP_NODELIST": "127.0.0.1",
            "SLURM_NTASKS": str(n_proc),
            "SLURM_PROCID": str(i),
            "SLURM_LOCALID": "0",
            "JAX_COORDINATOR_PORT": port,
            "PYTHONFAULTHANDLER": "1",  # a process that aborts prints its Python stacks
            "PYTHON": sys.executable,  # pod_worker.sh's version check (the venv exists)
            **(extra_env or {}).get(i, {}),
        }
        # stdout and stderr go to files: a pipe left unread while another process is awaited
        # fills (64 KiB) and blocks its writer inside the collectives the others wait in
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True))
        procs[-1].files = (out, err)
    return procs


def finish(procs, timeout=900) -> list[str]:
    """Wait for every process; their stderr. Every process must exit 0; otherwise the
    assertion shows each one's exit code and the ends of its stderr."""
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    errs = []
    for p in procs:
        out, err = p.files
        err.seek(0)
        errs.append(err.read())
        out.close(), err.close()
    codes = [p.returncode for p in procs]
    assert codes == [0] * len(procs), f"exit codes {codes}\n" + "\n".join(
        f"--- process {i} (exit {c}) ---\n{e[:2000]}\n...\n{e[-4000:]}"
        for i, (c, e) in enumerate(zip(codes, errs, strict=True))
    )
    return errs


def sigterm_one(
    cmd, n_proc: int, n_dev: int, root: Path, tmp: Path, seed: int, in_compile: bool = False
) -> list[str]:
    """Start ``cmd`` with one process (chosen at random) set to SIGTERM itself once it has
    read a call ending at a random step of the first quarter of training (or, ``in_compile``,
    once it has compiled its first train call); every process exits 0 within GRACE seconds of
    the signal. Their stderr."""
    rng = random.Random(seed)
    log = tmp / f"sigterm-{seed}.log"
    log.unlink(missing_ok=True)
    when = (
        {"STABILITY_TEST_SIGTERM_IN_COMPILE": "1"}
        if in_compile
        else {"STABILITY_TEST_SIGTERM_AT": str(rng.randrange(8, STEPS // 4))}
    )
    at = {**when, "STABILITY_TEST_SIGTERM_LOG": str(log)}
    procs = start(cmd, n_proc, n_dev, root, {rng.randrange(n_proc): at})
    errs = finish(procs, timeout=900)
    sent = float(log.read_text().split()[0])
    assert time.time() - sent < GRACE
    return errs


def interrupted_at(errs: list[str]) -> int:
    """The step every process says it stopped at (the same line in each)."""
    lines = [
        re.findall(r"^interrupted at step (\d+); rerun the same command to continue$", e, re.M)
        for e in errs
    ]
    assert all(len(x) == 1 for x in lines) and len({x[0] for x in lines}) == 1, "\n\n".join(
        "\n".join(e.splitlines()[-6:]) for e in errs
    )
    return int(lines[0][0])


def assert_close(a: list[dict], b: list[dict]) -> None:
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rs]
    steps = [r["step"] for r in b]
    assert steps == sorted(set(steps)), steps  # no step logged twice
    assert_records_close(strip(a), strip(b), rtol=1e-5, atol=1e-6, rtol_for={"grad/": 1e-4})


def test_pod_sweep_on_4_processes_sigterm_one_then_rerun(setup):
    tmp, root, cfgs, files, sweep_py = setup
    ref = run_sweep(
        sweep_py,
        tmp / "ref",
        config_spec=files["local"],
        strategy="vmap",
        overrides=[("train.steps_per_call", "1")],
        progress=False,
        report=False,
    )
    cmd = ["sweeps/pod_worker.sh", sweep_py, "gs://b/runs/pod", f"--config={files['bucket']}"]
    runs = root / "b" / "runs" / "pod" / "runs"
    # a notice during the up-front compile: every process stops before training
    errs = sigterm_one(cmd, 4, 1, root, tmp, seed=2, in_compile=True)
    said = [
        re.findall(r"^interrupted.*; rerun the same command to continue$", e, re.M) for e in errs
    ]
    assert all(len(x) == 1 for x in said) and len({x[0] for x in said}) == 1, said
    assert said[0][0] in (
        "interrupted at step 0; rerun the same command to continue",
        "interrupted; rerun the same command to continue",
        "interrupted during the up-front compile; rerun the same command to continue",
    )
    assert not list(runs.glob("*/metrics.jsonl*"))  # nothing trained
    errs = sigterm_one(cmd, 4, 1, root, tmp, seed=0)
    stop = interrupted_at(errs)
    assert 0 < stop < STEPS
    assert "[2 run(s) left] default lr=0.001…0.003: 2 run(s), run×data×model mesh 2×2×1" in errs[0]
    # XLA's check asked a device of each process for its memory (another host's would refuse)
    assert all("train call per device: 0.00 GiB of 16.00 GiB" in e for e in errs)
    errs = finish(start(cmd, 4, 1, root))
    # every process loads the executables it stored when it first compiled them
    for e in errs:
        assert re.search(
            r"^train call \(2 runs vmapped, up to 8 updates, 3 metric rows\) \[mesh "
            r"run×data×model 2×2×1 on 4 cpu device\(s\) in 4 processes; fsdp on.*\]: loaded "
            r"executable",
            e,
            re.M,
        ), e[-3000:]
    assert "resuming default-lr0.001" in errs[0] and f"at step {stop}" in errs[0]
    got = sorted(
        read_jsonl(root / "b" / "runs" / "pod" / "results.jsonl")[0], key=lambda r: r["lr"]
    )
    ref = sorted(ref, key=lambda r: r["lr"])  # run ids differ: the configs name other paths
    assert [r["lr"] for r in got] == [r["lr"] for r in ref]
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g["final_loss"], r["final_loss"], rtol=1e-5)
        assert g["steps"] == STEPS
        assert_close(
            read_jsonl(tmp / "ref" / "runs" / r["run_id"] / "metrics.jsonl")[0],
            read_jsonl(runs / g["run_id"] / "metrics.jsonl")[0],
        )


def test_train_on_2_processes_sigterm_one_then_rerun(setup):
    tmp, root, cfgs, files, _ = setup
    local = cfgs["local"]
    T.train(
        replace(local, train=replace(local.train, steps_per_call=1)),
        tmp / "train_ref",
        progress=False,
    )
    cmd = [
        sys.executable,
        "-m",
        "stability",
        "train",
        f"--config={files['bucket']}",
        "--workdir=gs://b/runs/train",
        "--distributed",
        "--no-progress",
    ]
    metrics = root / "b" / "runs" / "train" / "metrics.jsonl"
    errs = sigterm_one(cmd, 2, 2, root, tmp, seed=1)
    stop = interrupted_at(errs)
    log = tmp / "events"
    env = {"STABILITY_TEST_EVENT_LOG": str(log)}
    errs = finish(start(cmd, 2, 2, root, {0: env, 1: env}))
    assert "[mesh run×data×model 1×4×1 on 4 cpu device(s) in 2 processes; fsdp on" in errs[0]
    assert all(re.search(r"^train call .*: loaded executable", e, re.M) for e in errs), errs
    assert f"resuming train at step {stop}" in errs[0]
    assert_close(W.metrics(tmp / "train_ref")[0], read_jsonl(metrics)[0])
    for i in range(2):  # on each process: call c's gather before call c+1, its read after
        events = Path(f"{log}.{i}").read_text().split("\n")[:-1]
        n = sum(e.startswith("call") for e in events)
        assert n > 2, events
        # no process enters the first call before process 0 has opened the records (XLA:CPU's
        # collectives give up on a process 30 s late: a slow bucket or W&B login would do it)
        barriers = [j for j, e in enumerate(events[: events.index("call 0")]) if e == "barrier"]
        assert barriers and ("records" in events) == (i == 0), events
        assert i != 0 or events.index("records") < barriers[-1], events
        # nor does process 0 rewrite the records (on a bucket: segments deleted) before every
        # process has read them back for the early-warning replay
        assert i != 0 or "barrier" in events[events.index("replayed") : events.index("records")]
        for c in range(n):
            before, after = events.index(f"gather {c}"), events.index(f"read {c}")
            assert events.index(f"call {c}") < before < after, events
            if c + 1 < n:
                assert before < events.index(f"call {c + 1}") < after, events
