"""Pallas flash attention against the reference: outputs, statistics and gradients.

On CPU the kernels run in the Pallas interpreter, which fills every output buffer with NaN
before the kernel runs (``test_interpreter_poisons_unwritten_outputs`` pins that). Inputs
here cannot produce a NaN, so the finiteness checks prove every output element is written.
On a GPU the same tests run the compiled Triton kernels.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from stability.kernels import flash, reference, tiles

from .test_reference import (
    huge_logit_qkv,
    numpy_attention,
    random_qkv,
    ref_attention,
    rel_err,
    run_jitted,
)

NATIVE = flash.default_backend(jnp.float32)  # compiled on a GPU (Triton); others interpreted


def flash_attention(q, k, v, backend=NATIVE, **kw):
    kw = dict(kw, backend=backend, interpret=None if backend == NATIVE else True)
    return run_jitted(functools.partial(flash.attention, **kw), q, k, v)


def outputs_and_grads(attention, q, k, v, do, with_stats=False, **kw):
    """(o, stats, (dq, dk, dv)) of Σ o·do (+ Σ stats, which must add no gradient), one jit."""

    def loss(q, k, v):
        o, stats = attention(q, k, v, **kw)
        extra = sum(jnp.sum(x) for x in stats) if with_stats else 0.0
        return jnp.sum(o.astype(jnp.float32) * do) + extra, (o, stats)

    grads, (o, stats) = run_jitted(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), q, k, v)
    return o, stats, grads


def check_against_reference(
    kw,
    *,
    shape=(2, 64, 4, 16),
    s=None,
    dtype=jnp.float32,
    backend=NATIVE,
    blocks=(32, 32),
    tol=1e-5,
    grad_tol=1e-5,
    with_stats=False,
    seed=0,
    interpret=None,
):
    """interpret: None compiles the native driver and interprets the others."""
    b, t, n, h = shape
    q, k, v = random_qkv(seed, b, t, n, h, s=s, dtype=dtype, logit_scale=2.0)
    do = jax.random.normal(jax.random.PRNGKey(seed + 1), q.shape, jnp.float32)
    if interpret is None and backend != NATIVE:
        interpret = True
    fkw = dict(kw, backend=backend, interpret=interpret)
    fkw.update(block_q=blocks[0], block_k=blocks[1])
    o, stats, grads = outputs_and_grads(flash.attention, q, k, v, do, with_stats, **fkw)
    o_ref, stats_ref, grads_ref = outputs_and_grads(reference.attention, q, k, v, do, **kw)
    assert o.dtype == dtype and o.shape == q.shape
    assert np.all(np.isfinite(np.asarray(o, np.float32)))
    assert rel_err(o, o_ref) < tol
    for name in reference.AttentionStats._fields:
        got, want = getattr(stats, name), getattr(stats_ref, name)
        assert got.shape == (b, n, t) and np.all(np.isfinite(got)), name
        assert rel_err(got, want) < 1e-5, name  # stats are float32 from the same inputs
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        assert g.dtype == dtype and np.all(np.isfinite(np.asarray(g, np.float32))), name
        assert rel_err(g, g_ref) < grad_tol, f"d{name}: {rel_err(g, g_ref):.2e}"


LOCAL_GLOBAL = (8, None, 24, None)  # two local and two global heads, as in LS-attention

F32_CASES = [
    dict(causal=True),
    dict(causal=True, window=LOCAL_GLOBAL),
    dict(causal=True, score="softplus", alpha=1.0),
    dict(causal=True, score="softplus", alpha=1.5, window=LOCAL_GLOBAL, softcap=5.0),
    dict(causal=True, score="softplus", alpha=2.0),
    dict(causal=True, softcap=3.0, scale=0.3),
]


@pytest.mark.parametrize("kw", F32_CASES, ids=str)
def test_float32_matches_reference(kw):
    check_against_reference(kw)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw", [dict(causal=False), dict(causal=False, score="softplus", alpha=2.0)], ids=str
)
def test_non_causal_cross_lengths_with_padding(kw):
    """T=40 queries, S=72 keys: neither a multiple of the 32 blocks (padded keys masked)."""
    check_against_reference(kw, shape=(1, 40, 2, 16), s=72)


def test_padding_and_local_heads_skip_blocks():
    """T=100 with 16-blocks: padded rows and keys, windows smaller than a block."""
    check_against_reference(
        dict(window=(3, None, 17, 40)), shape=(1, 100, 4, 16), blocks=(16, 16), with_stats=True
    )


@pytest.mark.slow
def test_unequal_blocks():
    check_against_reference(dict(window=LOCAL_GLOBAL), shape=(1, 96, 4, 16), blocks=(16, 64))
    check_against_reference(dict(), shape=(1, 96, 4, 16), blocks=(64, 16))


@pytest.mark.parametrize(
    "kw", [dict(window=LOCAL_GLOBAL), dict(score="softplus", alpha=2.0)], ids=str
)
def test_bfloat16_matches_reference(kw):
    check_against_reference(kw, dtype=jnp.bfloat16, tol=2e-2, grad_tol=3e-2)


GPU_CASES = [
    dict(causal=True, window=LOCAL_GLOBAL),
    dict(causal=True, score="softplus", alpha=1.5, softcap=5.0),
    dict(causal=False),
]


@pytest.mark.parametrize("kw", GPU_CASES, ids=str)
def test_triton_driver_matches_reference(kw):
    """The Triton driver (interpreted on CPU); head dim 24 is padded to 32 internally."""
    s = None if kw["causal"] else 80
    check_against_reference(kw, shape=(1, 64, 4, 24), s=s, backend="triton")


@pytest.mark.slow
def test_triton_driver_bfloat16_with_padding():
    check_against_reference(
        dict(window=(5, None), score="softplus", alpha=2.0),
        shape=(2, 50, 2, 32),
        dtype=jnp.bfloat16,
        backend="triton",
        tol=2e-2,
        grad_tol=3e-2,
        with_stats=True,
    )


def test_tpu_interpret_mode_without_races(capsys):
    """The Mosaic TPU driver in Pallas's TPU interpreter (VMEM scratch simulated, NaN-filled
    uninitialised memory, parallel grid axes in shuffled order) with its race detector:
    forward, statistics and gradients match the reference, and no kernel reports a race."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret

    params = pltpu.InterpretParams(detect_races=True)
    kw = dict(score="softplus", alpha=1.5, window=LOCAL_GLOBAL, softcap=5.0)
    check_against_reference(kw, shape=(1, 64, 4, 16), backend="tpu", interpret=params)
    assert "RACE DETECTED" not in capsys.readouterr().out
    assert not tpu_interpret.races.races_found  # the last kernel run (dk, dv)


