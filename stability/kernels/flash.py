"""Pallas flash attention, forward and backward, that also returns attention statistics.

Same signature and results as :func:`stability.kernels.reference.attention`, plus block
sizes and driver choice. Softplus attention runs as softmax over the log-weights
u = α·log softplus(s) (see :func:`~stability.kernels.reference.log_weight`), so both score
kinds share one online normaliser. Per query row the forward keeps, relative to the running
max m of u: l = Σ e^{u−m} and t = Σ e^{u−m}(u−m). When m moves to m', t ← a(t + (m−m')l) and
l ← a·l with a = e^{m−m'}; finally log_norm = m + log l and entropy = log l − t/l, which stays
exact for logits of 1e4 (no large terms cancel). m starts at a finite −1e30 so that
e^{m−m'} is never NaN. Key blocks that no query of a query block can see (past the causal
diagonal, outside the head's window, or padding) are skipped, forward and backward.

The backward (``jax.custom_vjp``) recomputes the weights p = e^{u − log_norm} from the saved
log-normaliser and runs one kernel for dq (looping over key blocks) and one for dk, dv
(looping over query blocks). The statistics carry no gradient.

Drivers:
  * ``"tpu"`` (Mosaic): grid (B, N, query blocks, key blocks) with the reduction axis
    innermost, running state in VMEM scratch, per-row values stored lane-broadcast as
    [..., T, 128]; the statistics come out packed in lanes 0, 1, 2 of one such array.
  * ``"gpu"`` (Triton): grid (query blocks, B, N), a loop over key blocks inside the
    kernel, no scratch; block sizes and the (padded) head dim are powers of two.
On CPU either driver runs in interpret mode (the default there).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from stability.kernels.reference import (
    AttentionStats,
    Score,
    apply_softcap,
    log_weight,
    log_weight_grad,
    resolve_arguments,
    softcap_grad,
)

Backend = Literal["tpu", "gpu"]

LANES = 128  # TPU vector lanes: per-row values are stored broadcast over them
MIN_BLOCK = 16  # smallest block: Triton's dot needs >= 16 rows/cols; bf16 TPU sublane tile
M_INIT = -1e30  # running max before any visible key: finite, so e^{M_INIT - m} is 0, not NaN
DEFAULT_BLOCKS: dict[str, tuple[int, int]] = {"tpu": (128, 128), "gpu": (64, 64)}
_NT = (((1,), (1,)), ((), ()))  # dot_general: a @ b.T
_TN = (((0,), (0,)), ((), ()))  # dot_general: a.T @ b


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static description of one (padded) attention call; hashable for custom_vjp."""

    causal: bool
    windows: tuple[int, ...] | None  # per-head left window (global heads: q_len_pad); None: none
    score: Score
    alpha: float
    softcap: float | None
    scale: float  # logit scale
    q_len: int  # real queries; rows past it are padding
    kv_len: int  # real keys; keys past it are masked
    q_len_pad: int
    kv_len_pad: int
    block_q: int
    block_k: int
    backend: Backend
    interpret: bool
    precision: lax.Precision | None  # HIGHEST for float32 inputs (no TF32 / bf16 passes)

    @property
    def num_q_blocks(self) -> int:
        return self.q_len_pad // self.block_q

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_len_pad // self.block_k


# ---------------------------------------------------------------------------------------
# Shared tile maths (both drivers; `row` arrays are [rows] on GPU, [rows, 128] on TPU).
# ---------------------------------------------------------------------------------------


def _head_window(spec: _Spec, head: jax.Array) -> jax.Array | int | None:
    """Left window of `head` (a traced index), or None when no head has a window."""
    if spec.windows is None:
        return None
    if len(set(spec.windows)) == 1:
        return spec.windows[0]
    # int32 operands throughout: Pallas-Triton mistypes a select between two Python ints.
    w = jnp.int32(spec.windows[0])
    for n, w_n in enumerate(spec.windows[1:], start=1):
        w = jnp.where(head == n, jnp.int32(w_n), w)
    return w


