"""Wortsman et al. 2023, Figure 1: qk-layernorm on/off × model sizes × the paper's LR grid.

ARG: PRESET[,steps=N] (``presets.parse_arg``): "accelerator" (the default on a host with an accelerator; the width-scaling
family w256…w4096 at 6 layers, head dim 64, on C4, bf16, FSDP/remat per ``presets.width``) or "cpu" (sizes xs, s, m on the stdlib
bytes, 500 steps).
"""

from stability.config import size_preset
from stability.presets import PAPER_LRS, parse_arg, width

NAME = "qk_norm"


def get_sweep(arg: str = ""):
    preset, base = parse_arg(arg, NAME)
    if preset == "cpu":
        sizes = {s: {f"model.{k}": v for k, v in size_preset(s).items()} for s in ("xs", "s", "m")}
    else:
        sizes = {
            s: width(s)
            for s in ("w256", "w512", "w768", "w1024", "w1536", "w2048", "w3072", "w4096")
        }
    return [
        {
            **base,
            **shape,
            "model.qk_norm": qk,
            "optim.lr": lr,
        }
        for shape in sizes.values()
        for qk in (False, True)
        for lr in PAPER_LRS
    ]
