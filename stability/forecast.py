"""Scaling forecasts across model sizes (Wortsman et al. 2023, §3.3 and §3.4).

For each setting (what differs between runs besides size, LR and seed) and each LR, a
least-squares fit of y = log10(metric at step S) in x = log10(non-embedding parameters) goes
through the seeds' mean of y at each size (the seeds of a size are one point, not several) and
is extrapolated to a target size:

  attention   the max attention logit (max over layers) at step S; crossing ``threshold``
              (1e4: every run of the paper whose max logit passed it diverged) predicts a
              divergence at the target size
  §3.4        gradient RMS / Adam's ε of one parameter at step S, and the size at which the fit
              reaches 1 (where ε starts to shrink the update)

The fit is, per quantity, the method that forecast held-out sizes best in the shipped
calibration (``DEFAULT_METHODS``, from ``stability forecast --calibrate`` on the CPU size
family: ``stability/calibration.py``), or the one ``method`` names: "quadratic" (the paper's)
or "linear". Uncertainty is a 95% prediction interval from the residuals (Student t with
n − degree − 1 degrees of freedom, n = sizes); a fit with no residual degrees of freedom has no
interval. Optimal LR and LR sensitivity are also tabulated per size with a least-squares trend
in log10(parameters).

A value that is missing (the run diverged before step S) or non-finite is marked in the
outputs and never fitted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stability import workdir as W
from stability.config import Config, ConfigError, ModelConfig, from_config_dict
from stability.plots import lr_sensitivity, max_over_layers
from stability.tracking import flatten

LOGIT_KEY = "attn/max_logit"  # per layer: attn/max_logit/layer_i
DEFAULT_PARAM = "blocks/0/attn/q/kernel"  # layer-0 query kernel (§3.4)
LEVEL = 0.95  # prediction-interval coverage
# A fit supports a yes/no flag only with at least MIN_DOF residual degrees of freedom and a
# prediction interval no wider than MAX_DECADES decades; otherwise it gives no flag, and says why.
MIN_DOF = 2
MAX_DECADES = 4.0
DEGREES = {"quadratic": 2, "linear": 1}
# The calibration's choice per quantity (docs/forecast_cpu/calibration.json, "chosen"; a test
# keeps the two equal): the method with the lowest mean interval score over held-out sizes.
DEFAULT_METHODS = {
    "max_attn_logit": {
        "method": "linear",
        "why": "lowest mean interval score over the held-out folds: 0.884 decades (vs quadratic 1.57); median absolute error 0.0262 decades",
    },
    "grad_rms_over_eps": {
        "method": "linear",
        "why": "lowest mean interval score over the held-out folds: 1.48 decades (vs quadratic 3.67); median absolute error 0.0817 decades",
    },
}
# Fields that define a run's size, LR or replicate rather than its setting. μParam (full)'s
# logit multiplier is base width / width, so it follows the size.
_NOT_SETTING = {
    "model.d_model",
    "model.n_layers",
    "model.n_heads",
    "model.logit_multiplier",
    "optim.lr",
    "train.seed",
    "data.seed",
}
_IGNORED_PREFIXES = ("wandb.",)


# ---------------------------------------------------------------------------------------
# Parameter counts and fits.


@functools.lru_cache(maxsize=256)
def non_embedding_params(model: ModelConfig) -> int:
    """Exact number of trainable parameters outside the embedding and the output head, from
    the model's shapes (``nnx.eval_shape``: nothing is computed)."""
    import jax
    from flax import nnx

    from stability.metrics import path_str
    from stability.models.transformer import Transformer

    abstract = nnx.eval_shape(lambda: Transformer(model, rngs=nnx.Rngs(0)))
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(abstract, nnx.Param))[0]
    return sum(
        math.prod(x.shape) for p, x in leaves if path_str(p).split("/")[0] not in ("embed", "head")
    )


