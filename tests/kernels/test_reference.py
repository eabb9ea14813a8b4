"""The reference attention against a direct float64 NumPy computation of the attention matrix."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stability.kernels import reference


def np_log_softplus(s):
    """log softplus(s) in float64; = s + O(e^s), exact to 1e-13, below s = -30."""
    s = np.asarray(s, np.float64)
    return np.where(s < -30, s, np.log(np.logaddexp(0.0, np.maximum(s, -30))))


def numpy_attention(
    q, k, v, *, causal=True, window=None, score="softmax", alpha=1.0, softcap=None, scale=None
):
    """Float64 attention over the materialised [B, N, T, S] matrix: (output, stats dict)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    _, t, n, h = q.shape
    s_len = k.shape[1]
    scale = 1.0 / np.sqrt(h) if scale is None else scale
    s = scale * np.einsum("btnh,bsnh->bnts", q, k)
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    i, j = np.arange(t)[:, None], np.arange(s_len)[None, :]
    mask = np.ones((n, t, s_len), bool)
    if causal:
        mask &= j <= i
    if window is not None:
        for head, w in enumerate(window):
            if w is not None:
                mask[head] &= i - j < w
    log_w = s if score == "softmax" else alpha * np_log_softplus(s)
    log_w = np.where(mask, log_w, -np.inf)
    m = log_w.max(-1, keepdims=True)
    w = np.exp(log_w - m)
    norm = w.sum(-1, keepdims=True)
    p = w / norm
    o = np.einsum("bnts,bsnh->btnh", p, v)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    stats = dict(
        log_norm=(m + np.log(norm))[..., 0],
        max_logit=np.where(mask, s, -np.inf).max(-1),
        entropy=-plogp.sum(-1),
    )
    return o, stats


