"""qk-layernorm off/on × a family of model sizes × the paper's LR grid, at the paper's defaults
(warm-up 5% of training, independent weight decay 1e-4, z-loss 1e-4, Adam's ε 1e-8): Wortsman
et al. 2023 Figures 1, 2 and 11. The runs behind `stability reproduce`'s findings on LR
sensitivity vs size, attention-logit growth and gradient RMS (and the default arm of its
warm-up, weight-decay and ε experiments), and behind `stability forecast`'s calibration.

ARG: PRESET[,steps=N] of ``stability.reproduce.presets``: "tiny" (seconds), "cpu" (width and
depth grown together, d=16·L=1 … d=64·L=4, head dim 8, 200 steps) or "accelerator" (w256 …
w1024 on C4).
"""

from stability.reproduce.presets import points

NAME = "sizes"


def get_sweep(arg: str = "cpu"):
    return points(NAME, arg)
