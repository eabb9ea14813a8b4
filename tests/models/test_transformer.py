import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stability import metrics as M
from stability.config import ModelConfig
from stability.models import Transformer
from stability.models.attention import apply_rope, rope_tables, softmax_with_stats

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2)


def model_fn(cfg):
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))

    def f(tokens):
        return nnx.merge(graphdef, state, copy=True)(tokens, train=False)

    return f


def test_causal_by_gradient():
    """d logits[t] / d embedding[s] is zero for every s > t."""
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 12), 0, 64)
    emb = model.embed[...][tokens[0]]  # [T, D]

    def logits_at(x_TD, t):
        model_copy = nnx.clone(model)
        # Feed embeddings directly by replacing the table with per-position rows.
        model_copy.embed = nnx.Param(x_TD)
        out, _ = model_copy(jnp.arange(12)[None], train=False)
        return out[0, t].sum()

    grad_at = jax.jit(jax.grad(logits_at))  # one compile; t is traced
    for t in (0, 5, 11):
        g = grad_at(emb, t)
        assert np.all(np.asarray(g[t + 1 :]) == 0), t
        assert np.any(np.asarray(g[: t + 1]) != 0), t


def test_jit_and_eager_agree():
    f = model_fn(CFG)
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 64)
    eager, aux_e = f(tokens)
    jitted, aux_j = jax.jit(f)(tokens)
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)
    for k in aux_e:
        np.testing.assert_allclose(aux_e[k], aux_j[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change",
    [dict(qk_norm=False), dict(norm="rmsnorm"), dict(tie_embeddings=True)],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_each_switch_changes_computation(change):
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 64)
    base, _ = model_fn(CFG)(tokens)
    other, aux = model_fn(ModelConfig(**{**CFG.__dict__, **change}))(tokens)
    assert np.all(np.isfinite(other))
    assert all(np.all(np.isfinite(v)) for v in aux.values())
    assert not np.allclose(base, other)


def test_init_recipe():
    """Embedding std 1/√d; matrices truncated normal with std 1/√fan_in; no biases."""
    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=1, n_heads=4)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.std(model.embed[...]), 256**-0.5, rtol=0.02)
    fc1 = model.blocks[0].mlp.fc1.kernel[...]
    np.testing.assert_allclose(np.std(fc1), 256**-0.5, rtol=0.02)
    assert np.abs(fc1).max() <= 2 * 256**-0.5 * 1.14  # truncated at 2σ of the underlying normal
    names = [str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert not any("bias" in n for n in names)


def test_softmax_stats_match_numpy_even_for_huge_logits():
    rng = np.random.default_rng(0)
    T = 8
    mask = np.tril(np.ones((T, T), bool))
    for scale in (1.0, 1e3, 1e4):
        s = rng.normal(size=(1, 2, T, T)) * scale
        p, ent, mx = softmax_with_stats(jnp.asarray(s, jnp.float32), jnp.asarray(mask))
        s64 = np.where(mask, s.astype(np.float32).astype(np.float64), -np.inf)
        m = s64.max(-1, keepdims=True)
        e = np.exp(s64 - m)
        p64 = e / e.sum(-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            ent64 = -np.where(p64 > 0, p64 * np.log(p64), 0).sum(-1)
        np.testing.assert_allclose(p, p64, atol=1e-6)
        np.testing.assert_allclose(ent, ent64, atol=1e-4 * max(1, np.log(scale)))
        np.testing.assert_allclose(mx, m[..., 0], rtol=1e-6)


def test_attention_stats_equal_materialised_matrix():
    """The model's per-layer max logit and entropies equal a direct computation."""
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, 64)
    _, aux = model(tokens, train=False)
    B, T = tokens.shape
    N, H = CFG.n_heads, CFG.d_model // CFG.n_heads
    block = model.blocks[0]
    x = np.asarray(model.embed[...])[np.asarray(tokens).reshape(-1)]
    h = block.attn_norm(jnp.asarray(x))
    q = block.attn.q_norm(block.attn.q(h).reshape(B, T, N, H))
    k = block.attn.k_norm(block.attn.k(h).reshape(B, T, N, H))
    rope = rope_tables(T, H, CFG.rope_base)
    q, k = (
        np.asarray(apply_rope(q, *rope), np.float64),
        np.asarray(apply_rope(k, *rope), np.float64),
    )
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    mask = np.tril(np.ones((T, T), bool))
    s = np.where(mask, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(a > 0, a * np.log(a), 0).sum(-1)  # [B, N, T]
    per_head = ent.mean((0, 2))
    np.testing.assert_allclose(aux["attn/max_logit"][0], s.max(), rtol=1e-5)
    np.testing.assert_allclose(aux["attn/entropy"][0], per_head.mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["attn/entropy_min"][0], per_head.min(), rtol=1e-5)


@pytest.mark.parametrize(
    "remat, optim",
    [
        ("none", {"parametrization": "mup_simple", "mup_base_d_model": 16}),
        ("block", {"name": "adafactor", "b1": 0.9}),
        ("none", {"name": "spam", "spam_reset_interval": 21}),
    ],
)
def test_scanned_stacked_blocks_equal_the_per_layer_layout(tiny, remat, optim):
    """train.scan_layers stores the blocks' variables stacked (a leading ``layers`` axis) and
    trains as the per-layer layout does: the same losses, metrics (under the same names),
    gradients, running statistics and optimizer state over two steps, with stateful layers
    (σReparam's u, PowerNorm's φ and ν), what they sow, a loss term between blocks, and the
    optimizer rules that read a parameter's dims (weight decay, μParam, Adafactor's factoring
    and clipping, SPAM); the states convert into each other's layout exactly."""
    from stability import step as St
    from stability.models.transformer import convert_layers
    from stability.optim.build import make_optimizer

    states, outs = {}, {}
    for scan in (False, True):
        cfg = tiny(
            model={"n_layers": 3, "linear": "sigma_reparam", "norm": "powernorm",
                   "sink_decorrelation": 0.1},
            train={"remat": remat, "scan_layers": scan},
            optim={"weight_decay": 0.1, **optim},
        )  # fmt: skip
        tx = make_optimizer(cfg.optim, d_model=cfg.model.d_model)
        step = jax.jit(St.make_train_step(cfg, St.graphdef_of(cfg), tx))
        state = jax.jit(lambda cfg=cfg, tx=tx: St.init_state(cfg, 0, tx))()
        rng = np.random.default_rng(0)
        for _ in range(2):
            tokens = rng.integers(0, 64, (4, 17)).astype(np.int32)
            state, out = step(state, St.hyperparams(cfg), {"tokens": tokens})
        states[scan], outs[scan] = jax.device_get(state), M.expand_layers(jax.device_get(out))
        if scan:
            jaxpr = str(jax.make_jaxpr(step)(state, St.hyperparams(cfg), {"tokens": tokens}))
            assert "scan[" in jaxpr and jaxpr.count("scan[") < 3  # one scan (+ its transpose)
    stacked = jax.tree_util.tree_flatten_with_path(states[True].params)[0]
    assert all(x.shape[0] == 3 for p, x in stacked if "blocks" in M.path_str(p))
    assert outs[False].keys() == outs[True].keys()
    assert any(k.startswith("reparam/sigma/blocks.2.") for k in outs[True])
    assert (
        "train/sink_decorrelation" in outs[True]
        and "grad/rms/blocks/2/mlp/fc2/kernel" in outs[True]
    )
    # qk-LayerNorm makes attention blind to the scale of q and k: their σReparam γ has a zero
    # gradient in exact arithmetic, rounding noise here, which Adam's normalisation amplifies
    scale_free = lambda name: re.search(r"attn[/.][qk]([/.]gamma|$)", name)
    for name in outs[False]:
        a, b = outs[False][name], outs[True][name]
        if not scale_free(name):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=name)
        elif name.startswith("grad/rms/"):
            assert a < 1e-6 and b < 1e-6, name
    as_per_layer = convert_layers(states[True], states[False])
    assert jax.tree.structure(as_per_layer) == jax.tree.structure(states[False])
    flat = jax.tree_util.tree_flatten_with_path(states[False])[0]
    for (p, a), b in zip(flat, jax.tree.leaves(as_per_layer), strict=True):
        if not scale_free(M.path_str(p)):  # rounding, which normalised moments amplify
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a) + 1e-6, M.path_str(p)
    back = convert_layers(as_per_layer, states[True])
    jax.tree.map(np.testing.assert_array_equal, back, states[True])
