"""Wortsman et al. 2023, Figure 1: qk-layernorm on/off × model sizes × the paper's LR grid.

ARG: PRESET[,steps=N] (``presets.parse_arg``): "accelerator" (default; the width-scaling
family w256…w1024 at 6 layers, head dim 64, on C4) or "cpu" (sizes xs, s, m on the stdlib
bytes, 500 steps).
"""

from stability.config import size_preset
from stability.presets import PAPER_LRS, parse_arg

NAME = "qk_norm"


def get_sweep(arg: str = ""):
    preset, base = parse_arg(arg, NAME)
    sizes = ("xs", "s", "m") if preset == "cpu" else ("w256", "w512", "w768", "w1024")
    return [
        {
            **base,
            **{f"model.{k}": v for k, v in size_preset(size).items()},
            "model.qk_norm": qk,
            "optim.lr": lr,
        }
        for size in sizes
        for qk in (False, True)
        for lr in PAPER_LRS
    ]
