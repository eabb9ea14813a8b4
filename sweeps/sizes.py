"""qk-layernorm on/off × model sizes × LRs: the sweep behind `stability forecast`'s calibration
and the reproduce findings on LR sensitivity vs size, attention-logit growth, entropy collapse
and gradient RMS vs ε (Wortsman et al. 2023, Figures 1, 2 and §3.4).

ARG: a preset of ``stability.reproduce``: "tiny" (seconds), "cpu" (sizes c16…c96, 35× in
non-embedding parameters, 200 steps) or "accelerator" (w256…w1024 on C4).
"""

from stability.reproduce import preset_base, preset_lrs, preset_sizes

NAME = "sizes"


def get_sweep(arg: str = "cpu"):
    base = preset_base(arg, NAME)
    return [
        {**base, **size, "model.qk_norm": qk, "optim.lr": lr}
        for qk in (False, True)  # without qk-layernorm first: the forecast's runs
        for size in preset_sizes(arg, NAME)
        for lr in preset_lrs(arg, NAME)
    ]
