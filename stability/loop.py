"""THE training loop: a stack of N >= 1 runs of one static config, K updates per device call.

Every command that trains comes here: ``stability train`` is a stack of one run,
``stability sweep`` and ``reproduce`` a stack per chunk of a sweep. The stack always carries a
run axis (of size 1 for ``train``), in its programs and in its checkpoints.

One device call (``step.make_call``) runs up to K updates, ending at an eval, checkpoint or
WSD-S decay end (or at K); the metrics of the logged steps inside it come back from it. The
host never makes the device wait: call c+1 is dispatched before the host fetches call c's
outputs (whose gather to every process was dispatched right after call c), and everything the
host does with them overlaps call c+1: the detectors, a divergence replay and handing a
checkpoint to orbax's asynchronous save on this thread; the records, W&B, early-warning lines
and progress on a writer thread (``writer.py``), so that slow storage delays no call.

- Divergence is detected inside the step, the run frozen there (its updates masked), and
  recorded at its exact update: the host learns of it one call later and, if that update was
  not logged, replays it on the frozen state for its record. A stack whose runs have all
  diverged stops.
- Checkpoints: at each checkpoint step a copy of the state is made on the device (so the next
  call can take the state) and handed to orbax, with the records flushed first.
- Preemption (:class:`Preemption`) is honoured at the next call boundary; every host stops at
  the same step and saves one checkpoint there.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from stability import __version__
from stability import metrics as M
from stability import programs as prog
from stability import sharding as S
from stability import step as St
from stability import workdir as W
from stability.checkpoint import Checkpointer
from stability.compilation import wait_for_all_processes
from stability.config import Config, ConfigError
from stability.data import feed as F
from stability.data import make_source
from stability.models.transformer import convert_layers
from stability.optim.schedules import decay_ends
from stability.preemption import Preemption
from stability.tracking import Tracker
from stability.watch import Watcher
from stability.writer import Writer

FORMAT = 2  # checkpoint format: a run axis in every state, meta with "format"
# Seconds between a preemption notice and the end of the save that a pod leaves (a TPU VM's
# maintenance event gives about 30). A stop waits for the call running when the notice comes
# (up to train.steps_per_call updates) and the next boundary's save: a call that takes longer
# is reported once, with the K that would fit.
PREEMPTION_GRACE_SECONDS = 30.0
RELEASE = __version__  # this release (pyproject.toml), written into every checkpoint's meta


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a stack: its config and where its records go."""

    name: str  # run id (sweep) or the workdir's name (train): W&B name, messages
    config: Config
    directory: W.Path  # metrics.jsonl, events.jsonl, versions.json, wandb_id
    wandb_config: dict  # what W&B records as the run's config
    group: str = ""
    tags: tuple[str, ...] = ()
    label: str = ""  # how messages name it (a sweep's: its setting and LR); default: name


@dataclasses.dataclass
class RunOutcome:
    status: Literal["finished", "diverged", "stopped", "preempted"]
    steps: int  # the last logged step (a diverged run's: its failing update)
    last: dict  # the run's last metric record ({} if none)
    loss_at_init: float  # eval loss at initialisation (NaN if unknown)
    diverged_step: int | None
    stopped_step: int | None = None  # frozen there by watch.on_warning="stop"
    warnings: list[dict] = dataclasses.field(default_factory=list)  # its "warn" events
    stop_cause: dict | None = None  # the "warn" event that stopped it (on_warning="stop")


@dataclasses.dataclass
class StackResult:
    runs: list[RunOutcome]
    start: int  # the step it resumed from (0: a fresh start)
    position: int  # updates the stack went through (the data position; checkpointed)
    preempted: bool
    wall_seconds: float
    # A stop notice (SIGTERM, Ctrl-C) came during the last call: the stack finished first and
    # the command stops after recording it (a sweep trains no further chunk).
    notice_after_end: bool = False


@dataclasses.dataclass
class _Call:
    """A dispatched call whose outputs the host has not read yet."""

    begin: int
    end: int
    out: S.Gathered  # metrics rows, alive, diverged_step (+ eval), their gather dispatched
    host: dict  # the call's batches on the host (for a replay)
    stream_state: dict  # the data position after the call (for its checkpoint)
    snapshot: Any  # a device copy of the state after the call, when it is checkpointed


