"""Early warning: detectors that read a run's logged records and say, while it still trains,
that it is heading for instability (Wortsman et al. 2023: attention logits grow and attention
entropy collapses before the loss diverges; output logits drift; updates shrink as the gradient
RMS approaches Adam's ε), next to the common loss-spike baseline.

Each detector is a function of the records logged so far (the metrics the loop already
fetched: no device work, no host sync) with a typed config in ``config.py`` (``watch.*``).
It raises a warning once per condition and run, when its condition starts to hold, and says
when it clears (hysteresis: the clearing condition is stricter than the negation of the
warning's). A run's detectors are deterministic in its records, so a resumed run rebuilds
their state by replaying its history up to the checkpoint: no warning is repeated or lost.

An event is a dict: ``{"step", "detector", "event": "warn" | "clear", "value", "trend",
"predicted_step", "message"}`` (``trend`` and ``predicted_step`` may be None).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stability.config import (
    EntropyWatch,
    EpsWatch,
    LogitWatch,
    LogZWatch,
    LossSpikeWatch,
    WatchConfig,
)

LOGIT_PREFIX = "attn/max_logit/layer_"
ENTROPY_PREFIX = "attn/entropy_min/layer_"
EPS_PREFIX = "grad/rms_over_eps/"


def _over_layers(rec: dict, prefix: str, reduce) -> float | None:
    vals = [v for k, v in rec.items() if k.startswith(prefix) and _finite(v)]
    return reduce(vals) if vals else None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fit(steps: list[int], values: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ``values`` against ``steps``."""
    slope, intercept = np.polyfit(np.asarray(steps, float), np.asarray(values, float), 1)
    return float(intercept), float(slope)


class Detector:
    """One condition of one run: ``update(record)`` returns the events the record causes."""

    name = ""

    def __init__(self, steps: int):
        self.steps = steps  # the run's last step (train.steps)
        self.active = False

    def update(self, rec: dict) -> list[dict]:
        state = self.check(rec)
        if state is None:
            return []
        on, value, trend, predicted, message = state
        if on and not self.active:
            self.active = True
            return [self._event(rec, "warn", value, trend, predicted, message)]
        if self.active and on is False and self.clears(rec, value, trend, predicted):
            self.active = False
            return [self._event(rec, "clear", value, trend, predicted, message)]
        return []

    def check(self, rec: dict):
        """(warning condition holds, value, trend, predicted step, message), or None when the
        record says nothing about it."""
        raise NotImplementedError

    def clears(self, rec: dict, value, trend, predicted) -> bool:
        return True

    def _event(self, rec, kind, value, trend, predicted, message) -> dict:
        return {
            "step": int(rec["step"]),
            "detector": self.name,
            "event": kind,
            "value": value,
            "trend": trend,
            "predicted_step": predicted,
            "message": message,
        }


class LogitGrowth(Detector):
    """Max attention logit (max over layers, ``attn/max_logit/layer_*``) growing towards
    ``threshold``. Over the trailing ``window`` logged steps, fit log ℓ = a + b·step by least
    squares; if b > 0, the extrapolated crossing is s* = (ln threshold − a) / b. Warns when
    the latest logit is at least ``min_logit`` and s* falls before the end of training
    (``horizon`` = 0) or within ``horizon`` steps, at ``confirm`` consecutive logged steps
    (a logit that grows then plateaus stops the count); the trend is ln 2 / b (steps to
    double). Clears when the crossing recedes past twice that limit, or b ≤ 0."""

    name = "logit_growth"

    def __init__(self, cfg: LogitWatch, steps: int):
        super().__init__(steps)
        self.cfg, self.points, self.held = cfg, [], 0

    def _limit(self, step: int, scale: float = 1.0) -> float:
        h = self.cfg.horizon
        return step + scale * h if h else step + scale * (self.steps - step)

    def check(self, rec):
        v = _over_layers(rec, LOGIT_PREFIX, max)
        if v is None or v <= 0:
            return None
        self.points = (self.points + [(rec["step"], math.log(v))])[-self.cfg.window :]
        if len(self.points) < min(3, self.cfg.window):
            return None
        a, b = _fit(*zip(*self.points, strict=True))
        step = rec["step"]
        predicted = (math.log(self.cfg.threshold) - a) / b if b > 0 else None
        if v >= self.cfg.threshold:
            predicted = step
        self._last = (step, b, predicted)
        holds = predicted is not None and v >= self.cfg.min_logit and predicted <= self._limit(step)
        self.held = self.held + 1 if holds else 0
        on = holds and self.held >= self.cfg.confirm
        trend = math.log(2) / b if b > 0 else None  # steps to double
        grows = f"doubling every {trend:.3g} steps" if trend else "not growing"
        when = (
            f", predicted to cross {self.cfg.threshold:g} at step {predicted:.0f}"
            if predicted
            else ""
        )
        msg = f"max attention logit {v:.3g} ({grows}){when}"
        return on, v, trend, None if predicted is None else int(round(predicted)), msg

    def clears(self, rec, value, trend, predicted):
        step, b, pred = self._last
        return b <= 0 or pred is None or pred > self._limit(step, 2.0)