@pytest.mark.parametrize("backend", ["tpu", "triton"])
def test_stats_off_gives_identical_outputs_and_grads(backend):
    """stats=False drops the max-logit and entropy work only: output and gradients are
    bit-identical to those of the call with statistics."""
    q, k, v = random_qkv(3, 1, 64, 2, 16, dtype=jnp.bfloat16, logit_scale=2.0)
    do = jax.random.normal(jax.random.PRNGKey(4), q.shape, jnp.float32)
    kw = dict(window=(8, None), score="softplus", alpha=1.5, block_q=32, block_k=32)
    kw.update(backend=backend, interpret=None if backend == NATIVE else True)
    o, stats, grads = outputs_and_grads(flash.attention, q, k, v, do, **kw)
    o_off, stats_off, grads_off = outputs_and_grads(flash.attention, q, k, v, do, stats=False, **kw)
    assert stats_off is None and stats is not None
    np.testing.assert_array_equal(np.asarray(o_off, np.float32), np.asarray(o, np.float32))
    for g_off, g in zip(grads_off, grads, strict=True):
        np.testing.assert_array_equal(np.asarray(g_off, np.float32), np.asarray(g, np.float32))


def _hopper() -> bool:
    return flash.default_backend(jnp.bfloat16) == "mosaic_gpu"


