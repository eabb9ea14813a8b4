"""The Mosaic TPU driver of flash attention (``flash.py``): grid (B, N, query blocks, key
blocks) with the reduction axis innermost, running state in VMEM scratch, per-row values
stored lane-broadcast as [..., T, 128]; the statistics come out packed in lanes 0, 1, 2."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from stability.kernels.tiles import (
    LANES,
    Spec,
    _bwd_tile,
    _clamp_block,
    _dot_tn,
    _fwd_finish,
    _fwd_init,
    _fwd_update,
    _FwdState,
    _head_window,
    _kv_blocks,
    _q_blocks,
    _scores,
    _tile_pv,
)

# ---------------------------------------------------------------------------------------
# TPU driver: [B, N, T, H] layout, kv (or q) blocks as the innermost "arbitrary" grid axis.
# ---------------------------------------------------------------------------------------


def _tpu_params() -> pltpu.CompilerParams:
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    )


def _tpu_fwd_kernel(q_ref, k_ref, v_ref, o_ref, stats_ref, *scratch, spec: Spec):
    m_ref, l_ref, acc_ref, *extra = scratch
    t_ref = extra.pop(0) if spec.stats else None
    refs = _FwdState(m_ref, l_ref, t_ref, extra[0] if extra else None, acc_ref)
    head, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    window = _head_window(spec, head)
    bq, bk = spec.fwd.block_q, spec.fwd.block_k

    def load() -> _FwdState:
        return _FwdState(*(None if r is None else r[...] for r in refs))

    def store(state: _FwdState):
        for r, x in zip(refs, state, strict=True):
            if r is not None:
                r[...] = x

    @pl.when(j == 0)
    def _init():
        row = functools.partial(jnp.full, m_ref.shape, dtype=jnp.float32)
        store(_fwd_init(spec, row, jnp.zeros(acc_ref.shape, jnp.float32)))

    lo, hi = _kv_blocks(spec, i, window, bq, bk)

    @pl.when((lo <= j) & (j < hi))
    def _step():
        s, u, mask = _scores(spec, q_ref[...], k_ref[...], i * bq, j * bk, window)
        store(_fwd_update(spec, load(), s, u, mask, _tile_pv(spec, v_ref[...])))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        o, log_norm, max_logit, entropy = _fwd_finish(load())
        o_ref[...] = o.astype(o_ref.dtype)
        if entropy is None:
            stats_ref[...] = jnp.broadcast_to(log_norm, stats_ref.shape)
            return
        lane = lax.broadcasted_iota(jnp.int32, stats_ref.shape, 1)
        stats_ref[...] = jnp.where(lane == 0, log_norm, jnp.where(lane == 1, max_logit, entropy))


def forward(spec: Spec, q_BTNH, k_BSNH, v_BSNH):
    """Returns (o [B, T, N, H], stats, residual = packed stats [B, N, T, 128])."""
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q_BTNH, k_BSNH, v_BSNH))
    b, n, t, h = q.shape
    bq, bk = spec.fwd.block_q, spec.fwd.block_k

    def q_index(bi, ni, i, j):
        return bi, ni, i, 0

    def kv_index(bi, ni, i, j):
        lo, hi = _kv_blocks(spec, i, _head_window(spec, ni), bq, bk)
        return bi, ni, _clamp_block(j, lo, hi), 0

    row = pltpu.VMEM((bq, LANES), jnp.float32)
    scratch = [row, row, pltpu.VMEM((bq, h), jnp.float32)]
    if spec.stats:
        scratch += [row] * (2 if spec.score == "softplus" else 1)
    o, stats = pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, spec=spec),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(b, n, spec.q_len_pad // bq, spec.kv_len_pad // bk),
            in_specs=[
                pl.BlockSpec((None, None, bq, h), q_index),
                pl.BlockSpec((None, None, bk, h), kv_index),
                pl.BlockSpec((None, None, bk, h), kv_index),
            ],
            out_specs=[
                pl.BlockSpec((None, None, bq, h), q_index),
                pl.BlockSpec((None, None, bq, LANES), q_index),
            ],
            scratch_shapes=scratch,
        ),
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, n, t, LANES), jnp.float32),
        ],
        compiler_params=_tpu_params(),
        interpret=spec.interpret,
        name="flash_fwd",
    )(q, k, v)
    packed = (stats[..., 0], stats[..., 1], stats[..., 2]) if spec.stats else (stats[..., 0],)
    return o.transpose(0, 2, 1, 3), packed, stats


def _tpu_dq_kernel(
    q_ref, k_ref, v_ref, do_ref, stats_ref, delta_ref, dq_ref, acc_ref, *, spec: Spec
):
    head, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    window = _head_window(spec, head)
    bq, bk = spec.bwd.block_q, spec.bwd.block_k

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    lo, hi = _kv_blocks(spec, i, window, bq, bk)

    @pl.when((lo <= j) & (j < hi))
    def _step():
        k = k_ref[...]
        _, ds = _bwd_tile(
            spec,
            q_ref[...],
            k,
            v_ref[...],
            do_ref[...],
            stats_ref[...][:, :1],
            delta_ref[...],
            i * bq,
            j * bk,
            window,
        )
        acc_ref[...] += jnp.dot(
            ds.astype(k.dtype), k, preferred_element_type=jnp.float32, precision=spec.precision
        )

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _tpu_dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    stats_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    dk_acc_ref,
    dv_acc_ref,
    *,
    spec: Spec,
):
    head, j, i = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    window = _head_window(spec, head)
    bq, bk = spec.bwd.block_q, spec.bwd.block_k

    @pl.when(i == 0)
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    lo, hi = _q_blocks(spec, j, window, bq, bk)

    @pl.when((lo <= i) & (i < hi))
    def _step():
        q, do = q_ref[...], do_ref[...]
        p, ds = _bwd_tile(
            spec,
            q,
            k_ref[...],
            v_ref[...],
            do,
            stats_ref[...][:, :1],
            delta_ref[...],
            i * bq,
            j * bk,
            window,
        )
        dv_acc_ref[...] += _dot_tn(p, do, spec)
        dk_acc_ref[...] += _dot_tn(ds, q, spec)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = dk_acc_ref[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def backward(spec: Spec, q_BTNH, k_BSNH, v_BSNH, do_BTNH, stats_BNT128, delta_BNT):
    q, k, v, do = (x.transpose(0, 2, 1, 3) for x in (q_BTNH, k_BSNH, v_BSNH, do_BTNH))
    b, n, t, h = q.shape
    bq, bk = spec.bwd.block_q, spec.bwd.block_k
    num_q_blocks, num_kv_blocks = spec.q_len_pad // bq, spec.kv_len_pad // bk
    delta = jnp.broadcast_to(delta_BNT[..., None], (b, n, t, LANES))

    def q_major(bi, ni, i, j):
        return bi, ni, i, 0

    def kv_minor(bi, ni, i, j):
        lo, hi = _kv_blocks(spec, i, _head_window(spec, ni), bq, bk)
        return bi, ni, _clamp_block(j, lo, hi), 0

    q_spec, kv_spec = (
        pl.BlockSpec((None, None, bq, h), q_major),
        pl.BlockSpec((None, None, bk, h), kv_minor),
    )
    row_spec = pl.BlockSpec((None, None, bq, LANES), q_major)
    dq = pl.pallas_call(
        functools.partial(_tpu_dq_kernel, spec=spec),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(b, n, num_q_blocks, num_kv_blocks),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_tpu_params(),
        interpret=spec.interpret,
        name="flash_dq",
    )(q, k, v, do, stats_BNT128, delta)

    def kv_major(bi, ni, j, i):
        return bi, ni, j, 0

    def q_minor(bi, ni, j, i):
        lo, hi = _q_blocks(spec, j, _head_window(spec, ni), bq, bk)
        return bi, ni, _clamp_block(i, lo, hi), 0

    q_spec, kv_spec = (
        pl.BlockSpec((None, None, bq, h), q_minor),
        pl.BlockSpec((None, None, bk, h), kv_major),
    )
    row_spec = pl.BlockSpec((None, None, bq, LANES), q_minor)
    dk, dv = pl.pallas_call(
        functools.partial(_tpu_dkv_kernel, spec=spec),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(b, n, num_kv_blocks, num_q_blocks),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32)] * 2,
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        compiler_params=_tpu_params(),
        interpret=spec.interpret,
        name="flash_dkv",
    )(q, k, v, do, stats_BNT128, delta)
    return tuple(x.transpose(0, 2, 1, 3) for x in (dq, dk, dv))
