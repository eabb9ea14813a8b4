"""The Triton driver of flash attention (``flash.py``; GPUs before Hopper, and float32 inputs
on any GPU): grid (query blocks, B, N), a loop over key blocks inside the kernel, no scratch;
block sizes and the (padded) head dim are powers of two. Mosaic GPU's backward runs here too."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from stability.kernels.tiles import (
    KernelConfig,
    Spec,
    _bwd_tile,
    _dot_tn,
    _fwd_finish,
    _fwd_init,
    _fwd_update,
    _head_window,
    _kv_blocks,
    _q_blocks,
    _scores,
    _tile_pv,
)

# ---------------------------------------------------------------------------------------
# Triton driver: [B, T, N, H] layout, grid over one block axis, loop over the other.
# ---------------------------------------------------------------------------------------


def _triton_params(config: KernelConfig) -> pltriton.CompilerParams:
    return pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _gpu_fwd_kernel(q_ref, k_ref, v_ref, o_ref, *stat_refs, spec: Spec):
    i, head = pl.program_id(0), pl.program_id(2)
    window = _head_window(spec, head)
    q = q_ref[...]
    bq, bk = spec.fwd.block_q, spec.fwd.block_k

    def body(j, state):
        k0 = pl.multiple_of(j * bk, bk)
        s, u, mask = _scores(spec, q, k_ref[pl.ds(k0, bk), :], i * bq, k0, window)
        return _fwd_update(spec, state, s, u, mask, _tile_pv(spec, v_ref[pl.ds(k0, bk), :]))

    lo, hi = _kv_blocks(spec, i, window, bq, bk)
    row = functools.partial(jnp.full, (q.shape[0],), dtype=jnp.float32)
    state = lax.fori_loop(lo, hi, body, _fwd_init(spec, row, jnp.zeros(q.shape, jnp.float32)))
    o, *stats = _fwd_finish(state)
    o_ref[...] = o.astype(o_ref.dtype)
    for ref, x in zip(stat_refs, stats, strict=False):
        ref[...] = x


def forward(spec: Spec, q, k, v):
    """Returns (o [B, T, N, H], stats, residual = log_norm [B, N, T])."""
    b, t, n, h = q.shape
    bq = spec.fwd.block_q
    q_spec = pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, i, ni, 0))
    kv_spec = pl.BlockSpec((None, spec.kv_len_pad, None, h), lambda i, bi, ni: (bi, 0, ni, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))
    row = jax.ShapeDtypeStruct((b, n, t), jnp.float32)
    num_stats = 3 if spec.stats else 1
    o, *stats = pl.pallas_call(
        functools.partial(_gpu_fwd_kernel, spec=spec),
        grid=(spec.q_len_pad // bq, b, n),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec] + [row_spec] * num_stats,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] + [row] * num_stats,
        compiler_params=_triton_params(spec.fwd),
        interpret=bool(spec.interpret),
        name="flash_fwd",
    )(q, k, v)
    return o, tuple(stats), stats[0]


def _gpu_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, spec: Spec):
    i, head = pl.program_id(0), pl.program_id(2)
    window = _head_window(spec, head)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    bq, bk = spec.bwd.block_q, spec.bwd.block_k

    def body(j, dq):
        k0 = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k0, bk), :]
        _, ds = _bwd_tile(spec, q, k, v_ref[pl.ds(k0, bk), :], do, lse, delta, i * bq, k0, window)
        return dq + jnp.dot(
            ds.astype(k.dtype), k, preferred_element_type=jnp.float32, precision=spec.precision
        )

    lo, hi = _kv_blocks(spec, i, window, bq, bk)
    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _gpu_dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, spec: Spec):
    j, head = pl.program_id(0), pl.program_id(2)
    window = _head_window(spec, head)
    k, v = k_ref[...], v_ref[...]
    bq, bk = spec.bwd.block_q, spec.bwd.block_k

    def body(i, carry):
        dk, dv = carry
        q0 = pl.multiple_of(i * bq, bq)
        q, do = q_ref[pl.ds(q0, bq), :], do_ref[pl.ds(q0, bq), :]
        p, ds = _bwd_tile(
            spec,
            q,
            k,
            v,
            do,
            lse_ref[pl.ds(q0, bq)],
            delta_ref[pl.ds(q0, bq)],
            q0,
            j * bk,
            window,
        )
        return dk + _dot_tn(ds, q, spec), dv + _dot_tn(p, do, spec)

    lo, hi = _q_blocks(spec, j, window, bq, bk)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(lo, hi, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(spec: Spec, q, k, v, do, lse_BNT, delta_BNT):
    """Triton dq and dk, dv kernels (the backward of both GPU drivers)."""
    b, t, n, h = q.shape
    bq, bk = spec.bwd.block_q, spec.bwd.block_k
    q_block = pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, i, ni, 0))
    row_block = pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))
    kv_full = pl.BlockSpec((None, spec.kv_len_pad, None, h), lambda i, bi, ni: (bi, 0, ni, 0))
    params, interpret = _triton_params(spec.bwd), bool(spec.interpret)
    dq = pl.pallas_call(
        functools.partial(_gpu_dq_kernel, spec=spec),
        grid=(spec.q_len_pad // bq, b, n),
        in_specs=[q_block, kv_full, kv_full, q_block, row_block, row_block],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="flash_dq",
    )(q, k, v, do, lse_BNT, delta_BNT)

    kv_block = pl.BlockSpec((None, bk, None, h), lambda j, bi, ni: (bi, j, ni, 0))
    q_full = pl.BlockSpec((None, spec.q_len_pad, None, h), lambda j, bi, ni: (bi, 0, ni, 0))
    row_full = pl.BlockSpec((None, None, spec.q_len_pad), lambda j, bi, ni: (bi, ni, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_gpu_dkv_kernel, spec=spec),
        grid=(spec.kv_len_pad // bk, b, n),
        in_specs=[q_full, kv_block, kv_block, q_full, row_full, row_full],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        compiler_params=params,
        interpret=interpret,
        name="flash_dkv",
    )(q, k, v, do, lse_BNT, delta_BNT)
    return dq, dk, dv
