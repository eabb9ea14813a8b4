"""Attention kernel benchmark: this repo's Pallas flash kernel against the alternatives.

Implementations: ``pallas`` (stability.kernels.flash, statistics included), ``xla`` and
``cudnn`` (``jax.nn.dot_product_attention``), ``jax-triton`` (jax's own Triton flash kernel,
``jax.experimental.pallas.ops.gpu.attention.mha``; causal only, no window). Default grid:
B=8, N=16, H=128, bf16, T in {1k, 2k, 4k, 8k}, causal and causal+window, forward and
forward+backward. Per row: time (ms), TFLOP/s (visible (query, key) pairs only: 4·B·N·H per
pair forward, 3.5× that for forward+backward), memory (XLA's buffer analysis of the compiled
program: arguments + outputs + temporaries), the device's high-water mark where
``memory_stats`` exists, and the max error against the float32 reference (batch element 0),
relative to the reference's max magnitude (forward: output; backward: worst of dq, dk, dv).
An implementation that is unavailable or fails is a row with the reason, not a crash.

    python benchmarks/attention.py                  # the full grid (a GPU; < 5 min on H200)
    python benchmarks/attention.py --quick          # tiny shapes, CPU interpret mode, < 1 min
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from stability.kernels import flash, reference

IMPLS = ("pallas", "xla", "cudnn", "jax-triton")
MODES = ("fwd", "fwd+bwd")
MASKS = ("causal", "window")


def visible_pairs(t: int, window: int | None) -> int:
    """Number of visible (query, key) pairs of causal attention with a left window."""
    if window is None or window >= t:
        return t * (t + 1) // 2
    return window * (window + 1) // 2 + (t - window) * window


def make_attention(impl: str, *, window: int | None, blocks, interpret: bool):
    """(q, k, v) -> output [B, T, N, H] for one implementation (causal, optional window)."""
    if impl == "pallas":
        block_q, block_k = blocks or (None, None)

        def f(q, k, v):
            n = q.shape[2]
            o, _ = flash.attention(
                q,
                k,
                v,
                window=None if window is None else (window,) * n,
                block_q=block_q,
                block_k=block_k,
                interpret=interpret,
            )
            return o

        return f
    if impl in ("xla", "cudnn"):
        local = None if window is None else (window - 1, 0)
        return functools.partial(
            jax.nn.dot_product_attention,
            is_causal=True,
            local_window_size=local,
            implementation=impl,
        )
    if impl == "jax-triton":
        if window is not None:
            raise NotImplementedError("jax's Triton flash kernel has no sliding window")
        from jax.experimental.pallas.ops.gpu import attention as jax_triton

        def f(q, k, v):
            scale = 1.0 / math.sqrt(q.shape[-1])
            return jax_triton.mha(
                q, k, v, segment_ids=None, sm_scale=scale, causal=True, interpret=interpret
            )

        return f
    raise ValueError(f"impl={impl!r}; valid: {IMPLS}")


def with_grad(attention, do):
    """(q, k, v) -> (dq, dk, dv) of Σ output·do."""

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v).astype(jnp.float32) * do)

    return jax.grad(loss, argnums=(0, 1, 2))


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def time_call(fn, args, min_seconds: float, max_iters: int) -> float:
    """Seconds per call: one timed call sizes the loop, then the mean of back-to-back calls."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = time.perf_counter() - start
    iters = int(min(max_iters, max(1, min_seconds / max(once, 1e-9))))
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def device_peak_gb() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 1e9


def program_memory_gb(compiled) -> float | None:
    try:
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        return (total - m.alias_size_in_bytes) / 1e9
    except Exception:  # not every backend reports it
        return None


def reference_results(q, k, v, do, window):
    """Float32 reference output and (dq, dk, dv) on batch element 0 (or None)."""
    q0, k0, v0 = (x[:1].astype(jnp.float32) for x in (q, k, v))
    n = q.shape[2]
    win = None if window is None else (window,) * n

    def out(q, k, v):
        return reference.attention(q, k, v, window=win)[0]

    o = jax.jit(out)(q0, k0, v0)
    grads = jax.jit(with_grad(out, do[:1]))(q0, k0, v0)
    return o, grads


