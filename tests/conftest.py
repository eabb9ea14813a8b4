import atexit
import dataclasses
import os
import shutil
import socket
import tempfile

import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
# Tiny test models: compile time dominates. XLA's -O0 cuts it ~3x, and XLA:CPU's older
# (non-MLIR) fusion emitters halve what is left: a tiny model's train step compiles in 2.3 s
# instead of 4.8 s. Inherited by the subprocesses the tests start, so resumed and
# uninterrupted runs use the same code.
for flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
os.environ.setdefault("WANDB_SILENT", "true")
# One persistent compilation cache for the whole session, shared with the subprocesses the tests
# start: the same tiny programs are compiled by dozens of tests and runs. Never the user's cache;
# tests of the cache itself pass their own directory.
# With pytest-xdist the workers inherit the controller's directory; its creator removes it.
if "STABILITY_COMPILATION_CACHE" not in os.environ:
    os.environ["STABILITY_COMPILATION_CACHE"] = tempfile.mkdtemp(
        prefix="stability-tests-jax-cache-"
    )
    atexit.register(shutil.rmtree, os.environ["STABILITY_COMPILATION_CACHE"], ignore_errors=True)

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
        train=TrainConfig(
            steps=20, log_every=5, eval_every=10, eval_batches=2, checkpoint_every=10
        ),
    )
    for name, fields in sections.items():
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)})
    validate(cfg)
    return cfg


def tfds_text_config(prefix: str, batch_size: int, **sections) -> Config:
    """``tiny_config`` on the test tfds dataset and SentencePiece model under ``prefix`` (a
    local directory or gs://...; tests/data builds them), with ``sections`` as there."""
    data = {
        "source": "tfds",
        "tfds_name": "stability_test_text",
        "tfds_data_dir": f"{prefix}/tfds",
        "tokenizer": "sentencepiece",
        "tokenizer_path": f"{prefix}/sp.model",
        "batch_size": batch_size,
        "markov_vocab": DataConfig.markov_vocab,  # back to the defaults: markov_* need markov
        "markov_branching": DataConfig.markov_branching,
    }
    return tiny_config(model={"vocab_size": 96}, data=data, **sections)


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


# The mean output logit is a mean of numbers of both signs near 0: compared absolutely.
ATOL_FOR = {"logits/mean": 1e-6}


def assert_records_close(
    a: list[dict],
    b: list[dict],
    rtol: float = 1e-6,
    atol: float = 0.0,
    rtol_for: dict[str, float] | None = None,
) -> None:
    """The same metric records: equal keys and non-float values, floats to ``rtol`` (``atol``);
    ``rtol_for`` maps a key prefix to its own rtol, ``ATOL_FOR`` to its own atol."""
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k, v in ra.items():
            if isinstance(v, float):
                tol = next((t for p, t in (rtol_for or {}).items() if k.startswith(p)), rtol)
                at = max(atol, next((t for p, t in ATOL_FOR.items() if k.startswith(p)), 0.0))
                np.testing.assert_allclose(rb[k], v, rtol=tol, atol=at, err_msg=k)
            else:
                assert rb[k] == v, k


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for jax.distributed coordinators of test processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny():
    return tiny_config


# The longest files first: with pytest-xdist (`make test`, one file per worker at a time) none
# of them is left to run alone at the end.
LONGEST_FIRST = (  # by their tests' summed durations, measured in a full run (2026-12-06)
    "test_multihost.py",
    "test_loop.py",
    "test_train_faults.py",
    "test_end_to_end.py",
    "test_timed_kills.py",
    "test_launcher.py",
    "test_sharding.py",
    "test_hostile_configs.py",
)


def pytest_collection_modifyitems(items):
    rank = lambda item: next(
        (i for i, name in enumerate(LONGEST_FIRST) if item.path.name == name), len(LONGEST_FIRST)
    )
    items.sort(key=rank)  # stable: the order within each file is kept
