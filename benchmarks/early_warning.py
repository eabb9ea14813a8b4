"""Early warning evaluated as a classifier on sweeps it was not tuned on.

    python benchmarks/early_warning.py [--tune runs/reproduce_cpu/sizes]
        [--workdir runs/early_warning] [--out benchmarks/results/early_warning_cpu.json]

Tuning runs: the stdlib-bytes size family of `stability reproduce --preset=cpu`
(`sweeps/sizes.py:cpu`, seeds 0–4; run `stability reproduce` first, or pass --tune). Held-out
runs: `sweeps/heldout_markov.py` (a generated Zipf–Markov language, seeds 100–102), trained into
WORKDIR/heldout_markov here unless already there. Definitions (positives, unwarnable runs,
hits, lead times, false alarms, the tuning rule, the config-only baseline):
``stability/watch_eval.py``.

Writes the JSON (``--out``) and a precision/recall figure beside it, and prints the held-out
table next to the in-sample one.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

from stability import watch_eval as E  # noqa: E402
from stability import workdir as W  # noqa: E402
from stability.config import WatchConfig  # noqa: E402
from stability.sweep import run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ("heldout_markov.py", 3, 100)  # sweep file, seeds, seed offset


def _rate(num, den) -> str:
    return "–" if not den else f"{num} of {den}"


def _pct(v) -> str:
    return "–" if v is None else f"{v:.0%}"


def _lead(q) -> str:
    return "–" if q[1] is None else f"{q[1]:g} ({q[0]:g}–{q[2]:g})"


def _grid_point(rows: list[dict], det: str, value, confirm) -> dict:
    """Precision, recall and best-LR false alarms of one threshold on ``rows``."""
    cfg = E.watch_config(det, value, confirm)
    s = E.score(rows, lambda r: E.first_warning(r, cfg))
    keep = ("precision", "recall", "best_lr_false_alarms")
    return {"value": value, "confirm": confirm, **{k: s[k] for k in keep}}


def evaluate(tune_rows: list[dict], held_rows: list[dict]) -> dict:
    """Tune every detector on ``tune_rows``; score the chosen thresholds, the union of the
    physical detectors, the defaults and the baselines on both sets; the held-out precision /
    recall of every grid value."""
    out: dict = {"detectors": {}, "grid_heldout": {}}
    chosen_cfgs = {}
    for det in E.NAMES:
        t = E.tune(tune_rows, det)
        cfg = E.watch_config(det, t["value"], t["confirm"])
        chosen_cfgs[det] = cfg
        warn = lambda r, cfg=cfg: E.first_warning(r, cfg)  # noqa: E731
        default = E.watch_config(det)
        out["detectors"][E.NAMES[det]] = {
            "field": t["field"],
            "value": t["value"],
            "confirm": t["confirm"],
            "in_sample": t["score"],
            "heldout": E.score(held_rows, warn),
            "default_heldout": E.score(held_rows, lambda r, c=default: E.first_warning(r, c)),
        }
        out["grid_heldout"][E.NAMES[det]] = [
            _grid_point(held_rows, det, g["value"], g["confirm"])
            for g in t["grid"]
            if g["confirm"] in (None, t["confirm"])
        ]
        if det == "logit":  # what the confirmation costs in lead time
            once = E.watch_config(det, t["value"], 1)
            out["logit_confirm_1_heldout"] = E.score(
                held_rows, lambda r, c=once: E.first_warning(r, c)
            )
    physical = {d: chosen_cfgs[d] for d in E.PHYSICAL}
    out["union"] = {
        "in_sample": E.score(tune_rows, E.union_warning(physical)),
        "heldout": E.score(held_rows, E.union_warning(physical)),
    }
    weights = E.fit_logistic(tune_rows)
    out["config_only"] = {
        "weights": weights.tolist(),
        "features": ["intercept", "log10 lr", "qk_norm", "log10 params"],
        "in_sample": E.score(tune_rows, E.config_rule(weights)),
        "heldout": E.score(held_rows, E.config_rule(weights)),
    }
    return out


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stability import plots

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (name, grid) in enumerate(result["grid_heldout"].items()):
        pts = [(g["recall"], g["precision"]) for g in grid if g["precision"] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=name, **plots.style(i))
    for name, key in (("any physical detector (tuned)", "union"), ("config only", "config_only")):
        s = result[key]["heldout"]
        if s["precision"] is not None:
            ax.plot([s["recall"]], [s["precision"]], "*", markersize=12, label=name)
    ax.set_xlabel("recall (warnable unstable runs warned in time)")
    ax.set_ylabel("precision")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Held-out sweeps: each detector over its threshold grid", fontsize=10)
    ax.legend(fontsize=7)
    plots.save_png(fig, path, bbox_inches="tight")


def table(result: dict, which: str) -> list[str]:
    lines = [
        "| detector (threshold) | precision | recall | lead, median (quartiles), steps | false alarms | on best-LR runs | unwarnable (apart) |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [
        (
            f"{n} ({d['field']}={d['value']:g}"
            + (f", confirm={d['confirm']}" if d["confirm"] else "")
            + ")",
            d[which],
        )
        for n, d in result["detectors"].items()
    ]
    rows += [
        ("any physical detector", result["union"][which]),
        ("config only (logistic, step 0)", result["config_only"][which]),
    ]
    for name, s in rows:
        lines.append(
            f"| {name} | {_pct(s['precision'])} | {_rate(s['hits'], s['warnable_positives'])} | "
            f"{_lead(s['lead_quartiles'])} | {_rate(s['false_alarms'], s['negatives'])} | "
            f"{_rate(s['best_lr_false_alarms'], s['best_lr_runs'])} | {s['unwarnable']} |"
        )
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tune", nargs="+", default=["runs/reproduce_cpu/sizes"])
    p.add_argument("--workdir", default="runs/early_warning")
    p.add_argument("--out", default="benchmarks/results/early_warning_cpu.json")
    a = p.parse_args()
    t0 = time.time()
    for d in a.tune:
        if W.kind(d) != "sweep":
            raise SystemExit(
                f"{d}: no results.jsonl; run `stability reproduce --preset=cpu` first, or pass --tune DIR"
            )
    spec, seeds, offset = HELDOUT
    held = Path(a.workdir) / spec.removesuffix(".py")
    run_sweep(
        f"{ROOT / 'sweeps' / spec}:cpu",
        held,
        seeds=seeds,
        seed_offset=offset,
        strategy="vmap",
        progress=False,
        report=False,
    )
    trained = time.time() - t0
    tune_rows, held_rows = E.label_runs(a.tune), E.label_runs([held])
    result = evaluate(tune_rows, held_rows)
    result.update(
        tune=a.tune,
        heldout=[str(held)],
        heldout_seeds=list(range(offset, offset + seeds)),
        margin_nats=E.MARGIN,
        defaults_before=json.loads(
            json.dumps(WatchConfig().__dict__, default=lambda o: o.__dict__)
        ),
        runs={"tune": len(tune_rows), "heldout": len(held_rows)},
        seconds={"heldout_training": round(trained, 1), "total": round(time.time() - t0, 1)},
        unwarnable_heldout=[r["run_id"] for r in held_rows if r["unwarnable"]],
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    figure(result, out.with_suffix(".png"))
    print(
        f"Tuned on {len(tune_rows)} runs of {', '.join(a.tune)}; held out: {len(held_rows)} runs of {held}."
    )
    print("\nHeld out:\n" + "\n".join(table(result, "heldout")))
    print("\nIn sample (the tuning runs):\n" + "\n".join(table(result, "in_sample")))
    print(
        f"\n{result['seconds']['total']:.0f} s ({result['seconds']['heldout_training']:.0f} s training the held-out sweep)"
    )


if __name__ == "__main__":
    main()
