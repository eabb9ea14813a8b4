"""One writer for a run's metrics: JSONL (always), W&B (offline by default), console progress.

``<dir>/metrics.jsonl`` holds one JSON object per logged step. It is the source of truth:
W&B has no offline reader, and a W&B failure (no network, a dead service process) only
disables W&B for the rest of the run, with one warning. ``<dir>/versions.json`` records the
Python and package versions of the last start (also in the W&B config as ``versions``).

W&B files go to ``$WANDB_DIR/wandb`` when WANDB_DIR is set, else to ``<dir>/wandb``. The W&B run
id is kept in ``<dir>/wandb_id``: a resumed run continues the same W&B run. Offline, each start
writes its own ``offline-run-<time>-<id>`` directory; ``wandb sync <dir>/wandb/offline-run-*``
uploads them, in order of start time, into that one run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import uuid
import warnings
from pathlib import Path
from typing import Any

from stability.config import WandbConfig


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


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict (e.g. a config's ``to_dict()`` or its config.json) → {"a.b.c": leaf}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_jsonl(path: str | Path) -> tuple[list[dict], list[int]]:
    """Records of a JSONL file, and the 1-based numbers of lines that were not JSON objects
    (a torn last line after a crash, a hand edit): those are skipped, never fatal."""
    records, bad = [], []
    path = Path(path)
    if not path.exists():
        return records, bad
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad.append(i)
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                bad.append(i)
    return records, bad


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one record as a single write of one line, flushed to disk.

    If the previous content ends without a newline (a torn write), a newline is written first
    so that the new record is never glued to the torn one.
    """
    line = json.dumps(to_jsonable(record), sort_keys=True) + "\n"
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(path: str | Path, max_step: int) -> None:
    """Keep only records with step ≤ max_step (used when resuming from a checkpoint); torn or
    foreign lines are dropped and reported."""
    path = Path(path)
    records, bad = read_jsonl(path)
    if bad:
        warnings.warn(f"{path}: dropped unreadable lines {bad}", stacklevel=2)
    kept = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= max_step]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, path)


VERSIONED = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "ml-collections",
    "wandb",
)


def package_versions() -> dict[str, str]:
    """Python's and the main packages' versions ("not installed" for a missing one)."""
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {"python": platform.python_version(), **{name: version(name) for name in VERSIONED}}


def record_versions(directory: Path) -> dict[str, str]:
    """Write ``versions.json`` in ``directory`` (warning when a previous start of the same run
    used other versions) and return the versions."""
    path = directory / "versions.json"
    now = package_versions()
    if path.exists():
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = {}
        changed = [f"{k} {before.get(k)} -> {v}" for k, v in now.items() if before.get(k) != v]
        if before and changed:
            warnings.warn(
                f"{directory}: package versions differ from the previous start: "
                f"{', '.join(changed)}",
                stacklevel=3,
            )
    write_json_atomic(path, now)
    return now


def _finite_or_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class Tracker:
    """Writes metric records to ``<directory>/metrics.jsonl`` and to W&B."""

    def __init__(
        self,
        directory: str | Path,
        wandb_cfg: WandbConfig,
        run_config: dict,
        *,
        name: str,
        group: str = "",
        tags: tuple[str, ...] = (),
        resume: bool = False,
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"
        self._wandb = None
        versions = record_versions(self.directory)
        if wandb_cfg.mode != "disabled":
            run_config = {**run_config, "versions": versions}
            self._start_wandb(wandb_cfg, run_config, name, group, tags, resume)

    def _start_wandb(self, cfg, run_config, name, group, tags, resume):
        # WANDB_MODE in the environment wins (it is the only way to avoid every network lookup).
        mode = os.environ.get("WANDB_MODE", cfg.mode)
        try:
            import wandb

            id_file = self.directory / "wandb_id"  # a rerun continues the same W&B run
            known = id_file.exists()
            run_id = id_file.read_text().strip() if known else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self._wandb = wandb.init(
                project=cfg.project,
                group=group or cfg.group or None,
                tags=list(tags or cfg.tags) or None,
                name=name,
                id=run_id,
                resume="allow" if resume or known else None,
                dir=os.environ.get("WANDB_DIR") or str(self.directory),
                config=run_config,
                mode=mode,
                reinit="create_new",
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as e:  # noqa: BLE001 - any W&B failure must not stop training
            self._wandb_failed(e)

    def _wandb_failed(self, e: Exception) -> None:
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        warnings.warn(
            f"W&B disabled for this run ({reason}); metrics stay in {self.path}", stacklevel=3
        )
        self._wandb = None
        if _service_died(e):
            _drop_dead_service()

    def log(self, record: dict) -> None:
        record = to_jsonable(record)
        append_jsonl(self.path, record)
        if self._wandb is not None:
            try:
                data = {k: _finite_or_none(v) for k, v in record.items() if k != "step"}
                self._wandb.log(data, step=record["step"])
            except Exception as e:  # noqa: BLE001
                self._wandb_failed(e)

    def summary(self, values: dict) -> None:
        if self._wandb is not None:
            try:
                self._wandb.summary.update(to_jsonable(values))
            except Exception as e:  # noqa: BLE001
                self._wandb_failed(e)

    def close(self) -> None:
        if self._wandb is not None:
            try:
                self._wandb.finish()  # a dead service makes it raise at once, not hang
            except Exception as e:  # noqa: BLE001
                self._wandb_failed(e)
            self._wandb = None


def _service_died(e: Exception) -> bool:
    """Whether ``e`` says that the connection to W&B's service process broke."""
    try:
        from wandb.sdk.mailbox import HandleAbandonedError, MailboxClosedError

        lost = (ConnectionError, HandleAbandonedError, MailboxClosedError)
    except ImportError:  # another wandb version
        lost = (ConnectionError,)
    return isinstance(e, lost)


def _drop_dead_service() -> None:
    """Forget W&B's service process after it died (the connection to it broke).

    Every run of this process used it, so all of them are lost to W&B. Without this, wandb's
    exit hook would try to tear the dead service down and print a traceback at exit; a later
    ``wandb.init`` starts a new service.
    """
    try:
        import wandb

        wandb.teardown()  # raises on the broken connection, after unhooking the exit hook
    except Exception:  # noqa: BLE001
        pass
