"""`stability reproduce --preset=tiny` end to end: the report is the rules applied to the runs
on disk, marked a smoke test; a rerun trains nothing; bad presets and an empty --report-only
are refused."""

import json

import pytest

from stability.cli import main
from stability.reproduce import NAMES, PRESET, evaluate, load_rows


@pytest.mark.slow
def test_tiny_preset_end_to_end(tmp_path, capsys):
    work = tmp_path / "r"
    assert main(["reproduce", "--preset=tiny", f"--workdir={work}", "--report-only"]) == 2
    assert "holds no run of `stability reproduce` yet" in capsys.readouterr().err
    assert main(["reproduce", "--preset=tiny", f"--workdir={work}", "--no-progress"]) == 0
    err = capsys.readouterr().err
    # ε is a traced hyperparameter: both values of a seed share one program with the sizes
    # sweep's (no compile of its own)
    assert (
        "sweep eps: 8 runs, 0 already finished; 8 to train in 2 chunk(s), 1 compiled program(s)"
        in err
    )
    report = (work / "paper_report.md").read_text()
    saved = json.loads((work / "paper_report.json").read_text())
    rows = {name: load_rows(work / name) for name in NAMES}
    again = evaluate(rows, PRESET["tiny"])
    assert [f["verdict"] for f in saved["findings"]] == [f["verdict"] for f in again]
    assert "— smoke test of the machinery, not evidence" in report.splitlines()[0]
    assert "Protocol: `docs/reproduce/protocol.md` as of commit" in report
    for f in again:
        assert (work / "figures" / f"{f['finding']}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"**{f['verdict']}** |" in report
    assert len(rows["sizes"]) == 16 and {r["seed"] for r in rows["sizes"]} == {0, 1}
    assert {(r["seed"], r["data_seed"]) for r in rows["sizes"]} == {(0, 0), (1, 1)}
    assert all(r["peak_logit0"] and r["fc1_grad_rms"] for r in rows["sizes"])
    lines = (work / "sizes" / "results.jsonl").read_text()
    assert main(["reproduce", "--preset=tiny", f"--workdir={work}", "--no-progress"]) == 0
    assert (work / "sizes" / "results.jsonl").read_text() == lines  # nothing trained again
    assert main(["reproduce", "--preset=big", f"--workdir={work}"]) == 2
    assert main(["reproduce", "--preset=tiny", f"--workdir={work}", "--seed-offset=-1"]) == 2


def test_accelerator_preset_takes_data_overrides_and_plans_up_to_its_first_program(
    tmp_path, monkeypatch, capsys
):
    """`reproduce --preset=accelerator` on a tfds ArrayRecord dataset and a SentencePiece model
    the test builds (data.* overrides win over the preset's), as far as its first program to
    compile (the largest, w1024; stopped before XLA compiles it). Other overrides are refused,
    naming why."""
    from data import train_sentencepiece
    from data.test_tfds import EVAL_DOCS, TRAIN_DOCS, StabilityTestText

    from stability import sweep

    assert (
        main(
            [
                "reproduce",
                "--preset=accelerator",
                f"--workdir={tmp_path / 'x'}",
                "--config.model.d_model=64",
            ]
        )
        == 2
    )
    assert "takes only --config.data.* and --config.wandb.* overrides" in capsys.readouterr().err
    StabilityTestText(
        data_dir=str(tmp_path / "tfds"), file_format="array_record"
    ).download_and_prepare()
    data = [
        f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
        "--config.data.tfds_name=stability_test_text",
        f"--config.data.tokenizer_path={train_sentencepiece(tmp_path, TRAIN_DOCS + EVAL_DOCS)}",
        "--config.data.batch_size=8",
        "--config.data.seq_len=32",
    ]

    class Compiled(Exception):
        pass

    def first(cfg, progs, limit=None):
        raise Compiled(cfg.model.d_model, cfg.data.tfds_name, cfg.data.batch_size)

    monkeypatch.setattr(sweep.prog, "compile_call", first)
    with pytest.raises(Compiled) as got:
        main(
            [
                "reproduce",
                "--preset=accelerator",
                f"--workdir={tmp_path / 'w'}",
                "--no-progress",
                *data,
            ]
        )
    assert got.value.args == (1024, "stability_test_text", 8)
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("*"))  # nothing written
