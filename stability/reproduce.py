"""`stability reproduce`: the paper's findings as sweeps, verdict rules and ``paper_report.md``.

Presets (the ``ARG`` of every ``sweeps/sizes.py`` / ``sweeps/reproduce_*.py`` file):

  tiny         one-layer models on synthetic Markov data, two sizes (the end-to-end test;
               every sweep reuses the size sweep's compiled programs where it can)
  cpu          the CPU size family c16…c96 (``stability.config.SIZES``) on the stdlib's bytes
  accelerator  the paper's setting (``stability.presets.ACCELERATOR``), widths w256…w1024
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from stability import workdir as W
from stability.config import ConfigError, from_config_dict, size_preset
from stability.presets import ACCELERATOR, PAPER_LRS, parse_arg

PRESETS = ("tiny", "cpu", "accelerator")

_BASES: dict[str, dict[str, Any]] = {
    "tiny": {
        "data.source": "synthetic_markov",
        "model.vocab_size": 64,
        "data.markov_vocab": 64,
        "data.markov_branching": 8,
        "data.seq_len": 16,
        "data.batch_size": 4,
        "train.steps": 10,
        "optim.warmup_steps": 2,
        "train.log_every": 5,
        "train.eval_every": 10,
        "train.eval_batches": 2,
        "train.checkpoint_every": 10,
        # One update per device call: its programs compile in about half the time of the
        # default (a loop of updates beside the one that returns metrics); nothing it checks
        # depends on it.
        "train.steps_per_call": 1,
    },
    "cpu": {
        "data.seq_len": 64,
        "data.batch_size": 16,
        "train.steps": 200,
        "optim.warmup_steps": 20,
        "train.log_every": 10,
        "train.eval_every": 200,
        "train.checkpoint_every": 100,
    },
    "accelerator": ACCELERATOR,
}
_LRS = {"tiny": (1e-2, 3e-1), "cpu": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1), "accelerator": PAPER_LRS}
_SIZES = {
    "tiny": [dict(d_model=d, n_layers=1, n_heads=d // 8) for d in (8, 16)],
    "cpu": [size_preset(f"c{d}") for d in (16, 32, 64, 96)],
    "accelerator": [size_preset(f"w{d}") for d in (256, 512, 768, 1024)],
}
# The single-effect sweeps (warmup, weight decay, z-loss, μParam, ε) are cheaper on CPU: a
# coarser LR grid, two small sizes (or the smaller one) and 150 steps.
_FINDING = {
    "tiny": {},
    "cpu": {
        "train.steps": 150,
        "optim.warmup_steps": 15,
        "train.eval_every": 150,
        "train.checkpoint_every": 75,
    },
    "accelerator": {},
}
_FINDING_LRS = {"tiny": (1e-2, 3e-1), "cpu": (1e-3, 1e-2, 1e-1, 3e-1), "accelerator": PAPER_LRS}
_PAIR = {
    "tiny": _SIZES["tiny"][:2],
    "cpu": [size_preset("c16"), size_preset("c32")],
    "accelerator": [size_preset("w256"), size_preset("w1024")],
}


def _model(size: dict[str, int]) -> dict[str, int]:
    return {f"model.{k}": v for k, v in size.items()}


def _parse(arg: str, sweep: str, bases: dict) -> tuple[str, dict[str, Any]]:
    """(preset, base overrides) of a sweep's ARG, ``PRESET[,steps=N]`` as every shipped sweep
    takes it (``presets.parse_arg``; without a PRESET: "cpu")."""
    return parse_arg(arg, sweep, default="cpu", presets=bases)


def preset_base(arg: str, sweep: str) -> dict[str, Any]:
    """Overrides shared by every run of a preset's size sweep (data, steps, logging)."""
    return _parse(arg, sweep, _BASES)[1]


def preset_lrs(arg: str, sweep: str) -> tuple[float, ...]:
    """The LR grid of the preset's size sweep."""
    return _LRS[_parse(arg, sweep, _BASES)[0]]


