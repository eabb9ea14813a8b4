"""Mesh, rules and sharded train steps (stability/sharding.py, stability/programs.py).

The multi-device checks run in child processes with 8 forced CPU devices (the pytest process
has one): this file is also their program (``python tests/test_sharding.py eight DIR``).
Every sharded run is compared, metric by metric, with the unsharded single-device run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import tiny_config, write_config_file
from stability import programs as Pr
from stability import sharding as S
from stability import step as St
from stability.config import ConfigError, size_preset

ROOT = Path(__file__).resolve().parent.parent
STEPS = 20
RTOL, ATOL = 1e-5, 1e-6  # sharded vs single-device: reduction order only


def small(**train):
    """tiny_config with a batch of 8 (splittable 8 ways) and 4 heads (splittable 2 ways)."""
    return tiny_config(
        model={"d_model": 32, "n_heads": 4},
        data={"batch_size": 8},
        train={"steps": STEPS, **train},
    )


def batches(cfg, n: int = STEPS) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    B, T1, V = cfg.data.batch_size, cfg.data.seq_len + 1, cfg.model.vocab_size
    return [{"tokens": rng.integers(0, V, (B, T1)).astype(np.int32)} for _ in range(n)]


def reference(cfg) -> list[dict]:
    """Per-step metrics of the unsharded run on one device (``cfg`` without tensor parallelism:
    on one device FSDP shards nothing, and its program is the one a restore onto one device
    uses)."""
    one = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, tensor_parallel=1))
    mesh = S.make_mesh(one, devices=jax.devices()[:1])
    state = Pr.build(one, mesh).init(np.int32(cfg.train.seed))
    return _run_sharded(one, mesh, state, St.hyperparams(cfg), batches(cfg))[1]


def assert_same(got: list[dict], want: list[dict], what: str) -> None:
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.keys() == w.keys(), what
        for k in w:
            np.testing.assert_allclose(
                np.asarray(g[k], np.float64),
                np.asarray(w[k], np.float64),
                rtol=RTOL,
                atol=ATOL,
                err_msg=f"{what}: step {i + 1} {k}",
            )


# ---------------------------------------------------------------------------------------
# Single process.


def test_mesh_shape_keeps_the_sweep_rule_and_adds_model_and_fsdp():
    # Without FSDP and tensor parallelism: the (run, data) rule of the sweep engine.
    for n_dev, n_runs, batch, want in [
        (8, 16, 16, (8, 1)),  # runs fill the devices
        (8, 2, 16, (2, 4)),  # leftover devices split the batch
        (8, 1, 16, (1, 8)),  # one run: data parallel
        (8, 3, 16, (2, 4)),  # 3 runs padded to 4 on 2×4, to 8 on 8×1
        (8, 5, 16, (8, 1)),  # 4×2 would pad 5 runs to 8 as 8×1 does: no communication
        (8, 6, 6, (8, 1)),  # batch 6 does not split 4 ways: 2 copies of 6 runs
    ]:
        assert S.mesh_shape(n_dev, n_runs, batch) == (*want, 1)
    # most devices would train copies without a word: refused, saying what would split
    for n_dev, n_runs, batch in [(8, 2, 6), (256, 1, 24)]:
        with pytest.raises(ConfigError, match=f"batch_size={batch} does not split .* copies"):
            S.mesh_shape(n_dev, n_runs, batch)
    assert S.mesh_shape(8, 2, 16, tensor_parallel=2) == (2, 2, 2)
    assert S.mesh_shape(8, 1, 16, tensor_parallel=2, fsdp=True) == (1, 4, 2)
    assert S.mesh_shape(8, 3, 16, fsdp=True) == (2, 4, 1)  # FSDP keeps the data split
    assert S.mesh_shape(8, 16, 16, fsdp=True) == (8, 1, 1)
    with pytest.raises(ConfigError, match="tensor_parallel=3 must divide the device count 8"):
        S.mesh_shape(8, 1, 16, tensor_parallel=3)
    with pytest.raises(ConfigError, match="data.batch_size=3"):
        S.mesh_shape(8, 1, 3, fsdp=True)


def test_rules_map_logical_names_with_divisibility_fallback():
    sizes = {"run": 2, "data": 4, "model": 2}
    fsdp, plain = S.rules(True), S.rules(False)
    assert S.spec(("embed", "mlp"), (64, 256), sizes, fsdp) == S.P("data", "model")
    assert S.spec(("embed", "mlp"), (64, 256), sizes, plain) == S.P(None, "model")
    assert S.spec(("vocab", "embed"), (255, 64), sizes, fsdp) == S.P(None, "data")  # 255 % 2
    assert S.spec(("run", "heads", "embed"), (2, 64, 64), sizes, fsdp) == S.P(
        "run", "model", "data"
    )
    assert S.spec((None,), (64,), sizes, fsdp) == S.P()


def test_device_memory_is_asked_of_this_processs_devices_only():
    """On a pod, memory_stats() of another host's device raises: the limit comes from one of
    this process's devices, wherever the mesh starts."""
    from types import SimpleNamespace

    class Device:
        def __init__(self, process_index):
            self.process_index = process_index

        def memory_stats(self):
            if self.process_index != jax.process_index():
                raise RuntimeError(
                    "INVALID_ARGUMENT: MemoryStats is only supported for addressable PjRt devices"
                )
            return {"bytes_limit": 123}

    devices = np.array([Device(jax.process_index() + 1), Device(jax.process_index())], object)
    mesh = SimpleNamespace(devices=devices, shape={"run": 2})
    assert S.local_devices(mesh) == [devices[1]] and S.device_limit_bytes(mesh) == 123
    with pytest.raises(ValueError, match="no device of the mesh"):
        S.local_devices(SimpleNamespace(devices=devices[:1], shape={"run": 1}))


