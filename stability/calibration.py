"""`stability forecast --calibrate`: the scaling forecast checked as a forecast.

The task is the paper's (§3.3): from the values of some model sizes at a training step, predict
another size's value at the same step. Leave-one-size-out: every size with at least
``MIN_OTHERS`` other sizes to fit on is held out in turn, at several steps (a rolling origin:
``ORIGINS`` of training), per setting and LR. Seeds of one size are one point: the fits go
through the seeds' mean of log10 value per size (and the held-out size's truth is its seeds'
mean), so n = sizes, not sizes × seeds. Methods, each scored on the same folds:

  quadratic     the paper's: a least-squares quadratic of log10 value in log10 parameters
  linear        a line in log10 parameters
  persistence   the nearest fitted size's value (no interval)

Scores per method, in decades (log10 units): the absolute error (median over folds), the
interval score of the 95% prediction interval (Winkler: width + (2/α)·the distance by which the
truth falls outside; α = 0.05), whose mean over folds penalises wide intervals and misses
alike, and the coverage. ``choose`` picks, per quantity, the method with the lowest mean
interval score (persistence has no interval and is never chosen): `stability forecast` uses
that choice (``forecast.DEFAULT_METHODS``).

Crossing flags are checked against what happened: a fold flags a crossing of 1e4 where the
prediction passes it and the fit supports a flag (``forecast.no_flag``). A held-out run *lost
its loss* when it diverged, or ended ``LOSS_MARGIN`` nats above its setting's best final loss
at an LR above the best one.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stability import workdir as W
from stability.config import ConfigError
from stability.forecast import (
    DEFAULT_PARAM,
    LOGIT_KEY,
    Run,
    _value_at,
    fit_polynomial,
    load_runs,
    no_flag,
)

ORIGINS = (0.25, 0.5, 0.75, 1.0)  # fractions of training at which forecasts are made
MIN_OTHERS = 4  # sizes fitted when one is held out
ALPHA = 0.05  # the interval's miss rate (a 95% interval)
THRESHOLD = 1e4  # the crossing the forecast flags (max attention logit)
LOSS_MARGIN = 0.3  # nats above the setting's best final loss: the run lost its loss
METHODS = ("quadratic", "linear", "persistence")
DEGREE = {"quadratic": 2, "linear": 1}


def interval_score(lo: float, hi: float, y: float, alpha: float = ALPHA) -> float:
    """The interval (Winkler) score of a central (1 − α) interval [lo, hi] for the outcome y:
    hi − lo, plus 2/α times the distance from y to the interval when y falls outside. Lower
    is better; a wide interval is never a free hit."""
    return (hi - lo) + (2 / alpha) * (max(0.0, lo - y) + max(0.0, y - hi))


def _means(runs: list[Run], step: int, key: str, reduce: bool) -> dict[int, float]:
    """{params: seeds' mean of log10 value at ``step``} over runs with a value."""
    at: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        v, _ = _value_at(r, step, key, reduce)
        if v is not None:
            at[r.params].append(math.log10(v))
    return {p: float(np.mean(v)) for p, v in at.items()}


def _forecasts(points: dict[int, float], held: int) -> dict[str, dict[str, Any]]:
    """Every method's forecast of log10 value at ``held`` params from the other sizes."""
    xs = {p: math.log10(p) for p in points}
    x0 = math.log10(held)
    out = {}
    for method, degree in DEGREE.items():
        fit = fit_polynomial(list(xs.values()), list(points.values()), degree)
        iv = fit.interval(x0)
        out[method] = {
            "log10": float(fit(x0)),
            "lo": None if iv is None else float(iv[0]),
            "hi": None if iv is None else float(iv[1]),
            "flag": None if no_flag(fit, x0) else bool(fit(x0) >= math.log10(THRESHOLD)),
        }
    nearest = min(points, key=lambda p: abs(xs[p] - x0))
    out["persistence"] = {"log10": points[nearest], "lo": None, "hi": None, "flag": None}
    return out


def _lost(records: dict[str, dict]) -> dict[str, bool]:
    """{run_id: lost its loss} (module docstring) from result records of one sweep."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records.values():  # one setting and seed: its LR grid
        groups[(r["setting"], r["config"]["train"]["seed"])].append(r)
    out = {}
    for runs in groups.values():
        done = [r for r in runs if r.get("final_loss") is not None and not r.get("diverged")]
        if not done:
            continue
        best = min(done, key=lambda r: r["final_loss"])
        for r in runs:
            high = (
                r.get("diverged")
                or (r.get("final_loss") or math.inf) >= best["final_loss"] + LOSS_MARGIN
            )
            out[r["run_id"]] = bool(high and r["lr"] > best["lr"])
    return out


def calibrate(dirs: Sequence[str | Path], param: str | None = None) -> dict[str, Any]:
    """Leave-one-size-out forecasts at every origin of ``ORIGINS`` (module docstring) for the
    max attention logit and the gradient RMS / ε of ``param``; JSON-able."""
    runs = load_runs(dirs)
    sizes = sorted({r.size for r in runs}, key=lambda s: min(r.params for r in runs if r.size == s))
    if len(sizes) < MIN_OTHERS + 1:
        raise ConfigError(
            f"calibration needs >= {MIN_OTHERS + 1} model sizes ({MIN_OTHERS} to fit, 1 held "
            f"out), got {len(sizes)}"
        )
    final = min(r.config.train.steps for r in runs)
    logged = sorted({h["step"] for r in runs for h in r.history if isinstance(h.get("step"), int)})
    steps = sorted({max((s for s in logged if s <= f * final), default=logged[0]) for f in ORIGINS})
    lost: dict[tuple[str, str], bool] = {}
    for d in dict.fromkeys(r.workdir for r in runs):
        recs = {r["run_id"]: r for r in W.results(d)[0] if "run_id" in r and "config" in r}
        lost.update({(d, rid): v for rid, v in _lost(recs).items()})
    # a size is its parameter count; settings (e.g. qk-LN) that change the count a little are
    # told apart by their setting, so group by (setting, lr) and fold over the setting's sizes
    groups: dict[tuple[str, float], list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.setting, r.lr)].append(r)
    quantities = {
        "max_attn_logit": (LOGIT_KEY, True),
        "grad_rms_over_eps": (f"grad/rms_over_eps/{param or DEFAULT_PARAM}", False),
    }
    out: dict[str, Any] = {
        "steps": steps,
        "final_step": final,
        "origins": list(ORIGINS),
        "sizes": sizes,
        "quantities": {},
    }
    for name, (key, reduce) in quantities.items():
        folds = []
        for (setting, lr), group in sorted(groups.items()):
            by_size: dict[int, list[Run]] = defaultdict(list)
            for r in group:
                by_size[r.params].append(r)
            for step in steps:
                means = _means(group, step, key, reduce)
                for held in sorted(means):
                    others = {p: v for p, v in means.items() if p != held}
                    if len(others) < MIN_OTHERS:
                        continue
                    truth = means[held]
                    fold = {
                        "setting": setting,
                        "lr": lr,
                        "step": step,
                        "held_params": held,
                        "extrapolating": held > max(others),
                        "truth_log10": truth,
                        "seeds": len(by_size[held]),
                        "lost": [lost.get((r.workdir, r.run_id)) for r in by_size[held]],
                    }
                    for method, f in _forecasts(others, held).items():
                        f["error"] = f["log10"] - truth
                        if f["lo"] is not None:
                            f["score"] = interval_score(f["lo"], f["hi"], truth)
                            f["inside"] = bool(f["lo"] <= truth <= f["hi"])
                        fold[method] = f
                    folds.append(fold)
        out["quantities"][name] = {
            "key": key,
            "folds": folds,
            "summary": summarize(folds),
            "extrapolating": summarize([f for f in folds if f["extrapolating"]]),
        }
        if name == "max_attn_logit":
            out["quantities"][name]["flags"] = flag_outcomes(folds)
    out["chosen"] = {name: choose(q["summary"]) for name, q in out["quantities"].items()}
    return out


def summarize(folds: list[dict]) -> dict[str, dict[str, Any]]:
    """Per method: folds, median absolute error, mean and median interval score, coverage."""
    out = {}
    for m in METHODS:
        errs = [abs(f[m]["error"]) for f in folds if m in f]
        scores = [f[m]["score"] for f in folds if m in f and "score" in f[m]]
        inside = [f[m]["inside"] for f in folds if m in f and "inside" in f[m]]
        out[m] = {
            "folds": len(errs),
            "median_abs_error": float(np.median(errs)) if errs else None,
            "mean_interval_score": float(np.mean(scores)) if scores else None,
            "median_interval_score": float(np.median(scores)) if scores else None,
            "coverage": float(np.mean(inside)) if inside else None,
        }
    return out


def choose(summary: dict[str, dict]) -> dict[str, str]:
    """The method with the lowest mean interval score (methods with intervals only), and why."""
    scored = {
        m: s["mean_interval_score"]
        for m, s in summary.items()
        if s["mean_interval_score"] is not None
    }
    if not scored:
        return {"method": "quadratic", "why": "no fold had an interval: the paper's quadratic"}
    best = min(scored, key=scored.get)
    rest = ", ".join(f"{m} {v:.3g}" for m, v in sorted(scored.items()) if m != best)
    return {
        "method": best,
        "why": f"lowest mean interval score over the held-out folds: {scored[best]:.3g} decades "
        f"(vs {rest}); median absolute error {summary[best]['median_abs_error']:.3g} decades",
    }


def flag_outcomes(folds: list[dict]) -> dict[str, Any]:
    """Per method: folds that flagged a crossing of 1e4, and how many of their held-out runs
    lost their loss; and how many held-out runs that lost their loss had no flag."""
    out = {}
    for m in DEGREE:
        flagged = [f for f in folds if f[m]["flag"]]
        runs = [v for f in flagged for v in f["lost"] if v is not None]
        missed = [v for f in folds if not f[m]["flag"] for v in f["lost"] if v]
        out[m] = {
            "flagged_folds": len(flagged),
            "flagged_runs": len(runs),
            "flagged_runs_that_lost": int(sum(runs)),
            "unflagged_runs_that_lost": len(missed),
            "unsupported_folds": sum(f[m]["flag"] is None for f in folds),
        }
    return out


def _g(v, spec: str = ".3g") -> str:
    return "–" if v is None else format(v, spec)


def to_markdown(cal: dict[str, Any], command: str = "") -> str:
    """calibration.md: per quantity the methods' scores (all folds, and the folds that
    extrapolate), the chosen method, and the crossing flags against what happened."""
    lines = [
        "# Forecast calibration",
        "",
        *([f"Command: `{command}`", ""] if command else []),
        f"Leave-one-size-out over {len(cal['sizes'])} sizes ({', '.join(cal['sizes'])}; each "
        f"held out when ≥ {MIN_OTHERS} "
        f"others remain), at steps {', '.join(map(str, cal['steps']))} of {cal['final_step']} "
        "(the rolling origin), per setting and LR. Fits go through the seeds' mean of log10 value "
        "per size; the truth is the held-out size's seeds' mean. Errors and interval scores are "
        f"in decades; the interval score of a {1 - ALPHA:.0%} interval is its width plus "
        f"{2 / ALPHA:g}× the distance by which the truth falls outside it.",
    ]
    for name, q in cal["quantities"].items():
        chosen = cal["chosen"][name]
        lines += [
            "",
            f"## {name.replace('_', ' ')}",
            "",
            f"Chosen: **{chosen['method']}** ({chosen['why']}).",
            "",
            "| method | folds | median abs error | mean interval score | median interval score | coverage | extrapolating folds: median abs error, mean interval score, coverage |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in METHODS:
            s, e = q["summary"][m], q["extrapolating"][m]
            cov = "no interval" if s["coverage"] is None else f"{s['coverage']:.0%}"
            ecov = "–" if e["coverage"] is None else f"{e['coverage']:.0%}"
            lines.append(
                f"| {m} | {s['folds']} | {_g(s['median_abs_error'])} | {_g(s['mean_interval_score'])} | "
                f"{_g(s['median_interval_score'])} | {cov} | {_g(e['median_abs_error'])}, "
                f"{_g(e['mean_interval_score'])}, {ecov} ({e['folds']} folds) |"
            )
        if "flags" in q:
            lines += [
                "",
                f"Crossing flags (prediction ≥ {THRESHOLD:g} where the fit supports a flag) against "
                f"the held-out runs: a run *lost its loss* when it diverged or ended ≥ "
                f"{LOSS_MARGIN:g} nats above its setting's best final loss at a higher LR.",
                "",
                "| method | folds flagged | their held-out runs that lost their loss | runs that lost their loss without a flag | folds without a supported flag |",
                "|---|---|---|---|---|",
            ]
            for m, f in q["flags"].items():
                lines.append(
                    f"| {m} | {f['flagged_folds']} | {f['flagged_runs_that_lost']} of "
                    f"{f['flagged_runs']} | {f['unflagged_runs_that_lost']} | "
                    f"{f['unsupported_folds']} |"
                )
    return "\n".join(lines) + "\n"
