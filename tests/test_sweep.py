import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_records_close, tiny_config, write_config_file
from stability import plots
from stability import train as T
from stability.cli import main
from stability.data import make_source
from stability.sharding import mesh_shape
from stability.sweep import read_results, run_sweep
from stability.tracking import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
LRS = (1e-3, 1e-2, 1e-1)


def write_files(tmp_path: Path, lrs=LRS, steps=12, qk_norm=(False,), steps_per_call=0) -> tuple[str, str]:
    """A tiny base config file and a sweep file (qk_norm × lrs) in tmp_path. One qk_norm value
    (the default) means one program, and the same one for every test that keeps ``steps``: the
    session's compilation cache compiles it once. ``steps_per_call=1`` (the notebook's test)
    compiles in about half the time (no loop beside the update that returns metrics)."""
    cfg = tiny_config(train={"steps": steps, "log_every": 4, "eval_every": 6, "checkpoint_every": 4,
                             "steps_per_call": steps_per_call})
    config_py = write_config_file(tmp_path / "tiny_config.py", cfg)
    sweep_py = tmp_path / "tiny_sweep.py"
    sweep_py.write_text(
        "NAME = 'tiny'\n"
        "def get_sweep(arg=''):\n"
        f"    return [{{'model.qk_norm': qk, 'optim.lr': lr}} for qk in {qk_norm!r} for lr in {lrs!r}]\n"
    )
    return config_py, str(sweep_py)


def by_id(records):
    return {r["run_id"]: r for r in records}


def test_vmap_equals_sequential_and_report(tmp_path):
    config_py, sweep_py = write_files(tmp_path)
    seq = run_sweep(sweep_py, tmp_path / "seq", config_spec=config_py, strategy="sequential", progress=False)
    vm = run_sweep(sweep_py, tmp_path / "vm", config_spec=config_py, strategy="vmap", progress=False)
    a, b = by_id(seq), by_id(vm)
    assert a.keys() == b.keys() and len(a) == 3
    for rid in a:
        np.testing.assert_allclose(a[rid]["final_loss"], b[rid]["final_loss"], rtol=1e-4)
        np.testing.assert_allclose(a[rid]["max_attn_logit"], b[rid]["max_attn_logit"], rtol=1e-3)
        assert {"setting", "lr", "loss_at_init", "diverged", "diverged_step", "min_attn_entropy",
                "steps", "wall_seconds", "config"} <= a[rid].keys()
        assert a[rid]["setting"] == "default"  # only the LR varies
        hist = plots.history(tmp_path / "vm", rid)
        assert [h["step"] for h in hist] == [4, 6, 8, 12]
    for name in ("lr_sensitivity.png", "max_attn_logit.png", "attn_entropy.png"):
        assert (tmp_path / "vm" / name).read_bytes()[:4] == b"\x89PNG", name
    assert "LR sensitivity" in (tmp_path / "vm" / "report.md").read_text()


def test_rerun_skips_finished_runs(tmp_path):
    config_py, sweep_py = write_files(tmp_path, lrs=(1e-2,))
    first = run_sweep(sweep_py, tmp_path / "w", config_spec=config_py, progress=False)
    mtime = (tmp_path / "w" / "results.jsonl").stat().st_mtime_ns
    again = run_sweep(sweep_py, tmp_path / "w", config_spec=config_py, progress=False)
    assert again == first
    assert (tmp_path / "w" / "results.jsonl").stat().st_mtime_ns == mtime


