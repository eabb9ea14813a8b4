"""The device mesh ("run", "data", "model"), the logical axis rules, the shardings of train
states, hyperparameters and batches, host transfer, and the memory of this host's devices.
``programs.py`` asks this module for shardings; it imports neither the step nor the loop.
GSPMD inserts every collective (none is written by hand).

Mesh axes (outermost first):

  run    independent runs of a sweep (the vmapped axis); 1 for a single run
  data   splits each batch's sequences; with ``train.fsdp`` also one dim of every matrix of
         the parameters, gradients and optimizer state (FSDP / ZeRO-3)
  model  ``train.tensor_parallel`` devices: attention heads and the MLP hidden width are split
         over it (Megatron), and the vocabulary of the embedding, head and logits

Parameters name their dims in the variable metadata ``logical_axes`` (``models/layers.py``);
activations name theirs where the model calls :func:`constrain`. :data:`RULES` is the one
table from logical names to mesh axes. A name missing from the table, a dim of size not
divisible by its mesh axis, and every vector or scalar without names are replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from stability.config import Config, ConfigError, TrainConfig
from stability.metrics import is_variable

AXES = ("run", "data", "model")

# Logical axis name → mesh axis. Parameters: "embed" (d_model), "heads" (the N·H columns of
# q/k/v, rows of o), "mlp" (MLP hidden width), "vocab". Activations: "batch" (sequences, or
# the rows of M = B·T), "heads", "mlp", "vocab". "run": the stacked runs of a sweep.
RULES: dict[str, str] = {
    "run": "run",
    "batch": "data",
    "embed": "data",  # parameters only, and only with train.fsdp (FSDP_ONLY)
    "heads": "model",
    "mlp": "model",
    "vocab": "model",
}
FSDP_ONLY = frozenset({"embed"})


def rules(fsdp: bool) -> dict[str, str]:
    """:data:`RULES` for a run with or without FSDP."""
    return {k: v for k, v in RULES.items() if fsdp or k not in FSDP_ONLY}


# ---------------------------------------------------------------------------------------
# The mesh.


def mesh_shape(
    n_devices: int, n_runs: int, batch_size: int, *, tensor_parallel: int = 1, fsdp: bool = False
) -> tuple[int, int, int]:
    """(run, data, model) axis sizes for ``n_runs`` runs on ``n_devices`` devices.

    ``model`` is ``tensor_parallel``; the other n = n_devices/model devices are split
    between runs and data. Without FSDP, runs need no communication, so every device holds
    runs (the run axis padded with copies) unless there are too few runs to fill the devices:
    then the run axis is the largest divisor of n not above ``n_runs`` and the devices left
    split each run's batch (if it divides evenly and this lowers the padded run count). With
    FSDP the devices left always split the batch and the state (the run axis is the largest
    divisor of n not above ``n_runs`` whose complement divides the batch).
    """
    tp = tensor_parallel
    if tp < 1 or n_devices % tp:
        raise ConfigError(
            f"config.train.tensor_parallel={tp} must divide the device count {n_devices}"
        )
    n = n_devices // tp
    divisors = [d for d in range(1, n + 1) if n % d == 0 and d <= n_runs]
    if fsdp:
        fits = [d for d in divisors if batch_size % (n // d) == 0]
        if not fits:
            raise ConfigError(
                f"config.data.batch_size={batch_size} is not divisible by any data-axis size "
                f"left by {n_runs} run(s) on {n} devices (config.train.fsdp=True splits the "
                "batch over the devices that hold a run)"
            )
        return fits[-1], n // fits[-1], tp
    n_run = divisors[-1]
    n_data = n // n_run
    padded = lambda k: -(-n_runs // k) * k
    if batch_size % n_data or padded(n_run) >= padded(n):
        if padded(n) - n_runs > n_runs:  # most devices would train copies, never said
            raise ConfigError(
                f"config.data.batch_size={batch_size} does not split over the {n_data} "
                f"devices that {n_runs} run(s) leave free of the {n}: each device would "
                f"train a copy of a run ({padded(n) - n_runs} copies); use a batch size "
                f"divisible by {n_data}, more runs per program, or config.train.fsdp=True"
            )
        return n, 1, tp
    return n_run, n_data, tp


def make_mesh(cfg: Config, n_runs: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ("run", "data", "model") mesh for ``n_runs`` runs of ``cfg`` over ``devices``
    (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    t = cfg.train
    shape = mesh_shape(
        len(devices), n_runs, cfg.data.batch_size, tensor_parallel=t.tensor_parallel, fsdp=t.fsdp
    )
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def describe(mesh: Mesh, train: TrainConfig) -> str:
    """One line for the program's stderr: axis sizes, devices, processes, FSDP, remat and
    scanned layers."""
    sizes = "×".join(str(mesh.shape[a]) for a in AXES)
    n_proc = len({d.process_index for d in mesh.devices.flat})
    where = f"{mesh.devices.size} {mesh.devices.flat[0].platform} device(s)"
    if n_proc > 1:
        where += f" in {n_proc} processes"
    return (
        f"mesh run×data×model {sizes} on {where}; fsdp {'on' if train.fsdp else 'off'}, "
        f"remat {train.remat}" + (", scanned layers" if train.scan_layers else "")
    )


# ---------------------------------------------------------------------------------------
# Logical names → PartitionSpecs.


def spec(
    names: Sequence[str | None], shape: Sequence[int], mesh_sizes: dict[str, int], table: dict
) -> P:
    """The PartitionSpec of an array of ``shape`` whose dims have logical ``names``: each name
    maps through ``table`` to a mesh axis, kept only if the dim divides evenly over it and no
    earlier dim took that axis."""
    out, used = [], set()
    for name, size in zip(names, shape, strict=True):
        axis = table.get(name) if name is not None else None
        n = mesh_sizes.get(axis, 1)
        if axis is None or axis in used or n == 1 or size % n:
            out.append(None)
        else:
            out.append(axis)
            used.add(axis)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` constrained to the sharding its logical dim ``names`` give on the mesh being
    traced for (set by :func:`with_mesh`); unchanged outside one. Activation names follow
    :data:`RULES` (never FSDP-only names)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec(names, x.shape, dict(mesh.shape), RULES))


def with_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """``fn`` traced under ``mesh`` (so that :func:`constrain` in the model applies)."""

    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def state_shardings(state: Any, mesh: Mesh, train: TrainConfig, *, stacked: bool = False):
    """NamedShardings for every leaf of a train state (concrete or abstract), same tree.

    A variable with metadata ``logical_axes`` of its rank (parameters, and the optimizer-state
    subtrees optax builds from them, e.g. Adam's moments) is sharded by :func:`rules`; every
    other leaf (norm scales, step counters, factored second moments) is replicated.
    ``stacked``: the state carries a leading run axis (a sweep's vmapped state), sharded over
    "run".
    """
    table, sizes = rules(train.fsdp), dict(mesh.shape)
    lead = ("run",) if stacked else ()

    def one(x):
        names = x.get_metadata().get("logical_axes") if is_variable(x) else None
        shape = np.shape(x.get_value() if is_variable(x) else x)
        if names is None or len(lead) + len(names) != len(shape):
            names = (None,) * (len(shape) - len(lead))
        sh = NamedSharding(mesh, spec((*lead, *names), shape, sizes, table))
        return jax.tree.map(lambda _: sh, x)

    return jax.tree.map(one, state, is_leaf=is_variable)


def run_sharding(mesh: Mesh, *, stacked: bool) -> NamedSharding:
    """Per-run scalars and metrics: over "run" when stacked, else replicated."""
    return NamedSharding(mesh, P("run") if stacked else P())


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Token batches [B, ...]: sequences over "data" (shared by every run of a sweep);
    ``leading`` unsplit axes first (e.g. 1 for the [K, B, ...] batches of K steps per call)."""
    return NamedSharding(mesh, P(*(None,) * leading, "data"))


def from_host(x, sharding: NamedSharding) -> jax.Array:
    """A global array of host value ``x`` (identical on every process) with ``sharding``."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(tree: Any) -> Any:
    """``tree``'s global arrays as numpy arrays on every process (``jax.device_get`` on one).
    On several processes one program gathers the whole tree, packed into one flat array per
    dtype: one collective per dtype, where ``multihost_utils.process_allgather`` runs one
    program and one collective per leaf (a sweep's ~200 metrics at every logged step)."""
    return fetch(gather(tree))


@dataclasses.dataclass
class Gathered:
    """A tree whose gather to every process has been dispatched (``gather``); ``fetch`` reads
    it. On one process the tree itself."""

    packed: Any  # {dtype name: replicated flat array}, or the tree on one process
    treedef: Any = None
    shapes: list | None = None  # (dtype name, shape) of each leaf


def gather(tree: Any) -> Gathered:
    """Dispatch the gather of ``tree`` to every process now, without waiting: the loop calls
    it right after a call, so the gather runs after that call, before the next one."""
    if jax.process_count() == 1:
        return Gathered(tree)
    leaves, treedef = jax.tree.flatten(tree)
    packed = _packed(leaves[0].sharding.mesh)(leaves)
    return Gathered(packed, treedef, [(x.dtype.name, x.shape) for x in leaves])


def fetch(g: Gathered) -> Any:
    """The numpy tree of a dispatched ``gather`` (waits for it, not for anything after it)."""
    if g.treedef is None:
        return jax.device_get(g.packed)
    packed = jax.device_get(g.packed)
    offsets = dict.fromkeys(packed, 0)
    out = []
    for dtype, shape in g.shapes:
        flat, start, size = packed[dtype], offsets[dtype], math.prod(shape)
        out.append(flat[start : start + size].reshape(shape))
        offsets[dtype] = start + size
    return jax.tree.unflatten(g.treedef, out)


@functools.lru_cache(maxsize=8)
def _packed(mesh: Mesh):
    """Jitted: a list of arrays → {dtype name: their flattened concatenation}, replicated."""

    def pack(leaves):
        groups: dict[str, list] = {}
        for x in leaves:
            groups.setdefault(x.dtype.name, []).append(x.reshape(-1))
        return {name: jnp.concatenate(xs) for name, xs in groups.items()}

    return jax.jit(pack, out_shardings=NamedSharding(mesh, P()))


def abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (for restore and compile-only)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings
    )


def per_device_bytes(tree: Any) -> dict[jax.Device, int]:
    """Bytes each addressable device holds of the arrays in ``tree``."""
    out: dict[jax.Device, int] = {}
    for x in jax.tree.leaves(tree):
        for s in x.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out


# ---------------------------------------------------------------------------------------
# Per-device memory of this host.


def device_limit_bytes(mesh: Mesh) -> int:
    """Memory of one device of ``mesh`` that this process holds (on a pod, only a host's own
    devices answer memory queries): the accelerator's ``bytes_limit``; on CPU the host's
    physical memory divided among its local devices (simulated CPU devices share it)."""
    stats = local_devices(mesh)[0].memory_stats()  # None on CPU
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // max(jax.local_device_count(), 1)


def local_devices(mesh: Mesh) -> list[jax.Device]:
    """The devices of ``mesh`` that belong to this process (every per-device query, e.g.
    ``memory_stats()``, must go to one of these: a pod refuses it for another host's)."""
    mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if not mine:
        raise ValueError(
            f"no device of the mesh {dict(mesh.shape)} belongs to process {jax.process_index()}"
        )
    return mine