def preset_sizes(arg: str, sweep: str) -> list[dict[str, int]]:
    """The preset's model sizes as ``model.*`` overrides, smallest first."""
    return [_model(s) for s in _SIZES[_parse(arg, sweep, _BASES)[0]]]


def finding_grid(arg: str, sweep: str) -> tuple[str, dict[str, Any], tuple[float, ...], list[dict]]:
    """(preset, base overrides, LR grid, two model sizes smallest first) of a single-effect
    sweep."""
    bases = {k: {**_BASES[k], **_FINDING[k]} for k in PRESETS}
    preset, base = _parse(arg, sweep, bases)
    return preset, base, _FINDING_LRS[preset], [_model(s) for s in _PAIR[preset]]


# ---------------------------------------------------------------------------------------
# Measurements: one row per run of a finding's sweep.

SWEEPS = ("sizes", "warmup", "weight_decay", "z_loss", "mup", "eps")
SENS_TOL = 0.02  # nats: LR-sensitivity differences smaller than this are ties
LOGIT_THRESHOLD = 1e4  # max attention logit of the paper's diverging runs
COLLAPSE_NATS = 0.1  # min attention entropy (over heads and layers) of a collapsed run
DRIFT_NATS = -5.0  # final mean log Z at or below this: output logits drifted
HELD_NATS = -1.0  # final mean log Z at or above this: the drift was prevented
GRAD_PARAM = "blocks/0/attn/q/kernel"  # §3.4: the layer-0 query kernel


def _finite(v: Any) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _last(hist: list[dict], key: str) -> float | None:
    """The last finite value of ``key`` in a metric history."""
    return next((float(h[key]) for h in reversed(hist) if _finite(h.get(key)) is not None), None)


