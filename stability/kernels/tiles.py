"""What every flash-attention driver shares (``flash.py`` dispatches to ``tpu.py``,
``triton.py``, ``mosaic_gpu.py``): the launch parameters (``KernelConfig``), the static
description of one call (``Spec``), which key (query) blocks a query (key) block can see, and
the tile maths of the online normaliser and of the backward (``flash.py``'s docstring gives
the formulas)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from stability.kernels.reference import (
    SOFTPLUS_LINEAR_BELOW,
    Score,
    apply_softcap,
    log_weight,
    log_weight_grad,
    softcap_grad,
)

Backend = Literal["tpu", "triton", "mosaic_gpu"]
Kernel = Literal["fwd", "bwd"]  # "bwd": the dq and the dk, dv kernels (one config for both)


LANES = 128  # TPU vector lanes: per-row values are stored broadcast over them
MIN_BLOCK = 16  # smallest block: Triton's dot needs >= 16 rows/cols; bf16 TPU sublane tile
MGPU_MIN_BLOCK = 64  # Mosaic GPU: wgmma tiles of 64 rows; 128-byte swizzle of 64 bf16 columns
MGPU_COMPUTE_WGS = 2  # Mosaic GPU: compute warpgroups per CTA, one query block each
MGPU_SMEM_BYTES = 227 * 1024  # shared memory one CTA may use on H100 / H200
M_INIT = -1e30  # running max before any visible key: finite, so e^{M_INIT - m} is 0, not NaN
_NT = (((1,), (1,)), ((), ()))  # dot_general: a @ b.T
_TN = (((0,), (0,)), ((), ()))  # dot_general: a.T @ b


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one kernel; a driver ignores the fields it has no use for.

    block_q, block_k: queries / keys per block (powers of two; on Mosaic GPU block_q is per
    compute warpgroup, so one CTA covers 2·block_q queries). num_warps, num_stages: Triton's
    warps per program and software-pipelining depth. max_concurrent_steps: Mosaic GPU's
    key/value ring depth (TMA copies in flight).
    """

    block_q: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    max_concurrent_steps: int = 2


@dataclasses.dataclass(frozen=True)
class Spec:
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
    fwd: KernelConfig
    bwd: KernelConfig
    backend: Backend
    interpret: Any  # False, True, or a Pallas interpret-params object
    precision: lax.Precision | None  # HIGHEST for float32 inputs (no TF32 / bf16 passes)
    stats: bool = True  # compute max_logit and entropy (log_norm always: the backward needs it)


# ---------------------------------------------------------------------------------------
# Shared tile maths (every driver; `row` arrays are [rows] on GPU, [rows, 128] on TPU).
# ---------------------------------------------------------------------------------------


def _head_window(spec: Spec, head: jax.Array) -> jax.Array | int | None:
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


def _kv_blocks(
    spec: Spec, q_block: jax.Array, window, bq: int, bk: int
) -> tuple[jax.Array, jax.Array]:
    """[lo, hi): the key blocks holding a key visible to some query of `q_block`."""
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


def _q_blocks(
    spec: Spec, kv_block: jax.Array, window, bq: int, bk: int
) -> tuple[jax.Array, jax.Array]:
    """[lo, hi): the query blocks holding a query that sees some key of `kv_block`."""
    k0 = kv_block * bk
    lo = lax.div(k0, bq) if spec.causal else jnp.int32(0)
    hi = jnp.int32(pl.cdiv(spec.q_len, bq))
    if window is not None:  # the last query seeing key k0 + bk - 1 is k0 + bk + window - 2
        hi = jnp.minimum(hi, lax.div(k0 + bk + window - 2, bq) + 1)
    if spec.kv_len < spec.kv_len_pad:  # a key block of padding only is seen by nobody
        hi = jnp.where(k0 < spec.kv_len, hi, lo)
    return lo, hi


