"""Independent (λ = 1e-4) vs coupled (λ = 0.1, AdamW's) weight decay × LRs, qk-layernorm off,
at the larger of the preset's two sizes (Wortsman et al. 2023 §3.3): independent decay
lowers LR sensitivity. ARG: tiny | cpu | accelerator (``stability.reproduce``)."""

from stability.reproduce import finding_grid

NAME = "weight_decay"


def get_sweep(arg: str = "cpu"):
    preset, base, lrs, sizes = finding_grid(arg, "reproduce_weight_decay")
    return [
        {
            **base,
            **sizes[-1],
            "model.qk_norm": False,
            "optim.weight_decay_mode": mode,
            "optim.weight_decay": wd,
            "optim.lr": lr,
        }
        for mode, wd in (("independent", 1e-4), ("coupled", 0.1))
        for lr in lrs
    ]
