"""LR-sensitivity analysis and the figures shared by ``stability report`` and the notebook.

LR sensitivity (Wortsman et al. 2023): E_{η∈grid}[min(ℓ(η), ℓ0) − ℓ*], with ℓ* the best final
loss over the grid and ℓ0 the loss at initialisation; a diverged or non-finite run counts as ℓ0.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from stability.tracking import read_jsonl  # noqa: E402


def _loss_or_none(r: dict) -> float | None:
    v = r.get("final_loss")
    if r.get("diverged") or v is None or not math.isfinite(v):
        return None
    return float(v)


def lr_sensitivity(records: list[dict]) -> float:
    """The paper's LR sensitivity of one setting's runs (one record per LR)."""
    if not records:
        raise ValueError("lr_sensitivity needs at least one run")
    l0 = float(sorted(r["loss_at_init"] for r in records)[len(records) // 2])
    losses = [_loss_or_none(r) for r in records]
    finite = [v for v in losses if v is not None]
    best = min(finite) if finite else l0
    best = min(best, l0)
    return sum(min(l0 if v is None else v, l0) - best for v in losses) / len(losses)


def by_setting(records: list[dict]) -> dict[str, list[dict]]:
    """Records grouped by setting, each group sorted by LR (latest record per run_id wins)."""
    latest = {r["run_id"]: r for r in records if "run_id" in r and "setting" in r}
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in latest.values():
        groups[r["setting"]].append(r)
    return {k: sorted(v, key=lambda r: r["lr"]) for k, v in sorted(groups.items())}


def summary_table(records: list[dict]) -> str:
    """Markdown: per setting, final loss at each LR ('div' = diverged), LR sensitivity."""
    groups = by_setting(records)
    lrs = sorted({r["lr"] for r in records if "lr" in r})
    head = (
        "| setting | " + " | ".join(f"{lr:g}" for lr in lrs) + " | LR sensitivity | diverged LRs |"
    )
    sep = "|" + "---|" * (len(lrs) + 3)
    rows = [head, sep]
    for setting, runs in groups.items():
        at = {r["lr"]: r for r in runs}
        cells = []
        for lr in lrs:
            r = at.get(lr)
            v = None if r is None else _loss_or_none(r)
            cells.append("" if r is None else ("div" if v is None else f"{v:.3f}"))
        diverged = ", ".join(f"{r['lr']:g}" for r in runs if r.get("diverged")) or "-"
        rows.append(
            f"| {setting} | " + " | ".join(cells) + f" | {lr_sensitivity(runs):.3f} | {diverged} |"
        )
    return "\n".join(rows)


def plot_lr_sensitivity(records: list[dict], path: Path | None = None, ax=None):
    """Final loss vs LR, one curve per setting (log-x); diverged runs drawn at ℓ0 as crosses."""
    fig, ax = _axes(ax)
    for setting, runs in by_setting(records).items():
        l0 = float(sorted(r["loss_at_init"] for r in runs)[len(runs) // 2])
        xs = [r["lr"] for r in runs]
        ys = [min(_loss_or_none(r) or l0, l0) for r in runs]
        (line,) = ax.plot(xs, ys, "o-", label=f"{setting} (sens. {lr_sensitivity(runs):.2f})")
        div = [(r["lr"], l0) for r in runs if _loss_or_none(r) is None]
        if div:
            ax.plot(*zip(*div, strict=True), "x", color=line.get_color(), markersize=10)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final eval loss")
    ax.set_title("LR sensitivity")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_max_attn_logit(records: list[dict], path: Path | None = None, ax=None):
    """Final max attention logit (max over layers) vs LR, log-log."""
    fig, ax = _axes(ax)
    for setting, runs in by_setting(records).items():
        pts = [(r["lr"], r["max_attn_logit"]) for r in runs if r.get("max_attn_logit")]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=setting)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("max attention logit (final)")
    ax.set_title("Attention-logit growth")
    ax.legend(fontsize=8)
    return _save(fig, path)


def history(workdir: Path, run_id: str) -> list[dict]:
    return read_jsonl(Path(workdir) / "runs" / run_id / "metrics.jsonl")[0]


def min_over_layers(rec: dict, name: str) -> float | None:
    vals = [v for k, v in rec.items() if k.startswith(f"{name}/layer_") and v is not None]
    return min(vals) if vals else None


def max_over_layers(rec: dict, name: str) -> float | None:
    vals = [v for k, v in rec.items() if k.startswith(f"{name}/layer_") and v is not None]
    return max(vals) if vals else None


def plot_entropy_over_training(
    records: list[dict], workdir: Path, path: Path | None = None, n_lrs: int = 3, ax=None
):
    """Min attention entropy (min over layers and heads) vs step, for up to ``n_lrs`` LRs per
    setting (the largest ones: where collapse happens)."""
    fig, ax = _axes(ax)
    for setting, runs in by_setting(records).items():
        for r in runs[-n_lrs:]:
            hist = history(workdir, r["run_id"])
            pts = [(h["step"], min_over_layers(h, "attn/entropy_min")) for h in hist]
            pts = [(s, v) for s, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=f"{setting}, lr={r['lr']:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("min attention entropy (nats)")
    ax.set_title("Attention entropy over training")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _axes(ax):
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
        return fig, ax
    return ax.figure, ax


def _save(fig, path):
    if path is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def write_report(workdir: str | Path) -> Path:
    """``report.md`` plus lr_sensitivity.png, max_attn_logit.png, attn_entropy.png in workdir."""
    workdir = Path(workdir)
    records, bad = read_jsonl(workdir / "results.jsonl")
    if not records:
        raise FileNotFoundError(f"{workdir / 'results.jsonl'} holds no results")
    plot_lr_sensitivity(records, workdir / "lr_sensitivity.png")
    plot_max_attn_logit(records, workdir / "max_attn_logit.png")
    plot_entropy_over_training(records, workdir, workdir / "attn_entropy.png")
    lines = [
        f"# Sweep report: {workdir.name}",
        "",
        "Final eval loss per learning rate ('div' = diverged). LR sensitivity = mean over the",
        "grid of min(loss, loss at init) − best loss (Wortsman et al. 2023).",
        "",
        summary_table(records),
        "",
        "| setting | lr | max attn logit | min attn entropy | diverged at |",
        "|---|---|---|---|---|",
    ]
    for setting, runs in by_setting(records).items():
        for r in runs:
            ml, me = r.get("max_attn_logit"), r.get("min_attn_entropy")
            lines.append(
                f"| {setting} | {r['lr']:g} | {'' if ml is None else f'{ml:.3g}'} | "
                f"{'' if me is None else f'{me:.3f}'} | {r.get('diverged_step') or '-'} |"
            )
    lines += [
        "",
        "![LR sensitivity](lr_sensitivity.png)",
        "![max attention logit](max_attn_logit.png)",
        "![attention entropy](attn_entropy.png)",
    ]
    if bad:
        lines += ["", f"Skipped unreadable lines of results.jsonl: {bad}"]
    out = workdir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


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
    path: Path | None = None,
):
    """One line per entry of ``curves`` ({legend label: (xs, ys)}); ``hline`` draws a dotted
    reference level (e.g. 1 for gradient RMS = Adam's ε)."""
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
    if curves:
        ax.legend(fontsize=7)
    return _save(fig, path)


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
    e.g. one per setting), sharing the y axis; at most ``ncols`` panels per row."""
    if not panels:
        raise ValueError("plot_panels needs at least one panel")
    n = len(panels)
    cols, rows = min(n, ncols), math.ceil(n / ncols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.5 * cols, 3.4 * rows), sharey=True, squeeze=False
    )
    for i, (title, curves) in enumerate(panels.items()):
        ax = axes.flat[i]
        plot_curves(curves, ax, title=title, ylabel=ylabel if i % cols == 0 else "", **curve_kwargs)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return _save(fig, path)
