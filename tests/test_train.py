import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stability import train as T
from stability.config import ConfigError, OptimConfig
from stability.optim.build import make_optimizer, set_hyperparams
from stability.tracking import read_jsonl, truncate_metrics


def strip_perf(records):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def test_fixed_metric_keys_present_and_finite(tiny, tmp_path):
    cfg = tiny()
    T.train(cfg, tmp_path, progress=False)
    records = T.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    last = records[-1]
    fixed = ["step", "lr", "train/loss", "train/z_loss", "logits/log_z_mean", "logits/log_z_max",
             "grad/global_norm", "perf/tokens_per_sec", "eval/loss"]
    for i in range(cfg.model.n_layers):
        fixed += [f"attn/max_logit/layer_{i}", f"attn/entropy/layer_{i}", f"attn/entropy_min/layer_{i}"]
    for key in fixed:
        assert key in last and math.isfinite(last[key]), key
    for prefix in ("grad/rms/", "update/rms/", "param/rms/"):
        keys = [k for k in last if k.startswith(prefix)]
        assert f"{prefix}blocks/0/mlp/fc1/kernel" in keys
        assert all(math.isfinite(last[k]) for k in keys)
    assert "eval/loss" in records[1] and "eval/loss" not in records[0]
    assert (tmp_path / "config.json").exists()


def test_resume_equals_uninterrupted(tiny, tmp_path):
    cfg = tiny()
    T.train(cfg, tmp_path / "a", progress=False)
    T.train(cfg, tmp_path / "b", progress=False)
    # Simulate a crash after step 10: the last checkpoint is gone, metrics past it remain.
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "20")
    T.train(cfg, tmp_path / "b", progress=False)
    a, b = T.read_metrics(tmp_path / "a"), T.read_metrics(tmp_path / "b")
    assert strip_perf(a) == strip_perf(b)  # bitwise: floats compared exactly


def test_wsd_s_decay_ends_are_evaluated_checkpointed_and_kept(tiny, tmp_path):
    cfg = tiny(optim={"schedule": "wsd_s", "wsd_decay_ends": (7, 13)},
               train={"checkpoint_every": 10, "max_to_keep": 1, "eval_every": 20})
    T.train(cfg, tmp_path, progress=False)
    evals = [r["step"] for r in T.read_metrics(tmp_path) if "eval/loss" in r]
    assert evals == [7, 13, 20]
    ckpts = tmp_path / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [7, 13, 20]
    meta = lambda step: json.loads(next((ckpts / str(step)).glob("meta/*")).read_text())
    assert meta(7)["decay_end"] and meta(13)["decay_end"]


def test_rerun_of_finished_run_does_nothing(tiny, tmp_path):
    cfg = tiny()
    first = T.train(cfg, tmp_path, progress=False)
    again = T.train(cfg, tmp_path, progress=False)
    assert again.final_eval_loss == first.final_eval_loss
    assert len(T.read_metrics(tmp_path)) == 4


def test_different_config_in_workdir_is_refused(tiny, tmp_path):
    T.train(tiny(), tmp_path, progress=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match="different config.*optim.lr"):
        T.train(tiny(optim={"lr": 1e-3}), tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    T.train(tiny(optim={"lr": 1e-3}), tmp_path, overwrite=True, progress=False)
    assert T.read_metrics(tmp_path)[-1]["step"] == 20


def test_out_of_bound_loss_stops_with_last_finite_checkpoint(tiny, tmp_path):
    # The loss starts near log 64 ≈ 4.16 and first exceeds 4.16 after a few updates at this LR.
    cfg = tiny(optim={"lr": 0.5, "grad_clip": 0.0, "warmup_steps": 0}, model={"qk_norm": False},
               train={"divergence_loss": 4.3, "steps": 40, "log_every": 40})
    with pytest.raises(T.Diverged, match=r"update (\d+)") as err:
        T.train(cfg, tmp_path, progress=False)
    records = T.read_metrics(tmp_path)
    last = records[-1]
    assert last["alive"] is False and not last["train/loss"] <= 4.3
    assert all(r["alive"] for r in records[:-1])
    ckpts = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts[-1] == last["step"] - 1  # the state before the failing update
    assert f"update {last['step']}" in str(err.value)


def test_non_finite_gradient_in_one_parameter_freezes_the_state(tiny):
    """The loss is finite but one parameter's gradient overflows float32: with the head kernel
    zero, the logits are 0 (loss log V) and every gradient behind the head is exactly zero,
    while a z-loss weight of 1e37 and a final-norm scale of 1e5 push the head kernel's
    gradient ∝ weight·scale past float32 range."""
    cfg = tiny()
    tx = make_optimizer(cfg.optim)
    state = jax.jit(lambda: T.init_state(cfg, 0, tx))()
    params = jax.tree.map(lambda x: x, state.params)
    params["head"]["kernel"][...] = jnp.zeros_like(params["head"]["kernel"][...])
    params["final_norm"]["scale"][...] = jnp.full_like(params["final_norm"]["scale"][...], 1e5)
    state = state._replace(params=params)
    batch = {"tokens": np.full((cfg.data.batch_size, cfg.data.seq_len + 1), 5, np.int32)}
    step = jax.jit(T.make_train_step(cfg, T.graphdef_of(cfg), tx))
    new, out = step(state, {**T.hyperparams(cfg), "z_loss": jnp.float32(1e37)}, batch)
    np.testing.assert_allclose(out["train/loss"], np.log(cfg.model.vocab_size), rtol=1e-6)
    grad_rms = {k: float(v) for k, v in out.items() if k.startswith("grad/rms/")}
    assert [k for k, v in grad_rms.items() if not np.isfinite(v)] == ["grad/rms/head/kernel"]
    assert not bool(out["alive"]) and int(new.diverged_step) == 1 and int(new.step) == 0
    frozen = lambda st: (st.params, st.gstats, st.rest, st.opt_state, st.step)
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), frozen(new), frozen(state))
    assert all(jax.tree.leaves(same))


