"""The kernels lower for real hardware (Mosaic TPU, Triton and Mosaic GPU for CUDA) without
that hardware.

Lowering catches what interpret mode cannot: block shapes the compiler rejects, ops with no
Mosaic or Triton lowering, non-power-of-two Triton shapes, register layouts Mosaic GPU
cannot infer, shared memory over the limit. Mosaic GPU kernels lower to a
``mosaic_gpu`` custom call carrying the whole kernel (nothing of it is left to a device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from stability.kernels import flash

PLATFORM = {"tpu": "tpu", "triton": "cuda", "mosaic_gpu": "cuda"}

CASES = [
    ("bf16-causal", jnp.bfloat16, (2, 512, 4, 128), dict()),
    ("f32-causal", jnp.float32, (2, 512, 4, 128), dict()),
    (
        "bf16-ls-softplus-softcap",
        jnp.bfloat16,
        (2, 512, 4, 128),
        dict(window=(64, None, 200, None), score="softplus", alpha=1.5, softcap=30.0),
    ),
    ("bf16-padded-head64", jnp.bfloat16, (1, 200, 2, 64), dict(window=(32, None))),
    ("bf16-noncausal-head48", jnp.bfloat16, (1, 200, 2, 48), dict(causal=False)),
    ("bf16-causal-nostats", jnp.bfloat16, (2, 512, 4, 128), dict(stats=False)),
]
FWD_KERNEL = {"tpu": "flash_fwd", "triton": "flash_fwd", "mosaic_gpu": "mosaic_gpu"}


def lower(backend, dtype, shape, kw, grad, runs=None):
    """Lowered text of the kernel (or its gradient), vmapped over `runs` leading runs."""
    x = jax.ShapeDtypeStruct(shape if runs is None else (runs, *shape), dtype)

    def f(q, k, v):
        return flash.attention(q, k, v, backend=backend, interpret=False, **kw)

    if grad:
        fwd = f

        def f(q, k, v):
            return jax.grad(lambda *a: jnp.sum(fwd(*a)[0].astype(jnp.float32)), argnums=(0, 1, 2))(
                q, k, v
            )

    if runs is not None:
        f = jax.vmap(f)
    lowered = jax.jit(f).trace(x, x, x).lower(lowering_platforms=(PLATFORM[backend],))
    return lowered.as_text()


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", ["tpu", "triton", "mosaic_gpu"])
@pytest.mark.parametrize("name, dtype, shape, kw", CASES, ids=[c[0] for c in CASES])
def test_lowers(name, dtype, shape, kw, backend, grad):
    if backend == "tpu" and shape[-1] == 48:
        pytest.skip("TPU driver: covered by head dim 64 (full-dim blocks of any size)")
    if backend == "mosaic_gpu" and dtype != jnp.bfloat16:
        pytest.skip("Mosaic GPU driver: bfloat16 only (float32 runs on Triton)")
    text = lower(backend, dtype, shape, kw, grad)
    kernels = [FWD_KERNEL[backend]] + (["flash_dq", "flash_dkv"] if grad else [])
    for kernel in kernels:
        assert kernel in text, f"{kernel} missing from the {backend} lowering"


@pytest.mark.parametrize("backend", ["tpu", "triton", "mosaic_gpu"])
def test_lowers_vmapped_over_runs(backend):
    """The sweep engine's vmap over runs adds a grid axis (Triton: more than 3 in total)."""
    text = lower(backend, jnp.bfloat16, (2, 256, 4, 128), dict(window=(64, None) * 2), True, 3)
    assert "flash_dkv" in text
