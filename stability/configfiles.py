"""Config and sweep files (``PATH[:ARG]``) and command-line overrides (``--config.KEY=VALUE``).

``get_config(ARG)`` returns an ``ml_collections.ConfigDict`` (or a dict) shaped like
:class:`stability.config.Config`; ``get_sweep(ARG)`` returns a list of dicts, each mapping
dotted keys (``"optim.lr"``) to values. Every problem with a file, what it returns or an
override is a :class:`ConfigError` of one line naming the file or the key; a user's function
that raises shows its message, never our traceback.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from stability.config import (
    Config,
    ConfigError,
    default_config_dict,
    from_config_dict,
    typed_config,
)

MAPPINGS = (Mapping, ml_collections.ConfigDict)  # a ConfigDict is not a Mapping
DOTTED_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
SWEEP_SHAPE = "a list of dicts such as [{'optim.lr': 1e-3}, {'optim.lr': 1e-2}]"


SHIPPED = Path(__file__).resolve().parent.parent  # a checkout: sweeps/ and configs/ beside


def _shipped_hint(path: Path, what: str) -> str:
    """The closest shipped file's name and the list of them (sweeps/*.py, configs/*.py)."""
    folder = SHIPPED / ("sweeps" if what == "sweep" else "configs")
    names = sorted(p.name for p in folder.glob("*.py")) if folder.is_dir() else []
    if not names:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.5)
    rel = folder.relative_to(SHIPPED)
    first = f"; did you mean {rel}/{close[0]}?" if close else ""
    return f"{first} shipped: {', '.join(names)}"


def load_module(path_text: str, what: str):
    """Import the Python file ``path_text`` (the PATH of ``--{what}=PATH[:ARG]``)."""
    path = Path(path_text)
    flag = f"--{what}={path_text}"
    if not path.exists():
        raise ConfigError(f"{flag}: no such file{_shipped_hint(path, what)}")
    if not path.is_file() or path.suffix != ".py":
        kind = "a directory" if path.is_dir() else "not a .py file"
        raise ConfigError(f"{flag}: is {kind}; expected a Python file defining get_{what}()")
    mod_spec = importlib.util.spec_from_file_location(f"_stability_{what}_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a broken user file is a usage error
        raise ConfigError(f"{flag} failed to import: {type(e).__name__}: {e}") from e
    return module


def call_file(spec: str, what: str) -> tuple[Any, Any]:
    """(module, ``get_{what}(ARG)``) of ``--{what}=PATH[:ARG]`` (no ARG: called with none)."""
    path, _, arg = spec.partition(":")
    module = load_module(path, what)
    name = f"get_{what}"
    fn = getattr(module, name, None)
    if fn is None:
        raise ConfigError(f"--{what}={spec}: {path} defines no {name}()")
    if not callable(fn):
        raise ConfigError(f"--{what}={spec}: {name} is a {type(fn).__name__}, not a function")
    try:
        return module, fn(arg) if arg else fn()
    except ConfigError:
        raise
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's function failed
        call = f"{name}({arg!r})" if arg else f"{name}()"
        raise ConfigError(f"--{what}={spec}: {call} raised {type(e).__name__}: {e}") from e


def _check_keys(tree: Mapping | ml_collections.ConfigDict, where: str) -> None:
    """Every key of a nested config mapping is a field name (a string without dots)."""
    for k, v in tree.items():
        if not isinstance(k, str) or not k.isidentifier():
            raise ConfigError(f"{where} has the key {k!r}; keys must be field names")
        if isinstance(v, MAPPINGS):
            _check_keys(v, f"{where}.{k}")


def load_config_dict(spec: str | None) -> ml_collections.ConfigDict:
    """The ConfigDict of ``PATH[:ARG]`` (``get_config(ARG)``), or the built-in default."""
    if spec is None:
        return default_config_dict()
    _, cd = call_file(spec, "config")
    if not isinstance(cd, MAPPINGS):
        raise ConfigError(
            f"--config={spec}: get_config returned {type(cd).__name__} {_short(cd)}; expected an "
            "ml_collections.ConfigDict (or a dict) shaped like stability.config.Config"
        )
    _check_keys(cd, f"--config={spec}: get_config's result")
    cd = ml_collections.ConfigDict(cd)
    try:
        typed_config(cd)
    except ConfigError as e:
        raise ConfigError(f"--config={spec}: {e}") from e
    return cd


def load_sweep(spec: str) -> tuple[str, list[dict[str, Any]]]:
    """(sweep name, list of override dicts) of ``--sweep=PATH[:ARG]``."""
    module, points = call_file(spec, "sweep")
    where = f"--sweep={spec}: get_sweep"
    if isinstance(points, (*MAPPINGS, str, bytes)) or not isinstance(points, Iterable):
        raise ConfigError(
            f"{where} returned {type(points).__name__} {_short(points)}; expected {SWEEP_SHAPE}"
        )
    try:
        points = list(points)
    except Exception as e:  # noqa: BLE001 - a generator that fails part way
        raise ConfigError(f"{where} raised {type(e).__name__}: {e}") from e
    if not points:
        raise ConfigError(f"{where} returned an empty grid; expected {SWEEP_SHAPE}")
    template = default_config_dict()  # every config has these keys and types
    for i, point in enumerate(points):
        if not isinstance(point, MAPPINGS):
            raise ConfigError(
                f"{where}: point {i} is {type(point).__name__} {_short(point)}, not a dict; "
                f"expected {SWEEP_SHAPE}"
            )
        for key, value in point.items():
            if not isinstance(key, str) or not DOTTED_KEY.fullmatch(key):
                raise ConfigError(
                    f"{where}: point {i} has the key {key!r}; keys are dotted config keys "
                    "such as 'optim.lr'"
                )
            try:
                apply_override(template, key, value)
            except ConfigError as e:
                raise ConfigError(f"{where}: point {i}: {e}") from e
    name = getattr(module, "NAME", Path(spec.partition(":")[0]).stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"--sweep={spec}: NAME={name!r} must be a non-empty string")
    return name, [dict(p) for p in points]


def _short(x: Any, limit: int = 60) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_value(text: str) -> Any:
    """A command-line value: Python literal if it parses (True, 3e-4, (1, 2), 'x'), else str."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return text


def config_keys(cd: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Dotted keys of every leaf, e.g. ``["model.vocab_size", ..., "wandb.name"]``."""
    keys = []
    for k, v in cd.items():
        if isinstance(v, ml_collections.ConfigDict):
            keys += config_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def closest_keys(key: str, keys: list[str]) -> list[str]:
    """Leaf keys a mistyped ``key`` may mean, best first: the same leaf name in another section,
    then spelling neighbours of the whole key and of its leaf name."""
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    same = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    close_leaf = [
        by_leaf[n] for n in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.75)
    ]
    return list(dict.fromkeys(same + close + close_leaf))


