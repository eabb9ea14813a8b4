"""The one training loop (stability/loop.py): call c+1 is dispatched before the host reads call
c; `train` (a stack of one) and a one-point `sweep` give the same records, checkpoints and
results, WSD-S decay ends included; K updates per call give K=1's records; resumes, and the
checkpoints of the previous release."""

import dataclasses
import json
import shutil
import threading

import jax
import numpy as np
import pytest

from conftest import assert_records_close, tiny_config, write_config_file
from stability import loop as L
from stability import sharding as S
from stability import train as T
from stability import workdir as W
from stability.checkpoint import Checkpointer
from stability.config import ConfigError
from stability.preemption import Preemption
from stability.sweep import read_results, run_sweep
from stability.tracking import Tracker
from stability.workdir import read_jsonl


def strip_perf(records):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def final_state(workdir):
    """(step, {leaf path: array}) of the newest checkpoint under ``workdir``, read by orbax
    without a target."""
    import orbax.checkpoint as ocp

    (ckpts,) = {
        p.parent for p in workdir.rglob("*") if p.name.isdigit() and p.parent.name == "checkpoints"
    }
    step = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    tree = ocp.StandardCheckpointer().restore(ckpts / str(step) / "state")
    return step, {
        jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def checkpoint_steps(workdir):
    (ckpts,) = {
        p.parent for p in workdir.rglob("*") if p.name.isdigit() and p.parent.name == "checkpoints"
    }
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())


def test_next_call_is_dispatched_before_the_host_reads_the_previous_one(tmp_path, monkeypatch):
    """An instrumented call, fetch and record writer: the event order, no timing. The records
    of call c are written on the writer thread: a writer that waits until call c+2 has been
    dispatched delays no call (on the loop's thread it would wait forever: the guard ends
    such a wait and the order then shows it)."""
    # calls end at the evals (10, 20, 30); one checkpoint, at the end (a checkpoint waits for
    # the records before it)
    cfg = tiny_config(train={"steps": 30, "checkpoint_every": 30})
    stack = L.plan_stack(cfg, 1)
    progs = stack.programs
    events, calls = [], {}
    dispatched = [threading.Event() for _ in range(3)]

    class Instrumented:
        def compile(self, *args):
            return progs.call.compile(*args)

        def __call__(self, *args):
            state, out = progs.call(*args)
            calls[id(out["alive"])] = len(calls)
            events.append(("dispatch", calls[id(out["alive"])]))
            dispatched[len(calls) - 1].set()
            return state, out

    read = S.fetch

    def fetch(g):
        tree = g.packed  # one process: the call's own outputs
        if isinstance(tree, dict) and id(tree.get("alive")) in calls:
            events.append(("fetch", calls[id(tree["alive"])]))
        return read(g)

    log, written = Tracker.log, []

    def slow_log(self, records):
        c = len(written)
        written.append(c)
        if c + 2 < len(dispatched) and not dispatched[c + 2].wait(timeout=60):
            events.append(("writer waited in vain", c))
        log(self, records)
        events.append(("written", c))

    monkeypatch.setattr(S, "fetch", fetch)
    monkeypatch.setattr(Tracker, "log", slow_log)
    spec = T.run_spec(cfg, tmp_path / "run")
    with Preemption() as pre:
        result = L.train_stack(
            [spec],
            tmp_path / "ckpt",
            label="x",
            preemption=pre,
            progress=False,
            stack=dataclasses.replace(
                stack, programs=dataclasses.replace(progs, call=Instrumented())
            ),
        )
    assert result.position == 30 and result.runs[0].status == "finished"
    order = [e for e in events if e[0] != "written"]
    assert order == [
        ("dispatch", 0),
        ("dispatch", 1),
        ("fetch", 0),
        ("dispatch", 2),
        ("fetch", 1),
        ("fetch", 2),
    ]
    assert events.index(("written", 0)) > events.index(("dispatch", 2))
    assert [e for e in events if e[0] == "written"] == [("written", c) for c in range(3)]
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]] == [
        5,
        10,
        15,
        20,
        25,
        30,
    ]


