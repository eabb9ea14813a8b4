"""μParam: per-layer LR multipliers base_fan_in/fan_in on hidden matrices only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stability.config import ConfigError, ModelConfig, OptimConfig
from stability.metrics import leaf_paths, path_str
from stability.models import Transformer
from stability.optim.build import make_optimizer, mup_multipliers, set_hyperparams

HIDDEN = {"attn/q", "attn/k", "attn/v", "attn/o", "mlp/fc1", "mlp/fc2"}


def model_tree(d: int, vocab: int = 16, mlp_ratio: int = 4) -> dict:
    """A params tree with the model's paths and shapes at width d (one block)."""
    z = lambda *s: jnp.zeros(s)
    return {
        "embed": z(vocab, d),
        "blocks": {
            "0": {
                "attn": {
                    **{n: {"kernel": z(d, d)} for n in "qkvo"},
                    "q_norm": {"scale": z(d // 2)},
                },
                "attn_norm": {"scale": z(d)},
                "mlp": {
                    "fc1": {"kernel": z(d, mlp_ratio * d)},
                    "fc2": {"kernel": z(mlp_ratio * d, d)},
                },
            }
        },
        "final_norm": {"scale": z(d)},
        "head": {"kernel": z(d, vocab)},
    }


def flat(tree) -> dict:
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("base,d", [(32, 128), (128, 32), (64, 64)])
def test_multipliers_are_base_fan_in_over_fan_in_on_hidden_matrices(base, d):
    mult = flat(mup_multipliers(model_tree(d), base, d))
    base_shapes, shapes = flat(model_tree(base)), flat(model_tree(d))
    for path, m in mult.items():
        if any(path.endswith(f"{h}/kernel") for h in HIDDEN):
            assert m == pytest.approx(base_shapes[path].shape[0] / shapes[path].shape[0])
            assert m == pytest.approx(base / d)
        else:
            assert m == 1.0, path  # embedding, head (readout), norm scales


def test_hidden_matrices_of_the_real_model():
    cfg = ModelConfig(d_model=64, n_heads=2, n_layers=2, linear="sigma_reparam")
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    params = nnx.split(model, nnx.Param, ...)[1]
    mult = dict(
        zip(leaf_paths(params), jax.tree.leaves(mup_multipliers(params, 32, 64)), strict=True)
    )
    scaled = {p for p, m in mult.items() if m != 1.0}
    assert scaled == {f"blocks/{i}/{h}/kernel" for i in range(2) for h in HIDDEN}
    assert all(mult[p] == 0.5 for p in scaled)  # σReparam's γ, embed, head, norms keep 1


# The linear layers whose LR each variant scales by base-fan-in/fan-in (Wortsman et al. 2023
# §3.2.4: μParam (simple) "scale[s] the LR for linear layers by base-fan-in/fan-in").
SCALED = {"mup_simple": HIDDEN | {"head"}, "mup_hidden": HIDDEN, "mup_full": HIDDEN}


@pytest.mark.parametrize(
    "parametrization,mode",
    [
        ("mup_simple", "independent"),
        ("mup_simple", "coupled"),
        ("mup_hidden", "independent"),
        ("mup_full", "coupled"),
    ],
)
def test_mup_scales_the_gradient_step_of_linear_layers_by_base_over_fan_in(parametrization, mode):
    """Against the formula: each scaled layer's update is (its fan-in in the base model ÷ its
    fan-in here) × the standard update, read off the two models' kernel shapes; every other
    leaf (embedding, norm scales; the head for mup_hidden/mup_full) moves as in standard; the
    decay is never scaled."""
    d, base = 16, 4
    params = jax.tree.map(lambda x: x + 1.0, model_tree(d))
    grads = jax.tree.map(
        lambda x: jnp.sin(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape), params
    )
    shapes, base_shapes = flat(model_tree(d)), flat(model_tree(base))
    layer = lambda path: path.rsplit("/", 2)[-2] if path.endswith("kernel") else None
    expected = {
        path: base_shapes[path].shape[0] / shapes[path].shape[0]
        if any(path.endswith(f"{h}/kernel") for h in SCALED[parametrization])
        else 1.0
        for path in shapes
    }
    assert {p for p, m in expected.items() if m != 1} and all(
        m in (1.0, base / d) for m in expected.values()
    )
    assert (expected["head/kernel"] == base / d) == (parametrization == "mup_simple")
    assert layer("head/kernel") == "head"

    def update(parametrization, wd, grads):
        cfg = OptimConfig(
            parametrization=parametrization, weight_decay_mode=mode, mup_base_d_model=base
        )
        tx = make_optimizer(cfg, d_model=d)
        state = set_hyperparams(
            tx.init(params), learning_rate=0.01, weight_decay=wd, peak_learning_rate=0.02
        )
        return flat(tx.update(grads, state, params)[0])

    update = jax.jit(update, static_argnums=0)
    std, mup = update("standard", 0.0, grads), update(parametrization, 0.0, grads)
    for path in std:
        np.testing.assert_allclose(mup[path], expected[path] * std[path], rtol=1e-6, err_msg=path)
    zero = jax.tree.map(jnp.zeros_like, grads)
    std, mup = update("standard", 0.5, zero), update(parametrization, 0.5, zero)
    for path in std:
        np.testing.assert_allclose(mup[path], std[path], rtol=1e-6)
    assert np.any(std["blocks/0/attn/q/kernel"] != 0)


def test_mup_is_per_run_under_vmap():
    d, base = 16, 4
    cfg = OptimConfig(parametrization="mup_simple", mup_base_d_model=base)
    tx = make_optimizer(cfg, d_model=d)
    params = jax.tree.map(lambda x: x + 1.0, model_tree(d))
    grads = jax.tree.map(
        lambda x: jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape), params
    )

    def step(lr):
        state = set_hyperparams(
            tx.init(params), learning_rate=lr, weight_decay=0.1, peak_learning_rate=lr
        )
        return tx.update(grads, state, params)[0]

    lrs = jnp.asarray([1e-3, 1e-2])
    batched = jax.jit(jax.vmap(step))(lrs)
    for i in range(2):
        alone = jax.jit(step)(lrs[i])
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(alone), strict=True):
            np.testing.assert_allclose(a[i], b, rtol=1e-6)


def test_mup_needs_the_model_width():
    with pytest.raises(ConfigError, match=r"config\.optim\.parametrization"):
        make_optimizer(OptimConfig(parametrization="mup_full"))
    make_optimizer(OptimConfig())  # standard needs no width
