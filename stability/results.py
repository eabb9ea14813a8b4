"""Sweep results as pandas tables, from workdirs or from W&B (for the notebook).

A workdir is a sweep's (``stability sweep``: results.jsonl, runs/<run_id>/) or a single run's
(``stability train``: config.json, metrics.jsonl). Two shapes, whatever the source:

  runs table   one row per run: ``RUN_COLUMNS``. ``status`` is "finished", "diverged" or
               "unfinished" (a run with a history but no results record: an interrupted
               sweep, or a single run short of its last step). ``label`` is the setting,
               prefixed by the sweep workdir's name when several sources are read at once;
               the figures group by it. Single runs read together are pooled: their setting
               is what their configs differ in besides the LR and seed (so runs at several LRs
               form one LR curve), or the workdir's name for a lone run; a single run's loss
               at init is unknown (NaN). ``seed`` is the run's train.seed: the runs of one
               label and LR are the seeds of that point (``seed_spread``).
  histories    long form, one row per (run, logged step, metric): ``HISTORY_COLUMNS``.
               ``value`` is a float (booleans become 0/1; null, NaN and ±inf become NaN).

Torn or foreign lines of a JSONL file are skipped with a warning naming the file and lines.
``from_wandb`` talks to the W&B server only when called; nothing here touches W&B at import.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

try:
    import pandas as pd
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError("stability.results needs pandas: pip install -e '.[notebook]'") from e

from stability import plots, report
from stability import workdir as W
from stability.workdir import read_jsonl

RUN_COLUMNS = (
    "workdir",  # the source: a sweep workdir, or "wandb:ENTITY/PROJECT/GROUP"
    "run_id",
    "label",  # the setting, prefixed by the source's name when several are read
    "setting",  # what differs from the other runs besides the LR, "leaf=value,..."
    "lr",  # peak learning rate
    "seed",  # train.seed (the seeds of one label and LR are one point's repeats)
    "status",  # finished | diverged | unfinished
    "final_loss",  # final eval loss (nats); NaN if diverged or unfinished
    "loss_at_init",  # eval loss at initialisation (nats); NaN if unknown
    "diverged",
    "diverged_step",
    "max_attn_logit",  # at the last logged step, max over layers
    "min_attn_entropy",  # at the last logged step, min over layers (nats)
    "steps",  # last logged step
    "wall_seconds",
    "config",  # the run's full config (dict), when known
    "metrics_path",  # the run's metrics.jsonl; None for W&B
)
HISTORY_COLUMNS = ("workdir", "run_id", "label", "setting", "lr", "seed", "step", "key", "value")
Curve = tuple[np.ndarray, np.ndarray]

_RUN_ID = W.RUN_ID


# ---------------------------------------------------------------------------------------
# Workdirs.


def runs_table(workdirs: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """One row per run of one or several sweep or single-run workdirs (``RUN_COLUMNS``),
    sorted by workdir, setting, LR and seed."""
    return _runs_frame(_rows(_as_dirs(workdirs)))


def histories(
    workdirs: str | Path | Sequence[str | Path],
    run_ids: Iterable[str] | None = None,
    keys: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Long-form metric histories (``HISTORY_COLUMNS``) of the runs of one or several sweep
    workdirs, from ``runs/<run_id>/metrics.jsonl``.

    run_ids: only these runs (default: all). keys: metric names or shell-style patterns
    (``"attn/entropy_min/layer_*"``) to keep (default: every numeric metric).
    """
    wanted = None if run_ids is None else set(run_ids)
    match = _key_matcher(keys)
    frames = []
    for run in _rows(_as_dirs(workdirs), warn=False):
        if wanted is not None and run["run_id"] not in wanted:
            continue
        path = W.path(run["metrics_path"])
        recs, bad = read_jsonl(path, match)  # only the wanted columns are held
        _warn_bad(path, bad)
        frames.append(_long(run, recs, "step", match))
    return _history_frame(frames)


