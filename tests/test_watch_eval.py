"""stability.watch_eval on hand-made runs: precision, recall, unwarnable events, best-LR false
alarms, lead times, the tuning rule and the config-only baseline."""

import pytest

from stability import watch_eval as E


def run(rid, unstable=False, event=None, best=False, first=10, **kw):
    return {
        "run_id": rid,
        "unstable": unstable,
        "event_step": event,
        "best_lr": best,
        "unwarnable": unstable and event is not None and event <= first,
        **kw,
    }


ROWS = [
    run("hit_early", True, 100),  # warned at 40: lead 60
    run("hit_late_ok", True, 50),  # warned at 50: lead 0 (in time)
    run("miss_late", True, 60),  # warned at 80: too late
    run("miss_never", True, 90),  # never warned
    run("unwarnable", True, 10),  # unstable from the first logged step
    run("stable_quiet", False),
    run("stable_warned", False),  # a false alarm
    run("best_warned", False, best=True),  # a false alarm on a best-LR run
    run("best_quiet", False, best=True),
]
WARN = {
    "hit_early": 40,
    "hit_late_ok": 50,
    "miss_late": 80,
    "unwarnable": 5,
    "stable_warned": 30,
    "best_warned": 20,
}


def test_precision_recall_leads_and_false_alarms_on_hand_made_runs():
    s = E.score(ROWS, lambda r: WARN.get(r["run_id"]))
    assert (s["hits"], s["warnable_positives"]) == (2, 4)
    assert s["recall"] == pytest.approx(0.5)
    assert s["false_alarms"] == 2 and s["negatives"] == 4
    assert s["precision"] == pytest.approx(2 / 4)
    assert s["best_lr_false_alarms"] == 1 and s["best_lr_runs"] == 2
    assert s["lead_quartiles"][1] == pytest.approx(30)  # median of leads 60 and 0


def test_an_event_at_the_first_logged_step_is_unwarnable_never_a_miss():
    s = E.score(ROWS, lambda r: None)
    assert s["unwarnable"] == 1 and s["unwarnable_runs"] == ["unwarnable"]
    assert s["warnable_positives"] == 4 and s["recall"] == 0 and s["precision"] is None
    only = E.score([run("u", True, 10)], lambda r: 5)
    assert only["recall"] is None and only["hits"] == 0 and only["unwarnable"] == 1


def hist(logits, losses=None):
    return [
        {
            "step": 10 * (i + 1),
            "attn/max_logit/layer_0": v,
            "train/loss": (losses or [2.0] * len(logits))[i],
        }
        for i, v in enumerate(logits)
    ]


def test_tuning_picks_the_highest_recall_without_best_lr_false_alarms():
    """The unstable run's logit climbs to 5000; the best-LR run's plateaus at 200 (so a low
    min_logit warns it); the tuned logit threshold must not warn the best-LR run."""
    climb = [20, 60, 200, 600, 2000, 5000]
    plateau = [20, 60, 150, 190, 200, 200]
    rows = [
        {**run("up", True, 60, steps=200), "history": hist(climb)},
        {**run("best", False, best=True, steps=200), "history": hist(plateau)},
    ]
    t = E.tune(rows, "logit")
    assert t["score"]["best_lr_false_alarms"] == 0 and t["score"]["hits"] == 1
    low = E.score(rows, lambda r: E.first_warning(r, E.watch_config("logit", 10.0, 1)))
    assert low["best_lr_false_alarms"] == 1  # the grid's most sensitive value would
    assert t["value"] > 10.0 or t["confirm"] > 1


def test_the_config_only_rule_learns_lr_and_qk():
    rows = [
        run(f"{lr}-{qk}", unstable=(lr >= 0.1 and not qk), lr=lr, qk_norm=qk, params=1e5)
        for lr in (1e-3, 1e-2, 0.1, 0.3)
        for qk in (False, True)
        for _ in range(3)
    ]
    w = E.fit_logistic(rows)
    rule = E.config_rule(w)
    assert rule({"lr": 0.3, "qk_norm": False, "params": 1e5}) == 0  # warned at step 0
    assert rule({"lr": 1e-3, "qk_norm": False, "params": 1e5}) is None
    assert rule({"lr": 0.3, "qk_norm": True, "params": 1e5}) is None