@dataclasses.dataclass(frozen=True)
class Fit:
    """y = c0 + c1·x (+ c2·x²) by least squares; x = log10(params), y = log10(value)."""

    coef: tuple[float, ...]
    n: int  # fitted points
    rss: float  # residual sum of squares
    xtx_inv: tuple[tuple[float, ...], ...]  # (XᵀX)⁻¹ of the design matrix [1, x(, x²)]

    @property
    def dof(self) -> int:
        return self.n - len(self.coef)

    def __call__(self, x: float | np.ndarray) -> float | np.ndarray:
        return sum(c * np.power(x, k) for k, c in enumerate(self.coef))

    def interval(self, x: float, level: float = LEVEL) -> tuple[float, float] | None:
        """The prediction interval of a new point at ``x`` (log10 units), or None when there
        are no residual degrees of freedom."""
        if self.dof < 1:
            return None
        from scipy.stats import t

        v = np.array([x**k for k in range(len(self.coef))], float)
        s = math.sqrt(self.rss / self.dof)
        half = t.ppf(0.5 + level / 2, self.dof) * s * math.sqrt(1 + v @ np.array(self.xtx_inv) @ v)
        y = float(self(x))
        return y - half, y + half

    def root_beyond(self, x_min: float, y: float = 0.0) -> float | None:
        """The smallest x > x_min where the fit equals ``y`` (None if it never does)."""
        c = list(self.coef) + [0.0] * (3 - len(self.coef))
        c0, c1, c2 = c
        roots = np.roots([c2, c1, c0 - y]) if c2 != 0 else np.array([(y - c0) / c1])
        real = [
            float(r.real) for r in np.atleast_1d(roots) if abs(r.imag) < 1e-12 and r.real > x_min
        ]
        return min(real) if real else None


def fit_polynomial(x: Sequence[float], y: Sequence[float], degree: int) -> Fit:
    """Least-squares polynomial of ``degree`` through (x, y); needs degree + 1 distinct x
    and finite values."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("fit: non-finite values must be excluded before fitting")
    if len(np.unique(x)) < degree + 1:
        raise ValueError(
            f"a degree-{degree} fit needs {degree + 1} distinct sizes, got {len(np.unique(x))}"
        )
    X = np.stack([x**k for k in range(degree + 1)], axis=1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    xtx_inv = np.linalg.inv(X.T @ X)
    return Fit(
        coef=tuple(float(c) for c in coef),
        n=len(x),
        rss=float(resid @ resid),
        xtx_inv=tuple(tuple(float(v) for v in row) for row in xtx_inv),
    )


def fit_quadratic(x: Sequence[float], y: Sequence[float]) -> Fit:
    """Least-squares quadratic through (x, y); needs at least 3 distinct x and finite values."""
    return fit_polynomial(x, y, 2)


def linear_trend(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Least-squares slope dy/dx (None with fewer than 2 distinct x)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(np.unique(x)) < 2:
        return None
    return float(np.polyfit(x, y, 1)[0])


# ---------------------------------------------------------------------------------------
# Reading runs.


@dataclasses.dataclass
class Run:
    """One run of a sweep workdir, as the forecast sees it."""

    workdir: str
    run_id: str
    config: Config
    params: int  # non-embedding parameters
    history: list[dict]
    setting: str = ""  # filled in once all runs are known

    @property
    def lr(self) -> float:
        return self.config.optim.lr

    @property
    def seed(self) -> str:
        return f"{self.config.train.seed}/{self.config.data.seed}"

    @property
    def size(self) -> str:
        m = self.config.model
        return f"d={m.d_model},L={m.n_layers},H={m.n_heads}"


def _read(key: str) -> bool:
    """The keys of a run's records that a forecast reads (besides ``step``)."""
    return key == "alive" or key.startswith((f"{LOGIT_KEY}/layer_", "grad/rms_over_eps/"))


def load_runs(dirs: Sequence[str | Path]) -> list[Run]:
    """Every run (finished or not) with a config.json under ``DIR/runs/*`` of each sweep
    workdir; ``setting`` names the config fields that vary besides size, LR and seeds."""
    runs = []
    for d in map(W.path, dirs):
        if not (d / W.RUNS).is_dir():
            raise ConfigError(f"{d}: no runs/ folder (not a sweep workdir)")
        for run_dir in sorted(p for p in (d / W.RUNS).iterdir() if (p / W.CONFIG).exists()):
            try:
                cfg = from_config_dict(W.run_config(run_dir))
            except (ConfigError, json.JSONDecodeError) as e:
                raise ConfigError(f"{run_dir / W.CONFIG}: {e}") from e
            hist, _ = W.metrics(run_dir, _read)
            runs.append(Run(str(d), run_dir.name, cfg, non_embedding_params(cfg.model), hist))
    if not runs:
        raise ConfigError(f"no runs under {', '.join(map(str, dirs))}")
    flats = [flatten(r.config.to_dict()) for r in runs]
    keys = sorted(
        k
        for k in flats[0]
        if k not in _NOT_SETTING
        and not k.startswith(_IGNORED_PREFIXES)
        and len({repr(f.get(k)) for f in flats}) > 1
    )
    for r, f in zip(runs, flats, strict=True):
        r.setting = ",".join(f"{k.split('.')[-1]}={_fmt(f[k])}" for k in keys) or "default"
    return runs


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _value_at(
    run: Run, step: int, key: str | None, reduce_layers: bool
) -> tuple[float | None, str]:
    """(value of ``key`` at exactly ``step``, note); the note says why a value is missing."""
    rec = next((h for h in run.history if h.get("step") == step), None)
    if rec is None:
        last = run.history[-1] if run.history else {}
        if last.get("alive") is False:
            return None, f"diverged at step {last.get('step')}"
        return None, f"step {step} not logged (last logged step {last.get('step', 'none')})"
    v = max_over_layers(rec, key) if reduce_layers else rec.get(key)
    if v is None:
        return None, f"{key} not logged"
    v = float(v)
    if not math.isfinite(v) or v <= 0:
        return None, f"non-finite or non-positive value {v!r}"
    if rec.get("alive") is False:
        return None, f"diverged at step {step}"
    return v, ""


