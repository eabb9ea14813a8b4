"""The on-disk layout of a run and of a sweep, and how each file is written and read.

Every path goes through one layer, ``etils.epath`` (the one tfds and orbax use), so a workdir
or a dataset may be local or on a bucket (``gs://...``; ``pip install -e .[tpu]`` brings
``gcsfs``). Nothing else in the package opens a workdir's files.

A run directory (``stability train --workdir``, or ``<sweep>/runs/<run_id>``)::

  config.json      the run's full config (a rerun with another config is refused)
  metrics.jsonl    one record per logged step (the source of truth; W&B mirrors it)
  events.jsonl     early warnings (``watch.py``): one record per warning raised or cleared
  versions.json    Python and package versions of the last start
  wandb_id         the W&B run id (a resumed run continues the same W&B run)
  checkpoints/     orbax checkpoints (a single run's; a sweep keeps them per chunk)

A sweep directory (``stability sweep --workdir``)::

  sweep.json       the manifest, written before anything trains: sweep name, spec, run ids
                   (a rerun with other runs is refused) and the plan of every run (run_id,
                   setting, lr, seed): reports take each setting's LR grid from it
  results.jsonl    one record per finished run
  runs/<run_id>/   each run's directory, as above, without checkpoints/
  chunks/<id>/checkpoints/   the checkpoints of the stack of runs trained together, deleted
                   once all its runs have results (train.keep_final_checkpoint keeps them)
  report.md, *.png the report (``stability report``)

Records stay append-only and torn-write safe on both kinds of storage. A local JSONL file is
appended one flush at a time (one write, then fsync): `tail -f` follows it; a torn last line
is skipped by readers and cut on resume. An object store cannot append, and an object is never
rewritten whole in a loop: there each flush writes a new segment object,
``NAME.jsonl.d/NNNNNNNN.jsonl`` (at most every ``REMOTE_FLUSH_SECONDS`` unless forced: the
loop forces one before each checkpoint and at the end), and readers concatenate a whole
``NAME.jsonl`` object (written by release 0.2.0) and the segments in order. Records newer than
the last flush are lost in a crash, but they are never older than the checkpoint a rerun
resumes from, and the rerun writes them again (a resume rewrites the file's kept records
once, as one segment).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

from etils import epath

from stability.config import ConfigError, identity, typed_config

Path = epath.Path
PathLike = str | os.PathLike
REMOTE_FLUSH_SECONDS = 30.0

CONFIG, METRICS, EVENTS, VERSIONS, WANDB_ID = (
    "config.json",
    "metrics.jsonl",
    "events.jsonl",
    "versions.json",
    "wandb_id",
)
SHARED = ".shared"  # check_shared: a token process 0 writes and every process reads back
CHECKPOINTS, MANIFEST, RESULTS, RUNS, CHUNKS = (
    "checkpoints",
    "sweep.json",
    "results.jsonl",
    "runs",
    "chunks",
)


def path(p: PathLike) -> Path:
    """``p`` as an epath Path (local, or remote such as ``gs://bucket/dir``)."""
    return p if isinstance(p, Path) else epath.Path(p)


def is_remote(p: PathLike) -> bool:
    """Whether ``p`` names an object store (a URL scheme such as ``gs://``)."""
    return "://" in os.fspath(p)


def to_jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if hasattr(x, "item") and getattr(x, "size", 1) == 1:
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return x


# ---------------------------------------------------------------------------------------
# JSON and JSONL.


def read_json(p: PathLike) -> Any:
    return json.loads(path(p).read_text())


def write_json(p: PathLike, obj: Any) -> None:
    """Write JSON so that readers see the old or the new content, never half: locally
    through a temporary file and a rename, remotely as one object."""
    p = path(p)
    text = json.dumps(obj, indent=2, sort_keys=True)
    if is_remote(p):
        p.write_text(text)
        return
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def parse_jsonl(
    text: str, keep: Callable[[str], bool] | None = None
) -> tuple[list[dict], list[int]]:
    """Records of JSONL text, and the 1-based numbers of lines that were not JSON objects.
    ``keep``: which keys of each record to keep (besides ``step``); default all. A reader that
    needs a few columns of a long history holds only those."""
    records, bad = [], []
    kept: dict[tuple, list[str]] = {}  # a record's keys → those to keep (records share keys)
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad.append(i)
            continue
        if not isinstance(rec, dict):
            bad.append(i)
        elif keep is None:
            records.append(rec)
        else:
            names = tuple(rec)
            if names not in kept:
                kept[names] = [k for k in names if k == "step" or keep(k)]
            records.append({k: rec[k] for k in kept[names]})
    return records, bad


def segments(p: PathLike) -> list[Path]:
    """The segment objects of a JSONL file on an object store, in order (module docstring)."""
    d = path(p).parent / f"{path(p).name}.d"
    return sorted(d.glob("*.jsonl")) if d.is_dir() else []


def jsonl_exists(p: PathLike) -> bool:
    return path(p).exists() or bool(segments(p))


def read_jsonl(
    p: PathLike, keep: Callable[[str], bool] | None = None
) -> tuple[list[dict], list[int]]:
    """Records of a JSONL file (a whole file and/or its segments), and the 1-based numbers of
    lines that were not JSON objects (a torn last line after a crash, a hand edit): those are
    skipped, never fatal. A missing file has no records. ``keep``: as in :func:`parse_jsonl`."""
    p = path(p)
    parts = ([p] if p.exists() else []) + segments(p)
    if not parts:
        return [], []
    text = "".join(_terminated(q.read_bytes().decode("utf-8", errors="replace")) for q in parts)
    return parse_jsonl(text, keep)


def _terminated(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


def _line(record: dict) -> str:
    return json.dumps(to_jsonable(record), sort_keys=True) + "\n"


def append_jsonl(p: PathLike, records: list[dict]) -> None:
    """Append ``records`` in one flush (see the module docstring for object stores)."""
    Jsonl(p).append(records, force=True)


class Jsonl:
    """An append-only JSONL file on local or remote storage (module docstring).

    ``keep_step``: on opening, drop the records whose ``step`` is above it (a resume from a
    checkpoint at that step), and torn or foreign lines, with a warning naming them."""

    def __init__(self, p: PathLike, keep_step: int | None = None):
        self.path, self.remote = path(p), is_remote(p)
        self._pending: list[str] = []
        self._last_flush = time.monotonic()
        self._segment = len(segments(self.path)) if self.remote else 0
        if keep_step is not None:
            records, bad = read_jsonl(self.path)
            if bad:
                warnings.warn(f"{self.path}: dropped unreadable lines {bad}", stacklevel=2)
            kept = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= keep_step]
            if (records or bad) and not self.remote:
                write_text(self.path, "".join(map(_line, kept)))
            elif records or bad:  # once, on a resume: the kept records as one segment
                for q in ([self.path] if self.path.exists() else []) + segments(self.path):
                    q.unlink()
                self._segment = 0
                self._pending = [_line(r) for r in kept]
                self.flush()

    def append(self, records: list[dict], force: bool = False) -> None:
        """Queue ``records`` and flush (locally always; remotely when forced or at most every
        ``REMOTE_FLUSH_SECONDS``)."""
        self._pending += [_line(r) for r in records]
        if not self.remote or force or time.monotonic() - self._last_flush >= REMOTE_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        text, self._pending = "".join(self._pending), []
        if self.remote:  # a new object: nothing is rewritten
            d = self.path.parent / f"{self.path.name}.d"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{self._segment:08d}.jsonl").write_text(text)
            self._segment += 1
        else:
            with open(self.path, "ab+") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:  # never glue a record to a torn line
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        text = "\n" + text
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        self._last_flush = time.monotonic()


def copy_tree(local: str, dest: PathLike) -> None:
    """Copy every file under the local directory ``local`` to ``dest`` (local or remote),
    keeping relative paths; nothing when ``local`` does not exist."""
    if not os.path.isdir(local):
        return
    for root, _, names in os.walk(local):
        rel = os.path.relpath(root, local)
        target = path(dest) if rel == "." else path(dest) / rel
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                (target / name).write_bytes(f.read())


def write_text(p: PathLike, text: str) -> None:
    """Replace a whole text file (atomically, as :func:`write_json`)."""
    write_bytes(p, text.encode())


def write_bytes(p: PathLike, data: bytes) -> None:
    """Replace a whole file (atomically, as :func:`write_json`)."""
    p = path(p)
    if is_remote(p):
        p.write_bytes(data)
        return
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, p)