def _kv_blocks(spec: _Spec, q_block: jax.Array, window) -> tuple[jax.Array, jax.Array]:
    """[lo, hi): the key blocks holding a key visible to some query of `q_block`."""
    bq, bk = spec.block_q, spec.block_k
    q0 = q_block * bq
    hi = jnp.int32(pl.cdiv(spec.kv_len, bk))
    if spec.causal:
        hi = jnp.minimum(hi, lax.div(q0 + bq - 1, bk) + 1)
    lo = jnp.int32(0)
    if window is not None:
        lo = lax.div(jnp.maximum(q0 - window + 1, 0), bk)
    if spec.q_len < spec.q_len_pad:  # a query block of padding only needs nothing
        hi = jnp.where(q0 < spec.q_len, hi, lo)
    return lo, hi


def _q_blocks(spec: _Spec, kv_block: jax.Array, window) -> tuple[jax.Array, jax.Array]:
    """[lo, hi): the query blocks holding a query that sees some key of `kv_block`."""
    bq, bk = spec.block_q, spec.block_k
    k0 = kv_block * bk
    lo = lax.div(k0, bq) if spec.causal else jnp.int32(0)
    hi = jnp.int32(pl.cdiv(spec.q_len, bq))
    if window is not None:  # the last query seeing key k0 + bk - 1 is k0 + bk + window - 2
        hi = jnp.minimum(hi, lax.div(k0 + bk + window - 2, bq) + 1)
    if spec.kv_len < spec.kv_len_pad:  # a key block of padding only is seen by nobody
        hi = jnp.where(k0 < spec.kv_len, hi, lo)
    return lo, hi


def _clamp_block(idx: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Block index to fetch at grid step `idx`: skipped steps re-use an in-range block."""
    return jnp.maximum(jnp.minimum(idx, hi - 1), lo)


def _scores(spec: _Spec, q, k, q0, k0, window):
    """Logits s and log-weights u (float32 [bq, bk]) of one tile, and its visibility mask.

    The mask is None when every pair in the tile is visible.
    """
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32, precision=spec.precision)
    s = apply_softcap(s * spec.scale, spec.softcap)
    shape = s.shape
    rows = q0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = k0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    conds = []
    if spec.kv_len < spec.kv_len_pad:
        conds.append(cols < spec.kv_len)
    if spec.causal:
        conds.append(cols <= rows)
    if window is not None:
        conds.append(rows - cols < window)
    mask = functools.reduce(jnp.logical_and, conds) if conds else None
    return s, log_weight(s, spec.score, spec.alpha), mask


def _row_max(x: jax.Array, like: jax.Array) -> jax.Array:
    r = jnp.max(x, axis=1)
    return r if like.ndim == 1 else r[:, None]


def _row_sum(x: jax.Array, like: jax.Array) -> jax.Array:
    r = jnp.sum(x, axis=1)
    return r if like.ndim == 1 else r[:, None]


def _cols(row: jax.Array, n: int) -> jax.Array:
    """A per-row value, [rows] or lane-broadcast [rows, L], broadcastable to [rows, n]."""
    if row.ndim == 1:
        return row[:, None]
    width = row.shape[1]
    if width in (1, n):
        return row
    if n % width == 0:
        return jnp.tile(row, (1, n // width))
    if n < width:
        return row[:, :n]
    return row[:, :1]


class _FwdState(NamedTuple):
    """Online state of a query block; row arrays are relative to the running max m."""

    m: jax.Array  # running max over visible keys of the log-weight u (M_INIT before any)
    l: jax.Array  # Σ e^{u-m}
    t: jax.Array  # Σ e^{u-m} (u-m)
    s_max: jax.Array | None  # running max of the logit s (softplus only; softmax: it is m)
    acc: jax.Array  # [bq, H] Σ e^{u-m} v


def _fwd_init(spec: _Spec, row_shape: tuple[int, ...], head_dim: int) -> _FwdState:
    m = jnp.full(row_shape, M_INIT, jnp.float32)
    zeros = jnp.zeros(row_shape, jnp.float32)
    s_max = m if spec.score == "softplus" else None
    return _FwdState(m, zeros, zeros, s_max, jnp.zeros((row_shape[0], head_dim), jnp.float32))


def _fwd_update(spec: _Spec, state: _FwdState, s, u, mask, v) -> _FwdState:
    """Folds one key tile (logits s, log-weights u, mask, values v) into the state."""
    if mask is not None:
        u = jnp.where(mask, u, -jnp.inf)
    m = jnp.maximum(state.m, _row_max(u, state.m))
    d = u - _cols(m, u.shape[1])  # -inf at masked keys
    p = jnp.exp(d)
    pd = p * d if mask is None else jnp.where(mask, p * d, 0.0)  # guard 0·(-inf)
    a = jnp.exp(state.m - m)
    l = a * state.l + _row_sum(p, state.l)
    t = a * (state.t + (state.m - m) * state.l) + _row_sum(pd, state.t)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=spec.precision)
    acc = _cols(a, state.acc.shape[1]) * state.acc + pv
    s_max = state.s_max
    if s_max is not None:
        s_vis = s if mask is None else jnp.where(mask, s, -jnp.inf)
        s_max = jnp.maximum(s_max, _row_max(s_vis, s_max))
    return _FwdState(m, l, t, s_max, acc)


def _fwd_finish(state: _FwdState):
    """(output [bq, H] float32, log_norm, max_logit, entropy) of a finished query block.

    Rows with no visible key (padding only) give a zero output and finite statistics.
    """
    l = jnp.where(state.l > 0, state.l, 1.0)
    log_l = jnp.log(l)
    o = state.acc / _cols(l, state.acc.shape[1])
    max_logit = state.m if state.s_max is None else state.s_max
    return o, state.m + log_l, max_logit, log_l - state.t / l


def _bwd_tile(spec: _Spec, q, k, v, do, lse, delta, q0, k0, window):
    """Weights p and the cotangent ds of the raw product q·k (float32 [bq, bk]) of a tile.

    lse is the row log-normaliser, delta the row Σ_j p dp = do·o.
    """
    s, u, mask = _scores(spec, q, k, q0, k0, window)
    p = jnp.exp(u - _cols(lse, u.shape[1]))
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32, precision=spec.precision)
    ds = p * (dp - _cols(delta, dp.shape[1]))
    if spec.score != "softmax":
        ds = ds * log_weight_grad(s, spec.score, spec.alpha)
    if spec.softcap is not None:
        ds = ds * softcap_grad(s, spec.softcap)
    return p, ds * spec.scale


def _dot_tn(a, b, spec: _Spec) -> jax.Array:
    """a.T @ b in float32, a cast to b's dtype."""
    return lax.dot_general(
        a.astype(b.dtype), b, _TN, preferred_element_type=jnp.float32, precision=spec.precision
    )


# ---------------------------------------------------------------------------------------
# TPU driver: [B, N, T, H] layout, kv (or q) blocks as the innermost "arbitrary" grid axis.
# ---------------------------------------------------------------------------------------


def _tpu_params() -> pltpu.CompilerParams:
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    )


