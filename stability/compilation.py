"""Compile once, ever: the persistent XLA compilation cache, stored executables, and
per-program compile reports.

The cache is on by default under ``$XDG_CACHE_HOME/stability/jax`` (``~/.cache/stability/jax``).
``STABILITY_COMPILATION_CACHE=DIR`` (or ``--compilation-cache=DIR`` on the command line) moves
it; ``off`` leaves JAX's own settings alone (no cache unless ``JAX_COMPILATION_CACHE_DIR`` is
set). A directory that JAX was already given (``JAX_COMPILATION_CACHE_DIR`` or
``jax.config``) is kept.

Beside JAX's cache (``DIR/stability-executables``), each :class:`Program` stores its compiled
executable (``jax.experimental.serialize_executable``), keyed by what decides the program
without tracing it: the program's name and static config, its arguments' shapes, dtypes and
shardings, the devices and process, the versions of Python, jax, jaxlib, flax, optax and numpy,
JAX's settings, ``XLA_FLAGS`` and the source the programs are traced from
(:func:`source_files`). A later process with the same key loads the executable and skips
tracing, lowering and XLA; any other key compiles as before (the persistent cache still serves
XLA's part). Every program is reported on stderr, one line each: its compile time, "from
cache" or "loaded executable".
"""

from __future__ import annotations

import ast
import functools
import hashlib
import itertools
import os
import pickle
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
from jax.experimental import serialize_executable

from stability import workdir as W

ENV = "STABILITY_COMPILATION_CACHE"
EXECUTABLES = "stability-executables"  # beside JAX's cache entries, in its directory
PACKAGE = Path(__file__).resolve().parent
TRACED_FROM = "programs.py"  # every Program is built there, from the modules it imports
_STARTED = time.time()  # source files changed after this may differ from the code running
_said_source_changed = False
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


def executables_dir() -> Path | None:
    """Where programs store their executables: beside the persistent compilation cache, or
    None when it is off."""
    cache = jax.config.jax_compilation_cache_dir
    if not cache or not jax.config.jax_enable_compilation_cache:
        return None
    return W.path(cache) / EXECUTABLES


@functools.cache
def source_files(root: Path = PACKAGE) -> tuple[Path, ...]:
    """The package's files that programs are traced from: :data:`TRACED_FROM` and every module
    of the package it imports, transitively (imports inside functions included), with the
    ``__init__.py`` of each package on the way. Host-only modules (the CLI, reports, the loop)
    are not among them, so editing those keeps the stored executables."""
    seen: set[Path] = set()
    todo = [root / TRACED_FROM]
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        package = file.relative_to(root).parent.parts
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = [a.name.split(".") for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the file's own package upwards
                    up = package[: len(package) - node.level + 1]
                    module = ["stability", *up, *(node.module.split(".") if node.module else [])]
                else:
                    module = (node.module or "").split(".")
                names = [module] + [[*module, a.name] for a in node.names]
            else:
                continue
            for parts in names:
                if parts[0] != "stability":
                    continue
                for i in range(1, len(parts) + 1):  # the packages on the way, then the module
                    base = root.joinpath(*parts[1:i])
                    todo += [
                        f for f in (base / "__init__.py", base.with_suffix(".py")) if f.is_file()
                    ]
    return tuple(sorted(seen))


def source_digest() -> str | None:
    """A digest of :func:`source_files`; None when one of them changed after this module was
    imported (the code running may not be the code on disk)."""
    digest = hashlib.sha256()
    for file in source_files(PACKAGE):
        if file.stat().st_mtime > _STARTED:
            return None
        digest.update(str(file.relative_to(PACKAGE)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def environment() -> tuple:
    """Everything besides a program's own key and arguments that decides its executable."""
    import flax
    import jaxlib
    import numpy
    import optax

    client = jax.devices()[0].client
    settings = sorted(
        (k, repr(v)) for k, v in jax.config.values.items() if "cache" not in k and "log" not in k
    )
    return (
        sys.version,
        [m.__version__ for m in (jax, jaxlib, flax, optax, numpy)],
        client.platform,
        client.platform_version,
        [(d.id, d.process_index, d.device_kind) for d in jax.devices()],
        (jax.process_index(), jax.process_count()),
        os.environ.get("XLA_FLAGS", ""),
        os.environ.get("LIBTPU_INIT_ARGS", ""),
        settings,
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
    """A jitted function compiled ahead of time once per argument signature, its executable
    stored and loaded by ``key`` (the program's static config: everything besides its
    arguments and :func:`environment` that decides what ``jitted`` traces to). Each compile
    is reported on stderr as ``compiled NAME in S s``, ``NAME: from cache (S s)`` or ``NAME:
    loaded executable (S s)``."""

    def __init__(self, name: str, jitted: Any, key: str):
        self.name, self.jitted, self.key, self._compiled = name, jitted, key, {}

    def compile(self, *args):
        signature = _signature(args)
        compiled = self._compiled.get(signature)
        if compiled is None:
            t0 = time.perf_counter()
            file = self._file(signature)
            compiled = self._load(file) if file is not None else None
            if compiled is not None:
                seconds = time.perf_counter() - t0
                print(f"{self.name}: loaded executable ({seconds:.1f} s)", file=sys.stderr)
            else:
                hits = _hits
                compiled = self.jitted.lower(*args).compile()
                seconds = time.perf_counter() - t0
                if _hits > hits:
                    # Not stored: an XLA:CPU executable loaded from JAX's cache serializes
                    # without some of its kernels ("Function ... not found" when run).
                    print(f"{self.name}: from cache ({seconds:.1f} s)", file=sys.stderr)
                else:
                    print(f"compiled {self.name} in {seconds:.1f} s", file=sys.stderr)
                    if file is not None:
                        self._store(file, compiled)
            self._compiled[signature] = compiled
            wait_for_all_processes()
        return compiled

    def _file(self, signature) -> Path | None:
        """Where this program's executable for ``signature`` is stored; None when the store
        is off, the source changed under this process, or the key is not reproducible."""
        global _said_source_changed
        directory = executables_dir()
        if directory is None:
            return None
        source = source_digest()
        if source is None:
            if not _said_source_changed:
                _said_source_changed = True
                print(
                    "note: the source files stability's programs are traced from changed after "
                    "this process imported them; their executables are neither loaded nor stored",
                    file=sys.stderr,
                )
            return None
        text = repr((self.name, self.key, signature, environment(), source))
        if " at 0x" in text:  # a key that differs in every process
            return None
        return directory / f"{hashlib.sha256(text.encode()).hexdigest()}.executable"

    def _load(self, file: Path):
        if not file.exists():
            return None
        try:
            return serialize_executable.deserialize_and_load(*pickle.loads(file.read_bytes()))
        except Exception as e:  # a partial or foreign file: compile instead, then replace it
            print(
                f"warning: {self.name}: stored executable {file} not loaded "
                f"({type(e).__name__}: {e}); compiling",
                file=sys.stderr,
            )
            return None

    def _store(self, file: Path, compiled) -> None:
        try:
            data = pickle.dumps(serialize_executable.serialize(compiled))
            file.parent.mkdir(parents=True, exist_ok=True)
            W.write_bytes(file, data)  # readers see a whole file or none
        except Exception as e:  # training goes on; the next process compiles again
            print(f"warning: {self.name}: executable not stored ({e})", file=sys.stderr)

    def __call__(self, *args):
        return self.compile(*args)(*args)
