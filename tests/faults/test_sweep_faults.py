"""Faults of `stability sweep`: torn result lines and SIGTERM, on real files and processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_sweep import ROOT, comparable, histories_by_lr, write_files

from stability.cli import main
from stability.sweep import read_results, run_sweep


def test_torn_result_line_redoes_only_that_run(tmp_path, capsys):
    config_py, sweep_py = write_files(tmp_path, lrs=(1e-3, 1e-2))
    first = run_sweep(
        sweep_py,
        tmp_path / "w",
        config_spec=config_py,
        strategy="vmap",
        progress=False,
        report=False,
    )
    path = tmp_path / "w" / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    torn_id = json.loads(lines[-1])["run_id"]
    # A crash mid-append of the last record, then a hand-edited foreign line.
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2] + "\nnot json\n")
    again = run_sweep(
        sweep_py,
        tmp_path / "w",
        config_spec=config_py,
        strategy="vmap",
        progress=False,
        report=False,
    )
    err = capsys.readouterr().err
    assert "skipped unreadable lines" in err and "1 to train in 1 chunk(s)" in err
    records, bad = read_results(tmp_path / "w")
    assert len(bad) == 2
    assert [r["run_id"] for r in records].count(torn_id) == 1
    assert comparable(records) == comparable(first) == comparable(again)


@pytest.mark.slow
def test_sweep_sigterm_checkpoints_exits_zero_and_resumes(tmp_path):
    config_py, sweep_py = write_files(tmp_path, lrs=(1e-3, 1e-2), steps=40)
    args = [
        sys.executable,
        "-m",
        "stability",
        "sweep",
        "--sweep",
        sweep_py,
        "--config",
        config_py,
        "--strategy",
        "sequential",
        "--no-progress",
        "--workdir",
        str(tmp_path / "w"),
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    ref = run_sweep(
        sweep_py,
        tmp_path / "ref",
        config_spec=config_py,
        strategy="sequential",
        overrides=[("train.steps_per_call", "1")],
        progress=False,
        report=False,
    )
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    runs = tmp_path / "w" / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and not any(runs.glob("*/metrics.jsonl")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert err.count("interrupted at step") == 1 and "SIGTERM" not in err
    assert main(args[3:]) == 0  # the rerun, in this process
    assert comparable(read_results(tmp_path / "w")[0]) == comparable(ref)  # K=1's
    assert histories_by_lr(tmp_path / "w") == histories_by_lr(tmp_path / "ref")
