"""The paper's recipe on an accelerator: C4 with the T5 SentencePiece vocabulary, batch
256 × 512, 1e5 steps, bf16 compute with float32 master weights, at one size of the width
family (6 layers, head dim 64) with its FSDP/remat setting (``stability.presets.width``).

Usage: stability train --config=configs/accelerator.py:w4096 --workdir=runs/x \
           --config.data.tfds_data_dir=... --config.data.tokenizer_path=...
SIZE: w256 … w4096 (the paper's family) or w8192 (≈4.8B non-embedding parameters); default
w1024.
"""

from stability.config import default_config_dict
from stability.presets import ACCELERATOR, width


def get_config(size: str = "w1024"):
    config = default_config_dict()
    for key, value in {**ACCELERATOR, **width(size)}.items():
        section, name = key.split(".")
        config[section][name] = value
    return config