def boundaries(cfg: Config):
    """(is_log, is_eval, is_ckpt, decay ends) of ``cfg``'s schedule: every eval step (each
    ``eval_every``, the last step and every WSD-S decay end) is logged and ends a call; every
    checkpoint step (each ``checkpoint_every``, the last step and every decay end) ends one."""
    t = cfg.train
    ends = decay_ends(cfg.optim, t.steps)
    is_eval = lambda s: s % t.eval_every == 0 or s == t.steps or s in ends
    is_log = lambda s: s % t.log_every == 0 or is_eval(s)
    is_ckpt = lambda s: s % t.checkpoint_every == 0 or s == t.steps or s in ends
    return is_log, is_eval, is_ckpt, ends


def call_ends(start: int, steps: int, is_boundary, k_max: int) -> list[int]:
    """The last step of each call from ``start`` to ``steps``: a call ends on the next
    boundary step (``is_boundary``) or after ``k_max`` updates, whichever comes first."""
    ends, s = [], start
    while s < steps:
        e = s + 1
        while e < steps and e - s < k_max and not is_boundary(e):
            e += 1
        ends.append(e)
        s = e
    return ends


@dataclasses.dataclass(frozen=True)
class Stack:
    """The plan of a stack of runs of one static config, made once: its programs on their mesh
    (``programs.plan``: a data axis that divides the batch, or a refusal that says so) with the
    train call compiled and XLA's memory numbers checked (``programs.refuse_unless_fits``: the
    state's extra copies and the headroom counted). ``train``, ``sweep`` (for every chunk,
    before any trains), ``reproduce`` and ``--check`` all plan stacks here."""

    programs: prog.Programs
    memory: prog.MemoryReport


def plan_stack(cfg: Config, n_runs: int, what: str = "") -> Stack:
    """Plan a stack of ``n_runs`` runs of ``cfg``; ConfigError (``what`` names it) when its
    train call does not fit a device."""
    mesh, padded = prog.plan(cfg, n_runs)
    progs = prog.build(cfg, mesh, runs=padded, k_max=St.steps_per_call_max(cfg.train))
    return Stack(progs, prog.refuse_unless_fits(prog.compile_call(cfg, progs), cfg, what))


def train_stack(
    runs: list[RunSpec],
    checkpoints: W.PathLike,
    *,
    label: str,
    preemption: Preemption,
    progress: bool = True,
    stack: Stack | None = None,
) -> StackResult:
    """Train (or resume from ``checkpoints``) a stack of runs sharing a static config; their
    records go to each run's directory (process 0 writes them). ``label`` names the stack on
    the progress bar. ``stack``: its plan (:func:`plan_stack`), if already made."""
    cfg = runs[0].config
    static = St.static_config(cfg)
    for r in runs:
        if St.static_config(r.config) != static or r.config.data.seed != cfg.data.seed:
            raise ValueError(f"run {r.name} does not share the stack's static config and data")
    t, n = cfg.train, len(runs)
    progs = (stack or plan_stack(cfg, n)).programs
    pad = lambda values, dtype: S.from_host(
        np.asarray(values + [values[-1]] * (progs.runs - n), dtype), progs.hp
    )
    hp = {
        k: pad([float(St.hyperparams(r.config)[k]) for r in runs], np.float32)
        for k in St.HYPERPARAMS.values()
    }
    source = make_source(cfg.data, cfg.model.vocab_size)
    feed = F.Feed(source, cfg.data.seed, cfg.data.batch_size, progs.batches, progs.k_max)
    eval_batches = [
        {k: S.from_host(v, progs.batch) for k, v in b.items()}
        for b in source.eval_batches(t.eval_batches)
    ]
    ckpt = Checkpointer(checkpoints, t.max_to_keep, keep_steps=boundaries(cfg)[3])
    wait_for_all_processes()  # process 0 may come from writing the previous stack's results
    t0 = time.time()
    try:
        restored = ckpt.restore_latest(lambda meta: _restore_target(meta, cfg, progs, checkpoints))
        if restored is None:
            start, state = 0, progs.init(pad([r.config.train.seed for r in runs], np.int32))
            loss0 = S.to_host(progs.evaluate(state, eval_batches))[:n]
        else:  # a resume runs no init
            start, state, meta = restored
            if _single_run_of_0_1(meta):
                state = _add_run_axis(state, progs)
            if meta.get("layers", "per_layer") != layout(cfg):
                state = _convert_layers(state, progs)
            feed.stream.restore(meta["stream"])
            loss0 = np.asarray(meta.get("loss_at_init", [math.nan] * n), np.float64)
        loop = _Loop(cfg, runs, progs, state, hp, feed, eval_batches, ckpt, loss0, source)
        loop.replay_watch(start)  # also says when a run frozen at the checkpoint stopped
        position, preempted, late = start, False, False
        if start < t.steps and not loop.all_dead():
            # Process 0 rewrites the records it resumes (on a bucket, one segment in place of
            # the old ones) only once every process has read them back (replay_watch).
            wait_for_all_processes()
            trackers = _trackers(runs, source, start) if jax.process_index() == 0 else []
            try:
                position, preempted = loop.run(start, preemption, trackers, progress, label)
                # The boundary after the last call: a notice that came during it is known here
                # (on every process alike), once the stack has finished.
                late = not preempted and preemption.stop()
            finally:
                for tr in trackers:
                    tr.close()
    finally:
        ckpt.close()
    outcomes = []
    for i, r in enumerate(runs):
        last = loop.last[i] or _last_record(r.directory)
        died, stopped = loop.died[i], loop.stopped[i]
        status = (
            "diverged"
            if died is not None
            else "stopped"
            if stopped is not None
            else "finished"
            if position >= t.steps
            else "preempted"
        )
        step = int(last.get("step", position))
        warned = [e for e in loop.events[i] if e["event"] == "warn"]
        outcomes.append(
            RunOutcome(
                status, step, last, float(loss0[i]), died, stopped, warned, loop.stop_cause[i]
            )
        )
    return StackResult(outcomes, start, position, preempted, time.time() - t0, late)


