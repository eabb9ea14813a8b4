"""Warm-up length × two sizes × LRs, qk-layernorm off (Wortsman et al. 2023 §3.2.1):
longer warm-up lowers LR sensitivity, more so for the larger model. ARG: tiny | cpu |
accelerator (``stability.reproduce``); warm-up 2% vs 30% of training."""

from stability.reproduce import finding_grid

NAME = "warmup"


def get_sweep(arg: str = "cpu"):
    preset, base, lrs, sizes = finding_grid(arg, "reproduce_warmup")
    steps = base["train.steps"]
    return [
        {
            **base,
            **size,
            "model.qk_norm": False,
            "optim.warmup_steps": max(1, int(steps * f)),
            "optim.lr": lr,
        }
        for size in sizes
        for f in (0.02, 0.3)
        for lr in lrs
    ]
