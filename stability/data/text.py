"""Byte-level text: files (local or on a bucket, through ``etils.epath``), or the Python
standard library's own sources.

The corpus is read once into one uint8 array (documents joined by a newline), split into a
train stream and a held-out tail. The batch at step s is a pure function of (seed, s): its
sequences start at offsets drawn from ``numpy.random.default_rng((seed, s))``.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import platform
import sys
import sysconfig
from pathlib import Path

import numpy as np

from stability import workdir as W
from stability.config import ConfigError, DataConfig
from stability.data.stream import IndexedStream


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, ...]:
    """Every .py file of this interpreter's standard library (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts
    ]
    return tuple(sorted(files))


def find_files(paths: tuple[str, ...], include: tuple[str, ...]) -> list[W.Path]:
    """Files named in ``paths``; directories are searched recursively for ``include`` globs."""
    found: list[W.Path] = []
    for raw in paths:
        p = W.path(os.path.expanduser(raw))
        if p.is_dir():
            files = sorted(W.path(d) / name for d, _, names in p.walk() for name in names)
            matched = [f for f in files if any(fnmatch.fnmatch(f.name, g) for g in include)]
            if not matched:
                held = ", ".join(str(f.relative_to(p)) for f in files[:5])
                more = f" and {len(files) - 5} more" if len(files) > 5 else ""
                raise ConfigError(
                    f"config.data.paths: no file in {raw!r} matches config.data.include="
                    f"{list(include)!r}; it holds {len(files)} files"
                    + (f" ({held}{more})" if files else "")
                )
            found += matched
        elif p.exists():
            found.append(p)
        else:
            raise ConfigError(f"config.data.paths: {raw!r} does not exist")
    return found


@functools.lru_cache(maxsize=4)
def _read_corpus(files: tuple) -> np.ndarray:
    chunks = []
    for f in files:
        data = f.read_bytes()
        if data:
            chunks.append(np.frombuffer(data, np.uint8))
            chunks.append(np.frombuffer(b"\n", np.uint8))
    return np.concatenate(chunks) if chunks else np.zeros((0,), np.uint8)


class ByteTextSource:
    """Byte tokens (vocabulary 256) of local text files or of the stdlib sources."""

    loss_floor = None

    def __init__(self, cfg: DataConfig):
        if cfg.source == "stdlib":
            files = stdlib_files()
            where = "the Python standard library"
        else:
            files = find_files(cfg.paths, cfg.include)
            where = f"config.data.paths={list(cfg.paths)!r}"
        corpus = _read_corpus(tuple(files))
        n_eval = int(len(corpus) * cfg.eval_fraction)
        need = cfg.seq_len + 1
        if len(corpus) - n_eval < need or n_eval < need:
            raise ConfigError(
                f"{where} holds {len(corpus)} bytes, too short for config.data.seq_len="
                f"{cfg.seq_len} with eval_fraction={cfg.eval_fraction} (need > {need} tokens in "
                f"each split)"
            )
        self._cfg = cfg
        self._train = corpus[: len(corpus) - n_eval]
        self._eval = corpus[len(corpus) - n_eval :]
        self.description = {
            "source": cfg.source,
            "files": len(files),
            "bytes": int(len(corpus)),
            "python_version": platform.python_version() if cfg.source == "stdlib" else None,
            "python_implementation": sys.implementation.name,
        }

    def _batch(self, seed: int, step: int) -> dict[str, np.ndarray]:
        cfg = self._cfg
        rng = np.random.default_rng((seed, step))
        starts = rng.integers(0, len(self._train) - cfg.seq_len - 1, size=cfg.batch_size)
        idx = starts[:, None] + np.arange(cfg.seq_len + 1)[None, :]
        return {"tokens": self._train[idx].astype(np.int32)}

    def train_stream(self, seed: int, rows=None) -> IndexedStream:
        return IndexedStream(self._batch, seed, rows)

    def eval_batches(self, n: int) -> list[dict[str, np.ndarray]]:
        """``n`` batches of consecutive, non-overlapping windows of the held-out tail."""
        cfg = self._cfg
        need = cfg.seq_len + 1
        n_windows = len(self._eval) // need
        rows = np.arange(n * cfg.batch_size) % n_windows
        idx = rows[:, None] * need + np.arange(need)[None, :]
        toks = self._eval[idx].astype(np.int32).reshape(n, cfg.batch_size, need)
        return [{"tokens": t} for t in toks]
