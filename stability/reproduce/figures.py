"""One figure per finding of ``stability reproduce`` (two panels, one above the other)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from stability import plots
from stability.reproduce.presets import Preset
from stability.reproduce.rows import sensitivity, where
from stability.reproduce.rules import LOGIT_THRESHOLD


def _curves(rows: list[dict], label, x: str, y) -> dict[str, tuple]:
    """{label: (xs, the seeds' mean of y at each x)}; ``y`` is a key or a function of a row."""
    get = y if callable(y) else (lambda r: r[y])
    out: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if (v := get(r)) is not None:
            out[label(r)][r[x]].append(v)
    return {
        lab: (sorted(at), [float(np.mean(at[k])) for k in sorted(at)])
        for lab, at in sorted(out.items())
    }


def draw(name: str, rows: dict[str, list[dict]], p: Preset, path) -> None:
    import matplotlib.pyplot as plt

    s = rows.get("sizes", [])
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 8))
    large, small = p.sizes[-1][0], p.sizes[0][0]
    lr_kw = dict(xlabel="learning rate", logx=True, marker="o")
    if name == "qk_sensitivity":
        plots.plot_lr_sensitivity(where(s, d_model=large), ax=a)
        for qk in (False, True):
            xs, ys, lo, hi = [], [], [], []
            for d, _, _ in p.sizes:
                rs = where(s, d_model=d, qk_norm=qk)
                vals = [v for v in sensitivity(rs, p.lrs)["total"].values() if v is not None]
                if vals:
                    xs.append(rs[0]["params"])
                    ys.append(float(np.mean(vals)))
                    lo.append(min(vals))
                    hi.append(max(vals))
            if xs:
                b.errorbar(
                    xs,
                    ys,
                    yerr=[np.subtract(ys, lo), np.subtract(hi, ys)],
                    capsize=3,
                    label=f"qk-LN {'on' if qk else 'off'} (bars: seeds' range)",
                    **plots.style(int(qk)),
                )
        b.set_xscale("log")
        b.set_xlabel("non-embedding parameters")
        b.set_ylabel("LR sensitivity (nats)")
        b.set_title("LR sensitivity vs size", fontsize=10)
        if b.get_legend_handles_labels()[0]:
            b.legend(fontsize=7)
    elif name == "logit_growth":
        lab = lambda r: f"d={r['d_model']}, qk-LN {'on' if r['qk_norm'] else 'off'}"  # noqa: E731
        plots.plot_curves(
            _curves(s, lab, "lr", "peak_logit0"),
            a,
            ylabel="peak max logit, layer 0",
            logy=True,
            hline=LOGIT_THRESHOLD,
            title="Attention logit growth",
            **lr_kw,
        )
        plots.plot_curves(
            _curves(s, lab, "lr", "final_entropy"),
            b,
            ylabel="final min attention entropy (nats)",
            title="Attention entropy",
            **lr_kw,
        )
    elif name == "z_loss":
        z = rows.get("z_loss", [])
        lab = lambda r: f"lr={r['lr']:g}, z-loss {r['z_loss']:g}"  # noqa: E731
        trace = lambda key: {  # noqa: E731
            label: (xs, ys)
            for label, (xs, ys) in _curves(
                [{**r, "step": st, "v": v} for r in z for st, v in r[key]], lab, "step", "v"
            ).items()
        }
        plots.plot_curves(
            trace("mean_logit_trace"),
            a,
            ylabel="mean output logit",
            title="Output-logit drift (seeds' mean)",
            xlabel="step",
        )
        plots.plot_curves(
            trace("log_z_trace"),
            b,
            ylabel="mean log Z",
            xlabel="step",
            hline=0.0,
            title="log Z (z-loss pulls it toward 0)",
        )
    elif name == "warmup":
        w = rows.get("warmup", [])
        both = [
            {**r, "setting": f"d={r['d_model']}, warm-up {p.warmup:.0%}"}
            for r in where(s, qk_norm=True)
            if r["d_model"] in (small, large)
        ]
        both += [{**r, "setting": f"d={r['d_model']}, warm-up {p.long_warmup:.0%}"} for r in w]
        plots.plot_lr_sensitivity([r for r in both if r["d_model"] == large], ax=a)
        plots.plot_lr_sensitivity([r for r in both if r["d_model"] == small], ax=b)
    elif name == "weight_decay":
        arms = [
            {**r, "setting": "independent, λ=1e-4"} for r in where(s, d_model=large, qk_norm=True)
        ]
        arms += [{**r, "setting": "coupled, λ=0.1"} for r in rows.get("weight_decay", [])]
        plots.plot_lr_sensitivity(arms, ax=a)
        lab = lambda r: r["setting"]  # noqa: E731
        plots.plot_curves(
            _curves(arms, lab, "lr", "param_rms"),
            b,
            ylabel="final mean kernel RMS",
            logy=True,
            title="What the decay did to the weights",
            **lr_kw,
        )
    elif name == "mup":
        m = rows.get("mup", [])
        named = [
            {
                **r,
                "setting": f"{r['parametrization']}, d={r['d_model']}, qk-LN "
                f"{'on' if r['qk_norm'] else 'off'}",
            }
            for r in m
        ]
        plots.plot_lr_sensitivity([r for r in named if r["qk_norm"]], ax=a)
        plots.plot_lr_sensitivity(
            [
                r
                for r in named
                if r["d_model"] == p.mup_widths[-1] and r["parametrization"] != "standard"
            ],
            ax=b,
        )
    elif name == "eps":
        lab = lambda r: f"lr={r['lr']:g}"  # noqa: E731
        plots.plot_curves(
            _curves(where(s, qk_norm=True), lab, "params", "fc1_grad_rms"),
            a,
            xlabel="non-embedding parameters",
            ylabel="fc1 gradient RMS (last steps)",
            logx=True,
            logy=True,
            marker="o",
            hline=1e-8,
            title="Gradient RMS of block 0's first MLP layer (qk-LN; dotted: ε=1e-8)",
        )
        e = rows.get("eps", []) + where(s, d_model=large, qk_norm=True)
        e = [r for r in e if r["lr"] in p.eps_lrs]
        loss = lambda r: r["final_loss"] if not r["diverged"] else r["loss_at_init"]  # noqa: E731
        plots.plot_curves(
            _curves(e, lab, "eps", loss),
            b,
            xlabel="Adam's ε",
            ylabel="final loss (diverged: at init)",
            logx=True,
            marker="o",
            title=f"d={large}: final loss vs ε (seeds' mean)",
        )
    fig.tight_layout()
    plots.save_png(fig, path, dpi=100)