def _full_kv_blocks(
    spec: Spec, q_block: jax.Array, window, bq: int, bk: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(lo, full_lo, full_hi, hi): [lo, hi) as in :func:`_kv_blocks`; every (real query,
    key) pair of the blocks in [full_lo, full_hi) is visible, so they need no mask."""
    lo, hi = _kv_blocks(spec, q_block, window, bq, bk)
    q0 = q_block * bq
    full_hi = jnp.int32(spec.kv_len // bk)  # blocks without padded keys
    if spec.causal:  # the block's last key k0 + bk - 1 <= q0
        full_hi = jnp.minimum(full_hi, lax.div(q0 + 1, bk))
    full_lo = lo
    if window is not None:  # the farthest pair q0 + bq - 1 - k0 < window
        full_lo = jnp.maximum(lo, lax.div(jnp.maximum(q0 + bq - window, 0) + bk - 1, bk))
    full_lo = jnp.minimum(full_lo, hi)
    return lo, full_lo, jnp.clip(full_hi, full_lo, hi), hi


def _clamp_block(idx: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Block index to fetch at grid step `idx`: skipped steps re-use an in-range block."""
    return jnp.maximum(jnp.minimum(idx, hi - 1), lo)


def _log1p(x: jax.Array) -> jax.Array:
    """log(1 + x) to float32 accuracy from log alone (Mosaic GPU has no log1p lowering)."""
    y = 1.0 + x
    return jnp.where(y == 1.0, x, jnp.log(y) * (x / (y - 1.0)))


def _log_weight_exp_log(s: jax.Array, score: Score, alpha: float) -> jax.Array:
    """:func:`~stability.kernels.reference.log_weight` written with exp and log only."""
    if score == "softmax":
        return s
    linear = s < SOFTPLUS_LINEAR_BELOW
    s_hi = jnp.where(linear, SOFTPLUS_LINEAR_BELOW, s)
    softplus = jnp.maximum(s_hi, 0.0) + _log1p(jnp.exp(-jnp.abs(s_hi)))
    return alpha * jnp.where(linear, s, jnp.log(softplus))


def _tile_logits(
    spec: Spec,
    qk: jax.Array,
    q0,
    k0,
    window,
    *,
    masked: bool = True,
    iota: Callable = lax.broadcasted_iota,
    weight: Callable = log_weight,
):
    """Logits s and log-weights u (float32 [bq, bk]) of one tile from its raw product q·k,
    and its visibility mask (None when `masked` is False or every pair is visible)."""
    s = apply_softcap(qk * spec.scale, spec.softcap)
    shape = s.shape
    rows = q0 + iota(jnp.int32, shape, 0)
    cols = k0 + iota(jnp.int32, shape, 1)
    conds = []
    if masked and spec.kv_len < spec.kv_len_pad:
        conds.append(cols < spec.kv_len)
    if masked and spec.causal:
        conds.append(cols <= rows)
    if masked and window is not None:
        conds.append(rows - cols < window)
    mask = functools.reduce(jnp.logical_and, conds) if conds else None
    return s, weight(s, spec.score, spec.alpha), mask


def _scores(spec: Spec, q, k, q0, k0, window):
    """:func:`_tile_logits` of the tile of queries q and keys k."""
    qk = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32, precision=spec.precision)
    return _tile_logits(spec, qk, q0, k0, window)


def _row_max(x: jax.Array, like: jax.Array) -> jax.Array:
    r = jnp.max(x, axis=1)
    return r if like.ndim == 1 else r[:, None]


def _row_sum(x: jax.Array, like: jax.Array) -> jax.Array:
    r = jnp.sum(x, axis=1)
    return r if like.ndim == 1 else r[:, None]


def _cols(row: jax.Array, n: int) -> jax.Array:
    """A per-row value, [rows] or lane-broadcast [rows, L], broadcast to [rows, n] (or a
    shape that broadcasts to it)."""
    if row.ndim == 1:
        return lax.broadcast_in_dim(row, (row.shape[0], n), (0,))
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
    t: jax.Array | None  # Σ e^{u-m} (u-m) (None: statistics off)
    s_max: jax.Array | None  # running max of the logit s (softplus with stats; softmax: m)
    acc: jax.Array  # [bq, H] Σ e^{u-m} v


def _fwd_init(spec: Spec, row: Callable[[float], jax.Array], acc: jax.Array) -> _FwdState:
    """Initial state; row(x) makes a per-row array filled with x, acc is zeros [bq, H]."""
    t = row(0.0) if spec.stats else None
    s_max = row(M_INIT) if spec.stats and spec.score == "softplus" else None
    return _FwdState(row(M_INIT), row(0.0), t, s_max, acc)


def _fwd_update(spec: Spec, state: _FwdState, s, u, mask, pv: Callable) -> _FwdState:
    """Folds one key tile (logits s, log-weights u, mask) into the state; pv(p) returns the
    float32 product of the tile's weights p with its values."""
    if mask is not None:
        u = jnp.where(mask, u, -jnp.inf)
    m = jnp.maximum(state.m, _row_max(u, state.m))
    d = u - _cols(m, u.shape[1])  # -inf at masked keys
    p = jnp.exp(d)
    a = jnp.exp(state.m - m)
    l = a * state.l + _row_sum(p, state.l)
    t = state.t
    if t is not None:
        pd = p * d if mask is None else jnp.where(mask, p * d, 0.0)  # guard 0·(-inf)
        t = a * (t + (state.m - m) * state.l) + _row_sum(pd, t)
    s_max = state.s_max
    if s_max is not None:
        s_vis = s if mask is None else jnp.where(mask, s, -jnp.inf)
        s_max = jnp.maximum(s_max, _row_max(s_vis, s_max))
    acc = _cols(a, state.acc.shape[1]) * state.acc + pv(p)
    return _FwdState(m, l, t, s_max, acc)


def _fwd_finish(state: _FwdState):
    """(output [bq, H] float32, log_norm, max_logit, entropy) of a finished query block;
    max_logit and entropy are None when the statistics are off.

    Rows with no visible key (padding only) give a zero output and finite statistics.
    """
    l = jnp.where(state.l > 0, state.l, 1.0)
    log_l = jnp.log(l)
    o = state.acc / _cols(l, state.acc.shape[1])
    if state.t is None:
        return o, state.m + log_l, None, None
    max_logit = state.m if state.s_max is None else state.s_max
    return o, state.m + log_l, max_logit, log_l - state.t / l


def _tile_pv(spec: Spec, v: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """pv for :func:`_fwd_update` on a value tile held in registers / VMEM."""

    def pv(p):
        return jnp.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=spec.precision
        )

    return pv


def _bwd_tile(spec: Spec, q, k, v, do, lse, delta, q0, k0, window):
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


def _dot_tn(a, b, spec: Spec) -> jax.Array:
    """a.T @ b in float32, a cast to b's dtype."""
    return lax.dot_general(
        a.astype(b.dtype), b, _TN, preferred_element_type=jnp.float32, precision=spec.precision
    )
