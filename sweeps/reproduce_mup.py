"""μParam (Wortsman et al. 2023 §3.2.4, Figures 8 and E.4): the standard parametrization and the
paper's μParam (simple: the LR of every linear layer × base-fan-in/fan-in) at the base width and
at 8× it (cpu: d=8 → 64, 2 layers, head dim 8) with qk-layernorm, and μParam without
qk-layernorm at the larger width, × a quarter-decade LR grid over three decades (cpu: 1e-3 …
0.56). ARG: PRESET[,steps=N] (``stability.reproduce.presets``)."""

from stability.reproduce.presets import points

NAME = "mup"


def get_sweep(arg: str = "cpu"):
    return points(NAME, arg)
