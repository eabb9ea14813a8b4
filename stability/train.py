"""Init, the pure train step, eval, and the single-run loop.

The hot path is a pure function ``train_step(state, hp, batch) -> (state, metrics)`` on plain
pytrees (the NNX model is split once; the step merges it inside the trace). ``hp`` holds the
per-run scalar hyperparameters as arrays, so the sweep engine can vmap the same step over runs.

Divergence is handled inside the step: if the loss is non-finite or above
``train.divergence_loss`` or any gradient (of a parameter or of a GradStat) is non-finite,
the state is left unchanged (frozen at the last finite step), ``alive`` becomes False and
``diverged_step`` records the update that failed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stability import metrics as M
from stability.checkpoint import Checkpointer
from stability.compilation import setup_compilation_cache
from stability.config import Config, ConfigError
from stability.data import feed, make_source
from stability.models import Transformer
from stability.models.layers import GradStat
from stability.optim.build import optimizer_metrics, set_hyperparams
from stability.optim.schedules import decay_ends, learning_rate
from stability.tracking import Tracker, read_jsonl, to_jsonable, truncate_metrics, write_json_atomic


class TrainState(NamedTuple):
    params: Any  # nnx.State of nnx.Param
    gstats: Any  # nnx.State of GradStat variables (updated by adding their gradient)
    rest: Any  # nnx.State of every other variable (e.g. running statistics, power-iteration u)
    opt_state: Any
    step: jax.Array  # int32: updates applied (frozen when the run diverges)
    alive: jax.Array  # bool: False once the run has diverged
    diverged_step: jax.Array  # int32: the update that diverged (1-based), -1 if none


# Per-run scalars: (section, field) of the config → key in the ``hp`` dict of the train step.
HYPERPARAMS = {
    ("optim", "lr"): "lr",
    ("optim", "weight_decay"): "weight_decay",
    ("optim", "warmup_steps"): "warmup_steps",
    ("train", "z_loss"): "z_loss",
    ("optim", "eps"): "eps",
}


def static_config(cfg: Config) -> Config:
    """``cfg`` with every per-run value (hyperparameters, seed, W&B naming) reset to a default:
    runs with equal static configs share one compiled program."""
    base = Config()
    out = cfg
    for section, name in [*HYPERPARAMS, ("train", "seed")]:
        default = getattr(getattr(base, section), name)
        out = dataclasses.replace(
            out, **{section: dataclasses.replace(getattr(out, section), **{name: default})}
        )
    return dataclasses.replace(out, wandb=base.wandb)


def compiled_fns(static: Config):
    """(graphdef, tx, init, train step, evaluate) of one run on the first device (tests and
    benchmarks): the programs of ``sharding.shard_train_fns``."""
    from stability import sharding as S

    one = dataclasses.replace(
        static, train=dataclasses.replace(static.train, fsdp=False, tensor_parallel=1)
    )
    fns = S.shard_train_fns(one, S.make_mesh(one, devices=jax.devices()[:1]))
    return fns.graphdef, fns.tx, fns.init, fns.step, fns.evaluate


def hyperparams(cfg: Config) -> dict[str, jax.Array]:
    """Per-run scalars that are traced (never static): one compiled step serves them all."""
    return {
        "lr": jnp.float32(cfg.optim.lr),
        "weight_decay": jnp.float32(cfg.optim.weight_decay),
        "warmup_steps": jnp.float32(cfg.optim.warmup_steps),
        "z_loss": jnp.float32(cfg.train.z_loss),
        "eps": jnp.float32(cfg.optim.eps),
    }


def graphdef_of(cfg: Config):
    """The static structure of ``cfg``'s model with its ``train.remat`` policy (no
    parameters are computed)."""
    model = nnx.eval_shape(lambda: Transformer(cfg.model, remat=cfg.train.remat, rngs=nnx.Rngs(0)))
    return split(model)[0]


def split(model: nnx.Module):
    """(graphdef, params, gstats, rest) of a model."""
    return nnx.split(model, nnx.Param, GradStat, ...)


def init_state(cfg: Config, seed: int | jax.Array, tx: optax.GradientTransformation) -> TrainState:
    """A fresh state for one run. Pure: jit it (eager init compiles every initializer op)
    and vmap it over ``seed`` for many runs."""
    _, params, gstats, rest = split(Transformer(cfg.model, rngs=nnx.Rngs(jax.random.key(seed))))
    return TrainState(
        params=params,
        gstats=gstats,
        rest=rest,
        opt_state=tx.init(params),
        step=jnp.int32(0),
        alive=jnp.bool_(True),
        diverged_step=jnp.int32(-1),
    )


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array):
    """Per-token cross-entropy and log Z (both [B, T], float32)."""
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return log_z_BT - target_logit_BT, log_z_BT


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1)


def make_train_step(cfg: Config, graphdef, tx: optax.GradientTransformation):
    """The pure train step for ``cfg``'s static structure (see module docstring)."""
    total_steps = cfg.train.steps
    bound = cfg.train.divergence_loss

    def loss_fn(params, gstats, rest, batch, hp):
        model = nnx.merge(graphdef, params, gstats, rest, copy=True)
        tokens = batch["tokens"]
        logits_BTV, aux = model(tokens[:, :-1], train=True)
        ce_BT, log_z_BT = cross_entropy(logits_BTV, tokens[:, 1:])
        ce = ce_BT.mean()
        z_loss = hp["z_loss"] * jnp.mean(jnp.square(log_z_BT))
        extra = sum((v for k, v in aux.items() if k.startswith("loss/")), jnp.float32(0))
        new_rest = split(model)[3]
        out = {
            "train/loss": ce,
            "train/z_loss": z_loss,
            "logits/log_z_mean": log_z_BT.mean(),
            "logits/log_z_max": log_z_BT.max(),
            **M.expand_aux(aux),
        }
        for key in batch:
            if key.startswith("mask_"):
                out[f"train/loss_{key[5:]}"] = masked_mean(ce_BT, batch[key])
        return ce + z_loss + extra, (out, new_rest)

    def train_step(state: TrainState, hp: dict, batch: dict):
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
        (_, (out, new_rest)), (grads, gstat_grads) = grad_fn(
            state.params, state.gstats, state.rest, batch, hp
        )
        gstats = jax.tree.map(jnp.add, state.gstats, gstat_grads)
        lr_t = learning_rate(cfg.optim, total_steps, state.step, hp["lr"], hp["warmup_steps"])
        opt_state = set_hyperparams(
            state.opt_state,
            learning_rate=lr_t,
            weight_decay=hp["weight_decay"],
            peak_learning_rate=hp["lr"],
            eps=hp["eps"],
        )
        updates, opt_state = tx.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        loss = out["train/loss"]
        ok = state.alive & jnp.isfinite(loss) & (loss <= bound) & M.all_finite((grads, gstat_grads))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = TrainState(
            params=keep(params, state.params),
            gstats=keep(gstats, state.gstats),
            rest=keep(new_rest, state.rest),
            opt_state=keep(opt_state, state.opt_state),
            step=jnp.where(ok, state.step + 1, state.step),
            alive=ok,
            diverged_step=jnp.where(state.alive & ~ok, state.step + 1, state.diverged_step).astype(
                jnp.int32
            ),
        )
        out.update(
            {
                "lr": lr_t,
                "alive": ok,
                "grad/global_norm": M.global_norm(grads),
                **M.rms_by_path("grad/rms", grads),
                **M.rms_by_path("update/rms", updates, 1.0 / lr_t),
                **M.rms_by_path("param/rms", params),
                **optimizer_metrics(cfg.optim, opt_state, grads),
            }
        )
        return new_state, out

    return train_step


