"""Adam's ε (Wortsman et al. 2023 §3.4, Figures 12 and E.15): ε = 1e-15 and 1e-6 at the largest
size of the sizes family, LR 0.1 and 0.3, qk-layernorm on; the default ε = 1e-8 is the sizes
sweep's. ARG: PRESET[,steps=N] (``stability.reproduce.presets``)."""

from stability.reproduce.presets import points

NAME = "eps"


def get_sweep(arg: str = "cpu"):
    return points(NAME, arg)
