"""`stability reproduce`: the paper's findings as experiments run the way the paper ran them,
scaled down, judged by the pre-registered rules of ``docs/reproduce/protocol.md``.

Rooms: ``presets`` (the experiments and their settings per preset), ``stats`` (paired
t-intervals, check outcomes, the verdict rule), ``rules`` (what a run shows; each finding's
checks and mechanism), ``report`` (paper_report.md/json) and ``figures``.
"""

from __future__ import annotations

from pathlib import Path

from stability import workdir as W
from stability.config import ConfigError
from stability.reproduce.presets import NAMES, PRESET, PRESETS, points
from stability.reproduce.rows import load_rows
from stability.reproduce.rules import FINDINGS, evaluate

SWEEPS_DIR = Path(__file__).resolve().parents[2] / "sweeps"
OVERRIDABLE = ("data.", "wandb.")  # where the data, the tokenizer and logging live

__all__ = [
    "FINDINGS",
    "NAMES",
    "PRESET",
    "PRESETS",
    "evaluate",
    "load_rows",
    "points",
    "reproduce",
    "sweep_file",
]


def sweep_file(name: str) -> Path:
    """``sweeps/sizes.py`` or ``sweeps/reproduce_<name>.py``."""
    return SWEEPS_DIR / ("sizes.py" if name == "sizes" else f"reproduce_{name}.py")


def planned(workdir: W.PathLike) -> int | None:
    """Runs in a sweep workdir's plan (``sweep.json``), or None."""
    try:
        plan = W.planned_runs(workdir)
    except ConfigError:
        return None
    return None if plan is None else len(plan)


def reproduce(
    preset: str,
    workdir: W.PathLike,
    *,
    overrides: list[tuple[str, str]] = (),
    seed_offset: int = 0,
    progress: bool = True,
    report_only: bool = False,
) -> W.Path:
    """Run (or resume) every experiment of ``preset`` into ``workdir/<sweep>`` and write
    ``workdir/paper_report.md`` (with ``paper_report.json`` and figures/); returns its path.
    ``overrides``: ``--config.data.*`` and ``--config.wandb.*`` (the dataset, the tokenizer,
    logging: the accelerator preset needs ``data.tfds_data_dir`` and ``data.tokenizer_path``;
    W&B is off unless ``wandb.mode`` is given); any other field is refused: the protocol
    sets it. ``seed_offset``: the first seed (seeds
    set the initialisation and the data order). ``report_only``: train nothing, report the
    runs finished so far (ConfigError when there are none)."""
    from stability.preemption import Preemption
    from stability.reproduce.report import write_paper_report
    from stability.sweep import run_sweep

    if preset not in PRESETS:
        raise ConfigError(f"--preset={preset!r} is unknown; valid: {', '.join(PRESETS)}")
    for key, _ in overrides:
        if not key.startswith(OVERRIDABLE):
            raise ConfigError(
                f"--config.{key}: `stability reproduce` takes only --config.data.* and "
                "--config.wandb.* overrides (the dataset, the tokenizer, logging); the "
                "protocol sets every other field"
            )
    # Hundreds of runs: no W&B run each unless asked (--config.wandb.mode=offline|online);
    # every run's records are in its metrics.jsonl either way.
    if not any(k == "wandb.mode" for k, _ in overrides):
        overrides = [*overrides, ("wandb.mode", "disabled")]
    workdir = W.path(workdir)
    if report_only and not any(W.kind(workdir / n) for n in NAMES):
        raise ConfigError(
            f"--report-only: {workdir} holds no run of `stability reproduce` yet; run it "
            "without --report-only first"
        )
    with Preemption() as stop:  # one handler for every sweep: Ctrl-C stops within one call
        for name in NAMES:
            path = sweep_file(name)
            if not path.is_file():
                raise ConfigError(f"{path} is missing: `stability reproduce` runs from a checkout")
            if not report_only and not stop.decided:
                run_sweep(
                    f"{path}:{preset}",
                    workdir / name,
                    pinned=overrides,
                    seeds=PRESET[preset].seeds,
                    seed_offset=seed_offset,
                    strategy="vmap",  # a seed's LRs (and traced settings) in one program
                    max_runs_per_program=64,
                    progress=progress,
                    preemption=stop,
                    report=False,
                )
    rows = {name: load_rows(workdir / name) for name in NAMES}
    args = [f"--preset={preset}", f"--workdir={workdir}"]
    args += [f"--seed-offset={seed_offset}"] * bool(seed_offset)
    args += [f"--config.{k}={v}" for k, v in overrides if (k, v) != ("wandb.mode", "disabled")]
    return write_paper_report(
        evaluate(rows, PRESET[preset]),
        rows,
        workdir,
        preset,
        planned={name: planned(workdir / name) for name in NAMES},
        partial=stop.decided,
        seed_offset=seed_offset,
        command="stability reproduce " + " ".join(args),
    )
