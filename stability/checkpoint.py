"""orbax checkpoints of the full train state plus a JSON sidecar (data position, format).

The state is restored onto an abstract target (shapes, dtypes, shardings) built from a fresh
initialisation, so a run can resume onto another device layout. The target may depend on the
sidecar (a checkpoint's format, ``loop.py``): it is read first. Saving is asynchronous: orbax
copies the state off the device, then writes it in the background while training goes on.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from stability import workdir as W
from stability.config import ConfigError


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be restored."""


class _Kept(cm.PreservationPolicy):
    """Preserves the checkpoints of a set of steps that may grow while training runs."""

    def __init__(self, steps: set[int]):
        self.steps = steps

    def should_preserve(self, checkpoints, *, context):
        return [c.step in self.steps for c in checkpoints]


class _Manager(ocp.CheckpointManager):
    """orbax's CheckpointManager, without its own preemption check: ``save`` asks JAX's
    preemption sync point with the checkpoint's step number as its counter
    (``reached_preemption(step)``), while the loop asks it once per call boundary
    (``preemption.Preemption``). Two counters on one sync point set it to a step the loop's counter
    reaches only at the end of the run, or never: a notice on several processes was then
    honoured late or not at all. The loop owns the sync point."""

    def reached_preemption(self, step: int) -> bool:
        return False


class Checkpointer:
    def __init__(self, directory: W.PathLike, max_to_keep: int, keep_steps: list[int] = ()):
        """Keeps the newest ``max_to_keep`` checkpoints plus every step in ``keep_steps``
        (e.g. the decayed checkpoints of WSD-S cycles)."""
        directory = W.path(directory)
        self.directory = directory if W.is_remote(directory) else directory.absolute()
        self._kept = _Kept(set(keep_steps))
        policy = cm.AnyPreservationPolicy([cm.LatestN(max_to_keep), self._kept])
        self._mgr = _Manager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policy, enable_async_checkpointing=True, create=True
            ),
        )

    def keep(self, step: int) -> None:
        """Keep checkpoint ``step`` from rotation from now on (e.g. the one before an early
        warning)."""
        self._kept.steps.add(step)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        if step in self._mgr.all_steps():
            return
        self._mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def meta(self, step: int) -> dict:
        """The JSON sidecar of ``step``."""
        out = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def restore(self, step: int, like: Any) -> Any:
        """The state of ``step`` on the structure/shardings of ``like`` (concrete or abstract)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self._mgr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return out.state

    def restore_latest(self, like: Callable[[dict], Any]) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest readable checkpoint, or None if there is none.
        ``like(meta)``: the target to restore onto (it may raise ConfigError to refuse a
        format, which is never taken for an unreadable checkpoint).

        An unreadable checkpoint (truncated or deleted files) is skipped with a warning naming
        it, and moved aside to ``<directory>.unreadable/`` (kept for inspection) so that the
        resumed run writes that step afresh. If checkpoints exist but none is readable this
        raises CheckpointError rather than letting the caller silently restart from scratch
        over existing results (nothing is moved then).
        """
        steps = self.all_steps()
        unreadable = []
        for step in reversed(steps):
            try:
                meta = self.meta(step)
                target = like(meta)
                state = self.restore(step, target)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
                warnings.warn(
                    f"checkpoint {self.directory / str(step)} is unreadable "
                    f"({type(e).__name__}: {str(e)[:200]}); trying the previous one",
                    stacklevel=2,
                )
                unreadable.append(step)
                continue
            if unreadable:
                self._move_aside(unreadable)
            return step, state, meta
        if steps:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory} (tried steps {steps}); refusing to "
                "restart from scratch over existing results: move that directory away to start over"
            )
        return None

    def _move_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            aside = self.directory.with_name(self.directory.name + ".unreadable")
            aside.mkdir(exist_ok=True)
            for step in steps:
                dest = aside / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
                (self.directory / str(step)).rename(dest)
                print(f"moved unreadable checkpoint {step} to {dest}", file=sys.stderr)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("checkpoint_move_aside")
        self._mgr.reload()

    def wait(self) -> None:
        """Until every asynchronous save has reached storage."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()
