"""Early-warning detectors (stability/watch.py) on hand-made metric histories: each fires when
its condition starts, not before, once, and clears; and the W&B alert offline."""

import math
from dataclasses import replace

import pytest

from stability.config import WatchConfig
from stability.watch import (
    EntropyCollapse,
    LogitGrowth,
    LogZDrift,
    LossSpike,
    UpdatesVsEps,
    Watcher,
)

CFG = WatchConfig()


def run(detector, records):
    """[(step, event kind)] of ``records`` fed one by one."""
    return [(e["step"], e["event"]) for r in records for e in detector.update(r)]


def logits(values, every=10, layers=2):
    return [
        {
            "step": every * (i + 1),
            **{f"attn/max_logit/layer_{j}": v / (j + 1) for j in range(layers)},
        }
        for i, v in enumerate(values)
    ]


def test_logit_growth_predicts_the_crossing_and_fires_once():
    # ×2 every 10 steps from 8: crosses 1e4 near step 10 + 10·log2(1250) ≈ 113, before 1000.
    grow = logits([8 * 2**i for i in range(10)])
    d = LogitGrowth(CFG.logit, steps=1000)
    events = [e for r in grow for e in d.update(r)]
    assert [e["event"] for e in events] == ["warn"]  # once, while it keeps growing
    (warn,) = events
    assert warn["value"] >= CFG.logit.min_logit  # not before the logit reaches min_logit
    assert warn["step"] == 30 and abs(warn["predicted_step"] - 113) <= 2
    assert warn["trend"] == pytest.approx(10, rel=1e-6)  # doubles every 10 steps
    assert "predicted to cross 10000 at step" in warn["message"]
    # Then it levels off and falls: the crossing recedes, the warning clears once.
    flat = logits([1000 / 1.5**i for i in range(12)])
    for r in flat:
        r["step"] += 100
    assert [k for _, k in run(d, flat)] == ["clear"]


def test_logit_growth_stays_quiet_on_slow_growth_and_small_logits():
    d = LogitGrowth(CFG.logit, steps=1000)
    assert run(d, logits([40 * 1.01**i for i in range(30)])) == []  # crosses long after the end
    d = LogitGrowth(CFG.logit, steps=1000)
    assert run(d, logits([2 * 1.5**i for i in range(6)])) == []  # fast, but still below min_logit
    d = LogitGrowth(replace(CFG.logit, horizon=50), steps=10**6)
    # ×1.3 per 10 steps from 40 crosses 1e4 about 210 steps later: warned 50 steps ahead.
    (warn,) = [e for r in logits([40 * 1.3**i for i in range(25)]) for e in d.update(r)]
    assert warn["event"] == "warn" and 0 < warn["predicted_step"] - warn["step"] <= 50


def test_entropy_collapse_floor_and_drop():
    ent = lambda vals, start=0: [
        {
            "step": start + 10 * (i + 1),
            "attn/entropy_min/layer_0": v,
            "attn/entropy_min/layer_1": 3.0,
        }
        for i, v in enumerate(vals)
    ]
    d = EntropyCollapse(CFG.entropy, steps=1000)
    assert run(d, ent([2.0, 2.1, 1.9, 1.5, 1.0, 0.5, 0.3])) == []  # falls 86%: not 90%
    assert run(d, ent([0.2], start=70)) == [(80, "warn")]  # below (1 - 0.9) x 2.1
    assert run(d, ent([0.15, 0.3, 0.8], start=80)) == []  # not yet past (1 - 0.45) x 2.1
    assert run(d, ent([1.2], start=110)) == [(120, "clear")]
    d = EntropyCollapse(replace(CFG.entropy, drop=0.99), steps=1000)
    assert run(d, ent([0.5, 0.4, 0.3, 0.2, 0.1, 0.04])) == [(60, "warn")]  # the floor


def test_log_z_drift_extrapolates_to_the_end():
    z = lambda vals, start=0: [
        {"step": start + 10 * (i + 1), "logits/log_z_mean": v} for i, v in enumerate(vals)
    ]
    assert run(LogZDrift(CFG.log_z, steps=1000), z([3.0, 2.0, 1.0, 0.5, 0.2])) == []  # positive
    assert run(LogZDrift(CFG.log_z, steps=100), z([-1, -1.1, -1.2, -1.3])) == []  # -2.3 at 100
    # -0.1 per step from -1 at step 50: -20 at step 240, before the end at 1000; warned once.
    d = LogZDrift(CFG.log_z, steps=1000)
    events = [e for r in z([-1, -2, -3, -4, -5], start=40) for e in d.update(r)]
    assert [(e["step"], e["event"]) for e in events] == [(70, "warn")]
    assert events[0]["predicted_step"] == 240
    back = run(d, z([-5, -4, -3, -2, -1, -1, -1, -1, -1, -1], start=90))
    assert [k for _, k in back] == ["clear"]


def test_updates_vs_eps_takes_a_running_median_and_names_the_parameter():
    rec = lambda step, r: {
        "step": step,
        "grad/rms_over_eps/head/kernel": 50.0,
        "grad/rms_over_eps/blocks/0/attn/q/kernel": r,
    }
    ratios = [5.0, 4.0, 0.5, 300.0, 0.3, 0.2, 0.4, 200.0, 3.0, 3.0, 4.0, 5.0]
    d = UpdatesVsEps(CFG.eps, steps=100)
    events = [e for i, r in enumerate(ratios) for e in d.update(rec(i + 1, r))]
    # medians of the last 5: ... 0.5 at step 6 (warn), 0.4 at step 7, 0.4, 3.0 at 10 (clear)
    assert [(e["step"], e["event"]) for e in events] == [(6, "warn"), (10, "clear")]
    assert "blocks/0/attn/q/kernel" in events[0]["message"]


def test_loss_spike_baseline():
    losses = [5 - 0.01 * i + 0.01 * math.sin(i) for i in range(30)] + [6.0, 4.8, 4.7, 4.7]
    d = LossSpike(CFG.loss_spike, steps=100)
    got = run(d, [{"step": i + 1, "train/loss": v} for i, v in enumerate(losses)])
    assert got == [(31, "warn"), (32, "clear")]


def test_watcher_runs_the_enabled_detectors_only():
    cfg = replace(CFG, loss_spike=replace(CFG.loss_spike, enabled=False))
    names = [d.name for d in Watcher(cfg, 100).detectors]
    assert names == ["logit_growth", "entropy_collapse", "log_z_drift", "updates_vs_eps"]


def test_wandb_alert_offline(tmp_path, monkeypatch):
    """An early-warning event goes to events.jsonl and to a W&B alert that offline mode keeps
    in the run file (for `wandb sync`), raising nothing."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for k in ("WANDB_DIR", "WANDB_SILENT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    from stability import workdir as W
    from stability.config import WandbConfig
    from stability.tracking import Tracker

    tracker = Tracker(tmp_path / "run", WandbConfig(mode="offline"), {}, name="r")
    tracker.log([{"step": 10, "train/loss": 1.0}])
    event = {"step": 10, "detector": "logit_growth", "event": "warn", "message": "climbing"}
    tracker.event(event, "logit_growth (warning): r", "warning: r step 10: logit_growth: climbing")
    tracker.close()
    import wandb

    wandb.teardown()
    assert W.events(tmp_path / "run") == [event]
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/*.wandb")
    data = run_file.read_bytes()
    assert b"logit_growth (warning): r" in data and b"warning: r step 10" in data
