"""The experiments of ``stability reproduce``, one sweep each, at three presets.

The protocol (``docs/reproduce/protocol.md``) sets every number here and says, per experiment,
how it follows the paper (Wortsman et al. 2023) and where it departs from it for cost:

  sizes         qk-layernorm off/on × a family of sizes grown in width and depth together ×
                the paper's LR grid, at the paper's defaults (warm-up 5% of training,
                independent weight decay 1e-4, z-loss 1e-4, ε 1e-8): findings 1, 2 and 7, and
                the default arm of findings 4 (warm-up), 5 (independent decay) and 7 (ε 1e-8)
  warmup        qk-layernorm on, the smallest and largest sizes, warm-up 25% of training
  weight_decay  qk-layernorm on, the largest size, coupled decay λ = 0.1 on the paper's two
                LR ranges [1e-4, 1e-1] ∪ [3e-4, 3e-1]
  z_loss        qk-layernorm on, no weight decay, one small size, the byte vocabulary, LR 0.1
                and 0.3, z-loss 0 vs 1e-4, a run 10× longer than the others
  mup           qk-layernorm on (and off at the largest width), widths over 8×, standard vs
                the paper's μParam (simple), a quarter-decade LR grid over three decades
  eps           the largest size, qk-layernorm on, LR 0.1 and 0.3, Adam's ε 1e-6 and 1e-15

Presets: "tiny" (a smoke test of the machinery, seconds, not evidence), "cpu" (this 2-core
machine's proxies, ≤ 90 minutes) and "accelerator" (the paper's sizes on C4). Every sweep file
takes ``PRESET[,steps=N]``; ``N`` sets that experiment's steps (its warm-up, eval and
checkpoint intervals scaled with them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stability.config import ConfigError
from stability.presets import ACCELERATOR, PAPER_LRS

NAMES = ("sizes", "warmup", "weight_decay", "z_loss", "mup", "eps")
PRESETS = ("tiny", "cpu", "accelerator")


@dataclass(frozen=True)
class Preset:
    seeds: int  # seeds per setting (train.seed = data.seed = offset … offset + seeds − 1)
    base: dict[str, Any]  # data and logging overrides of every run
    sizes: tuple[tuple[int, int, int], ...]  # (d_model, n_layers, n_heads), smallest first
    lrs: tuple[float, ...]  # the LR grid of sizes, warmup and eps... (the paper's)
    steps: int  # sizes, warmup, weight_decay, mup, eps
    warmup: float  # warm-up as a fraction of training (the paper's default: 5e3 of 1e5)
    long_warmup: float  # the warmup experiment's longer warm-up, a fraction of training
    coupled_lrs: tuple[float, ...]  # weight_decay: the union of the paper's two ranges
    z_size: tuple[int, int, int]  # z_loss: the model
    z_steps: int
    z_lrs: tuple[float, ...]
    mup_widths: tuple[int, ...]  # base first
    mup_layers: int
    mup_head_dim: int
    mup_lrs: tuple[float, ...]
    eps_lrs: tuple[float, ...]
    eps_values: tuple[float, ...]  # besides the default 1e-8 (the sizes sweep's)


def _quarter_decades(lo: float, n: int) -> tuple[float, ...]:
    return tuple(float(f"{lo * 10 ** (k / 4):.4g}") for k in range(n))


_CPU_BASE = {
    "data.seq_len": 64,
    "data.batch_size": 16,
    "train.log_every": 10,
    "train.eval_batches": 4,
}
_TINY_BASE = {
    "data.source": "synthetic_markov",
    "model.vocab_size": 64,
    "data.markov_vocab": 64,
    "data.markov_branching": 8,
    "data.seq_len": 16,
    "data.batch_size": 4,
    "train.log_every": 5,
    "train.eval_batches": 2,
    # One update per device call: its programs compile in about half the time of the default
    # (a loop of updates beside the one that returns metrics); nothing it checks depends on it.
    "train.steps_per_call": 1,
}
_ACCELERATOR_BASE = {
    k: v
    for k, v in ACCELERATOR.items()
    if k.startswith(("data.", "model.vocab", "model.dtype", "train.log", "train.eval_b"))
}

PRESET: dict[str, Preset] = {
    "tiny": Preset(
        seeds=2,
        base=_TINY_BASE,
        sizes=((8, 1, 1), (16, 1, 2)),
        lrs=(1e-2, 3e-1),
        steps=10,
        warmup=0.2,
        long_warmup=0.5,
        coupled_lrs=(1e-3, 1e-2, 3e-1),
        z_size=(8, 1, 1),
        z_steps=10,
        z_lrs=(0.1, 0.3),
        mup_widths=(8, 16),
        mup_layers=1,
        mup_head_dim=8,
        mup_lrs=(1e-2, 0.3),
        eps_lrs=(0.1, 0.3),
        eps_values=(1e-6, 1e-15),
    ),
    "cpu": Preset(
        seeds=5,
        base=_CPU_BASE,
        # width and depth grown together at a fixed head dimension of 8: 6.2K … 197K
        # non-embedding parameters (qk-layernorm off)
        sizes=((16, 1, 2), (24, 2, 3), (32, 2, 4), (48, 3, 6), (64, 4, 8)),
        lrs=PAPER_LRS,
        steps=200,
        warmup=0.05,
        long_warmup=0.25,
        coupled_lrs=(1e-4, *PAPER_LRS),
        z_size=(32, 2, 4),
        z_steps=2000,
        z_lrs=(0.1, 0.3),
        mup_widths=(8, 64),
        mup_layers=2,
        mup_head_dim=8,
        mup_lrs=_quarter_decades(1e-3, 12),
        eps_lrs=(0.1, 0.3),
        eps_values=(1e-6, 1e-15),
    ),
    "accelerator": Preset(
        seeds=3,
        base=_ACCELERATOR_BASE,
        sizes=((256, 6, 4), (512, 6, 8), (768, 6, 12), (1024, 6, 16)),
        lrs=PAPER_LRS,
        steps=100_000,
        warmup=0.05,
        long_warmup=0.25,
        coupled_lrs=(1e-4, *PAPER_LRS),
        z_size=(256, 6, 4),
        z_steps=100_000,
        z_lrs=(0.1, 0.3),
        mup_widths=(256, 2048),
        mup_layers=6,
        mup_head_dim=64,
        mup_lrs=_quarter_decades(1e-3, 12),
        eps_lrs=(0.1, 0.3),
        eps_values=(1e-6, 1e-15),
    ),
}


def _model(size: tuple[int, int, int]) -> dict[str, int]:
    d, layers, heads = size
    return {"model.d_model": d, "model.n_layers": layers, "model.n_heads": heads}


def _schedule(preset: Preset, steps: int, warmup: float) -> dict[str, Any]:
    return {
        "train.steps": steps,
        "optim.warmup_steps": max(1, round(steps * warmup)),
        "train.eval_every": steps,
        "train.checkpoint_every": max(1, steps // 2),
    }


def parse(arg: str, sweep: str) -> tuple[str, int | None]:
    """(preset, steps or None) of a reproduce sweep's ARG ``PRESET[,steps=N]`` (no PRESET:
    "cpu"); anything else is a ConfigError of one line naming the sweep file."""
    preset, *extras = arg.split(",") if arg else ["cpu"]
    valid = f"valid: PRESET[,steps=N] with PRESET {' or '.join(PRESETS)}"
    if (preset or "cpu") not in PRESETS:
        raise ConfigError(f"--sweep=sweeps/{sweep}.py:{arg}: unknown preset {preset!r}; {valid}")
    steps = None
    for extra in extras:
        key, eq, value = extra.partition("=")
        if key != "steps" or not eq or not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--sweep=sweeps/{sweep}.py:{arg}: bad ARG part {extra!r}; {valid}")
        steps = int(value)
    return preset or "cpu", steps


def points(name: str, arg: str = "cpu") -> list[dict[str, Any]]:
    """The sweep points of experiment ``name`` at ``arg`` (``PRESET[,steps=N]``)."""
    if name not in NAMES:
        raise ConfigError(f"unknown reproduce experiment {name!r}; valid: {', '.join(NAMES)}")
    sweep = "sizes" if name == "sizes" else f"reproduce_{name}"
    preset_name, steps = parse(arg, sweep)
    p = PRESET[preset_name]
    run = lambda n: steps or n  # noqa: E731
    common = {**p.base, **_schedule(p, run(p.steps), p.warmup)}
    largest = _model(p.sizes[-1])
    if name == "sizes":
        return [
            {**common, **_model(size), "model.qk_norm": qk, "optim.lr": lr}
            for qk in (False, True)  # without qk-layernorm first: the forecast's runs
            for size in p.sizes
            for lr in p.lrs
        ]
    if name == "warmup":
        long = _schedule(p, run(p.steps), p.long_warmup)
        return [
            {**common, **long, **_model(size), "model.qk_norm": True, "optim.lr": lr}
            for size in (p.sizes[0], p.sizes[-1])
            for lr in p.lrs
        ]
    if name == "weight_decay":
        return [
            {
                **common,
                **largest,
                "model.qk_norm": True,
                "optim.weight_decay_mode": "coupled",
                "optim.weight_decay": 0.1,
                "optim.lr": lr,
            }
            for lr in p.coupled_lrs
        ]
    if name == "z_loss":
        z = {**p.base, **_schedule(p, run(p.z_steps), p.warmup)}
        z["train.eval_every"] = max(1, z["train.steps"] // 8)  # the late loss rise: 8 evals
        return [
            {
                **z,
                **_model(p.z_size),
                "model.qk_norm": True,
                "optim.weight_decay": 0.0,
                "train.z_loss": zl,
                "optim.lr": lr,
            }
            for zl in (0.0, 1e-4)
            for lr in p.z_lrs
        ]
    if name == "mup":
        base_d = p.mup_widths[0]
        out = []
        for param, qk, widths in (
            ("standard", True, p.mup_widths),
            ("mup_simple", True, p.mup_widths[1:]),  # at the base width μParam is standard
            ("mup_simple", False, p.mup_widths[-1:]),
        ):
            for d in widths:
                for lr in p.mup_lrs:
                    out.append(
                        {
                            **common,
                            **_model((d, p.mup_layers, d // p.mup_head_dim)),
                            "model.qk_norm": qk,
                            "optim.parametrization": param,
                            **({"optim.mup_base_d_model": base_d} if param != "standard" else {}),
                            "optim.lr": lr,
                        }
                    )
        return out
    return [  # eps
        {**common, **largest, "model.qk_norm": True, "optim.eps": eps, "optim.lr": lr}
        for eps in p.eps_values
        for lr in p.eps_lrs
    ]
