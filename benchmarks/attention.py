"""Attention kernel benchmark and tuner: this repo's Pallas flash kernel against the alternatives.

Implementations: ``pallas`` (stability.kernels.flash with its statistics, driver chosen by
``flash.default_backend``: Mosaic GPU on Hopper, Triton on other GPUs), ``pallas-nostats``
(the same kernel with ``stats=False``), ``pallas-triton`` (the Triton driver forced),
``xla`` and ``cudnn`` (``jax.nn.dot_product_attention``; softplus rows: ``xla`` is the
plain-jnp reference), ``jax-triton`` (jax's Triton flash, ``pallas.ops.gpu.attention.mha``)
and ``jax-mgpu`` (jax's Mosaic GPU FlashAttention-3 example, ``attention_mgpu``; float16,
forward only). Masks: ``causal`` (every head global) and ``window`` (causal, the first half
of the heads local with a left window of 256; cuDNN / XLA get the two halves as two calls).
Per row: ms, TFLOP/s over visible (query, key) pairs only (4·B·N·H per pair forward, 3.5×
that for forward+backward), memory (XLA's buffer analysis of the compiled program:
arguments + outputs + temporaries), the device's high-water mark where ``memory_stats``
exists, and the max error against the float32 reference on batch element 0, relative to
the reference's max magnitude (forward: output; backward: worst of dq, dk, dv). An
implementation that is unavailable or fails is a row with the reason, not a crash.

    python benchmarks/attention.py                 # the full grid (a GPU)
    python benchmarks/attention.py --quick         # tiny shapes, CPU interpret mode
    python benchmarks/attention.py --dry-run       # print the planned rows; no device work
    python benchmarks/attention.py --tune          # time candidate configs on this device
    python benchmarks/attention.py --tune --dry-run --seq 256 --kernels mosaic_gpu:fwd
                                                   # CPU: enumerate candidates, lower each
    python benchmarks/attention.py --apply-tune benchmarks/results/attention_tune.json
                                                   # write the measured best into flash.TUNED
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import platform
import re
import sys
import time
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from stability.kernels import flash, mosaic_gpu, reference
from stability.kernels.tiles import MGPU_SMEM_BYTES

IMPLS = ("pallas", "pallas-nostats", "pallas-triton", "xla", "cudnn", "jax-triton", "jax-mgpu")
MODES = ("fwd", "fwd+bwd")
MASKS = ("causal", "window")
SCORES = ("softmax", "softplus")
SEQS = (4096, 8192, 1024, 2048, 16384)  # the targets' lengths first: a budget cut drops 16k
FLASH_PY = Path(flash.__file__)
KERNEL_CALLS = ("mosaic_gpu", "triton", "tpu_custom_call")  # custom calls of lowered kernels


def visible_pairs(t: int, window: int | None) -> int:
    """Number of visible (query, key) pairs of causal attention with a left window."""
    if window is None or window >= t:
        return t * (t + 1) // 2
    return window * (window + 1) // 2 + (t - window) * window


def head_windows(n: int, window: int | None) -> tuple[int | None, ...] | None:
    """The window mask's heads: the first half local (left window `window`), the rest global."""
    return None if window is None else (window,) * (n // 2) + (None,) * (n - n // 2)


def mask_pairs(t: int, n: int, window: int | None) -> float:
    """Visible pairs per head, averaged over the heads of a mask."""
    windows = head_windows(n, window) or (None,) * n
    return sum(visible_pairs(t, w) for w in windows) / n


def _split_heads(attention, window: int, n: int):
    """Runs `attention(q, k, v, local_window)` on the local and the global heads, concatenated."""

    def f(q, k, v):
        h = n // 2
        local = attention(q[:, :, :h], k[:, :, :h], v[:, :, :h], window)
        rest = attention(q[:, :, h:], k[:, :, h:], v[:, :, h:], None)
        return jnp.concatenate([local, rest], axis=2)

    return f


def make_attention(impl: str, *, score: str, window: int | None, n: int, interpret: bool):
    """(q, k, v) -> output [B, T, N, H] for one implementation (causal; window: half local)."""
    windows = head_windows(n, window)
    if impl.startswith("pallas"):
        kw = dict(window=windows, score=score, interpret=interpret)
        if impl == "pallas-nostats":
            kw["stats"] = False
        elif impl == "pallas-triton":
            kw["backend"] = "triton"
        elif impl != "pallas":
            raise ValueError(f"impl={impl!r}; valid: {IMPLS}")
        return lambda q, k, v: flash.attention(q, k, v, **kw)[0]
    if impl == "xla" and score == "softplus":
        return lambda q, k, v: reference.attention(q, k, v, window=windows, score=score)[0]
    if score != "softmax":
        raise NotImplementedError(f"{impl} has no {score} attention")
    if impl in ("xla", "cudnn"):

        def dpa(q, k, v, w):
            local = None if w is None else (w - 1, 0)
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=True, local_window_size=local, implementation=impl
            )

        return functools.partial(dpa, w=None) if window is None else _split_heads(dpa, window, n)
    if window is not None:
        raise NotImplementedError(f"{impl} has no sliding window")
    if impl == "jax-triton":
        from jax.experimental.pallas.ops.gpu import attention as jax_triton

        def f(q, k, v):
            scale = 1.0 / math.sqrt(q.shape[-1])
            return jax_triton.mha(
                q, k, v, segment_ids=None, sm_scale=scale, causal=True, interpret=interpret
            )

        return f
    if impl == "jax-mgpu":
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        config = attention_mgpu.TuningConfig(
            block_q=64, block_kv=128, max_concurrent_steps=2, causal=True
        )

        def f(q, k, v):  # the example computes q·k without 1/√H and takes float16 only
            q = q * (1.0 / math.sqrt(q.shape[-1]))
            q, k, v = (x.astype(jnp.float16) for x in (q, k, v))
            return attention_mgpu.attention(q, k, v, config).astype(jnp.bfloat16)

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


