"""μParam (Wortsman et al. 2023 §3.2): standard vs μParam (simple) vs μParam (full) across
widths × the LR grid. μParam keeps the optimal LR stable across width; qk-layernorm stays on.

ARG: PRESET[,steps=N] (``presets.parse_arg``): "accelerator" (the default on a host with an accelerator; widths 256…1024, base
256) or "cpu" (widths 64, 128, 256, base 64).
"""

from stability.presets import PAPER_LRS, parse_arg

NAME = "mup"


def get_sweep(arg: str = ""):
    preset, base = parse_arg(arg, NAME)
    widths, base_d = ((64, 128, 256), 64) if preset == "cpu" else ((256, 512, 1024), 256)
    points = []
    for param in ("standard", "mup_simple", "mup_full"):
        for d in widths:
            for lr in PAPER_LRS:
                points.append(
                    {
                        **base,
                        "model.d_model": d,
                        "model.n_heads": max(1, d // 64),
                        "optim.parametrization": param,
                        **({"optim.mup_base_d_model": base_d} if param != "standard" else {}),
                        "model.logit_multiplier": base_d / d if param == "mup_full" else 1.0,
                        "optim.lr": lr,
                    }
                )
    return points