def test_z_loss_equals_definition(tiny):
    cfg = tiny(train={"z_loss": 0.5})
    tx = make_optimizer(cfg.optim)
    graphdef = T.graphdef_of(cfg)
    state = jax.jit(lambda: T.init_state(cfg, 0, tx))()
    from stability.data import make_source

    batch = make_source(cfg.data, 64).train_stream(0).next()
    _, out = jax.jit(T.make_train_step(cfg, graphdef, tx))(state, T.hyperparams(cfg), batch)
    from flax import nnx

    forward = lambda st, t: nnx.merge(graphdef, st.params, st.gstats, st.rest)(t, train=False)[0]
    logits = jax.jit(forward)(state, jnp.asarray(batch["tokens"][:, :-1]))
    log_z = np.asarray(jax.nn.logsumexp(logits, -1), np.float64)
    np.testing.assert_allclose(out["train/z_loss"], 0.5 * np.mean(log_z**2), rtol=1e-5)
    np.testing.assert_allclose(out["logits/log_z_mean"], log_z.mean(), rtol=1e-5)


@pytest.mark.parametrize("mode", ["independent", "coupled"])
def test_weight_decay_matches_formula(mode):
    """With zero gradients Adam's update is 0, so only the decay acts:
    independent θ ← θ(1 − (η_t/η_max)λ), coupled θ ← θ(1 − η_t λ)."""
    cfg = OptimConfig(lr=0.1, weight_decay=0.3, weight_decay_mode=mode, grad_clip=0.0)
    tx = make_optimizer(cfg)
    params = {"w": jnp.full((2, 2), 2.0), "scale": jnp.ones((2,))}
    state = tx.init(params)
    lr_t = 0.025
    state = set_hyperparams(state, learning_rate=lr_t, weight_decay=0.3, peak_learning_rate=0.1)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    factor = 1 - (lr_t / 0.1) * 0.3 if mode == "independent" else 1 - lr_t * 0.3
    np.testing.assert_allclose(new["w"], 2.0 * factor, rtol=1e-6)
    np.testing.assert_allclose(new["scale"], 1.0)  # norm scales are not decayed


def test_wandb_offline_run_directory_has_logged_keys(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny(wandb={"mode": "offline"})
    T.train(cfg, tmp_path, progress=False)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    wandb_file = next(runs[0].glob("*.wandb"))
    data = wandb_file.read_bytes()
    for key in (b"train/loss", b"attn/entropy/layer_0", b"eval/loss", b"qk_norm"):
        assert key in data, key


def test_torn_metrics_line_is_skipped(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n[1, 2]\n{"step": 2}\n{"step": 3, "train/lo')
    records, bad = read_jsonl(p)
    assert records == [{"step": 1}, {"step": 2}] and bad == [2, 4]
    with pytest.warns(UserWarning, match=r"dropped unreadable lines \[2, 4\]"):
        truncate_metrics(p, 1)  # what a resume from step 1 does
    assert read_jsonl(p) == ([{"step": 1}], [])


def final_state(workdir):
    """{leaf path: array} of the newest checkpoint, read by orbax without a target."""
    import orbax.checkpoint as ocp

    ckpts = workdir / "checkpoints"
    step = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    tree = ocp.StandardCheckpointer().restore(ckpts / str(step) / "state")
    return step, {jax.tree_util.keystr(k): np.asarray(v)
                  for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("overrides", [
    # WSD-S decay ends at 7 and 13 split calls between the log/eval/checkpoint boundaries.
    {"optim": {"schedule": "wsd_s", "wsd_decay_ends": (7, 13)}, "train": {"steps_per_call": 0}},
    # Diverges mid-call (at update 6 of a 10-update call): same record, same diverged_step.
    {"optim": {"lr": 0.5, "grad_clip": 0.0, "warmup_steps": 0}, "model": {"qk_norm": False},
     "train": {"divergence_loss": 4.3, "steps": 40, "log_every": 40, "steps_per_call": 0}},
], ids=["wsd_s", "diverges"])
def test_many_steps_per_call_equal_one(tiny, tmp_path, overrides):
    """K updates per device call log, evaluate and checkpoint exactly what K=1 does."""
    cfg = tiny(**overrides)
    one = tiny(**{**overrides, "train": {**overrides["train"], "steps_per_call": 1}})
    assert T.steps_per_call_max(cfg.train) > 1
    results = []
    for c, d in ((one, tmp_path / "one"), (cfg, tmp_path / "many")):
        try:
            results.append(T.train(c, d, progress=False))
        except T.Diverged as e:
            results.append(str(e).replace(str(d), ""))
    assert results[0] == results[1]
    a, b = T.read_metrics(tmp_path / "one"), T.read_metrics(tmp_path / "many")
    if not b[-1]["alive"]:  # the failing update is inside a call, not at its end
        assert b[-1]["step"] % T.steps_per_call_max(cfg.train) != 0
    assert strip_perf(a) == strip_perf(b)  # bitwise
    step_a, state_a = final_state(tmp_path / "one")
    step_b, state_b = final_state(tmp_path / "many")
    assert step_a == step_b and state_a.keys() == state_b.keys()
    for key in state_a:
        np.testing.assert_array_equal(state_a[key], state_b[key], err_msg=key)
