import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config, write_config_file
from stability import plots
from stability.cli import main
from stability.sharding import mesh_shape
from stability.sweep import read_results, run_sweep
from stability.workdir import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
LRS = (1e-3, 1e-2, 1e-1)


def write_files(
    tmp_path: Path, lrs=LRS, steps=12, qk_norm=(False,), steps_per_call=0
) -> tuple[str, str]:
    """A tiny base config file and a sweep file (qk_norm × lrs) in tmp_path. One qk_norm value
    (the default) means one program, and the same one for every test that keeps ``steps``: the
    session's compilation cache compiles it once. ``steps_per_call=1`` (the notebook's test)
    compiles in about half the time (no loop beside the update that returns metrics)."""
    cfg = tiny_config(
        train={
            "steps": steps,
            "log_every": 4,
            "eval_every": 6,
            "checkpoint_every": 4,
            "steps_per_call": steps_per_call,
        }
    )
    config_py = write_config_file(tmp_path / "tiny_config.py", cfg)
    sweep_py = tmp_path / "tiny_sweep.py"
    sweep_py.write_text(
        "NAME = 'tiny'\n"
        "def get_sweep(arg=''):\n"
        f"    return [{{'model.qk_norm': qk, 'optim.lr': lr}} for qk in {qk_norm!r} for lr in {lrs!r}]\n"
    )
    return config_py, str(sweep_py)


def by_id(records):
    return {r["run_id"]: r for r in records}


def test_vmap_equals_sequential_and_report(tmp_path):
    config_py, sweep_py = write_files(tmp_path)
    seq = run_sweep(
        sweep_py, tmp_path / "seq", config_spec=config_py, strategy="sequential", progress=False
    )
    vm = run_sweep(
        sweep_py, tmp_path / "vm", config_spec=config_py, strategy="vmap", progress=False
    )
    a, b = by_id(seq), by_id(vm)
    assert a.keys() == b.keys() and len(a) == 3
    for rid in a:
        np.testing.assert_allclose(a[rid]["final_loss"], b[rid]["final_loss"], rtol=1e-4)
        np.testing.assert_allclose(a[rid]["max_attn_logit"], b[rid]["max_attn_logit"], rtol=1e-3)
        assert {
            "setting",
            "lr",
            "loss_at_init",
            "diverged",
            "diverged_step",
            "min_attn_entropy",
            "steps",
            "wall_seconds",
            "config",
        } <= a[rid].keys()
        assert a[rid]["setting"] == "default"  # only the LR varies
        hist = read_jsonl(tmp_path / "vm" / "runs" / rid / "metrics.jsonl")[0]
        assert [h["step"] for h in hist] == [4, 6, 8, 12]
    for name in ("lr_sensitivity.png", "max_attn_logit.png", "attn_entropy.png"):
        assert (tmp_path / "vm" / name).read_bytes()[:4] == b"\x89PNG", name
    assert "LR sensitivity" in (tmp_path / "vm" / "report.md").read_text()


def test_rerun_skips_finished_runs(tmp_path):
    config_py, sweep_py = write_files(tmp_path, lrs=(1e-2,))
    first = run_sweep(sweep_py, tmp_path / "w", config_spec=config_py, progress=False)
    mtime = (tmp_path / "w" / "results.jsonl").stat().st_mtime_ns
    again = run_sweep(sweep_py, tmp_path / "w", config_spec=config_py, progress=False)
    assert again == first
    assert (tmp_path / "w" / "results.jsonl").stat().st_mtime_ns == mtime


def test_lr_sensitivity_matches_formula():
    recs = [
        {
            "run_id": "a",
            "setting": "s",
            "lr": 1e-3,
            "final_loss": 3.0,
            "loss_at_init": 5.0,
            "diverged": False,
        },
        {
            "run_id": "b",
            "setting": "s",
            "lr": 1e-2,
            "final_loss": 2.0,
            "loss_at_init": 5.0,
            "diverged": False,
        },
        {
            "run_id": "c",
            "setting": "s",
            "lr": 1e-1,
            "final_loss": 9.0,
            "loss_at_init": 5.0,
            "diverged": False,
        },
        {
            "run_id": "d",
            "setting": "s",
            "lr": 1.0,
            "final_loss": None,
            "loss_at_init": 5.0,
            "diverged": True,
        },
    ]
    # ℓ* = 2, ℓ0 = 5: terms 1, 0, min(9,5)-2 = 3, diverged → 5-2 = 3.
    assert plots.lr_sensitivity(recs) == pytest.approx((1 + 0 + 3 + 3) / 4)
    table = plots.summary_table(recs)
    assert "div" in table and "1.750" in table