def _tpu_fwd_kernel(q_ref, k_ref, v_ref, o_ref, stats_ref, *scratch, spec: _Spec):
    m_ref, l_ref, t_ref, acc_ref, *s_max_ref = scratch
    refs = _FwdState(m_ref, l_ref, t_ref, s_max_ref[0] if s_max_ref else None, acc_ref)
    head, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    window = _head_window(spec, head)

    def load() -> _FwdState:
        return _FwdState(*(None if r is None else r[...] for r in refs))

    def store(state: _FwdState):
        for r, x in zip(refs, state, strict=True):
            if r is not None:
                r[...] = x

    @pl.when(j == 0)
    def _init():
        store(_fwd_init(spec, m_ref.shape, acc_ref.shape[1]))

    lo, hi = _kv_blocks(spec, i, window)

    @pl.when((lo <= j) & (j < hi))
    def _step():
        s, u, mask = _scores(
            spec, q_ref[...], k_ref[...], i * spec.block_q, j * spec.block_k, window
        )
        store(_fwd_update(spec, load(), s, u, mask, v_ref[...]))

    @pl.when(j == spec.num_kv_blocks - 1)
    def _finish():
        o, log_norm, max_logit, entropy = _fwd_finish(load())
        o_ref[...] = o.astype(o_ref.dtype)
        lane = lax.broadcasted_iota(jnp.int32, stats_ref.shape, 1)
        stats_ref[...] = jnp.where(lane == 0, log_norm, jnp.where(lane == 1, max_logit, entropy))


