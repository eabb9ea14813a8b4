"""One writer for a run's metrics: JSONL (always), W&B (offline by default), console progress.

``<dir>/metrics.jsonl`` holds one JSON object per logged step. It is the source of truth:
W&B has no offline reader, and a W&B failure (no network, a dead service process) only
disables W&B for the rest of the run, with one warning. ``<dir>/versions.json`` records the
Python and package versions of the last start (also in the W&B config as ``versions``).

W&B files go to ``$WANDB_DIR/wandb`` when WANDB_DIR is set, else to ``<dir>/wandb``; W&B writes
local files only, so for a run directory on a bucket they are written to a local temporary
directory and copied to ``<dir>/wandb`` when the run closes (they outlive the VM). The W&B run
id is kept in ``<dir>/wandb_id``: a resumed run continues the same W&B run. Offline, each start
writes its own ``offline-run-<time>-<id>`` directory; ``wandb sync <dir>/wandb/offline-run-*``
uploads them, in order of start time, into that one run.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import tempfile
import uuid
import warnings
from typing import Any

from stability import workdir as W
from stability.config import WandbConfig


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict (e.g. a config's ``to_dict()`` or its config.json) → {"a.b.c": leaf}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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


def record_versions(directory: W.Path) -> dict[str, str]:
    """Write ``versions.json`` in ``directory`` (warning when a previous start of the same run
    used other versions) and return the versions."""
    path = directory / W.VERSIONS
    now = package_versions()
    if path.exists():
        try:
            before = W.read_json(path)
        except ValueError:
            before = {}
        changed = [f"{k} {before.get(k)} -> {v}" for k, v in now.items() if before.get(k) != v]
        if before and changed:
            warnings.warn(
                f"{directory}: package versions differ from the previous start: "
                f"{', '.join(changed)}",
                stacklevel=3,
            )
    W.write_json(path, now)
    return now


def _finite_or_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class Tracker:
    """Writes a run's metric records to ``<directory>/metrics.jsonl`` and to W&B, and its
    early warnings (``watch.py``) to ``events.jsonl`` and W&B alerts. ``keep_step``: the step
    the run resumes from (records past it are dropped from the files)."""

    def __init__(
        self,
        directory: W.PathLike,
        wandb_cfg: WandbConfig,
        run_config: dict,
        *,
        name: str,
        group: str = "",
        tags: tuple[str, ...] = (),
        keep_step: int = 0,
    ):
        self.directory = W.path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / W.METRICS
        self._metrics = W.Jsonl(self.path, keep_step=keep_step)
        self._events = W.Jsonl(self.directory / W.EVENTS, keep_step=keep_step)
        self._wandb = None
        self._wandb_local: str | None = None
        resume = keep_step > 0
        versions = record_versions(self.directory)
        if wandb_cfg.mode != "disabled":
            run_config = {**run_config, "versions": versions}
            self._start_wandb(wandb_cfg, run_config, name, group, tags, resume)

    def _start_wandb(self, cfg, run_config, name, group, tags, resume):
        # WANDB_MODE in the environment wins (it is the only way to avoid every network lookup).
        mode = os.environ.get("WANDB_MODE", cfg.mode)
        try:
            import wandb

            id_file = self.directory / W.WANDB_ID  # a rerun continues the same W&B run
            known = id_file.exists()
            run_id = id_file.read_text().strip() if known else uuid.uuid4().hex[:12]
            if not known:
                W.write_text(id_file, run_id)
            # W&B writes local files only: for a run directory on a bucket, a local temporary
            # directory whose files are copied to the bucket at close.
            remote = W.is_remote(self.directory) and not os.environ.get("WANDB_DIR")
            local = tempfile.mkdtemp(prefix="stability-wandb-") if remote else str(self.directory)
            self._wandb_local = local if remote else None
            self._wandb = wandb.init(
                project=cfg.project,
                group=group or cfg.group or None,
                tags=list(tags or cfg.tags) or None,
                name=name,
                id=run_id,
                resume="allow" if resume or known else None,
                dir=os.environ.get("WANDB_DIR") or local,
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

    def log(self, records: list[dict]) -> None:
        """Append metric records (one flush; on an object store, see ``workdir.Jsonl``)."""
        records = [W.to_jsonable(r) for r in records]
        self._metrics.append(records)
        if self._wandb is not None:
            try:
                for record in records:
                    data = {k: _finite_or_none(v) for k, v in record.items() if k != "step"}
                    self._wandb.log(data, step=record["step"])
            except Exception as e:  # noqa: BLE001
                self._wandb_failed(e)

    def event(self, record: dict, title: str, text: str) -> None:
        """Append an early-warning record to ``events.jsonl`` and raise a W&B alert (level
        WARN; offline, W&B keeps it for ``wandb sync``)."""
        self._events.append([W.to_jsonable(record)], force=True)
        if self._wandb is not None:
            try:
                import wandb

                self._wandb.alert(title=title, text=text, level=wandb.AlertLevel.WARN)
            except Exception as e:  # noqa: BLE001
                self._wandb_failed(e)

    def flush(self) -> None:
        self._metrics.flush()
        self._events.flush()

    def summary(self, values: dict) -> None:
        if self._wandb is not None:
            try:
                self._wandb.summary.update(W.to_jsonable(values))
            except Exception as e:  # noqa: BLE001
                self._wandb_failed(e)

    def close(self) -> None:
        self.flush()
        if self._wandb is not None:
            try:
                self._wandb.finish()  # a dead service makes it raise at once, not hang
            except Exception as e:  # noqa: BLE001
                self._wandb_failed(e)
            self._wandb = None
        if self._wandb_local:  # a bucket's run: its W&B files go there too
            W.copy_tree(os.path.join(self._wandb_local, "wandb"), self.directory / "wandb")
            shutil.rmtree(self._wandb_local, ignore_errors=True)
            self._wandb_local = None


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
