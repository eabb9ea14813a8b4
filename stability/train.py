"""``stability train``: one run, trained by the loop (``loop.py``) as a stack of one.

The run directory (``workdir.py``) holds config.json, metrics.jsonl, events.jsonl and
checkpoints/; rerunning the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys

import jax

from stability import loop as L
from stability import workdir as W
from stability.config import Config
from stability.data import make_source
from stability.preemption import Preemption


@dataclasses.dataclass
class RunResult:
    steps: int  # updates applied
    final_eval_loss: float
    diverged: bool
    diverged_step: int | None
    preempted: bool = False  # stopped early by SIGTERM or Ctrl-C, checkpointed; rerun to continue
    loss_at_init: float = float("nan")
    stopped_step: int | None = None  # frozen there by an early warning (watch.on_warning="stop")
    stop_cause: dict | None = None  # the warning that stopped it (an events.jsonl record)
    already_stopped: bool = False  # it had stopped before this command started
    notice_after_end: bool = False  # a stop notice came during the last call: it finished


class Diverged(RuntimeError):
    """The run stopped on a non-finite (or out-of-bound) loss; its last finite state is saved."""


def run_spec(cfg: Config, workdir: W.Path) -> L.RunSpec:
    config = W.to_jsonable(cfg.to_dict())
    return L.RunSpec(cfg.wandb.name or workdir.name, cfg, workdir, config, cfg.wandb.group)


def train(
    cfg: Config,
    workdir: W.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = True,
    preemption: Preemption | None = None,
) -> RunResult:
    """Train one run in ``workdir``, resuming from its latest checkpoint if there is one.
    SIGTERM or Ctrl-C checkpoints at the next call boundary and returns ``preempted``; a
    divergence raises :class:`Diverged` (the frozen state and its records are kept)."""
    workdir = W.path(workdir)
    make_source(cfg.data, cfg.model.vocab_size)  # validates the data before any write
    W.check_run_dir(W.to_jsonable(cfg.to_dict()), workdir, overwrite)
    stack = L.plan_stack(cfg, 1)  # XLA's memory check decides, before any write
    W.check_shared(workdir)
    if jax.process_index() == 0:
        W.prepare_run_dir(W.to_jsonable(cfg.to_dict()), workdir, overwrite)
    _barrier("stability_train_workdir")
    with preemption or Preemption() as pre:
        result = L.train_stack(
            [run_spec(cfg, workdir)],
            workdir / W.CHECKPOINTS,
            label=workdir.name,
            preemption=pre,
            progress=progress,
            stack=stack,
        )
    run = result.runs[0]
    if run.status == "diverged":
        raise Diverged(
            f"loss became non-finite or exceeded train.divergence_loss={cfg.train.divergence_loss} "
            f"at update {run.diverged_step}; the frozen state is checkpointed at step "
            f"{result.position} in {workdir / W.CHECKPOINTS} and metrics are in "
            f"{workdir / W.METRICS}"
        )
    if result.start >= cfg.train.steps and run.status == "finished":
        print(f"{workdir} already finished {result.position} steps", file=sys.stderr)
    final = run.last.get("eval/loss", float("nan")) if run.status == "finished" else float("nan")
    stopped = run.status == "stopped"
    return RunResult(
        result.position,
        float(final),
        False,
        None,
        run.status == "preempted",
        run.loss_at_init,
        stopped_step=run.stopped_step if stopped else None,
        stop_cause=run.stop_cause if stopped else None,
        already_stopped=stopped and result.position == result.start,
        notice_after_end=result.notice_after_end,
    )


def _barrier(name: str) -> None:
    """Wait for every JAX process (process 0 prepares the workdir before the others read)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