# Windows (1, None) at T=128 with 64-blocks make every step kind of the Mosaic GPU forward
# occur in one CTA: skipped steps before and after a warpgroup's own range, masked and
# unmasked steps; a ring of one slot makes the stream wait for every release.
MOSAIC_CASES = [
    dict(window=(1, None), score="softplus", alpha=1.5, softcap=5.0),
    dict(window=LOCAL_GLOBAL),
    dict(score="softplus", alpha=2.0),
    dict(causal=False),
]


@(pytest.mark.slow if not _hopper() else (lambda f: f))
@pytest.mark.parametrize("kw", MOSAIC_CASES if _hopper() else MOSAIC_CASES[:1], ids=str)
def test_mosaic_gpu_driver_matches_reference(kw, monkeypatch):
    """The Hopper driver (its backward is the Triton one): compiled on a Hopper GPU at
    T=256 with 64-blocks and its default ring; on CPU at T=128 with a one-slot ring in
    Pallas's GPU interpreter (warpgroups as threads, barriers with phases, TMA, shared
    memory, race detection), about a minute."""
    n = len(kw.get("window") or (None,) * 4)
    common = dict(dtype=jnp.bfloat16, backend="mosaic_gpu", blocks=(64, 64), tol=2e-2)
    common.update(grad_tol=3e-2, with_stats=True)
    if _hopper():
        s = 320 if not kw.get("causal", True) else None
        check_against_reference(kw, shape=(2, 256, n, 64), s=s, interpret=False, **common)
        return
    if not os.environ.get("STABILITY_MGPU_INTERPRET_CHILD"):
        # Pallas's GPU interpreter runs warpgroups as threads; after the rest of the suite in
        # the same process (tfds/grain, W&B and checkpoint threads) it deadlocked, so it runs
        # in a fresh interpreter, as this one test.
        test = f"{__file__}::test_mosaic_gpu_driver_matches_reference"
        child = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
            env={**os.environ, "STABILITY_MGPU_INTERPRET_CHILD": "1"},
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert child.returncode == 0 and " passed" in child.stdout, child.stdout[-3000:]
        return
    from . import mgpu_interpret  # jax internals: imported only where the interpreter runs

    one_slot = flash.KernelConfig(64, 64, max_concurrent_steps=1)
    monkeypatch.setitem(flash.TUNED, flash.TuneKey("mosaic_gpu", "fwd"), one_slot)
    params = mgpu_interpret.InterpretGPUParams(detect_races=True)
    with mgpu_interpret.wgmma_operands_patched():
        check_against_reference(kw, shape=(1, 128, n, 64), interpret=params, **common)
    assert not mgpu_interpret.races_found()


def test_vmap_over_runs():
    """The sweep engine vmaps the train step over runs: the kernels batch under jax.vmap."""
    q, k, v = (x.reshape(2, 1, 32, 2, 16) for x in random_qkv(6, 2, 32, 2, 16))

    def per_run_grads(attention):
        def loss(q, k, v):
            o, stats = attention(q, k, v, window=(8, None))
            return jnp.sum(o * o), (o, stats)

        return jax.vmap(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))

    kernel = functools.partial(flash.attention, block_q=16, block_k=16)
    grads, (o, stats) = run_jitted(per_run_grads(kernel), q, k, v)
    grads_ref, (o_ref, stats_ref) = run_jitted(per_run_grads(reference.attention), q, k, v)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(stats.entropy, stats_ref.entropy) < 1e-5
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) < 1e-5