def reference_results(q, k, v, do, score, windows):
    """Float32 reference output and (dq, dk, dv) on batch element 0."""
    q0, k0, v0 = (x[:1].astype(jnp.float32) for x in (q, k, v))

    def out(q, k, v):
        return reference.attention(q, k, v, window=windows, score=score)[0]

    o = jax.jit(out)(q0, k0, v0)
    grads = jax.jit(with_grad(out, do[:1]))(q0, k0, v0)
    return o, grads


def bench_row(case, args, ref, settings):
    """One table row: a dict with timings and errors, or with `skipped` giving the reason."""
    impl, score, mode, mask, t = case
    b, n, h, window = settings["B"], settings["N"], settings["H"], settings["window"]
    q, k, v, do = args
    win = window if mask == "window" else None
    row = dict(impl=impl, score=score, mode=mode, mask=mask, T=t, B=b, N=n, H=h)
    row.update(dtype=str(q.dtype), window=win, local_heads=0 if win is None else n // 2)
    try:
        attention = make_attention(
            impl, score=score, window=win, n=n, interpret=settings["interpret"]
        )
        fn = attention if mode == "fwd" else with_grad(attention, do)
        compiled = jax.jit(fn).trace(q, k, v).lower().compile()
        seconds = time_call(compiled, (q, k, v), settings["min_seconds"], settings["max_iters"])
        out = compiled(q, k, v)
    except Exception as e:  # an unavailable implementation is a skipped row
        row["skipped"] = _reason(e)
        return row
    flops = 4 * b * n * h * mask_pairs(t, n, win) * (1.0 if mode == "fwd" else 3.5)
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
    head = f"{row['impl']:<16}{row['score']:<9}{row['mode']:<9}{row['mask']:<8}{row['T']:>6}"
    if "skipped" in row:
        print(f"{head}  skipped: {row['skipped']}", flush=True)
        return
    mem = "-" if row["mem_gb"] is None else f"{row['mem_gb']:.2f}"
    err = "-" if row["max_err"] is None else f"{row['max_err']:.2e}"
    print(f"{head}{row['ms']:>10.3f}{row['tflops']:>10.4g}{mem:>9}{err:>11}", flush=True)


def print_summary(rows):
    """Per (score, mode, mask, T): each implementation's TFLOP/s as a fraction of cuDNN's,
    then each one's program memory (GB), which should grow linearly in T for flash kernels."""
    done = [r for r in rows if "tflops" in r]
    keys = sorted({(r["score"], r["mode"], r["mask"], r["T"]) for r in done})
    impls = [i for i in IMPLS if any(r["impl"] == i for r in done)]
    for title, field in (("TFLOP/s (x cuDNN)", "tflops"), ("program memory GB", "mem_gb")):
        print(f"\n{title}")
        print(f"{'score':<9}{'mode':<9}{'mask':<8}{'T':>6}" + "".join(f"{i:>22}" for i in impls))
        for key in keys:
            got = {
                r["impl"]: r[field]
                for r in done
                if (r["score"], r["mode"], r["mask"], r["T"]) == key and r[field] is not None
            }
            base = got.get("cudnn") if field == "tflops" else None
            cells = []
            for impl in impls:
                if impl not in got:
                    cells.append(f"{'-':>22}")
                elif base:
                    cells.append(f"{got[impl]:>12.4g} ({got[impl] / base:4.2f}x)")
                else:
                    cells.append(f"{got[impl]:>22.4g}")
            print(f"{key[0]:<9}{key[1]:<9}{key[2]:<8}{key[3]:>6}" + "".join(cells))


# ---------------------------------------------------------------------------------------
# Tuning: candidate KernelConfigs per (backend, kernel), timed through flash.TUNED.
# ---------------------------------------------------------------------------------------


def candidates(backend: str, kernel: str, head_dim: int) -> list[flash.KernelConfig]:
    """Configs worth timing for one kernel (Mosaic GPU: those that fit in shared memory)."""
    if backend == "mosaic_gpu" and kernel == "fwd":
        grid = [
            flash.KernelConfig(64, bk, max_concurrent_steps=ring)
            for bk, ring in itertools.product((64, 128), (2, 3, 4))
        ]
        return [c for c in grid if mosaic_gpu.smem_bytes(c, head_dim) <= MGPU_SMEM_BYTES]
    if backend in ("triton", "mosaic_gpu"):  # the Mosaic GPU backward is the Triton one
        if kernel == "fwd":
            blocks = [(64, 32), (64, 64), (64, 128), (128, 32), (128, 64), (128, 128)]
        else:
            blocks = [(32, 64), (64, 64), (64, 128), (128, 64)]
        return [
            flash.KernelConfig(bq, bk, num_warps=w, num_stages=s)
            for (bq, bk), w, s in itertools.product(blocks, (4, 8), (2, 3))
        ]
    if backend == "tpu":
        blocks = [(128, 128), (128, 256), (256, 128), (256, 256), (512, 256)]
        return [flash.KernelConfig(bq, bk) for bq, bk in blocks]
    raise ValueError(f"backend={backend!r}; valid: {typing.get_args(flash.Backend)}")


def _tuned_call(kernel: str, windows, backend: str, shape: tuple[int, ...]):
    """A fresh function (jit's trace cache keys on it) timing `kernel` through flash.TUNED."""

    def output(q, k, v):
        return flash.attention(q, k, v, window=windows, backend=backend, interpret=False)[0]

    return output if kernel == "fwd" else with_grad(output, jnp.ones(shape, jnp.float32))


def tune(args, settings, out: Path) -> dict:
    """Times every candidate of every tuned kernel at every (T, mask); writes the best."""
    b, n, h, window = settings["B"], settings["N"], settings["H"], settings["window"]
    dtype = jnp.bfloat16
    kernels = [tuple(x.split(":")) for x in args.kernels.split(",")] if args.kernels else None
    if kernels is None:
        backend = flash.default_backend(dtype)
        kernels = [(backend, "fwd"), (backend, "bwd")]
    h_pad = max(64, 1 << (h - 1).bit_length())
    start = time.perf_counter()
    result = dict(meta=_meta(args), dry_run=args.dry_run, entries=[])
    for t, mask, (backend, kernel) in itertools.product(
        settings["seqs"], settings["masks"], kernels
    ):
        windows = head_windows(n, window if mask == "window" else None)
        key = flash.TuneKey(backend, kernel, "bfloat16", h_pad, True, windows is not None, t)
        shape = jax.ShapeDtypeStruct((b, t, n, h), dtype)
        entry = dict(key=key._asdict(), candidates=[])
        for config in candidates(backend, kernel, h_pad):
            if time.perf_counter() - start > args.budget_s:
                entry["candidates"].append(
                    dict(config=dataclasses.asdict(config), skipped="time budget")
                )
                continue
            flash.TUNED[key] = config
            fn = _tuned_call(kernel, windows, backend, shape.shape)
            cand = dict(config=dataclasses.asdict(config))
            try:
                if args.dry_run:
                    platform_ = "tpu" if backend == "tpu" else "cuda"
                    traced = jax.jit(fn).trace(shape, shape, shape)
                    text = traced.lower(lowering_platforms=(platform_,)).as_text()
                    cand["lowered"] = any(x in text for x in KERNEL_CALLS)
                else:
                    keys = jax.random.split(jax.random.PRNGKey(t), 3)
                    qkv = [jax.random.normal(kk, shape.shape, dtype) for kk in keys]
                    compiled = jax.jit(fn).trace(*qkv).lower().compile()
                    cand["ms"] = 1e3 * time_call(
                        compiled, qkv, settings["min_seconds"], settings["max_iters"]
                    )
            except Exception as e:  # a config the compiler rejects is a row, not a crash
                cand["error"] = _reason(e)
            entry["candidates"].append(cand)
            print(f"tune {backend}:{kernel} {mask} T={t} {config} -> {_outcome(cand)}", flush=True)
        del flash.TUNED[key]
        timed = [c for c in entry["candidates"] if "ms" in c]
        if timed:
            entry["best"] = min(timed, key=lambda c: c["ms"])["config"]
        result["entries"].append(entry)
        result["meta"]["seconds"] = time.perf_counter() - start
        out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} ({result['meta']['seconds']:.0f} s)")
    return result


