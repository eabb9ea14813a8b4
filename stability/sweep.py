"""Many runs at once: group by static config, vmap over runs, shard over devices and hosts.

A sweep is a list of config overrides (``sweeps/*.py: get_sweep(arg)``). Runs whose static
config is identical (``train.static_config``) share one compiled program; their per-run
scalars (LR, weight decay, warmup, z-loss weight, Adam's ε, seed) are traced arrays with a
leading run axis. A group is executed in chunks of at most ``max_runs_per_program`` runs:

  vmap        each chunk is one jitted, vmapped program on the ("run", "data", "model")
              mesh of ``sharding.make_mesh`` spanning every host under jax.distributed: runs
              are sharded over "run", and devices left over when there are fewer runs than
              devices split each run's batch over "data" (data parallel; with
              ``train.fsdp`` also its state), ``train.tensor_parallel`` over "model"
  sequential  chunks of one run, reusing the same compiled step run after run
  auto        sequential on CPU (already saturated by one small model), vmap on GPU/TPU

Every chunk is trained by the one loop (``loop.py``), as ``stability train`` is. Before
anything trains, the sweep compiles every chunk's program, largest first, prints XLA's
per-device numbers and refuses (exit 2, nothing written) a chunk that does not fit; training
reuses those compiled programs. All runs of a chunk see the same batches. A run that diverges
is frozen inside the step and never changes another run's numbers. Results are appended to
``results.jsonl`` (one record per finished run); per-run metric histories go to
``runs/<run_id>/metrics.jsonl`` (layout: ``workdir.py``). Rerunning on the same workdir skips
finished runs and resumes unfinished chunks from their checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, replace
from typing import Any, Literal

import jax

from stability import loop as L
from stability import programs as prog
from stability import workdir as W
from stability.config import Config, ConfigError, from_config_dict, identity, typed_config
from stability.configfiles import apply_override, load_config_dict, load_sweep, parse_value
from stability.data import make_source
from stability.preemption import Preemption
from stability.step import static_config

Strategy = Literal["auto", "vmap", "sequential"]


@dataclass(frozen=True)
class Run:
    run_id: str
    setting: str  # what differs from the other runs besides the LR, "leaf=value,..."
    overrides: dict[str, Any]  # the sweep point's own overrides
    config: Config


def check_manifest(workdir: W.Path, runs: list[Run], spec: str) -> None:
    """Refuse (ConfigError) a workdir whose ``sweep.json`` lists other runs, saying what differs:
    the first differing run (and its first differing config field when it has started) and the
    run counts."""
    old = W.manifest(workdir)
    if old is None:
        return
    old_ids, new_ids = old["run_ids"], [r.run_id for r in runs]
    if old_ids == new_ids:
        return
    n = min(len(old_ids), len(new_ids))
    i = next((j for j in range(n) if old_ids[j] != new_ids[j]), n)
    there = old_ids[i] if i < len(old_ids) else "none"
    now = new_ids[i] if i < len(new_ids) else "none"
    detail = ""
    old_cfg = W.run_config(W.run_dir(workdir, there)) if i < n else None
    if old_cfg is not None:
        detail = f" ({W.first_difference(_identity_of(old_cfg), identity(runs[i].config))})"
        if "config.data.seed" in detail:  # release 0.2.0's --seeds kept one data seed
            detail += "; --seeds now varies the data order too: --seed-data=fixed keeps it"
    raise ConfigError(
        f"--workdir={workdir} holds a different sweep: {old.get('spec')!r} with {len(old_ids)} "
        f"runs there, {spec!r} with {len(new_ids)} runs now, "
        f"{len(set(old_ids) & set(new_ids))} in common; run {i} is {there} there, {now} now"
        f"{detail}; use another workdir"
    )


def _identity_of(config: dict) -> dict:
    """:func:`config.identity` of a run's config.json (as it is, if it is not a config)."""
    try:
        return identity(typed_config(config))
    except ConfigError:
        return config


