"""``stability report``: report.md and its figures for a sweep's or a single run's workdir.

Reads through ``workdir.py`` (local or gs://) and draws with ``plots.py`` (data in, PNG out).
"""

from __future__ import annotations

import math

from stability import plots
from stability import workdir as W


def run_record(run_dir: W.PathLike) -> tuple[dict, list[int]]:
    """(result record, unreadable line numbers) of a single-run workdir (``stability train``),
    from its config.json and metrics.jsonl. ``status``: finished (logged the last step with
    its eval loss), diverged (last record has alive=False) or unfinished. Its setting is the
    workdir's name; its loss at init is not recorded there (None)."""
    run_dir = W.path(run_dir)
    config = W.run_config(run_dir) or {}
    hist, bad = W.metrics(run_dir)
    last = hist[-1] if hist else {}
    diverged = last.get("alive") is False
    steps = (config.get("train") or {}).get("steps")
    done = not diverged and last.get("step") == steps and last.get("eval/loss") is not None
    status = "diverged" if diverged else "finished" if done else "unfinished"
    rec = {
        "run_id": run_dir.name,
        "setting": run_dir.name,
        "lr": float((config.get("optim") or {}).get("lr", math.nan)),
        "seed": plots.seed_of({"config": config}),
        "status": status,
        "final_loss": float(last["eval/loss"]) if done else None,
        "loss_at_init": None,
        "diverged": diverged,
        "diverged_step": last.get("step") if diverged else None,
        "max_attn_logit": plots.max_over_layers(last, "attn/max_logit"),
        "min_attn_entropy": plots.min_over_layers(last, "attn/entropy_min"),
        "steps": last.get("step"),
        "wall_seconds": None,
        "config": config,
        "metrics_path": str(run_dir / W.METRICS),
    }
    return rec, bad


def _run_dirs(workdir: W.Path, records: list[dict]) -> dict[str, W.Path]:
    if W.kind(workdir) == "run":
        return {r["run_id"]: workdir for r in records}
    return {r["run_id"]: W.run_dir(workdir, r["run_id"]) for r in records}


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
            outcome = f"{happened[0]} at {happened[1]}" if happened else "stable"
            cleared = {}
            for e in events:
                if e["event"] == "clear":
                    cleared.setdefault(e["detector"], e["step"])
            for e in (e for e in events if e["event"] == "warn"):
                lead = happened[1] - e["step"] if happened else None
                rows.append(
                    f"| {setting} | {r['lr']:g} | {e['detector']} | {e['step']} | "
                    f"{e.get('predicted_step') or ''} | {cleared.get(e['detector'], '')} | "
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


def histories(workdir: W.PathLike, records: list[dict]) -> dict[str, list[dict]]:
    """The metric records of each run of ``records`` (a sweep's, or a single run's)."""
    return {rid: W.metrics(d)[0] for rid, d in _run_dirs(W.path(workdir), records).items()}


def write_report(workdir: W.PathLike) -> W.Path:
    """``report.md`` plus lr_sensitivity.png, max_attn_logit.png, attn_entropy.png in a sweep
    workdir or a single run's workdir."""
    workdir = W.path(workdir)
    kind = W.kind(workdir)
    if kind == "run":
        rec, bad = run_record(workdir)
        source = "metrics.jsonl"
        if rec["status"] == "unfinished":
            raise FileNotFoundError(
                f"{workdir}: the run is unfinished (last logged step {rec['steps']} of "
                f"{rec['config'].get('train', {}).get('steps')}); rerun `stability train` on it"
            )
        records = [rec]
    else:
        records, bad = W.results(workdir)
        source = W.RESULTS
        if not records:
            raise FileNotFoundError(f"{workdir / W.RESULTS} holds no results")
    plots.plot_lr_sensitivity(records, workdir / "lr_sensitivity.png")
    plots.plot_max_attn_logit(records, workdir / "max_attn_logit.png")
    hists = histories(workdir, records)
    plots.plot_entropy_over_training(records, hists, workdir / "attn_entropy.png")
    seeds = plots.n_seeds(records)
    lines = [
        f"# {'Sweep' if kind == 'sweep' else 'Run'} report: {workdir.name}",
        "",
        "Final eval loss per learning rate ('div' = diverged). LR sensitivity = mean over the",
        "grid of min(loss, loss at init) − best loss (Wortsman et al. 2023).",
    ]
    if kind == "run" and records[0]["diverged"]:
        lines += [
            "A single run's workdir holds no loss at init: the LR sensitivity of a",
            "diverged run is n/a.",
        ]
    if seeds > 1:
        lines += [
            f"Up to {seeds} seeds per LR: a cell is the mean ± std (ddof 1) over seeds of",
            "min(loss, loss at init), with a diverged seed counted at the loss at init and",
            "'(k/n div)' when k of n seeds diverged; LR sensitivity is computed per seed, then",
            "mean ± std. † marks an LR where the seeds disagree: some diverged and others",
            f"not, or their losses span more than {plots.SEED_TOLERANCE:g} nats.",
        ]
    lines += ["", plots.summary_table(records), ""]
    seed_col = seeds > 1
    lines += [
        "| setting | lr |"
        + (" seed |" if seed_col else "")
        + " max attn logit | min attn entropy | diverged at |",
        "|---|---|" + ("---|" if seed_col else "") + "---|---|---|",
    ]
    for setting, runs in plots.by_setting(records).items():
        for r in runs:
            ml, me = r.get("max_attn_logit"), r.get("min_attn_entropy")
            lines.append(
                f"| {setting} | {r['lr']:g} |"
                + (f" {plots.seed_of(r)} |" if seed_col else "")
                + f" {'' if ml is None else f'{ml:.3g}'} | "
                f"{'' if me is None else f'{me:.3f}'} | {r.get('diverged_step') or '-'} |"
            )
    lines += warnings_section(records, hists, _run_dirs(workdir, records))
    lines += [
        "",
        "![LR sensitivity](lr_sensitivity.png)",
        "![max attention logit](max_attn_logit.png)",
        "![attention entropy](attn_entropy.png)",
    ]
    if bad:
        lines += ["", f"Skipped unreadable lines of {source}: {bad}"]
    out = workdir / "report.md"
    W.write_text(out, "\n".join(lines) + "\n")
    return out
