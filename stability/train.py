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
import functools
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
import optax
from flax import nnx

from stability import metrics as M
from stability.checkpoint import Checkpointer
from stability.config import Config, ConfigError
from stability.data import make_source
from stability.models import Transformer
from stability.models.layers import GradStat
from stability.optim.build import make_optimizer, optimizer_metrics, set_hyperparams
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


@functools.lru_cache(maxsize=32)
def compiled_fns(static: Config):
    """(graphdef, tx, jitted init, jitted train step, jitted evaluate) for a static config,
    built once per process."""
    tx = make_optimizer(static.optim, d_model=static.model.d_model)
    graphdef = graphdef_of(static)
    init = jax.jit(lambda seed: init_state(static, seed, tx))
    step = jax.jit(make_train_step(static, graphdef, tx), donate_argnums=0)
    evaluate = jax.jit(make_evaluate(static, graphdef))
    return graphdef, tx, init, step, evaluate


def hyperparams(cfg: Config) -> dict[str, jax.Array]:
    """Per-run scalars that are traced (never static): one compiled step serves them all."""
    return {
        "lr": jnp.float32(cfg.optim.lr),
        "weight_decay": jnp.float32(cfg.optim.weight_decay),
        "warmup_steps": jnp.float32(cfg.optim.warmup_steps),
        "z_loss": jnp.float32(cfg.train.z_loss),
    }


def graphdef_of(cfg: Config):
    """The static structure of ``cfg``'s model (no parameters are computed)."""
    return split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))[0]


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


def device_memory_bytes() -> int:
    """Memory of one device: the accelerator's limit, or the host's physical memory on CPU."""
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(cfg: Config, runs_per_device: int = 1, data_shards: int = 1) -> None:
    """Refuse (ConfigError) a config whose estimated footprint exceeds the device's memory
    (``data_shards``: devices that split each run's batch)."""
    state_b, act_b = estimate_bytes(cfg)
    act_b = -(-act_b // data_shards)
    need = runs_per_device * (state_b + act_b)
    have = device_memory_bytes()
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
    """While active, SIGTERM (a preemption notice) only sets ``requested``: the training loops
    then checkpoint, flush their records and return, and the process exits 0."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


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


def _train(cfg: Config, workdir: Path, overwrite: bool, progress: bool, preemption) -> RunResult:
    workdir = Path(workdir)
    check_memory(cfg)
    source = make_source(cfg.data, cfg.model.vocab_size)  # validates data before any write
    resume = prepare_workdir(cfg, workdir, overwrite)

    _, _, init_fn, step_fn, eval_fn = compiled_fns(static_config(cfg))
    state = init_fn(cfg.train.seed)
    hp = hyperparams(cfg)
    stream = source.train_stream(cfg.data.seed)
    eval_batches = source.eval_batches(cfg.train.eval_batches)
    decay_end_steps = decay_ends(cfg.optim, cfg.train.steps)
    ckpt = Checkpointer(workdir / "checkpoints", cfg.train.max_to_keep, keep_steps=decay_end_steps)

    start = 0
    restored = ckpt.restore_latest(state) if resume else None
    if restored is not None:
        start, state, meta = restored
        stream.restore(meta["stream"])
        truncate_metrics(workdir / "metrics.jsonl", start)
        if meta.get("diverged"):
            ckpt.close()
            raise Diverged(f"this run already diverged at update {meta['diverged_step']}")
        print(f"resuming {workdir} from step {start}", file=sys.stderr)
    elif resume:
        truncate_metrics(workdir / "metrics.jsonl", 0)

    run_config = {**to_jsonable(cfg.to_dict()), "data_description": source.description}
    tracker = Tracker(
        workdir, cfg.wandb, run_config, name=cfg.wandb.name or workdir.name, resume=start > 0
    )
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    if start >= cfg.train.steps:
        tracker.close()
        ckpt.close()
        done = [r for r in read_metrics(workdir) if "eval/loss" in r]
        final = float(done[-1]["eval/loss"]) if done else float("nan")
        print(f"{workdir} already finished {start} steps", file=sys.stderr)
        return RunResult(start, final, False, None)
    from tqdm import tqdm

    t = cfg.train
    floor = source.loss_floor
    bar = tqdm(
        total=t.steps,
        initial=start,
        disable=not progress,
        dynamic_ncols=True,
        desc=workdir.name,
        file=sys.stderr,
    )
    pending = None  # (step, metrics on device): fetched one step late
    last_time, last_step = time.time(), start

    def flush(pending):
        nonlocal last_time, last_step
        step, out = pending
        now = time.time()
        rec = {"step": step, **jax.device_get(out)}
        rec["perf/tokens_per_sec"] = (
            tokens_per_step * (step - last_step) / max(now - last_time, 1e-9)
        )
        last_time, last_step = now, step
        if floor is not None:
            rec["train/loss_floor"] = floor
        return rec

    ends = set(decay_ends(cfg.optim, t.steps))  # WSD-S: decayed checkpoints, kept and marked

    def save(step_count: int, st: TrainState, diverged: bool = False):
        meta = {
            "stream": stream.state(),
            "diverged": diverged,
            "diverged_step": int(st.diverged_step) if diverged else None,
            "decay_end": step_count in ends,
        }
        ckpt.save(step_count, st, meta)

    def is_log_step(s: int) -> bool:
        return s % t.log_every == 0 or s % t.eval_every == 0 or s == t.steps or s in ends

    try:
        for i in range(start, t.steps):
            batch = stream.next()
            state, out = step_fn(state, hp, batch)
            s = i + 1  # updates done (the record's "step")
            if pending is not None:
                prev_step, prev_out = pending
                if is_log_step(prev_step) or not bool(prev_out["alive"]):
                    rec = flush(pending)
                    tracker.log(rec)
                    bar.set_postfix(
                        loss=f"{rec['train/loss']:.4f}", tok_s=f"{rec['perf/tokens_per_sec']:.0f}"
                    )
                    if not rec["alive"]:
                        break
            if s % t.eval_every == 0 or s == t.steps or s in ends:
                out["eval/loss"] = eval_fn(state, eval_batches)
            pending = (s, out)
            if s % t.checkpoint_every == 0 or s == t.steps or s in ends or preemption.requested:
                save(s, state)
            bar.update(1)
            if preemption.requested and s < t.steps:
                if is_log_step(s):
                    tracker.log(flush(pending))
                print(
                    f"SIGTERM: checkpointed {workdir} at step {s}; rerun to continue",
                    file=sys.stderr,
                )
                return RunResult(s, float("nan"), False, None, preempted=True)
        else:  # the last record (no break: the run did not diverge before it)
            rec = flush(pending)
            tracker.log(rec)
        if not rec["alive"]:
            save(int(state.step), state, diverged=True)
            return RunResult(int(state.step), float("nan"), True, int(state.diverged_step))
        final = float(rec["eval/loss"])
        tracker.summary({"final_eval_loss": final})
        return RunResult(t.steps, final, False, None)
    finally:
        bar.close()
        tracker.close()
        ckpt.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    """The metric records of a run (torn or foreign lines skipped)."""
    return read_jsonl(Path(workdir) / "metrics.jsonl")[0]
