"""Compile once, ever: the persistent XLA compilation cache and per-program compile reports.

The cache is on by default under ``$XDG_CACHE_HOME/stability/jax`` (``~/.cache/stability/jax``).
``STABILITY_COMPILATION_CACHE=DIR`` (or ``--compilation-cache=DIR`` on the command line) moves
it; ``off`` leaves JAX's own settings alone (no cache unless ``JAX_COMPILATION_CACHE_DIR`` is
set). A directory that JAX was already given (``JAX_COMPILATION_CACHE_DIR`` or
``jax.config``) is kept. Every program the training loops compile is reported on stderr, one
line each: its compile time, or "from cache".
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax

from stability import workdir as W

ENV = "STABILITY_COMPILATION_CACHE"
BARRIER_TIMEOUT_MS = 60 * 60 * 1000  # the slowest process's compile of one program
_barriers = itertools.count()
_configured = False
_hits = 0
_hits_lock = threading.Lock()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stability" / "jax"


def setup_compilation_cache(spec: str | None = None) -> str | None:
    """Turn on the persistent compilation cache (once per process); ``spec`` is a directory,
    ``"off"``, or None for ``$STABILITY_COMPILATION_CACHE`` / the default. Returns the
    directory in use, or None."""
    global _configured
    if spec is None:
        spec = os.environ.get(ENV) or None
    if _configured and spec is None:
        return jax.config.jax_compilation_cache_dir
    _configured = True
    jax.monitoring.register_event_listener(_count_hits)
    if spec == "off":
        return jax.config.jax_compilation_cache_dir
    if spec is None and jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir  # JAX was given a cache directory already
    path = W.path(os.path.expanduser(spec) if spec else default_cache_dir())  # local or gs://
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Store every program: even the small eval program takes seconds to compile on a TPU pod.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(path)


def _count_hits(event: str, **kwargs) -> None:
    global _hits
    if event == "/jax/compilation_cache/cache_hits":
        with _hits_lock:
            _hits += 1


def _signature(args) -> tuple:
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple(
        (getattr(x, "shape", None), str(getattr(x, "dtype", type(x))), getattr(x, "sharding", None))
        for x in leaves
    )


def wait_for_all_processes() -> None:
    """With several JAX processes: return once every process got here (a coordination-service
    barrier, not a collective). XLA:CPU's cross-process collectives (Gloo) give up when a
    process reaches a device group's first collective 30 s after the others, so every process
    waits here before a collective that some of them may reach late: after a compile (JAX
    writes the persistent cache from process 0 only, and on CPU the other processes' cache keys
    differ, so process 0 may load a program in seconds while the others compile it for
    minutes), and after host work that only process 0 does (opening the run records and W&B)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    barrier = f"stability_compiled_{next(_barriers)}"  # the same sequence in every process
    distributed.global_state.client.wait_at_barrier(barrier, BARRIER_TIMEOUT_MS)


class Program:
    """A jitted function compiled ahead of time once per argument signature; each compile is
    reported on stderr as ``compiled NAME in S s`` or ``NAME: from cache (S s)``."""

    def __init__(self, name: str, jitted: Any):
        self.name, self.jitted, self._compiled = name, jitted, {}

    def compile(self, *args):
        key = _signature(args)
        compiled = self._compiled.get(key)
        if compiled is None:
            hits, t0 = _hits, time.perf_counter()
            compiled = self.jitted.lower(*args).compile()
            seconds = time.perf_counter() - t0
            if _hits > hits:
                print(f"{self.name}: from cache ({seconds:.1f} s)", file=sys.stderr)
            else:
                print(f"compiled {self.name} in {seconds:.1f} s", file=sys.stderr)
            self._compiled[key] = compiled
            wait_for_all_processes()
        return compiled

    def __call__(self, *args):
        return self.compile(*args)(*args)
