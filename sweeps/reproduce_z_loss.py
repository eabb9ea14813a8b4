"""Output-logit divergence (Wortsman et al. 2023 §3.2): without weight decay the output logits
drift (mean log Z very negative) and z-loss prevents it. Settings: no weight decay without and
with z-loss (1e-4), and weight decay 1e-4 without z-loss, × LRs, qk-layernorm on, at the larger
of the preset's two sizes with a vocabulary of 4096 on the CPU (3840 tokens never seen in the
byte data, whose logits nothing holds up). ARG: tiny | cpu | accelerator."""

from stability.reproduce import finding_grid

NAME = "z_loss"


def get_sweep(arg: str = "cpu"):
    preset, base, lrs, sizes = finding_grid(arg, "reproduce_z_loss")
    if preset == "cpu":
        base = {**base, "model.vocab_size": 4096}
    return [
        {**base, **sizes[-1], "train.z_loss": z, "optim.weight_decay": wd, "optim.lr": lr}
        for z, wd in ((0.0, 0.0), (1e-4, 0.0), (0.0, 1e-4))
        for lr in lrs
    ]