def _reason(e: Exception) -> str:
    """One line naming an exception (its type and first message line)."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:160] if lines else ''}"


def _outcome(cand: dict) -> str:
    if "ms" in cand:
        return f"{cand['ms']:.3f} ms"
    if "lowered" in cand:
        return "lowered" if cand["lowered"] else "lowered without a kernel"
    return cand.get("error", cand.get("skipped", "?"))


def tuned_table_source(result: dict, current: dict) -> str:
    """Python source of the TUNED block: `current`'s wildcard defaults plus measured bests."""
    entries = {k: v for k, v in current.items() if k.seq_len is None}
    for entry in result["entries"]:
        if "best" in entry:
            entries[flash.TuneKey(**entry["key"])] = flash.KernelConfig(**entry["best"])
    device = result["meta"]["device"]
    lines = [
        "# BEGIN TUNED (rewritten by `python benchmarks/attention.py --apply-tune FILE`)",
        f"TUNED_ON: str | None = {device!r}  # device the T-specific entries were measured on",
        "TUNED: dict[TuneKey, KernelConfig] = {",
    ]
    for key, config in entries.items():
        fields = [f"{getattr(key, f)!r}" for f in key._fields]
        while fields[-1] == "None":
            fields.pop()
        knobs = (
            f"{f}={getattr(config, f)}" for f in ("num_warps", "num_stages", "max_concurrent_steps")
        )
        lines.append(f"    TuneKey({', '.join(fields)}): KernelConfig(")
        lines.append(f"        {config.block_q}, {config.block_k}, {', '.join(knobs)}")
        lines.append("    ),")
    lines += ["}", "# END TUNED"]
    return "\n".join(lines)


