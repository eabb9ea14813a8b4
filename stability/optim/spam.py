"""SPAM: Spike-Aware Adam with Momentum Reset (Huang et al. 2025, arXiv 2501.06842).

Transcribes the reference optimizer (TianjinYellow/SPAM-Optimizer, ``galore_torch/SPAM.py``) as
an optax transformation. For the update with 1-based index t (never reset), c = t mod ΔT:

1. Momentum reset: if c = 0, m ← 0 and v ← 0 (t keeps counting for bias correction).
2. Spike clipping: if c ≥ 20, entries with g² > θ·v (v from before this update) become
   sign(g)·√(θ·v). The reference tests t ≥ 20 and t mod ΔT ≥ 20; the second implies the first,
   so clipping waits 20 updates after the start and after every reset.
3. Adam moments: m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g².
4. Direction: s·√(1−β2ᵗ)/(1−β1ᵗ) · m/(√v + ε), with ε added to the uncorrected √v as the
   reference does. s is the post-reset warm-up 1 − 0.99·(1 + cos(π·c/(N+1)))/2 for c < N after
   a reset (0.01 on the reset update itself), and 1 otherwise and before the first reset.

``scale_by_spam`` yields step 4 without the learning rate, like ``optax.scale_by_adam``; chain it
with ``optax.scale_by_learning_rate`` (``spam`` does, then the reference's weight decay of the
stepped params, ``decay_stepped_params``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from stability.metrics import matrices

CLIP_DELAY = 20  # updates after the start and after each reset before spikes are clipped


class ScaleBySpamState(NamedTuple):
    """State of ``scale_by_spam``; every array gains a leading axis under ``jax.vmap`` over runs."""

    count: jax.Array  # int32 []: updates applied so far (never reset)
    mu: optax.Updates  # first moment m, shaped like the params; zero outside `mask`
    nu: optax.Updates  # second moment v, shaped like the params; zero outside `mask`
    mask: optax.Updates | None  # sparse variant: bool per param, True where moments are kept
    key: jax.Array | None  # sparse variant: uint32 [2] PRNG key that draws the next mask
    clipped_fraction: jax.Array  # float32 []: fraction of kept entries clipped at the last update
    steps_since_reset: jax.Array  # int32 []: c = t mod ΔT of the last update t (0 on a reset)


def _check(name: str, value, ok, valid: str) -> None:
    """Raises ValueError unless ``ok(value)``; traced values (inside jit/vmap) pass unchecked."""
    if value is not None and not isinstance(value, jax.core.Tracer) and not ok(value):
        raise ValueError(f"{name}={value!r} is invalid: it must be {valid}.")


def _draw_mask(key: jax.Array, like: optax.Params, density: float | jax.Array) -> optax.Params:
    """Bernoulli(density) mask for every matrix (its own ndim ≥ 2, a stacked layer axis aside);
    vectors and scalars keep all."""
    keys = otu.tree_split_key_like(key, like)
    matrix = matrices(like)

    def draw(k, x, is_matrix):
        if not is_matrix:
            return jnp.ones(x.shape, bool)
        return jax.random.bernoulli(k, density, x.shape)

    return jax.tree.map(draw, keys, like, matrix)


def scale_by_spam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    threshold: float = 5000.0,
    reset_interval: int = 500,
    reset_warmup_steps: int = 150,
    density: float | None = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    """SPAM's update direction, without learning rate or weight decay (see the module docstring).

    Args:
      b1: β1, decay of the first moment.
      b2: β2, decay of the second moment.
      eps: ε, added to √v (in gradient units).
      threshold: θ > 0; an entry is a spike when g² > θ·v, i.e. |g| exceeds √θ (≈ 71 for the
        default) times its running rms √v.
      reset_interval: ΔT > 20, updates between momentum resets (the reference's ``DeltaT``).
      reset_warmup_steps: N ≥ 0, updates of cosine warm-up of the step after each reset, as the
        paper defines it (default 150). The reference training script passes its learning-rate
        warm-up length (1000) here instead, which with ΔT = 500 holds s below ≈ 0.5 from the
        first reset on; pass N explicitly to reproduce that.
      density: sparse-momentum variant when set, in (0, 1]: each matrix (ndim ≥ 2) keeps moments,
        and gets a nonzero update, only on a Bernoulli(density) mask redrawn at every reset;
        vectors stay dense, as in the reference where only 2-D weights go in the sparse group.
        This emulates the algorithm with full-size moments; it saves no memory. The reference
        draws its first mask with exactly ⌊density·size⌋ entries, later ones Bernoulli; all of
        ours are Bernoulli.
      seed: seeds the PRNG key (kept in the state) that draws the masks of the sparse variant.

    θ, ε, β1, β2 and density may be traced (``optax.inject_hyperparams``, ``jax.vmap``); ΔT and N
    may be too, but are meant to be static ints.
    """
    _check("reset_interval", reset_interval, lambda x: x > CLIP_DELAY, f"an int > {CLIP_DELAY}")
    _check("reset_warmup_steps", reset_warmup_steps, lambda x: x >= 0, "an int >= 0")
    _check("density", density, lambda x: 0 < x <= 1, "in (0, 1] or None")
    _check("threshold", threshold, lambda x: x > 0, "> 0")

    def init_fn(params: optax.Params) -> ScaleBySpamState:
        mask = key = None
        if density is not None:
            key, sub = jax.random.split(jax.random.PRNGKey(seed))
            mask = _draw_mask(sub, params, density)
        return ScaleBySpamState(
            count=jnp.zeros([], jnp.int32),
            mu=otu.tree_zeros_like(params),
            nu=otu.tree_zeros_like(params),
            mask=mask,
            key=key,
            clipped_fraction=jnp.zeros([], jnp.float32),
            steps_since_reset=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates: optax.Updates, state: ScaleBySpamState, params=None):
        del params
        t = state.count + 1  # int32 []: 1-based index of this update
        c = t % reset_interval  # int32 []: updates since the last reset, 0 on a reset update
        reset = c == 0
        mu, nu = jax.tree.map(
            lambda x: jnp.where(reset, jnp.zeros_like(x), x), (state.mu, state.nu)
        )

        mask, key = state.mask, state.key
        if mask is not None:

            def redraw():
                new_key, sub = jax.random.split(key)
                return new_key, _draw_mask(sub, updates, density)

            key, mask = jax.lax.cond(reset, redraw, lambda: (key, mask))
            kept = mask
        else:
            kept = jax.tree.map(lambda g: jnp.ones(g.shape, bool), updates)

        g = jax.tree.map(lambda g, k: jnp.where(k, g, 0), updates, kept)  # zero outside mask
        spikes = jax.tree.map(lambda g, v: (c >= CLIP_DELAY) & (g * g > threshold * v), g, nu)
        g = jax.tree.map(
            lambda g, v, sp: jnp.where(sp, jnp.sign(g) * jnp.sqrt(threshold * v), g), g, nu, spikes
        )
        mu = jax.tree.map(lambda m, g: (b1 * m + (1 - b1) * g).astype(m.dtype), mu, g)
        nu = jax.tree.map(lambda v, g: (b2 * v + (1 - b2) * g * g).astype(v.dtype), nu, g)

        warm = (t >= reset_interval) & (c < reset_warmup_steps)
        cosine = 0.99 * 0.5 * (1 + jnp.cos(jnp.pi * c / (reset_warmup_steps + 1)))
        s = jnp.where(warm, 1 - cosine, 1.0)
        scale = s * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        updates = jax.tree.map(
            lambda g, m, v: (scale * m / (jnp.sqrt(v) + eps)).astype(g.dtype), updates, mu, nu
        )

        n_spikes = sum(jnp.sum(x, dtype=jnp.float32) for x in jax.tree.leaves(spikes))
        n_kept = sum(jnp.sum(x, dtype=jnp.float32) for x in jax.tree.leaves(kept))
        return updates, ScaleBySpamState(
            count=t,
            mu=mu,
            nu=nu,
            mask=mask,
            key=key,
            clipped_fraction=n_spikes / jnp.maximum(n_kept, 1),
            steps_since_reset=c.astype(jnp.int32),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def decay_stepped_params(
    weight_decay: float | jax.Array, learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformation:
    """SPAM's weight decay as the reference applies it, after the step: p ← (p + u)·(1 − η·λ)
    for the LR-scaled update u, i.e. u ← u − η·λ·(p + u). Chain it after
    ``optax.scale_by_learning_rate``; ``learning_rate`` may be a schedule (counted from 0, as
    ``scale_by_learning_rate`` counts)."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params):
        if params is None:
            raise ValueError("decay_stepped_params needs the params: pass them to update()")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        updates = jax.tree.map(
            lambda u, p: (u - lr * weight_decay * (p + u)).astype(u.dtype), updates, params
        )
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def spam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    threshold: float = 5000.0,
    reset_interval: int = 500,
    reset_warmup_steps: int = 150,
    density: float | None = None,
    seed: int = 0,
    weight_decay: float = 0.0,
    weight_decay_mask=None,
) -> optax.GradientTransformation:
    """SPAM with learning rate and weight decay as in the reference:
    p ← (p − η·SPAM(g))·(1 − η·λ) (``decay_stepped_params``).

    The reference's sparse variant never decays (it updates a copy, a bug); we decay.
    ``weight_decay_mask``: a pytree of bools (or a function of the params returning one), True
    where params decay, as ``optax.masked`` takes it; None decays every param. Other arguments
    as in ``scale_by_spam``; ``learning_rate`` may be a schedule.
    """
    decay = decay_stepped_params(weight_decay, learning_rate)
    return optax.chain(
        scale_by_spam(b1, b2, eps, threshold, reset_interval, reset_warmup_steps, density, seed),
        optax.scale_by_learning_rate(learning_rate),
        decay if weight_decay_mask is None else optax.masked(decay, weight_decay_mask),
    )


def spam_diagnostics(opt_state) -> dict[str, jax.Array]:
    """``spam/clipped_fraction`` and ``spam/steps_since_reset`` of the SPAM state in any optax
    state (chains, ``inject_hyperparams``, ``masked``…); per run under ``jax.vmap``."""
    is_spam = lambda x: isinstance(x, ScaleBySpamState)
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_spam) if is_spam(x)]
    if len(found) != 1:
        raise ValueError(f"opt_state holds {len(found)} ScaleBySpamState; expected exactly 1.")
    return {
        "spam/clipped_fraction": found[0].clipped_fraction,
        "spam/steps_since_reset": found[0].steps_since_reset,
    }