def _tpu_forward(spec: _Spec, q_BTNH, k_BSNH, v_BSNH):
    """Returns (o [B, T, N, H], stats, residual = packed stats [B, N, T, 128])."""
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q_BTNH, k_BSNH, v_BSNH))
    b, n, t, h = q.shape
    bq, bk = spec.block_q, spec.block_k

    def q_index(bi, ni, i, j):
        return bi, ni, i, 0

    def kv_index(bi, ni, i, j):
        lo, hi = _kv_blocks(spec, i, _head_window(spec, ni))
        return bi, ni, _clamp_block(j, lo, hi), 0

    row = pltpu.VMEM((bq, LANES), jnp.float32)
    scratch = [row, row, row, pltpu.VMEM((bq, h), jnp.float32)]
    if spec.score == "softplus":
        scratch.append(row)
    o, stats = pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, spec=spec),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(b, n, spec.num_q_blocks, spec.num_kv_blocks),
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
    stats_tuple = AttentionStats(stats[..., 0], stats[..., 1], stats[..., 2])
    return o.transpose(0, 2, 1, 3), stats_tuple, stats


def _tpu_dq_kernel(
    q_ref, k_ref, v_ref, do_ref, stats_ref, delta_ref, dq_ref, acc_ref, *, spec: _Spec
):
    head, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    window = _head_window(spec, head)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    lo, hi = _kv_blocks(spec, i, window)

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
            i * spec.block_q,
            j * spec.block_k,
            window,
        )
        acc_ref[...] += jnp.dot(
            ds.astype(k.dtype), k, preferred_element_type=jnp.float32, precision=spec.precision
        )

    @pl.when(j == spec.num_kv_blocks - 1)
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
    spec: _Spec,
):
    head, j, i = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    window = _head_window(spec, head)

    @pl.when(i == 0)
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    lo, hi = _q_blocks(spec, j, window)

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
            i * spec.block_q,
            j * spec.block_k,
            window,
        )
        dv_acc_ref[...] += _dot_tn(p, do, spec)
        dk_acc_ref[...] += _dot_tn(ds, q, spec)

    @pl.when(i == spec.num_q_blocks - 1)
    def _finish():
        dk_ref[...] = dk_acc_ref[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _tpu_backward(spec: _Spec, q_BTNH, k_BSNH, v_BSNH, do_BTNH, stats_BNT128, delta_BNT):
    q, k, v, do = (x.transpose(0, 2, 1, 3) for x in (q_BTNH, k_BSNH, v_BSNH, do_BTNH))
    b, n, t, h = q.shape
    bq, bk = spec.block_q, spec.block_k
    delta = jnp.broadcast_to(delta_BNT[..., None], (b, n, t, LANES))

    def q_major(bi, ni, i, j):
        return bi, ni, i, 0

    def kv_minor(bi, ni, i, j):
        lo, hi = _kv_blocks(spec, i, _head_window(spec, ni))
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
            grid=(b, n, spec.num_q_blocks, spec.num_kv_blocks),
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
        lo, hi = _q_blocks(spec, j, _head_window(spec, ni))
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
            grid=(b, n, spec.num_kv_blocks, spec.num_q_blocks),
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


# ---------------------------------------------------------------------------------------
# GPU (Triton) driver: [B, T, N, H] layout, grid over one block axis, loop over the other.
# ---------------------------------------------------------------------------------------


def _triton_params(spec: _Spec) -> pltriton.CompilerParams:
    big = spec.block_q * spec.block_k > 64 * 64
    return pltriton.CompilerParams(num_warps=8 if big else 4, num_stages=2)


def _gpu_fwd_kernel(q_ref, k_ref, v_ref, o_ref, ln_ref, mx_ref, ent_ref, *, spec: _Spec):
    i, head = pl.program_id(0), pl.program_id(2)
    window = _head_window(spec, head)
    q = q_ref[...]
    bk = spec.block_k

    def body(j, state):
        k0 = pl.multiple_of(j * bk, bk)
        s, u, mask = _scores(spec, q, k_ref[pl.ds(k0, bk), :], i * spec.block_q, k0, window)
        return _fwd_update(spec, state, s, u, mask, v_ref[pl.ds(k0, bk), :])

    lo, hi = _kv_blocks(spec, i, window)
    state = lax.fori_loop(lo, hi, body, _fwd_init(spec, (q.shape[0],), q.shape[1]))
    o, log_norm, max_logit, entropy = _fwd_finish(state)
    o_ref[...] = o.astype(o_ref.dtype)
    ln_ref[...] = log_norm
    mx_ref[...] = max_logit
    ent_ref[...] = entropy


def _gpu_forward(spec: _Spec, q, k, v):
    """Returns (o [B, T, N, H], stats, residual = log_norm [B, N, T])."""
    b, t, n, h = q.shape
    bq = spec.block_q
    q_spec = pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, i, ni, 0))
    kv_spec = pl.BlockSpec((None, spec.kv_len_pad, None, h), lambda i, bi, ni: (bi, 0, ni, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))
    row = jax.ShapeDtypeStruct((b, n, t), jnp.float32)
    o, *stats = pl.pallas_call(
        functools.partial(_gpu_fwd_kernel, spec=spec),
        grid=(spec.num_q_blocks, b, n),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, row_spec, row_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), row, row, row],
        compiler_params=_triton_params(spec),
        interpret=spec.interpret,
        name="flash_fwd",
    )(q, k, v)
    return o, AttentionStats(*stats), stats[0]