def bench_row(impl, mode, mask, t, args, ref, settings):
    """One table row: a dict with timings and errors, or with `skipped` giving the reason."""
    b, n, h, window = settings["B"], settings["N"], settings["H"], settings["window"]
    q, k, v, do = args
    row = dict(impl=impl, mode=mode, mask=mask, T=t, B=b, N=n, H=h, dtype=str(q.dtype))
    win = window if mask == "window" else None
    row["window"] = win
    name, _, blocks = impl.partition("[")
    blocks = tuple(int(x) for x in blocks.rstrip("]").split("x")) if blocks else None
    try:
        attention = make_attention(name, window=win, blocks=blocks, interpret=settings["interpret"])
        fn = attention if mode == "fwd" else with_grad(attention, do)
        compiled = jax.jit(fn).trace(q, k, v).lower().compile()
        seconds = time_call(compiled, (q, k, v), settings["min_seconds"], settings["max_iters"])
        out = compiled(q, k, v)
    except Exception as e:  # an unavailable implementation is a skipped row
        row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return row
    flops = 4 * b * n * h * visible_pairs(t, win) * (1.0 if mode == "fwd" else 3.5)
    if ref is None:
        err = None
    elif mode == "fwd":
        err = rel_err(out[:1], ref[0])
    else:
        err = max(rel_err(g[:1], r) for g, r in zip(out, ref[1], strict=True))
    row.update(
        ms=seconds * 1e3,
        tflops=flops / seconds / 1e12,
        mem_gb=program_memory_gb(compiled),
        device_peak_gb=device_peak_gb(),
        max_err=err,
    )
    return row


def print_row(row):
    head = f"{row['impl']:<16}{row['mode']:<9}{row['mask']:<8}{row['T']:>6}"
    if "skipped" in row:
        print(f"{head}  skipped: {row['skipped']}", flush=True)
        return
    mem = "-" if row["mem_gb"] is None else f"{row['mem_gb']:.2f}"
    err = "-" if row["max_err"] is None else f"{row['max_err']:.2e}"
    print(f"{head}{row['ms']:>10.3f}{row['tflops']:>10.4g}{mem:>9}{err:>11}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/attention.json")
    parser.add_argument("--quick", action="store_true", help="tiny shapes; runs on CPU")
    parser.add_argument("--seq", default=None, help="comma-separated T (default 1024..8192)")
    parser.add_argument("--impls", default=",".join(IMPLS), help="pallas[BQxBK] sets blocks")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--masks", default=",".join(MASKS))
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help="left window of the window rows (default 512; --quick 64)",
    )
    parser.add_argument("--budget-s", type=float, default=270.0, help="skip rows after this")
    args = parser.parse_args(argv)

    on_cpu = jax.default_backend() == "cpu"
    if args.quick:
        b, n, h, seqs, window = 1, 2, 32, [256], 64
    else:
        b, n, h, seqs, window = 8, 16, 128, [1024, 2048, 4096, 8192], 512
    if args.seq:
        seqs = [int(x) for x in args.seq.split(",")]
    window = args.window or window
    settings = dict(
        B=b,
        N=n,
        H=h,
        window=window,
        interpret=on_cpu,
        min_seconds=0.01 if args.quick else 0.25,
        max_iters=2 if args.quick else 30,
    )
    impls, modes, masks = (x.split(",") for x in (args.impls, args.modes, args.masks))
    print(
        f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"B={b} N={n} H={h} bf16 window={window}"
    )
    print(
        f"{'impl':<16}{'mode':<9}{'mask':<8}{'T':>6}{'ms':>10}{'TFLOP/s':>10}{'mem GB':>9}"
        f"{'max err':>11}"
    )
    start = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        backend=jax.default_backend(),
        device=jax.devices()[0].device_kind,
        jax=jax.__version__,
        python=platform.python_version(),
        quick=args.quick,
    )
    rows = []
    for t in seqs:
        keys = jax.random.split(jax.random.PRNGKey(t), 4)
        q, k, v = (jax.random.normal(kk, (b, t, n, h), jnp.bfloat16) for kk in keys[:3])
        do = jax.random.normal(keys[3], (b, t, n, h), jnp.float32)
        for mask in masks:
            ref = None
            if time.perf_counter() - start <= args.budget_s:
                try:
                    ref = reference_results(q, k, v, do, window if mask == "window" else None)
                except Exception as e:  # e.g. out of memory: rows then carry no error column
                    print(f"reference T={t} {mask} failed: {type(e).__name__}", flush=True)
            for impl in impls:
                for mode in modes:
                    if time.perf_counter() - start > args.budget_s:
                        row = dict(impl=impl, mode=mode, mask=mask, T=t, skipped="time budget")
                    else:
                        row = bench_row(impl, mode, mask, t, (q, k, v, do), ref, settings)
                    rows.append(row)
                    print_row(row)
                    meta["seconds"] = time.perf_counter() - start
                    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
            del ref
    print(f"wrote {out} ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
