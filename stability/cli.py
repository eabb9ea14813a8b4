"""Command line: ``stability train | sweep | report``.

Configs are ml_collections ``get_config(arg)`` files, overridden absl-style::

    stability train --config=configs/default.py:s --config.model.qk_norm=False --workdir=runs/a

Any invalid configuration exits with status 2 and one line naming the field.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from pathlib import Path
from typing import Any

import ml_collections

from stability.config import Config, ConfigError, default_config_dict, from_config_dict

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.py"


def load_module(spec: str, what: str):
    """Import a python file given as PATH (the part before an optional ':ARG')."""
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--{what}={spec!r}: no such file")
    mod_spec = importlib.util.spec_from_file_location(f"_stability_{what}_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - a broken user file is a usage error
        raise ConfigError(f"--{what}={spec!r} failed to import: {type(e).__name__}: {e}") from e
    return module


def load_config_dict(spec: str | None) -> ml_collections.ConfigDict:
    """The ConfigDict of ``PATH[:ARG]`` (``get_config(ARG)``), or the built-in default."""
    if spec is None:
        return default_config_dict()
    path, _, arg = spec.partition(":")
    module = load_module(path, "config")
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config={spec!r} defines no get_config()")
    try:
        cd = module.get_config(arg) if arg else module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"--config={spec!r}: get_config failed: {type(e).__name__}: {e}") from e
    return ml_collections.ConfigDict(cd)


def parse_value(text: str) -> Any:
    """A command-line value: Python literal if it parses (True, 3e-4, (1, 2), 'x'), else str."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def apply_override(cd: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Set ``config.KEY`` (dotted) in place; an unknown key is a ConfigError."""
    parts = key.split(".")
    node = cd
    for i, part in enumerate(parts):
        where = ".".join(["config", *parts[: i + 1]])
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            valid = (
                ", ".join(sorted(node.keys()))
                if isinstance(node, ml_collections.ConfigDict)
                else "none"
            )
            raise ConfigError(f"--{where}: unknown config key; valid keys here: {valid}")
        if i == len(parts) - 1:
            old = node[part]
            if isinstance(old, ml_collections.ConfigDict):
                raise ConfigError(f"--{where} is a group of fields, not a value")
            if isinstance(old, (tuple, list)) and isinstance(value, str):
                value = tuple(v for v in value.split(",") if v)
            if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            with cd.unlocked():
                try:
                    node[part] = value
                except TypeError as e:
                    raise ConfigError(
                        f"--{where}={value!r} has the wrong type: expected {type(old).__name__}, "
                        f"got {type(value).__name__}"
                    ) from e
        else:
            node = node[part]


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate ``--config.KEY=VALUE`` arguments from the rest."""
    rest, overrides = [], []
    for arg in argv:
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config.") :].partition("=")
            if not eq:
                raise ConfigError(f"{arg}: expected --config.KEY=VALUE")
            overrides.append((key, value))
        else:
            rest.append(arg)
    return rest, overrides


def build_config(spec: str | None, overrides: list[tuple[str, str]]) -> Config:
    cd = load_config_dict(spec)
    for key, value in overrides:
        apply_override(cd, key, parse_value(value))
    return from_config_dict(cd)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own convention)
        raise ConfigError(message)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _Parser(prog="stability", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train one run (resumes from its workdir)")
    p_train.add_argument("--config", default=None, help="PATH[:ARG] of a get_config() file")
    p_train.add_argument("--workdir", required=True)
    p_train.add_argument("--overwrite", action="store_true", help="delete a conflicting workdir")
    p_train.add_argument("--no-progress", action="store_true")
    p_train.add_argument(
        "--check", action="store_true", help="validate config, data and memory; write nothing"
    )
    p_sweep = sub.add_parser("sweep", help="run (or resume) a sweep of many runs")
    p_sweep.add_argument("--sweep", required=True, help="PATH[:ARG] of a get_sweep() file")
    p_sweep.add_argument("--config", default=None, help="PATH[:ARG] of the base get_config() file")
    p_sweep.add_argument("--workdir", required=True)
    p_sweep.add_argument("--strategy", choices=["auto", "vmap", "sequential"], default="auto")
    p_sweep.add_argument("--max-runs-per-program", type=int, default=16)
    p_sweep.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="runs per sweep point, with train.seed = 0..N-1 and the same batches (default 1)",
    )
    p_sweep.add_argument("--no-progress", action="store_true")
    p_sweep.add_argument(
        "--check", action="store_true", help="validate every run's config; write nothing"
    )
    p_sweep.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() (auto-detects TPU pods and SLURM)",
    )
    p_sweep.add_argument(
        "--coordinator", default=None, help="HOST:PORT of process 0 (implies --distributed)"
    )
    p_sweep.add_argument("--num-processes", type=int, default=None)
    p_sweep.add_argument("--process-id", type=int, default=None)
    p_report = sub.add_parser(
        "report", help="write report.md and figures for a sweep or single-run workdir"
    )
    p_report.add_argument("workdir")
    for p in (p_train, p_sweep, p_report):
        p.error = parser.error  # type: ignore[method-assign]
    try:
        rest, overrides = split_overrides(argv)
        args = parser.parse_args(rest)
        if args.command == "train":
            return _train(args, overrides)
        if args.command == "sweep":
            return _sweep(args, overrides)
        if overrides:
            raise ConfigError("`stability report` takes no --config overrides")
        return _report(args)
    except ConfigError as e:
        print(f"stability: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


def _train(args, overrides) -> int:
    from stability.checkpoint import CheckpointError
    from stability.train import Diverged, train

    cfg = build_config(args.config, overrides)
    if args.check:
        from stability.data import make_source
        from stability.train import check_memory

        check_memory(cfg)
        make_source(cfg.data, cfg.model.vocab_size)
        print("config OK")
        return 0
    try:
        result = train(cfg, args.workdir, overwrite=args.overwrite, progress=not args.no_progress)
    except Diverged as e:
        print(f"stability: run diverged: {e}", file=sys.stderr)
        return 1
    except CheckpointError as e:
        print(f"stability: error: {e}", file=sys.stderr)
        return 1
    if result.preempted:
        print(f"preempted at step {result.steps}; rerun the same command to continue")
        return 0
    print(
        f"done: {result.steps} steps, final eval/loss {result.final_eval_loss:.4f}, "
        f"metrics in {Path(args.workdir) / 'metrics.jsonl'}"
    )
    return 0


def _sweep(args, overrides) -> int:
    import jax

    from stability import plots
    from stability.sweep import run_sweep

    if args.distributed or args.coordinator:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    records = run_sweep(
        args.sweep,
        args.workdir,
        config_spec=args.config,
        overrides=overrides,
        strategy=args.strategy,
        max_runs_per_program=args.max_runs_per_program,
        progress=not args.no_progress,
        check_only=args.check,
        seeds=args.seeds,
    )
    if args.check:
        print(f"sweep OK: {len(records)} runs")
        return 0
    if jax.process_index() != 0:
        return 0
    print(plots.summary_table(records))
    print(
        f"\nreport: {Path(args.workdir) / 'report.md'}; figures: "
        f"{Path(args.workdir) / 'lr_sensitivity.png'}, max_attn_logit.png, attn_entropy.png"
    )
    return 0


def _report(args) -> int:
    from stability import plots

    workdir = Path(args.workdir)
    if plots.workdir_kind(workdir) is None:
        raise ConfigError(
            f"{workdir}: neither a sweep workdir (results.jsonl, runs/) nor a run workdir "
            "(config.json, metrics.jsonl)"
        )
    try:
        out = plots.write_report(workdir)
    except FileNotFoundError as e:  # a sweep with no finished run yet
        raise ConfigError(str(e)) from e
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
