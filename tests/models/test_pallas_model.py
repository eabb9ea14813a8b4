"""The model with attention_impl="pallas" (flash kernels in interpret mode on CPU)."""

import re

import jax
import numpy as np
import pytest

from conftest import tiny_config
from stability import step as St
from stability.data import make_source
from stability.programs import one_device

VARIANTS = {
    "softmax": {},
    "ls-softplus-capped": {
        "attention_score": "softplus",
        "n_local_heads": 1,
        "local_window": 5,
        "attn_softcap": 30.0,
    },
}


def train_steps(cfg, steps):
    progs = one_device(cfg)
    step, state, hp = progs.step, progs.init(np.int32(0)), St.hyperparams(cfg)
    stream = make_source(cfg.data, cfg.model.vocab_size).train_stream(0)
    outs = []
    for _ in range(steps):
        state, out = step(state, hp, stream.next())
        outs.append(jax.device_get(out))
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_pallas_training_matches_xla(variant):
    """20 steps with every metric: the kernel path tracks the XLA path to float tolerance."""
    xla = train_steps(tiny_config(model={"attention_impl": "xla", **VARIANTS[variant]}), 20)
    pallas = train_steps(tiny_config(model={"attention_impl": "pallas", **VARIANTS[variant]}), 20)
    for step, (a, b) in enumerate(zip(xla, pallas, strict=True)):
        for key in a:
            np.testing.assert_allclose(
                a[key], b[key], rtol=2e-3, atol=1e-5, err_msg=f"{key} @ {step}"
            )


def test_no_T_by_T_tensor_in_the_compiled_step():
    T_ = 48  # a sequence length no other dimension of the tiny model has
    for impl, expect in (("xla", True), ("pallas", False)):
        cfg = tiny_config(model={"attention_impl": impl}, data={"seq_len": T_})
        progs = one_device(cfg)
        graphdef, tx = progs.graphdef, progs.tx
        state = jax.eval_shape(lambda cfg=cfg, tx=tx: St.init_state(cfg, 0, tx))
        batch = {"tokens": jax.ShapeDtypeStruct((4, T_ + 1), np.int32)}
        step = St.make_train_step(cfg, graphdef, tx)
        hlo = jax.jit(step).lower(state, St.hyperparams(cfg), batch).as_text()
        has_tt = re.search(rf"(?<![0-9]){T_}x{T_}(?![0-9])", hlo) is not None
        assert has_tt == expect, impl


def test_pallas_rejects_relu_and_reweighting():
    from stability.config import ConfigError

    with pytest.raises(ConfigError, match="attention_impl='pallas'"):
        tiny_config(model={"attention_impl": "pallas", "attention_score": "relu"})
