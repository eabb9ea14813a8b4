"""Warm-up (Wortsman et al. 2023 §3.2.1, Figure 5; "all models use qk-layernorm"): the long arm,
warm-up 25% of training at the smallest and the largest size of the sizes family × the LR grid,
qk-layernorm on. The short arm (5%, the paper's default proportion 5e3 / 1e5) is the sizes
sweep's. ARG: PRESET[,steps=N] (``stability.reproduce.presets``)."""

from stability.reproduce.presets import points

NAME = "warmup"


def get_sweep(arg: str = "cpu"):
    return points(NAME, arg)