def build_runs(
    points: list[dict[str, Any]],
    config_spec: str | None,
    cli_overrides: list[tuple[str, str]],
    seeds: int = 1,
    pinned: list[tuple[str, str]] = (),
    seed_offset: int = 0,
    seed_data: Literal["vary", "fixed"] = "vary",
) -> list[Run]:
    """Configs for every sweep point: base config, then command-line overrides, then the
    point's own overrides (so a point's LR is never collapsed by a global override), then
    ``pinned`` overrides, which win over the points (``stability reproduce``'s data).

    seeds > 1 (or a ``seed_offset``): every point becomes ``seeds`` runs with train.seed =
    seed_offset … seed_offset + seeds − 1 and run ids ``{setting}-lr{lr}-s{seed}-{hash}``;
    with ``seed_data="vary"`` each run's data.seed is its train.seed too (the seeds see other
    batches: initialisation and data order both vary), with "fixed" (release 0.2.0's seeds)
    every seed keeps the config's data.seed. With one seed and no offset the run ids carry no
    seed (as in the workdirs of earlier one-seed sweeps)."""
    if seeds < 1:
        raise ConfigError(f"--seeds={seeds} must be >= 1")
    if seed_offset < 0:
        raise ConfigError(f"--seed-offset={seed_offset} must be >= 0")
    if seed_data not in ("vary", "fixed"):
        raise ConfigError(f"--seed-data={seed_data!r} is not valid; valid: 'vary', 'fixed'")
    for key, _ in cli_overrides:
        if any(key in p for p in points):
            raise ConfigError(
                f"--config.{key} is set by the sweep's points, so the command line cannot "
                "override it; edit the sweep file instead"
            )
    seeded = seeds > 1 or seed_offset > 0
    owned = {"train.seed"} | ({"data.seed"} if seed_data == "vary" else set())
    for key in sorted(owned & {*dict(cli_overrides), *(k for p in points for k in p)}):
        if seeded:
            raise ConfigError(
                f"--seeds={seeds} --seed-offset={seed_offset} set {key} for every run; remove "
                f"{key} from the sweep's points and the command line"
                + (" (or pass --seed-data=fixed)" if key == "data.seed" else "")
            )
    configs = []
    for i, point in enumerate(points):
        cd = load_config_dict(config_spec)
        for key, value in cli_overrides:
            apply_override(cd, key, parse_value(value))
        for key, value in point.items():
            try:
                apply_override(cd, key, value)
            except ConfigError as e:
                raise ConfigError(f"sweep point {i}: {e}") from e
        for key, value in pinned:
            apply_override(cd, key, parse_value(value))
        try:
            explicit = {k for k, _ in [*cli_overrides, *pinned]} | set(point)
            configs.append(from_config_dict(cd, explicit))
        except ConfigError as e:
            raise ConfigError(f"sweep point {i} {point}: {e}") from e
    varying = sorted(
        {
            k
            for p in points
            for k in p
            if k != "optim.lr" and len({repr(q.get(k)) for q in points}) > 1
        }
    )
    runs, seen = [], set()
    for point, cfg in zip(points, configs, strict=True):
        setting = ",".join(f"{k.split('.')[-1]}={_fmt(point[k])}" for k in varying if k in point)
        setting = setting or "default"
        for seed in range(seed_offset, seed_offset + seeds) if seeded else [None]:
            c = cfg if seed is None else replace(cfg, train=replace(cfg.train, seed=seed))
            if seed is not None and seed_data == "vary":
                c = replace(c, data=replace(c.data, seed=seed))
            digest = hashlib.sha1(json.dumps(identity(c), sort_keys=True).encode()).hexdigest()
            suffix = "" if seed is None else f"-s{seed}"
            run_id = f"{_slug(setting)}-lr{c.optim.lr:g}{suffix}-{digest[:8]}"
            if run_id in seen:
                raise ConfigError(f"sweep has two identical points: {point}")
            seen.add(run_id)
            runs.append(Run(run_id, setting, point, c))
    return runs


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in text)[:60]