def test_train_equals_a_one_point_sweep_and_k_one_with_wsd_s_decay_ends(tmp_path):
    """WSD-S decay ends at 7 and 13 are evaluated, checkpointed and kept (max_to_keep=1) by
    `train` and by `sweep` alike; records (bitwise), checkpoints and the final loss agree, and
    equal those of one update per call."""
    overrides = dict(
        optim={"schedule": "wsd_s", "wsd_decay_ends": (7, 13)},
        train={
            "checkpoint_every": 10,
            "max_to_keep": 1,
            "eval_every": 20,
            "keep_final_checkpoint": True,
        },
    )
    cfg = tiny_config(**overrides)
    k_one = tiny_config(optim=overrides["optim"], train={**overrides["train"], "steps_per_call": 1})
    assert L.St.steps_per_call_max(cfg.train) == 10
    ran = T.train(cfg, tmp_path / "train", progress=False)
    T.train(k_one, tmp_path / "k1", progress=False)
    sweep_py = tmp_path / "one.py"
    sweep_py.write_text(f"def get_sweep(arg=''):\n    return [{{'optim.lr': {cfg.optim.lr!r}}}]\n")
    (result,) = run_sweep(
        str(sweep_py),
        tmp_path / "sweep",
        progress=False,
        report=False,
        config_spec=write_config_file(tmp_path / "cfg.py", cfg),
    )
    train_records = W.metrics(tmp_path / "train")[0]
    sweep_records = read_jsonl(tmp_path / "sweep" / "runs" / result["run_id"] / "metrics.jsonl")[0]
    assert [r["step"] for r in train_records if "eval/loss" in r] == [7, 13, 20]
    assert strip_perf(train_records) == strip_perf(sweep_records)
    assert strip_perf(train_records) == strip_perf(W.metrics(tmp_path / "k1")[0])
    assert (
        checkpoint_steps(tmp_path / "train") == checkpoint_steps(tmp_path / "sweep") == [7, 13, 20]
    )
    for step in (7, 13):
        meta = json.loads(
            next((tmp_path / "train" / "checkpoints" / str(step)).glob("meta/*")).read_text()
        )
        assert meta["decay_end"] and meta["format"] == L.FORMAT
    (step_a, a), (step_b, b) = final_state(tmp_path / "train"), final_state(tmp_path / "sweep")
    assert step_a == step_b == 20 and a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert (
        ran.final_eval_loss == result["final_loss"] and ran.loss_at_init == result["loss_at_init"]
    )


def test_a_finished_chunk_keeps_no_checkpoint_unless_asked(tmp_path):
    """The default: once every run of a chunk has its results record, the chunk's checkpoints
    are deleted (a rerun skips those runs); a crash after the results but before the deletion
    leaves the chunk directory to the rerun, which deletes it."""
    cfg = tiny_config(train={"steps": 10})
    sweep_py = tmp_path / "one.py"
    sweep_py.write_text("def get_sweep(arg=''):\n    return [{'optim.lr': 1e-3}]\n")
    config_py = write_config_file(tmp_path / "cfg.py", cfg)
    (first,) = run_sweep(
        str(sweep_py), tmp_path / "w", config_spec=config_py, progress=False, report=False
    )
    assert not (tmp_path / "w" / "chunks").exists() or not list(
        (tmp_path / "w" / "chunks").iterdir()
    )
    from stability.sweep import build_runs, chunk_id, chunks_of, load_sweep

    (chunk,) = chunks_of(build_runs(load_sweep(str(sweep_py))[1], config_py, []), "sequential", 1)
    left = tmp_path / "w" / "chunks" / chunk_id(chunk) / "checkpoints" / "10"
    left.mkdir(parents=True)
    (again,) = run_sweep(
        str(sweep_py), tmp_path / "w", config_spec=config_py, progress=False, report=False
    )
    assert again == first and not list((tmp_path / "w" / "chunks").iterdir())


