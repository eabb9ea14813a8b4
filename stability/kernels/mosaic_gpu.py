"""The Mosaic GPU driver of flash attention (``flash.py``; Hopper and later, bfloat16): a
warp-specialised forward in the FlashAttention-3 style. Per CTA two compute warpgroups own
one query block each (wgmma from shared memory), a third streams key/value blocks through a
ring of shared-memory buffers with TMA; the statistics stay in registers. Its backward is
Triton's (``triton.backward``) on this forward's log-normaliser."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from stability.kernels.tiles import (
    MGPU_COMPUTE_WGS,
    KernelConfig,
    Spec,
    _full_kv_blocks,
    _fwd_finish,
    _fwd_init,
    _fwd_update,
    _head_window,
    _kv_blocks,
    _log_weight_exp_log,
    _tile_logits,
)

# ---------------------------------------------------------------------------------------
# Mosaic GPU driver (Hopper): warp-specialised forward, [B, T, N, H] layout.
# ---------------------------------------------------------------------------------------


def smem_bytes(config: KernelConfig, head_dim: int, itemsize: int = 2) -> int:
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


def forward(spec: Spec, q, k, v):
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
