"""The CPU demo (`make demo`): qk-layernorm on/off × an LR grid, on the stdlib's source bytes.

Wortsman et al. 2023, Figure 1 at laptop scale: d=128, 2 layers, 4 heads, T=64, B=16, on
the paper's LR grid {3e-4 … 3e-1}. At this scale 400 steps suffice: without qk-layernorm the
max attention logit grows from ~10 to ~1e6 across the grid while attention entropy collapses to
0 and the loss degrades; with it the logits stay small. 14 runs, about 9 minutes on 2 cores.
ARG (optional): number of steps (default 400).
"""

from stability.presets import PAPER_LRS

NAME = "demo"


def get_sweep(arg: str = ""):
    steps = int(arg) if arg else 400
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
        for lr in PAPER_LRS
    ]