def test_resume_equals_uninterrupted(tiny, tmp_path):
    cfg = tiny()
    T.train(cfg, tmp_path / "a", progress=False)
    T.train(cfg, tmp_path / "b", progress=False)
    # Simulate a crash after step 10: the last checkpoint is gone, metrics past it remain.
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "20")
    T.train(cfg, tmp_path / "b", progress=False)
    a, b = W.metrics(tmp_path / "a")[0], W.metrics(tmp_path / "b")[0]
    assert strip_perf(a) == strip_perf(b)  # bitwise: floats compared exactly


def test_a_single_runs_checkpoint_of_the_previous_release_resumes_and_others_are_refused(
    tiny, tmp_path
):
    """A `stability train` checkpoint of release 0.1.0 (no run axis; meta with "diverged") is
    restored and given a run axis, and a sweep chunk's (stacked, meta without "format") as it
    is: both continue as if uninterrupted. A checkpoint of an unknown format is refused,
    naming this release, and nothing is moved or deleted."""
    cfg = tiny()
    T.train(cfg, tmp_path / "ref", progress=False)
    run = tmp_path / "old"
    T.train(cfg, run, progress=False)
    shutil.rmtree(run / "checkpoints" / "20")
    # Rewrite checkpoint 10 as release 0.1.0 wrote it.
    progs = L.plan_stack(cfg, 1).programs
    ckpt = Checkpointer(run / "checkpoints", 2)
    stacked = ckpt.restore(10, progs.abstract_state)
    stream = ckpt.meta(10)["stream"]
    ckpt.close()
    shutil.rmtree(run / "checkpoints" / "10")
    ckpt = Checkpointer(run / "checkpoints", 2)
    ckpt.save(
        10,
        jax.tree.map(lambda x: x[0], stacked),
        {"stream": stream, "diverged": False, "diverged_step": None, "decay_end": False},
    )
    ckpt.close()
    T.train(cfg, run, progress=False)
    assert strip_perf(W.metrics(run)[0]) == strip_perf(W.metrics(tmp_path / "ref")[0])

    # A sweep chunk's checkpoint of 0.1.0 (stacked; meta without "format") resumes as it is.
    sweep_py = tmp_path / "one.py"
    sweep_py.write_text(f"def get_sweep(arg=''):\n    return [{{'optim.lr': {cfg.optim.lr!r}}}]\n")
    kept = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, keep_final_checkpoint=True)
    )
    config_py = write_config_file(tmp_path / "cfg.py", kept)
    for name in ("ref_sweep", "old_sweep"):
        run_sweep(
            str(sweep_py), tmp_path / name, config_spec=config_py, progress=False, report=False
        )
    (chunk,) = (tmp_path / "old_sweep" / "chunks").iterdir()
    shutil.rmtree(chunk / "checkpoints" / "20")
    (tmp_path / "old_sweep" / "results.jsonl").unlink()
    meta = next((chunk / "checkpoints" / "10").glob("meta/*"))
    meta.write_text(
        json.dumps(
            {
                k: v
                for k, v in json.loads(meta.read_text()).items()
                if k in ("stream", "loss_at_init")
            }
        )
    )
    (got,) = run_sweep(
        str(sweep_py), tmp_path / "old_sweep", config_spec=config_py, progress=False, report=False
    )
    (want,) = read_results(tmp_path / "ref_sweep")[0]
    assert got["final_loss"] == want["final_loss"] and got["steps"] == 20

    shutil.rmtree(run / "checkpoints" / "20")
    meta = next((run / "checkpoints" / "10").glob("meta/*"))
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": 99}))
    with pytest.raises(ConfigError, match=rf"format 99 is not one this release \({L.RELEASE}"):
        T.train(cfg, run, progress=False)
    assert checkpoint_steps(run) == [10]


