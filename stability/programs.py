"""The train step compiled under a mesh: init, the K-update call, eval, and XLA's memory check.

One builder (:func:`build`) serves ``stability train``, ``stability sweep``, ``reproduce``, the
tests and the benchmarks: the pure functions of ``step.py``, vmapped over a stack of runs
(``runs`` = R) or for one unstacked run (``runs=None``: tests, benchmarks, and restoring a
checkpoint written without a run axis), jitted with the shardings of ``sharding.py``.

Memory is XLA's word: :func:`memory_report` reads ``compiled.memory_analysis()`` of the train
call, and :func:`refuse_unless_fits` refuses a program that does not fit a device of this
host. The hand estimate (:func:`estimate_bytes`) only warns: it ignores remat and XLA's
scheduling, so it must never refuse what XLA accepts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from stability import sharding as S
from stability import step as St
from stability.compilation import Program
from stability.config import Config, ConfigError, TrainConfig
from stability.optim.build import make_optimizer


@dataclasses.dataclass(frozen=True)
class Programs:
    """The programs of one static config on one mesh.

    Stacked (``runs`` = R): ``init(seeds[R])``; ``call(state, hp, batches[k_max, B, ...], n,
    logged[k_max])`` (``step.make_call``), ``step(state, hp, batch)`` (one update) and
    ``evaluate(state, batches)`` vmapped over the state and ``hp``; batches are shared. With
    ``runs=None`` the same without the run axis. ``init``, ``call`` and ``evaluate`` are
    :class:`~stability.compilation.Program` s (compile reports on stderr, naming the mesh).
    ``state`` holds the shardings of the state (same tree), ``abstract_state`` its
    ShapeDtypeStructs with them (restore and compile-only targets).
    """

    mesh: Mesh
    runs: int | None
    init: Any
    call: Any
    step: Any
    evaluate: Any
    copy: Any  # a device copy of a state (asynchronous, unlike jnp.copy outside jit)
    freeze: Any  # freeze(state, mask[runs]): the masked runs stop updating (alive = False)
    state: Any
    abstract_state: Any
    hp: NamedSharding  # per-run scalars and metrics: over "run" when stacked
    batch: NamedSharding  # [B, ...]: one step's batch, eval batches
    batches: NamedSharding  # [k_max, B, ...]: the call's batches
    replicated: NamedSharding
    k_max: int
    rows: int  # metric rows a call returns at most
    graphdef: Any
    tx: Any


def build(cfg: Config, mesh: Mesh, *, runs: int | None = None, k_max: int = 1) -> Programs:
    """The programs of ``cfg``'s static structure (``step.static_config``) on ``mesh``; the
    call and step donate their state. Built once per process for each (static config, mesh,
    runs, k_max); init and evaluate are shared across ``k_max``."""
    return _build(St.static_config(cfg), mesh, runs, k_max)


def stack_name(runs: int | None) -> str:
    """How compile lines name a program's stack of runs."""
    return "unstacked" if runs is None else "one run" if runs == 1 else f"{runs} runs vmapped"


