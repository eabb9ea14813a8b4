"""Every stabilizer alone, against the baseline without qk-layernorm, × the LR grid.

All settings start from the paper's recipe with qk-layernorm off (the unstable baseline), so
each row shows what one intervention buys on its own. ARG: PRESET[,steps=N]
(``presets.parse_arg``), PRESET "accelerator" or "cpu" (without one: "cpu" on a host without an accelerator).
"""

from stability.presets import PAPER_LRS, common

NAME = "stabilizers"

STABILIZERS = {
    "baseline": {},
    "qk_norm": {"model.qk_norm": True},
    "sigma_reparam": {"model.linear": "sigma_reparam"},
    "powernorm": {"model.norm": "powernorm"},
    "ls_attention": {"model.n_local_heads": 2, "model.local_window": 16},
    "softplus": {"model.attention_score": "softplus"},
    "softplus_reweight": {"model.attention_score": "softplus", "model.softplus_reweight": True},
    "relu_attention": {"model.attention_score": "relu"},
    "attn_softcap": {"model.attn_softcap": 30.0},
    "logit_softcap": {"model.logit_softcap": 30.0},
    "sink_decorrelation": {"model.sink_decorrelation": 1.0},
    "no_z_loss": {"train.z_loss": 0.0},
}


def get_sweep(arg: str = ""):
    base = {**common(arg, NAME), "model.qk_norm": False}
    return [
        {**base, **switches, "optim.lr": lr}
        for switches in STABILIZERS.values()
        for lr in PAPER_LRS
    ]
