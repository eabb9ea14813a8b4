"""The outputs of ``stability forecast``: forecast.md (the fits, predictions, held-out check,
§3.4 and the LR trends), forecast.png and forecast.json (``forecast.forecast``'s dict)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from stability import workdir as W
from stability.forecast import MAX_DECADES, MIN_DOF
from stability.plots import plt, save_png


def _g(v: float | None, fmt: str = ".3g") -> str:
    return "–" if v is None else format(v, fmt)


def to_markdown(fc: dict[str, Any], command: str = "") -> str:
    """forecast.md: sizes, per setting and LR the fit and prediction, the held-out check,
    §3.4 and the LR trends."""
    t = fc["target_params"]
    lines = [
        "# Scaling forecast",
        "",
        *([f"Command: `{command}`", ""] if command else []),
        f"Sweeps: {', '.join(fc['dirs'])}. Step read: {fc['step']}. Target: {t:.3g} "
        f"non-embedding parameters. Threshold: max attention logit {fc['threshold']:g}.",
        "",
        "Fit: least-squares in log10(value) and log10(non-embedding parameters), per setting "
        "and LR, through the seeds' mean at each size: "
        + "; ".join(
            f"{q.replace('_', ' ')}: **{m['method']}** ({m['why']})"
            for q, m in fc["methods"].items()
        )
        + f". Uncertainty: {fc['interval']}; '–' where the fit has no residual "
        "degrees of freedom. A fit flags a crossing (yes / possibly / no) only with "
        f"at least {MIN_DOF} residual degrees of freedom and an interval of at most "
        f"{MAX_DECADES:g} decades; otherwise it says why it gives no flag. Excluded points "
        "(diverged, non-finite, not logged) are listed below and never fitted.",
        "",
        "| size | non-embedding params (per setting) |",
        "|---|---|",
        *[f"| {s['size']} | {', '.join(f'{p:,}' for p in s['params'])} |" for s in fc["sizes"]],
        "",
        "## Max attention logit (max over layers)",
        "",
        f"| setting | lr | sizes fitted | coefficients c0, c1(, c2) | predicted at {t:.3g} | 95% interval | crosses {fc['threshold']:g} |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in fc["max_attn_logit"]:
        lines.append(_fit_row(e, crosses=True))
    crossing = [
        f"{e['setting']} lr={e['lr']:g}" for e in fc["max_attn_logit"] if e.get("crosses_threshold")
    ]
    lines += ["", f"Predicted to cross {fc['threshold']:g}: {', '.join(crossing) or 'none'}."]
    if fc["holdout_largest"]:
        lines += [
            "",
            "### Held-out largest size",
            "",
            "Fit on every size but the largest, prediction at the largest vs the measured value "
            "(geometric mean over seeds); error in decades (log10 predicted − log10 measured).",
            "",
            "| setting | lr | params | predicted | 95% interval | measured | error (log10) | inside |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e in fc["max_attn_logit"]:
            h = e["holdout"]
            if "not_checked" in h:
                lines.append(
                    f"| {e['setting']} | {e['lr']:g} | {h['params']:,} | not checked: {h['not_checked']} ||||| "
                )
                continue
            iv = "–" if h["lo"] is None else f"[{h['lo']:.3g}, {h['hi']:.3g}]"
            inside = {None: "–", True: "yes", False: "no"}[h["inside_interval"]]
            lines.append(
                f"| {e['setting']} | {e['lr']:g} | {h['params']:,} | {h['predicted']:.3g} | {iv} | "
                f"{h['measured']:.3g} | {h['error_log10']:+.2f} | {inside} |"
            )
    g = fc["grad_rms_over_eps"]
    lines += ["", f"## Gradient RMS / ε of {g['param']} (§3.4)", ""]
    if not g["logged"]:
        lines.append(f"`{g['key']}` is not logged by these runs (an optimizer without ε?).")
    else:
        lines += [
            f"| setting | lr | sizes fitted | coefficients c0, c1(, c2) | predicted at {t:.3g} | 95% interval | reaches 1 at (params) |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in g["series"]:
            lines.append(_fit_row(e, crosses=False))
    lines += [
        "",
        "## Optimal LR and LR sensitivity vs size",
        "",
        "LR sensitivity as in `stability report` (Wortsman et al. 2023); optimal LR = the grid LR "
        "with the lowest final loss (geometric mean over seeds). Sizes whose LR grid is not "
        "complete (unfinished runs) are left out. Trends: least-squares slope per decade of "
        "parameters.",
        "",
        "| setting | params | LRs | LR sensitivity | optimal LR |",
        "|---|---|---|---|---|",
    ]
    for tr in fc["lr_trends"]:
        for r in tr["by_size"]:
            lines.append(
                f"| {tr['setting']} | {r['params']:,} | {r['n_lrs']} | {r['lr_sensitivity']:.3f} | {_g(r['optimal_lr'])} |"
            )
    lines += [
        "",
        "| setting | LR sensitivity slope / decade | log10 optimal LR slope / decade |",
        "|---|---|---|",
    ]
    for tr in fc["lr_trends"]:
        lines.append(
            f"| {tr['setting']} | {_g(tr['sensitivity_slope_per_decade'], '+.3f')} | "
            f"{_g(tr['log10_optimal_lr_slope_per_decade'], '+.2f')} |"
        )
    excluded = [
        (kind, e, p)
        for kind, series in (("max logit", fc["max_attn_logit"]), ("grad/ε", g["series"]))
        for e in series
        for p in e["points"]
        if p["excluded"]
    ]
    if excluded:
        lines += [
            "",
            "## Excluded points",
            "",
            "| quantity | setting | lr | size | seed | why |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {e['setting']} | {e['lr']:g} | {p['size']} | {p['seed']} | {p['excluded']} |"
            for k, e, p in excluded
        ]
    lines += ["", "![forecast](forecast.png)", ""]
    return "\n".join(lines)


def _fit_row(e: dict, crosses: bool) -> str:
    head = f"| {e['setting']} | {e['lr']:g} | {len(e['sizes_used'])} |"
    if e["fit"] is None:
        return f"{head} not fitted: {e['not_fitted']} ||||"
    p = e["prediction"]
    coef = ", ".join(f"{c:.3g}" for c in e["fit"]["coef"])
    iv = "–" if p["lo"] is None else f"[{p['lo']:.3g}, {p['hi']:.3g}]"
    if crosses:
        last = (
            f"no flag: {e['no_flag']}"
            if "no_flag" in e
            else "yes"
            if e["crosses_threshold"]
            else ("possibly (interval)" if e["interval_reaches_threshold"] else "no")
        )
    else:
        last = f"no flag: {e['no_flag']}" if "no_flag" in e else _g(e.get("reaches_one_at_params"))
    return f"{head} {coef} | {p['value']:.3g} | {iv} | {last} |"


def write_forecast(fc: dict[str, Any], out: str | Path, command: str = "") -> Path:
    """forecast.md, forecast.png and forecast.json in ``out``; returns the markdown path."""
    out = W.path(out)
    out.mkdir(parents=True, exist_ok=True)
    W.write_text(out / "forecast.json", json.dumps(fc, indent=1) + "\n")
    plot_forecast(fc, out / "forecast.png")
    md = out / "forecast.md"
    W.write_text(md, to_markdown(fc, command))
    return md


def plot_forecast(fc: dict, path: Path | None = None):
    """The figure of ``stability forecast`` (``stability.forecast.forecast``'s dict): per
    setting, measured max attention logit vs non-embedding parameters (one colour per LR),
    the fits extrapolated (dashed) to the target with the prediction interval, the
    threshold; then gradient RMS / ε (§3.4) and LR sensitivity / optimal LR vs size."""
    settings = fc["settings"]
    grad = fc["grad_rms_over_eps"]["series"]
    n = len(settings) + (1 if grad else 0) + 2
    ncols = min(n, 3)  # a grid of readable panels, three per row
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 4.2 * nrows), squeeze=False)
    axes = list(axes.flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    target = fc["target_params"]
    lrs = sorted({e["lr"] for e in fc["max_attn_logit"]})
    colour = {lr: plt.cm.viridis(i / max(len(lrs) - 1, 1)) for i, lr in enumerate(lrs)}

    markers = dict(zip(settings, "o^sDv<>p*h", strict=False))

    def draw(ax, e, target_mark: bool, label: str = ""):
        c = colour.get(e["lr"], "k")
        pts = [(p["params"], p["value"]) for p in e["points"] if p["value"] is not None]
        if pts:
            m = markers.get(e["setting"], "o")
            label = label or f"lr={e['lr']:g}"
            ax.plot(*zip(*pts, strict=True), m, color=c, markersize=4, label=label)
        bad = [p["params"] for p in e["points"] if p["value"] is None]
        if bad:
            ymin = min((v for _, v in pts), default=1.0)
            ax.plot(bad, [ymin] * len(bad), "x", color=c, markersize=6)
        if e["fit"] is None:
            return
        coef = e["fit"]["coef"]
        lo, hi = math.log10(min(e["sizes_used"])), math.log10(max(e["sizes_used"]))
        for a, b, style in ((lo, hi, "-"), (hi, max(hi, math.log10(target)), "--")):
            xs = np.linspace(a, b, 40)
            ys = sum(c * xs**k for k, c in enumerate(coef))
            ax.plot(10**xs, 10**ys, style, color=c, linewidth=1)
        p = e["prediction"]
        if target_mark and p["lo"] is not None:
            ax.errorbar(
                [target],
                [p["value"]],
                yerr=[[p["value"] - p["lo"]], [p["hi"] - p["value"]]],
                fmt="s",
                color=c,
                markersize=4,
                capsize=3,
            )
        elif target_mark:
            ax.plot([target], [p["value"]], "s", color=c, markersize=4)

    def clip(ax, series, level):
        """y range of the measurements, the predictions and ``level`` (a decade of margin):
        intervals of poorly constrained fits span tens of decades."""
        ys = [p["value"] for e in series for p in e["points"] if p["value"] is not None]
        ys += [e["prediction"]["value"] for e in series if e["prediction"]] + [level]
        ys = [y for y in ys if y > 0]
        if ys:
            ax.set_ylim(min(ys) / 10, max(ys) * 10)

    for ax, setting in zip(axes, settings, strict=False):
        series = [e for e in fc["max_attn_logit"] if e["setting"] == setting]
        for e in series:
            draw(ax, e, True)
        ax.set_yscale("log")
        clip(ax, series, fc["threshold"])
        ax.axhline(fc["threshold"], color="red", linestyle=":", linewidth=1)
        ax.axvline(target, color="gray", linestyle=":", linewidth=1)
        ax.set_title(f"max attn logit @ step {fc['step']}: {setting}", fontsize=8)
        ax.set_ylabel("max attention logit")
    if grad:
        ax = axes[len(settings)]
        for e in grad:
            draw(ax, e, True, label=f"{e['setting']}, lr={e['lr']:g}")
        ax.set_yscale("log")
        clip(ax, grad, 1.0)
        ax.axhline(1.0, color="red", linestyle=":", linewidth=1)
        ax.axvline(target, color="gray", linestyle=":", linewidth=1)
        ax.set_title(f"grad RMS / ε: {fc['grad_rms_over_eps']['param']}", fontsize=8)
        ax.set_ylabel("gradient RMS / ε")
    ax_sens, ax_opt = axes[n - 2], axes[n - 1]  # the last two panels in use
    for tr in fc["lr_trends"]:
        rows = tr["by_size"]
        ax_sens.plot(
            [r["params"] for r in rows],
            [r["lr_sensitivity"] for r in rows],
            "o-",
            label=tr["setting"],
        )
        opt = [(r["params"], r["optimal_lr"]) for r in rows if r["optimal_lr"]]
        if opt:
            ax_opt.plot(*zip(*opt, strict=True), "o-", label=tr["setting"])
    ax_sens.set_title("LR sensitivity vs size", fontsize=8)
    ax_opt.set_title("optimal LR vs size", fontsize=8)
    ax_opt.set_yscale("log")
    for ax in axes[:n]:
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters")
        if ax not in (ax_sens, ax_opt):
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    if path is not None:
        save_png(fig, path, bbox_inches="tight")
    return fig
