"""The pure functions of training: init, the train step, eval, and the K-update call.

Nothing here knows about meshes, jit or the host: ``programs.py`` compiles these functions
under a mesh, and ``loop.py`` drives the compiled call.

The hot path is a pure function ``train_step(state, hp, batch) -> (state, metrics)`` on plain
pytrees (the NNX model is split once; the step merges it inside the trace). ``hp`` holds the
per-run scalar hyperparameters as arrays, so the same step is vmapped over a stack of runs.

Divergence is handled inside the step: if the loss is non-finite or above
``train.divergence_loss`` or any gradient (of a parameter or of a GradStat) is non-finite,
the state is left unchanged (frozen at the last finite step), ``alive`` becomes False and
``diverged_step`` records the update that failed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from stability import metrics as M
from stability.config import Config, per_run_fields
from stability.models import Transformer
from stability.models.layers import GradStat
from stability.optim.build import optimizer_metrics, set_hyperparams
from stability.optim.schedules import learning_rate


class TrainState(NamedTuple):
    params: Any  # nnx.State of nnx.Param
    gstats: Any  # nnx.State of GradStat variables (updated by adding their gradient)
    rest: Any  # nnx.State of every other variable (e.g. running statistics, power-iteration u)
    opt_state: Any
    step: jax.Array  # int32: updates applied (frozen when the run diverges)
    alive: jax.Array  # bool: False once the run has diverged
    diverged_step: jax.Array  # int32: the update that diverged (1-based), -1 if none


# Per-run scalars: (section, field) of the config → key in the ``hp`` dict of the train step.
# Per-run hyperparameters (declared with ``config.per_run``): (section, field) -> the key of
# the step's ``hp`` dict, the field's name.
HYPERPARAMS = {(section, name): name for section, name in per_run_fields()}


def static_config(cfg: Config) -> Config:
    """``cfg`` with every per-run value (hyperparameters, seeds, W&B naming, early-warning
    settings) reset to a default: runs with equal static configs share one compiled program.
    (The data seed is not part of the program: the batches are its input.)"""
    base = Config()
    out = cfg
    for section, name in [*HYPERPARAMS, ("train", "seed"), ("data", "seed")]:
        default = getattr(getattr(base, section), name)
        out = dataclasses.replace(
            out, **{section: dataclasses.replace(getattr(out, section), **{name: default})}
        )
    return dataclasses.replace(out, wandb=base.wandb, watch=base.watch)


def hyperparams(cfg: Config) -> dict[str, jax.Array]:
    """Per-run scalars that are traced (never static): one compiled step serves them all."""
    return {
        key: jnp.float32(getattr(getattr(cfg, section), name))
        for (section, name), key in HYPERPARAMS.items()
    }


def graphdef_of(cfg: Config):
    """The static structure of ``cfg``'s model with its ``train.remat`` policy (no
    parameters are computed)."""
    model = nnx.eval_shape(
        lambda: Transformer(
            cfg.model, remat=cfg.train.remat, scan=cfg.train.scan_layers, rngs=nnx.Rngs(0)
        )
    )
    return split(model)[0]


def split(model: nnx.Module):
    """(graphdef, params, gstats, rest) of a model."""
    return nnx.split(model, nnx.Param, GradStat, ...)


def init_state(cfg: Config, seed: int | jax.Array, tx: optax.GradientTransformation) -> TrainState:
    """A fresh state for one run. Pure: jit it (eager init compiles every initializer op)
    and vmap it over ``seed`` for many runs."""
    model = Transformer(cfg.model, rngs=nnx.Rngs(jax.random.key(seed)), scan=cfg.train.scan_layers)
    _, params, gstats, rest = split(model)
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
        with jax.named_scope("loss"):
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
            "logits/mean": logits_BTV.mean(),
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
        with jax.named_scope("optimizer_update"):
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
        with jax.named_scope("metrics"):
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

AUTO_STEPS_PER_CALL = 100  # cap of train.steps_per_call = 0 (bounds a call's duration)


def steps_per_call_max(t) -> int:
    """Updates the call program is built for (its batches' leading axis): the longest stretch
    without an eval or checkpoint (which end a call), at most :data:`AUTO_STEPS_PER_CALL`, or
    ``train.steps_per_call`` when that is set. Logged steps never end a call: their metrics
    come back from inside it (:func:`make_call`)."""
    if t.steps_per_call:
        return min(t.steps_per_call, t.steps)
    return min(t.eval_every, t.checkpoint_every, t.steps, AUTO_STEPS_PER_CALL)


def rows_per_call(t, k_max: int) -> int:
    """Metric rows a call returns at most: the multiples of ``train.log_every`` among
    ``k_max`` consecutive steps, plus the call's last step (an eval or decay end is logged
    whether or not it is a multiple)."""
    return min(k_max, -(-k_max // t.log_every) + 1)


def make_call(step_fn, k_max: int, rows: int):
    """``call(state, hp, batches, n, logged) -> (state, out)``: ``n`` updates (1 <= n <= k_max)
    on ``batches[:n]`` (every leaf has a leading axis of ``k_max``; the rest is padding).

    ``logged[i]`` (bool, ``[k_max]``, shared by every run) says whether update i's metrics
    come back: the j-th logged update's metrics are row j of ``out["metrics"]`` (every leaf
    ``[rows, ...]``; rows past the last logged update are zeros). An update that is not logged
    runs the step without its metrics (``lax.cond``: XLA removes what no branch output
    needs), so a call of 100 updates with ``log_every=10`` computes metrics 10 times.
    ``out["alive"]`` and ``out["diverged_step"]`` are the state's, as arrays of their own
    (the state itself is donated to the next call before the host reads them)."""

    def call(state, hp, batches, n, logged):
        batch_at = lambda i: jax.tree.map(
            lambda b: jax.lax.dynamic_index_in_dim(b, i, 0, False), batches
        )
        if k_max == 1:  # one update, its metrics always computed: half the program to compile
            state, out = step_fn(state, hp, batch_at(0))
            buf = jax.tree.map(lambda x: x[None], out)
            return state, {
                "metrics": buf,
                "alive": out["alive"],
                "diverged_step": jnp.copy(state.diverged_step),
            }
        shapes = jax.eval_shape(lambda st, b: step_fn(st, hp, b)[1], state, batch_at(0))
        empty = jax.tree.map(lambda s: jnp.zeros((rows, *s.shape), s.dtype), shapes)

        def body(i, carry):
            st, buf, j = carry

            def with_metrics(st, buf, j):
                st, out = step_fn(st, hp, batch_at(i))
                put = lambda b, o: jax.lax.dynamic_update_index_in_dim(b, o, j, 0)
                return st, jax.tree.map(put, buf, out), j + 1

            def without_metrics(st, buf, j):
                return step_fn(st, hp, batch_at(i))[0], buf, j

            return jax.lax.cond(logged[i], with_metrics, without_metrics, st, buf, j)

        state, buf, _ = jax.lax.fori_loop(0, n, body, (state, empty, jnp.int32(0)))
        flags = {"alive": jnp.copy(state.alive), "diverged_step": jnp.copy(state.diverged_step)}
        return state, {"metrics": buf, **flags}

    return call
