"""Each stabilizer against its paper's definition, bad configs, and training with every switch
alone (50 steps) and all of them composed (a few steps)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stability import step as St
from stability.config import (
    ConfigError,
    ModelConfig,
    OptimConfig,
    default_config_dict,
    from_config_dict,
)
from stability.data import make_source
from stability.models import Transformer
from stability.models.attention import (
    Attention,
    attend,
    attention_logits,
    attention_weights,
    rope_tables,
    visible_keys,
)
from stability.models.layers import RunningStat
from stability.models.transformer import bos_norm_ratio, sink_cos2
from stability.optim.build import make_optimizer

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2)  # as conftest.tiny_config

# Cheaper CPU codegen (LLVM optimisation and fusion emitters off): the tiny train step compiles
# ~3× faster and still runs 50 steps in well under a second.
FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}


def fast_jit(f, *args):
    """``jax.jit(f)`` compiled for ``args`` with ``FAST_COMPILE``."""
    return jax.jit(f).lower(*args).compile(FAST_COMPILE)


def model_cfg(**fields):
    return dataclasses.replace(MODEL, **fields)


def random_qkv(B=2, T=9, N=2, H=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (B, T, N, H)) for k in keys]


def weights_of(q, k, cfg):
    """(weights [B, N, T, S], row entropy [B, N, T]) as the model computes them, float64."""

    @jax.jit
    def f(q, k):
        visible, n = visible_keys(cfg, q.shape[1])
        return attention_weights(attention_logits(q, k, n, cfg), visible, n, cfg)

    return tuple(np.asarray(x, np.float64) for x in f(q, k))


def entropy_of_rows(w):
    total = w.sum(-1, keepdims=True)
    p = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(-1)


# ---------------------------------------------------------------------------------------
# Score kinds.


@pytest.mark.parametrize("reweight", [False, True])
def test_softplus_attention_matches_numpy_and_rows_sum_to_one(reweight):
    cfg = model_cfg(attention_score="softplus", softplus_reweight=reweight)
    q, k, _ = random_qkv()
    w, entropy = weights_of(q, k, cfg)
    T, H = q.shape[1], q.shape[-1]
    qn = np.asarray(q, np.float64) / np.linalg.norm(q, axis=-1, keepdims=True)
    kn = np.asarray(k, np.float64) / np.linalg.norm(k, axis=-1, keepdims=True)
    n_i = np.arange(1, T + 1)[:, None]  # keys visible to query i
    s = np.log(H) * np.log(n_i) * np.einsum("btnh,bsnh->bnts", qn, kn)
    causal = np.tril(np.ones((T, T), bool))
    a = np.where(causal, np.log1p(np.exp(s)), 0)
    a = a / (a.sum(-1, keepdims=True) + 1e-8)
    if reweight:
        offset = np.where(np.arange(T) < 3, 0.0, 1.0)[:, None]
        r = np.maximum(n_i * a - offset, 0) ** 15
        a = r / r.sum(-1, keepdims=True)
    np.testing.assert_allclose(w, a, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(entropy, entropy_of_rows(a), atol=1e-4)


def test_lssar_uniform_rows_keep_softplus_weights_and_have_finite_gradients():
    """q = 0 makes every row uniform: no weight exceeds 1/N_i, so Ã = A = 1/N_i."""
    cfg = model_cfg(attention_score="softplus", softplus_reweight=True)
    q, k, v = random_qkv()
    q = jnp.zeros_like(q)
    w, _ = weights_of(q, k, cfg)
    T = q.shape[1]
    np.testing.assert_allclose(
        w[0, 0], np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None], rtol=1e-5
    )
    grads = jax.jit(jax.grad(lambda q, k, v: attend(q, k, v, cfg)[0].sum(), argnums=(0, 1, 2)))(
        q, k, v
    )
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_relu_attention_matches_formula_and_zero_rows_have_zero_entropy():
    cfg = model_cfg(attention_score="relu")
    q, k, v = random_qkv()
    T, H = q.shape[1], q.shape[-1]
    out, stats = attend(q, k, v, cfg)
    s = np.einsum(
        "btnh,bsnh->bnts", np.asarray(q, np.float64), np.asarray(k, np.float64)
    ) / np.sqrt(H)
    a = np.where(np.tril(np.ones((T, T), bool)), np.maximum(s, 0), 0) / np.arange(1, T + 1)[:, None]
    np.testing.assert_allclose(out, np.einsum("bnts,bsnh->btnh", a, v), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats.entropy, entropy_of_rows(a), atol=1e-4)
    np.testing.assert_allclose(stats.bos_mass, a[..., 0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        stats.max_logit, np.where(np.tril(np.ones((T, T))), s, -np.inf).max(-1), rtol=1e-5
    )

    out, stats = attend(-jnp.abs(q), jnp.abs(k), v, cfg)  # every logit negative: all-zero rows
    assert np.all(np.asarray(out) == 0) and np.all(np.asarray(stats.entropy) == 0)


def test_attention_softcap_bounds_logits():
    q, k, _ = random_qkv()
    q = q * 30.0
    visible, n = visible_keys(MODEL, q.shape[1])
    raw = attention_logits(q, k, n, MODEL)
    capped = attention_logits(q, k, n, model_cfg(attn_softcap=5.0))
    np.testing.assert_allclose(capped, 5.0 * np.tanh(np.asarray(raw) / 5.0), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(raw).max()) > 5.0 >= float(jnp.abs(capped).max())


def test_bos_mass_of_uniform_softmax_rows():
    """q = 0: every visible key gets 1/N_i; a local head's queries past its window see no BOS."""
    cfg = model_cfg(n_local_heads=1, local_window=3)
    q, k, v = random_qkv()
    _, stats = attend(jnp.zeros_like(q), k, v, cfg)
    T = q.shape[1]
    i = np.arange(T)
    np.testing.assert_allclose(stats.bos_mass[0, 1], 1 / (i + 1), rtol=1e-6)  # global head
    np.testing.assert_allclose(
        stats.bos_mass[0, 0], np.where(i < 3, 1 / np.minimum(i + 1, 3), 0), rtol=1e-6
    )
    np.testing.assert_allclose(stats.entropy[0, 0], np.log(np.minimum(i + 1, 3)), atol=1e-5)