def choose_strategy(strategy: Strategy) -> Literal["vmap", "sequential"]:
    if strategy == "auto":
        return "sequential" if jax.default_backend() == "cpu" else "vmap"
    return strategy


def chunks_of(runs: list[Run], strategy: str, max_runs: int) -> list[list[Run]]:
    """Groups of runs with identical static config and data seed (a chunk's runs see the same
    batches), split into programs of ≤ max_runs; groups that differ only in their data seed
    share one compiled program."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((static_config(run.config), run.config.data.seed), []).append(run)
    size = 1 if strategy == "sequential" else max_runs
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]


# ---------------------------------------------------------------------------------------
# Chunks: their programs, compiled up front, and their training.


def run_label(run: Run) -> str:
    """How messages name a run: its setting and LR (and seed, with --seeds)."""
    seeded = f"-s{run.config.train.seed}-" in run.run_id
    return f"{run.setting} lr={run.config.optim.lr:g}" + (
        f" seed={run.config.train.seed}" if seeded else ""
    )


def chunk_id(chunk: list[Run]) -> str:
    return hashlib.sha1(",".join(r.run_id for r in chunk).encode()).hexdigest()[:12]


def chunk_label(chunk: list[Run]) -> str:
    """The setting and the LR range of a chunk (progress bars, messages); a chunk of one run
    is named as the run is (its seed included)."""
    if len(chunk) == 1:
        return run_label(chunk[0])
    lrs = sorted({r.config.optim.lr for r in chunk})
    lr = f"lr={lrs[0]:g}" if len(lrs) == 1 else f"lr={lrs[0]:g}…{lrs[-1]:g}"
    return f"{chunk[0].setting} {lr}"


def compile_chunks(
    chunks: list[list[Run]], preemption: Preemption | None = None
) -> dict[tuple, L.Stack] | None:
    """The plan of every distinct stack of ``chunks`` (``loop.plan_stack``: its programs
    compiled, never run), largest first by the hand estimate, with XLA's per-device numbers
    printed; ConfigError (nothing written yet) names
    the first chunk that does not fit. Keyed by (static config, runs). A stop request
    (``preemption``, decided by every process alike) is honoured between two compiles: then
    None."""
    distinct: dict[tuple, list[Run]] = {}
    for c in chunks:
        distinct.setdefault((static_config(c[0].config), len(c)), c)
    size = lambda c: len(c) * sum(prog.estimate_bytes(c[0].config))
    out = {}
    for key, c in sorted(distinct.items(), key=lambda kv: -size(kv[1])):
        if preemption is not None and (preemption.decided or preemption.stop()):
            return None
        stack = L.plan_stack(c[0].config, len(c), what=f"chunk {chunk_label(c)} ×{len(c)}")
        print(f"{chunk_label(c)} ×{len(c)}: train call {stack.memory.line()}", file=sys.stderr)
        out[key] = stack
    return out


def train_chunk(
    chunk: list[Run],
    workdir: W.Path,
    sweep_name: str,
    stack: L.Stack,
    preemption: Preemption,
    progress: bool,
) -> L.StackResult:
    """Train (or resume) one chunk through the loop."""
    specs = [
        L.RunSpec(
            r.run_id,
            r.config,
            W.run_dir(workdir, r.run_id),
            {
                **W.to_jsonable(r.config.to_dict()),
                "setting": r.setting,
                "lr": r.config.optim.lr,
                "run_id": r.run_id,
            },
            group=r.config.wandb.group or sweep_name,
            tags=tuple(_tags(r.config)),
            label=run_label(r),
        )
        for r in chunk
    ]
    return L.train_stack(
        specs,
        W.chunk_checkpoints(workdir, chunk_id(chunk)),
        label=chunk_label(chunk),
        preemption=preemption,
        progress=progress,
        stack=stack,
    )


def _tags(cfg: Config) -> list[str]:
    """The stabilizers that are on, as W&B tags."""
    m = cfg.model
    switches = {
        "qk_norm": m.qk_norm,
        "z_loss": cfg.train.z_loss > 0,
        "sigma_reparam": m.linear == "sigma_reparam",
        m.norm: m.norm != "layernorm",
        "ls_attention": m.n_local_heads > 0,
        f"{m.attention_score}_attention": m.attention_score != "softmax",
        "lssar": m.softplus_reweight,
        "attn_softcap": m.attn_softcap > 0,
        "logit_softcap": m.logit_softcap > 0,
        "sink_decorrelation": m.sink_decorrelation > 0,
        cfg.optim.name: cfg.optim.name != "adamw",
        cfg.optim.parametrization: cfg.optim.parametrization != "standard",
    }
    return [tag for tag, on in switches.items() if on]


def _finite(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def result_record(run: Run, out: L.RunOutcome, wall: float) -> dict[str, Any]:
    """The ``results.jsonl`` record of a finished, diverged or stopped run (a stopped run
    has no final loss: LR sensitivity counts it as a diverged one)."""
    rec, L_ = out.last, run.config.model.n_layers
    diverged = out.status == "diverged"
    max_logit = [v for i in range(L_) if (v := rec.get(f"attn/max_logit/layer_{i}")) is not None]
    min_ent = [v for i in range(L_) if (v := rec.get(f"attn/entropy_min/layer_{i}")) is not None]
    return {
        "run_id": run.run_id,
        "setting": run.setting,
        "lr": run.config.optim.lr,
        "final_loss": None
        if diverged or out.status == "stopped"
        else _finite(rec.get("eval/loss")),
        "loss_at_init": out.loss_at_init,
        "diverged": diverged,
        "diverged_step": out.diverged_step if diverged else None,
        "max_attn_logit": _finite(max(max_logit)) if max_logit else None,
        "min_attn_entropy": _finite(min(min_ent)) if min_ent else None,
        "steps": rec.get("step"),
        "stopped": out.status == "stopped",  # frozen by an early warning (watch.on_warning)
        "stopped_step": out.stopped_step,
        "warnings": [
            {k: e[k] for k in ("detector", "step", "predicted_step")} for e in out.warnings
        ],
        "wall_seconds": wall,
        "overrides": W.to_jsonable(run.overrides),
        "config": W.to_jsonable(run.config.to_dict()),
    }


# ---------------------------------------------------------------------------------------
# The sweep driver.


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_results(workdir: W.PathLike) -> tuple[list[dict], list[int]]:
    """Records of ``results.jsonl`` (torn or foreign lines skipped and returned by number)."""
    return W.results(workdir)


def _plan(sweep_spec, config_spec, overrides, strategy, max_runs_per_program, seeding, pinned):
    """(sweep name, runs, strategy) after validating every run's config and data."""
    if max_runs_per_program < 1:
        raise ConfigError(f"--max-runs-per-program={max_runs_per_program} must be >= 1")
    name, points = load_sweep(sweep_spec)
    runs = build_runs(points, config_spec, list(overrides), pinned=list(pinned), **seeding)
    for r in runs:  # validate every data source before anything is written
        make_source(r.config.data, r.config.model.vocab_size)
    return name, runs, choose_strategy(strategy)


