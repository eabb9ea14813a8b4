"""μParam (Wortsman et al. 2023 §3.2): standard vs μParam (full) at the preset's two widths
× LRs with qk-layernorm, plus μParam without qk-layernorm at the larger width. μParam keeps the
optimal LR stable across widths but does not replace qk-layernorm. The base width of μParam is
the smaller width. ARG: tiny | cpu | accelerator (``stability.reproduce``)."""

from stability.reproduce import finding_grid

NAME = "mup"


def get_sweep(arg: str = "cpu"):
    preset, base, lrs, sizes = finding_grid(arg, "reproduce_mup")
    base_d = sizes[0]["model.d_model"]
    points = []
    for param, qk, widths in (
        ("standard", True, sizes),
        ("mup_full", True, sizes),
        ("mup_full", False, sizes[-1:]),
    ):
        for size in widths:
            mult = base_d / size["model.d_model"] if param == "mup_full" else 1.0
            for lr in lrs:
                points.append(
                    {
                        **base,
                        **size,
                        "model.qk_norm": qk,
                        "optim.parametrization": param,
                        **({"optim.mup_base_d_model": base_d} if param != "standard" else {}),
                        "model.logit_multiplier": mult,
                        "optim.lr": lr,
                    }
                )
    return points