def make_eval_step(cfg: Config, graphdef):
    """Pure eval: summed cross-entropy and token count of one batch (no state updates)."""

    def eval_step(params, gstats, rest, batch):
        model = nnx.merge(graphdef, params, gstats, rest, copy=True)
        tokens = batch["tokens"]
        logits_BTV, _ = model(tokens[:, :-1], train=False)
        ce_BT, _ = cross_entropy(logits_BTV, tokens[:, 1:])
        return ce_BT.sum(), jnp.float32(ce_BT.size)

    return eval_step


def make_evaluate(cfg: Config, graphdef):
    """Pure ``evaluate(state, batches) -> mean cross-entropy`` over a list of batches."""
    eval_step = make_eval_step(cfg, graphdef)

    def evaluate(state: TrainState, batches) -> jax.Array:
        total, count = jnp.float32(0), jnp.float32(0)
        for b in batches:
            s, n = eval_step(state.params, state.gstats, state.rest, b)
            total, count = total + s, count + n
        return total / count

    return evaluate


# ---------------------------------------------------------------------------------------
# K updates per device call.


def make_call(step_fn, k_max: int):
    """``call(state, hp, batches, n) -> (state, metrics)``: ``n`` updates (1 <= n <= k_max)
    with ``batches[:n]`` (every leaf has a leading axis of k_max; the rest is padding), and
    the metrics of the n-th update only. The first n-1 updates run in a loop whose metrics
    nobody returns, so XLA removes them: only the call's last update pays for metrics."""

    def call(state, hp, batches, n):
        if k_max > 1:
            body = lambda i, st: step_fn(st, hp, jax.tree.map(lambda b: b[i], batches))[0]
            state = jax.lax.fori_loop(0, n - 1, body, state)
        last = jax.tree.map(lambda b: jax.lax.dynamic_index_in_dim(b, n - 1, 0, False), batches)
        return step_fn(state, hp, last)

    return call


