"""Command line: ``stability train | sweep | report`` (``stability COMMAND --help``).

Nothing imports this module: config and sweep files are loaded by ``configfiles.py``.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from stability.config import SIZES, ConfigError
from stability.configfiles import build_config, option_hint, split_overrides

CONFIG_HELP = "\n".join(
    textwrap.fill(paragraph, 92)
    for paragraph in (
        "Configs are Python files whose get_config(ARG) returns an ml_collections.ConfigDict: "
        "--config=PATH[:ARG]. Without --config the built-in default is used: configs/default.py, "
        "the recipe of Wortsman et al. 2023 at CPU size (d=128, 2 layers, 4 heads) on the Python "
        "standard library's source bytes. Its ARG is a size preset (e.g. "
        f"--config=configs/default.py:m): {', '.join(SIZES)}.",
        "Any field is set with --config.KEY=VALUE, KEY as in stability/config.py, e.g. "
        "--config.model.qk_norm=False --config.optim.lr=0.1.",
        "An invalid configuration exits with status 2 and one line naming the field.",
    )
)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; every option's default after its help, unless the help already
    states it, the option has none (None) or it is a flag (off by default)."""

    def _get_help_string(self, action):
        if (
            "(default" in (action.help or "")
            or action.default is None
            or isinstance(action, argparse._StoreTrueAction)
        ):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own convention)
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (one small builder each)."""
    parser = _Parser(
        prog="stability",
        description="Train one run, a sweep of many runs, or a report.\n\n" + CONFIG_HELP,
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for build in (
        _train_parser,
        _sweep_parser,
        _report_parser,
        _forecast_parser,
        _reproduce_parser,
        _prepare_parser,
    ):
        p = build(sub)
        p.error = parser.error  # type: ignore[method-assign]
    return parser


# command -> (its function, whether it takes --config.KEY=VALUE overrides)
COMMANDS = {}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        rest, overrides = split_overrides(argv)
        args, unknown = build_parser().parse_known_args(rest)
        if unknown:
            raise ConfigError(
                f"unrecognized arguments: {' '.join(unknown)}{option_hint(unknown[0])}"
            )
        run, takes_overrides = COMMANDS[args.command]
        if takes_overrides:
            return run(args, overrides)
        if overrides:
            raise ConfigError(f"`stability {args.command}` takes no --config overrides")
        return run(args)
    except ConfigError as e:
        print(f"stability: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except ImportError as e:  # etils.epath reaches gs:// through fsspec's gcsfs
        if "gcsfs" not in str(e):
            raise
        print(
            "stability: error: gs:// paths need gcsfs, which is not installed: "
            'pip install -e ".[tpu]" (or pip install gcsfs)',
            file=sys.stderr,
        )
        return 2


def _train_parser(sub) -> argparse.ArgumentParser:
    raw = _Formatter
    p = sub.add_parser(
        "train",
        help="train one run (resumes from its workdir)",
        description="Train one run in --workdir; rerunning resumes it.\n\n" + CONFIG_HELP,
        formatter_class=raw,
    )
    p.add_argument("--config", default=None, help="PATH[:ARG] of a get_config() file")
    p.add_argument(
        "--workdir",
        required=True,
        help="directory of the run: config.json, metrics.jsonl, checkpoints/, wandb/",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run in --workdir (printing what it held) and start from scratch",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--check",
        action="store_true",
        help="validate config, data, memory and the workdir; write nothing",
    )
    _jax_options(p)
    return p


def _sweep_parser(sub) -> argparse.ArgumentParser:
    raw = _Formatter
    p = sub.add_parser(
        "sweep",
        help="run (or resume) a sweep of many runs",
        description="Train every point of a sweep file's get_sweep(ARG) grid into --workdir; "
        "rerunning skips finished runs.\nShipped sweeps (sweeps/*.py) take ARG "
        "PRESET[,steps=N], PRESET cpu or accelerator; without a PRESET, cpu on a host\n"
        "without an accelerator and accelerator on one (said in one line on stderr).\n\n"
        + CONFIG_HELP,
        formatter_class=raw,
    )
    p.add_argument("--sweep", required=True, help="PATH[:ARG] of a get_sweep() file")
    p.add_argument("--config", default=None, help="PATH[:ARG] of the base get_config() file")
    p.add_argument(
        "--workdir",
        required=True,
        help="directory of the sweep: sweep.json, results.jsonl, runs/<run_id>/, report.md",
    )
    p.add_argument(
        "--strategy",
        choices=["auto", "vmap", "sequential"],
        default="auto",
        help="vmap: the runs of a group as one vmapped program; sequential: one run after "
        "another with the same compiled step; auto: sequential on CPU, else vmap",
    )
    p.add_argument(
        "--max-runs-per-program",
        type=int,
        default=16,
        metavar="K",
        help="vmap: at most K runs in one program",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="runs per sweep point, with train.seed (and data.seed: see --seed-data) = "
        "OFFSET..OFFSET+N-1",
    )
    p.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        metavar="OFFSET",
        help="the first seed (other seeds than a previous sweep's)",
    )
    p.add_argument(
        "--seed-data",
        choices=["vary", "fixed"],
        default="vary",
        help="vary: each seed also sets data.seed (another data order); fixed: every seed sees "
        "the config's batches (sweeps started with release 0.2.0)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument(
        "--check",
        action="store_true",
        help="validate every run (config, data, memory) and the workdir; write nothing",
    )
    _jax_options(p)
    return p


def _report_parser(sub) -> argparse.ArgumentParser:
    raw = _Formatter
    p = sub.add_parser(
        "report",
        help="write report.md and figures for sweep or single-run workdirs",
        description="Writes report.md and its figures for a sweep's workdir (LR sensitivity, "
        "max attention\nlogit, attention entropy, early warnings) or a single run's (its "
        "curves against steps).\nSeveral workdirs are pooled: single runs of one setting at "
        "several LRs form one LR curve.",
        formatter_class=raw,
    )
    p.add_argument("workdirs", nargs="+", metavar="DIR", help="sweep or run workdirs")
    p.add_argument(
        "--out",
        default=None,
        help="where to write them (default: the only DIR; needed for several)",
    )
    return p


def _forecast_parser(sub) -> argparse.ArgumentParser:
    raw = _Formatter
    p = sub.add_parser(
        "forecast",
        help="fit max attention logit and grad RMS/ε vs model size; predict a target size",
        description="Per setting and LR, a least-squares fit of log10(max attention logit at "
        "--step) in log10(non-embedding parameters) through the seeds' mean at each size, over "
        "sweeps spanning >= 3 sizes, extrapolated to --target-params with a 95% prediction "
        "interval; the same for gradient RMS / Adam's eps (section 3.4); optimal LR and LR "
        "sensitivity vs size. The fit of each quantity is the one that forecast held-out sizes "
        "best in the shipped calibration (docs/forecast_calibration.md), unless --method names "
        "one. Writes forecast.md, forecast.png, forecast.json.",
        formatter_class=raw,
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="sweep workdirs")
    p.add_argument(
        "--target-params",
        type=float,
        default=None,
        help="non-embedding parameters to predict (needed unless --calibrate)",
    )
    p.add_argument(
        "--step", type=int, default=None, help="step read (default: the shortest schedule's end)"
    )
    p.add_argument(
        "--threshold", type=float, default=1e4, help="max attention logit that predicts divergence"
    )
    p.add_argument(
        "--param",
        default=None,
        help="parameter of the grad RMS/eps fit (default blocks/0/attn/q/kernel)",
    )
    p.add_argument(
        "--method",
        choices=["auto", "quadratic", "linear"],
        default="auto",
        help="the fit: auto = per quantity, the calibration's choice; quadratic = the paper's",
    )
    p.add_argument(
        "--holdout-largest",
        action="store_true",
        help="also fit without the largest size and compare its prediction with the measurement",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="instead: leave each size out in turn (>= 4 others to fit) at 25/50/75/100%% of "
        "training, score the quadratic, a line and persistence (median error, interval score, "
        "coverage), check crossing flags against what happened; writes calibration.md, .json",
    )
    p.add_argument("--out", default=None, help="output folder (default DIR/forecast)")
    return p


def _reproduce_parser(sub) -> argparse.ArgumentParser:
    raw = _Formatter
    p = sub.add_parser(
        "reproduce",
        help="run the experiments behind the paper's findings; write paper_report.md",
        description="Runs (or resumes) the experiments of Wortsman et al. 2023's findings under "
        "--workdir, as docs/reproduce/protocol.md\nsets them, and writes paper_report.md: per "
        "finding the paper's claim, the setting beside the paper's, the\nmechanism, each "
        "check's effect with its 95% interval over seeds, and the verdict.\n\n"
        "Data and logging may be overridden (the protocol sets every other field):\n"
        "  --config.data.KEY=VALUE    e.g. --config.data.source=text_files "
        "--config.data.paths=a.txt,b.txt,\n"
        "                             --config.data.tfds_data_dir=DIR "
        "--config.data.tokenizer_path=T5.model\n"
        "  --config.wandb.KEY=VALUE   e.g. --config.wandb.mode=online",
        formatter_class=raw,
    )
    p.add_argument(
        "--preset",
        choices=["tiny", "cpu", "accelerator"],
        default="cpu",
        help="tiny: a smoke test of the machinery (seconds, not evidence); cpu: this "
        "machine's proxies of each finding (see docs/findings.md for its measured time); "
        "accelerator: the paper's sizes on C4 (needs --config.data.tfds_data_dir and "
        "--config.data.tokenizer_path)",
    )
    p.add_argument("--workdir", required=True, help="one sweep workdir per experiment")
    p.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        metavar="N",
        help="the first seed (each seed sets the initialisation and the data order)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--report-only", action="store_true", help="train nothing; report the finished runs"
    )
    return p


def _prepare_parser(sub) -> argparse.ArgumentParser:
    raw = _Formatter
    p = sub.add_parser(
        "prepare-data",
        help="build a tfds text dataset (C4, lm1b, ...) as ArrayRecord for data.source=tfds",
        description="Builds the tfds dataset --name under --data-dir in ArrayRecord format, the "
        "format data.source=tfds reads\n(no TensorFlow needed), from files downloaded to "
        "--manual-dir when the dataset needs them.\nThen copy --data-dir to a bucket for a pod "
        "(gsutil -m cp -r DIR gs://BUCKET/tfds).",
        formatter_class=raw,
    )
    p.add_argument("--name", required=True, help="tfds name, e.g. c4/en:3.1.0 or lm1b")
    p.add_argument("--data-dir", required=True, help="where to write the dataset")
    p.add_argument(
        "--manual-dir", default=None, help="the downloaded source files, if the dataset needs them"
    )
    return p


def _jax_options(p: argparse.ArgumentParser) -> None:
    """--distributed, --coordinator, --num-processes, --process-id, --compilation-cache."""
    p.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() (auto-detects TPU pods and SLURM)",
    )
    p.add_argument(
        "--coordinator", default=None, help="HOST:PORT of process 0 (implies --distributed)"
    )
    p.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="with --coordinator: how many processes (one per host) take part",
    )
    p.add_argument(
        "--process-id",
        type=int,
        default=None,
        help="with --coordinator: this process's rank, 0 .. num-processes − 1 (0 hosts "
        "the coordinator)",
    )
    p.add_argument(
        "--compilation-cache",
        default=None,
        metavar="DIR|off",
        help="persistent XLA compilation cache (default $STABILITY_COMPILATION_CACHE or "
        "~/.cache/stability/jax; off: none)",
    )


def _train(args, overrides) -> int:
    from stability.checkpoint import CheckpointError
    from stability.train import Diverged, train

    cfg = build_config(args.config, overrides)
    if args.check:
        from stability import loop
        from stability import workdir as W
        from stability.data import make_source

        _start_jax(args)
        make_source(cfg.data, cfg.model.vocab_size)
        workdir = W.path(args.workdir)
        if W.check_run_dir(W.to_jsonable(cfg.to_dict()), workdir, args.overwrite):
            print(f"--overwrite would delete {workdir} ({W.describe_run(workdir)})")
        elif (workdir / W.CONFIG).exists():
            print(f"{workdir} holds this run ({W.describe_run(workdir)}); it would resume")
        # XLA's numbers: the train call compiled (never run) on this mesh.
        print(f"train call {loop.plan_stack(cfg, 1).memory.line()}")
        print("config OK")
        return 0
    _start_jax(args)
    try:
        result = train(cfg, args.workdir, overwrite=args.overwrite, progress=not args.no_progress)
    except Diverged as e:
        print(f"stability: run diverged: {e}", file=sys.stderr)
        return 1
    except CheckpointError as e:
        print(f"stability: error: {e}", file=sys.stderr)
        return 1
    if result.preempted:
        print(
            f"interrupted at step {result.steps}; rerun the same command to continue",
            file=sys.stderr,
        )
        return 0
    if result.stopped_step is not None:
        cause = result.stop_cause or {}
        why = f"{cause.get('detector')} warning at step {cause.get('step')}: {cause.get('message')}"
        if result.already_stopped:
            print(
                f"{args.workdir} was stopped at step {result.stopped_step} by an early warning "
                f"({why}); nothing to train (--overwrite starts it again from step 0)",
                file=sys.stderr,
            )
        else:
            print(f"stopped at step {result.stopped_step} ({why})", file=sys.stderr)
        return 0
    print(
        f"done: {result.steps} steps, final eval/loss {result.final_eval_loss:.4f}, "
        f"metrics in {_join(args.workdir, 'metrics.jsonl')}"
    )
    if result.notice_after_end:
        print(
            "a stop notice (SIGTERM or Ctrl-C) came during the last call: the run finished first",
            file=sys.stderr,
        )
    return 0


def _join(workdir: str, name: str) -> str:
    """``workdir/name`` as the user wrote the workdir (pathlib would print gs:// as gs:/)."""
    return f"{workdir.rstrip('/')}/{name}"


def _start_jax(args) -> None:
    """jax.distributed (when asked for) and the persistent compilation cache."""
    import jax

    from stability.compilation import setup_compilation_cache

    if args.distributed or args.coordinator:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    setup_compilation_cache(args.compilation_cache)


def _sweep(args, overrides) -> int:
    import jax

    from stability.sweep import run_sweep

    _start_jax(args)
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
        seed_offset=args.seed_offset,
        seed_data=args.seed_data,
    )
    if args.check:
        print(f"sweep OK: {len(records)} runs")
        return 0
    if jax.process_index() != 0:
        return 0
    from stability import plots  # matplotlib: only the process that reports imports it
    from stability import workdir as W

    print(plots.summary_table(records, grid=W.planned_grid(args.workdir)))
    print(
        f"\nreport: {_join(args.workdir, 'report.md')}; figures: "
        f"{_join(args.workdir, 'lr_sensitivity.png')}, max_attn_logit.png, attn_entropy.png"
    )
    return 0