class EntropyCollapse(Detector):
    """Attention entropy collapse: e = min over layers of ``attn/entropy_min/layer_*`` (the
    lowest head's mean row entropy, nats). With e₀ the largest e over the first ``window``
    logged steps, warns when e < ``floor`` or e < (1 − ``drop``)·e₀. Clears when
    e > 2·floor and e > (1 − drop/2)·e₀."""

    name = "entropy_collapse"

    def __init__(self, cfg: EntropyWatch, steps: int):
        super().__init__(steps)
        self.cfg, self.early, self.seen = cfg, 0.0, 0

    def check(self, rec):
        e = _over_layers(rec, ENTROPY_PREFIX, min)
        if e is None:
            return None
        if self.seen < self.cfg.window:
            self.early, self.seen = max(self.early, e), self.seen + 1
        on = e < self.cfg.floor or e < (1 - self.cfg.drop) * self.early
        msg = f"min attention entropy {e:.3g} nats (early {self.early:.3g})"
        return on, e, None, None, msg

    def clears(self, rec, value, trend, predicted):
        return value > 2 * self.cfg.floor and value > (1 - self.cfg.drop / 2) * self.early


class LogZDrift(Detector):
    """Output-logit drift: z = ``logits/log_z_mean``. Over the trailing ``window`` logged
    steps, fit z = a + b·step; warns when z < 0, b < 0 and the extrapolation to the end of
    training (or ``horizon`` steps ahead) is below ``bound``, or z itself is; the predicted
    step is where the line crosses ``bound``. Clears when b ≥ 0 and z > bound / 2."""

    name = "log_z_drift"

    def __init__(self, cfg: LogZWatch, steps: int):
        super().__init__(steps)
        self.cfg, self.points = cfg, []

    def check(self, rec):
        z = rec.get("logits/log_z_mean")
        if not _finite(z):
            return None
        self.points = (self.points + [(rec["step"], z)])[-self.cfg.window :]
        if len(self.points) < min(3, self.cfg.window):
            return None
        a, b = _fit(*zip(*self.points, strict=True))
        self._slope = b
        step = rec["step"]
        ahead = step + (self.cfg.horizon or self.steps - step)
        predicted = (self.cfg.bound - a) / b if b < 0 else None
        on = z < self.cfg.bound or (z < 0 and b < 0 and a + b * ahead < self.cfg.bound)
        when = f", predicted below {self.cfg.bound:g} at step {predicted:.0f}" if predicted else ""
        msg = f"mean log Z {z:.3g} ({100 * b:+.3g} per 100 steps){when}"
        return on, z, 100 * b, None if predicted is None else int(round(predicted)), msg

    def clears(self, rec, value, trend, predicted):
        return self._slope >= 0 and value > self.cfg.bound / 2


