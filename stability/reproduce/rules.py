"""The findings of ``stability reproduce``: what each run shows, and each finding's checks,
mechanism line and verdict, exactly as ``docs/reproduce/protocol.md`` states them.

Every check reads at a size, LR and step that the protocol fixes (from the experiment's
``Preset``), never at one the data choose; its difference D is taken per seed, paired
(``stats.check``). A check marked *gated* tests the paper's explanation and counts only where
the finding's mechanism appears in the runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from stability.plots import counted_loss, loss_at_init
from stability.reproduce.presets import Preset
from stability.reproduce.rows import (
    by_seed,
    fmt,
    interval_text,
    log10,
    losses_over_grid,
    mean_of,
    one,
    optimum,
    paired,
    sensitivity,
    where,
)
from stability.reproduce.stats import check, t_interval, verdict

LOGIT_THRESHOLD = 1e4  # §3.3: "all points with attention logits above 1e4 diverged"
DRIFT_NATS = 5.0  # z-loss's mechanism: |final mean log Z| or |final mean logit| at least this
DAMAGE_NATS = 0.05  # warm-up's mechanism: the top LR ends this far above the setting's best
SHRINK = 1.5  # weight decay's mechanism: coupled decay shrinks the weights this many times
SHIFT_DECADES = 0.25  # μParam's mechanism: standard's optimal LR moves one grid step or more
NEAR_EPS = 10.0  # ε's mechanism: gradient RMS within a decade of ε (grad RMS / ε ≤ 10)


# ---------------------------------------------------------------------------------------
# The seven findings. Each returns {"checks", "mechanism_present", "mechanism", "details"}.


def finding_qk_sensitivity(rows: dict[str, list[dict]], p: Preset) -> dict:
    """§3.1.1, Figure 1. Gated by attention-logit growth: at the largest size, without
    qk-layernorm, the peak max attention logit (over layers, steps and the LR grid) reaches
    1e4 (seeds' mean of log10)."""
    s, n = rows.get("sizes", []), p.seeds
    small, large = p.sizes[0][0], p.sizes[-1][0]
    sens = {
        (d, qk): sensitivity(where(s, d_model=d, qk_norm=qk), p.lrs)
        for d in (small, large)
        for qk in (False, True)
    }
    gap = {d: paired(sens[d, False]["total"], sens[d, True]["total"]) for d in (small, large)}
    src = "§3.1.1, Figure 1"
    checks = [
        check(
            f"d={large}: LR sensitivity without − with qk-LN",
            src,
            gap[large].values(),
            "nats",
            planned=n,
            gated=True,
        ),
        check(
            f"that gap at d={large} − at d={small}",
            src,
            paired(gap[large], gap[small]).values(),
            "nats",
            planned=n,
            gated=True,
        ),
        check(
            f"with qk-LN: LR sensitivity at d={large} − at d={small}",
            src,
            paired(sens[large, True]["total"], sens[small, True]["total"]).values(),
            "nats",
            planned=n,
        ),
        check(
            f"without qk-LN: LR sensitivity at d={large} − at d={small}",
            src,
            paired(sens[large, False]["total"], sens[small, False]["total"]).values(),
            "nats",
            planned=n,
        ),
    ]
    peak = mean_of(
        by_seed(
            where(s, d_model=large, qk_norm=False),
            lambda rs: log10(max((r["peak_logit"] or 0.0 for r in rs), default=None)),
        )
    )
    return {
        "checks": checks,
        "mechanism_present": None if peak is None else peak >= math.log10(LOGIT_THRESHOLD),
        "mechanism": f"peak max attention logit without qk-LN at d={large} (over layers, steps and "
        f"LRs; seeds' geometric mean): {fmt(None if peak is None else 10**peak, '.3g')} "
        f"(appears at ≥ {LOGIT_THRESHOLD:g})",
        "details": _size_table(s, p),
    }


def _size_table(s: list[dict], p: Preset) -> list[str]:
    """Per size and arm: LR sensitivity and its parts below / above the optimum, the optimal
    LR, diverged runs; then the sign of the trend with size."""
    lines = [
        "| size | qk-LN | LR sensitivity [95% CI] | below the optimum | above the optimum | "
        "optimal LR (parabola) | diverged runs |",
        "|---|---|---|---|---|---|---|",
    ]
    trend: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for d, layers, _ in p.sizes:
        for qk in (False, True):
            rs = where(s, d_model=d, qk_norm=qk)
            if not rs:
                continue
            sn = sensitivity(rs, p.lrs)
            opt = mean_of(optimum(rs, p.lrs))
            mean = mean_of(sn["total"])
            if mean is not None:
                trend[qk].append((math.log10(rs[0]["params"]), mean))
            lines.append(
                f"| d={d}, {layers} layer{'s' if layers > 1 else ''} ({rs[0]['params']:,} params) | {'on' if qk else 'off'} | "
                f"{interval_text(sn['total'])} | {fmt(mean_of(sn['below']))} | "
                f"{fmt(mean_of(sn['above']))} | {fmt(None if opt is None else 10**opt, '.3g')} | "
                f"{sum(r['diverged'] for r in rs)} of {len(rs)} |"
            )
    lines.append("")
    for qk, pts in trend.items():
        if len(pts) >= 2:
            slope = float(np.polyfit(*zip(*pts, strict=True), 1)[0])
            direction = "rises" if slope > 0 else "falls"
            lines.append(
                f"- qk-LN {'on' if qk else 'off'}: LR sensitivity {direction} with size "
                f"({slope:+.3f} nats per decade of parameters, least squares over the seeds' "
                f"means; the paper: it rises with scale both with and without qk-LN)."
            )
    return lines


def finding_logit_growth(rows: dict[str, list[dict]], p: Preset) -> dict:
    """§3.1.1, Figure 2; §3.3 (fn. 3: block 0; "all points with attention logits above 1e4
    diverged"). Read at the largest size and the grid's highest LR: layer 0's peak max logit
    (over logged steps) without qk-LN passes 1e4 and with qk-LN stays below; the final min
    attention entropy is higher with qk-LN. Mechanism line (no gate): the growth of layer 0's
    query weights (final RMS), without ÷ with qk-LN (Figure E.1: the norms of q and k grow)."""
    s, n = rows.get("sizes", []), p.seeds
    d, lr = p.sizes[-1][0], max(p.lrs)
    off, on = where(s, d_model=d, qk_norm=False, lr=lr), where(s, d_model=d, qk_norm=True, lr=lr)
    t = math.log10(LOGIT_THRESHOLD)
    log_off = by_seed(off, lambda rs: log10(one(rs, "peak_logit0")))
    log_on = by_seed(on, lambda rs: log10(one(rs, "peak_logit0")))
    src = "§3.1.1, Figure 2; §3.3"
    checks = [
        check(
            f"d={d}, lr={lr:g}, no qk-LN: log10 peak layer-0 logit − log10 1e4",
            src,
            [None if v is None else v - t for v in log_off.values()],
            "decades",
            planned=n,
        ),
        check(
            "same LR, with qk-LN: log10 1e4 − log10 peak layer-0 logit",
            src,
            [None if v is None else t - v for v in log_on.values()],
            "decades",
            planned=n,
        ),
        check(
            "final min attention entropy with − without qk-LN (entropy collapse)",
            "§3.1.1",
            paired(
                by_seed(on, lambda rs: one(rs, "final_entropy")),
                by_seed(off, lambda rs: one(rs, "final_entropy")),
            ).values(),
            "nats",
            planned=n,
        ),
    ]
    q = paired(
        by_seed(off, lambda rs: log10(one(rs, "q_param_rms"))),
        by_seed(on, lambda rs: log10(one(rs, "q_param_rms"))),
    )
    ratio = mean_of(q)
    passed = [r for r in s if (r["peak_logit"] or 0) >= LOGIT_THRESHOLD]
    return {
        "checks": checks,
        "mechanism_present": None,
        "mechanism": f"final RMS of layer 0's query kernel at d={d}, lr={lr:g}, without ÷ with "
        f"qk-LN (seeds' geometric mean): {fmt(None if ratio is None else 10**ratio, '.3g')}×",
        "details": [
            f"Runs of the sizes sweep whose max attention logit passed 1e4 (any layer, step): "
            f"{len(passed)} of {len(s)}; of them diverged (non-finite or out-of-bound loss): "
            f"{sum(r['diverged'] for r in passed)}. The paper: every such run diverged."
        ],
    }


def _rise(evals: list[tuple[int, float]]) -> float | None:
    """Final eval loss − the lowest eval loss of the run (a late loss rise; ≥ 0)."""
    return evals[-1][1] - min(v for _, v in evals) if evals else None


def finding_z_loss(rows: dict[str, list[dict]], p: Preset) -> dict:
    """§3.1.2, Figures 3–4: without weight decay the output logits "diverge and become very
    negative … towards the end of training", and z-loss (1e-4·log²Z) prevents it. At each of
    the experiment's LRs: z-loss keeps |mean log Z| lower, keeps the mean output logit
    higher, and the late rise of the eval loss (final − lowest) smaller. Gated by the drift:
    without z-loss, at the first LR, |final mean log Z| or |final mean output logit| reaches
    5 nats (seeds' mean)."""
    z, n = rows.get("z_loss", []), p.seeds
    src = "§3.1.2, Figures 3–4"
    checks = []
    for lr in p.z_lrs:
        off, on = where(z, lr=lr, z_loss=0.0), where(z, lr=lr, z_loss=1e-4)
        get = lambda rs, f: by_seed(rs, lambda x: f(one(x, "log_z"), one(x, "mean_logit"), x))  # noqa: E731
        abs_z = lambda a, b, x: None if a is None else abs(a)  # noqa: E731
        mean_l = lambda a, b, x: b  # noqa: E731
        rise = lambda a, b, x: _rise(x[0]["evals"]) if len(x) == 1 else None  # noqa: E731
        checks += [
            check(
                f"lr={lr:g}: |final mean log Z| without − with z-loss",
                src,
                paired(get(off, abs_z), get(on, abs_z)).values(),
                "nats",
                planned=n,
                gated=True,
            ),
            check(
                f"lr={lr:g}: final mean output logit with − without z-loss",
                src,
                paired(get(on, mean_l), get(off, mean_l)).values(),
                "nats",
                planned=n,
                gated=True,
            ),
            check(
                f"lr={lr:g}: late eval-loss rise (final − lowest) without − with z-loss",
                src,
                paired(get(off, rise), get(on, rise)).values(),
                "nats",
                planned=n,
                gated=True,
            ),
        ]
    base = where(z, lr=p.z_lrs[0], z_loss=0.0)
    drift = mean_of(
        by_seed(
            base,
            lambda x: max(
                (abs(v) for v in (one(x, "log_z"), one(x, "mean_logit")) if v is not None),
                default=None,
            ),
        )
    )
    details = [
        "| lr | z-loss | final mean log Z | final mean output logit | lowest eval loss | "
        "final eval loss |",
        "|---|---|---|---|---|---|",
    ]
    for lr in p.z_lrs:
        for zl in (0.0, 1e-4):
            rs = where(z, lr=lr, z_loss=zl)
            col = lambda f, rs=rs: interval_text(
                by_seed(rs, lambda x: f(x[0]) if len(x) == 1 else None)
            )  # noqa: E731
            details.append(
                f"| {lr:g} | {zl:g} | {col(lambda r: r['log_z'])} | {col(lambda r: r['mean_logit'])} | "
                f"{col(lambda r: min((v for _, v in r['evals']), default=None))} | "
                f"{col(lambda r: r['evals'][-1][1] if r['evals'] else None)} |"
            )
    return {
        "checks": checks,
        "mechanism_present": None if drift is None else drift >= DRIFT_NATS,
        "mechanism": f"without z-loss at lr={p.z_lrs[0]:g}, the larger of |final mean log Z| and "
        f"|final mean output logit| (seeds' mean): {fmt(drift, '.2f')} nats (a drift: ≥ "
        f"{DRIFT_NATS:g})",
        "details": details,
    }


def finding_warmup(rows: dict[str, list[dict]], p: Preset) -> dict:
    """§3.2.1, Figure 5 (qk-layernorm on): a longer warm-up lowers LR sensitivity, most for
    the larger models. The short warm-up is the paper's default (the sizes sweep's qk-LN
    runs); checks at the largest size and its growth from the smallest. Gated by damage at
    the top LR: at the largest size with the short warm-up, the grid's highest LR ends
    ≥ 0.05 nats above the setting's best final loss (seeds' mean)."""
    s, w, n = rows.get("sizes", []), rows.get("warmup", []), p.seeds
    small, large = p.sizes[0][0], p.sizes[-1][0]
    gap = {}
    for d in (small, large):
        short = sensitivity(where(s, d_model=d, qk_norm=True), p.lrs)["total"]
        long = sensitivity(where(w, d_model=d), p.lrs)["total"]
        gap[d] = paired(short, long)
    src = "§3.2.1, Figure 5"
    checks = [
        check(
            f"d={large}: LR sensitivity short − long warm-up",
            src,
            gap[large].values(),
            "nats",
            planned=n,
            gated=True,
        ),
        check(
            f"that gap at d={large} − at d={small}",
            src,
            paired(gap[large], gap[small]).values(),
            "nats",
            planned=n,
            gated=True,
        ),
    ]
    rs = where(s, d_model=large, qk_norm=True)
    l0 = loss_at_init(rs)

    def damage(x):
        at = {r["lr"]: counted_loss(r, l0) for r in x}
        top = at.get(max(p.lrs))
        known = [v for v in at.values() if v is not None]
        return None if top is None or not known else top - min(known)

    dmg = mean_of(by_seed(rs, damage))
    details = ["| size | warm-up | LR sensitivity [95% CI] |", "|---|---|---|"]
    for d in (small, large):
        details.append(
            f"| d={d} | {p.warmup:.0%} | "
            f"{interval_text(sensitivity(where(s, d_model=d, qk_norm=True), p.lrs)['total'])} |"
        )
        details.append(
            f"| d={d} | {p.long_warmup:.0%} | "
            f"{interval_text(sensitivity(where(w, d_model=d), p.lrs)['total'])} |"
        )
    return {
        "checks": checks,
        "mechanism_present": None if dmg is None else dmg >= DAMAGE_NATS,
        "mechanism": f"d={large}, warm-up {p.warmup:.0%}: final loss at lr={max(p.lrs):g} − the "
        f"best over the grid (seeds' mean): {fmt(dmg)} nats (damage: ≥ {DAMAGE_NATS:g})",
        "details": details,
    }


def finding_weight_decay(rows: dict[str, list[dict]], p: Preset) -> dict:
    """§3.2.2, Figure 6 (qk-layernorm on): independent decay (λ = 1e-4) gives a lower LR
    sensitivity than coupled AdamW decay (λ = 0.1), whose sensitivity is the lower of the two
    ranges [1e-4, 1e-1] and [3e-4, 3e-1] (the paper's). Gated by the decay acting: at the
    highest LR, the final mean kernel RMS with independent decay ÷ with coupled decay is
    ≥ 1.5 (coupled decay, η·λ per step, shrinks the weights)."""
    s, c, n = rows.get("sizes", []), rows.get("weight_decay", []), p.seeds
    d = p.sizes[-1][0]
    ind_rows = where(s, d_model=d, qk_norm=True)
    ranges = (p.coupled_lrs[:-1], p.coupled_lrs[1:])
    ind = sensitivity(ind_rows, p.lrs)["total"]
    per_range = [sensitivity(c, r)["total"] for r in ranges]
    coupled = {
        seed: None
        if any(pr.get(seed) is None for pr in per_range)
        else min(pr[seed] for pr in per_range)
        for seed in per_range[0]
    }
    checks = [
        check(
            "LR sensitivity coupled (better range) − independent",
            "§3.2.2, Figure 6",
            paired(coupled, ind).values(),
            "nats",
            planned=n,
            gated=True,
        )
    ]
    top = max(p.lrs)
    shrink = mean_of(
        paired(
            by_seed(where(ind_rows, lr=top), lambda x: log10(one(x, "param_rms"))),
            by_seed(where(c, lr=top), lambda x: log10(one(x, "param_rms"))),
        )
    )

    def loss_stats(rs, grid):
        l0 = loss_at_init(rs)
        curve = lambda x: losses_over_grid(x, grid, l0)  # noqa: E731
        mean = by_seed(rs, lambda x: None if (v := curve(x)) is None else float(np.mean(v)))
        best = by_seed(rs, lambda x: None if (v := curve(x)) is None else min(v))
        return interval_text(mean), interval_text(best)

    details = [
        "| arm | LR range | LR sensitivity [95% CI] | mean loss over the range | best loss |",
        "|---|---|---|---|---|",
    ]
    details.append(
        f"| independent, λ=1e-4 | {p.lrs[0]:g}–{p.lrs[-1]:g} | {interval_text(ind)} | "
        + " | ".join(loss_stats(ind_rows, p.lrs))
        + " |"
    )
    for r, sens in zip(ranges, per_range, strict=True):
        details.append(
            f"| coupled, λ=0.1 | {r[0]:g}–{r[-1]:g} | {interval_text(sens)} | "
            + " | ".join(loss_stats(c, r))
            + " |"
        )
    return {
        "checks": checks,
        "mechanism_present": None if shrink is None else shrink >= math.log10(SHRINK),
        "mechanism": f"d={d}, lr={top:g}: final mean kernel RMS, independent ÷ coupled decay "
        f"(seeds' geometric mean): {fmt(None if shrink is None else 10**shrink, '.3g')}× "
        f"(acting: ≥ {SHRINK:g})",
        "details": details,
    }


def finding_mup(rows: dict[str, list[dict]], p: Preset) -> dict:
    """§3.2.4, Figures 8 and E.4: μParam (simple) keeps the optimal LR stable across widths
    (qk-layernorm on), and it does not replace qk-layernorm: at the largest width μParam
    without qk-LN has the higher LR sensitivity. The optimal LR of a seed is the parabola's
    vertex (``optimum``); at the base width μParam is the standard parametrization. Gated by
    standard's optimal LR moving by ≥ 0.25 decades (one grid step) across the widths."""
    m, n = rows.get("mup", []), p.seeds
    w0, w1 = p.mup_widths[0], p.mup_widths[-1]
    base = optimum(where(m, d_model=w0, parametrization="standard"), p.mup_lrs)
    std = optimum(where(m, d_model=w1, parametrization="standard"), p.mup_lrs)
    mup = optimum(where(m, d_model=w1, parametrization="mup_simple", qk_norm=True), p.mup_lrs)
    shift_std = paired(std, base, lambda a, b: abs(a - b))
    shift_mup = paired(mup, base, lambda a, b: abs(a - b))
    src = "§3.2.4, Figures 8, E.4"
    sens = {
        qk: sensitivity(where(m, d_model=w1, parametrization="mup_simple", qk_norm=qk), p.mup_lrs)[
            "total"
        ]
        for qk in (False, True)
    }
    checks = [
        check(
            f"|optimal-LR shift| d={w0}→{w1}: standard − μParam (decades)",
            src,
            paired(shift_std, shift_mup).values(),
            "decades",
            planned=n,
            gated=True,
        ),
        check(
            f"d={w1}: μParam's LR sensitivity without − with qk-LN",
            src,
            paired(sens[False], sens[True]).values(),
            "nats",
            planned=n,
        ),
    ]
    moved = mean_of(shift_std)
    std_sens = sensitivity(where(m, d_model=w1, parametrization="standard"), p.mup_lrs)["total"]
    l0 = loss_at_init(where(m, d_model=w1))
    best = lambda rs: by_seed(
        rs, lambda x: None if (v := losses_over_grid(x, p.mup_lrs, l0)) is None else min(v)
    )  # noqa: E731
    details = [
        "| setting | optimal LR (seeds' geometric mean) [95% CI] | LR sensitivity [95% CI] |",
        "|---|---|---|",
    ]
    for label, opt, rs in (
        (f"standard, d={w0}", base, where(m, d_model=w0)),
        (f"standard, d={w1}", std, where(m, d_model=w1, parametrization="standard")),
        (f"μParam, d={w1}", mup, where(m, d_model=w1, parametrization="mup_simple", qk_norm=True)),
    ):
        iv = t_interval(opt.values())
        ci = (
            "–"
            if iv["mean"] is None
            else (
                f"{10 ** iv['mean']:.3g}"
                + ("" if iv["lo"] is None else f" [{10 ** iv['lo']:.3g}, {10 ** iv['hi']:.3g}]")
            )
        )
        details.append(f"| {label} | {ci} | {interval_text(sensitivity(rs, p.mup_lrs)['total'])} |")
    details += [
        "",
        "The paper's other claims here are of no difference (\"μParam does not improve loss or "
        'reduce LR sensitivity"); an interval that contains 0 is consistent with them, and no '
        "verdict is drawn from them. At d={w1}, μParam − standard: best loss "
        f"{interval_text(paired(best(where(m, d_model=w1, parametrization='mup_simple', qk_norm=True)), best(where(m, d_model=w1, parametrization='standard'))))}"
        f" nats, LR sensitivity {interval_text(paired(sens[True], std_sens))} nats.".replace(
            "{w1}", str(w1)
        ),
    ]
    return {
        "checks": checks,
        "mechanism_present": None if moved is None else moved >= SHIFT_DECADES,
        "mechanism": f"standard parametrization's |optimal-LR shift| d={w0}→{w1} (seeds' mean): "
        f"{fmt(moved, '.2f')} decades (measurable: ≥ {SHIFT_DECADES:g})",
        "details": details,
    }


def finding_eps(rows: dict[str, list[dict]], p: Preset) -> dict:
    """§3.4, Figures 11–13: gradient RMS of block 0's first MLP layer (averaged over the last
    logged steps) falls with size and with LR; when it nears Adam's ε the update shrinks, and
    then a smaller ε (1e-15) lowers the loss and a larger one (1e-6) raises it (at the
    largest size and LR 0.3). The ε checks are gated: gradient RMS / ε ≤ 10 at ε = 1e-8 (the
    sizes sweep's), the largest size, qk-LN on, the ε experiment's highest LR."""
    s, e, n = rows.get("sizes", []), rows.get("eps", []), p.seeds
    small, large = p.sizes[0][0], p.sizes[-1][0]

    def falls_with_size(rs):
        diffs = [
            a - b
            for lr in p.lrs
            for qk in (False, True)
            if (a := log10(one(where(rs, d_model=small, lr=lr, qk_norm=qk), "fc1_grad_rms")))
            is not None
            and (b := log10(one(where(rs, d_model=large, lr=lr, qk_norm=qk), "fc1_grad_rms")))
            is not None
        ]
        return float(np.median(diffs)) if diffs else None

    lo_lr, hi_lr = min(p.lrs), max(p.lrs)

    def falls_with_lr(rs):
        at = {r["lr"]: r for r in where(rs, d_model=large, qk_norm=True) if not r["diverged"]}
        if lo_lr not in at or hi_lr not in at:
            return None
        a, b = log10(at[lo_lr]["fc1_grad_rms"]), log10(at[hi_lr]["fc1_grad_rms"])
        return None if a is None or b is None else a - b

    lr = max(p.eps_lrs)
    default = where(s, d_model=large, qk_norm=True, lr=lr)
    loss = lambda rs: by_seed(
        rs, lambda x: counted_loss(x[0], x[0]["loss_at_init"]) if len(x) == 1 else None
    )  # noqa: E731
    small_eps, large_eps = min(p.eps_values), max(p.eps_values)
    src = "§3.4, Figures 11–13"
    checks = [
        check(
            f"median over LRs and qk of log10 fc1 grad RMS at d={small} − at d={large}",
            src,
            by_seed(s, falls_with_size).values(),
            "decades",
            planned=n,
        ),
        check(
            f"d={large}, qk-LN: log10 fc1 grad RMS at lr={lo_lr:g} − at lr={hi_lr:g}",
            src,
            by_seed(s, falls_with_lr).values(),
            "decades",
            planned=n,
        ),
        check(
            f"d={large}, lr={lr:g}: final loss ε=1e-8 − ε={small_eps:g}",
            "§3.4, Figure 12",
            paired(loss(default), loss(where(e, eps=small_eps, lr=lr))).values(),
            "nats",
            planned=n,
            gated=True,
        ),
        check(
            f"d={large}, lr={lr:g}: final loss ε={large_eps:g} − ε=1e-8",
            "§3.4, Figure E.15",
            paired(loss(where(e, eps=large_eps, lr=lr)), loss(default)).values(),
            "nats",
            planned=n,
            gated=True,
        ),
    ]
    ratio = mean_of(by_seed(default, lambda x: log10(one(x, "fc1_grad_over_eps"))))
    details = _eps_extrapolation(s, p, large, lr)
    return {
        "checks": checks,
        "mechanism_present": None if ratio is None else ratio <= math.log10(NEAR_EPS),
        "mechanism": f"d={large}, lr={lr:g}, qk-LN, ε=1e-8: fc1 grad RMS / ε over the last logged "
        f"steps (seeds' geometric mean): {fmt(None if ratio is None else 10**ratio, '.3g')} "
        f"(near ε: ≤ {NEAR_EPS:g})",
        "details": details,
    }


def _eps_extrapolation(s: list[dict], p: Preset, large: int, lr: float) -> list[str]:
    """Where the gradient RMS of the sizes family would reach 10·ε (a line in log size through
    the seeds' means, qk-LN, the given LR), and what a step of such a model would cost here
    (the largest size's measured seconds per step, scaled by the parameter ratio)."""
    pts = []
    for d, _, _ in p.sizes:
        rs = where(s, d_model=d, qk_norm=True, lr=lr)
        v = mean_of(by_seed(rs, lambda x: log10(one(x, "fc1_grad_rms"))))
        if v is not None:
            pts.append((math.log10(rs[0]["params"]), v))
    if len(pts) < 2:
        return []
    slope, icept = np.polyfit(*zip(*pts, strict=True), 1)
    target = math.log10(NEAR_EPS * 1e-8)
    rs = where(s, d_model=large, qk_norm=True, lr=lr)
    per_step = [r["wall_seconds"] / r["steps"] for r in rs if r["wall_seconds"]]
    if slope >= 0:
        return [
            f"The fc1 gradient RMS does not fall with size here (slope {slope:+.3f} decades per "
            "decade of parameters at this LR): no size is predicted to bring it near ε."
        ]
    params = 10 ** ((target - icept) / slope)
    cost = (np.median(per_step) * params / rs[0]["params"]) if per_step and rs else None
    return [
        f"A line through the seeds' mean log10 fc1 gradient RMS at lr={lr:g} (qk-LN) falls "
        f"{slope:+.3f} decades per decade of parameters: it reaches 10·ε = 1e-7 at about "
        f"{params:.3g} non-embedding parameters (an extrapolation far past the data). "
        + (
            ""
            if cost is None
            else f"A step of such a model here would take about {cost:.3g} s (the largest size's measured "
            "time per step in its vmapped program, scaled by the parameter ratio), "
            f"{cost * p.steps / 3600:.3g} h for {p.steps} steps."
        )
    ]


FINDINGS: tuple[tuple[str, str, str, tuple[str, ...], Callable], ...] = (
    (
        "qk_sensitivity",
        "qk-layernorm lowers LR sensitivity, more so as models grow; LR sensitivity rises with scale "
        "both with and without it.",
        '"Without qk-layernorm, the learning rate at which models diverge becomes smaller with '
        "increasing model size. By contrast, models with qk-layernorm exhibit considerably lower LR "
        "sensitivity and train to low loss at high learning rates. [...] Both with and without "
        'qk-layernorm, LR sensitivity increases with scale." (§3.1.1)',
        ("sizes",),
        finding_qk_sensitivity,
    ),
    (
        "logit_growth",
        "Without qk-layernorm the max attention logit passes 1e4 at high LR and attention collapses.",
        '"the attention logits z became large [...] As a result, the attention weights collapse to '
        'one-hot vectors" (§3.1.1); "all points with attention logits above 1e4 diverged" (§3.3)',
        ("sizes",),
        finding_logit_growth,
    ),
    (
        "z_loss",
        "Without weight decay the output logits drift very negative late in training; z-loss "
        "prevents it.",
        '"This instability occurs when the logits diverge and become very negative [...] this '
        "divergence occurs towards the end of training. [...] instability related to output logit "
        "divergence occurs in models with no weight decay regardless of scale, and z-loss resolves "
        'this instability." (§3.1.2)',
        ("z_loss",),
        finding_z_loss,
    ),
    (
        "warmup",
        "A longer warm-up lowers LR sensitivity, most for the larger models.",
        '"a longer warm-up period reduces LR sensitivity. This is most clear for the larger models, '
        'which are not stable at LR 3e-1 without long warm-up." (§3.2.1)',
        ("sizes", "warmup"),
        finding_warmup,
    ),
    (
        "weight_decay",
        "Independent weight decay gives a lower LR sensitivity than coupled (AdamW) decay.",
        '"Parameterizing weight decay independently of learning rate reduces LR sensitivity" '
        "(§3.2.2)",
        ("sizes", "weight_decay"),
        finding_weight_decay,
    ),
    (
        "mup",
        "μParam keeps the optimal LR stable across widths but does not replace qk-layernorm.",
        '"μParam does succeed in stabilizing the optimal LR at the scale we test. However, μParam '
        "does not improve loss or reduce LR sensitivity [...] μParam does not alleviate the need "
        'for this intervention at high learning rates." (§3.2.4)',
        ("mup",),
        finding_mup,
    ),
    (
        "eps",
        "Gradient RMS falls with size and LR toward Adam's ε; then a smaller ε helps and a larger "
        "one hurts.",
        '"gradient norms decrease with both scale and learning rate, such that the default AdamW '
        'epsilon hyperparameter is too large" (§1); "Decreasing ϵ to 1e-15 improves loss and '
        'mitigates a collapse in grad RMS [...] increasing ϵ to 1e-6 results in an instability" '
        "(§3.4)",
        ("sizes", "eps"),
        finding_eps,
    ),
)


def evaluate(rows_by_sweep: dict[str, list[dict]], p: Preset) -> list[dict[str, Any]]:
    """Every finding's checks, mechanism line and verdict from the rows of its sweeps."""
    out = []
    for name, claim, quote, sweeps, rule in FINDINGS:
        got = rule({s: rows_by_sweep.get(s, []) for s in sweeps}, p)
        out.append(
            {
                "finding": name,
                "claim": claim,
                "paper": quote,
                "sweeps": sweeps,
                "rule": " ".join((rule.__doc__ or "").split()),
                **got,
                "verdict": verdict(got["checks"], got["mechanism_present"]),
            }
        )
    return out
