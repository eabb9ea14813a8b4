"""Independent vs coupled weight decay (Wortsman et al. 2023 §3.2.2): θ ← θ − (η_t/η)λθ with
λ = 1e-4, against AdamW's coupled θ ← θ − η_t λθ with λ = 0.1.

ARG: PRESET[,steps=N] (``presets.parse_arg``), PRESET "accelerator" or "cpu" (without one: "cpu" on a host without an accelerator).
"""

from stability.presets import PAPER_LRS, common

NAME = "weight_decay"


def get_sweep(arg: str = ""):
    base = common(arg, NAME)
    return [
        {**base, "optim.weight_decay_mode": mode, "optim.weight_decay": wd, "optim.lr": lr}
        for mode, wd in (("independent", 1e-4), ("coupled", 0.1))
        for lr in PAPER_LRS
    ]