def test_many_steps_per_call_equal_one_with_a_run_dying_mid_call(tmp_path):
    """K updates per device call give K=1's histories and results, with a run that diverges
    inside a call, and after resuming from a mid-sweep checkpoint: the same logged steps, the
    same diverged_step, floats to rtol 1e-6, gradient statistics to 1e-5 (the mean output logit,
    near 0, to atol 1e-6: conftest.ATOL_FOR). (The vmapped K-update
    program and the one-update program are different XLA programs: under the older fusion
    emitters the test suite compiles with (tests/conftest.py) they round some metrics up to
    4e-7 apart, and the gradient statistics of the diverging update, large numbers summed in
    another order, up to 4e-6.)"""
    train = {
        "steps": 24,
        "log_every": 4,
        "eval_every": 12,
        "checkpoint_every": 12,
        "divergence_loss": 5.6,
    }
    sweep_py = tmp_path / "sweep.py"
    sweep_py.write_text(
        "def get_sweep(arg=''):\n    return [{'optim.lr': lr} for lr in (1e-3, 0.5)]\n"
    )
    workdirs = {}
    for k in (1, 0):
        cfg = tiny_config(
            train={**train, "steps_per_call": k, "keep_final_checkpoint": True},
            model={"qk_norm": False},
            optim={"grad_clip": 0.0, "warmup_steps": 0},
        )
        config_py = write_config_file(tmp_path / f"config{k}.py", cfg)
        workdirs[k] = tmp_path / f"k{k}"
        run_sweep(
            str(sweep_py),
            workdirs[k],
            config_spec=config_py,
            strategy="vmap",
            progress=False,
            report=False,
        )
    # A crash after step 12 of the K=12 sweep: its last checkpoint and results are gone.
    (chunk,) = (workdirs[0] / "chunks").iterdir()
    shutil.rmtree(chunk / "checkpoints" / "24")
    (workdirs[0] / "results.jsonl").unlink()
    run_sweep(
        str(sweep_py),
        workdirs[0],
        config_spec=str(tmp_path / "config0.py"),
        strategy="vmap",
        progress=False,
        report=False,
    )
    by_id = lambda records: {r["run_id"]: r for r in records}
    one, many = (by_id(read_results(workdirs[k])[0]) for k in (1, 0))
    (dead,) = [r for r in many.values() if r["diverged"]]  # the other run lives
    assert dead["diverged_step"] % 4 and dead["diverged_step"] < 24  # not logged, inside a call
    drop = ("wall_seconds", "config", "run_id")
    for (rid_a, a), (rid_b, b) in zip(sorted(one.items()), sorted(many.items()), strict=True):
        assert_records_close(
            [{k: v for k, v in a.items() if k not in drop}],
            [{k: v for k, v in b.items() if k not in drop}],
        )
        hist = lambda d, rid: strip_perf(read_jsonl(d / "runs" / rid / "metrics.jsonl")[0])
        assert_records_close(
            hist(workdirs[1], rid_a), hist(workdirs[0], rid_b), rtol_for={"grad/": 1e-5}
        )


# ---------------------------------------------------------------------------------------
# Early warnings inside the loop (watch.on_warning).


def watch_sweep(tmp_path, name: str, on_warning: str, max_to_keep: int = 1) -> dict:
    """A vmapped sweep of 3 LRs without qk-layernorm, a checkpoint every 2 steps: at LR 0.3
    the attention entropy collapses at step 4 and the logits climb (warnings at 4 and 6); the
    other runs raise none. {lr: (result record, history, events)}."""

    cfg = tiny_config(
        model={"qk_norm": False},
        optim={"warmup_steps": 0, "grad_clip": 0.0},
        train={
            "steps": 40,
            "log_every": 2,
            "eval_every": 20,
            "checkpoint_every": 2,
            "max_to_keep": max_to_keep,
            "keep_final_checkpoint": True,
        },
        watch={"on_warning": on_warning},
    )
    config_py = write_config_file(tmp_path / f"{name}.py", cfg)
    sweep_py = tmp_path / "sweep3.py"
    sweep_py.write_text(
        "def get_sweep(arg=''):\n    return [{'optim.lr': lr} for lr in (1e-3, 1e-2, 0.3)]\n"
    )
    run_sweep(
        str(sweep_py),
        tmp_path / name,
        config_spec=config_py,
        strategy="vmap",
        progress=False,
        report=False,
    )
    out = {}
    for r in read_results(tmp_path / name)[0]:
        run_dir = W.run_dir(tmp_path / name, r["run_id"])
        events = [{k: v for k, v in e.items() if k != "run"} for e in W.events(run_dir)]
        out[r["lr"]] = (r, strip_perf(W.metrics(run_dir)[0]), events)  # run ids differ
    return out


