"""stability.results on hand-written sweep workdirs (no training) and an offline W&B run."""

import glob
import hashlib
import json
import math
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config, write_config_file
from stability import plots, report, results
from stability.cli import main
from stability.config import ConfigError
from stability.sweep import build_runs, chunks_of
from stability.tracking import Tracker
from stability.workdir import to_jsonable

# The hand-written workdirs hold torn lines on purpose; tests that check the warning use
# pytest.warns, the others need not see it.
pytestmark = pytest.mark.filterwarnings("ignore:.*skipped:UserWarning")

FC1 = "blocks/0/mlp/fc1/kernel"
STEPS = (2, 4, 6, 8)


def run_id(setting: str, lr: float) -> str:
    return f"{setting}-lr{lr:g}-{hashlib.sha1(f'{setting}{lr}'.encode()).hexdigest()[:8]}"


def history(lr: float, *, diverge_at=None, last=8, sink=True, eps=True) -> list[dict]:
    """Metric records as the sweep logs them; a diverged run's last record has NaN loss and
    alive=False, and nothing is logged after it."""
    recs = []
    for s in (s for s in STEPS if s <= last):
        alive = diverge_at is None or s < diverge_at
        loss = 4.0 - 0.1 * s if alive else math.nan
        rec = {"step": s, "train/loss": loss, "alive": alive, "logits/log_z_mean": -lr * s}
        for i in range(2):
            rec[f"attn/max_logit/layer_{i}"] = 10.0 * (i + 1) * s * lr
            rec[f"attn/entropy_min/layer_{i}"] = 2.0 / (1 + s * lr * (i + 1))
        rec[f"update/rms/{FC1}"] = 0.5
        rec[f"grad/rms/{FC1}"] = 1e-3 / s
        if eps:
            rec[f"grad/rms_over_eps/{FC1}"] = 1e5 / s
        if sink:
            rec["attn/bos_mass/layer_0"] = 0.1 * s
            rec["resid/bos_norm_ratio/layer_0"] = 1.0 + s
        if s % 4 == 0:
            rec["eval/loss"] = loss
        recs.append(rec)
        if not alive:
            break
    return recs


