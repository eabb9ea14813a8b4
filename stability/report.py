"""``stability report``: report.md and its figures for sweep or single-run workdirs.

Reads through ``workdir.py`` (local or gs://) and draws with ``plots.py`` (data in, PNG out).
A report never says more than its data support: an LR sensitivity needs the setting's whole
planned LR grid, a sweep or run still training is reported with what it holds and marked
partial, and a single run is shown against its steps, not as a one-point LR curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stability import plots
from stability import workdir as W
from stability.tracking import flatten

PER_RUN = ("optim.lr", "train.seed")  # config leaves that never make a setting


def history_keys(key: str) -> bool:
    """The keys a sweep's report reads of each run's history (besides ``step``): the entropy
    figure's and the early warnings' outcomes."""
    return key in ("train/loss", "alive") or key.startswith("attn/entropy_min/")


def run_record(run_dir: W.PathLike) -> tuple[dict, list[int]]:
    """(result record, unreadable line numbers) of a run directory, from its config.json and
    metrics.jsonl (and events.jsonl). ``status``: finished (logged the last step with its eval
    loss), diverged (last record has alive=False), stopped (frozen by an early warning: a
    "stop" event) or unfinished. Its setting is the directory's name; its loss at init is not
    recorded there (None)."""
    run_dir = W.path(run_dir)
    config = W.run_config(run_dir) or {}
    hist, bad = W.metrics(run_dir)
    last = hist[-1] if hist else {}
    diverged = last.get("alive") is False
    steps = (config.get("train") or {}).get("steps")
    done = not diverged and last.get("step") == steps and last.get("eval/loss") is not None
    stop = next((e for e in W.events(run_dir) if e.get("event") == "stop"), None)
    status = "diverged" if diverged else "stopped" if stop else "finished" if done else "unfinished"
    rec = {
        "run_id": run_dir.name,
        "setting": run_dir.name,
        "lr": float((config.get("optim") or {}).get("lr", math.nan)),
        "seed": plots.seed_of({"config": config}),
        "status": status,
        "final_loss": float(last["eval/loss"]) if done and not stop else None,
        "loss_at_init": None,
        "diverged": diverged,
        "diverged_step": last.get("step") if diverged else None,
        "stopped": stop is not None,
        "stopped_step": stop["step"] if stop else None,
        "max_attn_logit": plots.max_over_layers(last, "attn/max_logit"),
        "min_attn_entropy": plots.min_over_layers(last, "attn/entropy_min"),
        "steps": last.get("step"),
        "wall_seconds": None,
        "config": config,
        "metrics_path": str(run_dir / W.METRICS),
    }
    return rec, bad


def pooled_settings(configs: list[dict], names: list[str]) -> list[str]:
    """Settings of single runs read together: the config leaves they differ in besides the LR,
    the seed and W&B naming ("leaf=value,..."), "default" if none, the name if alone."""
    leaves = [flatten(c) for c in configs]
    keys = sorted({k for lv in leaves for k in lv})
    varying = [
        k
        for k in keys
        if k not in PER_RUN
        and not k.startswith("wandb.")
        and len({repr(lv.get(k)) for lv in leaves}) > 1
    ]
    fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
    out = [",".join(f"{k.split('.')[-1]}={fmt(lv.get(k))}" for k in varying) for lv in leaves]
    return [s or (n if len(configs) == 1 else "default") for s, n in zip(out, names, strict=True)]


@dataclass
class Pool:
    """What a report reads: result records (finished, diverged, stopped, and unfinished
    runs), where each run's directory is, the planned LR grid per setting, what is missing."""

    records: list[dict] = field(default_factory=list)
    dirs: dict[str, W.Path] = field(default_factory=dict)  # run_id -> its run directory
    grid: dict[str, list[float]] = field(default_factory=dict)  # setting -> planned LRs
    planned: int = 0  # runs planned (sweep manifests; single runs count themselves)
    bad: list[str] = field(default_factory=list)  # "FILE: lines [...]" skipped


