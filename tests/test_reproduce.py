"""stability.reproduce: verdict rules on hand-made rows, and the tiny preset end to end."""

import json

import pytest

from stability import reproduce as R
from stability.cli import main

LRS = (1e-3, 1e-2, 1e-1)


def row(lr, loss, seed=0, **fields):
    """One run as ``load_rows`` returns it; ``loss=None`` is a diverged run."""
    base = {
        "run_id": f"{sorted(fields.items())}-{lr}-{seed}",
        "setting": ",".join(f"{k}={v}" for k, v in sorted(fields.items())),
        "lr": lr,
        "seed": seed,
        "final_loss": loss,
        "loss_at_init": 5.0,
        "diverged": loss is None,
        "params": 1000,
        "d_model": 16,
        "qk_norm": True,
        "warmup_steps": 10,
        "weight_decay": 1e-4,
        "weight_decay_mode": "independent",
        "z_loss": 1e-4,
        "parametrization": "standard",
        "eps": 1e-8,
        "peak_attn_logit": 10.0,
        "min_attn_entropy": 1.0,
        "log_z_mean": 0.5,
        "grad_over_eps": 1e4,
        "min_grad_over_eps": 1e3,
        "param_rms": 0.1,
        "wall_seconds": 1.0,
    }
    return {**base, **fields}


SEEDS = (0, 1, 2)
NOISE = (0.0, 0.01, -0.01)  # per-seed jitter of the losses: the seeds' spread


def sizes_rows(gap_small: float, gap_large: float, noise=NOISE) -> list[dict]:
    """qk on: losses 3, 2, 3 at both sizes; qk off: the top LR loses ``gap``·3 nats more (so the
    LR-sensitivity gap is ``gap``), each seed jittered by ``noise``."""
    rows = []
    for seed, jitter in zip(SEEDS, noise, strict=True):
        for d, gap in ((16, gap_small), (64, gap_large)):
            for qk in (True, False):
                for lr, loss in zip(LRS, (3.0, 2.0, 3.0), strict=True):
                    bad = 0.0 if qk or lr != LRS[-1] else 3 * gap + 3 * jitter
                    rows.append(row(lr, loss + bad, seed, qk_norm=qk, d_model=d, params=d * d * 10 + qk))
    return rows


def outcomes(finding):
    checks, _ = finding
    return [c["outcome"] for c in checks]


def test_a_check_compares_the_seed_mean_with_its_standard_error_symmetrically():
    c = R._check("D", "§x", [0.30, 0.31, 0.29], "sensitivity")
    assert c["outcome"] == "pass" and c["mean"] == pytest.approx(0.30) and c["n"] == 3
    assert c["tol"] == pytest.approx(max(R.Z * 0.01 / 3**0.5, R.FLOOR["sensitivity"]))
    assert R._check("D", "§x", [-0.30, -0.31, -0.29], "sensitivity")["outcome"] == "fail"
    noisy = R._check("D", "§x", [0.3, -0.2, 0.2], "sensitivity")  # mean 0.1, SE ≈ 0.15
    assert noisy["outcome"] == "tie" and noisy["tol"] == pytest.approx(R.Z * noisy["se"])
    assert R._check("D", "§x", [0.005], "sensitivity")["outcome"] == "tie"  # one seed: the floor
    assert R._check("D", "§x", [None, float("nan")], "sensitivity")["outcome"] == "missing"
    assert R.verdict([{"outcome": "pass"}, {"outcome": "tie"}]) == "inconclusive"
    assert R.verdict([{"outcome": "pass"}, {"outcome": "fail"}]) == "does not hold"
    assert R.verdict([{"outcome": "pass"}, {"outcome": "missing"}]) == "inconclusive"
    # a finding whose mechanism does not appear in its runs is no evidence either way
    assert R.verdict([{"outcome": "pass"}], mechanism_present=False) == "inconclusive"
    assert R.verdict([{"outcome": "fail"}], mechanism_present=False) == "inconclusive"
    assert R.verdict([{"outcome": "fail"}], mechanism_present=None) == "does not hold"


