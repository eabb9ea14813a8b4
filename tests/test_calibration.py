"""stability.calibration: the interval score, leave-one-size-out forecasts at a rolling origin
on seed means, the method choice and the crossing flags, on hand-written sweeps whose values
follow known curves (tests/test_forecast.py's)."""

import json
import math

import pytest
from test_forecast import STEP, write_sweep

from stability import calibration as C
from stability.cli import main
from stability.config import ConfigError
from stability.forecast import DEFAULT_METHODS


def test_the_interval_score_is_width_plus_the_scaled_miss():
    assert C.interval_score(0.0, 1.0, 0.5) == pytest.approx(1.0)  # inside: its width
    assert C.interval_score(0.0, 1.0, 1.5) == pytest.approx(1.0 + 40 * 0.5)  # 2/α = 40
    assert C.interval_score(0.0, 1.0, -0.25) == pytest.approx(1.0 + 40 * 0.25)
    # a wide interval that covers is worse than a narrow one that misses by a little
    assert C.interval_score(-7.0, 7.0, 0.0) > C.interval_score(0.0, 0.2, 0.21)


def test_leave_one_size_out_on_seed_means_scores_the_methods_and_chooses(tmp_path):
    """Five sizes × 3 seeds of a known quadratic (noise 0.02 decades): every size is held out
    in turn at steps 5 and 10 (the logged ones); a fold's truth is the seeds' mean; the
    quadratic forecasts within the noise, persistence (the nearest size) misses by the
    curve's slope."""
    w = write_sweep(
        tmp_path / "s", widths=(8, 16, 32, 64, 128), noise=0.02, seeds=(0, 1, 2), lrs=(0.01,)
    )
    cal = C.calibrate([w])
    assert cal["steps"] == [5, STEP] and len(cal["sizes"]) == 5
    q = cal["quantities"]["max_attn_logit"]
    assert len(q["folds"]) == 5 * 2  # 5 held-out sizes × 2 steps, one setting and LR
    assert sum(f["extrapolating"] for f in q["folds"]) == 2  # the largest, at each step
    assert all(f["seeds"] == 3 for f in q["folds"])
    s = q["summary"]
    assert s["quadratic"]["median_abs_error"] < 0.05 < s["persistence"]["median_abs_error"]
    assert s["persistence"]["mean_interval_score"] is None  # no interval: never chosen
    assert cal["chosen"]["max_attn_logit"]["method"] in ("quadratic", "linear")
    assert "lowest mean interval score" in cal["chosen"]["max_attn_logit"]["why"]
    fold = q["folds"][0]
    assert fold["quadratic"]["score"] == pytest.approx(
        C.interval_score(fold["quadratic"]["lo"], fold["quadratic"]["hi"], fold["truth_log10"])
    )
    with pytest.raises(ConfigError, match=">= 5 model sizes"):
        C.calibrate([write_sweep(tmp_path / "four")])
    assert main(["forecast", str(w), "--calibrate", f"--out={tmp_path / 'o'}"]) == 0
    md = (tmp_path / "o" / "calibration.md").read_text()
    assert md.startswith("# Forecast calibration") and "Chosen: **" in md
    assert json.loads((tmp_path / "o" / "calibration.json").read_text())["chosen"]


def test_a_choice_goes_to_the_lowest_mean_interval_score():
    summary = {
        "quadratic": {"mean_interval_score": 3.0, "median_abs_error": 0.05},
        "linear": {"mean_interval_score": 1.0, "median_abs_error": 0.07},
        "persistence": {"mean_interval_score": None, "median_abs_error": 0.01},
    }
    assert C.choose(summary)["method"] == "linear"


def test_crossing_flags_are_counted_against_the_runs_that_lost_their_loss():
    def fold(flag, lost):
        return {"quadratic": {"flag": flag}, "linear": {"flag": None}, "lost": lost}

    folds = [fold(True, [True, True, False]), fold(False, [True]), fold(None, [False])]
    f = C.flag_outcomes(folds)["quadratic"]
    assert (f["flagged_folds"], f["flagged_runs"], f["flagged_runs_that_lost"]) == (1, 3, 2)
    assert f["unflagged_runs_that_lost"] == 1 and f["unsupported_folds"] == 1
    assert C.flag_outcomes(folds)["linear"]["unsupported_folds"] == 3


def test_the_forecast_default_is_the_shipped_calibrations_choice():
    from pathlib import Path

    shipped = Path(__file__).resolve().parent.parent / "docs" / "forecast_cpu" / "calibration.json"
    chosen = json.loads(shipped.read_text())["chosen"]
    assert {q: c["method"] for q, c in chosen.items()} == {
        q: m["method"] for q, m in DEFAULT_METHODS.items()
    }
    assert all(math.isfinite(len(m["why"])) and m["why"] for m in DEFAULT_METHODS.values())
