"""Drop-in layers: linear kinds (plain | σReparam) and norm kinds (LayerNorm | RMSNorm |
PowerNorm), each chosen by one small table (``make_linear``, ``make_norm``).

Every layer is called as ``layer(x, train=...)``. ``train=True`` lets a layer update its
non-optimised state (σReparam's power-iteration vector u, PowerNorm's running statistics);
``train=False`` (evaluation) never changes any state.

Activations around matmuls are kept 2-D (``x_MD`` with M = batch·time): on CPU the backward
runs markedly faster than with [B, T, D] operands.

Matrices carry the logical names of their two dims as the variable metadata ``logical_axes``
(e.g. ``("embed", "mlp")``); ``stability/sharding.py`` maps them onto mesh axes. Vectors and
scalars carry none (replicated).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from stability.config import GammaInit, LinearKind, ModelConfig


class GradStat(nnx.Variable):
    """Non-optimised state updated through its "gradient": after each step the train step adds
    d(loss)/d(stat) to the value, outside the optimiser. A ``jax.custom_vjp`` layer uses this to
    return a running statistic from its backward pass (PowerNorm's ν)."""


class RunningStat(nnx.Variable):
    """Non-optimised state that the forward pass updates when ``train=True`` (σReparam's u,
    PowerNorm's φ and step count). Not an ``nnx.Param``: the optimiser never sees it; it lands
    in the train state's ``rest``."""


# std exactly 1/sqrt(fan_in) (variance_scaling corrects for the truncation at ±2σ).
fan_in_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


Axes = tuple[str | None, str | None]  # logical names of a kernel's (d_in, d_out) dims


def scoped(name: str):
    """The decorated function's ops under ``jax.named_scope(name)``: their HLO op names (and so
    profiles, and ``benchmarks/train_step.py --breakdown``) say which part of the step they
    are."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with jax.named_scope(name):
                return fn(*args, **kwargs)

        return inner

    return wrap


class Linear(nnx.Module):
    """y = x·W, no bias; W [d_in, d_out] ~ truncated normal with std 1/√d_in, with logical
    axis names ``axes``. Stateless: ``train`` is accepted for the common layer interface."""

    def __init__(
        self, d_in: int, d_out: int, *, dtype: jnp.dtype, rngs: nnx.Rngs, axes: Axes = (None, None)
    ):
        kernel_IO = fan_in_init(rngs.params(), (d_in, d_out), jnp.float32)
        self.kernel = nnx.Param(kernel_IO, logical_axes=axes)
        self.dtype = dtype

    def __call__(self, x_MD: jax.Array, *, train: bool = True) -> jax.Array:
        return jnp.dot(x_MD.astype(self.dtype), self.kernel[...].astype(self.dtype))


def _unit(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x)), 1e-30))


class ReparamLinear(nnx.Module):
    """σReparam (Zhai et al. 2023): y = x·Ŵ, Ŵ = (γ/σ(W))·W, W [d_in, d_out] initialised as
    :class:`Linear`.

    σ(W) (the top singular value) comes from one power-iteration step per call from the
    persistent unit vector u [d_out]: v = normalize(W u), u' = normalize(Wᵀ v), σ = vᵀ W u', with
    u, v under stop-gradient and σ differentiable in W. ``train=True`` stores u'; evaluation
    recomputes σ from the stored u without storing it. u starts at W₀'s top right singular
    vector (SVD), so σ is exact from the first step. The learned scalar γ starts at σ(W₀)
    (``gamma_init="sigma"``: Ŵ = W at init, as the PyTorch reference) or 1 (``"one"``, as the
    JAX reference). Each call sows σ and γ (no gradient) as ``nnx.Intermediate`` values
    ``reparam_sigma`` and ``reparam_gamma``, which the model reports as
    ``reparam/{sigma,gamma}/{layer}``.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        dtype: jnp.dtype,
        gamma_init: GammaInit,
        rngs: nnx.Rngs,
        axes: Axes = (None, None),
    ):
        kernel_IO = fan_in_init(rngs.params(), (d_in, d_out), jnp.float32)
        _, s_K, vh_KO = jnp.linalg.svd(kernel_IO, full_matrices=False)
        self.kernel = nnx.Param(kernel_IO, logical_axes=axes)
        self.u = RunningStat(vh_KO[0])
        self.gamma = nnx.Param(s_K[0] if gamma_init == "sigma" else jnp.float32(1.0))
        self.dtype = dtype

    def spectral_norm(self, *, train: bool) -> jax.Array:
        """σ(W) after one power-iteration step from the stored u (stored back if ``train``)."""
        w_IO = self.kernel[...]
        w_sg = jax.lax.stop_gradient(w_IO)
        v_I = _unit(w_sg @ self.u[...])
        u_O = _unit(w_sg.T @ v_I)
        if train:
            self.u[...] = u_O
        return v_I @ w_IO @ u_O

    def __call__(self, x_MD: jax.Array, *, train: bool = True) -> jax.Array:
        sigma = self.spectral_norm(train=train)
        gamma = self.gamma[...]
        self.sow(nnx.Intermediate, "reparam_sigma", jax.lax.stop_gradient(sigma))
        self.sow(nnx.Intermediate, "reparam_gamma", jax.lax.stop_gradient(gamma))
        w_IO = (gamma / sigma) * self.kernel[...]
        return jnp.dot(x_MD.astype(self.dtype), w_IO.astype(self.dtype))


