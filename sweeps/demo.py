"""The CPU demo (`make demo`): qk-layernorm on/off × an LR grid, on the stdlib's source bytes.

Wortsman et al. 2023, Figure 1 at laptop scale: d=128, 2 layers, 4 heads, T=64, B=16, on
the paper's LR grid {3e-4 … 3e-1}. At this scale 400 steps suffice: without qk-layernorm the
max attention logit grows from ~10 to ~1e6 across the grid while attention entropy collapses to
0 and the loss degrades; with it the logits stay small. 14 runs (measured time: the README).
ARG: PRESET[,steps=N] (``presets.parse_arg``), PRESET "cpu" (default: the CPU preset at 400
steps) or "accelerator" (the paper's setting, ``presets.ACCELERATOR``).
"""

from stability.presets import ACCELERATOR, CPU, PAPER_LRS, parse_arg, with_steps

NAME = "demo"


def get_sweep(arg: str = ""):
    presets = {"cpu": with_steps(CPU, 400), "accelerator": ACCELERATOR}
    _, base = parse_arg(arg, NAME, default="cpu", presets=presets)
    return [
        {**base, "model.qk_norm": qk_norm, "optim.lr": lr}
        for qk_norm in (False, True)
        for lr in PAPER_LRS
    ]
