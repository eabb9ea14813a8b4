"""Every optimizer behind ``optim.name``: trains, decays by formula, vmaps over runs with
per-run LR/λ/warmup exactly as each run alone, logs its diagnostics, rejects bad configs."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stability.config import Config, ConfigError, OptimConfig, TrainConfig, validate
from stability.optim.build import make_optimizer, optimizer_metrics, set_hyperparams
from stability.optim.schedules import learning_rate

NAMES = ["adamw", "spam", "lion", "adafactor", "sgd"]
# LLVM optimisation off: these tiny programs compile ~2× faster on CPU and run just as well.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
KEY = jax.random.key(0)
X = jax.random.normal(jax.random.fold_in(KEY, 1), (32, 4))  # regression inputs [N, D_in]
W_TRUE = jax.random.normal(jax.random.fold_in(KEY, 2), (4, 6))
Y = X @ W_TRUE + 0.5


def init_params(seed: int):
    k = jax.random.key(seed)
    return {"w": 0.1 * jax.random.normal(k, (4, 6)), "b": jnp.zeros((6,))}


def loss_fn(params):
    return jnp.mean(jnp.square(X @ params["w"] + params["b"] - Y))


def make_run(cfg: OptimConfig, tx, steps: int, spike_step: int = -1):
    """run(params, peak_lr, weight_decay, warmup) -> (params, opt_state, losses): init, then
    ``steps`` updates as the train step does them (schedule → set_hyperparams → update). The
    gradient of update ``spike_step`` is multiplied by 1e4 (a spike for SPAM to clip)."""

    def run(params, peak, wd, warmup):
        def step(carry, t):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params)
            grads = jax.tree.map(lambda g: jnp.where(t == spike_step, 1e4 * g, g), grads)
            lr_t = learning_rate(cfg, steps, t, peak, warmup)
            opt_state = set_hyperparams(
                opt_state, learning_rate=lr_t, weight_decay=wd, peak_learning_rate=peak
            )
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        carry = (params, tx.init(params))
        (params, opt_state), losses = jax.lax.scan(step, carry, jnp.arange(steps))
        return params, opt_state, losses

    return run


LRS = {"adamw": 3e-2, "spam": 3e-2, "lion": 1e-2, "adafactor": 3e-2, "sgd": 3e-2}


@pytest.mark.parametrize(
    "name,extra",
    [(n, {}) for n in NAMES]
    + [("adamw", {"eps": 1e-15}), ("adamw", {"eps": 1e-6, "weight_decay_mode": "coupled"})],
)
def test_each_optimizer_trains_a_regression(name, extra):
    cfg = OptimConfig(name=name, lr=LRS[name], schedule="constant", warmup_steps=0, **extra)
    tx = make_optimizer(cfg)
    params = init_params(0)
    run = jax.jit(make_run(cfg, tx, 150), compiler_options=FAST_COMPILE)
    _, _, losses = run(params, jnp.float32(cfg.lr), jnp.float32(1e-4), jnp.float32(0))
    losses = np.asarray(losses)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.1 * losses[0], (name, losses[0], losses[-1])


VMAP_CASES = {
    "adamw": {},
    # ΔT = 25, N = 5: clipping at updates 20-24, a reset at 25, a gradient spike at update 22
    # (no global-norm clip, which would hide it).
    "spam": {"name": "spam", "spam_reset_interval": 25, "spam_reset_warmup": 5, "grad_clip": 0.0},
    "lion": {"name": "lion"},
    "adafactor": {"name": "adafactor", "adafactor_min_dim_to_factor": 4},  # factors w
    "sgd": {"name": "sgd", "momentum": 0.9},
}


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("case", list(VMAP_CASES))
def test_vmap_over_runs_equals_each_run_alone(case, x64):
    """Runs with different peak LRs, λ, warmups and inits in one vmapped program give the
    same parameters and optimizer state as each run alone. In float64: in float32 the
    reduction order of the batched program alone moves results by up to ~1e-5 (relative)."""
    fields = {"name": "adamw", **VMAP_CASES[case]}
    cfg = OptimConfig(schedule="cosine", min_lr=1e-5, **fields)
    tx = make_optimizer(cfg)
    steps = 30
    run = make_run(cfg, tx, steps, spike_step=21 if cfg.name == "spam" else -1)
    peaks = jnp.asarray([1e-3, 1e-2, 3e-2])
    wds = jnp.asarray([0.0, 1e-2, 0.1])
    warmups = jnp.asarray([0.0, 5.0, 10.0])
    params = jax.vmap(init_params)(jnp.arange(3))
    batched = jax.jit(jax.vmap(run), compiler_options=FAST_COMPILE)(params, peaks, wds, warmups)
    alone_fn = jax.jit(run, compiler_options=FAST_COMPILE)
    for i in range(3):
        p_i = init_params(i)
        alone = alone_fn(p_i, peaks[i], wds[i], warmups[i])
        got = jax.tree.map(lambda x, i=i: x[i], batched)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(alone), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert not np.allclose(batched[0]["w"][0], batched[0]["w"][1])  # the runs did differ


@pytest.mark.parametrize("name", NAMES)
def test_weight_decay_only_on_matrices_by_formula(name):
    """With zero gradients every direction is 0, so only the decay acts:
    independent θ ← θ(1 − (η_t/η_max)λ), coupled θ ← θ(1 − η_t λ); vectors never decay."""
    params = {"w": jnp.full((2, 3), 2.0), "scale": jnp.ones((3,))}
    for mode in ("independent", "coupled"):
        tx = make_optimizer(OptimConfig(name=name, weight_decay_mode=mode))

        @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
        def step(params, tx=tx):
            state = set_hyperparams(
                tx.init(params), learning_rate=0.025, weight_decay=0.3, peak_learning_rate=0.1
            )
            updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
            return optax.apply_updates(params, updates)

        new = step(params)
        factor = 1 - (0.025 / 0.1) * 0.3 if mode == "independent" else 1 - 0.025 * 0.3
        np.testing.assert_allclose(new["w"], 2.0 * factor, rtol=1e-6)
        np.testing.assert_allclose(new["scale"], 1.0)


def test_optimizer_metrics_per_family():
    params = init_params(0)
    grads = jax.grad(loss_fn)(params)
    spam_cfg = OptimConfig(name="spam", spam_reset_interval=25, spam_reset_warmup=5, grad_clip=0.0)
    tx = make_optimizer(spam_cfg)
    run = jax.jit(make_run(spam_cfg, tx, 22, spike_step=21), compiler_options=FAST_COMPILE)
    _, state, _ = run(params, jnp.float32(1e-2), jnp.float32(0), jnp.float32(0))  # spike: update 22
    out = optimizer_metrics(spam_cfg, state, grads)
    assert float(out["spam/clipped_fraction"]) > 0.5  # the 1e4× spike is clipped nearly everywhere
    assert int(out["spam/steps_since_reset"]) == 22
    np.testing.assert_allclose(
        out["grad/rms_over_eps/w"],
        np.sqrt(np.mean(np.square(grads["w"]))) / spam_cfg.eps,
        rtol=1e-5,
    )
    adam_cfg = OptimConfig(eps=1e-15)
    adam_state = make_optimizer(adam_cfg).init(params)
    adam = optimizer_metrics(adam_cfg, adam_state, grads)
    assert set(adam) == {"grad/rms_over_eps/w", "grad/rms_over_eps/b"}
    assert np.isfinite(float(adam["grad/rms_over_eps/w"]))
    # ε is the state's (a traced per-run value in the train step), not the config's
    other = optimizer_metrics(adam_cfg, set_hyperparams(adam_state, eps=1e-6), grads)
    np.testing.assert_allclose(
        other["grad/rms_over_eps/w"], adam["grad/rms_over_eps/w"] * 1e-9, rtol=1e-5
    )
    for name in ("lion", "adafactor", "sgd"):
        cfg = OptimConfig(name=name)
        assert optimizer_metrics(cfg, make_optimizer(cfg).init(params), grads) == {}


BAD = [
    ({"name": "adam"}, "config.optim.name"),
    ({"schedule": "step"}, "config.optim.schedule"),
    ({"decay_shape": "quadratic"}, "config.optim.decay_shape"),
    ({"parametrization": "mup"}, "config.optim.parametrization"),
    ({"decay_fraction": 0.0}, "config.optim.decay_fraction"),
    ({"decay_fraction": 1.5}, "config.optim.decay_fraction"),
    ({"spam_reset_interval": 20}, "config.optim.spam_reset_interval"),
    ({"spam_density": 0.0}, "config.optim.spam_density"),
    ({"spam_density": 1.01}, "config.optim.spam_density"),
    ({"spam_threshold": 0.0}, "config.optim.spam_threshold"),
    ({"spam_reset_warmup": -1}, "config.optim.spam_reset_warmup"),
    ({"momentum": 1.0}, "config.optim.momentum"),
    ({"momentum": -0.1}, "config.optim.momentum"),
    ({"adafactor_decay_rate": 0.0}, "config.optim.adafactor_decay_rate"),
    ({"adafactor_clip": -1.0}, "config.optim.adafactor_clip"),
    ({"mup_base_d_model": 0}, "config.optim.mup_base_d_model"),
    ({"warmup_steps": 1000}, "config.optim.warmup_steps"),
    ({"schedule": "wsd", "decay_shape": "exponential", "min_lr": 0.0}, "config.optim.min_lr"),
    ({"schedule": "wsd", "wsd_cycles": 2}, "config.optim.wsd_cycles"),
    ({"schedule": "wsd_s", "wsd_cycles": 0}, "config.optim.wsd_cycles"),
    ({"schedule": "wsd_s", "wsd_cycles": 2, "wsd_decay_ends": (300,)}, "config.optim.wsd_cycles"),
    ({"schedule": "wsd_s", "wsd_decay_ends": (300, 200)}, "config.optim.wsd_decay_ends"),
    ({"schedule": "wsd_s", "wsd_decay_ends": (300, 900)}, "config.optim.wsd_decay_ends"),
    ({"schedule": "wsd_s", "wsd_cycles": 10, "warmup_steps": 100}, "config.optim.warmup_steps"),
]


@pytest.mark.parametrize("fields,field", BAD, ids=[f for _, f in BAD])
def test_bad_optimizer_config_raises_naming_the_field(fields, field):
    from stability.config import from_config_dict, to_config_dict

    cd = to_config_dict(Config(train=TrainConfig(steps=800))).to_dict()
    cd["optim"].update(fields)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        from_config_dict(cd)


def test_valid_wsd_s_config_passes():
    cfg = Config(
        optim=OptimConfig(schedule="wsd_s", wsd_decay_ends=(200, 400), decay_fraction=0.2),
        train=TrainConfig(steps=800),
    )
    validate(cfg)
    validate(dataclasses.replace(cfg, optim=OptimConfig(name="spam", spam_density=0.25)))
