"""The statistics of ``stability reproduce``: one check = one paired difference, its 95% interval,
and a verdict that combines a finding's checks symmetrically.

A check is a claim of the paper that a difference D is > 0 (the two arms of D share a seed:
the same initialisation and the same data order). D is measured once per seed; its estimate
is the mean over seeds with a two-sided 95% Student-t confidence interval on n − 1 degrees of
freedom (mean ± t₀.₉₇₅,ₙ₋₁ · s/√n). The check is

  supported     when the interval lies above 0 (the paper's direction)
  contradicted  when it lies below 0
  unresolved    when it contains 0, or when |mean| < RESOLUTION (an effect of float rounding:
                two arms that train identically differ by ~1e-7)
  missing       with fewer than 2 seeds measured

A finding combines the checks it tests (``verdict``), the same way in both directions:
supported / contradicted when all of them are; mixed when some are supported and others
contradicted; partly supported / partly contradicted when some are and the rest unresolved;
unresolved when none is either.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

LEVEL = 0.95  # two-sided confidence of every interval
RESOLUTION = 1e-3  # nats or decades: a smaller mean difference is read as no difference
OUTCOMES = ("supported", "contradicted", "unresolved", "missing")


def t_interval(values: Iterable[float | None], level: float = LEVEL) -> dict:
    """Mean, sample standard deviation, n and the Student-t ``level`` interval of the finite
    ``values`` (None entries are skipped): {"mean", "sd", "n", "lo", "hi"}; lo/hi are None for
    fewer than 2 values."""
    from scipy.stats import t

    vals = np.asarray([float(v) for v in values if v is not None and math.isfinite(v)])
    n = len(vals)
    if n == 0:
        return {"mean": None, "sd": None, "n": 0, "lo": None, "hi": None}
    mean = float(vals.mean())
    if n < 2:
        return {"mean": mean, "sd": None, "n": 1, "lo": None, "hi": None}
    sd = float(vals.std(ddof=1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "lo": mean - half, "hi": mean + half}


def outcome(interval: dict) -> str:
    """supported / contradicted / unresolved / missing of a D > 0 claim's interval."""
    if interval["lo"] is None:
        return "missing"
    if abs(interval["mean"]) < RESOLUTION:
        return "unresolved"
    if interval["lo"] > 0:
        return "supported"
    if interval["hi"] < 0:
        return "contradicted"
    return "unresolved"


def check(
    name: str,
    source: str,
    values: Iterable[float | None],
    unit: str,
    *,
    planned: int | None = None,
    gated: bool = False,
) -> dict:
    """A check of the claim "D > 0" from D per seed (``values``), its interval and outcome.
    ``planned``: the seeds the protocol plans (a check with fewer is marked partial).
    ``gated``: it tests the paper's explanation, so it counts only where the finding's
    mechanism appears in the runs (``verdict``)."""
    values = list(values)
    iv = t_interval(values)
    return {
        "check": name,
        "source": source,
        "unit": unit,
        **iv,
        "outcome": outcome(iv),
        "partial": planned is not None and iv["n"] < planned,
        "gated": gated,
    }


def verdict(checks: list[dict], mechanism_present: bool | None = None) -> str:
    """A finding's verdict from its checks (module docstring). Gated checks count only when
    the mechanism is present; "not tested" when nothing is left to count because it is
    absent, "missing" when nothing was measured."""
    tested = [
        c
        for c in checks
        if c["outcome"] != "missing" and not (c["gated"] and not mechanism_present)
    ]
    absent = mechanism_present is False and any(c["gated"] for c in checks)
    if not tested:
        return "not tested (mechanism absent)" if absent else "missing"
    kinds = {c["outcome"] for c in tested}
    if kinds == {"supported"}:
        out = "supported"
    elif kinds == {"contradicted"}:
        out = "contradicted"
    elif {"supported", "contradicted"} <= kinds:
        out = "mixed"
    elif "supported" in kinds:
        out = "partly supported"
    elif "contradicted" in kinds:
        out = "partly contradicted"
    else:
        out = "unresolved"
    # what the verdict does not cover: the claim's gated part, untested here
    return out + " (gated checks not tested: mechanism absent)" if absent else out


VERDICTS = (
    "supported",
    "partly supported",
    "mixed",
    "unresolved",
    "partly contradicted",
    "contradicted",
    "not tested (mechanism absent)",
    "missing",
)
