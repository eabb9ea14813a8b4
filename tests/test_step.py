"""The pure functions of training (stability/step.py): the step's divergence handling, its
loss terms, weight decay, and the K-update call's logged rows."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stability import step as St
from stability.config import OptimConfig
from stability.data import make_source
from stability.optim.build import make_optimizer, set_hyperparams


def test_non_finite_gradient_in_one_parameter_freezes_the_state(tiny):
    """The loss is finite but one parameter's gradient overflows float32: with the head kernel
    zero, the logits are 0 (loss log V) and every gradient behind the head is exactly zero,
    while a z-loss weight of 1e37 and a final-norm scale of 1e5 push the head kernel's
    gradient ∝ weight·scale past float32 range."""
    cfg = tiny()
    tx = make_optimizer(cfg.optim)
    state = jax.jit(lambda: St.init_state(cfg, 0, tx))()
    params = jax.tree.map(lambda x: x, state.params)
    params["head"]["kernel"][...] = jnp.zeros_like(params["head"]["kernel"][...])
    params["final_norm"]["scale"][...] = jnp.full_like(params["final_norm"]["scale"][...], 1e5)
    state = state._replace(params=params)
    batch = {"tokens": np.full((cfg.data.batch_size, cfg.data.seq_len + 1), 5, np.int32)}
    step = jax.jit(St.make_train_step(cfg, St.graphdef_of(cfg), tx))
    new, out = step(state, {**St.hyperparams(cfg), "z_loss": jnp.float32(1e37)}, batch)
    np.testing.assert_allclose(out["train/loss"], np.log(cfg.model.vocab_size), rtol=1e-6)
    grad_rms = {k: float(v) for k, v in out.items() if k.startswith("grad/rms/")}
    assert [k for k, v in grad_rms.items() if not np.isfinite(v)] == ["grad/rms/head/kernel"]
    assert not bool(out["alive"]) and int(new.diverged_step) == 1 and int(new.step) == 0
    frozen = lambda st: (st.params, st.gstats, st.rest, st.opt_state, st.step)
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), frozen(new), frozen(state))
    assert all(jax.tree.leaves(same))


def test_z_loss_equals_definition(tiny):
    cfg = tiny(train={"z_loss": 0.5})
    tx = make_optimizer(cfg.optim)
    graphdef = St.graphdef_of(cfg)
    state = jax.jit(lambda: St.init_state(cfg, 0, tx))()
    from stability.data import make_source

    batch = make_source(cfg.data, 64).train_stream(0).next()
    _, out = jax.jit(St.make_train_step(cfg, graphdef, tx))(state, St.hyperparams(cfg), batch)
    from flax import nnx

    forward = lambda st, t: nnx.merge(graphdef, st.params, st.gstats, st.rest)(t, train=False)[0]
    logits = jax.jit(forward)(state, jnp.asarray(batch["tokens"][:, :-1]))
    log_z = np.asarray(jax.nn.logsumexp(logits, -1), np.float64)
    np.testing.assert_allclose(out["train/z_loss"], 0.5 * np.mean(log_z**2), rtol=1e-5)
    np.testing.assert_allclose(out["logits/log_z_mean"], log_z.mean(), rtol=1e-5)


@pytest.mark.parametrize("mode", ["independent", "coupled"])
def test_weight_decay_matches_formula(mode):
    """With zero gradients Adam's update is 0, so only the decay acts:
    independent θ ← θ(1 − (η_t/η_max)λ), coupled θ ← θ(1 − η_t λ)."""
    cfg = OptimConfig(lr=0.1, weight_decay=0.3, weight_decay_mode=mode, grad_clip=0.0)
    tx = make_optimizer(cfg)
    params = {"w": jnp.full((2, 2), 2.0), "scale": jnp.ones((2,))}
    state = tx.init(params)
    lr_t = 0.025
    state = set_hyperparams(state, learning_rate=lr_t, weight_decay=0.3, peak_learning_rate=0.1)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    factor = 1 - (lr_t / 0.1) * 0.3 if mode == "independent" else 1 - lr_t * 0.3
    np.testing.assert_allclose(new["w"], 2.0 * factor, rtol=1e-6)
    np.testing.assert_allclose(new["scale"], 1.0)  # norm scales are not decayed


def test_nan_in_one_run_leaves_others_bitwise_unchanged(tiny):
    cfg = tiny()
    graphdef, tx = St.graphdef_of(cfg), make_optimizer(cfg.optim)
    init = jax.vmap(lambda s: St.init_state(cfg, s, tx))
    step = jax.jit(jax.vmap(St.make_train_step(cfg, graphdef, tx), in_axes=(0, 0, None)))
    hp = {k: jnp.stack([v] * 3) for k, v in St.hyperparams(cfg).items()}
    stream = make_source(cfg.data, 64).train_stream(0)
    batches = [stream.next() for _ in range(3)]

    def run(poison: bool):
        state = init(jnp.arange(3))
        if poison:
            k = state.params["head"]["kernel"]
            k[...] = k[...].at[2, 0, 0].set(jnp.nan)
        outs = []
        for b in batches:
            state, out = step(state, hp, b)
            outs.append(out)
        return state, outs

    clean, clean_out = run(False)
    bad, bad_out = run(True)
    assert not bool(bad_out[0]["alive"][2]) and bool(bad_out[0]["alive"][:2].all())
    for x, y in zip(jax.tree.leaves(clean.params), jax.tree.leaves(bad.params), strict=True):
        assert np.array_equal(np.asarray(x)[:2], np.asarray(y)[:2])
    for o1, o2 in zip(clean_out, bad_out, strict=True):
        for key in o1:
            assert np.array_equal(np.asarray(o1[key])[:2], np.asarray(o2[key])[:2]), key


def test_call_returns_the_logged_updates_metrics_only_and_equals_single_steps(tiny):
    """A call of 7 updates with updates 2, 3 and 6 logged: rows 0-2 are those updates'
    metrics (those of single steps, to rtol 1e-6: another program may round differently), the
    rest zeros; the state equals 7 single steps'."""
    cfg = tiny()
    tx = make_optimizer(cfg.optim)
    step = St.make_train_step(cfg, St.graphdef_of(cfg), tx)
    init = jax.jit(lambda: St.init_state(cfg, 0, tx))
    hp = St.hyperparams(cfg)
    stream = make_source(cfg.data, 64).train_stream(0)
    batches = [stream.next() for _ in range(7)]
    k_max, rows = 8, 4
    call = jax.jit(St.make_call(step, k_max, rows))
    stacked = {"tokens": np.stack([b["tokens"] for b in batches] + [batches[0]["tokens"]])}
    logged = np.array([False, True, True, False, False, True, False, False])
    state, out = call(init(), hp, stacked, np.int32(7), logged)
    ref, outs = init(), []
    one = jax.jit(step)
    for b in batches:
        ref, o = one(ref, hp, b)
        outs.append(jax.device_get(o))
    for key, rows_ in jax.device_get(out["metrics"]).items():
        assert rows_.shape[0] == rows, key
        for j, i in enumerate((1, 2, 5)):
            np.testing.assert_allclose(rows_[j], outs[i][key], rtol=1e-6, err_msg=key)
        assert not np.any(rows_[3]), key
    assert int(state.step) == 7 and bool(out["alive"]) and int(out["diverged_step"]) == -1
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize(
    "t, k_max, rows",
    [
        (dict(log_every=10, eval_every=100, checkpoint_every=100, steps=1000), 100, 11),
        (dict(log_every=5, eval_every=10, checkpoint_every=10, steps=20), 10, 3),
        (dict(log_every=1, eval_every=4, checkpoint_every=8, steps=8), 4, 4),
        (dict(log_every=10, eval_every=500, checkpoint_every=500, steps=1000), 100, 11),
        (
            dict(log_every=10, eval_every=500, checkpoint_every=500, steps=1000, steps_per_call=30),
            30,
            4,
        ),
    ],
)
def test_call_shape_follows_evals_and_checkpoints_not_logging(t, k_max, rows):
    from stability.config import TrainConfig

    train = TrainConfig(**t)
    assert St.steps_per_call_max(train) == k_max
    assert St.rows_per_call(train, k_max) == rows