def test_nan_in_one_run_leaves_others_bitwise_unchanged():
    cfg = tiny_config()
    graphdef, tx, _, _, _ = T.compiled_fns(T.static_config(cfg))
    init = jax.vmap(lambda s: T.init_state(cfg, s, tx))
    step = jax.jit(jax.vmap(T.make_train_step(cfg, graphdef, tx), in_axes=(0, 0, None)))
    hp = {k: jnp.stack([v] * 3) for k, v in T.hyperparams(cfg).items()}
    stream = make_source(cfg.data, 64).train_stream(0)
    batches = [stream.next() for _ in range(3)]

    def run(poison: bool):
        state = init(jnp.arange(3))
        if poison:
            k = state.params["head"]["kernel"]
            k.value = k.value.at[2, 0, 0].set(jnp.nan)
        outs = []
        for b in batches:
            state, out = step(state, hp, b)
            outs.append(out)
        return state, outs

    clean, clean_out = run(False)
    bad, bad_out = run(True)
    assert not bool(bad_out[0]["alive"][2]) and bool(bad_out[0]["alive"][:2].all())
    for x, y in zip(jax.tree.leaves(clean.params), jax.tree.leaves(bad.params), strict=True):
        assert np.array_equal(np.asarray(x)[:2], np.asarray(y)[:2])
    for o1, o2 in zip(clean_out, bad_out, strict=True):
        for key in o1:
            assert np.array_equal(np.asarray(o1[key])[:2], np.asarray(o2[key])[:2]), key


def test_lr_sensitivity_matches_formula():
    recs = [
        {"run_id": "a", "setting": "s", "lr": 1e-3, "final_loss": 3.0, "loss_at_init": 5.0, "diverged": False},
        {"run_id": "b", "setting": "s", "lr": 1e-2, "final_loss": 2.0, "loss_at_init": 5.0, "diverged": False},
        {"run_id": "c", "setting": "s", "lr": 1e-1, "final_loss": 9.0, "loss_at_init": 5.0, "diverged": False},
        {"run_id": "d", "setting": "s", "lr": 1.0, "final_loss": None, "loss_at_init": 5.0, "diverged": True},
    ]
    # ℓ* = 2, ℓ0 = 5: terms 1, 0, min(9,5)-2 = 3, diverged → 5-2 = 3.
    assert plots.lr_sensitivity(recs) == pytest.approx((1 + 0 + 3 + 3) / 4)
    table = plots.summary_table(recs)
    assert "div" in table and "1.750" in table


