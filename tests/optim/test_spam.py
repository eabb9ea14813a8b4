"""SPAM against a NumPy transcription of the reference optimizer (galore_torch/SPAM.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stability.config import OptimConfig
from stability.optim.build import make_optimizer, set_hyperparams
from stability.optim.spam import ScaleBySpamState, scale_by_spam, spam, spam_diagnostics

B1, B2 = 0.9, 0.999
DELTA_T, N_WARM = 100, 30  # small ΔT so a 1200-step run sees 12 resets
SHAPES = {"b": (16,), "w": (8, 16)}


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def reference_spam(p0, grads, masks=None, *, lr, wd=0.0, theta=5000.0, eps=1e-6):
    """The reference ``AdamW.step`` for one tensor, in NumPy float64.

    p0: [*S] initial param; grads: [K, *S]; masks: None (dense) or [K, *S] bool, the sparse mask
    in effect at each step (the reference stores moments compressed to the mask and remaps them
    when the mask changes). Weight decay acts on the stepped params, p ← p − lr·wd·p, as in
    the reference. Returns params, m, v (scattered to [*S]) and clipped flags, each [K, *S].
    """
    p = p0.copy()
    total_step, current_step = 0, N_WARM + 1
    mask = None if masks is None else masks[0]
    compress = (lambda a: a) if mask is None else (lambda a: a[mask])
    m, v = np.zeros_like(compress(p)), np.zeros_like(compress(p))
    out = {"p": [], "m": [], "v": [], "clipped": []}

    def scatter(x):
        if mask is None:
            return x
        full = np.zeros(p.shape, x.dtype)
        full[mask] = x
        return full

    for k in range(len(grads)):
        dr = (
            0.0
            if current_step >= N_WARM
            else 0.99 * (1 + np.cos(np.pi * current_step / (N_WARM + 1))) / 2
        )
        scale_factor = 1 - dr
        g = compress(grads[k]).copy()
        if (total_step + 1) % DELTA_T == 0:
            m, v = np.zeros_like(g), np.zeros_like(g)
        step = k + 1
        clipped = np.zeros(g.shape, bool)
        current = total_step + 1
        if current >= 20:
            spike = g**2 > theta * v
            if current % DELTA_T >= 20:
                g[spike] = np.sign(g[spike]) * np.sqrt(v[spike] * theta)
                clipped = spike
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        norm_grad = m / (np.sqrt(v) + eps)
        step_size = lr * np.sqrt(1 - B2**step) / (1 - B1**step)
        p = p - step_size * scale_factor * scatter(norm_grad)
        if wd > 0 and mask is None:  # the reference's sparse branch decays a copy: a no-op
            p = p - lr * wd * p
        total_step += 1
        current_step += 1
        out["p"].append(p)
        out["m"].append(scatter(m))
        out["v"].append(scatter(v))
        out["clipped"].append(scatter(clipped))
        if (total_step + 1) % DELTA_T == 0:  # new mask, moments remapped, warm-up restarts
            if mask is not None and k + 1 < len(grads):
                new = masks[k + 1]
                both = new & mask
                m2, v2 = np.zeros(new.sum()), np.zeros(new.sum())
                m2[both[new]], v2[both[new]] = m[both[mask]], v[both[mask]]
                m, v, mask = m2, v2, new
            current_step = 0
    return {name: np.stack(xs) for name, xs in out.items()}


def make_stream(steps, seed=0):
    """Params p0 and a gradient stream {name: [steps, *shape]} with 500× spikes on 0.2% of entries."""
    rng = np.random.default_rng(seed)
    p0, grads, spikes = {}, {}, {}
    for name, shape in SHAPES.items():
        p0[name] = rng.normal(size=shape)
        grads[name] = 1e-2 * rng.normal(size=(steps, *shape))
        spikes[name] = rng.random((steps, *shape)) < 2e-3
        grads[name] = np.where(spikes[name], 500 * grads[name], grads[name])
    return p0, grads, spikes


def run(opt, p0, grads, lr=0.0, wd_after=0.0):
    """Scans ``opt`` over the stream; then p ← p − lr·wd_after·p after each step (reference-style
    decay). Returns per-step params, the stacked states, both with a leading [K] axis."""

    def step(carry, g):
        p, st = carry
        u, st = opt.update(g, st, p)
        p = optax.apply_updates(p, u)
        p = jax.tree.map(lambda x: x - lr * wd_after * x, p)
        return (p, st), (p, st)

    p0 = jax.tree.map(jnp.asarray, p0)
    _, (ps, states) = jax.lax.scan(step, (p0, opt.init(p0)), grads)
    return jax.tree.map(np.asarray, ps), jax.tree.map(np.asarray, states)


def spam_state(opt_state) -> ScaleBySpamState:
    is_spam = lambda x: isinstance(x, ScaleBySpamState)
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_spam) if is_spam(x))


def clipped_from_moments(g, m, since_reset):
    """Entries whose gradient the moments did not absorb as given: [K, *S] bool, from m_k and
    m_{k-1} (zero when the step was a reset, since_reset = 0)."""
    after_reset = (since_reset == 0).reshape(-1, *[1] * (m.ndim - 1))
    m_prev = np.where(after_reset, 0, np.concatenate([np.zeros_like(m[:1]), m[:-1]]))
    g_absorbed = (m - B1 * m_prev) / (1 - B1)
    return ~np.isclose(g_absorbed, g, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("form", ["chain_decay_after_step", "spam"])
def test_matches_reference(x64, form):
    steps, lr, wd = 1200, 1e-2, 0.1
    p0, grads, spikes = make_stream(steps)
    spam_kw = dict(reset_interval=DELTA_T, reset_warmup_steps=N_WARM)
    if form == "spam":
        ps, states = run(spam(lr, weight_decay=wd, **spam_kw), p0, grads)
    else:
        opt = optax.chain(scale_by_spam(**spam_kw), optax.scale_by_learning_rate(lr))
        ps, states = run(opt, p0, grads, lr=lr, wd_after=wd)
    st = spam_state(states)

    t = np.arange(1, steps + 1)
    np.testing.assert_array_equal(st.steps_since_reset, t % DELTA_T)
    in_delay = (t % DELTA_T < 20)[:, None]  # steps whose spikes must pass unclipped
    n_clipped = 0
    for name in SHAPES:
        ref = reference_spam(p0[name], grads[name], lr=lr, wd=wd)
        np.testing.assert_allclose(ps[name], ref["p"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(st.mu[name], ref["m"], rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(st.nu[name], ref["v"], rtol=1e-9, atol=1e-15)
        clipped = clipped_from_moments(grads[name], st.mu[name], st.steps_since_reset)
        np.testing.assert_array_equal(clipped, ref["clipped"])
        flat = lambda x: x.reshape(steps, -1)
        assert (flat(spikes[name]) & in_delay).any()  # the stream tests the delay window
        assert not (flat(ref["clipped"]) & in_delay).any()
        n_clipped = n_clipped + flat(ref["clipped"]).sum(axis=1)
    assert n_clipped.sum() > 50
    size = sum(np.prod(s) for s in SHAPES.values())
    np.testing.assert_allclose(st.clipped_fraction, n_clipped / size, rtol=1e-6)


def test_coupled_decay_in_make_optimizer_is_the_reference_order(x64):
    """optim.name='spam', weight_decay_mode='coupled': per-run λ and η injected by the train
    step, matrices decayed after the step as the reference does, vectors never."""
    steps, lr, wd = 1000, 1e-2, 0.1
    p0, grads, _ = make_stream(steps, seed=4)
    cfg = OptimConfig(
        name="spam",
        b2=B2,
        eps=1e-6,
        grad_clip=0.0,
        weight_decay_mode="coupled",
        spam_reset_interval=DELTA_T,
        spam_reset_warmup=N_WARM,
        lr=1.0,
        weight_decay=0.0,
    )
    tx = make_optimizer(cfg)

    def step(carry, g):
        p, st = carry
        st = set_hyperparams(st, learning_rate=lr, weight_decay=wd, peak_learning_rate=lr)
        u, st = tx.update(g, st, p)
        p = optax.apply_updates(p, u)
        return (p, st), p

    p = jax.tree.map(jnp.asarray, p0)
    _, ps = jax.lax.scan(step, (p, tx.init(p)), grads)
    for name, decays in (("w", True), ("b", False)):
        ref = reference_spam(p0[name], grads[name], lr=lr, wd=wd if decays else 0.0)
        np.testing.assert_allclose(ps[name], ref["p"], rtol=1e-12, atol=1e-12)
    no_decay = reference_spam(p0["w"], grads["w"], lr=lr)["p"][-1]
    assert np.abs(ps["w"][-1] - no_decay).max() > 1e-4  # the decay acted


def test_reset_zeroes_moments_and_keeps_bias_correction_count(x64):
    opt = scale_by_spam(reset_interval=DELTA_T, reset_warmup_steps=N_WARM)
    p0, grads, _ = make_stream(DELTA_T - 1)
    _, states = run(opt, p0, grads)
    st = jax.tree.map(lambda x: x[-1], states)  # after update t = ΔT − 1
    assert all(np.abs(st.mu[n]).min() > 0 for n in SHAPES)

    zeros = jax.tree.map(jnp.zeros_like, p0)
    u, st = opt.update(zeros, st)  # un-jitted; t = ΔT: reset, then a zero gradient
    for tree in (u, st.mu, st.nu):
        assert all((np.asarray(x) == 0).all() for x in jax.tree.leaves(tree))

    g = jax.tree.map(lambda x: jnp.full_like(x, 0.5), p0)
    u, _ = opt.update(g, st)  # t = ΔT + 1, c = 1: bias correction uses t, not c
    t, c = DELTA_T + 1, 1
    s = 1 - 0.99 * (1 + np.cos(np.pi * c / (N_WARM + 1))) / 2
    m, v = (1 - B1) * 0.5, (1 - B2) * 0.25
    want = s * np.sqrt(1 - B2**t) / (1 - B1**t) * m / (np.sqrt(v) + 1e-6)
    for x in jax.tree.leaves(u):
        np.testing.assert_allclose(x, want, rtol=1e-12)


def test_vmap_over_runs_matches_single_runs(x64):
    steps = 3 * DELTA_T
    p0, grads, _ = make_stream(steps, seed=1)
    opt = optax.inject_hyperparams(spam, static_args=("reset_interval", "reset_warmup_steps"))(
        learning_rate=0.0, threshold=1.0, eps=0.0, reset_interval=DELTA_T, reset_warmup_steps=N_WARM
    )
    runs = {  # per run: learning rate, θ, ε
        "learning_rate": np.array([1e-2, 3e-3, 1e-2]),
        "threshold": np.array([5000.0, 5000.0, 20.0]),
        "eps": np.array([1e-6, 1e-8, 1e-6]),
    }

    def run_one(hp):
        def step(carry, g):
            p, st = carry
            u, st = opt.update(g, st, p)
            p = optax.apply_updates(p, u)
            return (p, st), (p, spam_diagnostics(st))

        p = jax.tree.map(jnp.asarray, p0)
        st = opt.init(p)
        st = st._replace(hyperparams={**st.hyperparams, **hp})
        (p, _), (_, diags) = jax.lax.scan(step, (p, st), grads)
        return p, diags

    batched_p, batched_diags = jax.jit(jax.vmap(run_one))(runs)
    assert batched_diags["spam/clipped_fraction"].shape == (3, steps)
    for r in range(3):
        hp = {k: v[r] for k, v in runs.items()}
        p, diags = jax.jit(run_one)(hp)
        for name in SHAPES:
            np.testing.assert_allclose(batched_p[name][r], p[name], rtol=1e-12)
            ref = reference_spam(
                p0[name], grads[name], lr=hp["learning_rate"], theta=hp["threshold"], eps=hp["eps"]
            )
            np.testing.assert_allclose(p[name], ref["p"][-1], rtol=1e-6, atol=1e-12)
        for k in diags:
            np.testing.assert_array_equal(batched_diags[k][r], diags[k])
    # a lower θ clips more
    fraction = batched_diags["spam/clipped_fraction"].sum(axis=1)
    assert fraction[2] > fraction[0] > 0


def test_sparse_keeps_moments_only_on_mask(x64):
    steps, lr, density = 450, 1e-2, 0.3
    p0, grads, _ = make_stream(steps, seed=2)
    opt = spam(lr, reset_interval=DELTA_T, reset_warmup_steps=N_WARM, density=density, seed=3)
    ps, states = run(opt, p0, grads)
    st = spam_state(states)

    assert st.mask["b"].all()  # vectors stay dense
    mask = st.mask["w"]  # [K, 8, 16]: the mask in effect at each step
    changed = (mask[1:] != mask[:-1]).any(axis=(1, 2))
    is_reset = (np.arange(2, steps + 1) % DELTA_T) == 0
    np.testing.assert_array_equal(changed, is_reset)
    assert 0.15 < mask.mean() < 0.45
    for moment in (st.mu["w"], st.nu["w"]):
        assert (moment[~mask] == 0).all()
        assert (moment[mask] != 0).mean() > 0.99
    step_w = np.diff(np.concatenate([p0["w"][None], ps["w"]]), axis=0)
    assert (step_w[~mask] == 0).all()

    ref_w = reference_spam(p0["w"], grads["w"], mask, lr=lr)
    np.testing.assert_allclose(ps["w"], ref_w["p"], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(st.mu["w"], ref_w["m"], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(st.nu["w"], ref_w["v"], rtol=1e-9, atol=1e-15)
    ref_b = reference_spam(p0["b"], grads["b"], lr=lr)
    np.testing.assert_allclose(ps["b"], ref_b["p"], rtol=1e-6, atol=1e-12)
    # the clipped fraction counts only entries with moments
    n_clipped = ref_w["clipped"].sum(axis=(1, 2)) + ref_b["clipped"].sum(axis=1)
    assert n_clipped.sum() > 10
    n_kept = mask.sum(axis=(1, 2)) + SHAPES["b"][0]
    np.testing.assert_allclose(st.clipped_fraction, n_clipped / n_kept, rtol=1e-6)


def test_diagnostics_need_one_spam_state():
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="holds 0 ScaleBySpamState"):
        spam_diagnostics(optax.adam(1e-3).init(params))
    d = spam_diagnostics(optax.inject_hyperparams(spam)(learning_rate=1e-3).init(params))
    assert set(d) == {"spam/clipped_fraction", "spam/steps_since_reset"}


@pytest.mark.parametrize(
    "name, value",
    [
        ("reset_interval", 20),
        ("reset_interval", 0),
        ("reset_warmup_steps", -1),
        ("density", 0.0),
        ("density", 1.5),
        ("threshold", 0.0),
        ("threshold", -5.0),
    ],
)
def test_bad_arguments_raise(name, value):
    with pytest.raises(ValueError, match=re.escape(f"{name}={value!r}")):
        scale_by_spam(**{name: value})