def test_per_run_hyperparameters_derive_from_their_declarations():
    """Every field declared with ``config.per_run`` is a traced scalar of the step and never
    part of the static config (so runs that differ only in it share one program)."""
    import dataclasses

    from stability.config import Config, per_run_fields
    from stability.step import HYPERPARAMS, hyperparams, static_config

    declared = per_run_fields()
    assert set(declared) == {
        ("optim", "lr"),
        ("optim", "eps"),
        ("optim", "weight_decay"),
        ("optim", "warmup_steps"),
        ("train", "z_loss"),
    }
    assert list(HYPERPARAMS) == declared and set(hyperparams(Config())) == set(HYPERPARAMS.values())
    base = Config()
    for section, name in declared:
        value = getattr(getattr(base, section), name)
        changed = dataclasses.replace(
            base, **{section: dataclasses.replace(getattr(base, section), **{name: value * 2 + 1})}
        )
        assert static_config(changed) == static_config(base), name
        assert float(hyperparams(changed)[name]) == pytest.approx(value * 2 + 1)


def test_the_step_names_its_parts_for_profiles(tiny):
    """The op names of the train step carry the named scopes that profiles and
    ``benchmarks/train_step.py --breakdown`` group by (lowered only, not compiled)."""
    cfg = tiny()
    tx = make_optimizer(cfg.optim)
    state = jax.eval_shape(lambda: St.init_state(cfg, 0, tx))
    batch = {"tokens": jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len + 1), jnp.int32)}
    step = jax.jit(St.make_train_step(cfg, St.graphdef_of(cfg), tx))
    text = step.lower(state, St.hyperparams(cfg), batch).as_text(debug_info=True)
    for scope in ("attention_core", "normalization", "loss", "optimizer_update", "metrics"):
        assert re.search(rf'"jit\(train_step\)/[^"]*\b{scope}\b', text), scope
    for scope in ("attention_core", "normalization"):  # the backward pass keeps them too
        assert f"transpose(jvp({scope}))" in text, scope
