"""The device mesh ("run", "data", "model"), the logical axis rules, and the shardings of
train states, hyperparameters and batches. ``train.py`` and ``sweep.py`` ask this module;
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
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from stability.config import Config, ConfigError, TrainConfig

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
    """One line for the program's stderr: axis sizes, devices, processes, FSDP and remat."""
    sizes = "×".join(str(mesh.shape[a]) for a in AXES)
    n_proc = len({d.process_index for d in mesh.devices.flat})
    where = f"{mesh.devices.size} {mesh.devices.flat[0].platform} device(s)"
    if n_proc > 1:
        where += f" in {n_proc} processes"
    return (
        f"mesh run×data×model {sizes} on {where}; fsdp {'on' if train.fsdp else 'off'}, "
        f"remat {train.remat}"
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


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


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
        names = x.get_metadata().get("logical_axes") if _is_variable(x) else None
        shape = np.shape(x.get_value() if _is_variable(x) else x)
        if names is None or len(lead) + len(names) != len(shape):
            names = (None,) * (len(shape) - len(lead))
        sh = NamedSharding(mesh, spec((*lead, *names), shape, sizes, table))
        return jax.tree.map(lambda _: sh, x)

    return jax.tree.map(one, state, is_leaf=_is_variable)


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
    if jax.process_count() == 1:
        return jax.device_get(tree)
    leaves, treedef = jax.tree.flatten(tree)
    packed = jax.device_get(_packed(leaves[0].sharding.mesh)(leaves))
    offsets = dict.fromkeys(packed, 0)
    out = []
    for x in leaves:
        flat, start = packed[x.dtype.name], offsets[x.dtype.name]
        out.append(flat[start : start + x.size].reshape(x.shape))
        offsets[x.dtype.name] = start + x.size
    return jax.tree.unflatten(treedef, out)


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
# Sharded train functions (single run, or K runs vmapped over "run").


@dataclasses.dataclass(frozen=True)
class ShardedFns:
    """The programs of one static config on one mesh: the one builder that ``stability
    train``, ``stability sweep``, tests and benchmarks use.

    Single run: ``init(seed)``, ``call(state, hp, batches[k_max, B, ...], n)`` (``n`` updates,
    ``train.make_call``), ``step(state, hp, batch)`` (one update, jitted), ``evaluate(state,
    batches)``. Stacked (``runs`` = R): ``init(seeds[R])``, the train step and evaluate
    vmapped over the state and ``hp``; batches are shared. ``init``, ``call`` and ``evaluate``
    are :class:`~stability.compilation.Program` s (compile reports on stderr, naming the
    mesh). ``state`` holds the shardings of the state (same tree), ``abstract_state`` its
    ShapeDtypeStructs with them (restore and compile-only targets).
    """

    mesh: Mesh
    init: Any
    call: Any
    step: Any
    evaluate: Any
    state: Any
    abstract_state: Any
    hp: NamedSharding
    batch: NamedSharding  # [B, ...]: one step's batch, eval batches
    batches: NamedSharding  # [k_max, B, ...]: the call's batches
    metrics: NamedSharding
    k_max: int
    graphdef: Any
    tx: Any


def shard_train_fns(
    cfg: Config, mesh: Mesh, *, runs: int | None = None, k_max: int = 1
) -> ShardedFns:
    """Init, the K-step call (up to ``k_max`` updates), the single step and evaluate of
    ``cfg``'s static structure (``train.static_config``), jitted with the shardings of this
    module on ``mesh``; the call and step donate their state. Built once per process for each
    (static config, mesh, runs, k_max); init and evaluate are shared across ``k_max``."""
    from stability import train as T

    return _shard_train_fns(T.static_config(cfg), mesh, runs, k_max)


@functools.lru_cache(maxsize=32)
def _base_fns(static: Config, mesh: Mesh, runs: int | None):
    """Everything of :func:`shard_train_fns` that does not depend on ``k_max``."""
    from stability import train as T
    from stability.compilation import Program
    from stability.optim.build import make_optimizer

    tx = make_optimizer(static.optim, d_model=static.model.d_model)
    graphdef = T.graphdef_of(static)
    stacked = runs is not None
    init_one = lambda seed: T.init_state(static, seed, tx)
    step_one = T.make_train_step(static, graphdef, tx)
    eval_one = T.make_evaluate(static, graphdef)
    if stacked:
        init_fn = jax.vmap(init_one)
        step_fn = jax.vmap(step_one, in_axes=(0, 0, None), spmd_axis_name="run")
        eval_fn = jax.vmap(eval_one, in_axes=(0, None), spmd_axis_name="run")
        seeds = jax.ShapeDtypeStruct((runs,), np.int32)
    else:
        init_fn, step_fn, eval_fn = init_one, step_one, eval_one
        seeds = jax.ShapeDtypeStruct((), np.int32)
    shape = jax.eval_shape(init_fn, seeds)
    state_sh = state_shardings(shape, mesh, static.train, stacked=stacked)
    per_run = run_sharding(mesh, stacked=stacked)
    batch_sh = batch_sharding(mesh)
    where = f" [{describe(mesh, static.train)}]"
    vm = " (vmapped)" if stacked else ""
    init = jax.jit(with_mesh(init_fn, mesh), in_shardings=per_run, out_shardings=state_sh)
    step = jax.jit(
        with_mesh(step_fn, mesh),
        in_shardings=(state_sh, per_run, batch_sh),
        out_shardings=(state_sh, per_run),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        with_mesh(eval_fn, mesh), in_shardings=(state_sh, batch_sh), out_shardings=per_run
    )
    return dict(
        mesh=mesh,
        init=Program(f"init{vm}{where}", init),
        step=step,
        evaluate=Program(f"eval{vm}{where}", evaluate),
        state=state_sh,
        abstract_state=abstract(shape, state_sh),
        hp=per_run,
        batch=batch_sh,
        metrics=per_run,
        graphdef=graphdef,
        tx=tx,
        step_fn=step_fn,
        where=where,
    )


@functools.lru_cache(maxsize=32)
def _shard_train_fns(static: Config, mesh: Mesh, runs: int | None, k_max: int) -> ShardedFns:
    from stability import train as T
    from stability.compilation import Program

    base = dict(_base_fns(static, mesh, runs))
    step_fn, where = base.pop("step_fn"), base.pop("where")
    state_sh, per_run = base["state"], base["hp"]
    batches_sh = batch_sharding(mesh, leading=1)
    call = jax.jit(
        with_mesh(T.make_call(step_fn, k_max), mesh),
        in_shardings=(state_sh, per_run, batches_sh, NamedSharding(mesh, P())),
        out_shardings=(state_sh, per_run),
        donate_argnums=0,
    )
    name = f"train step ({'vmapped, ' if runs is not None else ''}up to {k_max} per call){where}"
    return ShardedFns(**base, call=Program(name, call), batches=batches_sh, k_max=k_max)


# ---------------------------------------------------------------------------------------
# XLA's memory numbers.


def device_limit_bytes(mesh: Mesh) -> int:
    """Memory of one device of ``mesh``: the accelerator's ``bytes_limit``; on CPU the host's
    physical memory divided among its local devices (simulated CPU devices share it)."""
    dev = mesh.devices.flat[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // max(jax.local_device_count(), 1)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """XLA's per-device bytes of one compiled program (``compiled.memory_analysis()``)."""

    argument: int
    output: int
    alias: int  # outputs that reuse donated arguments' buffers
    temp: int
    limit: int  # the device's memory (:func:`device_limit_bytes`)
    mesh: str  # :func:`describe` of the mesh tried

    @property
    def peak(self) -> int:
        """argument + output − alias + temp (XLA:CPU's own peak leaves temp out)."""
        return self.argument + self.output - self.alias + self.temp

    @property
    def fits(self) -> bool:
        return self.peak <= self.limit

    def line(self) -> str:
        g = 2**30
        return (
            f"per device: {self.peak / g:.2f} GiB of {self.limit / g:.2f} GiB (arguments "
            f"{self.argument / g:.2f}, outputs {self.output / g:.2f}, aliased {self.alias / g:.2f}, "
            f"temporaries {self.temp / g:.2f}); {self.mesh}"
        )


def memory_report(compiled, mesh: Mesh, train: TrainConfig, limit: int | None = None):
    """:class:`MemoryReport` of a compiled program on ``mesh``."""
    m = compiled.memory_analysis()
    return MemoryReport(
        argument=int(m.argument_size_in_bytes),
        output=int(m.output_size_in_bytes),
        alias=int(m.alias_size_in_bytes),
        temp=int(m.temp_size_in_bytes),
        limit=device_limit_bytes(mesh) if limit is None else limit,
        mesh=describe(mesh, train),
    )


def call_args(cfg: Config, fns: ShardedFns, runs: int | None = None):
    """Abstract arguments (shapes, dtypes, shardings) of ``fns.call`` for ``cfg``."""
    from stability import train as T

    hp = {
        k: jax.ShapeDtypeStruct((runs,) if runs else (), np.float32, sharding=fns.hp)
        for k in T.hyperparams(cfg)
    }
    B, T1 = cfg.data.batch_size, cfg.data.seq_len + 1
    batches = {
        "tokens": jax.ShapeDtypeStruct((fns.k_max, B, T1), np.int32, sharding=fns.batches)
    }
    n = jax.ShapeDtypeStruct((), np.int32, sharding=NamedSharding(fns.mesh, P()))
    return fns.abstract_state, hp, batches, n


def refuse_unless_fits(report: MemoryReport, cfg: Config, runs: int | None = None) -> MemoryReport:
    """``report`` if the program fits its device, else ConfigError naming the numbers."""
    if not report.fits:
        m, d = cfg.model, cfg.data
        raise ConfigError(
            f"config (model.d_model={m.d_model}, model.n_layers={m.n_layers}, "
            f"data.batch_size={d.batch_size}, data.seq_len={d.seq_len}"
            f"{f', {runs} runs' if runs else ''}) does not fit: the compiled train step needs "
            f"{report.line()}; try train.fsdp=True, train.remat='block' or 'full', "
            "train.tensor_parallel, more devices or a smaller batch"
        )
    return report


def step_memory(
    cfg: Config,
    mesh: Mesh,
    *,
    runs: int | None = None,
    limit: int | None = None,
    k_max: int | None = None,
) -> MemoryReport:
    """Compile (never run) the sharded train call of ``cfg`` on ``mesh`` (``k_max`` updates
    per call; default ``train.steps_per_call_max``) from abstract arguments and return XLA's
    per-device memory numbers. ``runs``: the stacked run count of a sweep's program."""
    from stability import train as T

    k_max = T.steps_per_call_max(cfg.train) if k_max is None else k_max
    fns = shard_train_fns(cfg, mesh, runs=runs, k_max=k_max)
    compiled = fns.call.compile(*call_args(cfg, fns, runs))
    return memory_report(compiled, mesh, cfg.train, limit)


def check_step_memory(cfg: Config, mesh: Mesh, **kwargs) -> MemoryReport:
    """:func:`step_memory`, refusing (ConfigError) a call that does not fit the device."""
    return refuse_unless_fits(step_memory(cfg, mesh, **kwargs), cfg, kwargs.get("runs"))