def apply_override(cd: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Set ``config.KEY`` (dotted) in place; an unknown key is a ConfigError that names the
    closest known key first."""
    parts = key.split(".")
    node = cd
    for i, part in enumerate(parts):
        where = ".".join(["config", *parts[: i + 1]])
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            guess = closest_keys(key, config_keys(cd))
            hint = f"did you mean {guess[0]}? " if guess else ""
            if isinstance(node, ml_collections.ConfigDict):
                here = f"valid keys of {'.'.join(['config', *parts[:i]])}: "
                here += ", ".join(sorted(node.keys()))
            else:
                here = f"{'.'.join(['config', *parts[:i]])} is a value, not a group"
            raise ConfigError(f"--{where}: unknown config key; {hint}({here})")
        if i == len(parts) - 1:
            old = node[part]
            if isinstance(old, ml_collections.ConfigDict):
                raise ConfigError(f"--{where} is a group of fields, not a value")
            if isinstance(old, (tuple, list)) and isinstance(value, str):
                value = tuple(v for v in value.split(",") if v)
            if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            with cd.unlocked():
                try:
                    node[part] = value
                except (TypeError, ValueError) as e:
                    raise ConfigError(
                        f"--{where}={value!r} has the wrong type: expected {type(old).__name__}, "
                        f"got {type(value).__name__}"
                    ) from e
        else:
            node = node[part]


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate ``--config.KEY=VALUE`` arguments from the rest."""
    rest, overrides = [], []
    for arg in argv:
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config.") :].partition("=")
            if not eq:
                raise ConfigError(f"{arg}: expected --config.KEY=VALUE")
            overrides.append((key, value))
        else:
            rest.append(arg)
    return rest, overrides


def option_hint(arg: str) -> str:
    """For an unknown option such as ``--lr=0.1`` that names a config leaf: a pointer to the
    override ("did you mean --config.optim.lr=0.1?"), else ""."""
    name, eq, value = arg.lstrip("-").partition("=")
    keys = config_keys(default_config_dict())
    guess = closest_keys(name.replace("-", "_"), keys)
    if not arg.startswith("--") or not guess:
        return ""
    return f"; did you mean --config.{guess[0]}={value if eq else 'VALUE'}?"


def build_config(spec: str | None, overrides: list[tuple[str, str]]) -> Config:
    """The validated Config of ``--config=spec`` and its ``--config.KEY=VALUE`` overrides."""
    cd = load_config_dict(spec)
    for key, value in overrides:
        apply_override(cd, key, parse_value(value))
    return from_config_dict(cd, {key for key, _ in overrides})