def read(workdirs: list[W.Path]) -> Pool:
    """The records of sweep and single-run workdirs; several sweeps' settings are prefixed
    by their workdir's name, single runs are pooled (:func:`pooled_settings`)."""
    pool = Pool()
    sweeps = [d for d in workdirs if W.kind(d) == "sweep"]
    singles = [d for d in workdirs if W.kind(d) == "run"]
    for d in sweeps:
        prefix = f"{d.name}: " if len(workdirs) > 1 else ""
        records, bad = W.results(d)
        if bad:
            pool.bad.append(f"{d / W.RESULTS}: lines {bad}")
        latest = {r["run_id"]: r for r in records if "run_id" in r and "setting" in r}
        plan = W.planned_runs(d) or [
            {"run_id": r["run_id"], "setting": r["setting"], "lr": r["lr"]} for r in latest.values()
        ]
        pool.planned += len(plan)
        for p in plan:  # every planned LR enters its setting's grid, started or not
            pool.grid.setdefault(prefix + p["setting"], []).append(float(p["lr"]))
            rec = latest.get(p["run_id"])
            if rec is None:  # planned, not finished: what its directory holds, if anything
                run_dir = W.run_dir(d, p["run_id"])
                if not (run_dir / W.CONFIG).exists():
                    continue
                rec, _ = run_record(run_dir)
                rec["run_id"] = p["run_id"]
                rec["setting"] = p["setting"]
            pool.records.append({**rec, "setting": prefix + rec["setting"]})
            pool.dirs[p["run_id"]] = W.run_dir(d, p["run_id"])
    runs = []
    for d in singles:
        rec, bad = run_record(d)
        if bad:
            pool.bad.append(f"{d / W.METRICS}: lines {bad}")
        runs.append(rec)
        pool.dirs[rec["run_id"]] = d
    for rec, setting in zip(
        runs, pooled_settings([r["config"] for r in runs], [r["run_id"] for r in runs]), strict=True
    ):
        rec["setting"] = setting
        pool.records.append(rec)
    pool.planned += len(runs)
    return pool


def _status(r: dict) -> str:
    if r.get("diverged"):
        return "diverged"
    if r.get("stopped"):
        return "stopped"
    return r.get("status") or "finished"