# ---------------------------------------------------------------------------------------
# A run directory.


def first_difference(a: Any, b: Any, where: str = "config") -> str:
    """The first leaf where two nested dicts differ, as "config.x.y: A there, B now"."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{where}.{k}")
    return f"{where}: {a!r} there, {b!r} now"


def checkpoint_steps(directory: PathLike) -> list[int]:
    d = path(directory)
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def describe_run(workdir: PathLike) -> str:
    """What a run directory holds, for messages: logged steps, checkpoints, files."""
    workdir = path(workdir)
    steps = [r["step"] for r in read_jsonl(workdir / METRICS)[0] if isinstance(r.get("step"), int)]
    ckpts = checkpoint_steps(workdir / CHECKPOINTS)
    n_files = sum(len(files) for _, _, files in workdir.walk())
    return ", ".join(
        [
            f"metrics up to step {max(steps)}" if steps else "no metrics",
            f"checkpoints at steps {', '.join(map(str, ckpts))}" if ckpts else "no checkpoints",
            f"{n_files} files",
        ]
    )


def check_run_dir(config: dict, workdir: PathLike, overwrite: bool) -> bool:
    """Refuse (ConfigError) a ``workdir`` that :func:`prepare_run_dir` would refuse; writes
    nothing. ``config``: the run's config as JSON. Returns True if ``overwrite`` will delete a
    previous run there."""
    workdir = path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir={workdir} is a file, not a directory")
    cfg_path = workdir / CONFIG
    if not cfg_path.exists():
        if overwrite and workdir.exists() and any(p.name != SHARED for p in workdir.iterdir()):
            raise ConfigError(
                f"--workdir={workdir} holds files but no run (no {CONFIG}); --overwrite "
                "deletes only run directories: delete it yourself or use another workdir"
            )
        return False
    if overwrite:
        return True
    # compared field by field, defaults filled in (a config.json of an older release), but
    # train.scan_layers: the blocks' layout, which a resume converts the checkpoint to
    unscanned = lambda t: dataclasses.replace(t, scan_layers=False)
    same = lambda cfg: identity(dataclasses.replace(cfg, train=unscanned(cfg.train)))
    try:
        old = same(typed_config(read_json(cfg_path)))
    except ValueError as e:  # not JSON, or not a config (ConfigError is a ValueError)
        raise ConfigError(
            f"{cfg_path} is unreadable ({e}); pass --overwrite to delete the run"
        ) from e
    new = same(typed_config(config))
    if old != new:
        raise ConfigError(
            f"--workdir={workdir} holds a run with a different config "
            f"({first_difference(old, new)}); use another workdir or pass --overwrite to delete it"
        )
    return False


def prepare_run_dir(config: dict, workdir: PathLike, overwrite: bool) -> None:
    """Create or check a single run's ``workdir`` (:func:`check_run_dir`); with
    ``overwrite`` the previous run is deleted (and what it held printed)."""
    workdir = path(workdir)
    if check_run_dir(config, workdir, overwrite):
        print(f"--overwrite: deleting {workdir} ({describe_run(workdir)})", file=sys.stderr)
        workdir.rmtree()
    write_run_config(workdir, config)


def write_run_config(run_dir: PathLike, config: dict) -> None:
    run_dir = path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / CONFIG).exists():
        write_json(run_dir / CONFIG, config)


def run_config(run_dir: PathLike) -> dict | None:
    p = path(run_dir) / CONFIG
    return read_json(p) if p.exists() else None


def metrics(
    run_dir: PathLike, keep: Callable[[str], bool] | None = None
) -> tuple[list[dict], list[int]]:
    """(records, unreadable line numbers) of a run's ``metrics.jsonl``; ``keep``: which keys
    (as in :func:`parse_jsonl`)."""
    return read_jsonl(path(run_dir) / METRICS, keep)


def events(run_dir: PathLike) -> list[dict]:
    return read_jsonl(path(run_dir) / EVENTS)[0]


def kind(workdir: PathLike) -> str | None:
    """ "sweep" (results.jsonl or runs/), "run" (a single run: config.json and metrics.jsonl),
    or None."""
    d = path(workdir)
    if jsonl_exists(d / RESULTS) or (d / RUNS).is_dir():
        return "sweep"
    if (d / CONFIG).exists() and jsonl_exists(d / METRICS):
        return "run"
    return None


# ---------------------------------------------------------------------------------------
# A sweep directory.


def run_dir(sweep_dir: PathLike, run_id: str) -> Path:
    return path(sweep_dir) / RUNS / run_id


def chunk_checkpoints(sweep_dir: PathLike, chunk_id: str) -> Path:
    return path(sweep_dir) / CHUNKS / chunk_id / CHECKPOINTS


def remove_chunk(sweep_dir: PathLike, chunk_id: str) -> None:
    """Delete a finished chunk's directory (its checkpoints): its runs' results are recorded."""
    d = path(sweep_dir) / CHUNKS / chunk_id
    if d.exists():
        d.rmtree()


def results(sweep_dir: PathLike) -> tuple[list[dict], list[int]]:
    """(records, unreadable line numbers) of a sweep's ``results.jsonl``."""
    return read_jsonl(path(sweep_dir) / RESULTS)