def test_qk_finding_holds_ties_when_absent_fails_when_reversed():
    holds = R.finding_qk_sensitivity(sizes_rows(0.1, 0.3))
    assert outcomes(holds) == ["pass", "pass"] and R.verdict(holds[0]) == "holds"
    assert holds[0][0]["mean"] == pytest.approx(0.3) and holds[0][1]["mean"] == pytest.approx(0.2)
    absent = R.finding_qk_sensitivity(sizes_rows(0.0, 0.0))
    assert outcomes(absent) == ["tie", "tie"] and R.verdict(absent[0]) == "inconclusive"
    reversed_ = R.finding_qk_sensitivity(sizes_rows(0.0, -0.2))
    assert R.verdict(reversed_[0]) == "does not hold"  # qk-LN raises sensitivity at the largest size
    no_gap_at_small = R.finding_qk_sensitivity(sizes_rows(0.0, 0.2))
    assert R.verdict(no_gap_at_small[0]) == "holds"  # the paper expects none at small sizes
    noisy = R.finding_qk_sensitivity(sizes_rows(0.0, 0.05, noise=(0.0, 0.2, -0.2)))
    assert outcomes(noisy)[0] == "tie"  # an effect within the seeds' spread is no verdict


def test_logit_growth_z_loss_weight_decay_and_eps_rules_and_their_mechanisms():
    rows = sizes_rows(0.1, 0.3)
    for r in rows:
        if r["d_model"] == 64 and not r["qk_norm"] and r["lr"] == LRS[-1]:
            r.update(peak_attn_logit=3e5 * (1 + r["seed"]), min_attn_entropy=0.01)
    growth = R.finding_logit_growth(rows)
    assert R.verdict(growth[0]) == "holds" and growth[1][0] is True
    assert "peak max logit without qk-LN, d=64, lr=0.1" in growth[1][1]
    for r in R._where(rows, d_model=64, qk_norm=False):
        r["peak_attn_logit"] = 50.0  # no growth: the claim is contradicted, the mechanism absent
    growth = R.finding_logit_growth(rows)
    assert R.verdict(growth[0]) == "does not hold" and growth[1][0] is False

    def z_rows(drift):
        return [
            row(lr, 2.0, seed, weight_decay=wd, z_loss=z,
                log_z_mean=drift + 0.1 * seed if (wd, z) == (0.0, 0.0) else 0.2)
            for seed in SEEDS
            for lr in LRS
            for wd, z in ((0.0, 0.0), (0.0, 1e-4), (1e-4, 0.0))
        ]

    z = R.finding_z_loss(z_rows(-30.0))
    assert R.verdict(z[0]) == "holds" and z[1][0] is True
    z = R.finding_z_loss(z_rows(4.0))
    assert R.verdict(z[0]) == "does not hold" and z[1][0] is False  # no drift: refuted, not present

    def wd_rows(shrink):
        return [
            row(lr, 2.0 + (mode == "coupled" and lr == LRS[-1]) * 0.6, seed, weight_decay_mode=mode,
                weight_decay=wd, param_rms=0.1 * (shrink if wd == 0.0 else 1.0))
            for seed in SEEDS
            for lr in LRS
            for mode, wd in (("independent", 5e-3), ("coupled", 0.5), ("independent", 0.0))
        ]

    wd = R.finding_weight_decay(wd_rows(2.0))
    assert outcomes(wd) == ["pass"] and wd[1][0] is True and "2×" in wd[1][1]
    assert R.finding_weight_decay(wd_rows(1.1))[1][0] is False  # decay too weak to show

    eps_rows = [row(lr, 2.0 + (lr == LRS[-1]) * (e > 1e-6) * 0.6, seed, eps=e,
                    min_grad_over_eps=0.5 if e > 1e-6 else 1e4)
                for seed in SEEDS for e in (1e-3, 1e-8) for lr in LRS]
    for r in rows:
        r["grad_over_eps"] = 1e4 / r["params"] / (r["lr"] / 1e-3) ** 0.5 * (1 + 0.01 * r["seed"])
    eps = R.finding_eps(rows, eps_rows)
    assert outcomes(eps) == ["pass", "pass", "pass"] and eps[1][0] is True


