"""Faults of `stability train`, each in a real process on real files.

The faulted process is always a real child; the uninterrupted reference and the plain reruns
go through ``stability.cli.main`` in this process (the same code, compiled once for the module),
and reruns whose stderr or exit status is asserted run as children too."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_config, write_config_file
from stability.cli import main
from stability.config import LossSpikeWatch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

STEPS = 40


def config_file(tmp_path: Path) -> str:
    """40 steps, a record every 2; a loss-spike detector so sensitive (1 std over the last 4
    records) that the run raises and clears several early warnings (events.jsonl)."""
    cfg = tiny_config(
        train={
            "steps": STEPS,
            "log_every": 2,
            "eval_every": 10,
            "checkpoint_every": 4,
            "max_to_keep": 3,
        },
        watch={"loss_spike": LossSpikeWatch(k=1.0, window=4)},
    )
    return write_config_file(tmp_path / "cfg.py", cfg)


def train_args(config: str, workdir: Path) -> list[str]:
    return ["train", "--config", config, "--workdir", str(workdir), "--no-progress"]


def train_cmd(config: str, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "stability", *train_args(config, workdir)]


def run(cmd, **kw):
    return subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "disabled"},
        **kw,
    )


def metrics(workdir: Path) -> list[dict]:
    out = []
    for line in (workdir / "metrics.jsonl").open():
        rec = json.loads(line)
        out.append({k: v for k, v in rec.items() if not k.startswith("perf/")})
    return out


def events(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "events.jsonl").open()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(config file, records of its uninterrupted run at one update per call, its early-warning
    events): the faulted runs train up to 4 updates per call, and must log the same records,
    bitwise, and the same events."""
    tmp = tmp_path_factory.mktemp("ref")
    config = config_file(tmp)
    assert main([*train_args(config, tmp / "run"), "--config.train.steps_per_call=1"]) == 0
    warned = events(tmp / "run")
    assert [e["event"] for e in warned].count("warn") >= 2  # the events compared below
    return config, metrics(tmp / "run"), warned


def wait_for_records(workdir: Path, n: int, timeout: float = 300) -> None:
    path = workdir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{path} never reached {n} records")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_points_then_rerun_equals_uninterrupted(reference, tmp_path, seed):
    config, ref, warned = reference
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(config, workdir),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    wait_for_records(workdir, random.Random(seed).randint(1, STEPS // 2 - 2))
    time.sleep(random.Random(seed).random() * 0.3)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert main(train_args(config, workdir)) == 0
    assert metrics(workdir) == ref  # bitwise on CPU, nothing lost or duplicated
    assert events(workdir) == warned  # no warning repeated or lost


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_or_ctrl_c_checkpoints_and_exits_zero(reference, tmp_path, signum):
    config, ref, warned = reference
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(config, workdir),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    wait_for_records(workdir, 3)
    t = time.time()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert time.time() - t < 30
    (line,) = [x for x in err.splitlines() if "interrupt" in x or "rerun" in x or "SIG" in x]
    assert line.startswith("interrupted at step ") and line.endswith(
        "; rerun the same command to continue"
    )
    assert main(train_args(config, workdir)) == 0
    assert metrics(workdir) == ref


def test_second_ctrl_c_exits_at_once_with_130(reference, tmp_path):
    """The first Ctrl-C lands while the programs are compiled or loaded, the second 0.3 s later
    exits at once: status 130, one line, no traceback; the rerun is the reference."""
    config, ref, warned = reference
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(config, workdir),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    deadline = time.time() + 120
    while not (workdir / "config.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.count("interrupted again") == 1
    assert main(train_args(config, workdir)) == 0
    assert metrics(workdir) == ref


def test_corrupt_latest_checkpoint_falls_back_to_previous(reference, tmp_path):
    config, ref, warned = reference
    workdir = tmp_path / "run"
    assert main(train_args(config, workdir)) == 0
    ckpts = workdir / "checkpoints"
    latest = lambda: max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    # Truncated: every data file of the latest checkpoint cut to a third.
    step = latest()
    for f in (ckpts / str(step)).rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "json" not in f.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    out = run(train_cmd(config, workdir))
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"checkpoint {ckpts / str(step)} is unreadable" in out.stderr
    assert metrics(workdir) == ref
    aside = workdir / "checkpoints.unreadable"
    assert [p.name.split(".")[0] for p in aside.iterdir()] == [str(step)]  # kept, not deleted
    # Deleted: the latest (rewritten by the rerun) loses its array files.
    step = latest()
    deleted = [f for f in (ckpts / str(step)).rglob("*") if f.is_file() and "json" not in f.name]
    assert deleted
    for f in deleted:
        f.unlink()
    with pytest.warns(UserWarning, match=f"checkpoint {ckpts / str(step)} is unreadable"):
        assert main(train_args(config, workdir)) == 0
    assert metrics(workdir) == ref
    assert len(list(aside.iterdir())) == 2 and latest() == step  # rewritten afresh


def test_no_readable_checkpoint_is_a_clear_error_not_a_silent_restart(reference, tmp_path):
    config, _, _ = reference
    workdir = tmp_path / "run"
    assert main(train_args(config, workdir)) == 0
    before = (workdir / "metrics.jsonl").read_bytes()
    for step_dir in (workdir / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            for f in step_dir.rglob("*"):
                if f.is_file() and "json" not in f.name:
                    f.write_bytes(b"")
    out = run(train_cmd(config, workdir))
    assert out.returncode == 1
    assert "no readable checkpoint" in out.stderr and "Traceback" not in out.stderr
    assert (workdir / "metrics.jsonl").read_bytes() == before


def test_wandb_online_without_network_warns_once_and_keeps_jsonl(reference, tmp_path):
    config, ref, warned = reference
    workdir = tmp_path / "run"
    env = {
        **os.environ,
        "WANDB_MODE": "online",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_API_KEY": "x" * 40,
        "WANDB_INIT_TIMEOUT": "5",
    }
    out = subprocess.run(
        train_cmd(config, workdir) + ["--config.wandb.mode=online"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count("W&B disabled for this run") == 1
    shutil.rmtree(workdir / "wandb", ignore_errors=True)
    assert metrics(workdir) == [{k: v for k, v in r.items()} for r in ref]
