"""Token batch streams.

Every source yields batches ``{"tokens": int32[B, T+1]}`` (inputs are ``tokens[:, :-1]``,
targets ``tokens[:, 1:]``); a source may add boolean masks ``[B, T]`` over target positions
(e.g. ``mask_icl``/``mask_markov`` for bigram-backcopy), which the train step turns into
separate losses. A stream's position is a small JSON-able ``state()`` that the checkpoint
stores, so a resumed run sees exactly the batches an uninterrupted run would.

The global batch is a function of (seed, step) only, never of how many JAX processes share it:
a stream built for some ``rows`` of the global batch (the rows this process's devices hold)
yields exactly those rows of it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from stability.config import ConfigError, DataConfig
from stability.data.stream import IndexedStream

__all__ = ["IndexedStream", "Source", "Stream", "make_source"]


class Stream(Protocol):
    """A deterministic, resumable stream of (some rows of) the global training batches."""

    def next(self) -> dict[str, np.ndarray]: ...

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...


class Source(Protocol):
    """A data source: a train stream plus a fixed held-out set."""

    loss_floor: float | None  # known entropy rate (nats/token) when the source has one
    description: dict[str, Any]  # recorded with the run (e.g. corpus size, Python version)

    def train_stream(self, seed: int, rows: Sequence[int] | None = None) -> Stream:
        """Rows ``rows`` (all by default) of the global batches of run seed ``seed``."""

    def eval_batches(self, n: int) -> list[dict[str, np.ndarray]]: ...


def make_source(cfg: DataConfig, vocab_size: int) -> Source:
    """The data source named by ``cfg.source`` (errors name the data.* field), built once per
    process for each data config: a sweep's chunks and seeds share it (the seed is the
    stream's, ``train_stream(seed)``; a source is never changed by reading it)."""
    return _source(dataclasses.replace(cfg, seed=0), vocab_size)


@functools.lru_cache(maxsize=8)
def _source(cfg: DataConfig, vocab_size: int) -> Source:
    if cfg.source in ("stdlib", "text_files"):
        from stability.data import text

        return text.ByteTextSource(cfg)
    if cfg.source == "synthetic_markov":
        from stability.data import synthetic

        return synthetic.ZipfMarkovSource(cfg)
    if cfg.source == "bigram_backcopy":
        from stability.data import backcopy

        return backcopy.BigramBackcopySource(cfg, vocab_size)
    if cfg.source == "tfds":
        from stability.data import tfds

        return tfds.TfdsSource(cfg, vocab_size)
    raise ConfigError(f"config.data.source={cfg.source!r} is unknown")