@pytest.mark.parametrize("backend", ["tpu", "triton"])
@pytest.mark.parametrize("score", ["softmax", "softplus"])
def test_entropy_exact_for_huge_logits(backend, score):
    """Logits ~1e4 (exactly 1e4 + small integers): entropy vs float64 NumPy to 1e-5."""
    q, k, v = huge_logit_qkv(t=64, n=2, h=16)
    _, stats = flash_attention(
        q, k, v, scale=1.0, score=score, alpha=2.0, backend=backend, block_q=16, block_k=16
    )
    _, want = numpy_attention(q, k, v, scale=1.0, score=score, alpha=2.0)
    assert np.max(want["entropy"][:, :, 16:]) > 0.5
    assert np.max(np.abs(np.asarray(stats.entropy) - want["entropy"])) < 1e-5
    assert rel_err(stats.log_norm, want["log_norm"]) < 1e-6
    np.testing.assert_array_equal(stats.max_logit, want["max_logit"])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tpu", "triton"])
def test_one_hot_rows_and_underflowing_softplus(backend):
    """Logit gaps of ~1e4 (weights exactly one-hot) and softplus weights that all underflow."""
    q, k, v = random_qkv(5, 1, 32, 2, 16, logit_scale=300.0)
    for kw in (dict(), dict(score="softplus", alpha=2.0), dict(window=(4, None))):
        o, stats = flash_attention(q, k, v, backend=backend, block_q=16, block_k=16, **kw)
        o_ref, stats_ref = ref_attention(q, k, v, **kw)
        assert rel_err(o, o_ref) < 1e-5
        for got, want in zip(stats, stats_ref, strict=True):
            assert rel_err(got, want) < 1e-5
    neg = jnp.asarray(q).at[..., 0].set(-40.0), jnp.asarray(k).at[..., 0].set(40.0)
    o, stats = flash_attention(*neg, v, score="softplus", backend=backend, block_q=16, block_k=16)
    o_ref, stats_ref = ref_attention(*neg, v, score="softplus")
    assert rel_err(o, o_ref) < 1e-5 and rel_err(stats.log_norm, stats_ref.log_norm) < 1e-6