def test_tensor_parallel_must_divide_heads():
    with pytest.raises(
        ConfigError, match=r"train.tensor_parallel=3 must divide config.model.n_heads=4"
    ):
        small(tensor_parallel=3)


def test_remat_modes_give_identical_losses_and_gradients():
    """none | block | full: the same loss and gradients; block and full checkpoint blocks."""
    from flax import nnx

    from stability.models import Transformer

    cfg = small()
    tokens = batches(cfg, 1)[0]["tokens"]
    results = {}
    for remat in ("none", "block", "full"):
        model = Transformer(cfg.model, remat=remat, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params, graphdef=graphdef, rest=rest):
            logits_BTV, _ = nnx.merge(graphdef, params, rest, copy=True)(tokens[:, :-1])
            return St.cross_entropy(logits_BTV, tokens[:, 1:])[0].mean()

        grad_fn = jax.value_and_grad(loss)
        jaxpr = str(jax.make_jaxpr(grad_fn)(params))
        assert ("remat" in jaxpr) == (remat != "none"), remat  # jax.checkpoint's primitive
        results[remat] = jax.device_get(jax.jit(grad_fn)(params))
    for remat in ("block", "full"):
        assert_tree_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        jax.tree.map(assert_tree_close, results["none"], results[remat])


# ---------------------------------------------------------------------------------------
# 8 forced CPU devices, one child process for all checks.


def _child(args: list[str], n_devices: int, out, err) -> subprocess.Popen:
    """This file as a program with ``n_devices`` CPU devices, writing to files ``out``/``err``
    (pipes could fill while the other process of a pair waits)."""
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={n_devices}",
    }
    return subprocess.Popen(
        [sys.executable, __file__, *args], cwd=ROOT, env=env, stdout=out, stderr=err, text=True
    )


def command_files(tmp: Path) -> tuple[str, str]:
    """A config file (fsdp on, batch 8, 10 steps, one per call: the program compiles in half the
    time of a loop of updates, which test_multihost covers on 8 sharded devices) and a sweep
    file of 3 LRs (on 8 devices: 3 runs padded to 4 on a run 2 × data 4 mesh)."""
    cfg = small(
        fsdp=True, steps=10, log_every=5, eval_every=10, checkpoint_every=10, steps_per_call=1
    )
    config_py = write_config_file(tmp / "config.py", cfg)
    sweep_py = tmp / "sweep.py"
    sweep_py.write_text(
        "NAME = 'two'\ndef get_sweep(arg=''):\n    return [{'optim.lr': lr} for lr in (3e-3, 1e-2, 3e-2)]\n"
    )
    return config_py, str(sweep_py)


