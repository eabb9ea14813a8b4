"""LR-sensitivity analysis and the figures shared by ``stability report`` and the notebook.

LR sensitivity (Wortsman et al. 2023): E_{η∈grid}[min(ℓ(η), ℓ0) − ℓ*], with ℓ* the best final
loss over the grid and ℓ0 the loss at initialisation; a diverged or non-finite run counts as ℓ0.

Records are result dicts (``results.jsonl`` lines, ``run_record``, ``results.records``):
run_id, setting, lr, final_loss, loss_at_init (None when unknown: a single run's workdir does
not hold it), diverged, diverged_step, max_attn_logit, min_attn_entropy; optionally seed (else
config.train.seed) and metrics_path (else ``<workdir>/runs/<run_id>/metrics.jsonl``).

Seeds: runs of one setting at one LR are the seeds of that point. Their counted losses
min(ℓ, ℓ0) (ℓ0 for a diverged run) are given as mean ± std over seeds (sample std, ddof 1), and
the LR sensitivity is computed per seed, then given as mean ± std over seeds. Seeds *disagree*
at an LR when some diverged and others did not, or when their counted losses span more than
``SEED_TOLERANCE`` nats (max − min).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from stability import workdir as W  # noqa: E402

SEED_TOLERANCE = 0.05  # nats: seeds whose counted final losses span more disagree


def _loss_or_none(r: dict) -> float | None:
    v = r.get("final_loss")
    if r.get("diverged") or v is None or not math.isfinite(v):
        return None
    return float(v)


def seed_of(r: dict) -> int:
    """The run's train.seed (``seed``, else its config's, else 0)."""
    if r.get("seed") is not None:
        return int(r["seed"])
    return int(((r.get("config") or {}).get("train") or {}).get("seed", 0))


def loss_at_init(records: list[dict]) -> float | None:
    """ℓ0 of a setting: the median of its runs' known losses at init (None if none is known)."""
    known = sorted(
        float(r["loss_at_init"])
        for r in records
        if r.get("loss_at_init") is not None and math.isfinite(r["loss_at_init"])
    )
    return known[len(known) // 2] if known else None


def counted_loss(r: dict, l0: float | None) -> float | None:
    """min(final loss, ℓ0), ℓ0 for a diverged run; None for a diverged run when ℓ0 is unknown."""
    v = _loss_or_none(r)
    if v is None:
        return l0
    return v if l0 is None else min(v, l0)


def lr_sensitivity(records: list[dict], l0: float | None = None) -> float:
    """The paper's LR sensitivity of one setting's runs of one seed (one record per LR).
    l0: ℓ0 (default: ``loss_at_init(records)``). NaN when a run diverged and ℓ0 is unknown."""
    if not records:
        raise ValueError("lr_sensitivity needs at least one run")
    l0 = loss_at_init(records) if l0 is None else l0
    losses = [counted_loss(r, l0) for r in records]
    if any(v is None for v in losses):
        return math.nan
    return sum(losses) / len(losses) - min(losses)


def sensitivity_over_seeds(records: list[dict]) -> tuple[float, float, int]:
    """(mean, sample std, number of seeds) of the LR sensitivity computed per seed of one
    setting's runs (std is NaN for one seed); every seed uses the setting's ℓ0."""
    l0 = loss_at_init(records)
    per_seed: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        per_seed[seed_of(r)].append(r)
    values = [lr_sensitivity(runs, l0) for runs in per_seed.values()]
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std, len(values)


@dataclass(frozen=True)
class LRPoint:
    """One setting at one LR, over its seeds (losses counted as in the LR sensitivity)."""

    lr: float
    runs: list[dict]
    n_diverged: int
    mean: float  # mean counted loss (NaN if none is known: all diverged, ℓ0 unknown)
    std: float  # sample std of the counted losses over seeds (NaN for fewer than two)
    spread: float  # max − min of the counted losses (0 for one seed)
    disagree: bool  # some seeds diverged and others not, or spread > tolerance


def lr_points(runs: list[dict], tolerance: float = SEED_TOLERANCE) -> list[LRPoint]:
    """One setting's runs as LR points sorted by LR (seeds of an LR pooled)."""
    l0 = loss_at_init(runs)
    at: dict[float, list[dict]] = defaultdict(list)
    for r in runs:
        at[r["lr"]].append(r)
    out = []
    for lr in sorted(at):
        rs = sorted(at[lr], key=seed_of)
        vals = [v for v in (counted_loss(r, l0) for r in rs) if v is not None]
        n_div = sum(_loss_or_none(r) is None for r in rs)
        spread = max(vals) - min(vals) if vals else 0.0
        out.append(
            LRPoint(
                lr=lr,
                runs=rs,
                n_diverged=n_div,
                mean=statistics.fmean(vals) if vals else math.nan,
                std=statistics.stdev(vals) if len(vals) > 1 else math.nan,
                spread=spread,
                disagree=0 < n_div < len(rs) or spread > tolerance,
            )
        )
    return out


def by_setting(records: list[dict]) -> dict[str, list[dict]]:
    """Records grouped by setting, each group sorted by LR then seed (latest record per run_id
    wins)."""
    latest = {r["run_id"]: r for r in records if "run_id" in r and "setting" in r}
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in latest.values():
        groups[r["setting"]].append(r)
    return {k: sorted(v, key=lambda r: (r["lr"], seed_of(r))) for k, v in sorted(groups.items())}


def n_seeds(records: list[dict]) -> int:
    """The largest number of runs at one (setting, LR): 1 for a one-seed sweep."""
    counts = defaultdict(int)
    for r in by_setting(records).values():
        for x in r:
            counts[(x["setting"], x["lr"])] += 1
    return max(counts.values(), default=0)


def _fmt_sens(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def sensitivity_text(runs: list[dict], planned: list[float] | None = None) -> str:
    """One setting's LR sensitivity as reports print it: "mean ± std" over seeds, or "n/a (k
    of n LRs)" while LRs of its planned grid (``planned``, from the sweep's plan) have no
    finished or diverged run; without a plan, "n/a (1 LR)" for a single LR."""
    have = {r["lr"] for r in runs}
    if planned is not None and set(planned) - have:
        return f"n/a ({len(have & set(planned))} of {len(set(planned))} LRs)"
    if planned is None and len(have) < 2:
        return f"n/a ({len(have)} LR)"
    return _fmt_sens(*sensitivity_over_seeds(runs)[:2])


def summary_table(
    records: list[dict],
    tolerance: float = SEED_TOLERANCE,
    grid: dict[str, list[float]] | None = None,
) -> str:
    """Markdown: per setting, the final loss at each LR ('div' = diverged), LR sensitivity and
    diverged LRs. With several seeds a cell reads "mean ± std" of the counted losses, "(k/n
    div)" when k of n seeds diverged, and "†" where the seeds disagree (module docstring).

    The LR sensitivity needs the setting's whole LR grid: ``grid`` maps a setting to its
    planned LRs (the sweep's plan, ``workdir.planned_grid``); where some are missing it reads
    "n/a (k of n LRs)", and a planned setting without any run gets a row of its own."""
    groups = by_setting(records)
    for setting in grid or {}:
        groups.setdefault(setting, [])
    lrs = sorted(
        {r["lr"] for r in records if "lr" in r} | {x for g in (grid or {}).values() for x in g}
    )
    head = (
        "| setting | " + " | ".join(f"{lr:g}" for lr in lrs) + " | LR sensitivity | diverged LRs |"
    )
    rows = [head, "|" + "---|" * (len(lrs) + 3)]
    for setting, runs in sorted(groups.items()):
        at = {p.lr: p for p in lr_points(runs, tolerance)}
        cells = [_cell(at[lr]) if lr in at else "" for lr in lrs]
        diverged = ", ".join(f"{p.lr:g}" for p in at.values() if p.n_diverged) or "-"
        sens = sensitivity_text(runs, (grid or {}).get(setting))
        rows.append(f"| {setting} | " + " | ".join(cells) + f" | {sens} | {diverged} |")
    return "\n".join(rows)


def _cell(p: LRPoint) -> str:
    n = len(p.runs)
    if p.n_diverged == n:
        return "div"
    if n == 1:
        return f"{p.mean:.3f}"
    cell = f"{p.mean:.3f} ± {p.std:.3f}" if not math.isnan(p.std) else f"{p.mean:.3f}"
    if p.n_diverged:
        cell += f" ({p.n_diverged}/{n} div)"
    return cell + (" †" if p.disagree else "")


# Settings are told apart by line style and marker as well as colour (greyscale, colour-blind).
STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v"), ((0, (1, 3)), "P")]


def style(i: int) -> dict:
    """Line style and marker of the i-th setting of a figure."""
    ls, marker = STYLES[i % len(STYLES)]
    return {"linestyle": ls, "marker": marker}


def plot_lr_sensitivity(
    records: list[dict],
    path: Path | None = None,
    ax=None,
    grid: dict[str, list[float]] | None = None,
):
    """Final loss vs LR, one curve per setting (log-x): the mean counted loss over seeds with
    a ±std bar; a cross at ℓ0 (at the top edge when ℓ0 is unknown) where a seed diverged, a
    ring where the seeds disagree. The legend's LR sensitivity is n/a while a setting's
    planned grid (``grid``, as in :func:`summary_table`) is incomplete."""
    fig, ax = _axes(ax)
    rings = False
    for i, (setting, runs) in enumerate(by_setting(records).items()):
        pts = lr_points(runs)
        l0 = loss_at_init(runs)
        n = len({seed_of(r) for r in runs})
        sens = sensitivity_text(runs, (grid or {}).get(setting))
        label = f"{setting} (sens. {sens}{f', {n} seeds' if n > 1 else ''})"
        known = [p for p in pts if not math.isnan(p.mean)]
        line = ax.errorbar(
            [p.lr for p in known],
            [p.mean for p in known],
            yerr=[0.0 if math.isnan(p.std) else p.std for p in known],
            capsize=3,
            label=label,
            **style(i),
        )
        color = line[0].get_color()
        div = [p.lr for p in pts if p.n_diverged]
        if div:
            if l0 is None:
                ax.plot(
                    div,
                    [0.97] * len(div),
                    "x",
                    color=color,
                    ms=10,
                    transform=ax.get_xaxis_transform(),
                )
            else:
                ax.plot(div, [l0] * len(div), "x", color=color, markersize=10)
        ring = [p for p in known if p.disagree]
        if ring:
            rings = True
            ax.plot([p.lr for p in ring], [p.mean for p in ring], "o", mfc="none", mec=color, ms=14)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final eval loss (diverged = loss at init)")
    ax.set_title("LR sensitivity" + (" (ring: seeds disagree)" if rings else ""))
    _legend(ax)
    return _save(fig, path)


def plot_max_attn_logit(records: list[dict], path: Path | None = None, ax=None):
    """Final max attention logit (max over layers) vs LR, log-log: the median over seeds, with
    their min–max as a band."""
    fig, ax = _axes(ax)
    band = False
    for i, (setting, runs) in enumerate(by_setting(records).items()):
        xs, mid, lo, hi = [], [], [], []
        for p in lr_points(runs):
            vals = sorted(r["max_attn_logit"] for r in p.runs if r.get("max_attn_logit"))
            if vals:
                xs.append(p.lr)
                mid.append(statistics.median(vals))
                lo.append(vals[0])
                hi.append(vals[-1])
        if xs:
            (line,) = ax.plot(xs, mid, label=setting, **style(i))
            if any(a != b for a, b in zip(lo, hi, strict=True)):
                band = True
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("max attention logit (final)")
    ax.set_title("Attention-logit growth" + (" (median; band: min–max over seeds)" if band else ""))
    _legend(ax)
    return _save(fig, path)


def min_over_layers(rec: dict, name: str) -> float | None:
    vals = [v for k, v in rec.items() if k.startswith(f"{name}/layer_") and v is not None]
    return min(vals) if vals else None


def max_over_layers(rec: dict, name: str) -> float | None:
    vals = [v for k, v in rec.items() if k.startswith(f"{name}/layer_") and v is not None]
    return max(vals) if vals else None


def plot_entropy_over_training(
    records: list[dict], histories: dict[str, list[dict]], path=None, n_lrs: int = 3, ax=None
):
    """Min attention entropy (min over layers and heads) vs step, for up to ``n_lrs`` LRs per
    setting (the largest ones: where collapse happens). A setting has one colour; its LRs
    differ by line style and marker; the seeds of an LR share both. ``histories``: each run's
    metric records, by run_id."""
    fig, ax = _axes(ax)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (setting, runs) in enumerate(by_setting(records).items()):
        color = colors[k % len(colors)]
        for j, p in enumerate(lr_points(runs)[-n_lrs:]):
            n = len(p.runs)
            for m, r in enumerate(p.runs):
                hist = histories.get(r["run_id"], [])
                pts = [(h["step"], min_over_layers(h, "attn/entropy_min")) for h in hist]
                pts = [(s, v) for s, v in pts if v is not None]
                if not pts:
                    continue
                label = (
                    None if m else f"{setting}, lr={p.lr:g}" + (f" ({n} seeds)" if n > 1 else "")
                )
                ax.plot(
                    *zip(*pts, strict=True),
                    color=color,
                    label=label,
                    markevery=max(1, len(pts) // 8),
                    **style(j),
                )
    ax.set_xlabel("step")
    ax.set_ylabel("min attention entropy (nats; min over layers and heads)")
    ax.set_title("Attention entropy over training")
    _legend(ax)
    return _save(fig, path)


def plot_run(history: list[dict], title: str = "", path=None):
    """One run against steps, four panels: train and eval loss; max attention logit (max over
    layers and heads, log scale); min attention entropy (min over layers and heads); mean
    log Z of the output logits."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        (
            axes[0, 0],
            [("train/loss", "train loss"), ("eval/loss", "eval loss")],
            "loss (nats)",
            False,
        ),
        (axes[0, 1], [("attn/max_logit", "max attention logit")], "max attention logit", True),
        (axes[1, 0], [("attn/entropy_min", "min attention entropy")], "entropy (nats)", False),
        (axes[1, 1], [("logits/log_z_mean", "mean log Z")], "log Z", False),
    ]
    for ax, keys, ylabel, logy in panels:
        for j, (key, label) in enumerate(keys):
            if key.startswith("attn/"):
                reduce = max_over_layers if "max" in key else min_over_layers
                pts = [(h["step"], reduce(h, key)) for h in history]
            else:
                pts = [(h["step"], h.get(key)) for h in history]
            pts = [(s, v) for s, v in pts if isinstance(v, (int, float)) and math.isfinite(v)]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    label=label,
                    markevery=max(1, len(pts) // 8),
                    **style(j),
                )
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _axes(ax):
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
        return fig, ax
    return ax.figure, ax


def _wrap(label: str, width: int = 36) -> str:
    """A long ``k=v,k=v`` label broken after commas into lines of about ``width`` characters."""
    lines = [""]
    for part in label.split(","):
        if lines[-1] and len(lines[-1]) + len(part) + 1 > width:
            lines[-1] += ","
            lines.append(part)
        else:
            lines[-1] += ("," if lines[-1] else "") + part
    return "\n".join(lines)


def _legend(ax, fontsize: int = 7) -> None:
    """A legend beside the axes (never over the curves), long labels wrapped, if anything is
    labelled."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(
            handles,
            [_wrap(lab) for lab in labels],
            fontsize=fontsize,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            borderaxespad=0,
        )


def _save(fig, path):
    if path is not None:
        save_png(fig, path, bbox_inches="tight")
    return fig


def save_png(fig, path, dpi: int = 110, **kwargs) -> None:
    """Write ``fig`` as PNG to ``path`` (local or gs://, through epath) and close it."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **kwargs)
    W.path(path).write_bytes(buf.getvalue())
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Generic curves (the notebook).


def plot_curves(
    curves: dict[str, tuple],
    ax=None,
    *,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
    logx: bool = False,
    logy: bool = False,
    marker: str | None = None,
    hline: float | None = None,
    legend: bool = True,
    path: Path | None = None,
):
    """One line per entry of ``curves`` ({legend label: (xs, ys)}); ``hline`` draws a dotted
    reference level (e.g. 1 for gradient RMS = Adam's ε); the legend sits beside the axes."""
    fig, ax = _axes(ax)
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker=marker, markersize=4, label=label)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle=":", linewidth=1)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if legend:
        _legend(ax)
    return _save(fig, path)


def _label_key(label: str) -> tuple:
    """Legend order: "lr=0.01" < "lr=0.1" < "lr=1" (numeric values), else alphabetical."""
    name, _, value = label.partition("=")
    try:
        return (name, float(value), "")
    except ValueError:
        return (name, math.inf, label)


def plot_panels(
    panels: dict[str, dict[str, tuple]],
    *,
    suptitle: str = "",
    ylabel: str = "",
    ncols: int = 3,
    path: Path | None = None,
    **curve_kwargs,
):
    """``plot_curves`` side by side, one panel per entry of ``panels`` ({panel title: curves},
    e.g. one per setting), sharing the y axis; at most ``ncols`` panels per row. A label keeps
    its colour across panels, and one legend for all sits right of the panels."""
    if not panels:
        raise ValueError("plot_panels needs at least one panel")
    n = len(panels)
    cols, rows = min(n, ncols), math.ceil(n / ncols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(4.5 * cols, 3.4 * rows),
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    labels = sorted(
        dict.fromkeys(label for curves in panels.values() for label in curves), key=_label_key
    )
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {label: cycle[i % len(cycle)] for i, label in enumerate(labels)}
    handles = {}
    for i, (title, curves) in enumerate(panels.items()):
        ax = axes.flat[i]
        ax.set_prop_cycle(color=[colors[label] for label in curves] or cycle)
        plot_curves(
            curves,
            ax,
            title=title,
            ylabel=ylabel if i % cols == 0 else "",
            legend=False,
            **curve_kwargs,
        )
        handles.update(
            {line.get_label(): line for line in ax.get_lines() if line.get_label() in colors}
        )
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if handles:
        fig.legend(
            [handles[label] for label in labels if label in handles],
            [label for label in labels if label in handles],
            loc="outside right upper",
            fontsize=7,
        )
    if suptitle:
        fig.suptitle(suptitle)
    return _save(fig, path)
