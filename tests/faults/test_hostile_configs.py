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

NUMERIC = {
    f
    for f in FIELDS
    if type(getattr(getattr(Config(), f.split(".")[0]), f.split(".")[1])) in (int, float)
}
BOOLS = {
    f
    for f in FIELDS
    if isinstance(getattr(getattr(Config(), f.split(".")[0]), f.split(".")[1]), bool)
}
# Drawn values: each is invalid for every numeric or boolean field; other values may be valid
# for some fields, and then the check must accept them without writing anything.
ALWAYS_BAD = ["nan", "inf", "-inf", "-1", "-1e-9", "1e999", "abc", "[1, 2", "{}", "None", "(("]
MAYBE_BAD = ["0", "1e15", "3.5", "True", "", "'layernorm'", "(1, 2)"]


def run_cli(tmp_path, capsys, *overrides, command="train", check=False):
    workdir = tmp_path / "w"
    extra = ["--sweep", "sweeps/demo.py:cpu,steps=10"] if command == "sweep" else []
    code = main(
        [command, *extra, "--workdir", str(workdir), *(["--check"] if check else []), *overrides]
    )
    captured = capsys.readouterr()
    return code, captured.err, workdir


def one_error_line(err: str) -> bool:
    """stderr ends with exactly one error line (progress lines before it are allowed: a
    program compiled for XLA's memory check, the hand estimate's warning)."""
    lines = err.strip().splitlines()
    return sum(x.startswith("stability: error") for x in lines) == 1 and lines[-1].startswith(
        "stability: error"
    )


def typo(field: str, i: int) -> str:
    """``field`` with character i (mod its length) dropped: often an unknown key."""
    i %= len(field)
    return field[:i] + field[i + 1 :]


VALUES = st.one_of(
    st.sampled_from(ALWAYS_BAD + MAYBE_BAD),
    st.text(max_size=12),  # any unicode, newlines included
    st.floats().map(repr),
    st.integers(-(10**20), 10**20).map(str),
)
KEYS = st.one_of(
    st.sampled_from(FIELDS),
    st.builds(typo, st.sampled_from(FIELDS), st.integers(0, 40)),
    st.sampled_from(["model", "optim.lr.x", "", "model.", ".lr", "lr", "wandb.tags.0"]),
)
FUZZ_EXAMPLES = 500


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    key=KEYS,
    value=VALUES,
    command=st.sampled_from(["train", "sweep"]),
    extra=st.lists(st.sampled_from(FIELDS), max_size=2),
)
def test_random_overrides_are_rejected_cleanly(
    tmp_path_factory, capsys, key, value, command, extra
):
    tmp = tmp_path_factory.mktemp("hostile")
    overrides = [f"--config.{key}={value}"] + [f"--config.{f}=-7" for f in extra if f in NUMERIC]
    code, err, workdir = run_cli(tmp, capsys, *overrides, command=command, check=True)
    assert not workdir.exists()
    assert "Traceback" not in err
    if (key in NUMERIC or key in BOOLS) and value in ALWAYS_BAD:
        assert code == 2, f"{overrides} accepted"
    if key not in FIELDS or any(f in NUMERIC for f in extra):
        assert code == 2, f"{overrides} accepted"
    assert code in (0, 2), err
    if code == 2:
        assert one_error_line(err), err
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
        (["--config.data.seq_len=100000000"], "seq_len=100000000"),
        (["--config.optim.warmup_steps=900", "--config.train.steps=100"], "warmup_steps"),
        (["--config.optim.lr=nan"], "optim.lr"),
        (["--config.model.qk_norm=maybe"], "model.qk_norm"),
    ],
)
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_adversarial_configs(tmp_path, capsys, overrides, field, command):
    code, err, workdir = run_cli(tmp_path, capsys, *overrides, command=command)
    assert code == 2, err
    assert one_error_line(err) and "Traceback" not in err
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


