"""Drop-in layers: a bias-free Linear and the normalisation kinds, chosen by ``make_norm``.

Activations around matmuls are kept 2-D (``x_MD`` with M = batch·time): on CPU the backward
runs markedly faster than with [B, T, D] operands.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stability.config import ModelConfig


class GradStat(nnx.Variable):
    """Non-optimised state updated through its "gradient": after each step the train step adds
    d(loss)/d(stat) to the value, outside the optimiser. A ``jax.custom_vjp`` layer uses this to
    return a running statistic from its backward pass (PowerNorm's ν)."""


# std exactly 1/sqrt(fan_in) (variance_scaling corrects for the truncation at ±2σ).
fan_in_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class Linear(nnx.Module):
    """y = x·W, no bias; W [d_in, d_out] ~ truncated normal with std 1/√d_in."""

    def __init__(self, d_in: int, d_out: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(fan_in_init(rngs.params(), (d_in, d_out), jnp.float32))
        self.dtype = dtype

    def __call__(self, x_MD: jax.Array) -> jax.Array:
        return jnp.dot(x_MD.astype(self.dtype), self.kernel[...].astype(self.dtype))


class LayerNorm(nnx.Module):
    """(x − mean)/√(var + ε)·γ over the last axis; scale only (the recipe has no biases)."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]).astype(x.dtype)


class RMSNorm(nnx.Module):
    """x/√(mean(x²) + ε)·γ over the last axis."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        ms = jnp.square(x32).mean(-1, keepdims=True)
        return (x32 * jax.lax.rsqrt(ms + self.eps) * self.scale[...]).astype(x.dtype)


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}


def make_norm(cfg: ModelConfig, dim: int) -> nnx.Module:
    """The residual-stream norm of kind ``cfg.norm`` over a last axis of size ``dim``."""
    return NORMS[cfg.norm](dim, cfg.norm_eps)