def _report(args) -> int:
    from stability import report
    from stability import workdir as W

    dirs = [W.path(d) for d in args.workdirs]
    for d in dirs:
        if W.kind(d) is None:
            raise ConfigError(
                f"{d}: neither a sweep workdir (results.jsonl, runs/) nor a run workdir "
                "(config.json, metrics.jsonl)"
            )
    if len(dirs) > 1 and args.out is None:
        raise ConfigError("--out=DIR is needed to pool several workdirs into one report")
    try:
        out = report.write_report(dirs if len(dirs) > 1 else dirs[0], out=args.out)
    except FileNotFoundError as e:  # a sweep with no run yet
        raise ConfigError(str(e)) from e
    print(out.read_text())
    return 0


def _forecast(args) -> int:
    import json

    from stability import workdir as W
    from stability.forecast import forecast
    from stability.forecast_report import write_forecast

    out = W.path(args.out) if args.out else W.path(args.dirs[0]) / "forecast"
    if args.calibrate:
        from stability.calibration import calibrate, to_markdown

        cal = calibrate(args.dirs, args.param)
        out.mkdir(parents=True, exist_ok=True)
        command = " ".join(["stability forecast", *args.dirs, "--calibrate"])
        W.write_text(out / "calibration.json", json.dumps(cal, indent=1) + "\n")
        W.write_text(out / "calibration.md", text := to_markdown(cal, command))
        print(text)
        return 0
    if args.target_params is None:
        raise ConfigError("--target-params=N is needed (or --calibrate)")

    fc = forecast(
        args.dirs,
        args.target_params,
        step=args.step,
        threshold=args.threshold,
        param=args.param,
        holdout_largest=args.holdout_largest,
        method=args.method,
    )
    command = " ".join(
        ["stability forecast", *args.dirs, f"--target-params={args.target_params:g}"]
        + [f"--{k.replace('_', '-')}={v}" for k in ("step", "param") if (v := getattr(args, k))]
        + [f"--threshold={args.threshold:g}"]
        + [f"--method={args.method}"] * (args.method != "auto")
        + ["--holdout-largest"] * args.holdout_largest
    )
    md = write_forecast(fc, out, command=command)
    print(md.read_text())
    return 0


def _prepare(args) -> int:
    from stability.data.tfds import prepare

    splits = prepare(args.name, args.data_dir, args.manual_dir)
    counts = ", ".join(f"{split} {n} examples" for split, n in sorted(splits.items()))
    print(f"{args.name} prepared under {args.data_dir} (ArrayRecord): {counts}")
    return 0


def _reproduce(args, overrides) -> int:
    from stability.reproduce import reproduce

    if args.seed_offset < 0:
        raise ConfigError(f"--seed-offset={args.seed_offset} must be >= 0")
    report = reproduce(
        args.preset,
        args.workdir,
        overrides=overrides,
        seed_offset=args.seed_offset,
        progress=not args.no_progress,
        report_only=args.report_only,
    )
    print(report.read_text())
    return 0


COMMANDS.update(
    train=(_train, True),
    sweep=(_sweep, True),
    reproduce=(_reproduce, True),
    report=(_report, False),
    forecast=(_forecast, False),
    **{"prepare-data": (_prepare, False)},
)


if __name__ == "__main__":
    sys.exit(main())