def run_sweep(
    sweep_spec: str,
    workdir: W.PathLike,
    *,
    config_spec: str | None = None,
    overrides: list[tuple[str, str]] = (),
    strategy: Strategy = "auto",
    max_runs_per_program: int = 16,
    progress: bool = True,
    report: bool = True,
    check_only: bool = False,
    seeds: int = 1,
    seed_offset: int = 0,
    seed_data: Literal["vary", "fixed"] = "vary",
    preemption: Preemption | None = None,
    pinned: list[tuple[str, str]] = (),
) -> list:
    """Run (or resume) a sweep into ``workdir``; returns the result records (with
    ``check_only``: validate everything and compile every program, write nothing, return the
    runs). ``seeds``, ``seed_offset``, ``seed_data``: runs per sweep point and their seeds;
    ``pinned``: overrides that win over the points (``build_runs``). SIGTERM or Ctrl-C checkpoints the
    running chunk at its next call boundary and returns."""
    with preemption or Preemption() as pre:
        seeding = dict(seeds=seeds, seed_offset=seed_offset, seed_data=seed_data)
        name, runs, strat = _plan(
            sweep_spec, config_spec, overrides, strategy, max_runs_per_program, seeding, pinned
        )
        workdir = W.path(workdir)
        if not check_only:
            W.check_shared(workdir)  # every process reads the same results.jsonl
        check_manifest(workdir, runs, sweep_spec)
        done, bad = W.results(workdir)
        done_ids = {r.get("run_id") for r in done}
        todo = [r for r in runs if r.run_id not in done_ids]
        # Chunks are formed over every run, so a rerun meets the same programs (and checkpoints)
        # as the first attempt; a chunk with any unfinished run runs again (from its checkpoint).
        every_chunk = chunks_of(runs, strat, max_runs_per_program)
        chunks = [c for c in every_chunk if check_only or any(r.run_id not in done_ids for r in c)]
        stacks = compile_chunks(chunks, None if check_only else pre)
        if stacks is None:
            print(
                "interrupted during the up-front compile; rerun the same command to continue",
                file=sys.stderr,
            )
            return W.results(workdir)[0]
        if check_only:
            return runs
        is_main = jax.process_index() == 0
        if is_main:  # chunks whose runs all have results, left by a crash before their deletion
            for c in every_chunk:
                if c not in chunks and not c[0].config.train.keep_final_checkpoint:
                    W.remove_chunk(workdir, chunk_id(c))
            manifest = {
                "sweep": name,
                "spec": sweep_spec,
                "run_ids": [r.run_id for r in runs],
                "runs": [
                    {
                        "run_id": r.run_id,
                        "setting": r.setting,
                        "lr": r.config.optim.lr,
                        "seed": r.config.train.seed,
                    }
                    for r in runs
                ],
            }
            W.write_manifest(workdir, manifest)
            if bad:
                print(
                    f"warning: {workdir / W.RESULTS}: skipped unreadable lines {bad}",
                    file=sys.stderr,
                )
        print(
            f"sweep {name}: {len(runs)} runs, {len(runs) - len(todo)} already finished; "
            f"{len(todo)} to train in {len(chunks)} chunk(s), {len(stacks)} compiled "
            f"program(s) ({strat})",
            file=sys.stderr,
        )
        left = len(todo)
        for chunk in chunks:
            stack = stacks[(static_config(chunk[0].config), len(chunk))]
            mesh = "×".join(str(n) for n in stack.programs.mesh.shape.values())  # AXES order
            print(
                f"[{left} run(s) left] {chunk_label(chunk)}: {len(chunk)} run(s), "
                f"run×data×model mesh {mesh}",
                file=sys.stderr,
            )
            # between chunks, a stop is decided by every process alike (pre.stop)
            if pre.decided or pre.stop():
                result = None
            else:
                result = train_chunk(chunk, workdir, name, stack, pre, progress)
            if result is None or result.preempted:
                at = f" at step {result.position}" if result else ""
                print(f"interrupted{at}; rerun the same command to continue", file=sys.stderr)
                return W.results(workdir)[0]
            if is_main:
                W.append_results(
                    workdir,
                    [
                        result_record(r, out, result.wall_seconds)
                        for r, out in zip(chunk, result.runs, strict=True)
                        if r.run_id not in done_ids
                    ],
                )
            if not chunk[0].config.train.keep_final_checkpoint:
                _barrier("stability_chunk_done")  # every process has closed its checkpointer
                if is_main:  # a rerun skips these runs: their checkpoints serve nothing
                    W.remove_chunk(workdir, chunk_id(chunk))
            left -= sum(r.run_id not in done_ids for r in chunk)
            if result.notice_after_end:
                print(
                    "interrupted after a finished chunk (the notice came during its last "
                    "call); rerun the same command to continue",
                    file=sys.stderr,
                )
                return W.results(workdir)[0]
        records, _ = W.results(workdir)
        if report and is_main:
            from stability import report as R  # matplotlib: only the process that reports

            R.write_report(workdir)
        return records