def planned_grid(workdirs: str | Path | Sequence[str | Path]) -> dict[str, list[float]]:
    """{label: planned LRs} of the sweep workdirs among ``workdirs`` (their plans,
    ``workdir.planned_grid``), labelled as :func:`runs_table` labels them: pass it to
    ``plots.summary_table`` and ``plots.plot_lr_sensitivity`` so that a setting whose grid
    has not finished reads "n/a (k of n LRs)"."""
    dirs = _as_dirs(workdirs)
    sweeps = [d for d in dirs if W.kind(d) == "sweep"]
    prefixes = _prefixes(sweeps) if len(dirs) > 1 else [None] * len(sweeps)
    grid: dict[str, list[float]] = {}
    for d, prefix in zip(sweeps, prefixes, strict=True):
        grid.update(W.planned_grid(d, "" if prefix is None else f"{prefix}: "))
    return grid


def _as_dirs(workdirs) -> list[W.Path]:
    one = isinstance(workdirs, (str, Path, W.Path))
    dirs = [W.path(workdirs)] if one else [W.path(w) for w in workdirs]
    if not dirs:
        raise ValueError("no workdir given")
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"workdir {str(d)!r} does not exist")
        if W.kind(d) is None:
            raise FileNotFoundError(
                f"workdir {str(d)!r} holds neither results.jsonl nor runs/ (a sweep's) nor "
                "config.json and metrics.jsonl (a single run's): run `stability sweep` or "
                "`stability train` with --workdir first"
            )
    return dirs


def _rows(dirs: list[Path], warn: bool = True) -> list[dict[str, Any]]:
    """RUN_COLUMNS dicts of every run of ``dirs``: sweep workdirs' runs labelled by setting
    (prefixed by the workdir's name when there are several), then the pooled single runs."""
    sweeps = [d for d in dirs if W.kind(d) == "sweep"]
    singles = [d for d in dirs if W.kind(d) == "run"]
    prefixes = _prefixes(sweeps) if len(dirs) > 1 else [None] * len(sweeps)
    rows = []
    for d, prefix in zip(sweeps, prefixes, strict=True):
        rows += _workdir_runs(d, prefix, warn)
    return rows + _single_runs(singles, warn)


def _prefixes(dirs: list[Path]) -> list[str]:
    """Label prefixes: each workdir's name (its path if two names clash)."""
    names = [d.name for d in dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in dirs]


def _single_runs(dirs: list[Path], warn: bool) -> list[dict[str, Any]]:
    """Rows of single-run workdirs; setting = the config leaves they differ in besides LR,
    seed and W&B naming ("leaf=value,..."), "default" if none, the workdir's name if alone."""
    runs = []
    for d in dirs:
        rec, bad = report.run_record(d)
        if warn:
            _warn_bad(d / W.METRICS, bad)
        runs.append(rec)
    settings = report.pooled_settings([r["config"] for r in runs], [r["run_id"] for r in runs])
    for r, setting in zip(runs, settings, strict=True):
        r["setting"] = setting
        r["workdir"] = str(W.path(r["metrics_path"]).parent)
        r["label"] = r["setting"]
        r["loss_at_init"] = math.nan
        for k in ("final_loss", "max_attn_logit", "min_attn_entropy", "wall_seconds"):
            r[k] = _float(r[k])
    return runs


def _workdir_runs(workdir: Path, prefix: str | None, warn: bool) -> list[dict[str, Any]]:
    """Runs of one sweep workdir as RUN_COLUMNS dicts: results records, then unfinished runs."""
    path = workdir / W.RESULTS
    recs, bad = W.results(workdir)
    if warn:
        _warn_bad(path, bad)
    good = [r for r in recs if {"run_id", "setting", "lr"} <= r.keys()]
    if warn and len(good) < len(recs):
        warnings.warn(
            f"{path}: skipped {len(recs) - len(good)} record(s) without run_id, setting, lr",
            stacklevel=3,
        )
    latest = {r["run_id"]: r for r in good}  # a rerun's later record wins
    rows = [_result_row(r) for r in latest.values()]
    slug_setting = {m["slug"]: r["setting"] for r in rows if (m := _RUN_ID.match(r["run_id"]))}
    runs_dir = workdir / W.RUNS
    started = sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    for run_dir in started:
        if run_dir.name not in latest:
            rows.append(_unfinished_row(run_dir, slug_setting, warn))
    for row in rows:
        row["workdir"] = str(workdir)
        row["label"] = row["setting"] if prefix is None else f"{prefix}: {row['setting']}"
        row["metrics_path"] = str(W.run_dir(workdir, row["run_id"]) / W.METRICS)
    return rows


