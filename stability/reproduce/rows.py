"""What each run of ``stability reproduce`` shows (``measure``: one row per run, read from its
records at the points the protocol fixes), and the tables the findings are built from: rows
selected, paired per seed, LR sensitivity and optimal LR over an LR grid, intervals as text."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from stability import workdir as W
from stability.plots import counted_loss, loss_at_init
from stability.reproduce.stats import t_interval

FC1 = "blocks/0/mlp/fc1/kernel"  # §3.4: "the first MLP layer of block 0"
Q = "blocks/0/attn/q/kernel"  # the query kernel, kept beside it (and logit growth's weights)
LAST_FRACTION = 0.1  # §3.4 averages gradient RMS over the final 500 of 1e5 steps; here the
# final 10% of the logged steps (at least one record)


MEASURED = (  # the keys ``measure`` reads of a run's records, besides the per-layer ones
    "logits/log_z_mean",
    "logits/mean",
    "eval/loss",
    f"grad/rms/{FC1}",
    f"grad/rms_over_eps/{FC1}",
    f"grad/rms/{Q}",
)


def measured(key: str) -> bool:
    """Whether ``measure`` reads ``key`` (the rest of each record is not kept in memory)."""
    return key in MEASURED or key.startswith(
        ("attn/max_logit/layer_", "attn/entropy_min/layer_", "param/rms/")
    )


def _finite(v: Any) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _last(hist: list[dict], key: str) -> float | None:
    return next((v for h in reversed(hist) if (v := _finite(h.get(key))) is not None), None)


def _tail_mean(hist: list[dict], key: str) -> float | None:
    """The mean of ``key`` over the final ``LAST_FRACTION`` of the logged records."""
    vals = [v for h in hist if (v := _finite(h.get(key))) is not None]
    if not vals:
        return None
    return float(np.mean(vals[-max(1, round(len(vals) * LAST_FRACTION)) :]))


def _trace(hist: list[dict], key: str) -> list[tuple[int, float]]:
    return [(h["step"], v) for h in hist if (v := _finite(h.get(key))) is not None]


def _over_layers(rec: dict, prefix: str, reduce) -> float | None:
    vals = [v for k, v in rec.items() if k.startswith(prefix) and _finite(v) is not None]
    return reduce(vals) if vals else None


def measure(record: dict, hist: list[dict], params: int) -> dict[str, Any]:
    """One run as the findings read it: its result ``record`` (results.jsonl), its logged
    ``hist`` (metrics.jsonl) and its non-embedding parameter count."""
    cfg = record["config"]
    m, o, t, d = cfg["model"], cfg["optim"], cfg["train"], cfg["data"]
    logits0 = [v for h in hist if (v := _finite(h.get("attn/max_logit/layer_0"))) is not None]
    logits = [v for h in hist if (v := _over_layers(h, "attn/max_logit/layer_", max)) is not None]
    last = hist[-1] if hist else {}
    kernels = [v for k, v in last.items() if k.startswith("param/rms/") and k.endswith("kernel")]
    return {
        "run_id": record["run_id"],
        "setting": record["setting"],
        "lr": float(record["lr"]),
        "seed": int(t["seed"]),
        "data_seed": int(d["seed"]),
        "final_loss": _finite(record.get("final_loss")),
        "loss_at_init": _finite(record.get("loss_at_init")),
        "diverged": bool(record.get("diverged")),
        "steps": t["steps"],
        "params": params,
        "d_model": m["d_model"],
        "n_layers": m["n_layers"],
        "qk_norm": m["qk_norm"],
        "warmup_steps": o["warmup_steps"],
        "weight_decay": o["weight_decay"],
        "weight_decay_mode": o["weight_decay_mode"],
        "z_loss": t["z_loss"],
        "parametrization": o["parametrization"],
        "eps": o["eps"],
        "peak_logit0": max(logits0) if logits0 else None,
        "peak_logit": max(logits) if logits else None,
        "final_entropy": _over_layers(last, "attn/entropy_min/layer_", min),
        "log_z": _last(hist, "logits/log_z_mean"),
        "mean_logit": _last(hist, "logits/mean"),
        "evals": [(h["step"], v) for h in hist if (v := _finite(h.get("eval/loss"))) is not None],
        "log_z_trace": _trace(hist, "logits/log_z_mean"),
        "mean_logit_trace": _trace(hist, "logits/mean"),
        "fc1_grad_rms": _tail_mean(hist, f"grad/rms/{FC1}"),
        "fc1_grad_over_eps": _tail_mean(hist, f"grad/rms_over_eps/{FC1}"),
        "q_grad_rms": _tail_mean(hist, f"grad/rms/{Q}"),
        "q_param_rms": _finite(last.get(f"param/rms/{Q}")),
        "param_rms": float(np.mean(kernels)) if kernels else None,
        "wall_seconds": _finite(record.get("wall_seconds")),
        "stopped": bool(record.get("stopped")),
        "data": _data(d),
    }


def _data(d: dict) -> str:
    """How the report names a run's data."""
    source = d["source"]
    if source == "tfds":
        source = f"tfds {d['tfds_name']} ({d['tokenizer']} tokens)"
    elif source == "stdlib":
        source = "the Python standard library's source files (bytes)"
    return f"{source}, batch {d['batch_size']} × {d['seq_len']} tokens"


