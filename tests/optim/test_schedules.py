"""Every schedule against its closed form; WSD-S jumps back to the peak; traced, vmapped scalars."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stability.config import OptimConfig
from stability.optim.schedules import decay_ends, learning_rate

PEAK, MIN, W, T = 0.1, 1e-3, 10, 100


def lr_at(cfg: OptimConfig, steps, peak=PEAK, warmup=W, total=T) -> np.ndarray:
    fn = jax.jit(
        jax.vmap(lambda s: learning_rate(cfg, total, s, jnp.float32(peak), jnp.float32(warmup)))
    )
    return np.asarray(fn(jnp.asarray(steps, jnp.int32)))


SHAPES = {
    "linear": lambda p: MIN + (PEAK - MIN) * (1 - p),
    "cosine": lambda p: MIN + (PEAK - MIN) * 0.5 * (1 + math.cos(math.pi * p)),
    "sqrt": lambda p: MIN + (PEAK - MIN) * (1 - math.sqrt(p)),
    "exponential": lambda p: PEAK * (MIN / PEAK) ** p,
}


def closed_form(schedule: str, t: int, shape: str = "linear", fraction: float = 0.2, ends=(T,)):
    if t < W:
        return PEAK * (t + 1) / W
    p = (t - W) / (T - W)
    if schedule == "cosine":
        return SHAPES["cosine"](p)
    if schedule == "linear":
        return SHAPES["linear"](p)
    if schedule == "constant":
        return PEAK
    if schedule == "rsqrt":
        return max(MIN, min(PEAK, PEAK * math.sqrt(W / (t + 1))))
    start = 0
    for end in ends:  # wsd (one cycle) and wsd_s
        if t < end:
            decay_start = max(end - fraction * (end - start), W)
            p = max(0.0, (t - decay_start) / (end - decay_start))
            return SHAPES[shape](p)
        start = end
    raise AssertionError


STEPS = [0, 4, 9, 10, 11, 37, 50, 79, 80, 81, 90, 99]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "rsqrt"])
def test_warmup_then_decay_matches_closed_form(schedule):
    cfg = OptimConfig(schedule=schedule, min_lr=MIN)
    want = [closed_form(schedule, t) for t in STEPS]
    np.testing.assert_allclose(lr_at(cfg, STEPS), want, rtol=1e-5)


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt", "exponential"])
def test_wsd_is_stable_then_decays_over_the_last_fraction(shape):
    cfg = OptimConfig(schedule="wsd", decay_shape=shape, decay_fraction=0.2, min_lr=MIN)
    want = [closed_form("wsd", t, shape) for t in STEPS]
    np.testing.assert_allclose(lr_at(cfg, STEPS), want, rtol=1e-5)
    lr = lr_at(cfg, range(T + 1))
    np.testing.assert_allclose(lr[W:80], PEAK, rtol=1e-6)  # stable until the decay at 80
    assert np.all(np.diff(lr[80:]) < 0)
    np.testing.assert_allclose(lr[T], MIN, rtol=1e-5)  # reaches min_lr at the end
    assert decay_ends(cfg, T) == [T]


def test_wsd_decay_fraction_one_is_the_linear_schedule():
    wsd = OptimConfig(schedule="wsd", decay_shape="linear", decay_fraction=1.0, min_lr=MIN)
    lin = dataclasses.replace(wsd, schedule="linear")
    np.testing.assert_allclose(lr_at(wsd, range(T)), lr_at(lin, range(T)), rtol=1e-5)


def test_wsd_s_equal_cycles_decay_then_jump_back_to_peak():
    cfg = OptimConfig(
        schedule="wsd_s", wsd_cycles=4, decay_fraction=0.4, decay_shape="cosine", min_lr=MIN
    )
    ends = decay_ends(cfg, T)
    assert ends == [25, 50, 75, 100]
    lr = lr_at(cfg, range(T + 1))
    want = [closed_form("wsd_s", t, "cosine", 0.4, ends) for t in range(T)]
    np.testing.assert_allclose(lr[:T], want, rtol=1e-5)
    for e in ends[:-1]:
        assert lr[e - 1] < 0.05 * PEAK  # nearly decayed on the cycle's last update
        np.testing.assert_allclose(lr[e], PEAK, rtol=1e-6)  # straight back to the peak
    np.testing.assert_allclose(
        lr[15:25], [SHAPES["cosine"]((t - 15) / 10) for t in range(15, 25)], rtol=1e-5
    )
    np.testing.assert_allclose(lr[25:40], PEAK, rtol=1e-6)  # cycle 2 stable for 60% of 25


def test_wsd_s_explicit_decay_ends_append_the_last_step():
    cfg = OptimConfig(schedule="wsd_s", wsd_decay_ends=(30, 60), decay_fraction=0.5, min_lr=MIN)
    ends = decay_ends(cfg, T)
    assert ends == [30, 60, 100]
    lr = lr_at(cfg, range(T))
    want = [closed_form("wsd_s", t, "linear", 0.5, ends) for t in range(T)]
    np.testing.assert_allclose(lr, want, rtol=1e-5)
    assert lr[30] == lr[60] == pytest.approx(PEAK)
    assert decay_ends(dataclasses.replace(cfg, wsd_decay_ends=(30, 100)), T) == [30, 100]


def test_other_schedules_have_no_decay_ends():
    assert decay_ends(OptimConfig(schedule="cosine"), T) == []


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "wsd_s"])
def test_peak_and_warmup_are_traced_per_run(schedule):
    """One vmapped program over runs with different peaks and warmups equals each run alone."""
    cfg = OptimConfig(
        schedule=schedule, min_lr=MIN, **({"wsd_cycles": 2} if schedule == "wsd_s" else {})
    )
    peaks = jnp.asarray([0.1, 0.03, 0.3])
    warmups = jnp.asarray([0.0, 5.0, 20.0])
    steps = jnp.arange(T)
    batched = jax.jit(
        jax.vmap(lambda p, w: jax.vmap(lambda s: learning_rate(cfg, T, s, p, w))(steps))
    )(peaks, warmups)
    for i in range(3):
        alone = lr_at(cfg, range(T), peak=float(peaks[i]), warmup=float(warmups[i]))
        np.testing.assert_allclose(batched[i], alone, rtol=1e-6)
