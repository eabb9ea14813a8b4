"""Learning-rate schedules as pure functions of (step, per-run scalars).

Peak LR and warmup length are traced values, so runs with different values share one
compiled program (and can be vmapped). ``step`` is the 0-based index of the update; a decay
"reaches" its end value at the step after its last update, as the cosine schedule reaches
``min_lr`` at ``total_steps``.

Schedules (``OptimConfig.schedule``), with peak η, warmup W, total T, minimum η_min:

  warmup        η·(t+1)/W for t < W (every schedule)
  cosine/linear η_min + (η − η_min)·f((t − W)/(T − W)), f = (1 + cos πp)/2 or 1 − p
  constant      η
  rsqrt         max(η_min, min(η, η·√(W/(t+1))))
  wsd           η until the decay starts at s = max(T − d·T, W), then the decay shape from
                η to η_min over [s, T) (d = ``decay_fraction``)
  wsd_s         cycles [e_{k−1}, e_k) (e_0 = 0, e_K = T): η, then the decay shape over the
                last d·(e_k − e_{k−1}) updates of each cycle (not before W), then straight
                back to η at e_k (Wen et al. 2024; Levanter's WSD-S with no rewarmup).
                Cycle ends e_k: ``wsd_decay_ends`` with T appended if missing, or K =
                ``wsd_cycles`` equal cycles e_k = ⌊k·T/K⌋. See ``decay_ends``.

Decay shapes (``decay_shape``) for progress p ∈ [0, 1] of a WSD decay: linear η_min +
(η − η_min)(1 − p); cosine η_min + (η − η_min)(1 + cos πp)/2; sqrt η_min + (η − η_min)(1 − √p);
exponential η·(η_min/η)^p (geometric; needs η_min > 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from stability.config import OptimConfig


def warmup_factor(step: jax.Array, warmup_steps: jax.Array) -> jax.Array:
    """Linear warmup (t+1)/W for t < W, then 1; W = 0 means no warmup."""
    return jnp.minimum(1.0, (step + 1.0) / jnp.maximum(warmup_steps, 1.0))


def decay(kind: str, progress: jax.Array) -> jax.Array:
    """Decay multiplier in [0, 1] at ``progress`` ∈ [0, 1] of the decay phase (1 → 0)."""
    p = jnp.clip(progress, 0.0, 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + jnp.cos(jnp.pi * p))
    if kind == "linear":
        return 1.0 - p
    if kind == "sqrt":
        return 1.0 - jnp.sqrt(p)
    if kind == "constant":
        return jnp.ones_like(p)
    raise ValueError(f"unknown decay kind {kind!r}")


def anneal(shape: str, progress: jax.Array, peak_lr: jax.Array, min_lr: float) -> jax.Array:
    """LR at ``progress`` ∈ [0, 1] of a decay from ``peak_lr`` to ``min_lr`` of shape ``shape``."""
    if shape == "exponential":
        p = jnp.clip(progress, 0.0, 1.0)
        return peak_lr * (min_lr / peak_lr) ** p
    return min_lr + (peak_lr - min_lr) * decay(shape, progress)


def decay_ends(cfg: OptimConfig, total_steps: int) -> list[int]:
    """Update counts after which a WSD/WSD-S decay ends (ascending, the last is
    ``total_steps``): the checkpoints worth keeping. [] for the other schedules."""
    if cfg.schedule == "wsd":
        return [total_steps]
    if cfg.schedule != "wsd_s":
        return []
    if cfg.wsd_decay_ends:
        ends = list(cfg.wsd_decay_ends)
        return ends if ends[-1] == total_steps else [*ends, total_steps]
    k = cfg.wsd_cycles
    return [i * total_steps // k for i in range(1, k + 1)]


def learning_rate(
    cfg: OptimConfig,
    total_steps: int,
    step: jax.Array,
    peak_lr: jax.Array,
    warmup_steps: jax.Array,
) -> jax.Array:
    """LR of update ``step`` (0-based): linear warmup to ``peak_lr``, then ``cfg.schedule``
    (see the module docstring). ``peak_lr`` and ``warmup_steps`` may be traced per run."""
    step = jnp.asarray(step, jnp.float32)
    warm = warmup_factor(step, warmup_steps) * peak_lr
    after = step >= warmup_steps
    if cfg.schedule == "rsqrt":
        decayed = peak_lr * jax.lax.rsqrt(
            jnp.maximum(step + 1.0, 1.0) / jnp.maximum(warmup_steps, 1.0)
        )
        decayed = jnp.maximum(jnp.minimum(decayed, peak_lr), cfg.min_lr)
    elif cfg.schedule in ("wsd", "wsd_s"):
        ends = decay_ends(cfg, total_steps)
        ends_k = jnp.asarray(ends, jnp.float32)  # [K] cycle ends e_k
        starts_k = jnp.asarray([0, *ends[:-1]], jnp.float32)  # [K] cycle starts e_{k-1}
        k = jnp.minimum(jnp.searchsorted(ends_k, step, side="right"), len(ends) - 1)
        end, start = ends_k[k], starts_k[k]
        decay_start = jnp.maximum(end - cfg.decay_fraction * (end - start), warmup_steps)
        progress = (step - decay_start) / jnp.maximum(end - decay_start, 1.0)
        decayed = anneal(cfg.decay_shape, progress, peak_lr, cfg.min_lr)
    else:
        span = jnp.maximum(total_steps - warmup_steps, 1.0)
        f = decay(cfg.schedule, (step - warmup_steps) / span)
        min_lr = cfg.min_lr if cfg.schedule != "constant" else peak_lr
        decayed = min_lr + (peak_lr - min_lr) * f
    return jnp.where(after, decayed, warm)
