"""Output-logit divergence and z-loss (Wortsman et al. 2023 §3.1.2, Figures 3-4; qk-layernorm
on, no weight decay): z-loss 0 vs 1e-4 at LR 0.1 (the paper's Figure 4) and 0.3, one small model
(cpu: d=32, 2 layers) on the byte vocabulary, run 10× longer than the other experiments (cpu:
2000 steps, an eval every 250) so that a drift of the output logits and a late rise of the loss
have time to show. ARG: PRESET[,steps=N] (``stability.reproduce.presets``)."""

from stability.reproduce.presets import points

NAME = "z_loss"


def get_sweep(arg: str = "cpu"):
    return points(NAME, arg)
