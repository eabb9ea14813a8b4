"""Feeding the device: K batches per call as one transfer, prepared one call ahead.

A call of the training loop takes ``batches[k_max, B, T+1]`` (the first n rows of the leading
axis used, the rest zero padding, so one compiled program serves every n). Each process
builds only the rows of the global batch that its devices hold (``process_rows``) and places
them with ``jax.make_array_from_callback``; a background thread does this one call ahead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np


def process_rows(
    sharding: jax.sharding.Sharding, global_shape: tuple[int, ...], axis: int
) -> list[int]:
    """The indices along ``axis`` (the batch rows) held by this process's devices."""
    rows: set[int] = set()
    for idx in sharding.addressable_devices_indices_map(global_shape).values():
        rows.update(range(*idx[axis].indices(global_shape[axis])))
    return sorted(rows)


def place(
    local: np.ndarray, rows: list[int], sharding: jax.sharding.Sharding, global_shape, axis: int
) -> jax.Array:
    """The global array of ``global_shape`` of which this process holds ``local``: its
    ``rows`` along ``axis``, in that order."""
    where = {r: i for i, r in enumerate(rows)}

    def shard(idx):
        picked = [where[r] for r in range(*idx[axis].indices(global_shape[axis]))]
        out = np.take(local, picked, axis=axis)
        return out[tuple(slice(None) if a == axis else s for a, s in enumerate(idx))]

    return jax.make_array_from_callback(tuple(global_shape), sharding, shard)


def stack_padded(batches: list[dict[str, np.ndarray]], k_max: int) -> dict[str, np.ndarray]:
    """``{key: [k_max, ...]}``: the batches stacked, zero-padded to ``k_max``."""
    out = {}
    for key in batches[0]:
        first = batches[0][key]
        arr = np.zeros((k_max, *first.shape), first.dtype)
        for i, b in enumerate(batches):
            arr[i] = b[key]
        out[key] = arr
    return out


class Prefetcher:
    """Prepares the calls' batches in a background thread, one call ahead.

    For each n in ``sizes`` it takes n batches from ``stream`` and yields ``(on_device, host,
    stream_state)``: ``prepare(host)`` of the padded stack (``host``), and the stream's state
    after those n batches (what a checkpoint at the end of that call must store).
    """

    def __init__(self, stream, sizes: Iterable[int], k_max: int, prepare: Callable[[dict], Any]):
        self._stream, self._sizes, self._k_max, self._prepare = stream, sizes, k_max, prepare
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True, name="prefetch")
        self._thread.start()

    def _work(self) -> None:
        try:
            for n in self._sizes:
                host = stack_padded([self._stream.next() for _ in range(n)], self._k_max)
                if not self._put((self._prepare(host), host, self._stream.state())):
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def gather_stream_state(state: dict[str, Any]) -> dict[str, Any]:
    """The stream state of every process together. A per-row state (``{"rows": [[row, ...],
    ...]}``, each process holding its own rows) is gathered from all processes; any other
    state is the same on every process and returned as is. Every process must call this."""
    if jax.process_count() == 1 or "rows" not in state:
        return state
    from jax.experimental import multihost_utils

    local = np.asarray(state["rows"], np.int64)
    n_rows = state["batch_size"]
    table = np.full((n_rows, local.shape[1]), -1, np.int64)
    table[local[:, 0]] = local
    every = np.asarray(multihost_utils.process_allgather(table))  # [processes, B, fields]
    merged = every.max(axis=0)
    return {**state, "rows": merged[merged[:, 0] >= 0].tolist()}


class Feed:
    """Batches of one training stream as global arrays ``[k_max, B, T+1]`` on ``sharding``
    (batch rows on axis 1), this process reading only the rows its devices hold."""

    def __init__(self, source, seed: int, batch_size: int, sharding, k_max: int):
        self.k_max, self.sharding = k_max, sharding
        self.global_rows = (k_max, batch_size)
        self.rows = process_rows(sharding, self.global_rows, 1)
        self.stream = source.train_stream(seed, self.rows)

    def prepare(self, host: dict) -> dict:
        return {
            k: place(v, self.rows, self.sharding, (*self.global_rows, *v.shape[2:]), 1)
            for k, v in host.items()
        }

    def single(self, host: dict, i: int) -> dict:
        """Batch ``i`` of a prepared ``host`` stack alone, at position 0 (for a replay)."""
        return self.prepare(stack_padded([{k: v[i] for k, v in host.items()}], self.k_max))

    def prefetch(self, sizes: list[int]) -> Prefetcher:
        return Prefetcher(self.stream, sizes, self.k_max, self.prepare)
