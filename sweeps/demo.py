"""The CPU demo (`make demo`): qk-layernorm on/off × an LR grid, on the stdlib's source bytes.

Wortsman et al. 2023, Figure 1 at laptop scale: d=128, 2 layers, 4 heads, T=64, B=16.
The paper's grid {3e-4 … 3e-1} extended to 1.0 so the baseline's failure is visible.
ARG (optional): number of steps (default 500).
"""

NAME = "demo"
LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def get_sweep(arg: str = ""):
    steps = int(arg) if arg else 500
    common = {
        "model.d_model": 128,
        "model.n_layers": 2,
        "model.n_heads": 4,
        "train.steps": steps,
        "optim.warmup_steps": steps // 10,
        "train.eval_every": steps,
        "train.checkpoint_every": steps // 2,
        "train.log_every": 10,
    }
    return [
        {**common, "model.qk_norm": qk_norm, "optim.lr": lr}
        for qk_norm in (False, True)
        for lr in LRS
    ]