def load_rows(workdir: str | Path) -> list[dict[str, Any]]:
    """One dict per finished (or diverged) run of a sweep workdir: its result record, the
    switches the findings compare, and what its history shows (peak max attention logit,
    lowest attention entropy, final mean log Z, final gradient RMS / ε of ``GRAD_PARAM``)."""
    from stability.forecast import non_embedding_params
    from stability.plots import max_over_layers, min_over_layers
    from stability.sweep import read_results

    workdir = W.path(workdir)
    records, _ = read_results(workdir)
    latest = {r["run_id"]: r for r in records if "run_id" in r}
    rows = []
    for rid, r in sorted(latest.items()):
        cfg = from_config_dict(r["config"])
        hist, _ = W.metrics(W.run_dir(workdir, rid))
        logits = [max_over_layers(h, "attn/max_logit") for h in hist]
        logits = [v for v in logits if v is not None and not math.isnan(v)]
        ents = [min_over_layers(h, "attn/entropy_min") for h in hist]
        ents = [v for v in ents if v is not None and math.isfinite(v)]
        rows.append(
            {
                "run_id": rid,
                "setting": r["setting"],
                "lr": float(r["lr"]),
                "final_loss": r.get("final_loss"),
                "loss_at_init": r.get("loss_at_init"),
                "diverged": bool(r.get("diverged")),
                "params": non_embedding_params(cfg.model),
                "d_model": cfg.model.d_model,
                "qk_norm": cfg.model.qk_norm,
                "warmup_steps": cfg.optim.warmup_steps,
                "weight_decay": cfg.optim.weight_decay,
                "weight_decay_mode": cfg.optim.weight_decay_mode,
                "z_loss": cfg.train.z_loss,
                "parametrization": cfg.optim.parametrization,
                "eps": cfg.optim.eps,
                "peak_attn_logit": max(logits) if logits else None,
                "min_attn_entropy": min(ents) if ents else None,
                "log_z_mean": _last(hist, "logits/log_z_mean"),
                "grad_over_eps": _last(hist, f"grad/rms_over_eps/{GRAD_PARAM}"),
                "wall_seconds": _finite(r.get("wall_seconds")),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------
# Verdict rules. A check compares two measured numbers in the direction the paper claims:
# "pass" beyond the tolerance, "fail" beyond it the other way, "tie" within it, "missing"
# without data. A finding holds when every check passes, does not hold when any check fails,
# and is inconclusive otherwise.


def _compare(name: str, value: float | None, tol: float, detail: str) -> dict[str, Any]:
    """A check whose claim is ``value > tol`` (fail below ``-tol``)."""
    if value is None or not math.isfinite(value):
        outcome = "missing"
    elif value > tol:
        outcome = "pass"
    elif value < -tol:
        outcome = "fail"
    else:
        outcome = "tie"
    return {"check": name, "value": value, "outcome": outcome, "detail": detail}


def verdict(checks: list[dict[str, Any]]) -> str:
    outcomes = {c["outcome"] for c in checks}
    if "fail" in outcomes:
        return "does not hold"
    if checks and outcomes == {"pass"}:
        return "holds"
    return "inconclusive"


def _where(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _sens(rows: list[dict]) -> float | None:
    from stability.plots import lr_sensitivity

    usable = [r for r in rows if r["loss_at_init"] is not None]
    return lr_sensitivity(usable) if usable else None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def _sizes(rows: list[dict]) -> list[int]:
    """The widths of a sweep's runs (settings such as qk-LN change the parameter count a
    little, so sizes are compared by width)."""
    return sorted({r["d_model"] for r in rows})


def _gaps_by_size(rows: list[dict], field: str, worse, better) -> list[dict[str, Any]]:
    """Checks that setting ``field=better`` has the lower LR sensitivity at every size, and by
    more at the largest size than at the smallest."""
    checks, gaps = [], {}
    sizes = _sizes(rows)
    for n in sizes:
        hi = _sens(_where(rows, d_model=n, **{field: worse}))
        lo = _sens(_where(rows, d_model=n, **{field: better}))
        gaps[n] = _diff(hi, lo)
        checks.append(
            _compare(
                f"d={n}: sensitivity {field}={worse} − {field}={better}",
                gaps[n],
                SENS_TOL,
                f"{_fmt(hi)} − {_fmt(lo)}",
            )
        )
    if len(sizes) >= 2:
        small, large = gaps[sizes[0]], gaps[sizes[-1]]
        checks.append(
            _compare(
                "gap at the largest − gap at the smallest size",
                _diff(large, small),
                SENS_TOL,
                f"{_fmt(large)} − {_fmt(small)}",
            )
        )
    return checks


def finding_qk_sensitivity(rows: list[dict]) -> list[dict[str, Any]]:
    """qk-layernorm lowers LR sensitivity at every size, and by more at the largest size
    than at the smallest (rows: the sizes sweep)."""
    return _gaps_by_size(rows, "qk_norm", False, True)


def finding_logit_growth(rows: list[dict]) -> list[dict[str, Any]]:
    """At the largest size, without qk-LN, the run with the highest peak max attention logit
    passes LOGIT_THRESHOLD and its attention entropy collapses below COLLAPSE_NATS; with qk-LN
    at that LR the logit stays below the threshold (rows: the sizes sweep)."""
    sizes = _sizes(rows)
    if not sizes:
        return [_compare("runs of the sizes sweep", None, 0, "none")]
    off = [
        r
        for r in _where(rows, d_model=sizes[-1], qk_norm=False)
        if r["peak_attn_logit"] is not None
    ]
    if not off:
        return [_compare("peak max attention logit without qk-LN", None, 0, "not logged")]
    top = max(off, key=lambda r: r["peak_attn_logit"])
    on = [
        r
        for r in _where(rows, d_model=sizes[-1], qk_norm=True, lr=top["lr"])
        if r["peak_attn_logit"] is not None
    ]
    lg = lambda v: None if v is None else math.log10(max(v, 1e-30))  # noqa: E731
    checks = [
        _compare(
            f"log10 peak logit − log10 {LOGIT_THRESHOLD:g}, no qk-LN, lr={top['lr']:g}",
            lg(top["peak_attn_logit"]) - math.log10(LOGIT_THRESHOLD),
            0.0,
            f"peak {top['peak_attn_logit']:.3g}",
        ),
        _compare(
            f"{COLLAPSE_NATS} − min attention entropy (nats), same run",
            _diff(COLLAPSE_NATS, top["min_attn_entropy"]),
            0.0,
            f"min entropy {_fmt(top['min_attn_entropy'])}",
        ),
        _compare(
            f"log10 {LOGIT_THRESHOLD:g} − log10 peak logit with qk-LN, same LR",
            None if not on else math.log10(LOGIT_THRESHOLD) - lg(on[0]["peak_attn_logit"]),
            0.0,
            "–" if not on else f"peak {on[0]['peak_attn_logit']:.3g}",
        ),
    ]
    return checks


def finding_z_loss(rows: list[dict]) -> list[dict[str, Any]]:
    """Without weight decay or z-loss, the final mean log Z reaches DRIFT_NATS at some LR; at
    that LR, z-loss keeps it above HELD_NATS and weight decay above DRIFT_NATS (rows: the
    z_loss sweep)."""
    base = [r for r in _where(rows, weight_decay=0.0, z_loss=0.0) if r["log_z_mean"] is not None]
    if not base:
        return [_compare("final mean log Z without weight decay and z-loss", None, 0, "not logged")]
    worst = min(base, key=lambda r: r["log_z_mean"])
    lr = worst["lr"]
    z = [r for r in rows if r["weight_decay"] == 0.0 and r["z_loss"] > 0 and r["lr"] == lr]
    wd = [r for r in rows if r["weight_decay"] > 0 and r["z_loss"] == 0.0 and r["lr"] == lr]
    zl = z[0]["log_z_mean"] if z else None
    wl = wd[0]["log_z_mean"] if wd else None
    return [
        _compare(
            f"{DRIFT_NATS} − lowest final log Z, no wd/z-loss (lr={lr:g})",
            DRIFT_NATS - worst["log_z_mean"],
            0.0,
            f"log Z {worst['log_z_mean']:.2f}",
        ),
        _compare(
            f"log Z with z-loss − ({HELD_NATS}), same LR",
            _diff(zl, HELD_NATS),
            0.0,
            f"log Z {_fmt(zl, '.2f')}",
        ),
        _compare(
            f"log Z with weight decay − ({DRIFT_NATS}), same LR",
            _diff(wl, DRIFT_NATS),
            0.0,
            f"log Z {_fmt(wl, '.2f')}",
        ),
    ]


def finding_warmup(rows: list[dict]) -> list[dict[str, Any]]:
    """The longer warm-up lowers LR sensitivity at both sizes, by more at the larger one
    (rows: the warmup sweep)."""
    warmups = sorted({r["warmup_steps"] for r in rows})
    if len(warmups) < 2:
        return [_compare("two warm-up lengths", None, 0, f"found {warmups}")]
    return _gaps_by_size(rows, "warmup_steps", warmups[0], warmups[-1])


def finding_weight_decay(rows: list[dict]) -> list[dict[str, Any]]:
    """Independent weight decay has the lower LR sensitivity (rows: the weight_decay sweep)."""
    c = _sens(_where(rows, weight_decay_mode="coupled"))
    i = _sens(_where(rows, weight_decay_mode="independent"))
    return [
        _compare(
            "sensitivity coupled − independent", _diff(c, i), SENS_TOL, f"{_fmt(c)} − {_fmt(i)}"
        )
    ]


def _log_opt_lr(rows: list[dict]) -> float | None:
    done = [r for r in rows if not r["diverged"] and _finite(r["final_loss"]) is not None]
    return math.log10(min(done, key=lambda r: r["final_loss"])["lr"]) if done else None


def finding_mup(rows: list[dict]) -> list[dict[str, Any]]:
    """With qk-LN, μParam moves the optimal LR less between the two widths than standard
    parametrization (decades on the grid); at the larger width μParam without qk-LN has the
    higher LR sensitivity (rows: the mup sweep)."""
    widths = sorted({r["d_model"] for r in rows})
    if len(widths) < 2:
        return [_compare("two widths", None, 0, f"found {widths}")]
    shift = {}
    for p in ("standard", "mup_full"):
        a = _log_opt_lr(_where(rows, parametrization=p, qk_norm=True, d_model=widths[0]))
        b = _log_opt_lr(_where(rows, parametrization=p, qk_norm=True, d_model=widths[-1]))
        shift[p] = None if a is None or b is None else abs(b - a)
    off = _sens(_where(rows, parametrization="mup_full", qk_norm=False, d_model=widths[-1]))
    on = _sens(_where(rows, parametrization="mup_full", qk_norm=True, d_model=widths[-1]))
    return [
        _compare(
            "optimal-LR shift (decades) standard − μParam",
            _diff(shift["standard"], shift["mup_full"]),
            0.0,
            f"{_fmt(shift['standard'], '.2f')} − {_fmt(shift['mup_full'], '.2f')}",
        ),
        _compare(
            f"d={widths[-1]}: sensitivity μParam without − with qk-LN",
            _diff(off, on),
            SENS_TOL,
            f"{_fmt(off)} − {_fmt(on)}",
        ),
    ]


def finding_eps(sizes_rows: list[dict], eps_rows: list[dict]) -> list[dict[str, Any]]:
    """Gradient RMS / ε at the end of training falls with size (median over LRs and qk
    settings of log10 largest/smallest) and with LR at the largest size (log10 lowest/highest
    LR, non-diverged runs, qk-LN on); the smaller ε has the lower LR sensitivity (rows: the
    sizes and eps sweeps)."""
    sizes = _sizes(sizes_rows)
    falls = []
    for lr in sorted({r["lr"] for r in sizes_rows}):
        for qk in (False, True):
            a = _where(sizes_rows, d_model=sizes[0], lr=lr, qk_norm=qk) if sizes else []
            b = _where(sizes_rows, d_model=sizes[-1], lr=lr, qk_norm=qk) if sizes else []
            if a and b and a[0]["grad_over_eps"] and b[0]["grad_over_eps"]:
                falls.append(math.log10(a[0]["grad_over_eps"] / b[0]["grad_over_eps"]))
    top = (
        [
            r
            for r in _where(sizes_rows, d_model=sizes[-1], qk_norm=True)
            if not r["diverged"] and r["grad_over_eps"]
        ]
        if sizes
        else []
    )
    top.sort(key=lambda r: r["lr"])
    by_lr = (
        math.log10(top[0]["grad_over_eps"] / top[-1]["grad_over_eps"]) if len(top) >= 2 else None
    )
    eps = sorted({r["eps"] for r in eps_rows})
    big = _sens(_where(eps_rows, eps=eps[-1])) if eps else None
    small = _sens(_where(eps_rows, eps=eps[0])) if eps else None
    return [
        _compare(
            "median log10 grad/ε smallest ÷ largest size",
            float(np.median(falls)) if falls else None,
            0.0,
            f"{len(falls)} LR×qk pairs",
        ),
        _compare(
            "log10 grad/ε lowest ÷ highest LR, largest size",
            by_lr,
            0.0,
            "–" if len(top) < 2 else f"lr {top[0]['lr']:g} vs {top[-1]['lr']:g}",
        ),
        _compare(
            "sensitivity larger ε − smaller ε",
            _diff(big, small),
            SENS_TOL,
            f"ε={eps[-1]:g}: {_fmt(big)} − ε={eps[0]:g}: {_fmt(small)}" if eps else "–",
        ),
    ]


FINDINGS = (
    ("qk_sensitivity", "qk-layernorm lowers LR sensitivity, more so as models grow.", ("sizes",)),
    (
        "logit_growth",
        "Without qk-layernorm the max attention logit passes 1e4 at high LR and attention entropy collapses.",
        ("sizes",),
    ),
    (
        "z_loss",
        "Without weight decay the output logits drift (mean log Z very negative); z-loss prevents it.",
        ("z_loss",),
    ),
    ("warmup", "A longer warm-up lowers LR sensitivity, more so for larger models.", ("warmup",)),
    (
        "weight_decay",
        "Independent weight decay lowers LR sensitivity compared with coupled (AdamW) decay.",
        ("weight_decay",),
    ),
    (
        "mup",
        "μParam keeps the optimal LR stable across widths but does not replace qk-layernorm.",
        ("mup",),
    ),
    (
        "eps",
        "Gradient RMS falls toward Adam's ε at large size and LR, and a smaller ε helps.",
        ("sizes", "eps"),
    ),
)
_RULES = {
    "qk_sensitivity": finding_qk_sensitivity,
    "logit_growth": finding_logit_growth,
    "z_loss": finding_z_loss,
    "warmup": finding_warmup,
    "weight_decay": finding_weight_decay,
    "mup": finding_mup,
    "eps": finding_eps,
}


def evaluate(rows_by_sweep: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """Every finding's checks and verdict from the rows of its sweeps."""
    out = []
    for name, claim, sweeps in FINDINGS:
        rule = _RULES[name]
        checks = rule(*(rows_by_sweep.get(s, []) for s in sweeps))
        out.append(
            {
                "finding": name,
                "claim": claim,
                "sweeps": sweeps,
                "rule": " ".join((rule.__doc__ or "").split()),
                "checks": checks,
                "verdict": verdict(checks),
            }
        )
    return out


# ---------------------------------------------------------------------------------------
# Running the sweeps and writing the report.

SWEEPS_DIR = Path(__file__).resolve().parent.parent / "sweeps"


def sweep_file(name: str) -> Path:
    """``sweeps/sizes.py`` or ``sweeps/reproduce_<name>.py``."""
    return SWEEPS_DIR / ("sizes.py" if name == "sizes" else f"reproduce_{name}.py")


OVERRIDABLE = ("data.", "wandb.")  # where the data, the tokenizer and logging live


def reproduce(
    preset: str,
    workdir: str | Path,
    *,
    overrides: list[tuple[str, str]] = (),
    progress: bool = True,
    report_only: bool = False,
) -> Path:
    """Run (or resume) every sweep of ``preset`` into ``workdir/<sweep>`` and write
    ``workdir/paper_report.md`` (with ``paper_report.json`` and figures/); returns its path.
    ``overrides``: ``--config.data.*`` and ``--config.wandb.*`` (the dataset, the tokenizer,
    logging: the accelerator preset needs ``data.tfds_data_dir`` and
    ``data.tokenizer_path``); any other field is refused, the findings' sweeps fix it.
    ``report_only``: train nothing, report the runs finished so far."""
    from stability.loop import Preemption
    from stability.sweep import run_sweep

    if preset not in PRESETS:
        raise ConfigError(f"--preset={preset!r} is unknown; valid: {', '.join(PRESETS)}")
    for key, _ in overrides:
        if not key.startswith(OVERRIDABLE):
            raise ConfigError(
                f"--config.{key}: `stability reproduce` takes only --config.data.* and "
                "--config.wandb.* overrides (the dataset, the tokenizer, logging); the "
                "findings' sweeps set every other field"
            )
    workdir = W.path(workdir)
    with Preemption() as stop:  # one handler for every sweep: Ctrl-C stops within one call
        for name in SWEEPS:
            path = sweep_file(name)
            if not path.is_file():
                raise ConfigError(f"{path} is missing: `stability reproduce` runs from a checkout")
            if not report_only and not stop.requested:
                run_sweep(
                    f"{path}:{preset}",
                    workdir / name,
                    pinned=overrides,
                    progress=progress,
                    preemption=stop,
                )
    rows = {name: load_rows(workdir / name) for name in SWEEPS}
    partial = report_only or stop.requested
    return write_report(evaluate(rows), rows, workdir, preset, partial=partial)


def _commit() -> str:
    """The checkout's short commit, marked when tracked files have uncommitted changes."""
    import subprocess

    git = lambda *args: subprocess.run(
        ["git", *args], cwd=SWEEPS_DIR.parent, capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + (
            " (with uncommitted changes)" if dirty else ""
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _planned(sweep_dir: W.Path) -> str:
    """Runs in a sweep workdir's manifest (``sweep.json``), or '?'."""
    try:
        manifest = W.manifest(sweep_dir)
    except ConfigError:
        return "?"
    return "?" if manifest is None else str(len(manifest["run_ids"]))


def _figure(name: str, rows: dict[str, list[dict]], path: Path) -> None:
    """The figure of one finding."""
    import matplotlib.pyplot as plt

    from stability import plots

    def curves(rs, label, x, y):
        out: dict[str, tuple] = {}
        for lab in sorted({label(r) for r in rs}):
            pts = sorted((r[x], r[y]) for r in rs if label(r) == lab and r[y] is not None)
            if pts:
                out[lab] = tuple(map(list, zip(*pts, strict=True)))
        return out

    sizes = rows["sizes"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    a, b = axes
    if name == "qk_sensitivity":
        big = max((r["d_model"] for r in sizes), default=0)
        plots.plot_lr_sensitivity([r for r in sizes if r["d_model"] == big], ax=a)
        sens = [
            {"d": n, "qk": qk, "s": _sens(_where(sizes, d_model=n, qk_norm=qk))}
            for n in _sizes(sizes)
            for qk in (False, True)
        ]
        plots.plot_curves(
            curves(sens, lambda r: f"qk_norm={r['qk']}", "d", "s"),
            b,
            xlabel="width d_model",
            ylabel="LR sensitivity",
            logx=True,
            marker="o",
            title="LR sensitivity vs size",
        )
    elif name == "logit_growth":
        lab = lambda r: f"d={r['d_model']}, qk={r['qk_norm']}"  # noqa: E731
        kw = dict(xlabel="learning rate", logx=True, marker="o")
        plots.plot_curves(
            curves(sizes, lab, "lr", "peak_attn_logit"),
            a,
            ylabel="peak max attention logit",
            logy=True,
            hline=LOGIT_THRESHOLD,
            title="Max attention logit",
            **kw,
        )
        plots.plot_curves(
            curves(sizes, lab, "lr", "min_attn_entropy"),
            b,
            ylabel="min attention entropy (nats)",
            hline=COLLAPSE_NATS,
            title="Attention entropy",
            **kw,
        )
    elif name == "z_loss":
        z = rows["z_loss"]
        lab = lambda r: f"wd={r['weight_decay']:g}, z_loss={r['z_loss']:g}"  # noqa: E731
        plots.plot_curves(
            curves(z, lab, "lr", "log_z_mean"),
            a,
            xlabel="learning rate",
            ylabel="final mean log Z",
            logx=True,
            marker="o",
            hline=DRIFT_NATS,
            title="Output-logit drift",
        )
        plots.plot_lr_sensitivity(z, ax=b)
    elif name == "eps":
        qk_on = [r for r in sizes if r["qk_norm"]]
        plots.plot_curves(
            curves(qk_on, lambda r: f"lr={r['lr']:g}", "params", "grad_over_eps"),
            a,
            xlabel="non-embedding parameters",
            ylabel=f"grad RMS / ε ({GRAD_PARAM})",
            logx=True,
            logy=True,
            marker="o",
            hline=1.0,
            title="Gradient RMS / ε at the end (qk-LN on)",
        )
        plots.plot_lr_sensitivity(rows["eps"], ax=b)
    else:  # warmup, weight_decay, mup: LR-vs-loss curves
        rs = rows[name]
        plots.plot_lr_sensitivity(rs, ax=a)
        opt = [
            {"setting": r["setting"], "lr": r["lr"], "loss": r["final_loss"]}
            for r in rs
            if not r["diverged"]
        ]
        plots.plot_curves(
            curves(opt, lambda r: r["setting"], "lr", "loss"),
            b,
            xlabel="learning rate",
            ylabel="final loss (finished runs)",
            logx=True,
            marker="o",
            title="Final loss, diverged runs left out",
        )
    fig.tight_layout()
    plots.save_png(fig, path, dpi=100)


def write_report(
    findings: list[dict],
    rows: dict[str, list[dict]],
    workdir: str | Path,
    preset: str,
    partial: bool = False,
) -> Path:
    """paper_report.md, paper_report.json and figures/<finding>.png in ``workdir``."""
    import datetime
    import json

    from stability.plots import summary_table

    workdir = W.path(workdir)
    (workdir / "figures").mkdir(parents=True, exist_ok=True)
    counts = {
        v: sum(f["verdict"] == v for f in findings)
        for v in ("holds", "does not hold", "inconclusive")
    }
    lines = [
        "# Reproducing Wortsman et al. 2023 (small-scale proxies)",
        "",
        f"Date (UTC): {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}. Commit: {_commit()}. "
        f"Command: `stability reproduce --preset={preset} --workdir={workdir}"
        + (" --report-only` (the runs finished so far)." if partial else "`."),
        "",
        "Verdicts come from fixed rules, stated per finding and applied by "
        "`stability/reproduce.py` to the measured runs: each check compares two measured "
        "numbers in the direction the paper claims; it passes beyond its tolerance, fails "
        "beyond it the other way, ties within it, is missing without data. A finding **holds** "
        "when every check passes, **does not hold** when any check fails, and is "
        f"**inconclusive** otherwise. Tolerances: LR sensitivity {SENS_TOL} nats; attention "
        f"logit threshold {LOGIT_THRESHOLD:g}; collapsed entropy ≤ {COLLAPSE_NATS} nats; drifted "
        f"log Z ≤ {DRIFT_NATS}; held log Z ≥ {HELD_NATS}.",
        "",
        "| finding | verdict |",
        "|---|---|",
        *[f"| {f['claim']} | **{f['verdict']}** |" for f in findings],
        "",
        f"{counts['holds']} hold, {counts['does not hold']} do not hold, "
        f"{counts['inconclusive']} inconclusive.",
        "",
        "| sweep | finished runs / planned | diverged | training time (s, sum over runs) |",
        "|---|---|---|---|",
    ]
    for name in SWEEPS:
        rs = rows.get(name, [])
        wall = sum(r["wall_seconds"] or 0 for r in rs)
        lines.append(
            f"| {name} (`{sweep_file(name).relative_to(SWEEPS_DIR.parent)}:{preset}`) | {len(rs)} / {_planned(workdir / name)} | {sum(r['diverged'] for r in rs)} | {wall:.0f} |"
        )
    for i, f in enumerate(findings, 1):
        fig = workdir / "figures" / f"{f['finding']}.png"
        _figure(f["finding"], rows, fig)
        lines += [
            "",
            f"## {i}. {f['claim']}",
            "",
            f"Verdict: **{f['verdict']}**. Rule: {f['rule']}",
            "",
            "| check (claim: value > tolerance) | measured | value | outcome |",
            "|---|---|---|---|",
            *[
                f"| {c['check']} | {c['detail']} | {_fmt(c['value'], '+.3f')} | {c['outcome']} |"
                for c in f["checks"]
            ],
            "",
        ]
        for s in f["sweeps"]:
            if rows.get(s):
                lines += [
                    f"Sweep `{s}`: final eval loss per LR ('div' = diverged), LR sensitivity.",
                    "",
                    summary_table(rows[s]),
                    "",
                ]
        lines.append(f"![{f['finding']}](figures/{fig.name})")
    out = workdir / "paper_report.md"
    W.write_text(out, "\n".join(lines) + "\n")
    W.write_text(
        workdir / "paper_report.json",
        json.dumps({"preset": preset, "findings": findings}, indent=1) + "\n",
    )
    return out
