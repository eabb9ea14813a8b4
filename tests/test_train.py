"""`stability train` (stability/train.py): the metric keys, the workdir's checks, a diverged
run's error and checkpoint, W&B offline."""

import math

import pytest

from stability import train as T
from stability import workdir as W
from stability.config import ConfigError


def test_fixed_metric_keys_present_and_finite(tiny, tmp_path):
    cfg = tiny()
    T.train(cfg, tmp_path, progress=False)
    records = W.metrics(tmp_path)[0]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    last = records[-1]
    fixed = [
        "step",
        "lr",
        "train/loss",
        "train/z_loss",
        "logits/log_z_mean",
        "logits/log_z_max",
        "logits/mean",
        "grad/global_norm",
        "perf/tokens_per_sec",
        "eval/loss",
    ]
    for i in range(cfg.model.n_layers):
        fixed += [
            f"attn/max_logit/layer_{i}",
            f"attn/entropy/layer_{i}",
            f"attn/entropy_min/layer_{i}",
        ]
    for key in fixed:
        assert key in last and math.isfinite(last[key]), key
    for prefix in ("grad/rms/", "update/rms/", "param/rms/"):
        keys = [k for k in last if k.startswith(prefix)]
        assert f"{prefix}blocks/0/mlp/fc1/kernel" in keys
        assert all(math.isfinite(last[k]) for k in keys)
    assert "eval/loss" in records[1] and "eval/loss" not in records[0]
    assert (tmp_path / "config.json").exists()
    # the mean output logit is no more than log Z (a logsumexp bounds every logit's mean)
    assert last["logits/mean"] < last["logits/log_z_mean"]


def test_rerun_of_finished_run_does_nothing(tiny, tmp_path):
    cfg = tiny()
    first = T.train(cfg, tmp_path, progress=False)
    again = T.train(cfg, tmp_path, progress=False)
    assert again.final_eval_loss == first.final_eval_loss
    assert len(W.metrics(tmp_path)[0]) == 4


def test_different_config_in_workdir_is_refused(tiny, tmp_path):
    T.train(tiny(), tmp_path, progress=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match="different config.*optim.lr"):
        T.train(tiny(optim={"lr": 1e-3}), tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    T.train(tiny(optim={"lr": 1e-3}), tmp_path, overwrite=True, progress=False)
    assert W.metrics(tmp_path)[0][-1]["step"] == 20


def test_out_of_bound_loss_stops_with_last_finite_checkpoint(tiny, tmp_path):
    # The loss starts near log 64 ≈ 4.16 and first exceeds 4.16 after a few updates at this LR.
    cfg = tiny(
        optim={"lr": 0.5, "grad_clip": 0.0, "warmup_steps": 0},
        model={"qk_norm": False},
        train={"divergence_loss": 4.3, "steps": 40, "log_every": 40},
    )
    with pytest.raises(T.Diverged, match=r"update (\d+)") as err:
        T.train(cfg, tmp_path, progress=False)
    records = W.metrics(tmp_path)[0]
    last = records[-1]
    assert last["alive"] is False and not last["train/loss"] <= 4.3
    assert all(r["alive"] for r in records[:-1])
    # The stack stopped one call after the divergence was read (calls end at 10, 20, ...),
    # its frozen state checkpointed: the state before the failing update.
    import orbax.checkpoint as ocp

    ckpts = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts[-1] == 20 and "checkpointed at step 20" in str(err.value)
    state = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "20" / "state")
    assert state["step"].tolist() == [last["step"] - 1] and state["alive"].tolist() == [False]
    assert f"update {last['step']}" in str(err.value)


def test_wandb_offline_run_directory_has_logged_keys(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny(wandb={"mode": "offline"})
    T.train(cfg, tmp_path, progress=False)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    wandb_file = next(runs[0].glob("*.wandb"))
    data = wandb_file.read_bytes()
    for key in (b"train/loss", b"attn/entropy/layer_0", b"eval/loss", b"qk_norm"):
        assert key in data, key


def test_a_mup_simple_checkpoint_of_release_0_2_is_refused(tiny, tmp_path):
    """Release 0.2.0's "mup_simple" left the head's LR unscaled: its checkpoints (meta without
    "release") are not resumed under the paper's rule, and the message names both ways out."""
    import json

    cfg = tiny(
        optim={"parametrization": "mup_simple", "mup_base_d_model": 16},
        train={"steps": 20, "checkpoint_every": 10},
    )
    T.train(cfg, tmp_path, progress=False)
    (tmp_path / "checkpoints" / "20").rename(tmp_path / "later")
    meta = next((tmp_path / "checkpoints" / "10").glob("meta/*"))
    meta.write_text(
        json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "release"})
    )
    with pytest.raises(ConfigError, match="release 0.2.0 or earlier.*mup_hidden"):
        T.train(cfg, tmp_path, progress=False)
