"""A stream whose global batch at step s is a pure function of (seed, s): synthetic data and
byte-level text; resuming is setting s."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class IndexedStream:
    """A stream whose global batch at step s is ``batch_fn(seed, s)``: resuming is setting s.
    Every process computes the whole batch and keeps its ``rows``."""

    def __init__(self, batch_fn, seed: int, rows: Sequence[int] | None = None):
        self._batch_fn, self._seed, self._step = batch_fn, seed, 0
        self._rows = None if rows is None else np.asarray(rows)

    def next(self) -> dict[str, np.ndarray]:
        batch = self._batch_fn(self._seed, self._step)
        self._step += 1
        if self._rows is None:
            return batch
        return {k: v[self._rows] for k, v in batch.items()}

    def state(self) -> dict[str, Any]:
        return {"step": self._step}

    def restore(self, state: dict[str, Any]) -> None:
        self._step = int(state["step"])
