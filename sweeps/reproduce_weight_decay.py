"""Independent vs coupled weight decay × LRs, qk-layernorm off, at the larger of the preset's
two sizes (Wortsman et al. 2023 §3.2.2): independent decay θ ← θ − s_t·λ·θ against AdamW's
coupled θ ← θ − η_t·λ_c·θ, with λ_c = λ / η at the grid's middle LR (the two match there), and
an arm without decay that shows whether the decay acts at all (the final parameter RMS).
ARG: tiny | cpu | accelerator (``stability.reproduce``), [,steps=N]. On the CPU the paper's
λ = 1e-4 would shrink weights by ~1% in these few steps: λ = 5e-3 over 300 steps instead."""

from stability.reproduce import finding_grid

NAME = "weight_decay"


def get_sweep(arg: str = "cpu"):
    preset, base, lrs, sizes = finding_grid(arg, "reproduce_weight_decay")
    if preset == "cpu":
        base = {**base, "train.steps": 300, "train.eval_every": 300, "train.checkpoint_every": 150}
    lam = 1e-4 if preset == "accelerator" else 5e-3
    mid = lrs[len(lrs) // 2]
    arms = [
        {"optim.weight_decay_mode": "independent", "optim.weight_decay": lam},
        {"optim.weight_decay_mode": "coupled", "optim.weight_decay": lam / mid},
        {"optim.weight_decay": 0.0},
    ]
    return [
        {**base, **sizes[-1], "model.qk_norm": False, **arm, "optim.lr": lr}
        for arm in arms
        for lr in lrs
    ]
