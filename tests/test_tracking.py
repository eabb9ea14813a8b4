"""Tracker: versions.json, W&B's directory (WANDB_DIR or the run's) and the W&B run id kept
across reruns. W&B runs offline here (WANDB_MODE=offline in the environment: no network)."""

import json
import os
import re

import pytest

from stability.config import WandbConfig
from stability.tracking import Tracker, package_versions

CLOSED = "http://127.0.0.1:9"  # any request W&B might make goes to a closed local port


@pytest.fixture
def offline(tmp_path, monkeypatch):
    env = {
        "WANDB_MODE": "offline",
        "WANDB_BASE_URL": CLOSED,
        "HTTP_PROXY": CLOSED,
        "HTTPS_PROXY": CLOSED,
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    yield
    import wandb

    wandb.teardown()  # stop the service process this test started


def segment(run_dir, steps, resume):
    """A start of the run (resuming after the step before ``steps`` when ``resume``)."""
    keep = steps[0] - 1 if resume else 0
    tracker = Tracker(run_dir, WandbConfig(), {"lr": 0.1}, name="r", keep_step=keep)
    for s in steps:
        tracker.log([{"step": s, "train/loss": 1.0 / s}])
    tracker.close()


def offline_dirs(root):
    return sorted(p.name for p in (root / "wandb").glob("offline-run-*"))


def test_rerun_continues_the_same_wandb_run(tmp_path, offline):
    run_dir = tmp_path / "run"
    segment(run_dir, [1, 2, 3], resume=False)
    run_id = (run_dir / "wandb_id").read_text()
    segment(run_dir, [4, 5, 6], resume=True)
    dirs = offline_dirs(run_dir)
    # two starts in the same second get "-1" appended by wandb
    assert len(dirs) == 2 and all(re.search(rf"-{run_id}(-\d+)?$", d) for d in dirs)
    assert (run_dir / "wandb_id").read_text() == run_id
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_wandb_dir_is_honoured(tmp_path, offline, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    run_dir = tmp_path / "run"
    segment(run_dir, [1], resume=False)
    assert not (run_dir / "wandb").exists()
    run_id = (run_dir / "wandb_id").read_text()
    (d,) = offline_dirs(tmp_path / "elsewhere")
    assert d.endswith(f"-{run_id}")
    import wandb

    wandb.teardown()  # the service writes the transaction log fully when it stops
    log = (tmp_path / "elsewhere" / "wandb" / d / f"run-{run_id}.wandb").read_bytes()
    assert b"versions" in log and f'"jaxlib":"{package_versions()["jaxlib"]}"'.encode() in log


def test_versions_are_recorded_and_a_change_warns(tmp_path):
    run_dir = tmp_path / "run"
    Tracker(run_dir, WandbConfig(mode="disabled"), {}, name="r").close()
    recorded = json.loads((run_dir / "versions.json").read_text())
    assert recorded == package_versions()
    assert set(recorded) >= {
        "python",
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "orbax-checkpoint",
        "numpy",
    }
    assert recorded["jax"][0].isdigit()
    (run_dir / "versions.json").write_text(json.dumps({**recorded, "jax": "0.0.1"}))
    with pytest.warns(UserWarning, match="jax 0.0.1 -> "):
        Tracker(run_dir, WandbConfig(mode="disabled"), {}, name="r").close()
    assert json.loads((run_dir / "versions.json").read_text()) == recorded
    assert os.listdir(run_dir) == ["versions.json"]  # disabled W&B writes nothing else
