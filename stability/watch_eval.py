"""The early-warning detectors (``watch.py``) judged as classifiers of runs: tuned on some
sweeps, evaluated on others (``benchmarks/early_warning.py``).

A finished run is **unstable** (a positive) when, at an LR above its setting's best one (same
setting and seed), it diverged or ended ``MARGIN`` nats or more above that best final loss:
the high-LR failure the detectors are meant for. Every other run is a negative (a run that ends
high at a low LR is undertrained, not unstable). The **event step** of a positive is where it
diverged, or the first logged step from which its train loss stays ``MARGIN`` nats above its
setting's lowest train loss at each step (``watch.instability``).

- A positive whose event is at or before its first logged step is **unwarnable**: no detector
  reading the logged records could warn in time. It is counted and listed apart, never as a
  miss.
- A **hit** is a positive warned at or before its event step; its lead is event − warning (in
  steps). A positive warned later, or never, is a miss.
- A **false alarm** is a warning on a negative; those on the run at its setting's best LR
  (the run a researcher wants most) are counted apart.
- precision = hits / (hits + false alarms); recall = hits / warnable positives.

Thresholds are tuned on the tuning sweeps only (``tune``): per detector, the grid value with
the highest recall among those with no false alarm on a best-LR run (then the fewest false
alarms; then the more conservative value). Two baselines sit beside the detectors: the loss
spike (a detector of ``watch.py``) and a config-only rule, a logistic regression of "unstable"
on log10 LR, qk-layernorm and log10 parameters fitted on the tuning runs, which decides at
step 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from stability import workdir as W
from stability.config import WatchConfig, from_config_dict
from stability.watch import Watcher, instability, lowest_losses

MARGIN = 0.3  # nats (watch.BAND_NATS): a run this far above its setting's best is unstable

# Each detector's threshold grid: (config field, values), most sensitive first. The logit
# detector's confirmation rule (``confirm``: consecutive logged steps) has its own grid.
GRIDS: dict[str, tuple[str, tuple]] = {
    "logit": ("min_logit", (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)),
    "entropy": ("floor", (0.2, 0.1, 0.05, 0.02, 0.01)),
    "log_z": ("bound", (-5.0, -10.0, -20.0, -40.0)),
    "eps": ("ratio", (10.0, 3.0, 1.0, 0.3, 0.1)),
    "loss_spike": ("k", (2.0, 3.0, 4.0, 6.0)),
}
CONFIRM = (1, 2, 3)
NAMES = {
    "logit": "logit_growth",
    "entropy": "entropy_collapse",
    "log_z": "log_z_drift",
    "eps": "updates_vs_eps",
    "loss_spike": "loss_spike",
}
PHYSICAL = ("logit", "entropy", "log_z", "eps")  # every detector but the loss-spike baseline


# ---------------------------------------------------------------------------------------
# Labelling runs.


def label_runs(workdirs: Sequence[W.PathLike]) -> list[dict[str, Any]]:
    """One row per finished, diverged or stopped run of ``workdirs`` (module docstring)."""
    from stability.forecast import non_embedding_params

    rows = []
    for wd in map(W.path, workdirs):
        records = [r for r in W.results(wd)[0] if "run_id" in r and "config" in r]
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in records:
            groups[(r["setting"], r["config"]["train"]["seed"])].append(r)
        for (setting, seed), runs in groups.items():
            hists = {r["run_id"]: W.metrics(W.run_dir(wd, r["run_id"]))[0] for r in runs}
            band = lowest_losses(list(hists.values()))
            done = [r for r in runs if r.get("final_loss") is not None and not r.get("diverged")]
            best = min(done, key=lambda r: r["final_loss"]) if done else None
            for r in runs:
                cfg = from_config_dict(r["config"])
                hist = hists[r["run_id"]]
                high = (
                    r.get("diverged")
                    or best is None
                    or r["final_loss"] is None
                    or (r["final_loss"] >= best["final_loss"] + MARGIN)
                )
                unstable = bool(high and best is not None and r["lr"] > best["lr"])
                happened = instability(hist, band, MARGIN) if unstable else None
                first = hist[0]["step"] if hist else None
                event = happened[1] if happened else None
                rows.append(
                    {
                        "sweep": wd.name,
                        "run_id": r["run_id"],
                        "setting": setting,
                        "seed": seed,
                        "lr": r["lr"],
                        "qk_norm": cfg.model.qk_norm,
                        "params": non_embedding_params(cfg.model),
                        "steps": cfg.train.steps,
                        "unstable": unstable,
                        "event_step": event,
                        "unwarnable": unstable
                        and event is not None
                        and first is not None
                        and event <= first,
                        "best_lr": best is not None and r["run_id"] == best["run_id"],
                        "history": hist,
                    }
                )
    return rows


# ---------------------------------------------------------------------------------------
# Warnings and scores.


def watch_config(detector: str, value: Any = None, confirm: int | None = None) -> WatchConfig:
    """A WatchConfig with only ``detector`` enabled, its grid field set to ``value`` (and the
    logit detector's ``confirm``), every other field at its default."""
    base = WatchConfig()
    sections = {}
    for name in NAMES:
        section = getattr(base, name)
        if name != detector:
            sections[name] = dataclasses.replace(section, enabled=False)
            continue
        changes = {"enabled": True}
        if value is not None:
            changes[GRIDS[name][0]] = value
        if confirm is not None:
            changes["confirm"] = confirm
        sections[name] = dataclasses.replace(section, **changes)
    return dataclasses.replace(base, **sections)


def first_warning(row: dict, cfg: WatchConfig) -> int | None:
    """The step of the first warning ``cfg``'s detectors raise over a run's records."""
    events = Watcher(cfg, row["steps"]).update(row["history"])
    return next((e["step"] for e in events if e["event"] == "warn"), None)


def score(rows: list[dict], warn: Callable[[dict], int | None]) -> dict[str, Any]:
    """Precision, recall, lead times and false alarms of a rule ``warn(row) -> warning step or
    None`` over labelled runs (module docstring)."""
    leads, hits, misses, false, best_false = [], [], [], [], []
    unwarnable = [r["run_id"] for r in rows if r["unwarnable"]]
    for r in rows:
        if r["unwarnable"]:
            continue
        w = warn(r)
        if r["unstable"]:
            if w is not None and r["event_step"] is not None and w <= r["event_step"]:
                hits.append(r["run_id"])
                leads.append(r["event_step"] - w)
            else:
                misses.append(r["run_id"])
        elif w is not None:
            false.append(r["run_id"])
            if r["best_lr"]:
                best_false.append(r["run_id"])
    warned = len(hits) + len(false)
    positives = len(hits) + len(misses)
    q = np.percentile(leads, [25, 50, 75]).tolist() if leads else [None] * 3
    return {
        "hits": len(hits),
        "warnable_positives": positives,
        "unwarnable": len(unwarnable),
        "unwarnable_runs": unwarnable,
        "false_alarms": len(false),
        "negatives": sum(not r["unstable"] for r in rows),
        "best_lr_false_alarms": len(best_false),
        "best_lr_runs": sum(r["best_lr"] for r in rows),
        "precision": len(hits) / warned if warned else None,
        "recall": len(hits) / positives if positives else None,
        "lead_quartiles": q,
    }


def tune(rows: list[dict], detector: str) -> dict[str, Any]:
    """The threshold (and, for the logit detector, the confirmation) chosen on ``rows``: the
    highest recall with no false alarm on a best-LR run, then the fewest false alarms, then
    the more conservative value (module docstring). Returns {"value", "confirm", "score",
    "grid": [...]}."""
    field, values = GRIDS[detector]
    grid = []
    for confirm in CONFIRM if detector == "logit" else (None,):
        for i, value in enumerate(values):
            cfg = watch_config(detector, value, confirm)
            s = score(rows, lambda r, cfg=cfg: first_warning(r, cfg))
            grid.append({"value": value, "confirm": confirm, "rank": i, "score": s})
    key = lambda g: (  # noqa: E731
        g["score"]["best_lr_false_alarms"],
        -(g["score"]["recall"] or 0.0),
        g["score"]["false_alarms"],
        -(g["confirm"] or 0),
        -g["rank"],
    )
    best = min(grid, key=key)
    return {
        "field": field,
        "value": best["value"],
        "confirm": best["confirm"],
        "score": best["score"],
        "grid": grid,
    }


def union_warning(rows_cfgs: dict[str, WatchConfig]) -> Callable[[dict], int | None]:
    """The earliest warning of several single-detector configs."""

    def warn(row):
        steps = [s for cfg in rows_cfgs.values() if (s := first_warning(row, cfg)) is not None]
        return min(steps) if steps else None

    return warn


# ---------------------------------------------------------------------------------------
# The config-only baseline.


def features(row: dict) -> np.ndarray:
    return np.array([1.0, math.log10(row["lr"]), float(row["qk_norm"]), math.log10(row["params"])])


def fit_logistic(rows: list[dict], l2: float = 1e-2, iters: int = 50) -> np.ndarray:
    """Weights of a logistic regression of "unstable" on ``features`` (Newton's method with a
    small L2 penalty on the non-intercept weights)."""
    X = np.stack([features(r) for r in rows])
    y = np.array([float(r["unstable"]) for r in rows])
    w = np.zeros(X.shape[1])
    penalty = np.diag([0.0] + [l2] * (X.shape[1] - 1))
    for _ in range(iters):
        p = 1 / (1 + np.exp(-X @ w))
        grad = X.T @ (p - y) + penalty @ w
        hess = X.T @ (X * (p * (1 - p))[:, None]) + penalty
        w = w - np.linalg.solve(hess, grad)
    return w


def config_rule(weights: np.ndarray) -> Callable[[dict], int | None]:
    """Warn at step 0 when the fitted probability of "unstable" is ≥ 0.5."""
    return lambda row: 0 if float(features(row) @ weights) >= 0 else None
