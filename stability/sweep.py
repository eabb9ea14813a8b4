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

All runs of a chunk see the same batches. A run that diverges is frozen inside the step and
never changes another run's numbers. Results are appended to ``results.jsonl`` (one record per
finished run); per-run metric histories go to ``runs/<run_id>/metrics.jsonl``. Rerunning on the
same workdir skips finished runs and resumes unfinished chunks from their checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stability import sharding as S
from stability import train as T
from stability.checkpoint import Checkpointer
from stability.compilation import setup_compilation_cache
from stability.config import Config, ConfigError, from_config_dict
from stability.configfiles import apply_override, load_config_dict, load_sweep, parse_value
from stability.data import feed, make_source
from stability.tracking import (
    Tracker,
    append_jsonl,
    read_jsonl,
    to_jsonable,
    truncate_metrics,
    write_json_atomic,
)

Strategy = Literal["auto", "vmap", "sequential"]


@dataclass(frozen=True)
class Run:
    run_id: str
    setting: str  # what differs from the other runs besides the LR, "leaf=value,..."
    overrides: dict[str, Any]  # the sweep point's own overrides
    config: Config


def check_manifest(workdir: Path, runs: list[Run], spec: str) -> None:
    """Refuse (ConfigError) a workdir whose ``sweep.json`` lists other runs, saying what differs:
    the first differing run (and its first differing config field when it has started) and the
    run counts."""
    path = workdir / "sweep.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
        old_ids = [str(x) for x in old["run_ids"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is unreadable ({type(e).__name__}); use another workdir") from e
    new_ids = [r.run_id for r in runs]
    if old_ids == new_ids:
        return
    n = min(len(old_ids), len(new_ids))
    i = next((j for j in range(n) if old_ids[j] != new_ids[j]), n)
    there = old_ids[i] if i < len(old_ids) else "none"
    now = new_ids[i] if i < len(new_ids) else "none"
    detail = ""
    old_cfg = workdir / "runs" / there / "config.json"
    if i < n and old_cfg.exists():
        new_cfg = to_jsonable(runs[i].config.to_dict())
        detail = f" ({T.first_difference(json.loads(old_cfg.read_text()), new_cfg)})"
    raise ConfigError(
        f"--workdir={workdir} holds a different sweep: {old.get('spec')!r} with {len(old_ids)} "
        f"runs there, {spec!r} with {len(new_ids)} runs now, "
        f"{len(set(old_ids) & set(new_ids))} in common; run {i} is {there} there, {now} now"
        f"{detail}; use another workdir"
    )


def build_runs(
    points: list[dict[str, Any]],
    config_spec: str | None,
    cli_overrides: list[tuple[str, str]],
    seeds: int = 1,
) -> list[Run]:
    """Configs for every sweep point: base config, then command-line overrides, then the
    point's own overrides (so a point's LR is never collapsed by a global override).

    seeds > 1: every point becomes ``seeds`` runs with train.seed = 0 … seeds−1 (data.seed is
    kept: the seeds of a point see the same batches) and run ids
    ``{setting}-lr{lr}-s{seed}-{hash}``; with one seed the run ids carry no seed (as in the
    workdirs of earlier one-seed sweeps)."""
    if seeds < 1:
        raise ConfigError(f"--seeds={seeds} must be >= 1")
    if seeds > 1 and "train.seed" in {*dict(cli_overrides), *(k for p in points for k in p)}:
        raise ConfigError(
            f"--seeds={seeds} sets train.seed to 0..{seeds - 1}; remove train.seed from the "
            "sweep's points and the command line"
        )
    for key, _ in cli_overrides:
        if any(key in p for p in points):
            raise ConfigError(
                f"--config.{key} is set by the sweep's points, so the command line cannot "
                "override it; edit the sweep file instead"
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
        try:
            configs.append(from_config_dict(cd))
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
        for seed in range(seeds) if seeds > 1 else [None]:
            c = cfg if seed is None else replace(cfg, train=replace(cfg.train, seed=seed))
            digest = hashlib.sha1(
                json.dumps(to_jsonable(c.to_dict()), sort_keys=True).encode()
            ).hexdigest()
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
    """Groups of runs with identical static config, split into programs of ≤ max_runs."""
    groups: dict[Config, list[Run]] = {}
    for run in runs:
        groups.setdefault(T.static_config(run.config), []).append(run)
    size = 1 if strategy == "sequential" else max_runs
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]


# ---------------------------------------------------------------------------------------
# Executing one chunk.


class ChunkRunner:
    """Trains the runs of one chunk (same static config) as one vmapped program."""

    def __init__(self, runs: list[Run], workdir: Path, sweep_name: str, progress: bool):
        self.runs, self.workdir, self.sweep_name, self.progress = (
            runs,
            workdir,
            sweep_name,
            progress,
        )
        self.cfg = runs[0].config
        ids = ",".join(r.run_id for r in runs)
        self.chunk_dir = workdir / "chunks" / hashlib.sha1(ids.encode()).hexdigest()[:12]
        self.k = len(runs)
        # The run axis is padded to a multiple of its size with copies of the last run (their
        # results are discarded).
        self.mesh, self.k_pad = T.plan_check(self.cfg, self.k)
        self.fns = S.shard_train_fns(
            self.cfg, self.mesh, runs=self.k_pad, k_max=T.steps_per_call_max(self.cfg.train)
        )
        self.run_sharding = self.fns.hp
        self.stopped_at = 0  # the step checkpointed when preempted

    def _padded(self, values: list) -> np.ndarray:
        return np.asarray(values + [values[-1]] * (self.k_pad - self.k))

    def run(self, preemption: T.Preemption) -> dict[str, dict[str, Any]] | None:
        """Train the chunk; result records by run_id, or None if preempted (SIGTERM, Ctrl-C;
        ``self.stopped_at`` is then the step checkpointed)."""
        cfg, t = self.cfg, self.cfg.train
        source = make_source(cfg.data, cfg.model.vocab_size)
        fns = self.fns
        # XLA's memory numbers of the train call, compiled once here and run below.
        S.refuse_unless_fits(
            S.memory_report(fns.call.compile(*S.call_args(cfg, fns, self.k_pad)), self.mesh, t),
            cfg,
            self.k_pad,
        )
        train_feed = T.Feed(source, cfg.data.seed, cfg, fns.batches, fns.k_max)
        eval_batches = [
            jax.tree.map(lambda x: S.from_host(x, fns.batch), b)
            for b in source.eval_batches(t.eval_batches)
        ]
        seeds = S.from_host(
            self._padded([r.config.train.seed for r in self.runs]).astype(np.int32),
            self.run_sharding,
        )
        hp_list = [T.hyperparams(r.config) for r in self.runs]
        hp = {
            k: S.from_host(
                self._padded([float(h[k]) for h in hp_list]).astype(np.float32), self.run_sharding
            )
            for k in hp_list[0]
        }
        ckpt = Checkpointer(self.chunk_dir / "checkpoints", t.max_to_keep)
        start = 0
        restored = ckpt.restore_latest(fns.abstract_state)  # onto this chunk's mesh
        if restored is not None:  # a resume neither compiles nor runs init
            start, state, meta = restored
            train_feed.stream.restore(meta["stream"])
            init_loss = np.asarray(meta["loss_at_init"])
        else:
            state = fns.init(seeds)
            init_loss = S.to_host(fns.evaluate(state, eval_batches))
        is_main = jax.process_index() == 0
        trackers = []
        for r in self.runs:
            run_dir = self.workdir / "runs" / r.run_id
            if is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
                write_json_atomic(run_dir / "config.json", to_jsonable(r.config.to_dict()))
                truncate_metrics(run_dir / "metrics.jsonl", start)
                trackers.append(
                    Tracker(
                        run_dir,
                        r.config.wandb,
                        {
                            **to_jsonable(r.config.to_dict()),
                            "setting": r.setting,
                            "lr": r.config.optim.lr,
                            "run_id": r.run_id,
                            "data_description": source.description,
                        },
                        name=r.run_id,
                        group=r.config.wandb.group or self.sweep_name,
                        tags=tuple(_tags(r.config)),
                        resume=start > 0,
                    )
                )
        t0 = time.time()
        last = {}
        try:
            last = self._loop(
                state,
                hp,
                train_feed,
                eval_batches,
                fns,
                ckpt,
                trackers,
                start,
                init_loss,
                preemption,
            )
            if last is not None:
                for i, tracker in enumerate(trackers):  # ℓ0 for LR sensitivity read from W&B
                    tracker.summary({"loss_at_init": float(init_loss[i])})
        finally:
            for tr in trackers:
                tr.close()
            ckpt.close()
        wall = time.time() - t0
        if last is None:
            return None
        finals = {}
        for i, r in enumerate(self.runs):
            rec = last.get(i)
            if rec is None:  # finished earlier: read the last record from its history
                hist = read_jsonl(self.workdir / "runs" / r.run_id / "metrics.jsonl")[0]
                rec = hist[-1] if hist else {}
            finals[r.run_id] = _result_record(r, rec, float(init_loss[i]), wall)
        return finals

    def _loop(
        self, state, hp, train_feed, eval_batches, fns, ckpt, trackers, start, init_loss, preemption
    ):
        """Train to the end, K updates per device call (``T.make_call``); returns the last
        record of each run, or None if preempted. A run that died inside a call gets the
        record of its failing update (replayed on its frozen state), and no record after it."""
        from tqdm import tqdm

        t = self.cfg.train
        tokens_per_step = self.cfg.data.batch_size * self.cfg.data.seq_len * self.k
        bar = tqdm(
            total=t.steps,
            initial=start,
            disable=not self.progress or jax.process_index() != 0,
            dynamic_ncols=True,
            desc=f"{self.runs[0].setting} x{self.k}",
            file=sys.stderr,
            unit="step",
        )
        repl = NamedSharding(self.mesh, P())
        last_records: dict[int, dict] = {}
        # Runs dead at a resumed checkpoint logged their last record before it was written.
        logged_dead = {i for i, a in enumerate(S.to_host(state.alive)[: self.k]) if not a}

        def log(i: int, step: int, host: dict, tokens_per_sec: float) -> None:
            rec = {
                "step": step,
                **{k: v[i] for k, v in host.items()},
                "perf/tokens_per_sec": tokens_per_sec / self.k,
            }
            if trackers:
                trackers[i].log(rec)
            last_records[i] = to_jsonable(rec)

        is_eval = lambda s: s % t.eval_every == 0 or s == t.steps
        is_log = lambda s: s % t.log_every == 0 or is_eval(s)
        is_ckpt = lambda s: s % t.checkpoint_every == 0 or s == t.steps
        plan = T.call_ends(start, t.steps, lambda s: is_log(s) or is_ckpt(s), train_feed.k_max)
        sizes = [e - s for s, e in zip([start, *plan], plan, strict=False)]
        prefetch = train_feed.prefetch(sizes)
        last_time = time.time()
        span_time, span_step = last_time, start  # tokens/s of a record: since the previous one
        try:
            for end, n in zip(plan, sizes, strict=True):
                batches, host, stream_state = prefetch.next()
                state, out = fns.call(state, hp, batches, S.from_host(np.int32(n), repl))
                if is_eval(end):
                    out["eval/loss"] = fns.evaluate(state, eval_batches)
                out["alive"].block_until_ready()  # the host waits here, once per call
                now = time.time()
                tps = tokens_per_step * n / max(now - last_time, 1e-9)
                span_tps = tokens_per_step * (end - span_step) / max(now - span_time, 1e-9)
                last_time = now
                # One gather per call: every metric on logged steps, else `alive` (and every
                # metric only if a run died).
                host_out = S.to_host(out) if is_log(end) else None
                alive = (host_out or S.to_host({"alive": out["alive"]}))["alive"][: self.k]
                if host_out is None and not alive.all():
                    host_out = S.to_host(out)
                newly_dead = [i for i in range(self.k) if not alive[i] and i not in logged_dead]
                if newly_dead:
                    died = S.to_host(state.diverged_step)
                    for d in sorted({int(died[i]) for i in newly_dead}):
                        replay = host_out
                        if d != end:  # the failing update again, on the frozen states
                            copy = jax.tree.map(jnp.copy, state)
                            one = train_feed.single(host, n - (end - d) - 1)
                            n_one = S.from_host(np.int32(1), repl)
                            replay = S.to_host(fns.call(copy, hp, one, n_one)[1])
                        for i in newly_dead:
                            if died[i] == d:
                                log(i, d, replay, span_tps)
                                logged_dead.add(i)
                if is_log(end):
                    for i in range(self.k):
                        if i not in logged_dead:
                            log(i, end, host_out, span_tps)
                    span_time, span_step = now, end
                bar.set_postfix(
                    loss=f"{np.nanmin(host_out['train/loss'][: self.k]):.3f}"
                    if host_out is not None
                    else "…",
                    alive=int(alive.sum()),
                    tok_s=f"{tps:.0f}",
                )
                if is_ckpt(end) or preemption.requested:
                    meta = {
                        "stream": feed.gather_stream_state(stream_state),
                        "loss_at_init": [float(x) for x in init_loss],
                    }
                    ckpt.save(end, state, meta)
                bar.update(n)
                if preemption.requested and end < t.steps:
                    self.stopped_at = end
                    return None
        finally:
            prefetch.close()
            bar.close()
        return last_records


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


def _result_record(run: Run, rec: dict, loss_at_init: float, wall: float) -> dict[str, Any]:
    L = run.config.model.n_layers
    diverged = not rec.get("alive", False)
    max_logit = [rec.get(f"attn/max_logit/layer_{i}") for i in range(L)]
    min_ent = [rec.get(f"attn/entropy_min/layer_{i}") for i in range(L)]
    return {
        "run_id": run.run_id,
        "setting": run.setting,
        "lr": run.config.optim.lr,
        "final_loss": None if diverged else _finite(rec.get("eval/loss")),
        "loss_at_init": loss_at_init,
        "diverged": diverged,
        "diverged_step": rec.get("step") if diverged else None,
        "max_attn_logit": _finite(max(v for v in max_logit if v is not None))
        if any(v is not None for v in max_logit)
        else None,
        "min_attn_entropy": _finite(min(v for v in min_ent if v is not None))
        if any(v is not None for v in min_ent)
        else None,
        "steps": rec.get("step"),
        "wall_seconds": wall,
        "overrides": to_jsonable(run.overrides),
        "config": to_jsonable(run.config.to_dict()),
    }


# ---------------------------------------------------------------------------------------
# The sweep driver.


def read_results(workdir: str | Path) -> tuple[list[dict], list[int]]:
    """Records of ``results.jsonl`` (torn or foreign lines skipped and returned by number)."""
    return read_jsonl(Path(workdir) / "results.jsonl")


def _plan(sweep_spec, config_spec, overrides, strategy, max_runs_per_program, seeds=1):
    """(sweep name, runs, strategy) after validating every run: config, memory, data."""
    if max_runs_per_program < 1:
        raise ConfigError(f"--max-runs-per-program={max_runs_per_program} must be >= 1")
    name, points = load_sweep(sweep_spec)
    runs = build_runs(points, config_spec, list(overrides), seeds)
    strat = choose_strategy(strategy)
    for chunk in chunks_of(runs, strat, max_runs_per_program):  # refuse what cannot fit
        T.plan_check(chunk[0].config, len(chunk))
    for r in runs:  # validate every data source before anything is written
        make_source(r.config.data, r.config.model.vocab_size)
    return name, runs, strat


def run_sweep(
    sweep_spec: str,
    workdir: str | Path,
    *,
    config_spec: str | None = None,
    overrides: list[tuple[str, str]] = (),
    strategy: Strategy = "auto",
    max_runs_per_program: int = 16,
    progress: bool = True,
    report: bool = True,
    check_only: bool = False,
    seeds: int = 1,
) -> list:
    """Run (or resume) a sweep into ``workdir``; returns the result records (with
    ``check_only``: validate everything, write nothing, return the runs). ``seeds``: runs per
    sweep point (``build_runs``). SIGTERM at any point checkpoints the running chunk and returns."""
    with T.Preemption() as preemption:
        name, runs, strat = _plan(
            sweep_spec, config_spec, overrides, strategy, max_runs_per_program, seeds
        )
        workdir = Path(workdir)
        check_manifest(workdir, runs, sweep_spec)
        if check_only:  # XLA's numbers: each program's train call compiled, never run
            programs = {}
            for c in chunks_of(runs, strat, max_runs_per_program):
                programs.setdefault((T.static_config(c[0].config), len(c)), c)
            for c in programs.values():
                mesh, padded = T.plan_check(c[0].config, len(c))
                report = S.check_step_memory(c[0].config, mesh, runs=padded)
                print(f"{c[0].setting} ×{len(c)} train call {report.line()}")
            return runs
        setup_compilation_cache()
        manifest = {"sweep": name, "spec": sweep_spec, "run_ids": [r.run_id for r in runs]}
        manifest_path = workdir / "sweep.json"
        is_main = jax.process_index() == 0
        if is_main:
            workdir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(manifest_path, manifest)
        done, bad = read_results(workdir)
        if bad:
            print(
                f"warning: {workdir / 'results.jsonl'}: skipped unreadable lines {bad}",
                file=sys.stderr,
            )
        done_ids = {r.get("run_id") for r in done}
        todo = [r for r in runs if r.run_id not in done_ids]
        # Chunks are formed over every run, so a rerun meets the same programs (and checkpoints)
        # as the first attempt; a chunk with any unfinished run runs again (from its checkpoint).
        chunks = [
            c
            for c in chunks_of(runs, strat, max_runs_per_program)
            if any(r.run_id not in done_ids for r in c)
        ]
        programs = len({(T.static_config(c[0].config), len(c)) for c in chunks})
        print(
            f"sweep {name}: {len(runs)} runs, {len(runs) - len(todo)} already finished; "
            f"{len(todo)} to train in {len(chunks)} chunk(s), {programs} compiled program(s) "
            f"({strat})",
            file=sys.stderr,
        )
        for n, chunk in enumerate(chunks, 1):
            runner = ChunkRunner(chunk, workdir, name, progress)
            mesh = "×".join(str(n) for n in runner.mesh.shape.values())  # sharding.AXES order
            lrs = sorted({r.config.optim.lr for r in chunk})
            lr = f"lr={lrs[0]:g}" if len(lrs) == 1 else f"lr={lrs[0]:g}…{lrs[-1]:g}"
            print(
                f"[{n}/{len(chunks)}] {chunk[0].setting} {lr}: {len(chunk)} run(s), "
                f"run×data×model mesh {mesh}",
                file=sys.stderr,
            )
            finals = None if preemption.requested else runner.run(preemption)
            if finals is None:
                print(
                    f"interrupted at step {runner.stopped_at}; rerun the same command to continue",
                    file=sys.stderr,
                )
                return read_results(workdir)[0]
            if is_main:
                for r in chunk:
                    if r.run_id not in done_ids:
                        append_jsonl(workdir / "results.jsonl", finals[r.run_id])
        records, _ = read_results(workdir)
        if report and is_main:
            from stability import plots

            plots.write_report(workdir)
        return records
