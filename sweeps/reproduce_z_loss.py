"""Output-logit divergence (Wortsman et al. 2023 §3.1.2): without weight decay the output
logits drift (mean log Z very negative) and z-loss prevents it. Settings: no weight decay
without and with z-loss (1e-4), and weight decay without z-loss, × LRs, qk-layernorm on, at
the larger of the preset's two sizes. On the CPU: a vocabulary of 4096 (3840 tokens never seen
in the byte data, whose logits nothing holds up), 400 steps, and weight decay 5e-3 (the
paper's 1e-4 barely acts in so few steps). ARG: tiny | cpu | accelerator, [,steps=N]."""

from stability.reproduce import finding_grid

NAME = "z_loss"


def get_sweep(arg: str = "cpu"):
    preset, base, lrs, sizes = finding_grid(arg, "reproduce_z_loss")
    wd = 1e-4
    if preset == "cpu":
        base = {**base, "model.vocab_size": 4096, "train.steps": 400, "train.eval_every": 400,
                "train.checkpoint_every": 200, "optim.warmup_steps": 40}
        wd = 5e-3
    return [
        {**base, **sizes[-1], "train.z_loss": z, "optim.weight_decay": w, "optim.lr": lr}
        for z, w in ((0.0, 0.0), (1e-4, 0.0), (0.0, wd))
        for lr in lrs
    ]