# ---------------------------------------------------------------------------------------
# LS-attention: local heads are blind outside their window.


@pytest.mark.parametrize("score", ["softmax", "softplus", "relu"])
def test_local_head_gradient_is_zero_outside_window(score):
    cfg = model_cfg(n_local_heads=1, local_window=3, attention_score=score)
    B, T, D, H = 1, 10, cfg.d_model, cfg.d_model // cfg.n_heads
    attn = Attention(cfg, rngs=nnx.Rngs(0))
    rope = rope_tables(T, H, cfg.rope_base)
    x = jax.random.normal(jax.random.key(1), (B * T, D))
    graphdef, state = nnx.split(attn)

    def last_output(o_kernel, x):
        """The last query's attention output, through the heads that ``o_kernel`` keeps."""
        model = nnx.merge(graphdef, state, copy=True)
        model.o.kernel[...] = o_kernel
        return model(x, B, T, rope, train=False)[0][T - 1].sum()

    grad_fn = jax.jit(jax.grad(last_output, argnums=1))

    def head_output_grad(head):
        """d(output of query T−1 through head ``head`` only)/d(input tokens) [T, D]."""
        keep = np.zeros((cfg.n_heads * H, 1), np.float32)
        keep[head * H : (head + 1) * H] = 1
        return np.asarray(grad_fn(attn.o.kernel[...] * keep, x))

    local, global_ = head_output_grad(0), head_output_grad(1)
    norms_local, norms_global = np.abs(local).sum(-1), np.abs(global_).sum(-1)
    assert np.all(norms_local[: T - 3] == 0)  # keys outside the window: exactly zero
    assert norms_local[T - 1] > 0
    assert np.any(norms_global[: T - 3] > 0)