def cli(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "stability", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "WANDB_MODE": "disabled", **(env or {})},
    )


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda c, s, t: ["--sweep", str(t / "nosweep.py")], "defines no get_sweep"),
        (lambda c, s, t: ["--sweep", str(t / "empty.py")], "empty grid"),
        (
            lambda c, s, t: ["--sweep", s, "--config", c, "--config.model.nope=1"],
            "config.model.nope",
        ),
    ],
    ids=["no-get_sweep", "empty-grid", "unknown-key"],
)
def test_bad_sweep_input_exits_2_without_writing(tmp_path, capsys, make_args, message):
    config_py, sweep_py = write_files(tmp_path)
    (tmp_path / "nosweep.py").write_text("X = 1\n")
    (tmp_path / "empty.py").write_text("def get_sweep(arg=''):\n    return []\n")
    code = main(
        ["sweep", *make_args(config_py, sweep_py, tmp_path), "--workdir", str(tmp_path / "w")]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_workdir_holding_another_sweep_is_refused(tmp_path, capsys):
    config_py, sweep_py = write_files(tmp_path, lrs=(1e-2,))
    run_sweep(sweep_py, tmp_path / "w", config_spec=config_py, progress=False, report=False)
    before = (tmp_path / "w" / "results.jsonl").read_bytes()
    _, other = write_files(tmp_path, lrs=(1e-3,))
    code = main(
        ["sweep", "--sweep", other, "--config", config_py, "--workdir", str(tmp_path / "w")]
    )
    assert code == 2 and "different sweep" in capsys.readouterr().err
    assert (tmp_path / "w" / "results.jsonl").read_bytes() == before


def comparable(records):
    """Result records without their run ids (a reference at one update per call has other
    ids: its config differs in train.steps_per_call) or times, by LR."""
    keep = (
        "lr",
        "final_loss",
        "loss_at_init",
        "diverged",
        "diverged_step",
        "max_attn_logit",
        "min_attn_entropy",
        "steps",
    )
    return sorted(({k: r[k] for k in keep} for r in records), key=lambda r: r["lr"])


def histories_by_lr(workdir):
    """{lr: its run's metric records without perf/*}."""
    out = {}
    for r in read_results(workdir)[0]:
        recs = read_jsonl(workdir / "runs" / r["run_id"] / "metrics.jsonl")[0]
        out[r["lr"]] = [{k: v for k, v in x.items() if not k.startswith("perf/")} for x in recs]
    return out


@pytest.mark.parametrize(
    "n_dev, k, batch, expect",
    [
        (8, 3, 4, (2, 4)),  # fewer runs than devices: the rest split the batch
        (8, 1, 16, (1, 8)),
        (8, 5, 2, (8, 1)),  # the batch does not split 4 ways: pad the runs (3 copies)
        (8, 7, 16, (8, 1)),  # a data axis would not lower the padded run count
        (8, 20, 16, (8, 1)),
        (1, 7, 16, (1, 1)),
        (256, 7, 256, (4, 64)),
    ],
)
def test_mesh_shape(n_dev, k, batch, expect):
    assert mesh_shape(n_dev, k, batch) == (*expect, 1)


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_records(tmp_path):
    """Killed (up to 4 updates per call) and rerun: the records of an uninterrupted sweep at
    one update per call."""
    config_py, sweep_py = write_files(tmp_path, lrs=(1e-3, 1e-2, 3e-2))
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
    ]
    ref = [*args[3:], "--workdir", str(tmp_path / "ref"), "--config.train.steps_per_call=1"]
    assert main(ref) == 0  # in this process
    results = tmp_path / "killed" / "results.jsonl"
    proc = subprocess.Popen(
        [*args, "--workdir", str(tmp_path / "killed")],
        cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "disabled"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (
        results.exists() and results.read_text().count("\n") >= 1
    ):
        time.sleep(0.2)
    time.sleep(1.0)  # somewhere inside the second run
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert main([*args[3:], "--workdir", str(tmp_path / "killed")]) == 0
    assert comparable(read_results(tmp_path / "killed")[0]) == comparable(
        read_results(tmp_path / "ref")[0]
    )
    assert histories_by_lr(tmp_path / "killed") == histories_by_lr(tmp_path / "ref")
