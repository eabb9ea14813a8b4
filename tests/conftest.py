import dataclasses
import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
# Tiny test models: compile time dominates, and XLA's -O0 cuts it ~3x (inherited by the
# subprocesses the tests start, so resumed and uninterrupted runs use the same code).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()
os.environ.setdefault("WANDB_SILENT", "true")
# Never write the user's persistent compilation cache (tests that need one pass a tmp dir).
os.environ.setdefault("STABILITY_COMPILATION_CACHE", "off")

from stability.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig, validate  # noqa: E402


def tiny_config(**sections) -> Config:
    """A seconds-scale config: d=32, 2 layers, 2 heads, T=16, B=4, synthetic Markov data.

    ``sections`` maps a section name to a dict of field overrides, e.g. model={"qk_norm": False}.
    """
    cfg = Config(
        model=ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2),
        optim=OptimConfig(lr=3e-3, warmup_steps=5),
        data=DataConfig(
            source="synthetic_markov", seq_len=16, batch_size=4, markov_vocab=64, markov_branching=8
        ),
        train=TrainConfig(steps=20, log_every=5, eval_every=10, eval_batches=2, checkpoint_every=10),
    )
    for name, fields in sections.items():
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)})
    validate(cfg)
    return cfg


def write_config_file(path, cfg: Config) -> str:
    """A get_config() file returning ``cfg`` (for `stability train|sweep --config=...`)."""
    from stability.config import to_config_dict

    path.write_text(
        "import ml_collections\n"
        f"D = {to_config_dict(cfg).to_dict()!r}\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict(D)\n"
    )
    return str(path)


@pytest.fixture
def tiny():
    return tiny_config