@functools.lru_cache(maxsize=32)
def _base(static: Config, mesh: Mesh, runs: int | None):
    """Everything of :func:`build` that does not depend on ``k_max``."""
    tx = make_optimizer(static.optim, d_model=static.model.d_model)
    graphdef = St.graphdef_of(static)
    stacked = runs is not None
    init_one = lambda seed: St.init_state(static, seed, tx)
    step_one = St.make_train_step(static, graphdef, tx)
    eval_one = St.make_evaluate(static, graphdef)
    if stacked:
        init_fn = jax.vmap(init_one)
        step_fn = jax.vmap(step_one, in_axes=(0, 0, None), spmd_axis_name="run")
        eval_fn = jax.vmap(eval_one, in_axes=(0, None), spmd_axis_name="run")
        seeds = jax.ShapeDtypeStruct((runs,), np.int32)
    else:
        init_fn, step_fn, eval_fn = init_one, step_one, eval_one
        seeds = jax.ShapeDtypeStruct((), np.int32)
    shape = jax.eval_shape(init_fn, seeds)
    state_sh = S.state_shardings(shape, mesh, static.train, stacked=stacked)
    per_run = S.run_sharding(mesh, stacked=stacked)
    batch_sh = S.batch_sharding(mesh)
    where = f" [{S.describe(mesh, static.train)}]"
    vm = f" ({stack_name(runs)})"
    key = program_key(static, mesh)
    init = jax.jit(S.with_mesh(init_fn, mesh), in_shardings=per_run, out_shardings=state_sh)
    step = jax.jit(
        S.with_mesh(step_fn, mesh),
        in_shardings=(state_sh, per_run, batch_sh),
        out_shardings=(state_sh, per_run),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        S.with_mesh(eval_fn, mesh), in_shardings=(state_sh, batch_sh), out_shardings=per_run
    )
    copy = jax.jit(lambda st: jax.tree.map(jnp.copy, st), out_shardings=state_sh)
    freeze = jax.jit(
        lambda st, mask: st._replace(alive=st.alive & ~mask),
        in_shardings=(state_sh, per_run),
        out_shardings=state_sh,
        donate_argnums=0,
    )
    return dict(
        mesh=mesh,
        runs=runs,
        init=Program(f"init{vm}{where}", init, key),
        step=step,
        evaluate=Program(f"eval{vm}{where}", evaluate, key),
        copy=copy,
        freeze=freeze,
        state=state_sh,
        abstract_state=S.abstract(shape, state_sh),
        hp=per_run,
        batch=batch_sh,
        replicated=NamedSharding(mesh, P()),
        graphdef=graphdef,
        tx=tx,
        step_fn=step_fn,
        where=where,
        key=key,
    )


@functools.lru_cache(maxsize=32)
def _build(static: Config, mesh: Mesh, runs: int | None, k_max: int) -> Programs:
    base = dict(_base(static, mesh, runs))
    step_fn, where, key = base.pop("step_fn"), base.pop("where"), base.pop("key")
    state_sh, per_run, repl = base["state"], base["hp"], base["replicated"]
    rows = St.rows_per_call(static.train, k_max)
    batches_sh = S.batch_sharding(mesh, leading=1)
    call = jax.jit(
        S.with_mesh(St.make_call(step_fn, k_max, rows), mesh),
        in_shardings=(state_sh, per_run, batches_sh, repl, repl),
        out_shardings=(
            state_sh,
            {
                "metrics": NamedSharding(mesh, P(None, "run") if runs is not None else P()),
                "alive": per_run,
                "diverged_step": per_run,
            },
        ),
        donate_argnums=0,
    )
    name = f"train call ({stack_name(runs)}, up to {k_max} updates, {rows} metric rows){where}"
    return Programs(
        **base, call=Program(name, call, key), batches=batches_sh, k_max=k_max, rows=rows
    )


def program_key(static: Config, mesh: Mesh) -> str:
    """What decides the traced programs of ``static`` on ``mesh``, besides their names (which
    hold the stack and ``k_max``) and arguments: the key of their stored executables."""
    return repr((static, mesh.axis_names, mesh.devices.shape, [d.id for d in mesh.devices.flat]))


def call_args(cfg: Config, progs: Programs):
    """Abstract arguments (shapes, dtypes, shardings) of ``progs.call`` for ``cfg``."""
    lead = (progs.runs,) if progs.runs is not None else ()
    hp = {k: jax.ShapeDtypeStruct(lead, np.float32, sharding=progs.hp) for k in St.hyperparams(cfg)}
    B, T1 = cfg.data.batch_size, cfg.data.seq_len + 1
    batches = {
        "tokens": jax.ShapeDtypeStruct((progs.k_max, B, T1), np.int32, sharding=progs.batches)
    }
    n = jax.ShapeDtypeStruct((), np.int32, sharding=progs.replicated)
    logged = jax.ShapeDtypeStruct((progs.k_max,), np.bool_, sharding=progs.replicated)
    return progs.abstract_state, hp, batches, n, logged