def test_missing_sweeps_make_every_finding_inconclusive_and_partial(tmp_path):
    findings = R.evaluate({})
    assert [f["finding"] for f in findings] == [name for name, _, _ in R.FINDINGS]
    assert {f["verdict"] for f in findings} == {"inconclusive"}
    assert {f["mechanism_present"] for f in findings} == {None}
    report = R.write_report(findings, {}, tmp_path, "cpu").read_text()
    assert report.startswith("# Reproducing Wortsman et al. 2023 (small-scale proxies) — ")
    assert "partial: runs missing" in report.splitlines()[0]
    assert "(partial: `sizes` has no manifest)" in report
    z = next(f for f in findings if f["finding"] == "z_loss")
    z.update(mechanism_present=False, checks_verdict="does not hold")
    report = R.write_report(findings, {}, tmp_path, "cpu").read_text()
    assert "stays inconclusive (its checks alone would read: does not hold). Tried: `sweeps/reproduce_z_loss.py:cpu`: " in report


@pytest.mark.slow
def test_tiny_preset_end_to_end(tmp_path, capsys):
    work = tmp_path / "r"
    assert main(["reproduce", "--preset=tiny", f"--workdir={work}", "--no-progress"]) == 0
    # ε is a traced hyperparameter: both values and both seeds share one vmapped program
    assert "sweep eps: 8 runs, 0 already finished; 8 to train in 1 chunk(s), 1 compiled program(s)" in (
        capsys.readouterr().err
    )
    report = (work / "paper_report.md").read_text()
    saved = json.loads((work / "paper_report.json").read_text())
    # the verdicts in the report are the rules applied to the runs on disk
    rows = {name: R.load_rows(work / name) for name in R.SWEEPS}
    again = R.evaluate(rows)
    assert [f["verdict"] for f in saved["findings"]] == [f["verdict"] for f in again]
    assert "— smoke test of the machinery, not evidence" in report.splitlines()[0]
    for f in again:
        assert f"| {f['claim']} | {R._yes_no(f['mechanism_present'])} | **{f['verdict']}** (smoke test) |" in report
        assert (work / "figures" / f"{f['finding']}.png").read_bytes()[:4] == b"\x89PNG"
    assert len(rows["sizes"]) == 16 and len(rows["mup"]) == 20  # 2 seeds
    assert {r["seed"] for r in rows["sizes"]} == {0, 1}
    assert all(r["peak_attn_logit"] and r["grad_over_eps"] for r in rows["sizes"])
    # resumable: a second call trains nothing and rewrites the same verdicts
    lines = (work / "sizes" / "results.jsonl").read_text()
    assert main(["reproduce", "--preset=tiny", f"--workdir={work}", "--no-progress"]) == 0
    assert (work / "sizes" / "results.jsonl").read_text() == lines
    assert main(["reproduce", "--preset=big", f"--workdir={work}"]) == 2


def test_accelerator_preset_takes_data_overrides_and_plans_up_to_its_first_program(
    tmp_path, monkeypatch, capsys
):
    """`reproduce --preset=accelerator` on a tfds ArrayRecord dataset and a SentencePiece model
    the test builds (data.* overrides win over the preset's), as far as its first compiled
    program (the largest, w1024; then stopped). Other overrides are refused, naming why."""
    from data import train_sentencepiece
    from data.test_tfds import EVAL_DOCS, TRAIN_DOCS, StabilityTestText

    from stability import sweep

    assert main(["reproduce", "--preset=accelerator", f"--workdir={tmp_path / 'x'}",
                 "--config.model.d_model=64"]) == 2
    assert "takes only --config.data.* and --config.wandb.* overrides" in capsys.readouterr().err
    StabilityTestText(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    data = [f"--config.data.tfds_data_dir={tmp_path / 'tfds'}", "--config.data.tfds_name=stability_test_text",
            f"--config.data.tokenizer_path={train_sentencepiece(tmp_path, TRAIN_DOCS + EVAL_DOCS)}",
            "--config.data.batch_size=8", "--config.data.seq_len=32"]

    class Compiled(Exception):
        pass

    compile_call = sweep.P.compile_call

    def first(cfg, progs, limit=None):
        report = compile_call(cfg, progs, limit)
        raise Compiled(cfg.model.d_model, cfg.data.tfds_name, report.line())

    monkeypatch.setattr(sweep.P, "compile_call", first)
    with pytest.raises(Compiled) as got:
        main(["reproduce", "--preset=accelerator", f"--workdir={tmp_path / 'w'}", "--no-progress", *data])
    d_model, name, line = got.value.args
    assert d_model == 1024 and name == "stability_test_text" and "per device" in line
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("*"))  # nothing written