# ---------------------------------------------------------------------------------------
# Model-level switches: σReparam, output soft-cap, sink metrics and decorrelation loss.


def apply_model(cfg, tokens):
    """(logits, aux, model state) of a fresh seed-0 model in eval mode, in one jitted call."""

    def f(tokens):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        logits, aux = model(tokens, train=False)
        return logits, aux, nnx.state(model)

    return fast_jit(f, tokens)(tokens)


def top_singular_value(w) -> float:
    return float(np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)[0])


def test_sigma_reparam_model_equals_plain_model_at_init():
    """Same seed, same kernels: with γ₀ = σ(W₀) the σReparam model computes the same logits."""
    reparam = model_cfg(linear="sigma_reparam", sigma_reparam_head=True)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, MODEL.vocab_size)
    plain_logits, plain_aux, _ = apply_model(MODEL, tokens)
    logits, aux, state = apply_model(reparam, tokens)
    np.testing.assert_allclose(logits, plain_logits, rtol=1e-4, atol=1e-4)
    assert not any(k.startswith("reparam/") for k in plain_aux)
    for layer in ("blocks.0.attn.q", "blocks.1.attn.o", "blocks.1.mlp.fc2", "head"):
        np.testing.assert_allclose(
            aux[f"reparam/gamma/{layer}"], aux[f"reparam/sigma/{layer}"], rtol=1e-3
        )
    w = state["blocks"][1]["mlp"]["fc1"]["kernel"][...]
    np.testing.assert_allclose(
        aux["reparam/sigma/blocks.1.mlp.fc1"], top_singular_value(w), rtol=1e-3
    )


def test_sigma_reparam_u_is_state_outside_optimiser_and_frozen_in_eval():
    cfg = model_cfg(linear="sigma_reparam", n_layers=1)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert isinstance(model.blocks[0].attn.q.u, RunningStat)
    assert not isinstance(model.blocks[0].attn.q.u, nnx.Param)
    u = model.blocks[0].attn.q.u
    u[...] = jnp.ones_like(u[...]) / u[...].size ** 0.5  # off the power iteration's fixed point
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert not any(p[-1] == "u" for p, _ in nnx.to_flat_state(params))
    assert sum(1 for p, _ in nnx.to_flat_state(rest) if p[-1] == "u") == 6  # q, k, v, o, fc1, fc2
    opt_state = make_optimizer(OptimConfig()).init(params)
    opt_paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]
    ]
    assert any("['q']['kernel']" in p for p in opt_paths)
    assert not any("['u']" in p for p in opt_paths)

    tokens = jnp.zeros((1, 4), jnp.int32)

    def rest_after(params, rest, train):
        m = nnx.merge(graphdef, params, rest, copy=True)
        m(tokens, train=train)
        return nnx.split(m, nnx.Param, ...)[2]

    for train in (False, True):
        new = fast_jit(lambda p, r, t=train: rest_after(p, r, t), params, rest)(params, rest)
        assert changed(rest, new) == train