# ---------------------------------------------------------------------------------------
# The forecast.


def _series(
    runs: list[Run], step: int, key: str, reduce_layers: bool, target: float, threshold, degree: int
):
    """Per (setting, LR): points, fit, prediction at the target and (with a threshold) whether
    it is crossed."""
    groups: dict[tuple[str, float], list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.setting, r.lr)].append(r)
    out = []
    for (setting, lr), group in sorted(groups.items()):
        points = []
        for r in sorted(group, key=lambda r: (r.params, r.seed)):
            v, note = _value_at(r, step, key, reduce_layers)
            points.append(
                {
                    "run_id": r.run_id,
                    "workdir": r.workdir,
                    "size": r.size,
                    "params": r.params,
                    "seed": r.seed,
                    "value": v,
                    "excluded": note or None,
                }
            )
        out.append(
            {
                "setting": setting,
                "lr": lr,
                "points": points,
                **_fit_entry(points, target, threshold, degree),
            }
        )
    return out


def size_means(points: list[dict], leave_out: int | None = None) -> dict[int, float]:
    """{params: the seeds' mean of log10 value} of the points with a value (a size's seeds are
    one point of a fit), without the size ``leave_out``."""
    at: dict[int, list[float]] = defaultdict(list)
    for p in points:
        if p["value"] is not None and p["params"] != leave_out:
            at[p["params"]].append(math.log10(p["value"]))
    return {k: float(np.mean(v)) for k, v in sorted(at.items())}


def fit_means(means: dict[int, float], degree: int) -> Fit:
    return fit_polynomial([math.log10(k) for k in means], list(means.values()), degree)


def _fit_entry(
    points: list[dict], target: float, threshold: float | None, degree: int
) -> dict[str, Any]:
    means = size_means(points)
    entry: dict[str, Any] = {"sizes_used": sorted(means), "fit": None, "prediction": None}
    if len(means) < degree + 1:
        entry["not_fitted"] = (
            f"finite values at {len(means)} size(s); a degree-{degree} fit needs {degree + 1}"
        )
        return entry
    fit = fit_means(means, degree)
    entry["fit"] = {"coef": list(fit.coef), "n": fit.n, "dof": fit.dof, "rss": fit.rss}
    entry["_fit"] = fit
    entry["prediction"] = _predict(fit, target)
    if threshold is not None:
        p = entry["prediction"]
        if why := no_flag(fit, math.log10(target)):
            entry["no_flag"] = why
        else:
            entry["crosses_threshold"] = bool(p["log10"] >= math.log10(threshold))
            entry["interval_reaches_threshold"] = bool(p["hi"] >= threshold)
    return entry


def no_flag(fit: Fit, x: float) -> str | None:
    """Why ``fit`` supports no yes/no flag at log10 size ``x`` (too few residual degrees of
    freedom, or a 95% interval there wider than ``MAX_DECADES``), or None when it does."""
    if fit.dof < MIN_DOF:
        return f"{fit.dof} residual degrees of freedom (< {MIN_DOF})"
    iv = fit.interval(x)
    width = math.inf if iv is None else iv[1] - iv[0]
    if width > MAX_DECADES:
        return f"interval spans {width:.1f} decades (> {MAX_DECADES:g})"
    return None


def _predict(fit: Fit, params: float) -> dict[str, Any]:
    x = math.log10(params)
    y = float(fit(x))
    iv = fit.interval(x)
    return {
        "params": params,
        "log10": y,
        "value": 10**y,
        "lo": None if iv is None else 10 ** iv[0],
        "hi": None if iv is None else 10 ** iv[1],
    }