class UpdatesVsEps(Detector):
    """Gradient RMS approaching Adam's ε (§3.4): r = the median over the trailing ``window``
    logged steps of the minimum over parameters of ``grad/rms_over_eps/*`` (Adam-family
    optimizers log it). Warns when r < ``ratio`` (updates are then damped by ε); clears when
    r > 2·ratio. The median keeps a collapsed run's jumpy gradients from flapping."""

    name = "updates_vs_eps"

    def __init__(self, cfg: EpsWatch, steps: int):
        super().__init__(steps)
        self.cfg, self.mins = cfg, []

    def check(self, rec):
        vals = {
            k[len(EPS_PREFIX) :]: v
            for k, v in rec.items()
            if k.startswith(EPS_PREFIX) and _finite(v)
        }
        if not vals:
            return None
        param = min(vals, key=vals.get)
        self.mins = (self.mins + [vals[param]])[-self.cfg.window :]
        r = float(np.median(self.mins))
        msg = f"grad RMS / ε {r:.3g} (median of {len(self.mins)} logged steps; lowest now: {param})"
        return r < self.cfg.ratio, r, None, None, msg

    def clears(self, rec, value, trend, predicted):
        return value > 2 * self.cfg.ratio


class LossSpike(Detector):
    """The common baseline (llm-foundry's loss-spike callback): with m and s the mean and
    standard deviation of ``train/loss`` over the previous ``window`` logged steps (at least
    ``window`` of them), warns when loss > m + k·s; clears when loss < m + k·s / 2."""

    name = "loss_spike"

    def __init__(self, cfg: LossSpikeWatch, steps: int):
        super().__init__(steps)
        self.cfg, self.losses = cfg, []

    def check(self, rec):
        loss = rec.get("train/loss")
        if not _finite(loss):
            return None
        past, self.losses = self.losses, (self.losses + [loss])[-self.cfg.window :]
        if len(past) < self.cfg.window:
            return None
        m, s = float(np.mean(past)), float(np.std(past))
        self._bar = (m, s)
        z = (loss - m) / s if s > 0 else math.inf if loss > m else 0.0
        return z > self.cfg.k, loss, z, None, f"loss {loss:.4g}, {z:.3g} std above its mean {m:.4g}"

    def clears(self, rec, value, trend, predicted):
        m, s = self._bar
        return value < m + self.cfg.k * s / 2


DETECTORS = {
    "logit": LogitGrowth,
    "entropy": EntropyCollapse,
    "log_z": LogZDrift,
    "eps": UpdatesVsEps,
    "loss_spike": LossSpike,
}


class Watcher:
    """Every enabled detector of one run (``cfg``: its ``watch`` section; ``steps``: its
    ``train.steps``)."""

    def __init__(self, cfg: WatchConfig, steps: int):
        self.detectors = [
            cls(getattr(cfg, field), steps)
            for field, cls in DETECTORS.items()
            if getattr(cfg, field).enabled
        ]

    def update(self, records: list[dict]) -> list[dict]:
        """The events of ``records`` (in step order), in order."""
        return [e for rec in records for d in self.detectors for e in d.update(rec)]

    @property
    def warned(self) -> bool:
        return any(d.active for d in self.detectors)


# ---------------------------------------------------------------------------------------
# What happened to a run, for lead times (``stability report``, benchmarks/early_warning.py).

BAND_NATS = 0.3  # a run has left the stable band when its loss stays this far above it


def instability(
    history: list[dict], band: dict[int, float] | None = None, margin: float = BAND_NATS
) -> tuple[str, int] | None:
    """How and where a run left stable training: ("diverged", its failing update) when its
    last record has ``alive`` False; else ("left band", s) with s the first logged step from
    which ``train/loss`` stays more than ``margin`` nats above the band to the end. The band
    at a step is ``band[step]`` (a sweep setting's lowest train loss at that step), else the
    run's own lowest loss so far. None when neither happened."""
    if history and history[-1].get("alive") is False:
        return "diverged", int(history[-1]["step"])
    points = [(r["step"], r["train/loss"]) for r in history if _finite(r.get("train/loss"))]
    low, above = math.inf, []
    for step, loss in points:
        low = min(low, loss)
        ref = band.get(step, low) if band is not None else low
        above.append(loss > ref + margin)
    for k in range(len(points)):
        if all(above[k:]):
            return "left band", int(points[k][0])
    return None


def lowest_losses(histories: list[list[dict]]) -> dict[int, float]:
    """The band of a setting: at each logged step, the lowest train loss of its runs."""
    out: dict[int, float] = {}
    for hist in histories:
        for r in hist:
            if _finite(r.get("train/loss")):
                out[r["step"]] = min(out.get(r["step"], math.inf), r["train/loss"])
    return out
