"""config.validate: fields that act only under another setting are refused without it, and
every shipped config and sweep passes validation."""

import dataclasses
import typing
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest

from stability.config import SIZES, Config, ConfigError, _unused_fields, identity, validate
from stability.configfiles import load_config_dict, load_sweep
from stability.sweep import build_runs

ROOT = Path(__file__).resolve().parents[1]


def config(**sections) -> Config:
    cfg = Config()
    for name, fields in sections.items():
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)})
    return cfg


# Configs that switch each dependent field's setting on or off (each passes validation).
BASES = [
    Config(),
    config(model=dict(norm="powernorm")),
    config(model=dict(norm="powernorm", qk_norm=False)),
    config(model=dict(linear="sigma_reparam")),
    config(model=dict(attention_score="softplus")),
    config(model=dict(attention_score="softplus", softplus_reweight=True)),
    config(model=dict(n_local_heads=1)),
    *[config(optim=dict(name=name)) for name in ("sgd", "spam", "lion", "adafactor")],
    config(optim=dict(parametrization="mup_simple")),
    config(optim=dict(schedule="constant")),
    config(optim=dict(schedule="wsd")),
    config(data=dict(source="text_files", paths=("corpus",))),
    config(data=dict(source="synthetic_markov")),
    config(data=dict(source="bigram_backcopy")),
    config(data=dict(source="tfds", tfds_name="lm1b")),
    config(data=dict(source="tfds", tokenizer="sentencepiece", tokenizer_path="t5.model")),
]
KEYS = [key for key, _, _ in _unused_fields(Config())]


def other_value(key: str):
    """A valid value of ``key`` other than its default."""
    section, name = key.split(".")
    default = getattr(getattr(Config(), section), name)
    tp = typing.get_type_hints(type(getattr(Config(), section)))[name]
    if get_origin(tp) is Literal:
        return next(v for v in get_args(tp) if v != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default - 1 if default > 1 else default + 1
    if isinstance(default, float):
        return default / 2
    if isinstance(default, tuple):
        return ("x",)
    return "x"


def with_field(cfg: Config, key: str, value) -> Config:
    section, name = key.split(".")
    return dataclasses.replace(
        cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})}
    )


def test_bases_are_valid():
    for cfg in BASES:
        validate(cfg)


@pytest.mark.parametrize("key", KEYS)
def test_field_without_its_setting_is_refused(key):
    states = [(cfg, dict((k, (s, on)) for k, s, on in _unused_fields(cfg))[key]) for cfg in BASES]
    off = next(cfg for cfg, (_, on) in states if not on)
    on = next(cfg for cfg, (_, on) in states if on)
    setting = dict((k, s) for k, s, _ in _unused_fields(off))[key]
    value = other_value(key)
    with pytest.raises(ConfigError, match="has no effect without|needs") as err:
        validate(with_field(off, key, value))
    assert f"config.{key}=" in str(err.value) and f"config.{setting}" in str(err.value)
    validate(with_field(on, key, value))  # the same value is fine where it acts
    validate(off)  # and the default is fine without it


def test_text_paths_without_text_files_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"data.paths=\('/some/dir',\) has no effect without "
        r"config.data.source='text_files'",
    ):
        validate(config(data=dict(paths=("/some/dir",))))


@pytest.mark.parametrize("size", list(SIZES))
def test_default_config_sizes_are_valid(size):
    from stability.config import from_config_dict

    from_config_dict(load_config_dict(f"{ROOT / 'configs' / 'default.py'}:{size}"))


SWEEPS = sorted(p.name for p in (ROOT / "sweeps").glob("*.py"))


@pytest.mark.parametrize("preset", ["cpu", "accelerator"])
@pytest.mark.parametrize("sweep", SWEEPS)
def test_shipped_sweeps_are_valid(sweep, preset):
    """Every point of every shipped sweep converts and validates (data and memory checks are
    `stability sweep --check`'s)."""
    import runpy

    if preset not in runpy.run_path(str(ROOT / "sweeps" / sweep)).get("PRESETS", (preset,)):
        with pytest.raises(ConfigError, match="the only preset is"):
            load_sweep(f"{ROOT / 'sweeps' / sweep}:{preset}")
        return
    _, points = load_sweep(f"{ROOT / 'sweeps' / sweep}:{preset}")
    assert build_runs(points, None, [])


def test_fields_new_in_this_release_leave_earlier_run_ids_alone_while_at_default():
    cfg = Config()
    ident = identity(cfg)
    assert "scan_layers" not in ident["train"] and "watch" not in ident  # as earlier releases
    scanned = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, scan_layers=True))
    assert identity(scanned)["train"]["scan_layers"] is True