def test_directory_without_included_files(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i in range(7):
        (corpus / "sub" / f"part{i}.json").write_text("{}")
    code, err, workdir = run_cli(
        tmp_path, capsys, "--config.data.source=text_files", f"--config.data.paths={corpus}"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and not workdir.exists()
    assert "no file in" in err and "matches config.data.include=['*.py', '*.txt', '*.md']" in err
    assert "holds 7 files (sub/part0.json" in err and "and 2 more" in err


def test_heads_not_dividing_width(tmp_path, capsys):
    code, err, workdir = run_cli(
        tmp_path, capsys, "--config.model.d_model=100", "--config.model.n_heads=3"
    )
    assert code == 2 and "d_model=100" in err and "n_heads=3" in err and not workdir.exists()


# Sweep and config files in every bad shape: exit 2, one line naming the file and the problem,
# no traceback (a user's exception shows only its message), nothing written.
SWEEP_BODIES = {
    "raises": (
        "def get_sweep():\n    raise ValueError('boom\\nsecond line')\n",
        "ValueError: boom",
    ),
    "exits": ("def get_sweep():\n    raise SystemExit(3)\n", "raised SystemExit"),
    "none": ("def get_sweep():\n    return None\n", "returned NoneType"),
    "dict": ("def get_sweep():\n    return {'optim.lr': 0.1}\n", "returned dict"),
    "number": ("def get_sweep():\n    return 3\n", "returned int"),
    "string": ("def get_sweep():\n    return 'optim.lr=0.1'\n", "returned str"),
    "empty": ("def get_sweep():\n    return []\n", "empty grid"),
    "non_dicts": ("def get_sweep():\n    return [1, 2]\n", "point 0 is int"),
    "generator_fails": (
        "def get_sweep():\n    yield {'optim.lr': 0.1}\n    raise KeyError('k')\n",
        "KeyError",
    ),
    "not_callable": ("get_sweep = [{'optim.lr': 0.1}]\n", "not a function"),
    "missing": ("def get_config():\n    return {}\n", "defines no get_sweep()"),
    "undotted_key": ("def get_sweep():\n    return [{'lr': 0.1}]\n", "key 'lr'"),
    "int_key": ("def get_sweep():\n    return [{1: 0.1}]\n", "key 1"),
    "empty_part": ("def get_sweep():\n    return [{'optim..lr': 0.1}]\n", "key 'optim..lr'"),
    "unknown_key": (
        "def get_sweep():\n    return [{'optim.lrr': 0.1}]\n",
        "did you mean optim.lr?",
    ),
    "wrong_type": ("def get_sweep():\n    return [{'optim.lr': 'fast'}]\n", "optim.lr='fast'"),
    "bad_name": ("NAME = 3\ndef get_sweep():\n    return [{'optim.lr': 0.1}]\n", "NAME=3"),
    "syntax": ("def get_sweep(:\n", "SyntaxError"),
    "import_exits": ("import sys\nsys.exit(4)\n", "SystemExit"),
    "null_bytes": ("x = 1\0\n", "failed to import"),
}
CONFIG_BODIES = {
    "raises": (
        "def get_config():\n    raise RuntimeError('no GPU here')\n",
        "RuntimeError: no GPU",
    ),
    "none": ("def get_config():\n    return None\n", "returned NoneType"),
    "list": ("def get_config():\n    return [{'model': {}}]\n", "returned list"),
    "number": ("def get_config():\n    return 7\n", "returned int"),
    "not_callable": ("get_config = {'model': {}}\n", "not a function"),
    "missing": ("def get_sweep():\n    return []\n", "defines no get_config()"),
    "int_key": ("def get_config():\n    return {1: 2}\n", "key 1"),
    "dotted_key": ("def get_config():\n    return {'model.d_model': 64}\n", "key 'model.d_model'"),
    "group_is_value": ("def get_config():\n    return {'model': 5}\n", "config.model"),
    "unknown_field": ("def get_config():\n    return {'model': {'widht': 5}}\n", "widht"),
}


def write_file(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_bytes(body.encode())
    return str(path)


def assert_refused(tmp_path, capsys, argv, *needles):
    workdir = tmp_path / "w"
    code = main([*argv, "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not workdir.exists()


@pytest.mark.parametrize("shape", list(SWEEP_BODIES))
def test_bad_sweep_files(tmp_path, capsys, shape):
    body, message = SWEEP_BODIES[shape]
    path = write_file(tmp_path, shape, body)
    assert_refused(tmp_path, capsys, ["sweep", f"--sweep={path}"], path, message)


@pytest.mark.parametrize("shape", list(CONFIG_BODIES))
def test_bad_config_files(tmp_path, capsys, shape):
    body, message = CONFIG_BODIES[shape]
    path = write_file(tmp_path, shape, body)
    for argv in (
        ["train", f"--config={path}"],
        ["sweep", "--sweep=sweeps/demo.py:cpu,steps=10", f"--config={path}"],
    ):
        assert_refused(tmp_path, capsys, argv, path, message)


@pytest.mark.parametrize("flag", ["--sweep", "--config"])
@pytest.mark.parametrize(
    "kind, message",
    [("dir", "a directory"), ("txt", "not a .py file"), ("missing", "no such file")],
)
def test_paths_that_are_not_python_files(tmp_path, capsys, flag, kind, message):
    path = {"dir": tmp_path, "txt": tmp_path / "grid.txt", "missing": tmp_path / "nope.py"}[kind]
    if kind == "txt":
        path.write_text("def get_sweep():\n    return [{'optim.lr': 0.1}]\n")
    argv = ["sweep", f"{flag}={path}"] + (["--sweep=sweeps/demo.py"] if flag == "--config" else [])
    assert_refused(tmp_path / "sub", capsys, argv, str(path), message)


@pytest.mark.parametrize("arg", ["10", "gpu", "cpu,steps=0", "cpu,steps=x", "cpu,lr=1"])
@pytest.mark.parametrize("sweep", ["demo", "qk_norm", "mup", "warmup", "stabilizers"])
def test_bad_sweep_args(tmp_path, capsys, sweep, arg):
    assert_refused(
        tmp_path,
        capsys,
        ["sweep", f"--sweep=sweeps/{sweep}.py:{arg}"],
        f"sweeps/{sweep}.py:{arg}",
        "PRESET[,steps=N]",
    )