def _seed(config: dict | None, run_id: str) -> int:
    """train.seed from the config, else from the run id's ``-s{seed}``, else 0."""
    seed = ((config or {}).get("train") or {}).get("seed")
    if seed is None and (m := _RUN_ID.match(run_id)) and m["seed"]:
        seed = m["seed"]
    return int(seed or 0)


def _result_row(r: dict) -> dict[str, Any]:
    diverged = bool(r.get("diverged"))
    return {
        "run_id": r["run_id"],
        "setting": r["setting"],
        "lr": float(r["lr"]),
        "seed": _seed(r.get("config"), r["run_id"]),
        "status": "diverged" if diverged else "finished",
        "final_loss": _float(r.get("final_loss")),
        "loss_at_init": _float(r.get("loss_at_init")),
        "diverged": diverged,
        "diverged_step": r.get("diverged_step"),
        "max_attn_logit": _float(r.get("max_attn_logit")),
        "min_attn_entropy": _float(r.get("min_attn_entropy")),
        "steps": r.get("steps"),
        "wall_seconds": _float(r.get("wall_seconds")),
        "config": r.get("config"),
    }


def _unfinished_row(run_dir: Path, slug_setting: dict[str, str], warn: bool) -> dict[str, Any]:
    """A started run without a results record: setting from a finished run with the same
    run-id prefix (else that prefix), LR from its config.json (else its run id)."""
    m = _RUN_ID.match(run_dir.name)
    config = W.run_config(run_dir)
    lr = (config or {}).get("optim", {}).get("lr", float(m["lr"]) if m else math.nan)
    path = run_dir / W.METRICS
    hist, bad = W.metrics(run_dir)
    if warn:
        _warn_bad(path, bad)
    last = hist[-1] if hist else {}
    diverged = last.get("alive") is False
    return {
        "run_id": run_dir.name,
        "setting": slug_setting.get(m["slug"], m["slug"]) if m else run_dir.name,
        "lr": float(lr),
        "seed": _seed(config, run_dir.name),
        "status": "unfinished",
        "final_loss": math.nan,
        "loss_at_init": math.nan,
        "diverged": diverged,
        "diverged_step": last.get("step") if diverged else None,
        "max_attn_logit": _float(plots.max_over_layers(last, "attn/max_logit")),
        "min_attn_entropy": _float(plots.min_over_layers(last, "attn/entropy_min")),
        "steps": last.get("step"),
        "wall_seconds": math.nan,
        "config": config,
    }


def _warn_bad(path: Path, bad: list) -> None:
    if bad:
        warnings.warn(f"{path}: skipped unreadable lines {bad}", stacklevel=3)


# ---------------------------------------------------------------------------------------
# W&B.