# ---------------------------------------------------------------------------------------
# Memory: a quick hand estimate (warns), XLA's numbers (refuse).


def estimate_bytes(cfg: Config) -> tuple[int, int]:
    """(parameter+gradient+optimizer bytes, activation bytes) of one run's train step: a
    rough upper-side estimate without remat (a warning, never a refusal)."""
    m, d = cfg.model, cfg.data
    D, L, V, N = m.d_model, m.n_layers, m.vocab_size, m.n_heads
    B, T = d.batch_size, d.seq_len
    params = V * D * (1 if m.tie_embeddings else 2) + L * (4 + 2 * m.mlp_ratio) * D * D
    state_bytes = 4 * params * 4  # params, grads, two Adam moments (float32)
    per_layer = B * T * D * (10 + 3 * m.mlp_ratio) + 3 * B * N * T * T
    act_bytes = 4 * (L * per_layer + 3 * B * T * V)
    return state_bytes, act_bytes


# Per-device bytes no device has (1 PiB): a config whose hand estimate exceeds it is refused
# before XLA is asked, whose compile can abort the process on such shapes (int64 overflows).
IMPOSSIBLE_BYTES = 2**50


def plan(cfg: Config, n_runs: int = 1) -> tuple[Mesh, int]:
    """(mesh, padded run count) of a stack of ``n_runs`` runs of ``cfg`` on every device (the
    run axis is padded with copies of the last run to a multiple of its size). Warns on
    stderr when the hand estimate exceeds a device of this host; XLA decides
    (:func:`refuse_unless_fits`), except beyond :data:`IMPOSSIBLE_BYTES`."""
    mesh = S.make_mesh(cfg, n_runs)
    n_run, n_data, n_model = (mesh.shape[a] for a in S.AXES)
    padded = -(-n_runs // n_run) * n_run
    state_b, act_b = estimate_bytes(cfg)
    state_shards = (n_data if cfg.train.fsdp else 1) * n_model
    need = (padded // n_run) * (-(-state_b // state_shards) + -(-act_b // (n_data * n_model)))
    have = S.device_limit_bytes(mesh)
    m, d = cfg.model, cfg.data
    if need > IMPOSSIBLE_BYTES:
        raise ConfigError(
            f"config (model.d_model={m.d_model}, model.n_layers={m.n_layers}, "
            f"model.vocab_size={m.vocab_size}, data.batch_size={d.batch_size}, "
            f"data.seq_len={d.seq_len}) needs an estimated {need / 2**30:.3g} GiB per device, "
            "more than any device holds"
        )
    if need > have:
        print(
            f"warning: a hand estimate (no remat) puts {padded // n_run} run(s) of "
            f"d_model={cfg.model.d_model} × {cfg.model.n_layers} layers at {need / 2**30:.1f} "
            f"GiB per device, above the device's {have / 2**30:.1f} GiB; XLA's numbers decide",
            file=sys.stderr,
        )
    return mesh, padded


# While a call runs, the loop may hold STATE_COPIES more copies of the train state on the
# device: the checkpoint snapshot of the call before, and a copy for replaying a failing
# update. HEADROOM of the device is left for what XLA's numbers do not count (the runtime,
# fragmentation, the next call's batches).
STATE_COPIES = 2
HEADROOM = 0.05


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """XLA's per-device bytes of one compiled program (``compiled.memory_analysis()``), plus
    the state copies the loop keeps beside it and a headroom."""

    argument: int
    output: int
    alias: int  # outputs that reuse donated arguments' buffers
    temp: int
    limit: int  # the device's memory (:func:`sharding.device_limit_bytes`)
    mesh: str  # :func:`sharding.describe` of the mesh tried
    state: int = 0  # one copy of the train state on this device

    @property
    def peak(self) -> int:
        """argument + output − alias + temp (XLA:CPU's own peak leaves temp out) + the state
        copies the loop keeps while the program runs."""
        return self.argument + self.output - self.alias + self.temp + STATE_COPIES * self.state

    @property
    def fits(self) -> bool:
        return self.peak <= (1 - HEADROOM) * self.limit

    def line(self) -> str:
        g = 2**30
        return (
            f"per device: {self.peak / g:.2f} GiB of {self.limit / g:.2f} GiB (arguments "
            f"{self.argument / g:.2f}, outputs {self.output / g:.2f}, aliased {self.alias / g:.2f}, "
            f"temporaries {self.temp / g:.2f}, {STATE_COPIES} state copies "
            f"{STATE_COPIES * self.state / g:.2f}; {HEADROOM:.0%} kept free); {self.mesh}"
        )


def state_bytes(abstract_state: Any) -> int:
    """Bytes of one copy of a state on one device (the largest shard of each leaf)."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(abstract_state)
    )


def memory_report(
    compiled, mesh: Mesh, train: TrainConfig, limit: int | None = None, state: int = 0
):
    """:class:`MemoryReport` of a compiled program on ``mesh``."""
    m = compiled.memory_analysis()
    return MemoryReport(
        argument=int(m.argument_size_in_bytes),
        output=int(m.output_size_in_bytes),
        alias=int(m.alias_size_in_bytes),
        temp=int(m.temp_size_in_bytes),
        limit=S.device_limit_bytes(mesh) if limit is None else limit,
        mesh=S.describe(mesh, train),
        state=state,
    )


def refuse_unless_fits(report: MemoryReport, cfg: Config, what: str = "") -> MemoryReport:
    """``report`` if the program fits its device, else ConfigError naming the numbers and the
    flags that would help. ``what`` names the program (e.g. a sweep's chunk)."""
    if not report.fits:
        m, d = cfg.model, cfg.data
        raise ConfigError(
            f"{what or 'config'} (model.d_model={m.d_model}, model.n_layers={m.n_layers}, "
            f"data.batch_size={d.batch_size}, data.seq_len={d.seq_len}) does not fit: the "
            f"compiled train call needs {report.line()}; try train.fsdp=True, "
            "train.remat='block' or 'full' with train.scan_layers=True, train.tensor_parallel, "
            "fewer runs per program "
            "(--max-runs-per-program), more devices or a smaller batch"
        )
    return report


def compile_call(cfg: Config, progs: Programs, limit: int | None = None) -> MemoryReport:
    """Compile (never run) ``progs.call`` from abstract arguments and return XLA's numbers;
    the compiled program is kept, so training reuses it."""
    compiled = progs.call.compile(*call_args(cfg, progs))
    return memory_report(compiled, progs.mesh, cfg.train, limit, state_bytes(progs.abstract_state))


def step_memory(
    cfg: Config, mesh: Mesh, *, runs: int | None = None, limit: int | None = None, k_max: int = 1
) -> MemoryReport:
    """XLA's per-device numbers of ``cfg``'s train call on ``mesh`` (``k_max`` updates per
    call; ``runs``: a stack's run count)."""
    return compile_call(cfg, build(cfg, mesh, runs=runs, k_max=k_max), limit)


def one_device(cfg: Config, k_max: int = 1) -> Programs:
    """The programs of one unstacked run of ``cfg`` on the first device, without FSDP or
    tensor parallelism (tests and benchmarks of the step itself)."""
    t = dataclasses.replace(cfg.train, fsdp=False, tensor_parallel=1)
    one = dataclasses.replace(cfg, train=t)
    return build(one, S.make_mesh(one, devices=jax.devices()[:1]), k_max=k_max)
