"""Wortsman et al. 2023, Figure 1: qk-layernorm on/off × model sizes × the paper's LR grid.

ARG: "" (accelerator: the width-scaling family w256…w1024 at 6 layers, head dim 64, on C4) or
"cpu" (sizes xs, s, m on the stdlib bytes, 500 steps).
"""

from stability.config import size_preset
from stability.presets import PAPER_LRS, common

NAME = "qk_norm"


def get_sweep(arg: str = ""):
    base = common(arg, NAME)
    sizes = ("xs", "s", "m") if arg == "cpu" else ("w256", "w512", "w768", "w1024")
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
