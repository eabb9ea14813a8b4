"""stability.forecast on hand-written sweep workdirs whose values follow known quadratics."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from stability.cli import main
from stability.config import ConfigError
from stability.forecast import (
    DEFAULT_METHODS,
    fit_quadratic,
    forecast,
    non_embedding_params,
)
from stability.forecast_report import write_forecast
from stability.workdir import to_jsonable

Q = "blocks/0/attn/q/kernel"
WIDTHS = (8, 16, 32, 64)
STEP = 10
# log10(max logit) = 1 + 0.5·x + 0.05·x² + log10(lr / 0.01)  (x = log10 params)
COEF = (1.0, 0.5, 0.05)


def true_logit(params: float, lr: float) -> float:
    x = math.log10(params)
    return 10 ** (COEF[0] + COEF[1] * x + COEF[2] * x * x + math.log10(lr / 0.01))


def true_ratio(params: float) -> float:
    """grad RMS / ε: log-linear in params, reaching 1 at 1e9 parameters."""
    return 10 ** (9 - math.log10(params))


def write_run(workdir: Path, cfg, values: dict[int, float | None], *, diverge_at=None, loss=2.0):
    """runs/<id>/config.json + metrics.jsonl (steps 5, 10) and a results.jsonl record."""
    rid = f"d{cfg.model.d_model}-qk{cfg.model.qk_norm}-lr{cfg.optim.lr:g}-s{cfg.train.seed}"
    run_dir = workdir / "runs" / rid
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(to_jsonable(cfg.to_dict())))
    recs = []
    for s in (5, STEP):
        alive = diverge_at is None or s < diverge_at
        v = values.get(s)
        recs.append(
            {
                "step": s,
                "alive": alive,
                "attn/max_logit/layer_0": v,
                "attn/max_logit/layer_1": None if v is None else v / 2,
                f"grad/rms_over_eps/{Q}": true_ratio(non_embedding_params(cfg.model)),
            }
        )
        if not alive:
            break
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rec = {
        "run_id": rid,
        "setting": "x",
        "lr": cfg.optim.lr,
        "final_loss": None if diverge_at else loss,
        "loss_at_init": 4.0,
        "diverged": diverge_at is not None,
    }
    with open(workdir / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def cfg_of(width: int, lr: float, qk_norm: bool = False, seed: int = 0):
    return tiny_config(
        model={"d_model": width, "n_heads": max(1, width // 8), "qk_norm": qk_norm},
        optim={"lr": lr},
        train={"seed": seed, "steps": STEP},
    )


def write_sweep(workdir: Path, widths=WIDTHS, lrs=(0.01, 1.0), noise=0.0, seeds=(0,), **special):
    """One setting (qk_norm=False) × widths × lrs × seeds; ``special[(width, lr)]`` =
    dict(diverge_at=..., value=...) overrides one run."""
    rng = np.random.default_rng(0)
    workdir.mkdir(parents=True, exist_ok=True)
    for w in widths:
        for lr in lrs:
            for seed in seeds:
                cfg = cfg_of(w, lr, seed=seed)
                n = non_embedding_params(cfg.model)
                v = true_logit(n, lr) * 10 ** (noise * rng.standard_normal())
                sp = special.get(f"w{w}_lr{lr:g}", {})
                vals = {5: v / 2, STEP: sp.get("value", v)}
                write_run(workdir, cfg, vals, diverge_at=sp.get("diverge_at"), loss=2.0 + lr)
    return workdir


def test_non_embedding_params_counts_blocks_and_norms_not_embedding_or_head():
    m = cfg_of(16, 0.01, qk_norm=True).model
    d, hd = 16, 8
    block = 4 * d * d + 2 * d * 4 * d + 2 * d + 2 * hd  # q k v o, fc1 fc2, 2 norms, q/k norms
    assert non_embedding_params(m) == 2 * block + d  # + final norm
    assert non_embedding_params(dataclasses.replace(m, qk_norm=False)) == 2 * (block - 2 * hd) + d
    assert non_embedding_params(dataclasses.replace(m, vocab_size=4096)) == 2 * block + d


def test_fit_recovers_a_known_quadratic_and_its_interval_covers_noise():
    x = np.log10([6e3, 2.5e4, 1e5, 4e5, 1.6e6])
    y = COEF[0] + COEF[1] * x + COEF[2] * x**2
    fit = fit_quadratic(x, y)
    np.testing.assert_allclose(fit.coef, COEF, rtol=1e-6)
    assert fit.rss < 1e-20 and fit.dof == 2
    assert fit_quadratic(x[:3], y[:3]).interval(7.0) is None  # no residual dof
    # noisy: 5 sizes × 2 seeds, σ = 0.05 decades; over many noise draws the 95% prediction
    # interval at a new size covers a fresh draw about 95% of the time
    rng = np.random.default_rng(1)
    xs, x0 = np.repeat(x, 2), 6.5
    truth = lambda v: COEF[0] + COEF[1] * v + COEF[2] * v**2
    covered = []
    for _ in range(400):
        noisy = fit_quadratic(xs, truth(xs) + 0.05 * rng.standard_normal(len(xs)))
        lo, hi = noisy.interval(x0)
        covered.append(lo < truth(x0) + 0.05 * rng.standard_normal() < hi)
    assert 0.91 < np.mean(covered) < 0.99
    np.testing.assert_allclose(noisy.coef, COEF, atol=2.0)
    with pytest.raises(ValueError, match="non-finite"):
        fit_quadratic([1, 2, 3], [1.0, math.nan, 2.0])
    with pytest.raises(ValueError, match="3 distinct sizes"):
        fit_quadratic([1, 1, 2, 2], [1.0, 1.1, 2.0, 2.1])


def test_forecast_predicts_marks_and_holds_out(tmp_path):
    w = write_sweep(
        tmp_path / "sweep",
        w8_lr1={"diverge_at": 5},  # diverged before the step read
        w16_lr1={"value": math.inf},  # logged a non-finite value
    )
    target = 1e9
    fc = forecast([w], target, step=STEP, holdout_largest=True, method="quadratic")
    by_lr = {e["lr"]: e for e in fc["max_attn_logit"]}
    lo = by_lr[0.01]
    np.testing.assert_allclose(lo["fit"]["coef"], COEF, rtol=1e-6)
    np.testing.assert_allclose(lo["prediction"]["value"], true_logit(target, 0.01), rtol=1e-6)
    # 4 sizes, one seed: one residual degree of freedom is too few for a yes/no flag
    assert lo["no_flag"] == "1 residual degrees of freedom (< 2)" and "crosses_threshold" not in lo
    assert lo["holdout"]["error_log10"] == pytest.approx(0, abs=1e-6)
    hi = by_lr[1.0]
    why = {p["size"]: p["excluded"] for p in hi["points"]}
    assert why["d=8,L=2,H=1"] == "diverged at step 5"
    assert why["d=16,L=2,H=2"].startswith("non-finite")
    assert hi["fit"] is None and "2 size(s)" in hi["not_fitted"]  # 4 sizes − 2 excluded
    assert hi["holdout"]["not_checked"]
    g = fc["grad_rms_over_eps"]["series"][0]  # 1 dof: the crossing of 1 is not said
    assert g["reaches_one_at_params"] is None and g["no_flag"].startswith("1 residual degrees")
    tr = fc["lr_trends"][0]
    assert [r["optimal_lr"] for r in tr["by_size"]] == [0.01] * 4
    # loss 2.01 at lr 0.01, 3.0 (or diverged: ℓ0 = 4) at lr 1 → sensitivity (0 + 0.99)/2 or 1.99/2
    assert [r["lr_sensitivity"] for r in tr["by_size"]] == pytest.approx(
        [1.99 / 2, 0.99 / 2, 0.99 / 2, 0.99 / 2]
    )
    md = write_forecast(fc, tmp_path / "out", command="stability forecast ...").read_text()
    assert "diverged at step 5" in md and "Held-out largest size" in md
    assert (tmp_path / "out" / "forecast.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "out" / "forecast.json").read_text())
    assert saved["max_attn_logit"][0]["sizes_used"] == lo["sizes_used"]


def test_forecast_fits_seed_means_and_flags_only_with_enough_sizes(tmp_path):
    """Two seeds of a size are one point (their mean of log10): 5 sizes give a quadratic 2
    residual degrees of freedom, enough for a flag when its interval is narrow."""
    w = write_sweep(
        tmp_path / "s", widths=(8, 16, 32, 64, 128), noise=0.02, seeds=(0, 1), lrs=(0.01,)
    )
    e = forecast([w], 1e7, step=STEP, method="quadratic")["max_attn_logit"][0]
    assert e["fit"]["n"] == 5 and e["fit"]["dof"] == 2
    p = e["prediction"]
    assert p["lo"] < true_logit(1e7, 0.01) < p["hi"]
    np.testing.assert_allclose(e["fit"]["coef"], COEF, atol=0.5)
    assert "no_flag" not in e and e["crosses_threshold"] == (p["value"] >= 1e4)
    line = forecast([w], 1e7, step=STEP, method="linear")
    assert line["max_attn_logit"][0]["fit"]["dof"] == 3 and line["methods"]["max_attn_logit"] == {
        "method": "linear",
        "why": "--method",
    }
    wide = forecast(
        [
            write_sweep(
                tmp_path / "wide", widths=(8, 16, 32, 64, 128), noise=1.0, seeds=(0, 1), lrs=(0.01,)
            )
        ],
        1e12,
        step=STEP,
        method="quadratic",
    )
    assert wide["max_attn_logit"][0]["no_flag"].startswith("interval spans")
    auto = forecast([w], 1e7, step=STEP)  # the calibration's choice, said with its reason
    assert auto["methods"] == DEFAULT_METHODS
    with pytest.raises(ConfigError, match="--method='cubic'"):
        forecast([w], 1e7, step=STEP, method="cubic")


def test_forecast_refuses_too_few_sizes_and_an_unlogged_step(tmp_path, capsys):
    w = write_sweep(tmp_path / "two", widths=(8, 16))
    with pytest.raises(ConfigError, match="2 model size"):
        forecast([w], 1e9)
    w4 = write_sweep(tmp_path / "four")
    with pytest.raises(ConfigError, match="--step=7 is not logged"):
        forecast([w4], 1e9, step=7)
    with pytest.raises(ConfigError, match="--param='nope'"):
        forecast([w4], 1e9, param="nope")
    assert main(["forecast", str(w), "--target-params=1e9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 model size(s)" in err
    assert (
        main(
            [
                "forecast",
                str(w4),
                "--target-params=1e9",
                f"--out={tmp_path / 'o'}",
                "--holdout-largest",
            ]
        )
        == 0
    )
    assert (tmp_path / "o" / "forecast.md").exists()