def steps_per_call_max(t) -> int:
    """Updates the call program is built for (its batch axis): the longest stretch without a
    log, eval or checkpoint step (capped by ``train.steps_per_call`` when that is set)."""
    gap = min(t.log_every, t.eval_every, t.checkpoint_every, t.steps)
    return min(gap, t.steps_per_call) if t.steps_per_call else gap


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


class Feed:
    """Batches of one training stream as global arrays ``[k_max, B, T+1]`` on ``sharding``
    (batch rows on axis 1), this process reading only the rows its devices hold."""

    def __init__(self, source, seed: int, cfg: Config, sharding, k_max: int):
        self.k_max, self.sharding = k_max, sharding
        self.global_rows = (k_max, cfg.data.batch_size)
        self.rows = feed.process_rows(sharding, self.global_rows, 1)
        self.stream = source.train_stream(seed, self.rows)

    def prepare(self, host: dict) -> dict:
        return {
            k: feed.place(v, self.rows, self.sharding, (*self.global_rows, *v.shape[2:]), 1)
            for k, v in host.items()
        }

    def single(self, host: dict, i: int) -> dict:
        """Batch ``i`` of a prepared ``host`` stack alone, at position 0 (for a replay)."""
        return self.prepare(feed.stack_padded([{k: v[i] for k, v in host.items()}], self.k_max))

    def prefetch(self, sizes: list[int]) -> feed.Prefetcher:
        return feed.Prefetcher(self.stream, sizes, self.k_max, self.prepare)


# ---------------------------------------------------------------------------------------
# Guards: memory, preemption.


def estimate_bytes(cfg: Config) -> tuple[int, int]:
    """(parameter+gradient+optimizer bytes, activation bytes) of one run's train step: a
    deliberately rough upper-side estimate used to refuse configs that cannot fit."""
    m, d = cfg.model, cfg.data
    D, L, V, N = m.d_model, m.n_layers, m.vocab_size, m.n_heads
    B, T = d.batch_size, d.seq_len
    params = V * D * (1 if m.tie_embeddings else 2) + L * (4 + 2 * m.mlp_ratio) * D * D
    state_bytes = 4 * params * 4  # params, grads, two Adam moments (float32)
    per_layer = B * T * D * (10 + 3 * m.mlp_ratio) + 3 * B * N * T * T
    act_bytes = 4 * (L * per_layer + 3 * B * T * V)
    return state_bytes, act_bytes


