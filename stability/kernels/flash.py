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

Drivers (``default_backend`` picks one from the device):
  * ``"tpu"`` (Mosaic TPU): grid (B, N, query blocks, key blocks) with the reduction axis
    innermost, running state in VMEM scratch, per-row values stored lane-broadcast as
    [..., T, 128]; the statistics come out packed in lanes 0, 1, 2 of one such array.
  * ``"triton"`` (GPUs before Hopper, and float32 inputs on any GPU): grid (query blocks,
    B, N), a loop over key blocks inside the kernel, no scratch; block sizes and the
    (padded) head dim are powers of two.
  * ``"mosaic_gpu"`` (Hopper and later, compute capability >= 9.0, bfloat16): a
    warp-specialised forward in the FlashAttention-3 style: per CTA two compute
    warpgroups own one query block each (wgmma from shared memory), a third warpgroup
    streams key/value blocks through a ring of shared-memory buffers with TMA; the
    statistics stay in registers. Its backward runs the Triton dq / dk,dv kernels on the
    forward's log-normaliser.
On CPU every driver runs in interpret mode (the default there; Mosaic GPU through Pallas's
GPU interpreter). Block sizes, warps and stages come from ``TUNED`` (written by
``benchmarks/attention.py --tune``) unless given; ``stats=False`` computes only what the
backward needs (for timing the statistics' cost side by side).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from stability.kernels.reference import (
    SOFTPLUS_LINEAR_BELOW,
    AttentionStats,
    Score,
    apply_softcap,
    log_weight,
    log_weight_grad,
    resolve_arguments,
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


class TuneKey(NamedTuple):
    """The calls a ``TUNED`` entry serves; a None field matches any value."""

    backend: Backend
    kernel: Kernel
    dtype: str | None = None  # "bfloat16" | "float32"
    head_dim: int | None = None  # padded head dim the kernel sees
    causal: bool | None = None
    windowed: bool | None = None  # some head has a window
    seq_len: int | None = None  # T the entry was measured at; serves the nearest T (log scale)


# BEGIN TUNED (rewritten by `python benchmarks/attention.py --apply-tune FILE`)
TUNED_ON: str | None = None  # device the entries were measured on; None: untuned defaults
TUNED: dict[TuneKey, KernelConfig] = {
    TuneKey("tpu", "fwd"): KernelConfig(128, 128),
    TuneKey("tpu", "bwd"): KernelConfig(128, 128),
    TuneKey("triton", "fwd"): KernelConfig(64, 64, num_warps=4, num_stages=2),
    TuneKey("triton", "bwd"): KernelConfig(64, 64, num_warps=4, num_stages=2),
    TuneKey("mosaic_gpu", "fwd"): KernelConfig(64, 128, max_concurrent_steps=2),
    TuneKey("mosaic_gpu", "bwd"): KernelConfig(64, 64, num_warps=4, num_stages=2),
}
# END TUNED


def tuned_config(
    backend: Backend,
    kernel: Kernel,
    *,
    dtype: str,
    head_dim: int,
    causal: bool,
    windowed: bool,
    seq_len: int,
) -> KernelConfig:
    """The ``TUNED`` entry for a call: the most specific matching key, then the nearest T."""
    call = dict(dtype=dtype, head_dim=head_dim, causal=causal, windowed=windowed)
    ranked = []
    for key, config in TUNED.items():
        if (key.backend, key.kernel) != (backend, kernel) or any(
            getattr(key, f) not in (None, v) for f, v in call.items()
        ):
            continue
        specific = sum(getattr(key, f) is not None for f in call)
        distance = math.inf if key.seq_len is None else abs(math.log2(key.seq_len / seq_len))
        ranked.append(((-specific, distance), config))
    if not ranked:
        raise ValueError(f"TUNED has no entry for backend={backend!r}, kernel={kernel!r}")
    return min(ranked, key=lambda r: r[0])[1]


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
    fwd: KernelConfig
    bwd: KernelConfig
    backend: Backend
    interpret: Any  # False, True, or a Pallas interpret-params object
    precision: lax.Precision | None  # HIGHEST for float32 inputs (no TF32 / bf16 passes)
    stats: bool = True  # compute max_logit and entropy (log_norm always: the backward needs it)


# ---------------------------------------------------------------------------------------
# Shared tile maths (every driver; `row` arrays are [rows] on GPU, [rows, 128] on TPU).
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


def _kv_blocks(
    spec: _Spec, q_block: jax.Array, window, bq: int, bk: int
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
    spec: _Spec, kv_block: jax.Array, window, bq: int, bk: int
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
    spec: _Spec, q_block: jax.Array, window, bq: int, bk: int
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
    spec: _Spec,
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


def _scores(spec: _Spec, q, k, q0, k0, window):
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


def _fwd_init(spec: _Spec, row: Callable[[float], jax.Array], acc: jax.Array) -> _FwdState:
    """Initial state; row(x) makes a per-row array filled with x, acc is zeros [bq, H]."""
    t = row(0.0) if spec.stats else None
    s_max = row(M_INIT) if spec.stats and spec.score == "softplus" else None
    return _FwdState(row(M_INIT), row(0.0), t, s_max, acc)


def _fwd_update(spec: _Spec, state: _FwdState, s, u, mask, pv: Callable) -> _FwdState:
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


def _tile_pv(spec: _Spec, v: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """pv for :func:`_fwd_update` on a value tile held in registers / VMEM."""

    def pv(p):
        return jnp.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=spec.precision
        )

    return pv


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


def _tpu_forward(spec: _Spec, q_BTNH, k_BSNH, v_BSNH):
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
    q_ref, k_ref, v_ref, do_ref, stats_ref, delta_ref, dq_ref, acc_ref, *, spec: _Spec
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
    spec: _Spec,
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


def _tpu_backward(spec: _Spec, q_BTNH, k_BSNH, v_BSNH, do_BTNH, stats_BNT128, delta_BNT):
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


# ---------------------------------------------------------------------------------------
# Triton driver: [B, T, N, H] layout, grid over one block axis, loop over the other.
# ---------------------------------------------------------------------------------------


def _triton_params(config: KernelConfig) -> pltriton.CompilerParams:
    return pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _gpu_fwd_kernel(q_ref, k_ref, v_ref, o_ref, *stat_refs, spec: _Spec):
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


def _gpu_forward(spec: _Spec, q, k, v):
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


def _gpu_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, spec: _Spec):
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


def _gpu_dkv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, spec: _Spec
):
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


