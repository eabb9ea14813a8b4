"""configfiles: overrides, suggestions for mistyped keys, sweep loading, and the one-way
import graph (nothing imports the command line)."""

import ast
from pathlib import Path

import pytest

from stability.config import ConfigError, default_config_dict
from stability.configfiles import (
    apply_override,
    build_config,
    closest_keys,
    config_keys,
    load_sweep,
    option_hint,
    parse_value,
)

ROOT = Path(__file__).resolve().parents[1]


def test_nothing_imports_the_cli():
    for path in (ROOT / "stability").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n == "stability.cli" for n in names) or path.name == "__main__.py", path


@pytest.mark.parametrize(
    "text, value",
    [
        ("True", True),
        ("false", False),
        ("none", None),
        ("3e-4", 3e-4),
        ("(1, 2)", (1, 2)),
        ("'x'", "x"),
        ("layernorm", "layernorm"),
        ("[1, 2", "[1, 2"),
        ("", ""),
    ],
)
def test_parse_value(text, value):
    assert parse_value(text) == value


def test_apply_override_coerces_and_refuses():
    cd = default_config_dict()
    apply_override(cd, "optim.lr", 1)  # an int for a float field
    assert cd.optim.lr == 1.0 and isinstance(cd.optim.lr, float)
    apply_override(cd, "data.paths", "a.txt,b.txt")  # a comma list for a tuple field
    assert tuple(cd.data.paths) == ("a.txt", "b.txt")
    with pytest.raises(ConfigError, match="optim.lr='fast' has the wrong type"):
        apply_override(cd, "optim.lr", "fast")
    with pytest.raises(ConfigError, match="config.model is a group of fields"):
        apply_override(cd, "model", 1)
    with pytest.raises(ConfigError, match="config.optim.lr is a value, not a group"):
        apply_override(cd, "optim.lr.x", 1)


@pytest.mark.parametrize(
    "key, first",
    [
        ("model.qk_nrom", "model.qk_norm"),
        ("optim.lrr", "optim.lr"),
        ("model.lr", "optim.lr"),  # the right leaf in another section comes first
        ("lr", "optim.lr"),
        ("train.setps", "train.steps"),
        ("data.path", "data.paths"),
    ],
)
def test_closest_key_first(key, first):
    keys = config_keys(default_config_dict())
    assert closest_keys(key, keys)[0] == first
    with pytest.raises(ConfigError, match=f"did you mean {first}\\?"):
        apply_override(default_config_dict(), key, 1)


def test_option_hint():
    assert option_hint("--lr=0.3") == "; did you mean --config.optim.lr=0.3?"
    assert option_hint("--n-layers") == "; did you mean --config.model.n_layers=VALUE?"
    assert option_hint("--frobnicate=1") == ""
    assert option_hint("lr") == ""  # not an option


def test_load_sweep_name_points_and_config_dicts(tmp_path):
    path = tmp_path / "grid.py"
    path.write_text(
        "import ml_collections\nNAME = 'lrs'\n"
        "def get_sweep(arg=''):\n"
        "    return (ml_collections.ConfigDict({'optim': {}}) if arg == 'cd' else\n"
        "            {'optim.lr': lr, 'train.steps': int(arg or 10)} for lr in (0.1, 0.01))\n"
    )
    name, points = load_sweep(f"{path}:20")
    assert name == "lrs" and points == [
        {"optim.lr": 0.1, "train.steps": 20},
        {"optim.lr": 0.01, "train.steps": 20},
    ]
    with pytest.raises(ConfigError, match="has the key 'optim'"):
        load_sweep(f"{path}:cd")  # a ConfigDict point is a mapping, its key is not dotted


def test_build_config_from_a_config_dict_file(tmp_path):
    path = tmp_path / "c.py"
    path.write_text(
        "from stability.config import default_config_dict\n"
        "def get_config(width='64'):\n"
        "    cd = default_config_dict()\n"
        "    cd.model.d_model = int(width)\n"
        "    return cd\n"
    )
    cfg = build_config(f"{path}:96", [("model.n_heads", "3"), ("optim.lr", "0.1")])
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.optim.lr) == (96, 3, 0.1)