def check_memory(
    cfg: Config, mesh, runs_per_device: int = 1, data_shards: int = 1, state_shards: int = 1
) -> None:
    """Refuse (ConfigError) a config whose estimated footprint exceeds the memory of a device
    of ``mesh`` (``data_shards``: devices that split each run's activations;
    ``state_shards``: devices that split its parameters and optimizer state). A quick first
    filter before XLA's numbers (``sharding.step_memory``)."""
    from stability import sharding as S

    state_b, act_b = estimate_bytes(cfg)
    act_b = -(-act_b // data_shards)
    state_b = -(-state_b // state_shards)
    need = runs_per_device * (state_b + act_b)
    have = S.device_limit_bytes(mesh)
    if need > have:
        m, d = cfg.model, cfg.data
        gib = 2**30
        raise ConfigError(
            f"config (model.d_model={m.d_model}, model.n_layers={m.n_layers}, "
            f"model.vocab_size={m.vocab_size}, data.batch_size={d.batch_size}, "
            f"data.seq_len={d.seq_len}, runs per device={runs_per_device}"
            f"{f', batch split over {data_shards} devices' if data_shards > 1 else ''}) needs an "
            "estimated "
            f"{need / gib:.1f} GiB (parameters+optimizer {runs_per_device * state_b / gib:.1f} GiB, "
            f"activations {runs_per_device * act_b / gib:.1f} GiB) but the device has "
            f"{have / gib:.1f} GiB"
        )


class Preemption:
    """While active, SIGTERM (a preemption notice) and a first Ctrl-C (SIGINT) only set
    ``requested``: the training loops then checkpoint at the next call boundary, flush their
    records and return, and the process exits 0. A second Ctrl-C exits at once (status 130)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            sys.stderr.write("interrupted again: exiting without a checkpoint\n")
            sys.stderr.flush()
            os._exit(130)
        self.requested = True

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


# ---------------------------------------------------------------------------------------
# Workdir handling and the single-run loop.


def check_workdir(cfg: Config, workdir: Path, overwrite: bool) -> bool:
    """Refuse (ConfigError) a ``workdir`` that ``prepare_workdir`` would refuse; writes nothing.
    Returns True if ``overwrite`` will delete a previous run there."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir={workdir} is a file, not a directory")
    cfg_path = workdir / "config.json"
    if not cfg_path.exists():
        if overwrite and workdir.exists() and any(workdir.iterdir()):
            raise ConfigError(
                f"--workdir={workdir} holds files but no run (no config.json); --overwrite "
                "deletes only run directories: delete it yourself or use another workdir"
            )
        return False
    if overwrite:
        return True
    try:
        old = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ConfigError(
            f"{cfg_path} is not valid JSON ({e}); pass --overwrite to delete the run"
        ) from e
    new = to_jsonable(cfg.to_dict())
    if old != new:
        raise ConfigError(
            f"--workdir={workdir} holds a run with a different config "
            f"({first_difference(old, new)}); use another workdir or pass --overwrite to delete it"
        )
    return False


def describe_run(workdir: Path) -> str:
    """What a run directory holds, for messages: logged steps, checkpoints, files."""
    steps = [
        r["step"]
        for r in read_jsonl(workdir / "metrics.jsonl")[0]
        if isinstance(r.get("step"), int)
    ]
    ckpt_dir = workdir / "checkpoints"
    ckpts = (
        sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
        if ckpt_dir.is_dir()
        else []
    )
    n_files = sum(1 for p in workdir.rglob("*") if p.is_file())
    return ", ".join(
        [
            f"metrics up to step {max(steps)}" if steps else "no metrics",
            f"checkpoints at steps {', '.join(map(str, ckpts))}" if ckpts else "no checkpoints",
            f"{n_files} files",
        ]
    )


def prepare_workdir(cfg: Config, workdir: Path, overwrite: bool) -> bool:
    """Create or check ``workdir``. Returns True if it holds a run to resume.

    A workdir holding a run with another config is refused (``check_workdir``); with
    ``overwrite`` the previous run is deleted (and what it held printed) and the run starts
    from scratch, whatever its config.
    """
    if check_workdir(cfg, workdir, overwrite):
        print(f"--overwrite: deleting {workdir} ({describe_run(workdir)})", file=sys.stderr)
        shutil.rmtree(workdir)
    cfg_path = workdir / "config.json"
    if cfg_path.exists():
        return (workdir / "checkpoints").exists()
    workdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cfg_path, to_jsonable(cfg.to_dict()))
    return False


