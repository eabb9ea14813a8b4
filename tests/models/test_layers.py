"""σReparam against an SVD and PowerNorm against a NumPy transcription of its reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stability.models.layers import GradStat, PowerNorm, ReparamLinear


def top_singular_value(w) -> float:
    return float(np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)[0])


def ill_conditioned(rng, d_in, d_out, cond=1e6):
    """U·diag(s)·Vᵀ with singular values spaced log-uniformly from 3 down to 3/cond."""
    u, _ = np.linalg.qr(rng.normal(size=(d_in, d_in)))
    v, _ = np.linalg.qr(rng.normal(size=(d_out, d_out)))
    k = min(d_in, d_out)
    s = 3.0 * np.logspace(0, -np.log10(cond), k)
    return (u[:, :k] * s) @ v[:, :k].T


def test_sigma_from_svd_init_is_exact_after_one_step():
    layer = ReparamLinear(48, 24, dtype=jnp.float32, gamma_init="sigma", rngs=nnx.Rngs(0))
    sigma = layer.spectral_norm(train=True)
    np.testing.assert_allclose(sigma, top_singular_value(layer.kernel[...]), rtol=1e-3)
    np.testing.assert_allclose(layer.gamma[...], sigma, rtol=1e-5)
    # u, v carry no gradient: dσ/dW = v·uᵀ, the top singular pair's outer product.
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    grad = jax.grad(lambda p: nnx.merge(graphdef, p, rest).spectral_norm(train=False))(params)
    u, _, vh = np.linalg.svd(np.asarray(layer.kernel[...], np.float64))
    np.testing.assert_allclose(grad["kernel"][...], np.outer(u[:, 0], vh[0]), atol=1e-4)


@pytest.mark.parametrize("kind", ["random", "ill_conditioned"])
def test_sigma_power_iteration_converges_to_top_singular_value(kind):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(40, 32)) / 40**0.5 if kind == "random" else ill_conditioned(rng, 40, 32)
    layer = ReparamLinear(40, 32, dtype=jnp.float32, gamma_init="sigma", rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.asarray(w, jnp.float32)
    # From the SVD of this matrix, one step already gives σ.
    layer.u[...] = jnp.asarray(np.linalg.svd(w)[2][0], jnp.float32)
    np.testing.assert_allclose(layer.spectral_norm(train=True), top_singular_value(w), rtol=1e-3)
    # From an arbitrary start, repeated train-mode steps converge.
    layer.u[...] = jnp.asarray(rng.normal(size=32) / 32**0.5, jnp.float32)
    step = nnx.jit(lambda m: m.spectral_norm(train=True))
    for _ in range(300):
        sigma = step(layer)
    np.testing.assert_allclose(sigma, top_singular_value(w), rtol=1e-3)


def test_reparam_forward_equals_plain_at_init_and_sows_sigma_gamma():
    layer = ReparamLinear(16, 8, dtype=jnp.float32, gamma_init="sigma", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (5, 16))
    y, sown = nnx.capture(layer, nnx.Intermediate)(x, train=True)
    np.testing.assert_allclose(y, x @ layer.kernel[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        sown["reparam_sigma"][0], top_singular_value(layer.kernel[...]), rtol=1e-3
    )
    np.testing.assert_allclose(sown["reparam_gamma"][0], layer.gamma[...])
    one = ReparamLinear(16, 8, dtype=jnp.float32, gamma_init="one", rngs=nnx.Rngs(0))
    assert float(one.gamma[...]) == 1.0
    y1, _ = nnx.capture(one, nnx.Intermediate)(x, train=False)
    np.testing.assert_allclose(y1, y / layer.gamma[...], rtol=1e-4, atol=1e-6)


def test_reparam_layer_alone_sows_into_itself():
    """Outside any capture the layer stores its sown σ, γ as attributes, one per call."""
    layer = ReparamLinear(16, 8, dtype=jnp.float32, gamma_init="sigma", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (5, 16))
    np.testing.assert_allclose(layer(x), x @ layer.kernel[...], rtol=1e-5, atol=1e-6)
    layer(x, train=False)
    assert len(layer.reparam_sigma.get_value()) == 2
    np.testing.assert_allclose(
        layer.reparam_sigma.get_value()[-1], layer.spectral_norm(train=False)
    )
    np.testing.assert_allclose(layer.reparam_gamma.get_value()[-1], layer.gamma[...])


# ---------------------------------------------------------------------------------------
# PowerNorm against a NumPy transcription of sIncerass/powernorm (mask_powernorm.py, no mask).


class NumpyPowerNorm:
    """MaskPowerNorm with GroupScaling1D, written out in float64 NumPy for [tokens, C] inputs."""

    def __init__(self, weight, bias, groups, warmup, eps=1e-5, afwd=0.9, abkw=0.9):
        self.weight, self.bias, self.groups, self.warmup = weight, bias, groups, warmup
        self.eps, self.afwd, self.abkw = eps, afwd, abkw
        self.running_phi = np.ones_like(weight)
        self.ema_gz = np.zeros_like(weight)
        self.iters = 0

    def group_scaling(self, x):
        m, c = x.shape
        xg = x.reshape(m, self.groups, c // self.groups)
        r = np.sqrt((xg * xg).mean(-1, keepdims=True) + self.eps)
        return (xg / r).reshape(m, c), (xg, r)

    def group_scaling_backward(self, gy, cache):
        xg, r = cache
        m, g, cg = xg.shape
        gy = gy.reshape(m, g, cg)
        gx = gy / r - xg * (gy * xg).sum(-1, keepdims=True) / (cg * r**3)
        return gx.reshape(m, g * cg)

    def forward(self, x, train=True):
        x, self.gs_cache = self.group_scaling(x)
        if not train:
            return self.weight * x / np.sqrt(self.running_phi + self.eps) + self.bias
        self.iters += 1
        t = self.iters
        var = (x * x).mean(0)
        z = x / np.sqrt((var if t <= self.warmup else self.running_phi) + self.eps)
        self.z, self.var = z, var
        if t < self.warmup:
            self.running_phi = self.running_phi * (t - 1) / t + var / t
        self.running_phi = self.afwd * self.running_phi + (1 - self.afwd) * var
        return self.weight * z + self.bias

    def backward(self, grad_output):
        z = self.z
        g = grad_output * self.weight
        approx_grad_g = g - (1 - self.abkw) * self.ema_gz * z
        self.ema_gz = self.ema_gz + (approx_grad_g * z).mean(0)
        gx = approx_grad_g / np.sqrt(self.var + self.eps)
        dweight, dbias = (grad_output * z).sum(0), grad_output.sum(0)
        return self.group_scaling_backward(gx, self.gs_cache), dweight, dbias


@pytest.mark.parametrize("warmup", [0, 3])
def test_powernorm_matches_reference_over_steps(warmup):
    M, C, G = 12, 8, 2
    rng = np.random.default_rng(warmup)
    weight, bias = rng.uniform(0.5, 1.5, C), rng.normal(size=C) * 0.1
    ref = NumpyPowerNorm(weight, bias, G, warmup)
    norm = PowerNorm(C, G, warmup)
    norm.scale[...] = jnp.asarray(weight, jnp.float32)
    norm.bias[...] = jnp.asarray(bias, jnp.float32)
    graphdef, params, gstats, rest = nnx.split(norm, nnx.Param, GradStat, ...)

    def forward(params, gstats, x, rest):
        m = nnx.merge(graphdef, params, gstats, rest, copy=True)
        return m(x, train=True), nnx.split(m, nnx.Param, GradStat, ...)[3]

    for _ in range(6):
        x = rng.normal(size=(M, C)) * rng.uniform(0.5, 3.0, C) + rng.normal(size=C)
        gy = rng.normal(size=(M, C))
        y_ref = ref.forward(x)
        gx_ref, dw_ref, db_ref = ref.backward(gy)
        y, vjp, rest = jax.vjp(
            lambda p, g, x_, r=rest: forward(p, g, x_, r),
            params,
            gstats,
            jnp.asarray(x, jnp.float32),
            has_aux=True,
        )
        dparams, dgstats, dx = vjp(jnp.asarray(gy, jnp.float32))
        gstats = jax.tree.map(jnp.add, gstats, dgstats)  # what the train step does
        m = nnx.merge(graphdef, params, gstats, rest)
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dx, gx_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dparams["scale"][...], dw_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dparams["bias"][...], db_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(m.phi[...], ref.running_phi, rtol=1e-5)
        np.testing.assert_allclose(m.nu[...], ref.ema_gz, rtol=1e-4, atol=1e-6)

    x = rng.normal(size=(M, C))
    before = jax.tree.map(np.asarray, nnx.state(m))
    np.testing.assert_allclose(
        m(jnp.asarray(x, jnp.float32), train=False),
        ref.forward(x, train=False),
        rtol=1e-4,
        atol=1e-5,
    )
    jax.tree.map(np.testing.assert_array_equal, nnx.state(m), before)