def append_results(sweep_dir: PathLike, records: list[dict]) -> None:
    append_jsonl(path(sweep_dir) / RESULTS, records)


def manifest(sweep_dir: PathLike) -> dict | None:
    """The sweep's ``sweep.json`` (None when absent; ConfigError when unreadable)."""
    p = path(sweep_dir) / MANIFEST
    if not p.exists():
        return None
    try:
        old = read_json(p)
        old["run_ids"] = [str(x) for x in old["run_ids"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{p} is unreadable ({type(e).__name__}); use another workdir") from e
    return old


# A sweep's run id: "{setting slug}-lr{lr}[-s{seed}]-{hash}" (``sweep.build_runs``).
RUN_ID = re.compile(
    r"^(?P<slug>.*)-lr(?P<lr>[0-9.]+(?:e[-+]?\d+)?)(?:-s(?P<seed>\d+))?-[0-9a-f]{8}$"
)


def planned_runs(sweep_dir: PathLike) -> list[dict] | None:
    """The sweep's plan, one dict per run in the manifest's order: run_id, setting, lr, seed.
    Manifests that list only run ids (release 0.2.0 and earlier) are read from the ids: the
    setting is then the one a finished run of the same id prefix recorded, else the prefix.
    None without a manifest."""
    m = manifest(sweep_dir)
    if m is None:
        return None
    if "runs" in m:
        return [dict(r) for r in m["runs"]]
    recs = results(sweep_dir)[0]
    slug_setting = {
        g["slug"]: r["setting"]
        for r in recs
        if "setting" in r and "run_id" in r and (g := RUN_ID.match(r["run_id"]))
    }
    out = []
    for rid in m["run_ids"]:
        g = RUN_ID.match(rid)
        out.append(
            {
                "run_id": rid,
                "setting": slug_setting.get(g["slug"], g["slug"]) if g else rid,
                "lr": float(g["lr"]) if g else float("nan"),
                "seed": int(g["seed"]) if g and g["seed"] else 0,
            }
        )
    return out


def planned_grid(sweep_dir: PathLike, prefix: str = "") -> dict[str, list[float]]:
    """{setting: its planned LRs, sorted} of a sweep (``planned_runs``); ``prefix`` goes
    before each setting (a report pooling several sweeps). Empty without a manifest."""
    grid: dict[str, set[float]] = {}
    for r in planned_runs(sweep_dir) or []:
        grid.setdefault(prefix + r["setting"], set()).add(float(r["lr"]))
    return {k: sorted(v) for k, v in grid.items()}


def check_shared(workdir: PathLike) -> None:
    """With several JAX processes, refuse (ConfigError, on every process) a workdir that some
    process cannot see as process 0 writes it: a local directory on each host of a pod lets the
    hosts decide from different files and hang. Process 0 writes a fresh token; after a
    barrier every process reads it back. Nothing to check with one process."""
    import jax

    if jax.process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils as mh

    token = int(mh.broadcast_one_to_all(np.int64(np.random.default_rng().integers(1, 2**62))))
    d = path(workdir)
    if jax.process_index() == 0:
        d.mkdir(parents=True, exist_ok=True)
        write_text(d / SHARED, str(token))
    mh.sync_global_devices("stability_check_shared")
    try:
        seen = (d / SHARED).read_text().strip() == str(token)
    except OSError:
        seen = False
    every = np.asarray(mh.process_allgather(np.asarray([seen])))
    if not every.all():
        blind = [i for i, ok in enumerate(every.reshape(-1)) if not ok]
        raise ConfigError(
            f"--workdir={workdir} is not shared by every process: process(es) {blind} do not "
            "see what process 0 writes there; give a directory every host shares (e.g. "
            "gs://BUCKET/...)"
        )


def write_manifest(sweep_dir: PathLike, manifest: dict) -> None:
    d = path(sweep_dir)
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / MANIFEST, manifest)