def _holdout(entry: dict, degree: int) -> dict[str, Any] | None:
    """Fit without the largest size, predict it, compare with the measured values there."""
    largest = max(p["params"] for p in entry["points"])
    means = size_means(entry["points"], leave_out=largest)
    measured = [p["value"] for p in entry["points"] if p["params"] == largest and p["value"]]
    if len(means) < degree + 1 or not measured:
        why = (
            "no finite value at the largest size"
            if not measured
            else f"finite values at {len(means)} smaller size(s); a degree-{degree} fit needs "
            f"{degree + 1}"
        )
        return {"params": largest, "not_checked": why}
    pred = _predict(fit_means(means, degree), largest)
    m_log = float(np.mean([math.log10(v) for v in measured]))
    inside = None if pred["lo"] is None else bool(pred["lo"] <= 10**m_log <= pred["hi"])
    return {
        "params": largest,
        "predicted": pred["value"],
        "lo": pred["lo"],
        "hi": pred["hi"],
        "measured": 10**m_log,
        "error_log10": pred["log10"] - m_log,
        "inside_interval": inside,
    }


def _lr_trends(runs: list[Run], records: list[dict]) -> list[dict[str, Any]]:
    """Per setting and size: LR sensitivity and the optimal LR (means over the seeds whose
    planned LR grid, from the sweep's plan, has finished), with least-squares trends in
    log10(params)."""
    by_id = {(r["_workdir"], r["run_id"]): r for r in records}
    planned: dict[tuple[str, str], set[float]] = {}  # (workdir, run_id) -> its setting's LRs
    for d in {run.workdir for run in runs}:
        plan = W.planned_runs(d) or []
        grid = W.planned_grid(d)
        planned.update({(d, p["run_id"]): set(grid[p["setting"]]) for p in plan})
    groups: dict[str, dict[int, dict[str, list[dict]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    wanted: dict[tuple[str, int, str], set[float]] = {}
    for run in runs:
        key = (run.setting, run.params, run.seed)
        wanted.setdefault(key, set()).update(planned.get((run.workdir, run.run_id), {run.lr}))
        rec = by_id.get((run.workdir, run.run_id))
        if rec is not None and rec.get("loss_at_init") is not None:
            groups[run.setting][run.params][run.seed].append(rec)
    out = []
    for setting, sizes in sorted(groups.items()):
        rows = []
        for params, seeds in sorted(sizes.items()):
            seeds = {  # complete planned LR grids only
                k: v
                for k, v in seeds.items()
                if wanted[(setting, params, k)] <= {float(r["lr"]) for r in v}
            }
            if not seeds:
                continue
            sens, opt = [], []
            for recs in seeds.values():
                sens.append(lr_sensitivity(recs))
                done = [r for r in recs if not r.get("diverged") and _finite(r.get("final_loss"))]
                if done:
                    opt.append(math.log10(min(done, key=lambda r: r["final_loss"])["lr"]))
            rows.append(
                {
                    "params": params,
                    "n_lrs": len(next(iter(seeds.values()))),
                    "lr_sensitivity": float(np.mean(sens)),
                    "optimal_lr": 10 ** float(np.mean(opt)) if opt else None,
                }
            )
        xs = [math.log10(r["params"]) for r in rows]
        opt_rows = [(x, r) for x, r in zip(xs, rows, strict=True) if r["optimal_lr"]]
        out.append(
            {
                "setting": setting,
                "by_size": rows,
                "sensitivity_slope_per_decade": linear_trend(
                    xs, [r["lr_sensitivity"] for r in rows]
                ),
                "log10_optimal_lr_slope_per_decade": linear_trend(
                    [x for x, _ in opt_rows], [math.log10(r["optimal_lr"]) for _, r in opt_rows]
                ),
            }
        )
    return out


def _finite(v: Any) -> bool:
    return v is not None and math.isfinite(float(v))


def forecast(
    dirs: Sequence[str | Path],
    target_params: float,
    *,
    step: int | None = None,
    threshold: float = 1e4,
    param: str | None = None,
    holdout_largest: bool = False,
    min_sizes: int = 3,
    method: str = "auto",
) -> dict[str, Any]:
    """The forecast of sweeps ``dirs`` at ``target_params`` non-embedding parameters, as a
    JSON-able dict (see the module docstring). ``step``: the step read (default: the last step
    of the shortest run's schedule). ``param``: the parameter path of the §3.4 fit (default
    the layer-0 query kernel). ``method``: "auto" (per quantity, ``DEFAULT_METHODS``),
    "quadratic" or "linear". ``min_sizes``: fewer model sizes raise a ConfigError (the
    notebook passes 1 to plot measurements it cannot fit yet); so does anything else that
    cannot be forecast."""
    if method not in ("auto", *DEGREES):
        raise ConfigError(f"--method={method!r} is not valid; valid: auto, {', '.join(DEGREES)}")
    methods = {
        q: DEFAULT_METHODS[q] if method == "auto" else {"method": method, "why": "--method"}
        for q in DEFAULT_METHODS
    }
    degree = {q: DEGREES[m["method"]] for q, m in methods.items()}
    if not target_params > 0:
        raise ConfigError(f"--target-params={target_params!r} must be > 0")
    if not threshold > 0:
        raise ConfigError(f"--threshold={threshold!r} must be > 0")
    runs = load_runs(dirs)
    # A size is a model shape; settings (e.g. qk-layernorm) change its parameter count a little.
    sizes = sorted({r.size: r.params for r in runs}.items(), key=lambda kv: kv[1])
    if len(sizes) < min_sizes:
        raise ConfigError(
            f"{len(sizes)} model size(s) in {', '.join(map(str, dirs))} "
            f"({', '.join(s for s, _ in sizes)}); a fit needs >= {max(min_sizes, 3)}"
        )
    if holdout_largest and len(sizes) < max(degree.values()) + 2:
        raise ConfigError(
            f"--holdout-largest needs >= {max(degree.values()) + 2} model sizes (to fit and 1 "
            f"to check), got {len(sizes)}"
        )
    schedule_end = min(r.config.train.steps for r in runs)
    if step is None:
        step = schedule_end
    logged = {h.get("step") for r in runs for h in r.history}
    if step not in logged:
        near = sorted(s for s in logged if isinstance(s, int))
        raise ConfigError(
            f"--step={step} is not logged by any run; logged steps: {_ranges(near) or 'none'}"
        )
    explicit = param is not None
    param = param or DEFAULT_PARAM
    grad_key = f"grad/rms_over_eps/{param}"
    keys = {k for r in runs for h in r.history for k in h}
    if grad_key not in keys and explicit:
        valid = sorted(
            k.removeprefix("grad/rms_over_eps/") for k in keys if k.startswith("grad/rms_over_eps/")
        )
        raise ConfigError(
            f"--param={param!r}: no {grad_key} in the histories; valid: {', '.join(valid) or 'none (no Adam-family optimizer)'}"
        )
    records = []
    for d in map(W.path, dirs):
        recs, _ = W.results(d)
        records += [{**r, "_workdir": str(d)} for r in recs if "run_id" in r]
    logit = _series(runs, step, LOGIT_KEY, True, target_params, threshold, degree["max_attn_logit"])
    grad = (
        _series(runs, step, grad_key, False, target_params, None, degree["grad_rms_over_eps"])
        if grad_key in keys
        else []
    )
    for e in grad:
        fit = e.pop("_fit", None)
        if fit is not None:
            x_max = math.log10(max(e["sizes_used"]))
            root = fit.root_beyond(x_max, 0.0)
            why = None if root is None else no_flag(fit, root)
            if why:  # the crossing of 1 is said only where the fit supports a flag there
                e["no_flag"] = why
            e["reaches_one_at_params"] = None if root is None or why else 10**root
    for e in logit:
        e.pop("_fit", None)
        if holdout_largest:
            e["holdout"] = _holdout(e, degree["max_attn_logit"])
    return {
        "dirs": [str(d) for d in dirs],
        "step": step,
        "threshold": threshold,
        "target_params": target_params,
        "interval": f"{LEVEL:.0%} residual-based prediction interval (Student t, n − degree − 1 "
        "dof, n = sizes)",
        "methods": methods,
        "sizes": [
            {"size": s, "params": sorted({r.params for r in runs if r.size == s})} for s, _ in sizes
        ],
        "settings": sorted({r.setting for r in runs}),
        "max_attn_logit": logit,
        "grad_rms_over_eps": {
            "param": param,
            "key": grad_key,
            "logged": grad_key in keys,
            "series": grad,
        },
        "lr_trends": _lr_trends(runs, records),
        "holdout_largest": holdout_largest,
    }


def _ranges(steps: list[int]) -> str:
    if len(steps) <= 6:
        return ", ".join(map(str, steps))
    return f"{steps[0]}, {steps[1]}, …, {steps[-1]} ({len(steps)} steps)"
