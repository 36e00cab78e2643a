"""Typed configuration: one frozen dataclass per component, loaded from YAML/TOML.

Each component declares its own ``@dataclass(frozen=True, kw_only=True)`` config
and is handed only that object.  This module turns plain mappings (a parsed file
plus dotted command-line overrides such as ``learner.lr=1e-5``) into those
dataclasses, rejecting unknown keys and wrong types with a message that names
the offending dotted key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

T = TypeVar("T")

SHIPPED_CONFIGS = (
    "tiny", "paper", "tiny_pretrain", "paper_pretrain",
    "dpo", "oars", "rfsr", "tiny_dpo", "tiny_oars", "tiny_rfsr",  # sibling methods (SPEC section 10)
)  # fmt: skip


def from_mapping(cls: type[T], data: Mapping[str, Any], *, where: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``; ``where`` is the dotted prefix for errors."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or 'config'}: expected a table of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(_join(where, k) for k in unknown)
        raise ValueError(f"unknown config key(s) {names}; valid keys here: {', '.join(sorted(fields))}")
    missing = [
        _join(where, name)
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"missing required config key(s) {', '.join(missing)}")
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:  # a __post_init__ check: prefix it with where it came from
        raise ValueError(f"{where or 'config'}: {err}") from None


def to_mapping(config: Any) -> dict[str, Any]:
    """The inverse of :func:`from_mapping`: plain dicts, lists and scalars."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def load_mapping(source: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a shipped config name (``tiny``, ``paper``) or a YAML/TOML file, then apply overrides."""
    data = _read(source)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form dotted.key=value")
        set_dotted(data, key.strip(), _parse_value(raw))
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``key='a.b'``, creating tables on the way."""
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {key!r}: {'.'.join(parents[: i + 1])} is not a table")
        node = child
    node[leaf] = value


def save_config(config: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML next to a run's outputs; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_mapping(config), sort_keys=False))
    return path


def _read(source: str | Path) -> dict[str, Any]:
    if str(source) in SHIPPED_CONFIGS:
        text = resources.files("common.configs").joinpath(f"{source}.yaml").read_text()
        return yaml.safe_load(text) or {}
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"config {source!r} is neither a shipped config {SHIPPED_CONFIGS} nor a file")
    if path.suffix == ".toml":
        return tomllib.loads(path.read_text())
    if path.suffix in (".yaml", ".yml"):
        return yaml.safe_load(path.read_text()) or {}
    raise ValueError(f"config file {path} must end in .yaml, .yml or .toml")


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _coerce(tp: Any, value: Any, key: str) -> Any:  # noqa: PLR0911 - one branch per type form
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where=key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(tp, value, key)
    if origin is tuple:
        return _coerce_tuple(tp, value, key)
    if origin in (dict, Mapping):
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected a table, got {value!r}")
        return {_coerce(key_tp, k, key): _coerce(value_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    return _coerce_scalar(tp, value, key)


def _coerce_union(tp: Any, value: Any, key: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(arg, value, key)
        except ValueError as err:
            errors.append(str(err))
    raise ValueError(f"{key}: {value!r} matches none of {tp}: {'; '.join(errors)}")


def _coerce_tuple(tp: Any, value: Any, key: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{key}: expected a list, got {value!r}")
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if len(args) != len(value):
        raise ValueError(f"{key}: expected {len(args)} items, got {len(value)}")
    return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            # .inf / .nan (or "inf") would reach every loss, lr and timeout unnoticed: no component wants one.
            if not math.isfinite(number):
                raise ValueError(f"{key}: must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise AssertionError(f"config type {tp!r} of {key} is not supported by the loader")
    raise ValueError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
