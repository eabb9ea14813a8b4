"""Warmup length (Wortsman et al. 2023 §3.2.1): longer warmup lowers LR sensitivity.

ARG: PRESET[,steps=N] (``presets.parse_arg``): "accelerator" (the default on a host with an accelerator; warmup 5e2, 5e3, 2.5e4
of 1e5 steps) or "cpu" (10, 50, 150 of 500).
"""

from stability.presets import PAPER_LRS, parse_arg

NAME = "warmup"


def get_sweep(arg: str = ""):
    preset, base = parse_arg(arg, NAME)
    steps = base["train.steps"]
    return [
        {**base, "optim.warmup_steps": int(steps * f), "optim.lr": lr}
        for f in ((0.02, 0.1, 0.3) if preset == "cpu" else (0.005, 0.05, 0.25))
        for lr in PAPER_LRS
    ]
