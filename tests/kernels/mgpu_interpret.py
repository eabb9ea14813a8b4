"""Pallas's Mosaic GPU interpreter, taught the two wgmma operands the flash kernel uses.

jax 0.10's GPU interpreter (``jax._src.pallas.mosaic_gpu.interpret``) simulates the
warpgroups, barriers, TMA copies and shared memory of a Mosaic GPU kernel on CPU, with a
race detector, but its wgmma reads both operands from untransposed shared memory. The flash
forward multiplies by a transposed key tile (``plgpu.transpose_ref``) and by weights held
in registers. :func:`wgmma_operands_patched` swaps in a wgmma callback that reads those
too; everything else (threads, barrier phases, races) is the interpreter's own.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from jax._src.pallas.mosaic.interpret import utils as interpret_utils
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
from jax._src.state.types import TransposeTransform

__all__ = ["InterpretGPUParams", "races_found", "wgmma_operands_patched"]


def _wgmma(
    *,
    token,
    device_id,
    grid_point_coords,
    thread_id,
    acc_allocation_key_as_array,
    acc_transforms,
    acc_dtype,
    a_allocation_key_as_array,
    a_transforms,
    b_allocation_key_as_array,
    b_transforms,
    source_info=None,
):
    """acc += a @ b, where a may be a register array and b a transposed shared-memory ref."""
    shared_memory = gpu_callbacks._get_shared_memory()
    thread = shared_memory.get_global_thread_id(int(device_id), int(thread_id))
    info = interpret_utils.GPULoggingInfo(
        device_id=int(device_id),
        grid_point_coords=tuple(int(x) for x in grid_point_coords),
        thread_id=int(thread_id),
        source_info=source_info,
    )

    def read(key_or_value, transforms):
        if np.ndim(key_or_value) == 2:  # a register operand arrives as its value
            return np.asarray(key_or_value), None
        key = gpu_callbacks.HostAllocationKey.from_array(key_or_value)
        transforms = gpu_callbacks._remove_noop_transforms(transforms)
        perms = [t.permutation for t in transforms if isinstance(t, TransposeTransform)]
        index = [t for t in transforms if not isinstance(t, TransposeTransform)]
        rng = interpret_utils.to_range(jax.tree.map(int, tuple(index)))
        x, _, _ = shared_memory.get_buffer_content(key, rng, thread, logging_info=info)
        for perm in perms:
            x = np.transpose(x, perm)
        return x, (key, rng)

    a, _ = read(a_allocation_key_as_array, a_transforms)
    b, _ = read(b_allocation_key_as_array, b_transforms)
    acc, (acc_key, acc_range) = read(acc_allocation_key_as_array, acc_transforms)
    result = acc + np.matmul(a, b, dtype=acc_dtype)
    shared_memory.store_buffer_content(acc_key, acc_range, result, thread, logging_info=info)
    return token


@contextlib.contextmanager
def wgmma_operands_patched():
    """Within the context the GPU interpreter's wgmma reads transposed / register operands."""
    original = gpu_callbacks.wgmma
    gpu_callbacks.wgmma = _wgmma
    try:
        yield
    finally:
        gpu_callbacks.wgmma = original


def races_found() -> bool:
    """Whether the GPU interpreter's race detector flagged a race since its last reset."""
    races = gpu_interpret.get_races()
    return bool(races is not None and races.races_found)