def _restore_target(meta: dict, cfg: Config, progs: prog.Programs, where) -> Any:
    """The abstract state a checkpoint with sidecar ``meta`` restores onto: this format's
    (a run axis), a sweep chunk's of release 0.1.0 (the same), or a single run's of 0.1.0 (no
    run axis: restored as is, then given one)."""
    fmt = meta.get("format")
    if cfg.optim.parametrization == "mup_simple" and "release" not in meta:
        raise ConfigError(
            f"{where}: this checkpoint was written by release 0.2.0 or earlier, whose "
            "optim.parametrization='mup_simple' left the head's LR unscaled; this release's "
            "'mup_simple' is the paper's (the head's LR scaled too). Resume it with release "
            "0.2.0, or start it again with optim.parametrization='mup_hidden' (the old rule)"
        )
    if fmt == FORMAT or (fmt is None and "loss_at_init" in meta):
        if meta.get("layers", "per_layer") == layout(cfg):
            return progs.abstract_state
        other = dataclasses.replace(cfg.train, scan_layers=not cfg.train.scan_layers)
        return prog.build(
            dataclasses.replace(cfg, train=other), progs.mesh, runs=progs.runs
        ).abstract_state
    if _single_run_of_0_1(meta):
        if cfg.train.scan_layers:
            raise ConfigError(
                f"{where}: a single run's checkpoint of release 0.1.0 resumes with "
                "train.scan_layers=False only; resume it so once, then switch"
            )
        return prog.build(cfg, progs.mesh, runs=None, k_max=1).abstract_state
    raise ConfigError(
        f"{where}: checkpoint format {fmt!r} is not one this release ({RELEASE}, format "
        f"{FORMAT}) reads; resume it with the release that wrote it, or use another workdir"
    )


def _single_run_of_0_1(meta: dict) -> bool:
    """Whether a checkpoint is a `stability train` one of release 0.1.0 (no run axis)."""
    return meta.get("format") is None and "diverged" in meta and "loss_at_init" not in meta


def layout(cfg: Config) -> str:
    """How a checkpoint holds the blocks' variables: "stacked" (``train.scan_layers``: one
    leading ``layers`` axis) or "per_layer" (``blocks/{i}/...``); a checkpoint written without
    this key is per-layer."""
    return "stacked" if cfg.train.scan_layers else "per_layer"


def _convert_layers(state: Any, progs: prog.Programs) -> Any:
    """A restored state of the other layout in ``progs``' layout (the run axis first)."""
    convert = lambda s: convert_layers(s, progs.abstract_state, axis=1)
    return jax.jit(convert, out_shardings=progs.state)(state)