def _gpu_backward(spec: _Spec, q, k, v, do, lse_BNT, delta_BNT):
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


# ---------------------------------------------------------------------------------------
# Mosaic GPU driver (Hopper): warp-specialised forward, [B, T, N, H] layout.
# ---------------------------------------------------------------------------------------


def mgpu_smem_bytes(config: KernelConfig, head_dim: int, itemsize: int = 2) -> int:
    """Shared memory of one Mosaic GPU forward CTA: q/o tiles, the k/v ring, statistics, and
    4 KiB for barriers and alignment (the lowering rejects a config 1.1 KiB over the limit
    that the first three terms alone would admit)."""
    wgs = MGPU_COMPUTE_WGS
    tiles = wgs * config.block_q + 2 * config.max_concurrent_steps * config.block_k
    return tiles * head_dim * itemsize + 3 * wgs * config.block_q * 4 + 4096


def _mgpu_interpret(interpret: Any) -> Any:
    """plgpu.kernel's `interpret`: True becomes Pallas's GPU interpreter (CPU), False None."""
    if interpret is True:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        return InterpretGPUParams()
    return interpret or None


def _mgpu_forward(spec: _Spec, q, k, v):
    """Returns (o [B, T, N, H], stats, residual = log_norm [B, N, T]).

    Grid (N, query tiles, B); per CTA three warpgroups: 0 and 1 each own a query block of
    block_q rows (tile = 2·block_q), 2 streams key/value blocks into a ring of
    max_concurrent_steps shared-memory slots. Both compute warpgroups walk the union of
    their key ranges in step with the stream; a step outside a warpgroup's own range only
    waits and releases its slot, and the blocks its queries see completely skip the mask.
    A schedule barrier alternates the two warpgroups' softmax with the other's wgmma.
    """
    b, t, n, h = q.shape
    cfg, wgs = spec.fwd, MGPU_COMPUTE_WGS
    bq, bk, ring = cfg.block_q, cfg.block_k, cfg.max_concurrent_steps
    dtype = q.dtype
    num_stats = 3 if spec.stats else 1
    interpret = _mgpu_interpret(spec.interpret)
    # Register layouts are hints for the compiler; Pallas's GPU interpreter has no rule for
    # them, so interpreted kernels leave them out (same values, no other difference).
    wgmma_layout = plgpu.Layout.WGMMA

    def layout_cast(x: jax.Array, layout) -> jax.Array:
        return x if interpret else plgpu.layout_cast(x, layout)

    if interpret:
        iota = lax.broadcasted_iota
    else:
        iota = functools.partial(plgpu.broadcasted_iota, layout=wgmma_layout)

    def kernel(q_ref, k_ref, v_ref, o_ref, *refs):
        stat_refs = refs[:num_stats]
        qo_smem, k_smem, v_smem, stat_smem, k_bar, v_bar, q_bar, k_used, v_used, sched = refs[
            num_stats:
        ]
        batch, head, tile = (lax.axis_index(a) for a in ("batch", "heads", "q_seq"))
        wg = lax.axis_index("wg")
        window = _head_window(spec, head)
        ranges = [_kv_blocks(spec, tile * wgs + w, window, bq, bk) for w in range(wgs)]
        first = functools.reduce(jnp.minimum, [lo for lo, _ in ranges])  # the streamed blocks
        last = functools.reduce(jnp.maximum, [hi for _, hi in ranges])

        def schedule_barrier():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        def slot_of(j):
            return lax.rem(j - first, jnp.int32(ring))

        @pl.when(wg < wgs)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            qo = qo_smem.at[wg]
            q_block = tile * wgs + wg
            q0 = q_block * bq
            lo, full_lo, full_hi, hi = _full_kv_blocks(spec, q_block, window, bq, bk)
            plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q0, bq), head], qo, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])

            def row(x):
                return layout_cast(jnp.full((bq,), x, jnp.float32), wgmma_layout.reduce(1))

            acc = layout_cast(jnp.zeros((bq, h), jnp.float32), wgmma_layout)
            state = _fwd_init(spec, row, acc)

            def skip(j, state):
                slot = slot_of(j)
                plgpu.barrier_wait(k_bar.at[slot])
                schedule_barrier()
                plgpu.barrier_arrive(k_used.at[slot])
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_wait(sched)
                plgpu.barrier_arrive(v_used.at[slot])
                return state

            def visit(j, state, *, masked: bool):
                slot = slot_of(j)
                plgpu.barrier_wait(k_bar.at[slot])

                def qk_product(acc_ref):
                    plgpu.wgmma(acc_ref, qo, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    schedule_barrier()
                    return acc_ref[...]

                qk = pl.run_scoped(qk_product, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(k_used.at[slot])
                s, u, mask = _tile_logits(
                    spec,
                    qk,
                    q0,
                    j * bk,
                    window,
                    masked=masked,
                    iota=iota,
                    weight=_log_weight_exp_log,
                )

                def pv(p):
                    p = p.astype(dtype)
                    plgpu.barrier_arrive(sched)  # softmax done: the other warpgroup's turn
                    plgpu.barrier_wait(v_bar.at[slot])
                    plgpu.barrier_wait(sched)

                    def product(acc_ref):
                        plgpu.wgmma(acc_ref, p, v_smem.at[slot])
                        return acc_ref[...]

                    return pl.run_scoped(product, plgpu.ACC((bq, h), jnp.float32))

                state = _fwd_update(spec, state, s, u, mask, pv)
                plgpu.barrier_arrive(v_used.at[slot])
                return state

            masked = functools.partial(visit, masked=True)
            pl.when(wg == 1)(schedule_barrier)
            state = lax.fori_loop(first, lo, skip, state)
            state = lax.fori_loop(lo, full_lo, masked, state)
            state = lax.fori_loop(full_lo, full_hi, functools.partial(visit, masked=False), state)
            state = lax.fori_loop(full_hi, hi, masked, state)
            state = lax.fori_loop(hi, last, skip, state)
            pl.when(wg == 0)(schedule_barrier)

            o, *stats = _fwd_finish(state)
            qo[...] = o.astype(dtype)
            for i, x in enumerate(stats[:num_stats]):
                stat_smem.at[i, wg][...] = x
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo, o_ref.at[batch, pl.ds(q0, bq), head])
            for i, ref in enumerate(stat_refs):
                plgpu.copy_smem_to_gmem(stat_smem.at[i, wg], ref.at[batch, head, pl.ds(q0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == wgs)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def fetch(src_ref, dst_smem, barrier, j):
                slot = slot_of(j)
                src = src_ref.at[batch, pl.ds(j * bk, bk), head]
                plgpu.copy_gmem_to_smem(src, dst_smem.at[slot], barrier.at[slot])

            def prologue(j):
                fetch(k_ref, k_smem, k_bar, j)
                fetch(v_ref, v_smem, v_bar, j)

            for i in range(ring):
                pl.when(first + i < last)(functools.partial(prologue, first + i))

            @pl.loop(first + ring, last)
            def _stream(j):
                slot = slot_of(j)
                plgpu.barrier_wait(k_used.at[slot])
                fetch(k_ref, k_smem, k_bar, j)
                plgpu.barrier_wait(v_used.at[slot])
                fetch(v_ref, v_smem, v_bar, j)

            @pl.loop(jnp.maximum(first, last - ring), last)
            def _drain(j):  # the last blocks' release: no barrier phase goes unobserved
                plgpu.barrier_wait(k_used.at[slot_of(j)])
                plgpu.barrier_wait(v_used.at[slot_of(j)])

    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    row = jax.ShapeDtypeStruct((b, n, t), jnp.float32)
    o, *stats = plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct(q.shape, dtype)] + [row] * num_stats,
        scratch_types=[
            plgpu.SMEM((wgs, bq, h), dtype, transforms=transforms),
            plgpu.SMEM((ring, bk, h), dtype, transforms=transforms),
            plgpu.SMEM((ring, bk, h), dtype, transforms=transforms),
            plgpu.SMEM((num_stats, wgs, bq), jnp.float32),
            plgpu.Barrier(num_barriers=ring),
            plgpu.Barrier(num_barriers=ring),
            plgpu.Barrier(num_barriers=wgs),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=ring),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=ring),
            plgpu.Barrier(num_arrivals=wgs),
        ],
        grid=(n, spec.q_len_pad // (wgs * bq), b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(q, k, v)
    return o, tuple(stats), stats[0]


# ---------------------------------------------------------------------------------------
# custom_vjp and the public entry point.
# ---------------------------------------------------------------------------------------

_FORWARD = {"tpu": _tpu_forward, "triton": _gpu_forward, "mosaic_gpu": _mgpu_forward}
_BACKWARD = {"tpu": _tpu_backward, "triton": _gpu_backward, "mosaic_gpu": _gpu_backward}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec: _Spec, q, k, v):
    o, stats, _ = _FORWARD[spec.backend](spec, q, k, v)
    return o, stats