def _gpu_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, spec: _Spec):
    i, head = pl.program_id(0), pl.program_id(2)
    window = _head_window(spec, head)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    bk = spec.block_k

    def body(j, dq):
        k0 = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k0, bk), :]
        _, ds = _bwd_tile(
            spec, q, k, v_ref[pl.ds(k0, bk), :], do, lse, delta, i * spec.block_q, k0, window
        )
        return dq + jnp.dot(
            ds.astype(k.dtype), k, preferred_element_type=jnp.float32, precision=spec.precision
        )

    lo, hi = _kv_blocks(spec, i, window)
    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _gpu_dkv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, spec: _Spec
):
    j, head = pl.program_id(0), pl.program_id(2)
    window = _head_window(spec, head)
    k, v = k_ref[...], v_ref[...]
    bq = spec.block_q

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
            j * spec.block_k,
            window,
        )
        return dk + _dot_tn(ds, q, spec), dv + _dot_tn(p, do, spec)

    lo, hi = _q_blocks(spec, j, window)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(lo, hi, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_backward(spec: _Spec, q, k, v, do, lse_BNT, delta_BNT):
    b, t, n, h = q.shape
    bq, bk = spec.block_q, spec.block_k
    q_block = pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, i, ni, 0))
    row_block = pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))
    kv_full = pl.BlockSpec((None, spec.kv_len_pad, None, h), lambda i, bi, ni: (bi, 0, ni, 0))
    dq = pl.pallas_call(
        functools.partial(_gpu_dq_kernel, spec=spec),
        grid=(spec.num_q_blocks, b, n),
        in_specs=[q_block, kv_full, kv_full, q_block, row_block, row_block],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_triton_params(spec),
        interpret=spec.interpret,
        name="flash_dq",
    )(q, k, v, do, lse_BNT, delta_BNT)

    kv_block = pl.BlockSpec((None, bk, None, h), lambda j, bi, ni: (bi, j, ni, 0))
    q_full = pl.BlockSpec((None, spec.q_len_pad, None, h), lambda j, bi, ni: (bi, 0, ni, 0))
    row_full = pl.BlockSpec((None, None, spec.q_len_pad), lambda j, bi, ni: (bi, ni, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_gpu_dkv_kernel, spec=spec),
        grid=(spec.num_kv_blocks, b, n),
        in_specs=[q_full, kv_block, kv_block, q_full, row_full, row_full],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        compiler_params=_triton_params(spec),
        interpret=spec.interpret,
        name="flash_dkv",
    )(q, k, v, do, lse_BNT, delta_BNT)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------
# custom_vjp and the public entry point.
# ---------------------------------------------------------------------------------------


def _forward(spec: _Spec, q, k, v):
    driver = _tpu_forward if spec.backend == "tpu" else _gpu_forward
    return driver(spec, q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec: _Spec, q, k, v):
    o, stats, _ = _forward(spec, q, k, v)
    return o, stats


def _flash_fwd(spec: _Spec, q, k, v):
    o, stats, lse_residual = _forward(spec, q, k, v)
    return (o, stats), (q, k, v, o, lse_residual)