def apply_tune(path: Path) -> None:
    """Rewrites flash.py's TUNED block with the best configs measured in `path` (--tune)."""
    result = json.loads(path.read_text())
    if result.get("dry_run"):
        sys.exit(f"--apply-tune {path}: a --dry-run result has no measurements")
    source = FLASH_PY.read_text()
    block = re.compile(r"# BEGIN TUNED.*?# END TUNED", re.S)
    if len(block.findall(source)) != 1:
        sys.exit(f"--apply-tune: no single TUNED block in {FLASH_PY}")
    table = tuned_table_source(result, flash.TUNED)
    FLASH_PY.write_text(block.sub(lambda _: table, source))
    measured = sum("best" in e for e in result["entries"])
    print(
        f"wrote {measured} measured entries into {FLASH_PY} (TUNED_ON={result['meta']['device']!r})"
    )


# ---------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON path (default under benchmarks/results/)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes; runs on CPU")
    parser.add_argument(
        "--dry-run", action="store_true", help="plan only (--tune: lower each candidate for cuda)"
    )
    parser.add_argument(
        "--seq", default=None, help="comma-separated T (default 4096,8192,1024,2048,16384)"
    )
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--scores", default=",".join(SCORES))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--masks", default=",".join(MASKS))
    parser.add_argument(
        "--window", type=int, default=None, help="local heads' window (default 256; --quick 64)"
    )
    parser.add_argument("--batch", type=int, default=None, help="B (default 8; --quick 1)")
    parser.add_argument("--heads", type=int, default=None, help="N (default 16; --quick 2)")
    parser.add_argument("--head-dim", type=int, default=None, help="H (default 128; --quick 32)")
    parser.add_argument(
        "--budget-s", type=float, default=270.0, help="skip rows / candidates after this"
    )
    parser.add_argument("--tune", action="store_true", help="time candidate kernel configs instead")
    parser.add_argument(
        "--kernels",
        default=None,
        help="--tune: backend:kernel list (default: this device's driver)",
    )
    parser.add_argument(
        "--apply-tune",
        type=Path,
        default=None,
        help="write a --tune JSON's best configs into flash.py",
    )
    return parser