def test_sink_metrics_and_decorrelation_loss_match_direct_computation():
    cfg = model_cfg(sink_decorrelation=0.5, logit_softcap=0.3, n_layers=3)
    tokens = jax.random.randint(jax.random.key(0), (3, 12), 0, cfg.vocab_size)
    logits, aux, state = apply_model(cfg, tokens)
    L = cfg.n_layers
    for key in (
        "attn/max_logit",
        "attn/entropy",
        "attn/entropy_min",
        "attn/bos_mass",
        "resid/bos_norm_ratio",
    ):
        assert aux[key].shape == (L,), key
    assert float(jnp.abs(logits).max()) <= 0.3

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    B, T = tokens.shape
    rope = rope_tables(T, cfg.d_model // cfg.n_heads, cfg.rope_base)

    def block_outputs(state, tokens):
        model = nnx.merge(graphdef, state)
        x, out = model.embed[...][tokens.reshape(-1)], []
        for block in model.blocks:
            x, _ = block(x, B, T, rope, train=False)
            out.append(x.reshape(B, T, -1))
        return out

    hidden = [
        np.asarray(h, np.float64) for h in fast_jit(block_outputs, state, tokens)(state, tokens)
    ]
    norms = [np.linalg.norm(h, axis=-1) for h in hidden]
    ratio = [np.mean(n[:, 0] / np.median(n[:, 1:], axis=1)) for n in norms]
    np.testing.assert_allclose(aux["resid/bos_norm_ratio"], ratio, rtol=1e-4)
    cos2 = []
    for h in hidden[:-1]:  # the states between blocks
        u = h / np.linalg.norm(h, axis=-1, keepdims=True)
        cos2.append(np.mean(np.einsum("bd,btd->bt", u[:, 0], u[:, 1:]) ** 2))
    np.testing.assert_allclose(aux["loss/sink_decorrelation"], 0.5 * np.mean(cos2), rtol=1e-4)


def test_sink_helpers_on_known_states():
    h = np.zeros((1, 4, 3))
    h[0, 0] = [10, 0, 0]  # norm 10, parallel to position 1
    h[0, 1], h[0, 2], h[0, 3] = [1, 0, 0], [0, 2, 0], [0, 0, 3]  # norms 1, 2, 3: median 2
    np.testing.assert_allclose(bos_norm_ratio(jnp.asarray(h)), 5.0, rtol=1e-6)
    np.testing.assert_allclose(sink_cos2(jnp.asarray(h)), 1 / 3, rtol=1e-6)
    assert float(sink_cos2(jnp.ones((2, 1, 3)))) == 0.0
    assert float(bos_norm_ratio(jnp.ones((2, 1, 3)))) == 1.0


# ---------------------------------------------------------------------------------------
# Bad configurations: one-line ConfigError naming the field.


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(n_local_heads=5), "n_local_heads"),
        (dict(n_local_heads=-1), "n_local_heads"),
        (dict(local_window=0), "local_window"),
        (dict(softplus_reweight=True), "softplus_reweight"),
        (
            dict(attention_score="softplus", softplus_reweight=True, softplus_reweight_power=0.5),
            "softplus_reweight_power",
        ),
        (dict(sigma_reparam_gamma_init="two"), "sigma_reparam_gamma_init"),
        (dict(sigma_reparam_head=True), "sigma_reparam_head"),
        (
            dict(linear="sigma_reparam", sigma_reparam_head=True, tie_embeddings=True),
            "sigma_reparam_head",
        ),
        (dict(linear="spectral"), "linear"),
        (dict(attention_score="sigmoid"), "attention_score"),
        (dict(norm="batchnorm"), "norm"),
        (dict(powernorm_warmup=10), "powernorm_warmup"),
        (dict(norm="powernorm", powernorm_warmup=-1), "powernorm_warmup"),
        (dict(attn_softcap=-1.0), "attn_softcap"),
        (dict(logit_softcap=-30.0), "logit_softcap"),
        (dict(sink_decorrelation=-1.0), "sink_decorrelation"),
        (dict(sink_decorrelation=1.0, n_layers=1), "sink_decorrelation"),
    ],
    ids=lambda x: ",".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else None,
)
def test_bad_model_config_is_refused(fields, field):
    cd = default_config_dict()
    for k, v in fields.items():
        cd.model[k] = v
    with pytest.raises(ConfigError) as err:
        from_config_dict(cd)
    msg = str(err.value)
    assert f"config.model.{field}" in msg and "\n" not in msg


