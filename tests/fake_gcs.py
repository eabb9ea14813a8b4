"""A fake Google Cloud Storage bucket for tests: ``gs://BUCKET/key`` paths served from a local
directory, with an object store's rules, and devices that answer memory queries as a pod's do.

What it does, and why it is faithful enough:

- Every ``etils.epath`` operation on a ``gs://`` path (the one path layer of the package, and
  of tfds and orbax) is served from ``ROOT/BUCKET/key`` through ``etils.epath.testing``'s
  ``mock_epath``. So the code under test sees ``gs://`` strings end to end and may only reach
  them through epath, as on a real bucket; ``os.path``/``open`` on such a string fails, as it
  would on a pod (there is no ``gs:`` directory in the working directory).
- An object store cannot append: opening a ``gs://`` path in append mode raises, as gcsfs
  does. Whole-object writes and reads, listing, rename and deletion work.
- Three libraries reach GCS with clients of their own, not through epath: orbax (tensorstore's
  ``gcs`` driver, google-cloud-storage), array_record's reader (riegeli's ``GcsReader``) and
  sentencepiece. For orbax and array_record the fake translates the ``gs://`` path they are
  given to the local directory at their entry points; what is tested is that our code hands
  them the remote path, not their GCS clients.
- ``pod_devices()``: ``memory_stats()`` of a device of another process raises as on a
  multi-host TPU slice (``MemoryStats is only supported for addressable PjRt devices``), and a
  local device reports a ``bytes_limit``; on CPU JAX would otherwise return None for both.

Child processes get both through ``tests/pod/sitecustomize.py`` (``STABILITY_FAKE_GCS=ROOT``,
``STABILITY_FAKE_POD=1``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PREFIX = "gs://"
POD_BYTES_LIMIT = 16 * 2**30


def local(path, root: Path) -> str:
    """The local file that serves ``path`` (unchanged unless it is a gs:// path)."""
    s = os.fspath(path)
    return str(root / s[len(PREFIX) :]) if s.startswith(PREFIX) else s


def remote(path: str, root: Path) -> str:
    """The gs:// path a local file under ``root`` serves."""
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else PREFIX + rel


@contextlib.contextmanager
def bucket(root: Path):
    """Serve gs:// paths from ``root`` (module docstring) for the duration."""
    from etils.epath import testing

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    to_local = lambda p: local(p, root)

    def one(fn, path, *args, **kwargs):
        return fn(to_local(path), *args, **kwargs)

    def two(fn, src, dst, *args, **kwargs):
        return fn(to_local(src), to_local(dst), *args, **kwargs)

    def open_(fn, path, mode, *args, **kwargs):
        if os.fspath(path).startswith(PREFIX) and "a" in mode:
            raise OSError(f"{path}: an object store cannot append (mode {mode!r})")
        return fn(to_local(path), mode, *args, **kwargs)

    def glob(fn, pattern):
        return [
            remote(p, root) if os.fspath(pattern).startswith(PREFIX) else p
            for p in fn(to_local(pattern))
        ]

    def walk(fn, top, **kwargs):
        for d, dirs, files in fn(to_local(top), **kwargs):
            yield (remote(d, root) if os.fspath(top).startswith(PREFIX) else d), dirs, files

    with contextlib.ExitStack() as stack:
        stack.enter_context(
            testing.mock_epath(
                open=open_,
                copy=two,
                rename=two,
                replace=two,
                exists=one,
                isdir=one,
                listdir=one,
                makedirs=one,
                mkdir=one,
                remove=one,
                rmtree=one,
                stat=one,
                glob=glob,
                walk=walk,
            )
        )
        stack.enter_context(_translated_clients(to_local))
        yield root


@contextlib.contextmanager
def _translated_clients(to_local):
    """orbax's CheckpointManager and array_record's reader get the local path of a gs:// one."""
    from unittest import mock

    import orbax.checkpoint as ocp
    from array_record.python import array_record_data_source as ards

    init = ocp.CheckpointManager.__init__
    create_reader = ards._create_reader

    def manager(self, directory, *args, **kwargs):
        return init(self, to_local(directory), *args, **kwargs)

    with (
        mock.patch.object(ocp.CheckpointManager, "__init__", manager),
        mock.patch.object(ards, "_create_reader", lambda f, *a: create_reader(to_local(f), *a)),
    ):
        yield


def pod_devices() -> contextlib.AbstractContextManager:
    """Devices whose ``memory_stats()`` behave as on a multi-host slice (module docstring)."""
    from unittest import mock

    import jax

    def memory_stats(self):
        if self.process_index != jax.process_index():
            raise RuntimeError(
                "INVALID_ARGUMENT: MemoryStats is only supported for addressable PjRt devices"
            )
        return {"bytes_limit": POD_BYTES_LIMIT, "bytes_in_use": 0}

    return mock.patch.object(jax.Device, "memory_stats", memory_stats)  # backends untouched