def test_stop_and_checkpoint_on_warning_in_a_vmapped_sweep(tmp_path):
    log = watch_sweep(tmp_path, "log", "log")
    assert [(e["step"], e["detector"], e["event"]) for e in log[0.3][2]][:2] == [
        (4, "entropy_collapse", "warn"),
        (6, "logit_growth", "warn"),
    ]
    assert not log[1e-3][2] and not log[1e-2][2]
    assert not log[0.3][0]["stopped"] and log[0.3][0]["steps"] == 40
    # stop: frozen from the call boundary after the one running when the warning was read
    # (the warning at step 4 is read while the call (4, 6] runs): its records end at step 6.
    stop = watch_sweep(tmp_path, "stop", "stop")
    rec, hist, events = stop[0.3]
    assert rec["stopped"] and rec["stopped_step"] == 6 and not rec["diverged"]
    assert (
        rec["final_loss"] is None
        and hist == log[0.3][1][:3]
        and [h["step"] for h in hist] == [2, 4, 6]
    )
    assert [e for e in events if e["event"] != "stop"] == [e for e in log[0.3][2] if e["step"] <= 6]
    assert [(e["step"], e["detector"]) for e in events if e["event"] == "stop"] == [
        (6, "entropy_collapse")
    ]
    for lr in (1e-3, 1e-2):  # the other runs of the program: bitwise unaffected
        assert stop[lr][1] == log[lr][1] and stop[lr][0]["final_loss"] == log[lr][0]["final_loss"]
    # checkpoint: the checkpoints before the warnings at steps 4 and 6 outlive max_to_keep=1.
    kept = watch_sweep(tmp_path, "kept", "checkpoint")
    assert checkpoint_steps(tmp_path / "kept") == [2, 4, 40]
    assert all(kept[lr][1] == log[lr][1] for lr in log)