def from_wandb(
    project: str,
    group: str,
    entity: str | None = None,
    *,
    keys: Iterable[str] | None = None,
    api: Any = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs table, histories) of the W&B runs of one group (a sweep's name), in the shapes
    of ``runs_table`` and ``histories``; needs the network and a W&B login.

    A run counts as finished when W&B says so; its final loss is the last ``eval/loss``
    and its loss at init the summary's ``loss_at_init`` (NaN when the run did not log one).
    keys: as in ``histories``. api: a ``wandb.Api()`` or an object with its ``runs`` method.
    """
    if api is None:
        import wandb

        api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    runs = list(api.runs(path, filters={"group": group}))
    if not runs:
        raise LookupError(f"W&B project {path!r} has no runs in group {group!r}")
    source = f"wandb:{path}/{group}"
    match = _key_matcher(keys)
    rows, frames = [], []
    for run in runs:
        cfg, summary = dict(run.config), dict(run.summary_metrics)
        status = "unfinished"
        if run.state == "finished":
            status = "diverged" if summary.get("alive") is False else "finished"
        row = {
            "workdir": source,
            "run_id": cfg.get("run_id") or run.name,
            "setting": cfg.get("setting", "default"),
            "lr": float(cfg.get("lr", (cfg.get("optim") or {}).get("lr", math.nan))),
            "seed": _seed(cfg, cfg.get("run_id") or run.name),
            "status": status,
            "final_loss": _float(summary.get("eval/loss")) if status == "finished" else math.nan,
            "loss_at_init": _float(summary.get("loss_at_init")),
            "diverged": status == "diverged",
            "diverged_step": summary.get("_step") if status == "diverged" else None,
            "max_attn_logit": _float(plots.max_over_layers(summary, "attn/max_logit")),
            "min_attn_entropy": _float(plots.min_over_layers(summary, "attn/entropy_min")),
            "steps": summary.get("_step"),
            "wall_seconds": _float(summary.get("_runtime")),
            "config": cfg,
            "metrics_path": None,
        }
        row["label"] = row["setting"]
        rows.append(row)
        frames.append(_long(row, run.scan_history(), "_step", match))
    return _runs_frame(rows), _history_frame(frames)


# ---------------------------------------------------------------------------------------
# Building and reshaping the frames.


def _float(v: Any) -> float:
    """A finite float, or NaN (for None, non-numbers, NaN and ±inf)."""
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _key_matcher(keys: Iterable[str] | None):
    if keys is None:
        return lambda k: True
    patterns = list(keys)
    return lambda k: any(fnmatch.fnmatchcase(k, p) for p in patterns)


def _long(run: dict, recs: Iterable[dict], step_key: str, match) -> pd.DataFrame:
    """One run's history records as long rows; non-numeric values are dropped."""
    steps, keys, values = [], [], []
    for rec in recs:
        step = rec.get(step_key)
        if not isinstance(step, (int, float)):
            continue
        for k, v in rec.items():
            if k == step_key or k.startswith("_") or not match(k):
                continue
            if v is None or isinstance(v, (bool, int, float)):
                steps.append(int(step))
                keys.append(k)
                values.append(_float(v))
    meta = {c: run[c] for c in ("workdir", "run_id", "label", "setting", "lr", "seed")}
    return pd.DataFrame({**meta, "step": steps, "key": keys, "value": values})


def _runs_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    df = df.astype({"lr": float, "final_loss": float, "loss_at_init": float, "diverged": bool})
    df = df.astype({"seed": int, "diverged_step": "Int64", "steps": "Int64"})
    return df.sort_values(["workdir", "setting", "lr", "seed"], ignore_index=True)


def _history_frame(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        empty = pd.DataFrame(columns=list(HISTORY_COLUMNS))
        return empty.astype({"lr": float, "seed": int, "step": int, "value": float})
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(["workdir", "run_id", "key", "step"], ignore_index=True)


def records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """The finished and diverged runs as the record dicts that ``stability.plots`` takes
    (``setting`` is the table's ``label``; loss_at_init None where unknown)."""
    done = table[table["status"] != "unfinished"]
    several = table["workdir"].nunique() > 1
    out = []
    for r in done.itertuples():
        out.append(
            {
                "run_id": f"{r.workdir}/{r.run_id}" if several else r.run_id,
                "setting": r.label,
                "lr": r.lr,
                "seed": int(r.seed),
                "final_loss": None if math.isnan(r.final_loss) else r.final_loss,
                "loss_at_init": None if math.isnan(r.loss_at_init) else r.loss_at_init,
                "diverged": bool(r.diverged),
                "diverged_step": None if pd.isna(r.diverged_step) else int(r.diverged_step),
                "max_attn_logit": None if math.isnan(r.max_attn_logit) else r.max_attn_logit,
                "min_attn_entropy": None if math.isnan(r.min_attn_entropy) else r.min_attn_entropy,
                "metrics_path": r.metrics_path,
            }
        )
    return out


SPREAD_COLUMNS = ("label", "lr", "seeds", "diverged", "mean", "std", "spread", "disagree")


def seed_spread(table: pd.DataFrame, tolerance: float = plots.SEED_TOLERANCE) -> pd.DataFrame:
    """Per label and LR, over the seeds of the finished and diverged runs (``SPREAD_COLUMNS``):
    how many seeds and how many diverged; mean, sample std and max − min of the final loss
    counted as in the LR sensitivity (min(loss, ℓ0), ℓ0 for a diverged seed); ``disagree``:
    some seeds diverged and others not, or max − min > ``tolerance`` nats
    (``plots.lr_points``)."""
    rows = [
        (label, p.lr, len(p.runs), p.n_diverged, p.mean, p.std, p.spread, p.disagree)
        for label, runs in plots.by_setting(records(table)).items()
        for p in plots.lr_points(runs, tolerance)
    ]
    return pd.DataFrame(rows, columns=list(SPREAD_COLUMNS))


def nearest_lr(table: pd.DataFrame, lr: float) -> float:
    """The LR of the table closest to ``lr`` on a log scale."""
    lrs = sorted(x for x in table["lr"].unique() if x > 0)
    if not lrs:
        raise ValueError(f"no run with a positive learning rate among {len(table)} run(s)")
    return min(lrs, key=lambda x: abs(math.log(x / lr)))


def over_layers(hist: pd.DataFrame, name: str, how: Literal["min", "max"]) -> pd.DataFrame:
    """Rows of ``{name}/layer_i`` reduced over layers at each step, as key ``name``
    (``plots.min_over_layers`` / ``max_over_layers``; NaN values are ignored)."""
    reduce = {"min": plots.min_over_layers, "max": plots.max_over_layers}[how]
    sub = hist[hist["key"].str.startswith(f"{name}/layer_") & hist["value"].notna()]
    ids = ["workdir", "run_id", "label", "setting", "lr", "seed", "step"]
    rows = [
        (*group, reduce(dict(zip(g["key"], g["value"], strict=True)), name))
        for group, g in sub.groupby(ids, sort=False)
    ]
    out = pd.DataFrame(rows, columns=ids + ["value"])
    out.insert(len(ids), "key", name)
    return _history_frame([out])


def value_at_step(hist: pd.DataFrame, key: str, step: int) -> pd.DataFrame:
    """Per run, the last finite value of ``key`` logged at or before ``step`` (one row per run,
    its ``step`` column saying which step that was)."""
    sub = hist[(hist["key"] == key) & (hist["step"] <= step) & hist["value"].notna()]
    last = sub.sort_values("step").groupby(["workdir", "run_id"], sort=False).tail(1)
    return last.sort_values(["label", "lr"], ignore_index=True)


def curves(df: pd.DataFrame, by: str | Sequence[str], x: str = "step") -> dict[str, Curve]:
    """{legend label: (x values, values)}: one curve per distinct value of column(s) ``by``,
    sorted by ``x``, NaN values dropped. Labels read ``lr=0.1``, ``layer_0`` (the last part of a
    key) or the plain value."""
    by = [by] if isinstance(by, str) else list(by)
    out = {}
    for group, g in df[df["value"].notna()].groupby(by, sort=True):
        g = g.sort_values(x)
        out[", ".join(_fmt(c, v) for c, v in zip(by, group, strict=True))] = (
            g[x].to_numpy(),
            g["value"].to_numpy(),
        )
    return out


def panels(df: pd.DataFrame, panel: str, by: str | Sequence[str]) -> dict[str, dict[str, Curve]]:
    """{panel title: curves(rows of that panel, by)}, e.g. one panel per ``label``."""
    return {str(p): curves(g, by) for p, g in df.groupby(panel, sort=True)}


def _fmt(column: str, value: Any) -> str:
    if column == "lr":
        return f"lr={value:g}"
    if column == "key":
        return str(value).rsplit("/", 1)[-1]
    return str(value)
