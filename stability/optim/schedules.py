"""Learning-rate schedules as pure functions of (step, per-run scalars).

Peak LR and warmup length are traced values, so runs with different values share one
compiled program (and can be vmapped). ``step`` is the 0-based index of the update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from stability.config import OptimConfig


def warmup_factor(step: jax.Array, warmup_steps: jax.Array) -> jax.Array:
    """Linear warmup (t+1)/W for t < W, then 1; W = 0 means no warmup."""
    return jnp.minimum(1.0, (step + 1.0) / jnp.maximum(warmup_steps, 1.0))


def decay(kind: str, progress: jax.Array) -> jax.Array:
    """Decay multiplier in [0, 1] at ``progress`` ∈ [0, 1] of the decay phase."""
    p = jnp.clip(progress, 0.0, 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + jnp.cos(jnp.pi * p))
    if kind == "linear":
        return 1.0 - p
    if kind == "constant":
        return jnp.ones_like(p)
    raise ValueError(f"unknown decay kind {kind!r}")


def learning_rate(
    cfg: OptimConfig,
    total_steps: int,
    step: jax.Array,
    peak_lr: jax.Array,
    warmup_steps: jax.Array,
) -> jax.Array:
    """LR of update ``step``: linear warmup to ``peak_lr``, then decay to ``cfg.min_lr``.

    cosine/linear decay reach ``min_lr`` (absolute) at ``total_steps``; ``constant`` stays at
    the peak; ``rsqrt`` is peak·√(W/t) after warmup, floored at ``min_lr``.
    """
    step = jnp.asarray(step, jnp.float32)
    warm = warmup_factor(step, warmup_steps) * peak_lr
    after = step >= warmup_steps
    if cfg.schedule == "rsqrt":
        decayed = peak_lr * jax.lax.rsqrt(
            jnp.maximum(step + 1.0, 1.0) / jnp.maximum(warmup_steps, 1.0)
        )
        decayed = jnp.maximum(jnp.minimum(decayed, peak_lr), cfg.min_lr)
    else:
        span = jnp.maximum(total_steps - warmup_steps, 1.0)
        f = decay(cfg.schedule, (step - warmup_steps) / span)
        min_lr = cfg.min_lr if cfg.schedule != "constant" else peak_lr
        decayed = min_lr + (peak_lr - min_lr) * f
    return jnp.where(after, decayed, warm)