def run_commands(tmp: Path, name: str) -> None:
    """``stability train`` and ``stability sweep --strategy=vmap`` (scanned layers) of
    :func:`command_files` into ``tmp/<name>-train`` and ``tmp/<name>-sweep``."""
    from stability.cli import main

    config_py, sweep_py = command_files(tmp)
    common = [f"--config={config_py}", "--no-progress"]
    assert main(["train", *common, f"--workdir={tmp / f'{name}-train'}"]) == 0
    sweep = [
        "sweep",
        f"--sweep={sweep_py}",
        *common,
        f"--workdir={tmp / f'{name}-sweep'}",
        "--strategy=vmap",
        "--config.train.scan_layers=True",  # the blocks' variables stacked, FSDP-sharded
    ]
    assert main(sweep) == 0


def assert_same_records(got: list[dict], want: list[dict], what: str) -> None:
    assert_same(
        [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in got],
        [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in want],
        what,
    )


def test_eight_devices_fsdp_tensor_parallel_runs_checkpoints_and_memory(tmp_path, capsys):
    from stability.sweep import read_results
    from stability.workdir import read_jsonl

    Pr._build.cache_clear()  # count this test's compiles
    Pr._base.cache_clear()
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = _child(["eight", str(tmp_path)], 8, out, err)
        run_commands(tmp_path, "one")  # the same commands on this process's one device
        proc.wait(timeout=900)
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert proc.returncode == 0, err[-4000:]
    one_err = capsys.readouterr().err
    print(out)  # per-device memory numbers of w4096 (pytest -s shows them)
    assert "w4096 step memory per device" in out
    # Each program compiled (or loaded) once (the memory check reuses the call it runs), naming
    # its mesh.
    one_run = "train call (one run, up to 1 updates, 1 metric rows) [mesh run×data×model"
    reported = re.escape(one_run) + r" 1×1×1[^\n]*(in [\d.]+ s|from cache|loaded executable)"
    assert len(re.findall(reported, one_err)) == 1
    assert "3 run(s), run×data×model mesh 2×4×1" in err  # runs 2 ways (one padded), batch 4 ways
    assert (
        "train call (4 runs vmapped, up to 1 updates, 1 metric rows) [mesh run×data×model 2×4×1 on 8 cpu"
        in err
    )
    assert f"{one_run} 1×8×1" in err
    # stability train with fsdp on 8 devices, and a vmapped sweep on run 2 × fsdp 4: the
    # records of the single-device commands.
    metrics = lambda d: read_jsonl(d / "metrics.jsonl")[0]
    assert_same_records(metrics(tmp_path / "eight-train"), metrics(tmp_path / "one-train"), "train")
    got, want = (
        sorted(read_results(tmp_path / f"{n}-sweep")[0], key=lambda r: r["run_id"])
        for n in ("eight", "one")
    )
    keep = ("final_loss", "loss_at_init", "max_attn_logit", "min_attn_entropy", "steps")
    assert [r["run_id"] for r in got] == [r["run_id"] for r in want] and len(want) == 3
    assert_same_records(
        [{k: r[k] for k in keep} for r in got],
        [{k: r[k] for k in keep} for r in want],
        "sweep results",
    )
    for r in want:
        runs = lambda n, r=r: metrics(tmp_path / f"{n}-sweep" / "runs" / r["run_id"])
        assert_same_records(runs("eight"), runs("one"), f"sweep run {r['run_id']}")