def cli(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "stability", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "WANDB_MODE": "disabled", **(env or {})},
    )


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda c, s, t: ["--sweep", str(t / "nosweep.py")], "defines no get_sweep"),
        (lambda c, s, t: ["--sweep", str(t / "empty.py")], "empty grid"),
        (lambda c, s, t: ["--sweep", s, "--config", c, "--config.model.nope=1"], "config.model.nope"),
    ],
    ids=["no-get_sweep", "empty-grid", "unknown-key"],
)
def test_bad_sweep_input_exits_2_without_writing(tmp_path, capsys, make_args, message):
    config_py, sweep_py = write_files(tmp_path)
    (tmp_path / "nosweep.py").write_text("X = 1\n")
    (tmp_path / "empty.py").write_text("def get_sweep(arg=''):\n    return []\n")
    code = main(["sweep", *make_args(config_py, sweep_py, tmp_path), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_workdir_holding_another_sweep_is_refused(tmp_path, capsys):
    config_py, sweep_py = write_files(tmp_path, lrs=(1e-2,))
    run_sweep(sweep_py, tmp_path / "w", config_spec=config_py, progress=False, report=False)
    before = (tmp_path / "w" / "results.jsonl").read_bytes()
    _, other = write_files(tmp_path, lrs=(1e-3,))
    code = main(["sweep", "--sweep", other, "--config", config_py, "--workdir", str(tmp_path / "w")])
    assert code == 2 and "different sweep" in capsys.readouterr().err
    assert (tmp_path / "w" / "results.jsonl").read_bytes() == before


def comparable(records):
    keep = ("run_id", "final_loss", "loss_at_init", "diverged", "diverged_step", "max_attn_logit",
            "min_attn_entropy", "steps")
    return sorted(({k: r[k] for k in keep} for r in records), key=lambda r: r["run_id"])


@pytest.mark.parametrize("n_dev, k, batch, expect", [
    (8, 3, 4, (2, 4)),  # fewer runs than devices: the rest split the batch
    (8, 1, 16, (1, 8)),
    (8, 3, 2, (8, 1)),  # the batch does not split 4 ways: pad the runs
    (8, 7, 16, (8, 1)),  # a data axis would not lower the padded run count
    (8, 20, 16, (8, 1)),
    (1, 7, 16, (1, 1)),
    (256, 7, 256, (4, 64)),
])
def test_mesh_shape(n_dev, k, batch, expect):
    assert mesh_shape(n_dev, k, batch) == (*expect, 1)


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_records(tmp_path):
    config_py, sweep_py = write_files(tmp_path, lrs=(1e-3, 1e-2, 3e-2))
    args = [sys.executable, "-m", "stability", "sweep", "--sweep", sweep_py, "--config", config_py,
            "--strategy", "sequential", "--no-progress"]
    assert main([*args[3:], "--workdir", str(tmp_path / "ref")]) == 0  # in this process
    results = tmp_path / "killed" / "results.jsonl"
    proc = subprocess.Popen([*args, "--workdir", str(tmp_path / "killed")], cwd=ROOT,
                            env={**os.environ, "WANDB_MODE": "disabled"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (results.exists() and results.read_text().count("\n") >= 1):
        time.sleep(0.2)
    time.sleep(1.0)  # somewhere inside the second run
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert main([*args[3:], "--workdir", str(tmp_path / "killed")]) == 0
    read = lambda d: [json.loads(line) for line in (tmp_path / d / "results.jsonl").open()]
    assert comparable(read("killed")) == comparable(read("ref"))
    for rid in by_id(read("ref")):
        a = [json.loads(x) for x in (tmp_path / "ref" / "runs" / rid / "metrics.jsonl").open()]
        b = [json.loads(x) for x in (tmp_path / "killed" / "runs" / rid / "metrics.jsonl").open()]
        strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rs]
        assert strip(a) == strip(b)


def test_many_steps_per_call_equal_one_with_a_run_dying_mid_call(tmp_path):
    """K updates per device call give K=1's histories and results, with a run that diverges
    inside a call, and after resuming from a mid-sweep checkpoint: the same logged steps, the
    same diverged_step, floats to rtol 1e-6. (Under XLA:CPU's default fusion emitters they are
    bitwise equal; under the older emitters the test suite compiles with (tests/conftest.py),
    the vmapped K-update program rounds some metrics of its last update differently, at most
    4e-7 apart.)"""
    train = {"steps": 24, "log_every": 8, "eval_every": 12, "checkpoint_every": 12,
             "divergence_loss": 5.6}
    sweep_py = tmp_path / "sweep.py"
    sweep_py.write_text("def get_sweep(arg=''):\n    return [{'optim.lr': lr} for lr in (1e-3, 0.5)]\n")
    workdirs = {}
    for k in (1, 0):
        cfg = tiny_config(train={**train, "steps_per_call": k}, model={"qk_norm": False},
                          optim={"grad_clip": 0.0, "warmup_steps": 0})
        config_py = write_config_file(tmp_path / f"config{k}.py", cfg)
        workdirs[k] = tmp_path / f"k{k}"
        run_sweep(str(sweep_py), workdirs[k], config_spec=config_py, strategy="vmap",
                  progress=False, report=False)
    # A crash after step 12 of the K=8 sweep: its last checkpoint and results are gone.
    (chunk,) = (workdirs[0] / "chunks").iterdir()
    shutil.rmtree(chunk / "checkpoints" / "24")
    (workdirs[0] / "results.jsonl").unlink()
    run_sweep(str(sweep_py), workdirs[0], config_spec=str(tmp_path / "config0.py"),
              strategy="vmap", progress=False, report=False)
    one, many = (by_id(read_results(workdirs[k])[0]) for k in (1, 0))
    (dead,) = [r for r in many.values() if r["diverged"]]  # the other run lives
    assert dead["diverged_step"] % 8 and dead["diverged_step"] < 24  # inside a call
    drop = ("wall_seconds", "config", "run_id")
    for (rid_a, a), (rid_b, b) in zip(sorted(one.items()), sorted(many.items()), strict=True):
        assert_records_close([{k: v for k, v in a.items() if k not in drop}],
                             [{k: v for k, v in b.items() if k not in drop}])
        hist = lambda d, rid: [{k: v for k, v in r.items() if not k.startswith("perf/")}
                               for r in read_jsonl(d / "runs" / rid / "metrics.jsonl")[0]]
        assert_records_close(hist(workdirs[1], rid_a), hist(workdirs[0], rid_b))
