"""stability.reproduce.stats: the interval against scipy's Student t, check outcomes, and the
symmetric verdict rule on hand-made checks."""

import math

import numpy as np
import pytest
from scipy import stats as sp

from stability.reproduce.stats import RESOLUTION, check, t_interval, verdict


def test_the_interval_is_students_t_on_n_minus_one_degrees_of_freedom():
    d = [0.12, 0.31, 0.08, 0.22, 0.17]
    iv = t_interval(d)
    lo, hi = sp.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=sp.sem(d))
    assert iv["n"] == 5 and iv["mean"] == pytest.approx(np.mean(d))
    assert iv["lo"] == pytest.approx(lo) and iv["hi"] == pytest.approx(hi)
    assert iv["sd"] == pytest.approx(np.std(d, ddof=1))
    # missing seeds (None, NaN) are left out, not counted as zero
    assert t_interval([*d, None, math.nan])["n"] == 5
    assert t_interval([0.3])["lo"] is None and t_interval([])["mean"] is None


@pytest.mark.parametrize(
    "values,outcome",
    [
        ([0.30, 0.31, 0.29, 0.30, 0.32], "supported"),  # the interval lies above 0
        ([-0.30, -0.31, -0.29, -0.30, -0.32], "contradicted"),  # below 0
        ([0.3, -0.2, 0.2, -0.1, 0.1], "unresolved"),  # contains 0
        ([2e-7, 3e-7, 2e-7], "unresolved"),  # excludes 0, but below the resolution
        ([0.4], "missing"),  # one seed: no interval
        ([None, math.nan], "missing"),
    ],
)
def test_a_check_is_supported_contradicted_unresolved_or_missing(values, outcome):
    c = check("D", "§x", values, "nats", planned=5)
    assert c["outcome"] == outcome
    assert c["partial"] == (c["n"] < 5)
    assert RESOLUTION == 1e-3


def outcomes(*names, gated=False):
    return [{"outcome": o, "gated": gated} for o in names]


@pytest.mark.parametrize(
    "checks,want",
    [
        (outcomes("supported", "supported"), "supported"),
        (outcomes("contradicted", "contradicted"), "contradicted"),
        (outcomes("supported", "contradicted"), "mixed"),
        (outcomes("supported", "unresolved"), "partly supported"),
        (outcomes("contradicted", "unresolved"), "partly contradicted"),
        (outcomes("unresolved", "unresolved"), "unresolved"),
        (outcomes("supported", "missing"), "supported"),  # missing checks do not count
        (outcomes("missing", "missing"), "missing"),
    ],
)
def test_the_verdict_combines_checks_symmetrically(checks, want):
    assert verdict(checks, mechanism_present=True) == want
    flipped = [
        {
            **c,
            "outcome": {"supported": "contradicted", "contradicted": "supported"}.get(
                c["outcome"], c["outcome"]
            ),
        }
        for c in checks
    ]
    mirror = {
        "supported": "contradicted",
        "contradicted": "supported",
        "partly supported": "partly contradicted",
        "partly contradicted": "partly supported",
    }
    assert verdict(flipped, mechanism_present=True) == mirror.get(want, want)


def test_gated_checks_count_only_where_the_mechanism_appears():
    gated = outcomes("supported", gated=True)
    plain = outcomes("unresolved")
    assert verdict(gated + plain, mechanism_present=True) == "partly supported"
    # what the verdict covers is said: the claim's gated part went untested
    assert verdict(gated + plain, mechanism_present=False) == (
        "unresolved (gated checks not tested: mechanism absent)"
    )
    assert verdict(gated, mechanism_present=False) == "not tested (mechanism absent)"
    assert verdict(outcomes("contradicted", gated=True), mechanism_present=False).startswith(
        "not tested"
    )
