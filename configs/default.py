"""Default config: the paper's recipe at CPU size on byte-level stdlib source text.

Usage: stability train --config=configs/default.py[:SIZE] --workdir=runs/x
SIZE is a preset of stability.config.SIZES (default "s": d=128, 2 layers, 4 heads).
"""

from stability.config import default_config_dict, size_preset


def get_config(size: str = "s"):
    config = default_config_dict()
    config.model.update(size_preset(size))
    return config
