"""Random and adversarial config overrides: always exit 2 with one line naming the field, no
traceback, no files written — before anything compiles."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stability.cli import main
from stability.config import Config, to_config_dict

FIELDS = sorted(
    f"{section}.{name}"
    for section, group in to_config_dict(Config()).items()
    for name in group.keys()
)

NUMERIC = {f for f in FIELDS if type(getattr(getattr(Config(), f.split(".")[0]), f.split(".")[1])) in (int, float)}
BOOLS = {f for f in FIELDS if isinstance(getattr(getattr(Config(), f.split(".")[0]), f.split(".")[1]), bool)}
# Drawn values: each is invalid for every numeric or boolean field; other values may be valid
# for some fields, and then the check must accept them without writing anything.
ALWAYS_BAD = ["nan", "inf", "-inf", "-1", "-1e-9", "1e999", "abc", "[1, 2", "{}", "None", "(("]
MAYBE_BAD = ["0", "1e15", "3.5", "True", "", "'layernorm'", "(1, 2)"]


def run_cli(tmp_path, capsys, *overrides, command="train", check=False):
    workdir = tmp_path / "w"
    extra = ["--sweep", "sweeps/demo.py:cpu,steps=10"] if command == "sweep" else []
    code = main([command, *extra, "--workdir", str(workdir), *(["--check"] if check else []),
                 *overrides])
    captured = capsys.readouterr()
    return code, captured.err, workdir


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=st.sampled_from(ALWAYS_BAD + MAYBE_BAD),
       command=st.sampled_from(["train", "sweep"]), extra=st.lists(st.sampled_from(FIELDS), max_size=2))
def test_random_overrides_are_rejected_cleanly(tmp_path_factory, capsys, field, value, command, extra):
    tmp = tmp_path_factory.mktemp("hostile")
    overrides = [f"--config.{field}={value}"] + [f"--config.{f}=-7" for f in extra if f in NUMERIC]
    code, err, workdir = run_cli(tmp, capsys, *overrides, command=command, check=True)
    assert not workdir.exists()
    assert "Traceback" not in err
    if (field in NUMERIC or field in BOOLS) and value in ALWAYS_BAD:
        assert code == 2, f"{overrides} accepted"
    assert code in (0, 2), err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err
        assert "config" in err


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["--config.model.vocab_size=255"], "vocab_size"),
        (["--config.optim.lr=-1"], "optim.lr"),
        (["--config.train.steps=0"], "train.steps"),
        (["--config.model.norm=batchnorm"], "model.norm"),
        (["--config.model.nonexistent=1"], "model.nonexistent"),
        (["--config.data.source=text_files"], "data.paths"),
        (["--config.data.source=text_files", "--config.data.paths=/no/such/file"], "data.paths"),
        (["--config.model.vocab_size=2000000000"], "GiB"),
        (["--config.data.seq_len=100000000"], "GiB"),
        (["--config.optim.warmup_steps=900", "--config.train.steps=100"], "warmup_steps"),
        (["--config.optim.lr=nan"], "optim.lr"),
        (["--config.model.qk_norm=maybe"], "model.qk_norm"),
    ],
)
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_adversarial_configs(tmp_path, capsys, overrides, field, command):
    code, err, workdir = run_cli(tmp_path, capsys, *overrides, command=command)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert field in err
    assert not workdir.exists()


@pytest.mark.parametrize("text, message", [("tiny", "seq_len"), ("", "0 bytes")])
def test_text_file_too_short(tmp_path, capsys, text, message):
    path = tmp_path / "short.txt"
    path.write_text(text)
    code, err, workdir = run_cli(
        tmp_path, capsys, "--config.data.source=text_files", f"--config.data.paths={path}"
    )
    assert code == 2 and message in err and not workdir.exists()


def test_heads_not_dividing_width(tmp_path, capsys):
    code, err, workdir = run_cli(tmp_path, capsys, "--config.model.d_model=100", "--config.model.n_heads=3")
    assert code == 2 and "d_model=100" in err and "n_heads=3" in err and not workdir.exists()