def _flash_bwd(spec: _Spec, residuals, cotangents):
    q, k, v, o, lse_residual = residuals
    do, _ = cotangents  # the statistics carry no gradient
    delta_BNT = jnp.einsum(
        "BTNH,BTNH->BNT",
        o.astype(jnp.float32),
        do.astype(jnp.float32),
        precision=lax.Precision.HIGHEST,
    )
    driver = _tpu_backward if spec.backend == "tpu" else _gpu_backward
    return driver(spec, q, k, v, do, lse_residual, delta_BNT)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _block_size(name: str, value: int | None, default: int, length: int) -> int:
    """The block actually used: `value` (a power of two >= 16), at most `length` rounded up."""
    if value is None:
        value = default
    elif (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < MIN_BLOCK
        or (value & (value - 1))
    ):
        raise ValueError(f"{name}={value!r}; must be a power of two >= {MIN_BLOCK}")
    return min(value, max(MIN_BLOCK, pl.next_power_of_2(length)))


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def default_backend() -> Backend:
    """The driver for jax's default device: "gpu" on GPUs, else "tpu" (interpreted on CPU)."""
    return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "tpu"


def attention(
    q_BTNH: jax.Array,
    k_BSNH: jax.Array,
    v_BSNH: jax.Array,
    *,
    causal: bool = True,
    window: Sequence[int | None] | None = None,
    score: Score = "softmax",
    alpha: float = 1.0,
    softcap: float | None = None,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    backend: Backend | None = None,
) -> tuple[jax.Array, AttentionStats]:
    """Flash attention with per-query statistics; see reference.attention for the semantics.

    block_q, block_k: query / key block sizes (powers of two >= 16; default per driver,
    capped at the padded sequence length). Sequences are zero-padded internally to a
    multiple of the blocks and padded keys are masked; on the GPU driver the head dim is
    padded to a power of two. interpret: run the kernels in the Pallas interpreter
    (default: True on CPU). backend: "tpu" (Mosaic) or "gpu" (Triton) driver; default from
    jax's default device (the TPU-style driver on CPU).
    """
    windows, scale = resolve_arguments(
        q_BTNH,
        k_BSNH,
        v_BSNH,
        causal=causal,
        window=window,
        score=score,
        alpha=alpha,
        softcap=softcap,
        scale=scale,
    )
    if backend is None:
        backend = default_backend()
    elif backend not in ("tpu", "gpu"):
        raise ValueError(f"backend={backend!r}; valid: 'tpu', 'gpu' or None")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    b, t, n, h = q_BTNH.shape
    s = k_BSNH.shape[1]
    default_q, default_k = DEFAULT_BLOCKS[backend]
    bq = _block_size("block_q", block_q, default_q, t)
    bk = _block_size("block_k", block_k, default_k, s)
    if causal:
        t_pad = s_pad = _round_up(t, max(bq, bk))
    else:
        t_pad, s_pad = _round_up(t, bq), _round_up(s, bk)
    h_pad = max(MIN_BLOCK, pl.next_power_of_2(h)) if backend == "gpu" else h
    if windows is not None:
        windows = tuple(t_pad if w is None else min(w, t_pad) for w in windows)
    spec = _Spec(
        causal=causal,
        windows=windows,
        score=score,
        alpha=float(alpha),
        softcap=softcap,
        scale=scale,
        q_len=t,
        kv_len=s,
        q_len_pad=t_pad,
        kv_len_pad=s_pad,
        block_q=bq,
        block_k=bk,
        backend=backend,
        interpret=bool(interpret),
        precision=lax.Precision.HIGHEST if q_BTNH.dtype == jnp.float32 else None,
    )

    def pad(x, length):
        widths = ((0, 0), (0, length - x.shape[1]), (0, 0), (0, h_pad - h))
        return x if all(w == (0, 0) for w in widths) else jnp.pad(x, widths)

    o_BTNH, stats = _flash(spec, pad(q_BTNH, t_pad), pad(k_BSNH, s_pad), pad(v_BSNH, s_pad))
    stats = AttentionStats(*(lax.stop_gradient(x[..., :t]) for x in stats))
    return o_BTNH[:, :t, :, :h], stats