# ---------------------------------------------------------------------------------------
# Training: each switch alone for 50 steps, and every pair of switches for a few steps.


def train_steps(tiny_config, model_fields: dict, steps: int):
    """(initial state, final state, last step's metrics, eval loss) of ``steps`` updates of
    ``tiny_config`` with ``model_fields``."""
    cfg = tiny_config(model=model_fields, train={"steps": max(steps, 5)})
    tx = make_optimizer(cfg.optim)
    graphdef = St.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))[0]
    state0 = St.init_state(cfg, 0, tx)
    source = make_source(cfg.data, cfg.model.vocab_size)
    stream, hp = source.train_stream(0), St.hyperparams(cfg)
    batch = stream.next()
    step = fast_jit(St.make_train_step(cfg, graphdef, tx), state0, hp, batch)
    state = state0
    for _ in range(steps):
        state, out = step(state, hp, batch)
        batch = stream.next()
    eval_batch = source.eval_batches(1)[0]
    args = (state.params, state.gstats, state.rest, eval_batch)
    total, count = fast_jit(St.make_eval_step(cfg, graphdef), *args)(*args)
    return state0, state, out, float(total / count)


def changed(a, b) -> bool:
    return any(
        not np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# Each switch alone, with its sub-options folded in where one run exercises both (PowerNorm's
# warmup ends at step 10 of 50; γ₀ = σ(W₀) is pinned by the model-equivalence test above).
SWITCHES = {
    "sigma_reparam": dict(
        linear="sigma_reparam", sigma_reparam_head=True, sigma_reparam_gamma_init="one"
    ),
    "powernorm": dict(norm="powernorm", powernorm_warmup=10),
    "local_heads": dict(n_local_heads=1, local_window=4),
    "softplus": dict(attention_score="softplus"),
    "softplus_reweight": dict(attention_score="softplus", softplus_reweight=True),
    "relu": dict(attention_score="relu"),
    "softcaps": dict(attn_softcap=5.0, logit_softcap=10.0),
    "sink_decorrelation": dict(sink_decorrelation=1.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SWITCHES))
def test_each_switch_trains_50_steps(tiny, name):
    fields = SWITCHES[name]
    state0, state, out, eval_loss = train_steps(tiny, fields, 50)
    assert bool(out["alive"]) and int(state.step) == 50
    assert np.isfinite(float(out["train/loss"])) and np.isfinite(eval_loss)
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(out))
    if "linear" in fields:
        for layer in ("blocks.0.attn.q", "blocks.1.mlp.fc2", "head"):
            assert f"reparam/sigma/{layer}" in out and f"reparam/gamma/{layer}" in out
        assert changed(state0.rest, state.rest)  # u follows W
    if "norm" in fields:
        assert changed(state0.gstats, state.gstats) and changed(state0.rest, state.rest)  # ν, φ
    if "sink_decorrelation" in fields:
        assert float(out["train/sink_decorrelation"]) > 0


# Composition: a pair of switches with one of them off is a single-switch run above, so every
# pair of switches is covered by turning all of them on at once, once per exclusive score kind
# (other sub-options varied between the two).
ALL_ON = dict(
    linear="sigma_reparam",
    sigma_reparam_head=True,
    norm="powernorm",
    n_local_heads=1,
    local_window=4,
    attn_softcap=5.0,
    logit_softcap=10.0,
    sink_decorrelation=1.0,
)
COMPOSITIONS = {
    "all_softplus_reweight": dict(
        ALL_ON, attention_score="softplus", softplus_reweight=True, powernorm_warmup=2
    ),
    "all_relu": dict(ALL_ON, attention_score="relu", sigma_reparam_gamma_init="one", qk_norm=False),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_all_switches_compose(tiny, name):
    _, state, out, eval_loss = train_steps(tiny, COMPOSITIONS[name], 5)
    assert bool(out["alive"]) and int(state.step) == 5
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(out)) and np.isfinite(eval_loss)
