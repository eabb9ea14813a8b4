"""The command line: help text, pointers for unknown options and keys, what --check and
--overwrite do with an existing workdir, and the sweep's progress lines."""

import json
from types import SimpleNamespace

import pytest

from conftest import tiny_config, write_config_file
from stability import sweep
from stability import workdir as W
from stability.cli import main
from stability.config import ConfigError
from stability.configfiles import load_sweep
from stability.step import static_config
from stability.sweep import build_runs
from stability.workdir import to_jsonable


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def option_help(text: str, option: str) -> str:
    """The help argparse prints for ``option`` (on its line, or the next one)."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.strip().startswith(option))
    parts = lines[i].strip()[len(option) :].split("  ", 1)  # help follows 2+ spaces
    return parts[1].strip() if len(parts) == 2 else lines[i + 1].strip()


@pytest.mark.parametrize("command", [[], ["train"], ["sweep"]])
def test_help(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and "::" not in text  # no raw reST
    flat = " ".join(text.split())
    for needle in ("--config.KEY=VALUE", "configs/default.py", "xs, s, m,", "w4096"):
        assert needle in flat
    options = {
        "train": ["--workdir", "--overwrite", "--no-progress", "--check"],
        "sweep": ["--workdir", "--strategy", "--no-progress", "--max-runs-per-program"],
    }
    for option in options.get(command[0] if command else "", []):
        helped = option_help(text, option)
        assert helped and not helped.startswith("-"), option


@pytest.mark.parametrize(
    "command", ["train", "sweep", "report", "forecast", "reproduce", "prepare-data"]
)
def test_every_help_states_each_default_once_and_no_empty_one(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in flat and "(default: False)" not in flat and "%%" not in flat
    if command == "forecast":  # a help that states its default gets no second one
        assert "(default: the shortest schedule's end) --threshold" in flat
        assert "(default: 10000.0)" in flat


@pytest.mark.parametrize(
    "arg, hint",
    [
        ("--lr=0.1", "did you mean --config.optim.lr=0.1?"),
        ("--qk_norm=False", "did you mean --config.model.qk_norm=False?"),
        ("--steps", "did you mean --config.train.steps=VALUE?"),
        ("--frobnicate", ""),
    ],
)
def test_unknown_options_point_at_config_overrides(tmp_path, capsys, arg, hint):
    code, _, err = run(capsys, "train", "--workdir", str(tmp_path / "w"), arg)
    assert code == 2 and "unrecognized arguments" in err and hint in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "w").exists()


def test_unknown_key_names_the_closest_first(tmp_path, capsys):
    code, _, err = run(
        capsys, "train", "--workdir", str(tmp_path / "w"), "--config.model.qk_nrom=False"
    )
    assert code == 2 and "did you mean model.qk_norm?" in err
    code, _, err = run(capsys, "train", "--workdir", str(tmp_path / "w"), "--config.lr=0.1")
    assert code == 2 and "did you mean optim.lr?" in err


def fake_run(workdir, cfg, steps=(5, 10), ckpts=(5, 10)):
    """A run directory as training leaves it: config.json, metrics.jsonl, checkpoints/<step>."""
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(to_jsonable(cfg.to_dict())))
    (workdir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in steps))
    for s in ckpts:
        (workdir / "checkpoints" / str(s)).mkdir(parents=True)


def test_train_check_predicts_refusal_and_overwrite(tmp_path, capsys):
    cfg = tiny_config()
    config_py = write_config_file(tmp_path / "tiny.py", cfg)
    workdir = tmp_path / "w"
    fake_run(workdir, tiny_config(optim={"lr": 0.5}))
    before = sorted(p.name for p in workdir.rglob("*"))
    code, _, err = run(capsys, "train", f"--config={config_py}", f"--workdir={workdir}", "--check")
    assert code == 2 and "different config (config.optim.lr: 0.5 there, 0.003 now)" in err
    code, out, _ = run(
        capsys, "train", f"--config={config_py}", f"--workdir={workdir}", "--check", "--overwrite"
    )
    assert code == 0
    assert (
        f"--overwrite would delete {workdir} (metrics up to step 10, checkpoints at steps 5, 10"
        in out
    )
    assert sorted(p.name for p in workdir.rglob("*")) == before  # --check wrote nothing
    fake_run(tmp_path / "same", cfg)
    code, out, _ = run(
        capsys, "train", f"--config={config_py}", f"--workdir={tmp_path / 'same'}", "--check"
    )
    assert code == 0 and "holds this run (metrics up to step 10" in out and "would resume" in out


def test_overwrite_deletes_any_run_and_says_what(tmp_path, capsys):
    cfg = tiny_config()
    workdir = tmp_path / "w"
    fake_run(workdir, cfg)  # the same config: --overwrite restarts it from scratch too
    config = to_jsonable(cfg.to_dict())
    assert W.check_run_dir(config, workdir, overwrite=False) is False  # resumable, kept
    W.prepare_run_dir(config, workdir, overwrite=True)
    err = capsys.readouterr().err
    assert (
        f"--overwrite: deleting {workdir} (metrics up to step 10, checkpoints at steps 5, 10" in err
    )
    assert sorted(p.name for p in workdir.iterdir()) == ["config.json"]
    other = tmp_path / "not_a_run"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    with pytest.raises(ConfigError, match="holds files but no run"):
        W.prepare_run_dir(config, other, overwrite=True)
    assert (other / "thesis.tex").exists()


def tiny_sweep(tmp_path, steps=2):
    cfg = tiny_config(
        optim={"warmup_steps": 1},
        train={"steps": steps, "log_every": 1, "eval_every": steps, "checkpoint_every": steps},
    )
    config_py = write_config_file(tmp_path / f"tiny{steps}.py", cfg)
    sweep_py = tmp_path / "lrs.py"
    sweep_py.write_text("def get_sweep():\n    return [{'optim.lr': 0.1}, {'optim.lr': 0.01}]\n")
    return str(sweep_py), config_py


def test_sweep_check_refuses_a_different_sweep_saying_what_differs(tmp_path, capsys):
    sweep_py, config_py = tiny_sweep(tmp_path)
    _, old_config = tiny_sweep(tmp_path, steps=3)
    old = build_runs(load_sweep(sweep_py)[1], old_config, [])
    workdir = tmp_path / "w"
    (workdir / "runs" / old[0].run_id).mkdir(parents=True)
    (workdir / "runs" / old[0].run_id / "config.json").write_text(
        json.dumps(to_jsonable(old[0].config.to_dict()))
    )
    (workdir / "sweep.json").write_text(
        json.dumps({"sweep": "lrs", "spec": sweep_py, "run_ids": [r.run_id for r in old][:1]})
    )
    code, _, err = run(
        capsys,
        "sweep",
        f"--sweep={sweep_py}",
        f"--config={config_py}",
        f"--workdir={workdir}",
        "--check",
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "1 runs there" in err and "2 runs now, 0 in common" in err
    new = build_runs(load_sweep(sweep_py)[1], config_py, [])
    assert f"run 0 is {old[0].run_id} there, {new[0].run_id} now" in err
    assert "(config.train.checkpoint_every: 3 there, 2 now)" in err  # the first field (sorted)


def fake_compile(chunks, preemption=None):
    """Stands in for sweep.compile_chunks (no compile): one fake stack per distinct one."""
    return {
        (static_config(c[0].config), len(c)): SimpleNamespace(
            programs=SimpleNamespace(mesh=SimpleNamespace(shape={"run": len(c), "data": 1}))
        )
        for c in chunks
    }


def fake_train(chunk, *args):
    """Stands in for sweep.train_chunk: every run of the chunk finishes at once."""
    out = SimpleNamespace(
        status="finished",
        last={},
        loss_at_init=4.0,
        diverged_step=None,
        stopped_step=None,
        warnings=[],
    )
    return SimpleNamespace(
        preempted=False,
        position=2,
        wall_seconds=0.0,
        runs=[out] * len(chunk),
        notice_after_end=False,
    )


def test_sweep_prints_each_chunks_point_and_the_program_count(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep, "compile_chunks", fake_compile)
    monkeypatch.setattr(sweep, "train_chunk", fake_train)
    sweep_py, config_py = tiny_sweep(tmp_path)
    workdir = tmp_path / "w"
    kwargs = dict(config_spec=config_py, progress=False, report=False)
    sweep.run_sweep(sweep_py, workdir, strategy="sequential", **kwargs)
    err = capsys.readouterr().err
    assert "2 runs, 0 already finished; 2 to train in 2 chunk(s), 1 compiled program(s)" in err
    assert "[2 run(s) left] default lr=0.1: 1 run(s)" in err
    assert "[1 run(s) left] default lr=0.01: 1 run(s)" in err
    sweep.run_sweep(sweep_py, workdir, strategy="sequential", **kwargs)
    err = capsys.readouterr().err
    assert "2 already finished; 0 to train in 0 chunk(s), 0 compiled program(s)" in err
    sweep.run_sweep(sweep_py, tmp_path / "v", strategy="vmap", **kwargs)
    err = capsys.readouterr().err
    assert "2 to train in 1 chunk(s), 1 compiled program(s) (vmap)" in err
    assert "[2 run(s) left] default lr=0.01…0.1: 2 run(s)" in err
    sweep.run_sweep(sweep_py, tmp_path / "s", strategy="sequential", seeds=2, **kwargs)
    err = capsys.readouterr().err  # one run per chunk: named with its seed
    assert "run(s) left] default lr=0.1 seed=1: 1 run(s)" in err
