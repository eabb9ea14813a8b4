"""Output-logit divergence (Wortsman et al. 2023 §3.1.2): z-loss on/off × weight decay on/off.

Without weight decay the output logits drift very negative and training fails at high LR;
z-loss (1e-4·log²Z) prevents it. qk-layernorm stays on so attention-logit growth is excluded.
ARG: PRESET[,steps=N] (``presets.parse_arg``), PRESET "accelerator" or "cpu" (without one: "cpu" on a host without an accelerator).
"""

from stability.presets import PAPER_LRS, common

NAME = "z_loss"


def get_sweep(arg: str = ""):
    base = common(arg, NAME)
    return [
        {**base, "train.z_loss": z, "optim.weight_decay": wd, "optim.lr": lr}
        for z in (0.0, 1e-4)
        for wd in (0.0, 1e-4)
        for lr in PAPER_LRS
    ]