def test_interpreter_poisons_unwritten_outputs():
    """Premise of the finiteness checks: an output element no kernel writes reads NaN."""

    def kernel(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    x = jnp.ones((2, 8, 128), jnp.float32)
    block = pl.BlockSpec((None, 8, 128), lambda i: (i, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(2,),
        in_specs=[block],
        out_specs=block,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        interpret=True,
    )(x)
    assert np.all(out[0] == 1.0) and np.all(np.isnan(out[1]))


@pytest.mark.parametrize(
    "q_len, kv_len, bq, bk, causal, window",
    [
        (100, 100, 16, 16, True, 3),
        (100, 100, 16, 32, True, 40),
        (128, 128, 32, 16, True, None),
        (96, 96, 16, 64, True, 17),
        (40, 72, 32, 32, False, None),
        (50, 50, 32, 16, True, 1),
    ],
)
def test_block_ranges_are_exactly_the_visible_blocks(q_len, kv_len, bq, bk, causal, window):
    """Skipped blocks hold no visible (real query, real key) pair; no other block is skipped."""
    if causal:
        pad_q = pad_k = -(-q_len // max(bq, bk)) * max(bq, bk)
    else:
        pad_q, pad_k = -(-q_len // bq) * bq, -(-kv_len // bk) * bk
    spec = tiles.Spec(
        causal=causal,
        windows=None if window is None else (window,),
        score="softmax",
        alpha=1.0,
        softcap=None,
        scale=1.0,
        q_len=q_len,
        kv_len=kv_len,
        q_len_pad=pad_q,
        kv_len_pad=pad_k,
        fwd=flash.KernelConfig(bq, bk),
        bwd=flash.KernelConfig(bq, bk),
        backend="tpu",
        interpret=True,
        precision=None,
    )
    i, j = np.arange(pad_q)[:, None], np.arange(pad_k)[None, :]
    visible = (i < q_len) & (j < kv_len)
    if causal:
        visible &= j <= i
    if window is not None:
        visible &= i - j < window
    want = visible.reshape(pad_q // bq, bq, pad_k // bk, bk).any(axis=(1, 3))
    for qb in range(want.shape[0]):
        lo, hi = tiles._kv_blocks(spec, jnp.int32(qb), window, bq, bk)
        np.testing.assert_array_equal(
            (np.arange(want.shape[1]) >= lo) & (np.arange(want.shape[1]) < hi),
            want[qb],
            err_msg=f"key blocks of query block {qb}",
        )
    # Mask-free blocks (Mosaic GPU): every pair, padded query rows included, is visible.
    unmasked = (j < kv_len) & (i >= 0)  # [pad_q, pad_k]
    if causal:
        unmasked &= j <= i
    if window is not None:
        unmasked &= i - j < window
    full_want = want & unmasked.reshape(pad_q // bq, bq, pad_k // bk, bk).all(axis=(1, 3))
    for qb in range(want.shape[0]):
        lo, full_lo, full_hi, hi = tiles._full_kv_blocks(spec, jnp.int32(qb), window, bq, bk)
        blocks = np.arange(want.shape[1])
        np.testing.assert_array_equal(
            (blocks >= full_lo) & (blocks < full_hi),
            full_want[qb],
            err_msg=f"mask-free key blocks of query block {qb}",
        )
        assert lo <= full_lo <= full_hi <= hi
    for kb in range(want.shape[1]):
        lo, hi = tiles._q_blocks(spec, jnp.int32(kb), window, bq, bk)
        np.testing.assert_array_equal(
            (np.arange(want.shape[0]) >= lo) & (np.arange(want.shape[0]) < hi),
            want[:, kb],
            err_msg=f"query blocks of key block {kb}",
        )


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(block_q=48), "block_q=48"),
        (dict(block_k=8), "block_k=8"),
        (dict(backend="cpu"), "backend='cpu'"),
        (dict(backend="mosaic_gpu"), "dtype=float32"),
        (dict(backend="mosaic_gpu", dtype=jnp.bfloat16, block_q=32), "block_q=32"),
    ],
)
def test_invalid_arguments_are_named(kw, match):
    x = jnp.zeros((1, 32, 2, 16), kw.pop("dtype", jnp.float32))
    with pytest.raises(ValueError, match=match):
        flash.attention(x, x, x, **kw)


def test_mosaic_gpu_config_over_shared_memory_is_named(monkeypatch):
    big = flash.KernelConfig(64, 128, max_concurrent_steps=4)
    monkeypatch.setitem(flash.TUNED, flash.TuneKey("mosaic_gpu", "fwd"), big)
    x = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="shared memory"):
        flash.attention(x, x, x, backend="mosaic_gpu")


def test_tuned_config_prefers_the_most_specific_entry_then_the_nearest_length(monkeypatch):
    generic = flash.TUNED[flash.TuneKey("triton", "fwd")]
    at_2k, at_8k, windowed = (flash.KernelConfig(b, b) for b in (16, 32, 128))
    for key, config in [
        (flash.TuneKey("triton", "fwd", "bfloat16", 128, True, False, 2048), at_2k),
        (flash.TuneKey("triton", "fwd", "bfloat16", 128, True, False, 8192), at_8k),
        (flash.TuneKey("triton", "fwd", "bfloat16", 128, True, True), windowed),
    ]:
        monkeypatch.setitem(flash.TUNED, key, config)
    call = dict(dtype="bfloat16", head_dim=128, causal=True)

    def lookup(**kw):
        return flash.tuned_config("triton", "fwd", **{**call, **kw})

    assert lookup(windowed=False, seq_len=1024) == at_2k
    assert lookup(windowed=False, seq_len=4096) == at_2k  # log-distance tie: first entry
    assert lookup(windowed=False, seq_len=6000) == at_8k
    assert lookup(windowed=True, seq_len=6000) == windowed
    assert lookup(windowed=False, seq_len=4096, head_dim=64) == generic
    for backend in ("tpu", "triton", "mosaic_gpu"):
        for kernel in ("fwd", "bwd"):  # every driver has a wildcard default
            assert flash.TuneKey(backend, kernel) in flash.TUNED


def test_unsupported_dtype_is_named():
    x = jnp.zeros((1, 32, 2, 16), jnp.float16)
    with pytest.raises(ValueError, match="float16"):
        flash.attention(x, x, x)
