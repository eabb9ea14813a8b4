"""LayerNorm forward and backward at the 7-run d=128 sweep's shapes, three ways.

    python benchmarks/norms.py [--out benchmarks/results/norms_cpu.json]

The pre-norms see 7 runs × 16 rows × 64 tokens of d=128; qk-layernorm sees the same tokens
per head, rows of 32. Each way is jitted as the gradient (with respect to x and γ) of the sum
of the sine of its output; median of 30 calls after a warm-up. ``none`` is that loss without
the norm (what the norm adds is the difference). Ways: the model's (``layers.LayerNorm``:
two-pass variance, JAX's autodiff), a hand-written backward (``jax.custom_vjp``: one fused
formula for dx), and the mean and variance as matmuls with a D × D matrix of 1/D (XLA:CPU's
fastest op). The relative error is the largest gradient difference from the model's way.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-6
SHAPES = {"pre-norm, d=128": (7 * 16 * 64, 128), "qk-layernorm, head dim 32": (7 * 16 * 64 * 4, 32)}


def model_way(x, s):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + EPS) * s


def _forward(x, s):
    xc = x - x.mean(-1, keepdims=True)
    r = jax.lax.rsqrt(jnp.square(xc).mean(-1, keepdims=True) + EPS)
    return xc * r * s, (xc * r, r, s)


def _backward(res, dy):
    xh, r, s = res
    g = dy * s
    dx = r * (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True))
    return dx, (dy * xh).reshape(-1, xh.shape[-1]).sum(0)


hand_backward = jax.custom_vjp(model_way)
hand_backward.defvjp(_forward, _backward)


def as_matmuls(x, s):
    avg = jnp.full((x.shape[-1],) * 2, 1.0 / x.shape[-1], x.dtype)
    xc = x - x @ avg
    return xc * jax.lax.rsqrt(jnp.square(xc) @ avg + EPS) * s


WAYS = {"none": lambda x, s: x, "model": model_way, "hand backward": hand_backward}
WAYS["as matmuls"] = as_matmuls


def time_ms(fn, x, s, n: int = 30):
    grad = jax.jit(jax.grad(lambda x, s: jnp.sum(jnp.sin(fn(x, s))), argnums=(0, 1)))
    out = jax.block_until_ready(grad(x, s))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(grad(x, s))
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/norms_cpu.json")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for where, shape in SHAPES.items():
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        s = jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32)
        _, want = time_ms(model_way, x, s, n=1)
        for way, fn in WAYS.items():
            ms, got = time_ms(fn, x, s)
            err = None
            if way != "none":
                err = max(
                    float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
                    for g, w in zip(got, want, strict=True)
                )
            rows.append({"where": where, "shape": shape, "way": way, "ms": ms, "rel_err": err})
            print(json.dumps(rows[-1]), flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "device": str(jax.devices()[0]), "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