def first_difference(a: Any, b: Any, path: str = "config") -> str:
    """The first leaf where two nested dicts differ, as "config.x.y: A there, B now"."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{path}.{k}")
    return f"{path}: {a!r} there, {b!r} now"


@dataclasses.dataclass
class RunResult:
    steps: int  # updates applied
    final_eval_loss: float
    diverged: bool
    diverged_step: int | None
    preempted: bool = False  # stopped early by SIGTERM, checkpointed; rerun to continue


class Diverged(RuntimeError):
    """The run stopped on a non-finite (or out-of-bound) loss; its last finite state is saved."""


def train(
    cfg: Config, workdir: str | Path, *, overwrite: bool = False, progress: bool = True
) -> RunResult:
    """Train one run in ``workdir``, resuming from its latest checkpoint if there is one.
    SIGTERM at any point checkpoints (once training has started) and returns preempted."""
    with Preemption() as preemption:
        result = _train(cfg, Path(workdir), overwrite, progress, preemption)
    if result.diverged:
        raise Diverged(
            f"loss became non-finite or exceeded train.divergence_loss={cfg.train.divergence_loss} "
            f"at update {result.diverged_step}; the last finite state is checkpointed at step "
            f"{result.steps} in {Path(workdir) / 'checkpoints'} and metrics are in "
            f"{Path(workdir) / 'metrics.jsonl'}"
        )
    return result


def plan_check(cfg: Config, n_runs: int = 1):
    """(mesh, padded run count) of ``n_runs`` runs of ``cfg`` on every device, after the quick
    estimate (:func:`check_memory`) on that mesh's split. A sweep stacks the padded count of
    runs (copies of its last run fill the "run" axis)."""
    from stability import sharding as S

    mesh = S.make_mesh(cfg, n_runs)
    n_run, n_data, n_model = (mesh.shape[a] for a in S.AXES)
    padded = -(-n_runs // n_run) * n_run
    check_memory(
        cfg,
        mesh,
        runs_per_device=padded // n_run,
        data_shards=n_data * n_model,
        state_shards=(n_data if cfg.train.fsdp else 1) * n_model,
    )
    return mesh, padded


def _train(cfg: Config, workdir: Path, overwrite: bool, progress: bool, preemption) -> RunResult:
    from stability import sharding as S

    workdir = Path(workdir)
    mesh, _ = plan_check(cfg)
    source = make_source(cfg.data, cfg.model.vocab_size)  # validates data before any write
    is_main = jax.process_index() == 0
    resume = prepare_workdir(cfg, workdir, overwrite) if is_main else False
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        resume = bool(multihost_utils.broadcast_one_to_all(np.int32(resume)))
    setup_compilation_cache()

    t = cfg.train
    k_max = steps_per_call_max(t)
    fns = S.shard_train_fns(cfg, mesh, k_max=k_max)
    init_fn, call_fn, eval_fn, repl = fns.init, fns.call, fns.evaluate, fns.hp
    # XLA's memory numbers of the train call, compiled once here and run below.
    abstract_args = S.call_args(cfg, fns)
    S.refuse_unless_fits(S.memory_report(call_fn.compile(*abstract_args), mesh, t), cfg)
    hp = {k: S.from_host(v, repl) for k, v in hyperparams(cfg).items()}
    train_feed = Feed(source, cfg.data.seed, cfg, fns.batches, k_max)
    eval_batches = [
        {k: S.from_host(v, fns.batch) for k, v in b.items()}
        for b in source.eval_batches(t.eval_batches)
    ]
    ends = set(decay_ends(cfg.optim, t.steps))  # WSD-S: decayed checkpoints, kept and marked
    ckpt = Checkpointer(workdir / "checkpoints", t.max_to_keep, keep_steps=sorted(ends))

    start = 0
    restored = ckpt.restore_latest(fns.abstract_state) if resume else None  # onto this mesh
    if restored is not None:
        start, state, meta = restored
    else:
        state = init_fn(S.from_host(np.int32(t.seed), repl))
    if restored is not None:
        train_feed.stream.restore(meta["stream"])
        if is_main:
            truncate_metrics(workdir / "metrics.jsonl", start)
        if meta.get("diverged"):
            ckpt.close()
            raise Diverged(f"this run already diverged at update {meta['diverged_step']}")
        print(f"resuming {workdir} from step {start}", file=sys.stderr)
    elif resume and is_main:
        truncate_metrics(workdir / "metrics.jsonl", 0)

    run_config = {**to_jsonable(cfg.to_dict()), "data_description": source.description}
    tracker = None
    if is_main:
        tracker = Tracker(
            workdir, cfg.wandb, run_config, name=cfg.wandb.name or workdir.name, resume=start > 0
        )
    if start >= t.steps:
        if tracker:
            tracker.close()
        ckpt.close()
        done = [r for r in read_metrics(workdir) if "eval/loss" in r]
        final = float(done[-1]["eval/loss"]) if done else float("nan")
        print(f"{workdir} already finished {start} steps", file=sys.stderr)
        return RunResult(start, final, False, None)
    from tqdm import tqdm

    floor = source.loss_floor
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    is_eval = lambda s: s % t.eval_every == 0 or s == t.steps or s in ends
    is_log = lambda s: s % t.log_every == 0 or is_eval(s)
    is_ckpt = lambda s: s % t.checkpoint_every == 0 or s == t.steps or s in ends
    plan = call_ends(start, t.steps, lambda s: is_log(s) or is_ckpt(s), k_max)
    sizes = [e - s for s, e in zip([start, *plan], plan, strict=False)]
    bar = tqdm(
        total=t.steps,
        initial=start,
        disable=not progress or not is_main,
        dynamic_ncols=True,
        desc=workdir.name,
        file=sys.stderr,
        unit="step",
    )

    def record(step: int, out, tokens_per_sec: float) -> dict:
        rec = {"step": step, **jax.device_get(out), "perf/tokens_per_sec": tokens_per_sec}
        if floor is not None:
            rec["train/loss_floor"] = floor
        if tracker:
            tracker.log(rec)
        return rec

    def save(step_count: int, st: TrainState, stream_state, diverged: bool = False):
        meta = {
            "stream": feed.gather_stream_state(stream_state),
            "diverged": diverged,
            "diverged_step": int(st.diverged_step) if diverged else None,
            "decay_end": step_count in ends,
        }
        ckpt.save(step_count, st, meta)

    prefetch = train_feed.prefetch(sizes)
    rec, last_time = None, time.time()
    span_time, span_step = last_time, start  # tokens/s of a record: since the previous record
    try:
        for end, n in zip(plan, sizes, strict=True):
            batches, host, stream_state = prefetch.next()
            state, out = call_fn(state, hp, batches, S.from_host(np.int32(n), repl))
            if is_eval(end):
                out["eval/loss"] = eval_fn(state, eval_batches)
            alive = bool(out["alive"])  # the host waits for the device here, once per call
            now = time.time()
            tokens_per_sec = tokens_per_step * n / max(now - last_time, 1e-9)
            span_tokens_per_sec = tokens_per_step * (end - span_step) / max(now - span_time, 1e-9)
            last_time = now
            if not alive:  # died inside this call: its record is the failing update's
                died = int(state.diverged_step)
                if died != end:  # replay that update on the frozen state: the same record
                    replay = call_fn(
                        jax.tree.map(jnp.copy, state),
                        hp,
                        train_feed.single(host, n - (end - died) - 1),
                        S.from_host(np.int32(1), repl),
                    )[1]
                    out = replay
                record(died, out, span_tokens_per_sec)
                save(int(state.step), state, stream_state, diverged=True)
                return RunResult(int(state.step), float("nan"), True, died)
            if is_log(end):
                rec = record(end, out, span_tokens_per_sec)
                span_time, span_step = now, end
                bar.set_postfix(loss=f"{rec['train/loss']:.4f}", tok_s=f"{tokens_per_sec:.0f}")
            else:
                bar.set_postfix(tok_s=f"{tokens_per_sec:.0f}")
            if is_ckpt(end) or preemption.requested:
                save(end, state, stream_state)
            bar.update(n)
            if preemption.requested and end < t.steps:
                return RunResult(end, float("nan"), False, None, preempted=True)
        final = float(rec["eval/loss"])
        if tracker:
            tracker.summary({"final_eval_loss": final})
        return RunResult(t.steps, final, False, None)
    finally:
        prefetch.close()
        bar.close()
        if tracker:
            tracker.close()
        ckpt.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    """The metric records of a run (torn or foreign lines skipped)."""
    return read_jsonl(Path(workdir) / "metrics.jsonl")[0]
