"""The on-disk layout (stability/workdir.py): JSONL records that survive torn writes."""

import pytest

from stability import workdir as W


def test_torn_metrics_line_is_skipped_and_cut_on_resume(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n[1, 2]\n{"step": 2}\n{"step": 3, "train/lo')
    records, bad = W.read_jsonl(p)
    assert records == [{"step": 1}, {"step": 2}] and bad == [2, 4]
    with pytest.warns(UserWarning, match=r"dropped unreadable lines \[2, 4\]"):
        out = W.Jsonl(p, keep_step=1)  # what a resume from step 1 does
    assert W.read_jsonl(p) == ([{"step": 1}], [])
    p.write_text(p.read_text() + '{"step": 2, "torn')  # a crash inside the next append
    out.append([{"step": 2}])
    assert W.read_jsonl(p) == ([{"step": 1}, {"step": 2}], [2])


def test_a_reader_of_a_few_columns_holds_only_those():
    from stability.report import history_keys

    line = '{"step": 5, "train/loss": 2.5, "alive": true, "attn/entropy_min/layer_0": 1.0, '
    line += '"attn/max_logit/layer_0": 9.0, "grad/norm": 3.0}\n'
    assert W.parse_jsonl(line, history_keys)[0] == [
        {"step": 5, "train/loss": 2.5, "alive": True, "attn/entropy_min/layer_0": 1.0}
    ]
    assert W.parse_jsonl(line + "[1]\n", lambda k: False) == ([{"step": 5}], [2])


# ---------------------------------------------------------------------------------------
# On an object store (tests/fake_gcs.py: gs:// paths served locally, no appends).


def test_jsonl_on_an_object_store_writes_segments_never_rewrites_and_flushes_when_forced(
    tmp_path, monkeypatch
):
    """No object is rewritten whole in a loop: each flush is a new segment object, readers
    concatenate a whole file of release 0.2.0 and the segments; a resume rewrites the kept
    records once, as one segment."""
    from fake_gcs import bucket

    with bucket(tmp_path) as root:
        p = W.path("gs://b/run/metrics.jsonl")
        p.parent.mkdir(parents=True)
        with pytest.raises(OSError, match="cannot append"):
            p.open("a")
        local = root / "b" / "run"
        (local / "metrics.jsonl").write_text('{"step": 0}\n')  # written whole by release 0.2.0
        out = W.Jsonl(p)
        out.append([{"step": 1}])  # queued: less than REMOTE_FLUSH_SECONDS since opening
        assert W.read_jsonl(p)[0] == [{"step": 0}]
        out.append([{"step": 2}], force=True)
        assert W.read_jsonl(p) == ([{"step": 0}, {"step": 1}, {"step": 2}], [])
        monkeypatch.setattr(W, "REMOTE_FLUSH_SECONDS", 0.0)
        out.append([{"step": 3}])
        segments = sorted((local / "metrics.jsonl.d").iterdir())
        assert [s.read_text().count("\n") for s in segments] == [2, 1]  # each record written once
        assert (local / "metrics.jsonl").read_text() == '{"step": 0}\n'  # never rewritten
        W.Jsonl(p, keep_step=2)  # a resume from step 2
        assert W.read_jsonl(p)[0] == [{"step": 0}, {"step": 1}, {"step": 2}]
        assert not (local / "metrics.jsonl").exists() and len(W.segments(p)) == 1
        W.write_json("gs://b/run/config.json", {"a": 1})
        assert W.read_json("gs://b/run/config.json") == {"a": 1}
        assert W.kind("gs://b/run") == "run" and W.kind("gs://b/nothing") is None


def test_a_sweep_with_its_workdir_and_data_on_a_bucket_resumes_as_a_local_one(tmp_path):
    """tfds data, the SentencePiece model and the workdir on gs:// (the fake bucket): a sweep,
    a crash after its first checkpoint (the last checkpoint and results.jsonl gone), the rerun:
    the records and results of the same sweep run locally."""
    from data import train_sentencepiece
    from data.test_tfds import EVAL_DOCS, TRAIN_DOCS, StabilityTestText
    from fake_gcs import bucket

    from conftest import tfds_text_config, write_config_file
    from stability.sweep import run_sweep

    local = tmp_path / "bucket_root" / "b"
    StabilityTestText(
        data_dir=str(local / "tfds"), file_format="array_record"
    ).download_and_prepare()
    train_sentencepiece(local, TRAIN_DOCS + EVAL_DOCS)  # local/sp.model
    files = {}
    for where, prefix in (("bucket", "gs://b"), ("local", str(local))):
        train = {
            "steps": 8,
            "log_every": 2,
            "eval_every": 4,
            "checkpoint_every": 4,
            "keep_final_checkpoint": True,
        }
        cfg = tfds_text_config(prefix, 4, train=train)
        files[where] = write_config_file(tmp_path / f"{where}.py", cfg)
    sweep_py = tmp_path / "sweep.py"
    sweep_py.write_text(
        "def get_sweep(arg=''):\n    return [{'optim.lr': lr} for lr in (1e-3, 1e-2)]\n"
    )
    ref = run_sweep(
        str(sweep_py), tmp_path / "ref", config_spec=files["local"], strategy="vmap", progress=False
    )
    with bucket(tmp_path / "bucket_root") as root:
        run_sweep(
            str(sweep_py),
            "gs://b/runs/w",
            config_spec=files["bucket"],
            strategy="vmap",
            progress=False,
        )
        (chunk,) = W.path("gs://b/runs/w/chunks").iterdir()
        (chunk / "checkpoints" / "8").rmtree()
        for segment in W.segments("gs://b/runs/w/results.jsonl"):  # results gone
            segment.unlink()
        got = run_sweep(
            str(sweep_py),
            "gs://b/runs/w",
            config_spec=files["bucket"],
            strategy="vmap",
            progress=False,
        )
        assert (root / "b" / "runs" / "w" / "report.md").exists()
    key = lambda r: r["lr"]
    keep = ("lr", "final_loss", "loss_at_init", "diverged", "max_attn_logit", "steps")
    assert [{k: r[k] for k in keep} for r in sorted(got, key=key)] == [
        {k: r[k] for k in keep} for r in sorted(ref, key=key)
    ]
    for a, b in zip(sorted(ref, key=key), sorted(got, key=key), strict=True):
        strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rs]
        ours = W.read_jsonl(root / "b" / "runs" / "w" / "runs" / b["run_id"] / "metrics.jsonl")[0]
        theirs = W.read_jsonl(tmp_path / "ref" / "runs" / a["run_id"] / "metrics.jsonl")[0]
        assert strip(ours) == strip(theirs)