def load_rows(workdir: W.PathLike) -> list[dict[str, Any]]:
    """One row (``measure``) per finished, diverged or stopped run of a sweep workdir."""
    from stability.config import from_config_dict
    from stability.forecast import non_embedding_params

    workdir = W.path(workdir)
    latest = {r["run_id"]: r for r in W.results(workdir)[0] if "run_id" in r and "config" in r}
    params: dict[str, int] = {}
    rows = []
    for rid, r in sorted(latest.items()):
        model = from_config_dict(r["config"]).model
        key = repr(model)
        if key not in params:
            params[key] = non_embedding_params(model)
        rows.append(measure(r, W.metrics(W.run_dir(workdir, rid), measured)[0], params[key]))
    return rows


# ---------------------------------------------------------------------------------------
# Helpers over rows.


def where(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def by_seed(rows: list[dict], fn: Callable[[list[dict]], float | None]) -> dict[int, float | None]:
    """``fn`` of each seed's rows."""
    seeds: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        seeds[r["seed"]].append(r)
    return {s: fn(rs) for s, rs in sorted(seeds.items())}


def paired(a: dict[int, float | None], b: dict[int, float | None], op=lambda x, y: x - y):
    """op(a, b) per seed that both have (None where either is None)."""
    return {
        s: None if a[s] is None or b[s] is None else op(a[s], b[s])
        for s in sorted(a.keys() & b.keys())
    }


def one(rows: list[dict], key: str) -> float | None:
    """``key`` of the single run among ``rows`` (None without exactly one)."""
    return rows[0][key] if len(rows) == 1 else None


def log10(v: float | None) -> float | None:
    return None if v is None or not v > 0 else math.log10(v)


def mean_of(values: dict[int, float | None]) -> float | None:
    vals = [v for v in values.values() if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def losses_over_grid(rows: list[dict], grid, l0: float | None) -> list[float] | None:
    """One seed's counted losses min(ℓ, ℓ0) over ``grid`` (None if a grid LR has no run)."""
    at = {r["lr"]: r for r in rows}
    if any(lr not in at for lr in grid):
        return None
    losses = [counted_loss(at[lr], l0) for lr in grid]
    return None if any(v is None for v in losses) else losses


def sensitivity(rows: list[dict], grid, setting_rows: list[dict] | None = None) -> dict:
    """Per seed: LR sensitivity over ``grid`` (§2.2: mean of min(ℓ, ℓ0) − ℓ*), and its parts
    below and above the seed's best LR (they sum to it). ℓ0: the median loss at init of
    ``setting_rows`` (default ``rows``). None for a seed whose grid is incomplete."""
    l0 = loss_at_init(setting_rows or rows)

    def parts(rs):
        curve = losses_over_grid(rs, grid, l0)
        if curve is None:
            return None
        best = int(np.argmin(curve))
        excess = [v - curve[best] for v in curve]
        n = len(curve)
        return (sum(excess) / n, sum(excess[:best]) / n, sum(excess[best + 1 :]) / n)

    out = by_seed(rows, parts)
    return {
        "total": {s: None if v is None else v[0] for s, v in out.items()},
        "below": {s: None if v is None else v[1] for s, v in out.items()},
        "above": {s: None if v is None else v[2] for s, v in out.items()},
    }


def optimum(rows: list[dict], grid) -> dict[int, float | None]:
    """Per seed: log10 of the optimal LR, the vertex of the parabola through the grid's best
    LR and its two neighbours (loss vs log10 LR), kept between those neighbours; the best
    grid LR itself where it is at an edge of the grid."""
    l0 = loss_at_init(rows)
    xs = [math.log10(lr) for lr in grid]

    def vertex(rs):
        curve = losses_over_grid(rs, grid, l0)
        if curve is None:
            return None
        i = int(np.argmin(curve))
        if i in (0, len(curve) - 1):
            return xs[i]
        a, b, _ = np.polyfit(xs[i - 1 : i + 2], curve[i - 1 : i + 2], 2)
        v = -b / (2 * a) if a > 0 else xs[i]
        return float(min(max(v, xs[i - 1]), xs[i + 1]))

    return by_seed(rows, vertex)


def fmt(v: float | None, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def interval_text(values: dict[int, float | None], spec: str = ".3f") -> str:
    """ "mean [lo, hi]" (95% t-interval over seeds) of per-seed values."""
    iv = t_interval(values.values())
    if iv["mean"] is None:
        return "–"
    if iv["lo"] is None:
        return f"{iv['mean']:{spec}} (1 seed)"
    return f"{iv['mean']:{spec}} [{iv['lo']:{spec}}, {iv['hi']:{spec}}]"


def _sizes(rows: list[dict]) -> list[int]:
    return sorted({r["d_model"] for r in rows})
