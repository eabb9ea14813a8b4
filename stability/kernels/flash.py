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
from collections.abc import Sequence
from typing import Any, NamedTuple, get_args

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from stability.kernels import mosaic_gpu, tpu, triton
from stability.kernels.reference import (
    AttentionStats,
    Score,
    resolve_arguments,
)
from stability.kernels.tiles import (
    MGPU_COMPUTE_WGS,
    MGPU_MIN_BLOCK,
    MGPU_SMEM_BYTES,
    MIN_BLOCK,
    Backend,
    Kernel,
    KernelConfig,
    Spec,
)


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


# ---------------------------------------------------------------------------------------
# custom_vjp and the public entry point.
# ---------------------------------------------------------------------------------------

_FORWARD = {"tpu": tpu.forward, "triton": triton.forward, "mosaic_gpu": mosaic_gpu.forward}
_BACKWARD = {"tpu": tpu.backward, "triton": triton.backward, "mosaic_gpu": triton.backward}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec: Spec, q, k, v):
    o, stats, _ = _FORWARD[spec.backend](spec, q, k, v)
    return o, stats


def _flash_fwd(spec: Spec, q, k, v):
    o, stats, lse_residual = _FORWARD[spec.backend](spec, q, k, v)
    return (o, stats), (q, k, v, o, lse_residual)


def _flash_bwd(spec: Spec, residuals, cotangents):
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
    if backend == "mosaic_gpu" and mosaic_gpu.smem_bytes(fwd, h_pad) > MGPU_SMEM_BYTES:
        raise ValueError(
            f"Mosaic GPU forward config {fwd} with head dim {h_pad} needs "
            f"{mosaic_gpu.smem_bytes(fwd, h_pad)} bytes of shared memory; at most {MGPU_SMEM_BYTES}"
        )
    if windows is not None:
        windows = tuple(t_pad if w is None else min(w, t_pad) for w in windows)
    spec = Spec(
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