class _ScaleNorm(nnx.Module):
    """A norm over the last axis with a learned scale γ (ones at init) and ε."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps


class LayerNorm(_ScaleNorm):
    """(x − mean)/√(var + ε)·γ over the last axis; scale only (the recipe has no biases)."""

    @scoped("normalization")
    def __call__(self, x: jax.Array, *, train: bool = True) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]).astype(x.dtype)


class RMSNorm(_ScaleNorm):
    """x/√(mean(x²) + ε)·γ over the last axis."""

    @scoped("normalization")
    def __call__(self, x: jax.Array, *, train: bool = True) -> jax.Array:
        x32 = x.astype(jnp.float32)
        ms = jnp.square(x32).mean(-1, keepdims=True)
        return (x32 * jax.lax.rsqrt(ms + self.eps) * self.scale[...]).astype(x.dtype)


# PowerNorm constants of the reference (sIncerass/powernorm, mask_powernorm.py).
POWERNORM_EPS = 1e-5  # in GroupScaling and in the division by √(φ + ε)
POWERNORM_ALPHA_FWD = 0.9  # φ ← α_f·φ + (1 − α_f)·ψ²
POWERNORM_ALPHA_BKW = 0.9  # x̃ = g − (1 − α_b)·ν·z


def group_scale(x_MD: jax.Array, n_groups: int) -> jax.Array:
    """GroupScaling: each token's channels divided by their RMS within each of ``n_groups``
    contiguous channel groups (ε = 1e-5); float32."""
    M, D = x_MD.shape
    x_MGC = x_MD.astype(jnp.float32).reshape(M, n_groups, D // n_groups)
    ms_MG1 = jnp.square(x_MGC).mean(-1, keepdims=True)
    return (x_MGC * jax.lax.rsqrt(ms_MG1 + POWERNORM_EPS)).reshape(M, D)


@jax.custom_vjp
def power_scale(x_MD: jax.Array, var_D: jax.Array, psi2_D: jax.Array, nu_D: jax.Array):
    """z = x/√(var + ε) with PowerNorm's approximate backward (Shen et al. 2020, Alg. 1).

    For the cotangent g = ∂L/∂z: x̃ = g − (1 − α_b)·ν·z, ∂L/∂x = x̃/√(ψ² + ε) (ψ² is the batch's
    per-channel mean square, as in the reference), and ν's "cotangent" is the reference's
    increment mean over tokens of x̃·z, so adding it to ν (``GradStat``) is ν's update. var and
    ψ² get zero cotangents.
    """
    return x_MD * jax.lax.rsqrt(var_D + POWERNORM_EPS)


def _power_scale_fwd(x_MD, var_D, psi2_D, nu_D):
    z_MD = power_scale(x_MD, var_D, psi2_D, nu_D)
    return z_MD, (z_MD, psi2_D, nu_D)


def _power_scale_bwd(res, g_MD):
    z_MD, psi2_D, nu_D = res
    xt_MD = g_MD - (1 - POWERNORM_ALPHA_BKW) * nu_D * z_MD
    dx_MD = xt_MD * jax.lax.rsqrt(psi2_D + POWERNORM_EPS)
    zero_D = jnp.zeros_like(psi2_D)
    return dx_MD, zero_D, zero_D, (xt_MD * z_MD).mean(0)


power_scale.defvjp(_power_scale_fwd, _power_scale_bwd)


class PowerNorm(nnx.Module):
    """PowerNorm (Shen et al. 2020): y = γ·z + β over the last axis, z = x_g/√(φ + ε), where
    x_g = GroupScaling(x) (one group per head) and φ [dim] is a running per-channel quadratic
    mean of x_g over the tokens of past training batches (φ₀ = 1, α_f = 0.9). The backward is
    the paper's approximation (:func:`power_scale`) with running statistic ν (``GradStat``,
    ν₀ = 0, α_b = 0.9).

    Training step t (1-based, counted only if ``warmup`` > 0): ψ² = per-channel mean of x_g²
    over the batch's tokens; z uses ψ² instead of φ while t <= warmup; φ ← φ·(t−1)/t + ψ²/t
    while t < warmup, then φ ← α_f·φ + (1 − α_f)·ψ² every step. ``warmup=0`` (the default here)
    never normalises by the current batch, so no future token leaks into a causal forward
    pass. Evaluation: y = γ·x_g/√(φ + ε) + β, no state change. φ and ν are per replica (not
    averaged across data-parallel devices).
    """

    def __init__(self, dim: int, n_groups: int, warmup: int):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.phi = RunningStat(jnp.ones((dim,), jnp.float32))
        self.nu = GradStat(jnp.zeros((dim,), jnp.float32))
        if warmup:
            self.step = RunningStat(jnp.zeros((), jnp.int32))
        self.n_groups, self.warmup = n_groups, warmup

    @scoped("normalization")
    def __call__(self, x: jax.Array, *, train: bool = True) -> jax.Array:
        x_MD = group_scale(x.reshape(-1, x.shape[-1]), self.n_groups)
        phi_D = self.phi[...]
        if train:
            psi2_D = jax.lax.stop_gradient(jnp.square(x_MD).mean(0))
            var_D = phi_D
            if self.warmup:
                t = self.step[...] + 1
                tf = t.astype(jnp.float32)
                var_D = jnp.where(t <= self.warmup, psi2_D, phi_D)
                phi_D = jnp.where(t < self.warmup, phi_D * (tf - 1) / tf + psi2_D / tf, phi_D)
                self.step[...] = t
            self.phi[...] = POWERNORM_ALPHA_FWD * phi_D + (1 - POWERNORM_ALPHA_FWD) * psi2_D
            z_MD = power_scale(x_MD, var_D, psi2_D, self.nu[...])
        else:
            z_MD = x_MD * jax.lax.rsqrt(phi_D + POWERNORM_EPS)
        y_MD = z_MD * self.scale[...] + self.bias[...]
        return y_MD.reshape(x.shape).astype(x.dtype)


LINEARS: dict[str, Callable[..., nnx.Module]] = {
    "plain": lambda cfg, d_in, d_out, axes, rngs: Linear(
        d_in, d_out, dtype=jnp.dtype(cfg.dtype), axes=axes, rngs=rngs
    ),
    "sigma_reparam": lambda cfg, d_in, d_out, axes, rngs: ReparamLinear(
        d_in,
        d_out,
        dtype=jnp.dtype(cfg.dtype),
        gamma_init=cfg.sigma_reparam_gamma_init,
        axes=axes,
        rngs=rngs,
    ),
}

NORMS: dict[str, Callable[[ModelConfig, int], nnx.Module]] = {
    "layernorm": lambda cfg, dim: LayerNorm(dim, cfg.norm_eps),
    "rmsnorm": lambda cfg, dim: RMSNorm(dim, cfg.norm_eps),
    "powernorm": lambda cfg, dim: PowerNorm(dim, cfg.n_heads, cfg.powernorm_warmup),
}


def make_linear(
    cfg: ModelConfig,
    d_in: int,
    d_out: int,
    *,
    axes: Axes,
    rngs: nnx.Rngs,
    kind: LinearKind | None = None,
) -> nnx.Module:
    """A bias-free linear layer of kind ``kind`` (default ``cfg.linear``) whose kernel's dims
    have the logical names ``axes``."""
    return LINEARS[kind or cfg.linear](cfg, d_in, d_out, axes, rngs)


def make_norm(cfg: ModelConfig, dim: int) -> nnx.Module:
    """The residual-stream norm of kind ``cfg.norm`` over a last axis of size ``dim``."""
    return NORMS[cfg.norm](cfg, dim)