def rel_err(a, b) -> float:
    """max |a - b| / max(max |b|, 1)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1.0))


def random_qkv(seed, b, t, n, h, s=None, dtype=jnp.float32, logit_scale=1.0):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    s = t if s is None else s
    q = logit_scale * jax.random.normal(kq, (b, t, n, h), jnp.float32)
    k = jax.random.normal(kk, (b, s, n, h), jnp.float32)
    v = jax.random.normal(kv, (b, s, n, h), jnp.float32)
    return tuple(x.astype(dtype) for x in (q, k, v))


# Interpreted kernels are large XLA programs: LLVM optimisation would triple CPU compile time.
CPU_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}


def run_jitted(f, *args):
    """jax.jit(f)(*args), compiled without LLVM optimisation on CPU."""
    options = CPU_COMPILE_OPTIONS if jax.default_backend() == "cpu" else None
    return jax.jit(f).trace(*args).lower().compile(options)(*args)


def ref_attention(q, k, v, **kw):
    return run_jitted(functools.partial(reference.attention, **kw), q, k, v)


CASES = [
    dict(causal=True),
    dict(causal=False),
    dict(causal=True, window=(1, 5, None, 16)),
    dict(causal=True, score="softplus", alpha=1.0),
    dict(causal=True, score="softplus", alpha=1.5, window=(7, None, None, 3)),
    dict(causal=False, score="softplus", alpha=2.0),
    dict(causal=True, softcap=2.0, scale=0.5),
    dict(causal=True, score="softplus", alpha=2.0, softcap=3.0),
]


@pytest.mark.parametrize("kw", CASES, ids=str)
def test_matches_float64_numpy(kw):
    q, k, v = random_qkv(0, 2, 24, 4, 8, logit_scale=2.0)
    o, stats = ref_attention(q, k, v, **kw)
    o_np, stats_np = numpy_attention(q, k, v, **kw)
    assert o.dtype == jnp.float32 and o.shape == q.shape
    assert rel_err(o, o_np) < 1e-5
    for name, want in stats_np.items():
        got = getattr(stats, name)
        assert got.shape == (2, 4, 24) and got.dtype == jnp.float32
        assert rel_err(got, want) < 1e-5, name


def test_cross_attention_lengths():
    q, k, v = random_qkv(1, 1, 5, 2, 8, s=11)
    o, stats = ref_attention(q, k, v, causal=False, score="softplus", alpha=1.5)
    o_np, stats_np = numpy_attention(q, k, v, causal=False, score="softplus", alpha=1.5)
    assert rel_err(o, o_np) < 1e-5
    assert rel_err(stats.entropy, stats_np["entropy"]) < 1e-5


def test_bf16_output_dtype_and_accuracy():
    q, k, v = random_qkv(2, 1, 16, 2, 8, dtype=jnp.bfloat16)
    o, stats = ref_attention(q, k, v)
    o_np, stats_np = numpy_attention(q, k, v)
    assert o.dtype == jnp.bfloat16 and stats.entropy.dtype == jnp.float32
    assert rel_err(o, o_np) < 1e-2
    assert rel_err(stats.log_norm, stats_np["log_norm"]) < 1e-5


def huge_logit_qkv(b=1, t=32, n=2, h=16, base=1e4, seed=0):
    """Inputs whose logits (scale 1) are exactly base + small integers in float32.

    Softmax weights then have non-trivial entropy although |s| ~ base, so an entropy that
    is not computed relative to the row max loses ~1e-3 to cancellation.
    """
    rng = np.random.default_rng(seed)
    q = rng.integers(-1, 2, (b, t, n, h)).astype(np.float32)
    k = rng.integers(-1, 2, (b, t, n, h)).astype(np.float32)
    q[..., 0], k[..., 0] = np.sqrt(base), np.sqrt(base)  # sqrt(base) exact: base is a square
    v = rng.standard_normal((b, t, n, h)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


@pytest.mark.parametrize("base", [1024.0, 1e4])
@pytest.mark.parametrize("score", ["softmax", "softplus"])
def test_entropy_exact_for_huge_logits(base, score):
    q, k, v = huge_logit_qkv(base=base)
    _, stats = ref_attention(q, k, v, scale=1.0, score=score, alpha=2.0)
    _, stats_np = numpy_attention(q, k, v, scale=1.0, score=score, alpha=2.0)
    assert np.max(stats_np["entropy"][:, :, 8:]) > 0.5  # weights far from one-hot
    assert np.max(np.abs(np.asarray(stats.entropy) - stats_np["entropy"])) < 1e-5
    assert rel_err(stats.log_norm, stats_np["log_norm"]) < 1e-6
    np.testing.assert_array_equal(stats.max_logit, stats_np["max_logit"])


def test_softplus_underflow_stays_finite():
    """Every softplus(s) underflows in float32 (s ~ -300): weights still normalise."""
    q, k, v = random_qkv(3, 1, 8, 1, 4)
    q = q.at[..., 0].set(-30.0)
    k = k.at[..., 0].set(20.0)
    o, stats = ref_attention(q, k, v, score="softplus", scale=0.5)
    o_np, stats_np = numpy_attention(q, k, v, score="softplus", scale=0.5)
    assert rel_err(o, o_np) < 1e-4
    assert rel_err(stats.log_norm, stats_np["log_norm"]) < 1e-5


def test_stats_carry_no_gradient():
    q, k, v = random_qkv(4, 1, 8, 2, 4)

    def loss(q):
        _, stats = reference.attention(q, k, v, score="softplus")
        return sum(jnp.sum(x) for x in stats)

    assert float(jnp.max(jnp.abs(run_jitted(jax.grad(loss), q)))) == 0.0


def test_elementwise_derivatives_match_autodiff():
    """The kernels' hand-written derivatives equal autodiff of the shared definitions."""
    s = jnp.concatenate(
        [jnp.linspace(-200.0, 200.0, 4001), jnp.array([-15.0, -15.001, -14.999, 0.0])]
    )
    for alpha in (1.0, 1.5, 2.0):
        auto = jax.vmap(jax.grad(lambda x, a=alpha: reference.log_weight(x, "softplus", a)))(s)
        hand = reference.log_weight_grad(s, "softplus", alpha)
        np.testing.assert_allclose(hand, auto, rtol=2e-6, atol=1e-7)
    raw = jnp.linspace(-50.0, 50.0, 1001)
    auto = jax.vmap(jax.grad(lambda x: reference.apply_softcap(x, 7.0)))(raw)
    hand = reference.softcap_grad(reference.apply_softcap(raw, 7.0), 7.0)
    np.testing.assert_allclose(hand, auto, rtol=1e-5, atol=1e-6)


def test_log_weight_matches_float64():
    s = np.concatenate([np.linspace(-80.0, 80.0, 1601), [1e4, -1e4]]).astype(np.float32)
    got = reference.log_weight(jnp.asarray(s), "softplus", 1.5)
    want = 1.5 * np_log_softplus(s)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kw, shapes, match",
    [
        (dict(), ((1, 4, 2, 8), (1, 6, 2, 8)), "causal attention needs"),
        (dict(causal=False, window=(2, None)), None, "needs causal=True"),
        (dict(window=(2,)), None, "one per head"),
        (dict(window=(0, None)), None, "window entry 0"),
        (dict(score="relu"), None, "score='relu'"),
        (dict(alpha=0.0), None, "alpha=0.0"),
        (dict(softcap=-1.0), None, "softcap=-1.0"),
        (dict(), ((1, 4, 2, 8), (1, 4, 2, 4)), "k and v must be"),
    ],
)
def test_invalid_arguments_are_named(kw, shapes, match):
    q_shape, k_shape = shapes or ((1, 4, 2, 8), (1, 4, 2, 8))
    q, k = jnp.zeros(q_shape), jnp.zeros(k_shape)
    with pytest.raises(ValueError, match=match):
        reference.attention(q, k, k, **kw)


def test_unsupported_dtype_is_named():
    x = jnp.zeros((1, 4, 2, 8), jnp.float16)
    with pytest.raises(ValueError, match="float16"):
        reference.attention(x, x, x)