def _meta(args) -> dict:
    return dict(
        backend=jax.default_backend(),
        device=jax.devices()[0].device_kind,
        jax=jax.__version__,
        python=platform.python_version(),
        quick=args.quick,
    )


def _ints(name: str, text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        sys.stderr.write(f"{name}={text!r}; must be comma-separated integers\n")
        sys.exit(2)


def _choices(name: str, text: str, valid: tuple[str, ...]) -> list[str]:
    items = text.split(",")
    bad = [x for x in items if x not in valid]
    if bad:
        sys.stderr.write(f"{name}={text!r}: {bad} not in {list(valid)}\n")
        sys.exit(2)
    return items


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.apply_tune is not None:
        apply_tune(args.apply_tune)
        return
    on_cpu = jax.default_backend() == "cpu"
    if args.quick:
        b, n, h, seqs, window = 1, 2, 32, [256], 64
    else:
        b, n, h, seqs, window = 8, 16, 128, list(SEQS), 256
    b, n, h = args.batch or b, args.heads or n, args.head_dim or h
    seqs = _ints("--seq", args.seq) if args.seq else seqs
    window = args.window or window
    impls = _choices("--impls", args.impls, IMPLS)
    scores = _choices("--scores", args.scores, SCORES)
    modes = _choices("--modes", args.modes, MODES)
    masks = _choices("--masks", args.masks, MASKS)
    if args.kernels:
        for item in args.kernels.split(","):
            backend, _, kernel = item.partition(":")
            if backend not in typing.get_args(flash.Backend) or kernel not in ("fwd", "bwd"):
                sys.stderr.write(f"--kernels={args.kernels!r}: {item!r} is not backend:fwd|bwd\n")
                sys.exit(2)
    settings = dict(
        B=b,
        N=n,
        H=h,
        window=window,
        seqs=seqs,
        masks=masks,
        interpret=on_cpu,
        min_seconds=0.01 if args.quick else 0.25,
        max_iters=2 if args.quick else 30,
    )
    default_name = "attention_tune.json" if args.tune else "attention.json"
    out = Path(args.out or f"benchmarks/results/{default_name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"driver={flash.default_backend(jnp.bfloat16)} B={b} N={n} H={h} bf16 window={window} "
        f"(half the heads) table={'tuned on ' + flash.TUNED_ON if flash.TUNED_ON else 'untuned'}"
    )
    if args.tune:
        tune(args, settings, out)
        return
    cases = list(itertools.product(seqs, masks, scores, impls, modes))
    if args.dry_run:
        for t, mask, score, impl, mode in cases:
            print(f"plan {impl:<16}{score:<9}{mode:<9}{mask:<8}{t:>6}")
        print(f"{len(cases)} rows planned (dry run: nothing measured)")
        return
    print(
        f"{'impl':<16}{'score':<9}{'mode':<9}{'mask':<8}{'T':>6}{'ms':>10}{'TFLOP/s':>10}"
        f"{'mem GB':>9}{'max err':>11}"
    )
    start = time.perf_counter()
    meta = _meta(args)
    meta.update(tuned_on=flash.TUNED_ON, driver=flash.default_backend(jnp.bfloat16))
    rows = []
    for t in seqs:
        keys = jax.random.split(jax.random.PRNGKey(t), 4)
        q, k, v = (jax.random.normal(kk, (b, t, n, h), jnp.bfloat16) for kk in keys[:3])
        do = jax.random.normal(keys[3], (b, t, n, h), jnp.float32)
        for mask, score in itertools.product(masks, scores):
            ref = None
            if time.perf_counter() - start <= args.budget_s:
                try:
                    win = head_windows(n, window if mask == "window" else None)
                    ref = reference_results(q, k, v, do, score, win)
                except Exception as e:  # e.g. out of memory: rows then carry no error column
                    print(f"reference T={t} {mask} {score} failed: {type(e).__name__}", flush=True)
            for impl, mode in itertools.product(impls, modes):
                case = (impl, score, mode, mask, t)
                if time.perf_counter() - start > args.budget_s:
                    row = dict(zip(("impl", "score", "mode", "mask", "T"), case, strict=True))
                    row["skipped"] = "time budget"
                else:
                    row = bench_row(case, (q, k, v, do), ref, settings)
                rows.append(row)
                print_row(row)
                meta["seconds"] = time.perf_counter() - start
                out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
            del ref
    print_summary(rows)
    print(f"wrote {out} ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
