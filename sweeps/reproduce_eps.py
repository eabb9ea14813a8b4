"""Adam's ε (Wortsman et al. 2023 §3.4): once gradient RMS nears ε the update shrinks, and a
smaller ε helps. At CPU scale gradients stay far above the default ε = 1e-8, so the proxy
raises ε to 1e-3 (where gradient RMS / ε of these models reaches about 1) and compares it
with 1e-8, × LRs, qk-layernorm on, at the larger of the preset's two sizes. ARG: tiny | cpu |
accelerator
(on the accelerator: 1e-8 vs 1e-15, the paper's own comparison)."""

from stability.reproduce import finding_grid

NAME = "eps"


def get_sweep(arg: str = "cpu"):
    preset, base, lrs, sizes = finding_grid(arg, "reproduce_eps")
    pair = (1e-8, 1e-15) if preset == "accelerator" else (1e-3, 1e-8)
    return [{**base, **sizes[-1], "optim.eps": eps, "optim.lr": lr} for eps in pair for lr in lrs]