def test_train_check_prints_xla_memory_and_refuses_what_does_not_fit(tmp_path, capsys, monkeypatch):
    from stability.cli import main

    config_py, sweep_py = command_files(tmp_path)
    argv = ["train", f"--config={config_py}", f"--workdir={tmp_path / 'w'}", "--check"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "train call per device: " in out and "mesh run×data×model 1×1×1" in out, out
    assert "config OK" in out and not (tmp_path / "w").exists()
    # The same compiled program (no second compile) on a device of 1 MiB: refused, exit 2, by
    # XLA's numbers; the hand estimate only warns.
    monkeypatch.setattr(S, "device_limit_bytes", lambda mesh: 2**20)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "warning: a hand estimate" in err and "XLA's numbers decide" in err
    assert "does not fit: the compiled train call needs per device:" in err
    assert "of 0.00 GiB" in err and "mesh run×data×model 1×1×1" in err
    assert not re.search(r"^compiled train call", err, re.M)  # no second compile
    sweep = [
        "sweep",
        f"--sweep={sweep_py}",
        f"--config={config_py}",
        f"--workdir={tmp_path / 's'}",
        "--strategy=vmap",
        "--check",
    ]
    assert main(sweep) == 2
    err = capsys.readouterr().err
    assert "chunk default lr=0.003…0.03 ×3 (model.d_model=32" in err and "does not fit" in err
    assert "--max-runs-per-program" in err and not (tmp_path / "s").exists()


def _run_sharded(cfg, mesh, state, hp, bs, start=0, runs=None):
    fns = Pr.build(cfg, mesh, runs=runs)
    hp = jax.device_put(hp, fns.hp)
    out = []
    for b in bs[start:]:
        state, m = fns.step(state, hp, jax.device_put(b, fns.batch))
        out.append(jax.device_get(m))
    return state, out


def assert_bytes_split(state, n: int, what: str) -> None:
    """Each of the ``n`` devices holds 1/n (±10%) of the parameters + optimizer state
    (embeddings and norm scales included), measured from the arrays' shards."""
    tree = (state.params, state.opt_state)
    total = sum(x.nbytes for x in jax.tree.leaves(tree))
    per = S.per_device_bytes(tree)
    assert len(per) == n, (what, per)
    for dev, b in per.items():
        assert abs(b / (total / n) - 1) < 0.1, (what, dev, b, total)
    print(f"{what}: {max(per.values())} of {total} bytes per device", flush=True)


def eight_devices(tmp: Path) -> None:
    from stability.checkpoint import Checkpointer

    assert jax.device_count() == 8
    devs = jax.devices()
    run_commands(tmp, "eight")  # the parent compares them with its one-device run

    # fsdp 4 × model 2 (fsdp 8 and run 2 × fsdp 4 are the commands above): 20 steps equal to
    # one device; its checkpoint at step 10 restored on fsdp 2 and on 1 device continues equal.
    cfg = small(fsdp=True, tensor_parallel=2)
    want = reference(cfg)
    mesh = S.make_mesh(cfg)
    assert tuple(mesh.shape.values()) == (1, 4, 2), mesh.shape
    fns = Pr.build(cfg, mesh)
    state, hp, bs = fns.init(np.int32(0)), St.hyperparams(cfg), batches(cfg)
    assert_bytes_split(state, 8, "fsdp 4 × model 2")
    state, got = _run_sharded(cfg, mesh, state, hp, bs[:10])
    with tempfile.TemporaryDirectory() as ckpt_dir:
        ckpt = Checkpointer(Path(ckpt_dir), 2)
        ckpt.save(10, state, {})
        ckpt.wait()
        _, more = _run_sharded(cfg, mesh, state, hp, bs, start=10)
        assert_same(got + more, want, "mesh (1, 4, 2)")
        fsdp_only = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, tensor_parallel=1)
        )
        for n in (2, 1):
            small_mesh = S.make_mesh(fsdp_only, devices=devs[:n])
            like = Pr.build(fsdp_only, small_mesh).abstract_state
            restored = ckpt.restore(10, like)
            assert {d for x in jax.tree.leaves(restored) for d in x.devices()} == set(devs[:n])
            assert_bytes_split(restored, n, f"restored on fsdp {n}")
            _, cont = _run_sharded(fsdp_only, small_mesh, restored, hp, bs, start=10)
            assert_same(cont, want[10:], f"restored on {n} device(s)")
        ckpt.close()
    print(
        f"mesh (1, 4, 2): {STEPS} steps equal to one device, restored on fsdp 2 and 1 device",
        flush=True,
    )

    # XLA's memory numbers for the paper's w4096 at 256 × 512, bf16, fsdp 8, remat block:
    # compile only; the arguments per device are 1/8 of the state (FSDP is in the program).
    cfg = dataclasses.replace(
        small(fsdp=True, remat="block"),
        model=dataclasses.replace(
            small().model, vocab_size=32128, dtype="bfloat16", **size_preset("w4096")
        ),
        data=dataclasses.replace(small().data, seq_len=512, batch_size=256),
    )
    mesh = S.make_mesh(cfg)
    fns = Pr.build(cfg, mesh)
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(fns.abstract_state))
    report = Pr.step_memory(cfg, mesh)
    print(f"w4096 step memory per device: {report.line()}", flush=True)
    assert abs(report.argument / (state_bytes / 8) - 1) < 0.05, (report, state_bytes)
    try:
        Pr.refuse_unless_fits(Pr.step_memory(cfg, mesh, limit=2**30), cfg)
        raise AssertionError("a 1 GiB device was not refused")
    except ConfigError as e:
        assert "does not fit" in str(e) and "mesh run×data×model 1×8×1" in str(e), e


if __name__ == "__main__":
    eight_devices(Path(sys.argv[2]))
