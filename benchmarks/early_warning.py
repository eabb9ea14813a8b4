"""Early warning evaluated like a classifier, on shipped sweeps.

    python benchmarks/early_warning.py [--sweeps demo.py:cpu sizes.py:cpu]
        [--workdir runs/early_warning] [--margin 0.3] [--out benchmarks/results/early_warning_cpu.json]

Runs each sweep into WORKDIR/<name> (or resumes it: finished runs are read, not retrained),
then replays every detector of ``stability/watch.py`` with its default config over each run's
logged records (what the loop does while the run trains) and compares its first warning with
what happened to the run:

- a run is *unstable* when it diverged or its final eval loss ended at least ``--margin``
  nats above the best final loss of its setting (same sweep, same model, same qk switch);
- its *event step* is where it diverged, or the first logged step from which its train loss
  stayed more than ``--margin`` nats above its setting's lowest train loss at each step
  (``watch.instability``);
- a *hit* is a warning at or before the event step; the lead time is event − warning, in
  steps; a *false alarm* is a warning on a run that ended stable.

Unstable runs below their setting's best LR are mostly undertrained (they start above the
band and never catch up), not instabilities in the paper's sense; the table also counts the
unstable runs above the best LR (where the detectors are meant to act) separately.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

from stability import plots  # noqa: E402
from stability import workdir as W  # noqa: E402
from stability.config import WatchConfig, from_config_dict  # noqa: E402
from stability.sweep import run_sweep  # noqa: E402
from stability.watch import DETECTORS, Watcher, instability, lowest_losses  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def first_warnings(history: list[dict], steps: int) -> dict[str, int]:
    """{detector: step of its first warning} over a run's records (default configs)."""
    out: dict[str, int] = {}
    for e in Watcher(WatchConfig(), steps).update(history):
        if e["event"] == "warn":
            out.setdefault(e["detector"], e["step"])
    return out


def evaluate(workdirs: list[Path], margin: float) -> tuple[dict, list[dict]]:
    """(per-detector table, per-run rows) over every finished run of ``workdirs``."""
    rows = []
    for wd in workdirs:
        records = [r for r in W.results(wd)[0] if "run_id" in r]
        for setting, runs in plots.by_setting(records).items():
            hists = {r["run_id"]: W.metrics(W.run_dir(wd, r["run_id"]))[0] for r in runs}
            band = lowest_losses(list(hists.values()))
            finals = [(r["final_loss"], r["lr"]) for r in runs if r["final_loss"] is not None]
            best, best_lr = min(finals, default=(math.inf, math.inf))
            for r in runs:
                hist = hists[r["run_id"]]
                cfg = from_config_dict(r["config"])
                ended_high = r["final_loss"] is None or r["final_loss"] >= best + margin
                happened = instability(hist, band, margin) if ended_high else None
                rows.append(
                    {
                        "sweep": wd.name,
                        "setting": setting,
                        "lr": r["lr"],
                        "unstable": bool(ended_high),
                        "diverged": bool(r["diverged"]),
                        "above_best_lr": r["lr"] > best_lr,
                        "event_step": happened[1] if happened else None,
                        "warnings": first_warnings(hist, cfg.train.steps),
                        "steps": cfg.train.steps,
                    }
                )
    names = [cls.name for cls in DETECTORS.values()]
    table = {}
    for name in [*names, "any physical"]:
        unstable = [r for r in rows if r["unstable"]]
        stable = [r for r in rows if not r["unstable"]]

        def first(r, name=name):
            if name == "any physical":  # every detector but the loss-spike baseline
                ws = [v for k, v in r["warnings"].items() if k != "loss_spike"]
                return min(ws) if ws else None
            return r["warnings"].get(name)

        leads = [
            r["event_step"] - first(r)
            for r in unstable
            if first(r) is not None and r["event_step"] is not None and first(r) <= r["event_step"]
        ]
        high = [r for r in unstable if r["above_best_lr"]]
        table[name] = {
            "unstable_runs": len(unstable),
            "hits": len(leads),
            "unstable_above_best_lr": len(high),
            "hits_above_best_lr": sum(
                first(r) is not None and r["event_step"] is not None and first(r) <= r["event_step"]
                for r in high
            ),
            "median_lead_steps": statistics.median(leads) if leads else None,
            "false_alarms": sum(first(r) is not None for r in stable),
            "stable_runs": len(stable),
        }
    return table, rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweeps", nargs="+", default=["demo.py:cpu", "sizes.py:cpu"])
    p.add_argument("--workdir", default="runs/early_warning")
    p.add_argument("--margin", type=float, default=0.3, help="nats (see the module docstring)")
    p.add_argument("--out", default="benchmarks/results/early_warning_cpu.json")
    a = p.parse_args()
    workdirs = []
    for spec in a.sweeps:
        wd = Path(a.workdir) / spec.split(".py")[0]
        run_sweep(str(ROOT / "sweeps" / spec), wd, progress=True, report=False)
        workdirs.append(wd)
    table, rows = evaluate(workdirs, a.margin)
    result = {"sweeps": a.sweeps, "margin_nats": a.margin, "detectors": table, "runs": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    n = len(rows)
    print(
        f"\n{n} runs of {', '.join(a.sweeps)}; unstable: diverged or ended >= {a.margin} nats "
        "above their setting's best"
    )
    print(
        "| detector | unstable runs warned in time | of them above the best LR | "
        "median lead (steps) | false alarms (stable runs) |"
    )
    print("|---|---|---|---|---|")
    for name, t in table.items():
        lead = "" if t["median_lead_steps"] is None else f"{t['median_lead_steps']:g}"
        print(
            f"| {name} | {t['hits']} of {t['unstable_runs']} | {t['hits_above_best_lr']} of "
            f"{t['unstable_above_best_lr']} | {lead} | {t['false_alarms']} of {t['stable_runs']} |"
        )

if __name__ == "__main__":
    main()
