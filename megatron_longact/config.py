"""Typed configuration: dataclasses filled from YAML, overridden with dotted ``key=value`` pairs.

Each component owns a small dataclass whose ``__post_init__`` validates its own fields. This module
holds the generic machinery: strict conversion from nested dicts (unknown keys and wrong types are
errors that name the dotted field), YAML loading, and command-line overrides.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type or range."""


def check_choice(field: str, value, allowed) -> None:
    """Raise ConfigError naming ``field`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{field}: got {value!r}, expected one of {sorted(map(str, allowed))}")


def check_positive(field: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{field}: got nan, expected a number")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{field}: got {value!r}, expected a number {bound}")


def check_range(field: str, value, low, high, *, low_open=False, high_open=False) -> None:
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{field}: got nan, expected a number")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ConfigError(f"{field}: got {value!r}, expected a value in {left}{low}, {high}{right}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, path: str):
    """Convert ``value`` to type ``tp`` strictly; raise ConfigError naming ``path``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{path}: got null, expected {_type_name(tp)}")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: got {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: got {value!r}, expected one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: got {type(value).__name__} {value!r}, expected a mapping")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: got {type(value).__name__} {value!r}, expected a list")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: got {type(value).__name__}, expected a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: got {type(value).__name__} {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: got {type(value).__name__} {value!r}, expected an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        # YAML 1.1 reads "1e-4" as a string; accept numeric strings for floats only.
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{path}: got {type(value).__name__} {value!r}, expected a number")
        # No config number means NaN or infinity, and range checks let NaN through (every
        # comparison with NaN is false): refuse them here, for every float field at once.
        if not math.isfinite(number):
            raise ConfigError(f"{path}: got {value!r}, expected a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: got {type(value).__name__} {value!r}, expected a string")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: got {type(value).__name__} {value!r}, expected {_type_name(tp)}")


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    data = apply_aliases(cls, data, path)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        import difflib

        close = difflib.get_close_matches(unknown[0], list(fields) + list(_aliases(cls)), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]}{hint} (known keys{' of ' + path if path else ''}: "
            f"{sorted(fields)})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{path or cls.__name__}: {exc}") from None


def _aliases(cls) -> dict:
    return dict(getattr(cls, "ALIASES", None) or {})


def apply_aliases(cls, data: dict, path: str = "") -> dict:
    """Rename the alias keys a dataclass declares (``ALIASES = {"other_name": "our_name"}``, e.g.
    the names verl or TRL users type) to their canonical field, so the saved config records one
    name. Giving both an alias and its field, with different values, is an error."""
    aliases = _aliases(cls)
    if not aliases or not any(k in aliases for k in data):
        return data
    out = dict(data)
    where = f"{path}." if path else ""
    for alias, canonical in aliases.items():
        if alias not in out:
            continue
        value = out.pop(alias)
        if canonical in out and out[canonical] != value:
            raise ConfigError(f"{where}{alias} is another name for {where}{canonical}; both were given "
                              f"({value!r} and {out[canonical]!r}): keep one")
        out[canonical] = value
    return out


def normalize_aliases(cls, data, path: str = ""):
    """``data`` with every alias key of ``cls`` and its nested config sections renamed to the
    canonical field. Apply it to each source (a YAML file, the overrides) before merging them, so
    that an alias on the command line overrides the canonical name in the file."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return data
    data = apply_aliases(cls, data, path)
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for name, value in data.items():
        tp = hints.get(name)
        if isinstance(value, dict) and tp is not None:
            options = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
            sub = next((o for o in options if dataclasses.is_dataclass(o)), None)
            if sub is not None:
                out[name] = normalize_aliases(sub, value, f"{path}.{name}" if path else name)
    return out


def to_dict(obj) -> dict:
    """Plain nested dict of a config dataclass (tuples become lists) for YAML output."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(obj)


def parse_overrides(pairs: list[str]) -> dict:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r}: expected key=value, e.g. train.lr=1e-5")
        key, raw = pair.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {pair!r}: the key {key!r} is not a dotted name")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise ConfigError(f"override {pair!r}: the value of {key} is not valid YAML ({problem}); "
                              f"quote it or fix the brackets") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r}: {part} is both a value and a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_relative(data: dict, dotted: str, base: Path) -> None:
    """Make the string at ``dotted`` in ``data`` absolute against ``base`` when it is relative."""
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and isinstance(node.get(leaf), str) and node[leaf]:
        value = Path(node[leaf]).expanduser()
        if not value.is_absolute():
            node[leaf] = str((base / value).resolve())


def load_yaml(path: str | Path, path_fields: tuple[str, ...] = (), normalize=None) -> dict:
    """Read a YAML mapping; ``include: other.yaml`` (relative to the file) is merged underneath.

    ``path_fields``: dotted keys holding input paths; a relative one is resolved against the
    folder of the file that sets it (so a config works from any working directory)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    for dotted in path_fields:
        _resolve_relative(data, dotted, path.parent)
    include = data.pop("include", None)
    if normalize is not None:
        data = normalize(data)
    if include is not None:
        includes = [include] if isinstance(include, str) else include
        base: dict = {}
        for inc in includes:
            base = deep_merge(base, load_yaml(path.parent / inc, path_fields, normalize))
        data = deep_merge(base, data)
    return data