def _flash_fwd(spec: _Spec, q, k, v):
    o, stats, lse_residual = _FORWARD[spec.backend](spec, q, k, v)
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
    return _BACKWARD[spec.backend](spec, q, k, v, do, lse_residual, delta_BNT)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _block_size(name: str, value: int, length: int, minimum: int) -> int:
    """The block actually used: `value` (a power of two >= minimum), at most `length`
    rounded up to a power of two (and at least minimum)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (value & (value - 1))
    ):
        raise ValueError(f"{name}={value!r}; must be a power of two >= {minimum}")
    return min(value, max(minimum, pl.next_power_of_2(length)))


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def default_backend(dtype: Any = jnp.bfloat16) -> Backend:
    """The driver for jax's default device and `dtype`: Mosaic GPU on Hopper (compute
    capability 9.x) for bfloat16, Triton on other GPUs and for float32 (wgmma would round
    float32 to TF32), the TPU driver elsewhere (interpreted on CPU)."""
    if jax.default_backend() not in ("gpu", "cuda", "rocm"):
        return "tpu"
    capability = getattr(jax.devices()[0], "compute_capability", None)
    hopper = capability is not None and 9.0 <= float(capability) < 10.0
    return "mosaic_gpu" if hopper and jnp.dtype(dtype) == jnp.bfloat16 else "triton"


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
    interpret: Any = None,
    backend: Backend | None = None,
    stats: bool = True,
) -> tuple[jax.Array, AttentionStats | None]:
    """Flash attention with per-query statistics; see reference.attention for the semantics.

    block_q, block_k: query / key block sizes of every kernel of the call (powers of two,
    >= 16; >= 64 on Mosaic GPU, whose block_q is per warpgroup); default from ``TUNED``,
    capped at the padded sequence length. Sequences are zero-padded internally to a
    multiple of the blocks and padded keys are masked; on GPU the head dim is padded to a
    power of two (>= 64 on Mosaic GPU). interpret: run the kernels in the Pallas
    interpreter (default: True on CPU), or a Pallas interpret-params object (e.g.
    ``pltpu.InterpretParams(detect_races=True)`` for the TPU driver). backend: "tpu",
    "triton" or "mosaic_gpu"; default :func:`default_backend`. stats: False skips the
    max-logit and entropy work (same output and gradients) and returns None for them.
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
    dtype = jnp.dtype(q_BTNH.dtype)
    if backend is None:
        backend = default_backend(dtype)
    elif backend not in get_args(Backend):
        raise ValueError(f"backend={backend!r}; valid: {get_args(Backend)} or None")
    if backend == "mosaic_gpu" and dtype != jnp.bfloat16:
        raise ValueError(f"backend='mosaic_gpu' needs bfloat16 inputs; got dtype={dtype}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    b, t, n, h = q_BTNH.shape
    s = k_BSNH.shape[1]
    if backend == "tpu":
        h_pad = h
    else:
        h_pad = max(MGPU_MIN_BLOCK if backend == "mosaic_gpu" else MIN_BLOCK, pl.next_power_of_2(h))
    key = dict(
        dtype=dtype.name, head_dim=h_pad, causal=causal, windowed=windows is not None, seq_len=t
    )
    configs = {}
    for kernel in get_args(Kernel):
        config = tuned_config(backend, kernel, **key)
        minimum = MGPU_MIN_BLOCK if (backend, kernel) == ("mosaic_gpu", "fwd") else MIN_BLOCK
        configs[kernel] = dataclasses.replace(
            config,
            block_q=_block_size(
                "block_q", config.block_q if block_q is None else block_q, t, minimum
            ),
            block_k=_block_size(
                "block_k", config.block_k if block_k is None else block_k, s, minimum
            ),
        )
    fwd, bwd = configs["fwd"], configs["bwd"]
    fwd_rows = fwd.block_q * (MGPU_COMPUTE_WGS if backend == "mosaic_gpu" else 1)
    if causal:
        t_pad = s_pad = _round_up(t, max(fwd_rows, bwd.block_q, fwd.block_k, bwd.block_k))
    else:
        t_pad = _round_up(t, max(fwd_rows, bwd.block_q))
        s_pad = _round_up(s, max(fwd.block_k, bwd.block_k))
    if backend == "mosaic_gpu" and mgpu_smem_bytes(fwd, h_pad) > MGPU_SMEM_BYTES:
        raise ValueError(
            f"Mosaic GPU forward config {fwd} with head dim {h_pad} needs "
            f"{mgpu_smem_bytes(fwd, h_pad)} bytes of shared memory; at most {MGPU_SMEM_BYTES}"
        )
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
        fwd=fwd,
        bwd=bwd,
        backend=backend,
        interpret=interpret,
        precision=lax.Precision.HIGHEST if dtype == jnp.float32 else None,
        stats=bool(stats),
    )

    def pad(x, length):
        widths = ((0, 0), (0, length - x.shape[1]), (0, 0), (0, h_pad - h))
        return x if all(w == (0, 0) for w in widths) else jnp.pad(x, widths)

    o_BTNH, row_stats = _flash(spec, pad(q_BTNH, t_pad), pad(k_BSNH, s_pad), pad(v_BSNH, s_pad))
    o_BTNH = o_BTNH[:, :t, :, :h]
    if not stats:
        return o_BTNH, None
    return o_BTNH, AttentionStats(*(lax.stop_gradient(x[..., :t]) for x in row_stats))
