"""stability.reproduce: verdict rules on hand-made rows, and the tiny preset end to end."""

import json

import pytest

from stability import reproduce as R
from stability.cli import main

LRS = (1e-3, 1e-2, 1e-1)


def row(lr, loss, **fields):
    """One run as ``load_rows`` returns it; ``loss=None`` is a diverged run."""
    base = {
        "run_id": f"{sorted(fields.items())}-{lr}",
        "setting": ",".join(f"{k}={v}" for k, v in sorted(fields.items())),
        "lr": lr,
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
        "wall_seconds": 1.0,
    }
    return {**base, **fields}


def sizes_rows(gap_small: float, gap_large: float) -> list[dict]:
    """qk on: losses 3, 2, 3 at both sizes; qk off: the top LR loses ``gap``·3 nats more (so the
    LR-sensitivity gap is ``gap``)."""
    rows = []
    for d, gap in ((16, gap_small), (64, gap_large)):
        for qk in (True, False):
            for lr, loss in zip(LRS, (3.0, 2.0, 3.0), strict=True):
                bad = 0.0 if qk or lr != LRS[-1] else 3 * gap
                rows.append(row(lr, loss + bad, qk_norm=qk, d_model=d, params=d * d * 10 + qk))
    return rows


def test_qk_finding_holds_flips_when_the_effect_is_absent_and_fails_when_reversed():
    holds = R.finding_qk_sensitivity(sizes_rows(0.1, 0.3))
    assert [c["outcome"] for c in holds] == ["pass"] * 3 and R.verdict(holds) == "holds"
    assert holds[0]["value"] == pytest.approx(0.1) and holds[-1]["value"] == pytest.approx(0.2)
    absent = R.finding_qk_sensitivity(sizes_rows(0.0, 0.0))
    assert {c["outcome"] for c in absent} == {"tie"} and R.verdict(absent) == "inconclusive"
    not_growing = R.finding_qk_sensitivity(sizes_rows(0.3, 0.1))
    assert R.verdict(not_growing) == "does not hold"  # lowers, but less at the larger size


def test_logit_growth_z_loss_and_eps_rules_read_the_measurements():
    big = dict(d_model=64, qk_norm=False)
    rows = sizes_rows(0.1, 0.3)
    for r in rows:
        if r["d_model"] == 64 and not r["qk_norm"] and r["lr"] == LRS[-1]:
            r.update(peak_attn_logit=3e5, min_attn_entropy=0.01)
    assert R.verdict(R.finding_logit_growth(rows)) == "holds"
    for r in R._where(rows, **big):
        r["peak_attn_logit"] = 50.0  # no growth: the claim is contradicted
    assert R.verdict(R.finding_logit_growth(rows)) == "does not hold"

    def z_rows(drift):
        return [
            row(lr, 2.0, weight_decay=wd, z_loss=z, log_z_mean=drift if (wd, z) == (0.0, 0.0) else 0.2)
            for lr in LRS
            for wd, z in ((0.0, 0.0), (0.0, 1e-4), (1e-4, 0.0))
        ]

    assert R.verdict(R.finding_z_loss(z_rows(-30.0))) == "holds"
    assert R.verdict(R.finding_z_loss(z_rows(4.0))) == "does not hold"  # no drift without wd
    eps_rows = [row(lr, 2.0 + (lr == LRS[-1]) * e * 1e4, eps=e) for e in (1e-4, 1e-8) for lr in LRS]
    for r in rows:
        r["grad_over_eps"] = 1e4 / r["params"] / (r["lr"] / 1e-3) ** 0.5
    checks = R.finding_eps(rows, eps_rows)
    assert [c["outcome"] for c in checks] == ["pass", "pass", "pass"], checks
    same = [row(lr, 2.0, eps=e) for e in (1e-4, 1e-8) for lr in LRS]
    assert R.verdict(R.finding_eps(rows, same)) == "inconclusive"


def test_missing_sweeps_make_every_finding_inconclusive():
    findings = R.evaluate({})
    assert [f["finding"] for f in findings] == [name for name, _, _ in R.FINDINGS]
    assert {f["verdict"] for f in findings} == {"inconclusive"}


@pytest.mark.slow
def test_tiny_preset_end_to_end(tmp_path, capsys):
    work = tmp_path / "r"
    assert main(["reproduce", "--preset=tiny", f"--workdir={work}", "--no-progress"]) == 0
    # ε is a traced hyperparameter: both values of the ε sweep share one program
    assert "sweep eps: 4 runs, 0 already finished; 4 to train in 4 chunk(s), 1 compiled program(s)" in (
        capsys.readouterr().err
    )
    report = (work / "paper_report.md").read_text()
    saved = json.loads((work / "paper_report.json").read_text())
    # the verdicts in the report are the rules applied to the runs on disk
    rows = {name: R.load_rows(work / name) for name in R.SWEEPS}
    again = R.evaluate(rows)
    assert [f["verdict"] for f in saved["findings"]] == [f["verdict"] for f in again]
    for f in again:
        assert f"| {f['claim']} | **{f['verdict']}** |" in report
        assert (work / "figures" / f"{f['finding']}.png").read_bytes()[:4] == b"\x89PNG"
    assert len(rows["sizes"]) == 8 and len(rows["mup"]) == 10
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