def _add_run_axis(state: Any, progs: prog.Programs) -> Any:
    """A state without a run axis (a single run's checkpoint of release 0.1.0) as a stack."""
    stack = lambda x: jnp.broadcast_to(x[None], (progs.runs, *x.shape))
    return jax.jit(lambda s: jax.tree.map(stack, s), out_shardings=progs.state)(state)


def _trackers(runs: list[RunSpec], source, start: int) -> list[Tracker]:
    out = []
    for r in runs:
        W.write_run_config(r.directory, W.to_jsonable(r.config.to_dict()))
        out.append(
            Tracker(
                r.directory,
                r.config.wandb,
                {**r.wandb_config, "data_description": source.description},
                name=r.name,
                group=r.group,
                tags=r.tags,
                keep_step=start,
            )
        )
    return out


def _last_record(run_dir: W.Path) -> dict:
    records = W.metrics(run_dir)[0]
    return records[-1] if records else {}


class _Loop:
    """The state of one stack's training (:func:`train_stack`)."""

    def __init__(self, cfg, runs, progs, state, hp, feed, eval_batches, ckpt, loss0, source):
        self.cfg, self.runs, self.progs, self.state, self.hp = cfg, runs, progs, state, hp
        self.feed, self.eval_batches, self.ckpt, self.loss0 = feed, eval_batches, ckpt, loss0
        self.floor = source.loss_floor
        self.n = len(runs)
        self.trackers: list[Tracker] = []
        self.last: list[dict] = [{} for _ in runs]
        flags = S.to_host({"alive": state.alive, "died": state.diverged_step})
        # Runs dead at a resumed checkpoint logged their last record before it was written:
        # diverged (their failing update) or frozen by an early warning (no failing update).
        dead = [not flags["alive"][i] for i in range(self.n)]
        self.died: list[int | None] = [
            int(flags["died"][i]) if dead[i] and flags["died"][i] >= 0 else None
            for i in range(self.n)
        ]
        self.is_log, self.is_eval, self.is_ckpt, self.ends = boundaries(cfg)
        self.watchers = [Watcher(r.config.watch, cfg.train.steps) for r in runs]
        self.events: list[list[dict]] = [[] for _ in runs]
        # watch.on_warning="stop": the call boundary from which a run is frozen, and whether
        # the freeze is on the device yet; the first step of a frozen run it never trained.
        self.freeze_at: list[int | None] = [None] * self.n
        self.frozen = [dead[i] and self.died[i] is None for i in range(self.n)]
        self.stopped: list[int | None] = [None] * self.n
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len  # of one run
        self.saved: set[int] = set(ckpt.all_steps())
        self.slow_call_reported = False
        self.plan = call_ends(0, cfg.train.steps, self._ends_call, progs.k_max)
        self.stop_cause: list[dict | None] = [None] * self.n  # the warning that froze a run

    def all_dead(self) -> bool:
        return all(d is not None or f for d, f in zip(self.died, self.frozen, strict=True))

    def replay_watch(self, start: int) -> None:
        """Rebuild the detectors' state from the records up to ``start`` (a resume), and the
        actions of the warnings they raised, without raising them again."""
        if not start:
            return
        for i, r in enumerate(self.runs):
            history = [x for x in W.metrics(r.directory)[0] if x.get("step", 0) <= start]
            for event in self.watchers[i].update(history):
                self._act(i, event, self.plan)
            if self.frozen[i]:
                self.stopped[i] = self.freeze_at[i] or (history[-1]["step"] if history else 0)

    def _ends_call(self, step: int) -> bool:
        return self.is_eval(step) or self.is_ckpt(step)

    def run(self, start: int, preemption: Preemption, trackers, progress: bool, label: str):
        """Train from ``start``; (position reached, preempted)."""
        from tqdm import tqdm

        t, progs = self.cfg.train, self.progs
        self.trackers = trackers
        plan = call_ends(start, t.steps, self._ends_call, progs.k_max)
        sizes = [e - s for s, e in zip([start, *plan], plan, strict=False)]
        self.bar = tqdm(
            total=t.steps,
            initial=start,
            disable=not progress or jax.process_index() != 0,
            dynamic_ncols=True,
            desc=label,
            file=sys.stderr,
            unit="step",
        )
        if start > 0 and jax.process_index() == 0:
            for r in self.runs:
                print(f"resuming {r.name} at step {start}", file=sys.stderr)
        prefetch = self.feed.prefetch(sizes)
        wait_for_all_processes()  # process 0 opened the records; no call leaves it behind
        self.writer = Writer()
        pending: _Call | None = None
        position, preempted = start, False
        self.fetched_at = time.time()
        try:
            for end, n in zip(plan, sizes, strict=True):
                begin = end - n
                self._apply_freezes(begin)
                if self.all_dead():  # diverged, or every run stopped by an early warning
                    break
                if preemption.stop():
                    preempted = True
                    break
                batches, host, stream_state = prefetch.next()
                logged = np.array([self.is_log(begin + 1 + i) for i in range(progs.k_max)])
                self.state, out = progs.call(
                    self.state,
                    self.hp,
                    batches,
                    S.from_host(np.int32(n), progs.replicated),
                    S.from_host(logged, progs.replicated),
                )
                if self.is_eval(end):
                    out["eval"] = progs.evaluate(self.state, self.eval_batches)
                # its outputs' gather (several processes) is dispatched now, before call c+1:
                # reading call c then waits for call c only
                out = S.gather(out)
                snapshot = progs.copy(self.state) if self.is_ckpt(end) else None
                if pending is not None:  # the device runs this call meanwhile
                    self._finish(pending)
                pending = _Call(begin, end, out, host, stream_state, snapshot)
                position = self.position = end
            if pending is not None:
                self._finish(pending)
                if position not in self.saved:  # preempted, or every run diverged
                    self._save(position, self.state, pending.stream_state)
            self.writer.drain()
            return position, preempted
        finally:
            prefetch.close()
            self.writer.close()
            self.bar.close()

    def _finish(self, call: _Call) -> None:
        """Read a call's outputs; write its records, replay a failing update, checkpoint."""
        host_out = S.fetch(call.out)
        now = time.time()
        n = call.end - call.begin
        seconds, self.fetched_at = max(now - self.fetched_at, 1e-9), now
        tokens_per_sec = self.tokens_per_step * n / seconds
        if seconds > PREEMPTION_GRACE_SECONDS / 2 and not self.slow_call_reported:
            self.slow_call_reported = True
            fit = max(1, int(n * PREEMPTION_GRACE_SECONDS / 2 / seconds))
            print(
                f"warning: a call of {n} updates took {seconds:.0f} s; a preemption notice "
                f"leaves about {PREEMPTION_GRACE_SECONDS:.0f} s for the call and the save: set "
                f"train.steps_per_call={fit} or lower",
                file=sys.stderr,
            )
        alive = host_out["alive"][: self.n]
        died_now = {  # runs frozen by an early warning are not alive either, but never failed
            i: int(host_out["diverged_step"][i])
            for i in range(self.n)
            if not alive[i] and self.died[i] is None and not self.frozen[i]
        }
        logged = [s for s in range(call.begin + 1, call.end + 1) if self.is_log(s)]
        replays = {d: self._replay(call, d) for d in set(died_now.values()) if d not in logged}
        for i in range(self.n):
            if self.died[i] is not None or (self.frozen[i] and self.stopped[i] <= call.begin):
                continue
            records = []
            for j, s in enumerate(logged):
                if i in died_now and s > died_now[i]:
                    break
                records.append(self._record(i, s, host_out["metrics"], j, tokens_per_sec))
            if i in died_now and died_now[i] not in logged:
                records.append(
                    self._record(i, died_now[i], replays[died_now[i]], 0, tokens_per_sec)
                )
            if records and "eval" in host_out and records[-1]["step"] == call.end:
                records[-1]["eval/loss"] = float(host_out["eval"][i])
            if records:
                self.last[i] = records[-1]
                if self.trackers:
                    self.writer.submit(self.trackers[i].log, records)
                for event in self.watchers[i].update(records):
                    self._act(i, event, self.plan)
                    self._tell(i, event)
            if i in died_now:
                self.died[i] = died_now[i]
        losses = [r["train/loss"] for r in self.last if r and "train/loss" in r]
        postfix = dict(
            loss=f"{np.nanmin(losses):.3f}" if losses else "…",
            alive=sum(d is None and not f for d, f in zip(self.died, self.frozen, strict=True)),
            warned=sum(w.warned for w in self.watchers),
            tok_s=f"{tokens_per_sec * self.n:.0f}",
        )
        self.writer.submit(self._progress, n, postfix)
        if call.snapshot is not None:
            self._save(call.end, call.snapshot, call.stream_state)

    def _act(self, i: int, event: dict, plan: list[int]) -> None:
        """What a warning does besides being told (``watch.on_warning``): keep the latest
        checkpoint strictly before its step from rotation, or freeze the run from the call boundary after the call
        that is running when the warning is read (the end of the call after the warning's)."""
        self.events[i].append(event)
        action = self.runs[i].config.watch.on_warning
        if event["event"] != "warn" or action == "log":
            return
        if action == "checkpoint":
            before = [s for s in self.saved if s < event["step"]]
            if before:
                self.ckpt.keep(max(before))
        elif self.freeze_at[i] is None:
            after = [e for e in plan if e >= event["step"]]
            self.freeze_at[i] = after[1] if len(after) > 1 else plan[-1]
            self.stop_cause[i] = event

    def _apply_freezes(self, begin: int) -> None:
        """Freeze on the device the runs whose freeze boundary is ``begin`` or earlier."""
        due = [
            i
            for i in range(self.n)
            if self.freeze_at[i] is not None and self.freeze_at[i] <= begin and not self.frozen[i]
        ]
        if not due:
            return
        mask = np.zeros(self.progs.runs, bool)
        mask[due] = True
        self.state = self.progs.freeze(self.state, S.from_host(mask, self.progs.hp))
        for i in due:
            self.frozen[i], self.stopped[i] = True, begin
            cause = self.stop_cause[i] or {}
            self._tell(
                i,
                {
                    "step": begin,
                    "detector": cause.get("detector"),
                    "event": "stop",
                    "value": cause.get("value"),
                    "trend": None,
                    "predicted_step": None,
                    "message": f"frozen from step {begin} (watch.on_warning='stop'; warned at "
                    f"step {cause.get('step')}: {cause.get('message')})",
                },
            )

    def _progress(self, n: int, postfix: dict) -> None:
        self.bar.update(n)
        self.bar.set_postfix(**postfix)

    def _tell(self, i: int, event: dict) -> None:
        """One console line (process 0), an events.jsonl record and a W&B alert (on the
        writer thread)."""
        self.writer.submit(self._told, i, event)

    def _told(self, i: int, event: dict) -> None:
        run = self.runs[i]
        label = run.label or run.name
        kind = {"warn": "warning", "clear": "cleared", "stop": "stopped"}[event["event"]]
        line = f"{kind}: {label} step {event['step']}: {event['detector']}: {event['message']}"
        if jax.process_index() == 0:
            self.bar.write(line, file=sys.stderr)
        if self.trackers:
            record = {**event, "run": run.name, "label": label}
            self.trackers[i].event(record, f"{event['detector']} ({kind}): {label}", line)

    def _record(self, i: int, step: int, metrics: dict, row: int, tokens_per_sec: float) -> dict:
        rec = {"step": step, **M.expand_layers({k: v[row, i] for k, v in metrics.items()})}
        rec["perf/tokens_per_sec"] = tokens_per_sec
        if self.floor is not None:
            rec["train/loss_floor"] = self.floor
        return W.to_jsonable(rec)

    def _replay(self, call: _Call, died: int) -> dict:
        """The metrics of update ``died`` (inside ``call``), computed again on the frozen
        states of the runs that failed there (the current state holds them unchanged)."""
        progs = self.progs
        copy = progs.copy(self.state)
        one = self.feed.single(call.host, died - call.begin - 1)
        logged = np.zeros(progs.k_max, bool)
        logged[0] = True
        out = progs.call(
            copy,
            self.hp,
            one,
            S.from_host(np.int32(1), progs.replicated),
            S.from_host(logged, progs.replicated),
        )[1]
        return S.to_host(out["metrics"])

    def _save(self, step: int, state: Any, stream_state: dict) -> None:
        for tr in self.trackers:  # the records up to the checkpoint are stored before it
            self.writer.submit(tr.flush)
        self.writer.drain()
        meta = {
            "format": FORMAT,
            "release": RELEASE,
            "stream": F.gather_stream_state(stream_state),
            "loss_at_init": [float(x) for x in self.loss0],
            "decay_end": step in self.ends,
            "layers": layout(self.cfg),
        }
        self.ckpt.save(step, state, meta)
        self.saved.add(step)
