"""A second initialisation seed (train.seed=1, same batches) for the runs of ``sweeps/sizes.py``
without qk-layernorm at the preset's two smallest sizes: with it the forecast's fits have
residual degrees of freedom, hence prediction intervals, also when the largest size is held
out. Read together with the size sweep: ``stability forecast SIZES_DIR SEED1_DIR ...``.

ARG: a preset of ``stability.reproduce`` (tiny | cpu | accelerator).
"""

from stability.reproduce import preset_base, preset_lrs, preset_sizes

NAME = "forecast_seed1"


def get_sweep(arg: str = "cpu"):
    base = preset_base(arg, NAME)
    return [
        {**base, **size, "model.qk_norm": False, "train.seed": 1, "optim.lr": lr}
        for size in preset_sizes(arg, NAME)[:2]
        for lr in preset_lrs(arg, NAME)
    ]