def warnings_section(records: list[dict], hists: dict[str, list[dict]], dirs) -> list[str]:
    """The early warnings of each run (events.jsonl) with the lead time to what happened to
    it (``watch.instability``, the band being its setting's lowest loss at each step)."""
    from stability.watch import BAND_NATS, instability, lowest_losses

    rows = []
    for setting, runs in plots.by_setting(records).items():
        band = lowest_losses([hists[r["run_id"]] for r in runs]) if len(runs) > 1 else None
        for r in runs:
            events = W.events(dirs[r["run_id"]])
            if not events:
                continue
            happened = instability(hists[r["run_id"]], band)
            # a lone run is only compared with its own history: a run that trains to a poor
            # loss never leaves its own band, so "stable" would say more than is known
            calm = "stable" if band is not None else "no rise over its own best (no run to compare)"
            outcome = f"{happened[0]} at {happened[1]}" if happened else calm
            for i, e in enumerate(events):
                if e["event"] != "warn":
                    continue
                # the clear that ends this warning: the detector's next clear, if any
                cleared = next(
                    (
                        c["step"]
                        for c in events[i + 1 :]
                        if c["event"] == "clear" and c["detector"] == e["detector"]
                    ),
                    "",
                )
                lead = happened[1] - e["step"] if happened else None
                rows.append(
                    f"| {setting} | {r['lr']:g} | {e['detector']} | {e['step']} | "
                    f"{e.get('predicted_step') or ''} | {cleared} | "
                    f"{outcome} | {'' if lead is None else lead} |"
                )
    if not rows:
        return ["", "## Early warnings", "", "No run raised an early warning."]
    return [
        "",
        "## Early warnings",
        "",
        "Warnings raised while the runs trained (`stability/watch.py`; `events.jsonl` of each",
        "run). Outcome: where the run diverged, or the first logged step from which its train",
        f"loss stayed more than {BAND_NATS} nats above its setting's lowest train loss at the same",
        "step (its own lowest so far for a lone run); lead = outcome step − warning step.",
        "",
        "| setting | lr | detector | warned at step | predicted crossing | cleared at | outcome | lead (steps) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def _describe(records: list[dict]) -> str:
    """Steps, model sizes and data of the runs (from their configs; what is known)."""
    configs = [c for c in (r.get("config") for r in records) if c]
    steps = sorted({c["train"]["steps"] for c in configs if "steps" in c.get("train", {})})
    models = sorted(
        {
            f"d={m['d_model']}, {m['n_layers']} layers, {m['n_heads']} heads"
            for m in (c.get("model", {}) for c in configs)
            if {"d_model", "n_layers", "n_heads"} <= m.keys()
        }
    )
    data = sorted(
        {
            f"{d['source']}, batch {d['batch_size']} × {d['seq_len']} tokens"
            for d in (c.get("data", {}) for c in configs)
            if {"source", "batch_size", "seq_len"} <= d.keys()
        }
    )
    parts = [
        f"runs of {', '.join(map(str, steps))} steps" if steps else "",
        f"model {'; '.join(models)}" if models else "",
        f"data {'; '.join(data)}" if data else "",
    ]
    text = "; ".join(p for p in parts if p)
    return text[:1].upper() + text[1:] + "." if text else ""


def write_report(workdirs: W.PathLike | list[W.PathLike], out: W.PathLike | None = None) -> W.Path:
    """``report.md`` and its figures in ``out`` (default: the only workdir) for one or several
    sweep or single-run workdirs. FileNotFoundError when they hold no run yet."""
    dirs = [W.path(w) for w in (workdirs if isinstance(workdirs, list) else [workdirs])]
    out = W.path(out) if out is not None else dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    pool = read(dirs)
    records = pool.records
    if not records:
        raise FileNotFoundError(f"{', '.join(map(str, dirs))}: no run has started yet")
    single = len(records) == 1 and W.kind(dirs[0]) == "run"
    keep = None if single else history_keys  # a sweep's: only the columns the report uses
    hists = {r["run_id"]: W.metrics(pool.dirs[r["run_id"]], keep)[0] for r in records}
    done = [r for r in records if _status(r) != "unfinished"]
    name = dirs[0].name if len(dirs) == 1 else ", ".join(d.name for d in dirs)
    if single:
        r = records[0]
        steps = (r["config"].get("train") or {}).get("steps")
        partial = f" (partial: step {r['steps']} of {steps})" if _status(r) == "unfinished" else ""
        lines = [f"# Run report: {name}{partial}", "", _describe(records), ""]
        plots.plot_run(hists[r["run_id"]], name, out / "run.png")
        last = hists[r["run_id"]][-1] if hists[r["run_id"]] else {}
        lines += [
            f"Status: {_status(r)}. At the last logged step ({r['steps']}): train loss "
            f"{_fmt(last.get('train/loss'), '.4f')}, max attention logit {_fmt(r['max_attn_logit'], '.3g')} "
            f"(max over layers and heads), min attention entropy {_fmt(r['min_attn_entropy'], '.3f')} nats "
            f"(min over layers and heads), last eval loss "
            f"{_fmt(next((h['eval/loss'] for h in reversed(hists[r['run_id']]) if 'eval/loss' in h), None), '.4f')}.",
            "An LR sensitivity needs several LRs: report several runs together "
            "(`stability report DIR DIR ... --out=DIR`).",
            "",
            "![the run against its steps](run.png)",
        ]
    else:
        partial = (
            f" (partial: {len(done)} of {pool.planned} runs finished)"
            if len(done) < pool.planned
            else ""
        )
        plots.plot_lr_sensitivity(done, out / "lr_sensitivity.png", grid=pool.grid or None)
        plots.plot_max_attn_logit(done, out / "max_attn_logit.png")
        plots.plot_entropy_over_training(records, hists, out / "attn_entropy.png")
        seeds = plots.n_seeds(done)
        lines = [
            f"# {'Sweep' if W.kind(dirs[0]) == 'sweep' else 'Runs'} report: {name}{partial}",
            "",
            _describe(records),
            "",
            "Final eval loss per setting and learning rate ('div' = diverged; a run stopped by",
            "an early warning counts as diverged). LR sensitivity = mean over the LR grid of",
            "min(loss, loss at init) − best loss (Wortsman et al. 2023); it reads n/a when the",
            "setting's planned LR grid is not complete (k of n LRs finished).",
        ]
        if seeds > 1:
            lines += [
                f"Up to {seeds} seeds per LR: a cell is the mean ± std (ddof 1) over seeds of",
                "min(loss, loss at init), with a diverged seed counted at the loss at init and",
                "'(k/n div)' when k of n seeds diverged; LR sensitivity is computed per seed, then",
                "mean ± std. † marks an LR where the seeds disagree: some diverged and others",
                f"not, or their losses span more than {plots.SEED_TOLERANCE:g} nats.",
            ]
        lines += ["", plots.summary_table(done, grid=pool.grid or None), ""]
        lines += [
            "Per run: status (finished, diverged, stopped by an early warning, unfinished), the",
            "last logged step, and at that step the max attention logit (max over layers and",
            "heads of the scaled pre-softmax logit) and the min attention entropy (min over",
            "layers and heads of the mean row entropy, nats).",
            "",
            "| setting | lr | seed | status | last step | max attn logit | min attn entropy | diverged at |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for setting, runs in plots.by_setting(records).items():
            for r in runs:
                lines.append(
                    f"| {setting} | {r['lr']:g} | {plots.seed_of(r)} | {_status(r)} | "
                    f"{r.get('steps') or ''} | {_fmt(r.get('max_attn_logit'), '.3g')} | "
                    f"{_fmt(r.get('min_attn_entropy'), '.3f')} | {r.get('diverged_step') or '-'} |"
                )
        lines += [
            "",
            "![LR sensitivity](lr_sensitivity.png)",
            "![max attention logit](max_attn_logit.png)",
            "![attention entropy](attn_entropy.png)",
        ]
    lines += warnings_section(records, hists, pool.dirs)
    if pool.bad:
        lines += ["", f"Skipped unreadable lines: {'; '.join(pool.bad)}"]
    path = out / "report.md"
    W.write_text(path, "\n".join(lines) + "\n")
    return path


def _fmt(v, spec: str) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)