def write_jsonl(path: Path, recs: list[dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)


def write_sweep_dir(
    root: Path, settings=("qk_norm=False", "qk_norm=True"), lrs=(0.01, 1.0), *, sink=True, eps=True
) -> Path:
    """A sweep workdir as the engine leaves it when interrupted: every run finished except the
    last (a history up to step 4, no results record); the first setting's largest LR diverged
    at step 6; results.jsonl ends with a foreign and a torn line, one history with a torn line."""
    results_recs = []
    for si, setting in enumerate(settings):
        for li, lr in enumerate(lrs):
            rid = run_id(setting, lr)
            run_dir = root / "runs" / rid
            (run_dir.parent).mkdir(parents=True, exist_ok=True)
            unfinished = si == len(settings) - 1 and li == len(lrs) - 1
            diverged = si == 0 and li == len(lrs) - 1 and len(lrs) > 1
            hist = history(
                lr,
                diverge_at=6 if diverged else None,
                last=4 if unfinished else 8,
                sink=sink,
                eps=eps,
            )
            write_jsonl(run_dir / "metrics.jsonl", hist, tail='{"step": 1' if si == li == 0 else "")
            run_dir.joinpath("config.json").write_text(json.dumps({"optim": {"lr": lr}}))
            if unfinished:
                continue
            results_recs.append(
                {
                    "run_id": rid,
                    "setting": setting,
                    "lr": lr,
                    "final_loss": None if diverged else hist[-1]["eval/loss"],
                    "loss_at_init": 4.2,
                    "diverged": diverged,
                    "diverged_step": 6 if diverged else None,
                    "max_attn_logit": plots.max_over_layers(hist[-1], "attn/max_logit"),
                    "min_attn_entropy": plots.min_over_layers(hist[-1], "attn/entropy_min"),
                    "steps": hist[-1]["step"],
                    "wall_seconds": 1.5,
                    "overrides": {},
                    "config": {"optim": {"lr": lr}},
                }
            )
    write_jsonl(root / "results.jsonl", results_recs, tail='{"note": "by hand"}\n{"run_id": "x')
    return root


@pytest.fixture
def sweep_dir(tmp_path):
    return write_sweep_dir(tmp_path / "sweep")


def test_runs_table_reports_finished_diverged_and_unfinished_runs(sweep_dir):
    with pytest.warns(UserWarning) as caught:
        table = results.runs_table(sweep_dir)
    messages = " ".join(str(w.message) for w in caught)
    assert "results.jsonl: skipped unreadable lines [5]" in messages
    assert "skipped 1 record(s) without run_id" in messages
    assert list(table.columns) == list(results.RUN_COLUMNS)
    by_id = table.set_index("run_id")
    assert by_id.loc[run_id("qk_norm=False", 0.01), "status"] == "finished"
    div = by_id.loc[run_id("qk_norm=False", 1.0)]
    assert (
        div["status"] == "diverged" and div["diverged_step"] == 6 and math.isnan(div["final_loss"])
    )
    cut = by_id.loc[run_id("qk_norm=True", 1.0)]
    # setting from the finished run of the same setting, LR from its config.json
    assert (cut["status"], cut["setting"], cut["lr"], cut["steps"]) == (
        "unfinished",
        "qk_norm=True",
        1.0,
        4,
    )
    assert math.isnan(cut["loss_at_init"]) and cut["max_attn_logit"] == pytest.approx(80.0)
    assert list(table["label"]) == list(table["setting"])  # one workdir: no prefix


def test_histories_are_long_form_and_filterable(sweep_dir):
    with pytest.warns(UserWarning, match=r"metrics.jsonl: skipped unreadable lines \[5\]"):
        hist = results.histories(sweep_dir, keys=["train/loss", "attn/max_logit/*", "alive"])
    assert list(hist.columns) == list(results.HISTORY_COLUMNS)
    assert set(hist["key"]) == {
        "train/loss",
        "attn/max_logit/layer_0",
        "attn/max_logit/layer_1",
        "alive",
    }
    assert hist["run_id"].nunique() == 4
    div = hist[(hist["run_id"] == run_id("qk_norm=False", 1.0))]
    loss = div[div["key"] == "train/loss"].set_index("step")["value"]
    assert list(loss.index) == [2, 4, 6] and math.isnan(loss[6])  # NaN at the diverging step
    alive = div[div["key"] == "alive"].set_index("step")["value"]
    assert list(alive) == [1.0, 1.0, 0.0]
    one = results.histories(sweep_dir, run_ids=[run_id("qk_norm=True", 0.01)], keys=["eval/loss"])
    assert list(one["step"]) == [4, 8] and set(one["setting"]) == {"qk_norm=True"}
    assert set(one["lr"]) == {0.01}


def test_several_workdirs_are_labelled_by_name(tmp_path):
    a = write_sweep_dir(tmp_path / "a")
    b = write_sweep_dir(tmp_path / "b", settings=("z_loss=0",), lrs=(0.01,))
    table = results.runs_table([a, b])
    assert set(table["label"]) == {"a: qk_norm=False", "a: qk_norm=True", "b: z_loss=0"}
    assert table.loc[table["workdir"] == str(b), "status"].tolist() == ["unfinished"]
    recs = results.records(table)
    assert {r["setting"] for r in recs} == {"a: qk_norm=False", "a: qk_norm=True"}
    assert all(r["run_id"].startswith(str(a)) for r in recs)


def test_records_feed_the_lr_sensitivity(sweep_dir):
    recs = results.records(results.runs_table(sweep_dir))
    assert len(recs) == 3  # the unfinished run is left out
    base = [r for r in recs if r["setting"] == "qk_norm=False"]
    assert [r["final_loss"] for r in base] == [pytest.approx(3.2), None]
    # ℓ* = 3.2, ℓ0 = 4.2: terms 0 and (diverged) 4.2 - 3.2 = 1.
    assert plots.lr_sensitivity(base) == pytest.approx(0.5)
    assert "div" in plots.summary_table(recs)


def test_over_layers_value_at_step_and_curves(sweep_dir):
    hist = results.histories(sweep_dir, keys=["attn/*"])
    mx = results.over_layers(hist, "attn/max_logit", "max")
    assert set(mx["key"]) == {"attn/max_logit"}
    rid = run_id("qk_norm=True", 0.01)
    got = mx[mx["run_id"] == rid].set_index("step")["value"]
    np.testing.assert_allclose(got.to_numpy(), [20.0 * s * 0.01 for s in STEPS])
    at = results.value_at_step(mx, "attn/max_logit", 5)  # last logged step <= 5 is 4
    assert set(at["step"]) == {4} and len(at) == 4
    c = results.curves(at, "label", x="lr")
    assert list(c) == ["qk_norm=False", "qk_norm=True"]
    np.testing.assert_allclose(c["qk_norm=False"][0], [0.01, 1.0])
    p = results.panels(hist[hist["run_id"] == rid], "label", "key")
    assert list(p["qk_norm=True"])[:2] == ["layer_0", "layer_1"]
    assert "lr=0.01" in results.curves(mx, "lr")
    assert results.nearest_lr(results.runs_table(sweep_dir), 0.5) == 1.0


def test_errors_name_the_bad_workdir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        results.runs_table(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match="neither results.jsonl nor runs/.* nor config.json"
    ):
        results.histories(tmp_path / "empty")


# ---------------------------------------------------------------------------------------
# Seeds.

# Final losses of write_seed_sweep, per LR and seed (None: diverged); ℓ0 = 4.2.
SEED_LOSSES = {0.01: (3.20, 3.22, 3.24), 0.1: (3.00, 3.10, 3.30), 1.0: (3.50, None, 3.60)}


def seed_run_id(setting: str, lr: float, seed: int) -> str:
    head, digest = run_id(setting, lr).rsplit("-", 1)
    return f"{head}-s{seed}-{digest}"


def write_seed_sweep(root: Path, setting: str = "qk_norm=False", **hist_kwargs) -> Path:
    """A finished 3-seed sweep workdir of one setting: at LR 0.01 the seeds agree (span 0.04
    nats), at 0.1 they span 0.3, at 1.0 seed 1 diverged (at step 6) and the others did not.
    hist_kwargs: passed to ``history``."""
    recs = []
    for lr, losses in SEED_LOSSES.items():
        for seed, loss in enumerate(losses):
            rid = seed_run_id(setting, lr, seed)
            hist = history(lr * (1 + seed), diverge_at=6 if loss is None else None, **hist_kwargs)
            write_jsonl(root / "runs" / rid / "metrics.jsonl", hist)
            config = {"optim": {"lr": lr}, "train": {"seed": seed}}
            (root / "runs" / rid / "config.json").write_text(json.dumps(config))
            recs.append(
                {
                    "run_id": rid,
                    "setting": setting,
                    "lr": lr,
                    "final_loss": loss,
                    "loss_at_init": 4.2,
                    "diverged": loss is None,
                    "diverged_step": 6 if loss is None else None,
                    "max_attn_logit": plots.max_over_layers(hist[-1], "attn/max_logit"),
                    "min_attn_entropy": plots.min_over_layers(hist[-1], "attn/entropy_min"),
                    "steps": hist[-1]["step"],
                    "wall_seconds": 1.0,
                    "config": config,
                }
            )
    write_jsonl(root / "results.jsonl", recs)
    return root


def test_seeds_expand_every_point_into_runs_of_one_program(tmp_path):
    cfg = tiny_config()
    config_py = write_config_file(tmp_path / "c.py", cfg)
    points = [{"model.qk_norm": qk, "optim.lr": lr} for qk in (False, True) for lr in (0.01, 0.1)]
    one = build_runs(points, config_py, [])
    assert [r.run_id for r in one] == [r.run_id for r in build_runs(points, config_py, [], 1)]
    assert all("-s" not in r.run_id.split("-lr")[1] for r in one)  # one seed: ids as before
    runs = build_runs(points, config_py, [], 3)
    assert [r.run_id for r in runs] == [r.run_id for r in build_runs(points, config_py, [], 3)]
    assert len({r.run_id for r in runs}) == 12
    for i, r in enumerate(runs):
        point, seed = one[i // 3], i % 3
        assert r.setting == point.setting and r.config.optim.lr == point.config.optim.lr
        # a seed varies the initialisation and the data order
        assert r.config.train.seed == seed and r.config.data.seed == seed
        assert r.run_id.startswith(f"{point.run_id.rsplit('-', 1)[0]}-s{seed}-")
    # seed 0 of a point is the one-seed run: same config
    assert [r.config for r in runs[::3]] == [r.config for r in one]
    # a chunk's runs share their batches: one chunk per (static config, data seed), the LRs of
    # a seed vmapped together; every data seed of a setting shares the compiled program
    chunks = chunks_of(runs, "vmap", 16)
    assert [[r.run_id for r in c] for c in chunks] == [
        [runs[6 * qk + s].run_id, runs[6 * qk + 3 + s].run_id] for qk in (0, 1) for s in range(3)
    ]
    from stability.step import static_config

    assert len({static_config(c[0].config) for c in chunks}) == 2
    assert len(chunks_of(runs, "sequential", 16)) == 12
    # release 0.2.0's seeds: one data order, every seed of a setting in one chunk
    fixed = build_runs(points, config_py, [], 3, seed_data="fixed")
    assert all(r.config.data.seed == cfg.data.seed for r in fixed)
    assert [len(c) for c in chunks_of(fixed, "vmap", 16)] == [6, 6]
    # other seeds than a previous sweep's: 3..5
    later = build_runs(points, config_py, [], 3, seed_offset=3)
    assert sorted({r.config.train.seed for r in later}) == [3, 4, 5]
    assert not {r.run_id for r in later} & {r.run_id for r in runs}
    with pytest.raises(ConfigError, match="--seeds=0 must be >= 1"):
        build_runs(points, config_py, [], 0)
    with pytest.raises(ConfigError, match="--seeds=2 --seed-offset=0 set train.seed"):
        build_runs(points, config_py, [("train.seed", "3")], 2)
    with pytest.raises(ConfigError, match="set data.seed .*--seed-data=fixed"):
        build_runs(points, config_py, [("data.seed", "3")], 2)
    with pytest.raises(ConfigError, match="--seed-offset=-1 must be >= 0"):
        build_runs(points, config_py, [], 2, seed_offset=-1)


def test_sweep_cli_passes_seeds_on(tmp_path, capsys):
    """Refusals before anything compiles (sweep --check compiles the train step)."""
    config_py = write_config_file(tmp_path / "c.py", tiny_config())
    sweep_py = tmp_path / "s.py"
    sweep_py.write_text("def get_sweep(arg=''):\n    return [{'optim.lr': 0.01}]\n")
    args = ["sweep", f"--sweep={sweep_py}", f"--config={config_py}", "--workdir", str(tmp_path)]
    assert main([*args, "--seeds=0", "--check"]) == 2
    assert "--seeds=0 must be >= 1" in capsys.readouterr().err
    assert main([*args, "--seeds=2", "--config.train.seed=1", "--check"]) == 2
    assert "--seeds=2 --seed-offset=0 set train.seed for every run" in capsys.readouterr().err
    assert main([*args, "--seeds=2", "--seed-offset=-2", "--check"]) == 2
    assert "--seed-offset=-2 must be >= 0" in capsys.readouterr().err


def test_seed_spread_and_report_mark_where_seeds_disagree(tmp_path):
    d = write_seed_sweep(tmp_path / "seeds")
    table = results.runs_table(d)
    assert list(table["seed"]) == [0, 1, 2] * 3 and set(table["label"]) == {"qk_norm=False"}
    spread = results.seed_spread(table)
    assert list(spread.columns) == list(results.SPREAD_COLUMNS)
    spread = spread.set_index("lr")
    counted = {lr: [4.2 if v is None else v for v in vs] for lr, vs in SEED_LOSSES.items()}
    for lr, vals in counted.items():
        row = spread.loc[lr]
        assert row["seeds"] == 3 and row["diverged"] == (1 if lr == 1.0 else 0)
        assert row["mean"] == pytest.approx(np.mean(vals))
        assert row["std"] == pytest.approx(np.std(vals, ddof=1))
        assert row["spread"] == pytest.approx(max(vals) - min(vals))
    assert list(spread["disagree"]) == [False, True, True]
    # LR sensitivity per seed, then mean ± sample std over seeds
    per_seed = [np.mean(c) - min(c) for c in zip(*counted.values(), strict=True)]
    mean, std, n = plots.sensitivity_over_seeds(results.records(table))
    assert (mean, std, n) == (
        pytest.approx(np.mean(per_seed)),
        pytest.approx(np.std(per_seed, ddof=1)),
        3,
    )
    table_md = plots.summary_table(results.records(table))
    cells = table_md.splitlines()[2].split(" | ")
    assert cells[1] == f"{np.mean(counted[0.01]):.3f} ± {np.std(counted[0.01], ddof=1):.3f}"
    assert cells[2].endswith(" †") and cells[3].endswith("(1/3 div) †")
    assert cells[4] == f"{np.mean(per_seed):.3f} ± {np.std(per_seed, ddof=1):.3f}"
    assert cells[5] == "1 |"
    text = report.write_report(d).read_text()
    assert "Up to 3 seeds per LR" in text and table_md in text
    assert "| setting | lr | seed | status | last step | max attn logit |" in text
    assert (d / "lr_sensitivity.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------
# Single-run workdirs (`stability train --workdir=...`).


def write_single_run(root: Path, lr: float, *, qk_norm=True, **hist_kwargs) -> Path:
    """A single run's workdir as the train loop leaves it (8 steps; no checkpoints needed).
    hist_kwargs: passed to ``history``."""
    cfg = tiny_config(model={"qk_norm": qk_norm}, optim={"lr": lr}, train={"steps": 8})
    write_jsonl(root / "metrics.jsonl", history(lr, **hist_kwargs))
    (root / "config.json").write_text(json.dumps(to_jsonable(cfg.to_dict())))
    return root


def test_single_runs_are_pooled_into_settings(tmp_path):
    a = write_single_run(tmp_path / "a", 0.01)
    b = write_single_run(tmp_path / "b", 1.0, diverge_at=6)
    c = write_single_run(tmp_path / "c", 0.01, qk_norm=False)
    cut = write_single_run(tmp_path / "cut", 0.1, last=4)
    sweep = write_sweep_dir(tmp_path / "sweep")
    table = results.runs_table([a, b, c, cut, sweep]).set_index("run_id")
    assert list(table.loc[["a", "b", "c", "cut"], "label"]) == [
        "qk_norm=True",
        "qk_norm=True",
        "qk_norm=False",
        "qk_norm=True",
    ]
    assert list(table.loc[["a", "b", "c", "cut"], "status"]) == [
        "finished",
        "diverged",
        "finished",
        "unfinished",
    ]
    assert (
        table.loc["a", "final_loss"] == pytest.approx(3.2) and table.loc["b", "diverged_step"] == 6
    )
    assert table.loc[["a", "b"], "loss_at_init"].isna().all()
    assert table.loc[run_id("qk_norm=True", 0.01), "label"] == "sweep: qk_norm=True"
    recs = [r for r in results.records(table.reset_index()) if "/sweep/" not in r["run_id"]]
    assert len(recs) == 3
    md = plots.summary_table(recs)
    assert "| qk_norm=False | 3.200 |  | n/a (1 LR) | - |" in md  # one LR: no sensitivity
    assert "| qk_norm=True | 3.200 | div | n/a | 1 |" in md  # diverged, ℓ0 unknown
    hist = results.histories([a, b], keys=["train/loss"])
    assert set(hist["run_id"]) == {"a", "b"} and len(hist) == 4 + 3
    alone = results.runs_table(a)
    assert list(alone["label"]) == ["a"] and list(alone["status"]) == ["finished"]


def test_report_of_a_single_run_and_of_runs_pooled(tmp_path, capsys):
    """A single run: its curves against steps, no LR sensitivity; an unfinished one is
    reported as far as it got, marked partial; several are pooled into one LR curve."""
    a = write_single_run(tmp_path / "base", 0.01)
    assert main(["report", str(a)]) == 0
    text = (a / "report.md").read_text()
    assert text.startswith("# Run report: base\n") and "Status: finished" in text
    assert (
        "LR sensitivity" not in text.split("\n\n", 2)[1]
        and (a / "run.png").read_bytes()[:4] == b"\x89PNG"
    )
    assert not (a / "lr_sensitivity.png").exists()
    cut = write_single_run(tmp_path / "cut", 0.1, last=4)
    assert main(["report", str(cut)]) == 0
    assert (cut / "report.md").read_text().startswith("# Run report: cut (partial: step 4 of 8)")
    b = write_single_run(tmp_path / "b", 0.1)
    assert main(["report", str(a), str(b), str(cut)]) == 2
    assert "--out=DIR is needed" in capsys.readouterr().err
    assert main(["report", str(a), str(b), f"--out={tmp_path / 'pooled'}"]) == 0
    pooled = (tmp_path / "pooled" / "report.md").read_text()
    assert "| default | 3.200 | 3.200 | 0.000 | - |" in pooled  # one setting, two LRs
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "neither a sweep workdir" in capsys.readouterr().err


def test_a_warning_raised_again_is_paired_with_its_own_clear(tmp_path):
    """Warned at 2, cleared at 4, warned again at 6 and never cleared: the second warning's
    row has no clear step (not the first warning's)."""
    run = write_single_run(tmp_path / "run", 0.1)
    warn = {"detector": "logit_growth", "message": "m"}
    write_jsonl(
        run / "events.jsonl",
        [
            {**warn, "event": "warn", "step": 2},
            {**warn, "event": "clear", "step": 4},
            {**warn, "event": "warn", "step": 6},
        ],
    )
    records = [{"run_id": "run", "setting": "default", "lr": 0.1}]
    rows = [
        line
        for line in report.warnings_section(records, {"run": history(0.1)}, {"run": run})
        if line.startswith("| default |")
    ]
    assert [row.split(" | ")[3:6] for row in rows] == [["2", "", "4"], ["6", "", ""]]


def test_import_does_not_touch_wandb():
    code = "import sys, stability.results; assert 'wandb' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------
# W&B, offline only.


def read_wandb_file(path: str):
    """The protobuf records of an offline run's .wandb file (a LevelDB-style log: 7-byte file
    header, 32 KiB blocks of chunks with a 7-byte header: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 or pos + 7 + n > len(data):  # padding, or a chunk still being written
            break
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


@dataclass
class FakeRun:
    """The part of wandb.apis.public.Run that from_wandb reads."""

    name: str
    config: dict
    group: str
    tags: list
    state: str = "finished"
    summary_metrics: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)

    def scan_history(self):
        return iter(self.rows)


class FakeApi:
    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return [r for r in self._runs if r.group == filters["group"]]


def fake_run_from_offline(path: str, timeout: float = 30.0) -> FakeRun:
    """What wandb.Api would return for the run once synced, read from its offline file
    (wandb's service may still be writing it when ``finish()`` returns: wait for the exit)."""
    deadline = time.time() + timeout
    while not any(r.WhichOneof("record_type") == "exit" for r in read_wandb_file(path)):
        assert time.time() < deadline, f"{path} holds no exit record after {timeout} s"
        time.sleep(0.2)
    items = lambda updates: {
        u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in updates
    }
    run, summary, rows, state = None, {}, [], "running"
    for rec in read_wandb_file(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
            config = items(run.config.update)
        elif kind == "history":
            rows.append(items(rec.history.item))
        elif kind == "summary":
            summary.update(items(rec.summary.update))
        elif kind == "exit":
            state = "finished" if rec.exit.exit_code == 0 else "failed"
    config.pop("_wandb", None)
    return FakeRun(run.display_name, config, run.run_group, list(run.tags), state, summary, rows)


def test_offline_wandb_run_holds_the_sweep_conventions_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the run's files go under its directory
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    cfg = tiny_config(model={"qk_norm": True})
    rid = run_id("qk_norm=True", cfg.optim.lr)
    run_config = {
        **to_jsonable(cfg.to_dict()),
        "setting": "qk_norm=True",
        "lr": cfg.optim.lr,
        "run_id": rid,
    }
    tracker = Tracker(
        tmp_path / "runs" / rid,
        cfg.wandb,
        run_config,
        name=rid,
        group="tiny",
        tags=("qk_norm", "z_loss"),
    )
    logged = history(cfg.optim.lr)
    tracker.log(logged)
    tracker.summary({"loss_at_init": 4.2})
    tracker.close()

    files = glob.glob(str(tmp_path / "runs" / rid / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    run = fake_run_from_offline(files[0])
    assert (run.name, run.group, run.tags, run.state) == (
        rid,
        "tiny",
        ["qk_norm", "z_loss"],
        "finished",
    )
    assert run.config["setting"] == "qk_norm=True" and run.config["run_id"] == rid
    assert run.config["lr"] == cfg.optim.lr and run.config["model"]["qk_norm"] is True
    assert [r["_step"] for r in run.rows] == list(STEPS)
    assert set(logged[0]) - {"step"} <= set(run.rows[0])
    assert run.summary_metrics["loss_at_init"] == 4.2

    diverged = FakeRun(
        "d",
        {"setting": "qk_norm=False", "lr": 1.0, "run_id": "d"},
        "tiny",
        [],
        summary_metrics={"alive": False, "_step": 6, "train/loss": None},
    )
    running = FakeRun(
        "r", {"setting": "qk_norm=False", "optim": {"lr": 0.1}}, "tiny", [], state="running"
    )
    other = FakeRun("o", {"setting": "x", "lr": 1.0}, "another-sweep", [])
    api = FakeApi([run, diverged, running, other])
    table, hist = results.from_wandb(
        "stability", "tiny", "me", keys=["train/loss", "attn/*"], api=api
    )
    assert api.calls == [("me/stability", {"group": "tiny"})]
    assert list(table.columns) == list(results.RUN_COLUMNS)
    by_id = table.set_index("run_id")
    ok = by_id.loc[rid]
    assert (ok["status"], ok["workdir"], ok["loss_at_init"]) == (
        "finished",
        "wandb:me/stability/tiny",
        4.2,
    )
    assert ok["final_loss"] == pytest.approx(logged[-1]["eval/loss"])
    assert ok["max_attn_logit"] == pytest.approx(
        plots.max_over_layers(logged[-1], "attn/max_logit")
    )
    assert (by_id.loc["d", "status"], by_id.loc["d", "diverged_step"]) == ("diverged", 6)
    assert (by_id.loc["r", "status"], by_id.loc["r", "lr"]) == ("unfinished", 0.1)
    # the W&B history equals the one read from the run's metrics.jsonl
    (tmp_path / "results.jsonl").write_text("")
    local = results.histories(tmp_path, keys=["train/loss", "attn/*"])
    cols = ["step", "key", "value"]
    assert hist[hist["run_id"] == rid][cols].reset_index(drop=True).equals(local[cols])
    recs = {r["run_id"]: r for r in results.records(table)}  # the running run is left out
    assert recs.keys() == {rid, "d"} and recs["d"]["loss_at_init"] is None


def test_long_legend_labels_break_after_commas_and_keep_every_character():
    from stability.plots import _wrap

    assert _wrap("eps=0.001") == "eps=0.001"
    label = "d_model=64,logit_multiplier=0.25,n_heads=4,qk_norm=True,parametrization=mup_full"
    wrapped = _wrap(label, width=36)
    assert wrapped.replace("\n", "") == label
    assert all(len(line) <= 37 for line in wrapped.splitlines()) and wrapped.count("\n") == 2


@pytest.mark.parametrize("plan_format", ["runs", "run_ids"])
def test_report_of_an_interrupted_sweep_takes_the_grid_from_the_plan(tmp_path, plan_format):
    """A sweep stopped before some runs started: LR 0.1 of both settings and the whole
    qk_norm=None setting never started. The plan (sweep.json; run ids only as release 0.2.0
    wrote it) still gives each setting its 3 LRs: no LR sensitivity from a partial grid, and
    a row for the setting that never started."""
    from stability import workdir as W

    d = write_sweep_dir(tmp_path / "sweep", lrs=(0.01, 1.0))
    plan = [
        {"run_id": run_id(s, lr), "setting": s, "lr": lr, "seed": 0}
        for s in ("qk_norm=False", "qk_norm=True", "qk_norm=None")
        for lr in (0.01, 0.1, 1.0)
    ]
    manifest = {"sweep": "x", "spec": "x.py", "run_ids": [p["run_id"] for p in plan]}
    if plan_format == "runs":
        manifest["runs"] = plan
    W.write_manifest(d, manifest)
    grid = W.planned_grid(d)
    assert grid["qk_norm=False"] == grid["qk_norm=True"] == [0.01, 0.1, 1.0]
    # the never-started setting: its name from the plan, or its run ids' prefix
    assert ("qk_norm=None" in grid) and len(grid) == 3
    md = report.write_report(d).read_text()
    assert "| qk_norm=False | 3.200 |  | div | n/a (2 of 3 LRs) | 1 |" in md
    assert "n/a (0 of 3 LRs)" in md and "(partial: 3 of 9 runs finished)" in md
    assert (
        plots.summary_table(
            results.records(results.runs_table(d)), grid=results.planned_grid(d)
        ).count("n/a (")
        == 3
    )