def test_stop_on_warning_stops_a_single_run_and_a_rerun_does_nothing(tmp_path, capsys):
    """`stability train` with watch.on_warning=stop: the warning at step 4 is read while the
    call (4, 6] runs, so the run stops at step 6 (a call of 2 updates here: within two calls
    of the warning), says so and exits 0; the run is recorded and reported as stopped, and a
    rerun trains nothing and says why."""
    from stability import report
    from stability.cli import main

    cfg = tiny_config(
        model={"qk_norm": False},
        optim={"warmup_steps": 0, "grad_clip": 0.0, "lr": 0.3},
        train={"steps": 40, "log_every": 2, "eval_every": 20, "checkpoint_every": 2},
        watch={"on_warning": "stop"},
    )
    config_py = write_config_file(tmp_path / "c.py", cfg)
    args = ["train", f"--config={config_py}", f"--workdir={tmp_path / 'run'}", "--no-progress"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "stopped at step 6 (entropy_collapse warning at step 4: " in err
    assert "done:" not in err and "interrupted" not in err
    hist = W.metrics(tmp_path / "run")[0]
    assert [h["step"] for h in hist] == [2, 4, 6]
    assert [e["step"] for e in W.events(tmp_path / "run") if e["event"] == "stop"] == [6]
    assert checkpoint_steps(tmp_path / "run")[-1] == 6
    assert main(args) == 0
    assert (
        "run was stopped at step 6 by an early warning (entropy_collapse" in capsys.readouterr().err
    )
    assert W.metrics(tmp_path / "run")[0] == hist
    md = report.write_report(tmp_path / "run").read_text()
    assert "Status: stopped." in md


def test_resume_neither_repeats_nor_loses_a_warning(tmp_path):
    """A stopping sweep crashed after step 36 (its later checkpoints and results gone) and
    rerun: its histories and events.jsonl equal the uninterrupted sweep's."""
    ref = watch_sweep(tmp_path, "ref", "stop", max_to_keep=3)
    crashed = watch_sweep(tmp_path, "crashed", "stop", max_to_keep=3)
    (chunk,) = (tmp_path / "crashed" / "chunks").iterdir()
    for step in (38, 40):
        shutil.rmtree(chunk / "checkpoints" / str(step))
    (tmp_path / "crashed" / "results.jsonl").unlink()
    again = watch_sweep(tmp_path, "crashed", "stop", max_to_keep=3)
    assert crashed.keys() == again.keys() == ref.keys()
    for lr in ref:
        assert again[lr][1] == ref[lr][1] and again[lr][2] == ref[lr][2], lr
    assert again[0.3][0]["stopped_step"] == 6


def test_a_notice_during_the_last_call_finishes_the_run_and_stops_the_sweep(
    tmp_path, monkeypatch, capsys
):
    """A stop notice that arrives while the last call of a stack runs: the stack finishes
    (its results are recorded) and says so; a sweep then trains no further chunk, and its
    rerun trains the rest."""
    finish = L._Loop._finish

    def notice_in_last_call(self, call):  # read while the last call, (10, 20], runs
        finish(self, call)
        if call.end == 10:
            self._pre.requested = True

    run = L._Loop.run
    monkeypatch.setattr(
        L._Loop,
        "run",
        lambda self, start, pre, *a: (setattr(self, "_pre", pre), run(self, start, pre, *a))[1],
    )
    monkeypatch.setattr(L._Loop, "_finish", notice_in_last_call)
    cfg = tiny_config()  # calls end at 10 and 20
    result = T.train(cfg, tmp_path / "run", progress=False)
    assert result.notice_after_end and not result.preempted and result.steps == 20
    sweep_py = tmp_path / "two.py"
    sweep_py.write_text(
        "def get_sweep(arg=''):\n    return [{'optim.lr': lr} for lr in (1e-3, 1e-2)]\n"
    )
    config_py = write_config_file(tmp_path / "cfg.py", cfg)
    kwargs = dict(config_spec=config_py, strategy="sequential", progress=False, report=False)
    first = run_sweep(str(sweep_py), tmp_path / "w", **kwargs)
    assert len(first) == 1 and "interrupted after a finished chunk" in capsys.readouterr().err
    assert len(run_sweep(str(sweep_py), tmp_path / "w", **kwargs)) == 2


def test_a_checkpoint_resumes_in_the_other_blocks_layout(tiny, tmp_path):
    """train.scan_layers may change between a run and its resume: the checkpoint converts
    from the per-layer layout to the stacked one (as a scanned run of an earlier release,
    whose checkpoints are per-layer, resumes) and back, and the run goes on as if
    uninterrupted (to rounding: the layouts sum gradients in another order)."""
    per_layer = tiny()
    stacked = dataclasses.replace(
        per_layer, train=dataclasses.replace(per_layer.train, scan_layers=True)
    )
    T.train(per_layer, tmp_path / "ref", progress=False)
    ref = strip_perf(W.metrics(tmp_path / "ref")[0])
    for first, then in ((per_layer, stacked), (stacked, per_layer)):
        run = tmp_path / f"from_{L.layout(first)}"
        T.train(first, run, progress=False)
        shutil.rmtree(run / "checkpoints" / "20")
        ckpt = Checkpointer(run / "checkpoints", 2)
        assert ckpt.meta(10)["layers"] == L.layout(first)
        ckpt.close()
        T.train(then, run, progress=False)
        assert_records_close(ref, strip_perf(W.metrics(run)[0]), rtol=1e-5, atol=1e-6)
