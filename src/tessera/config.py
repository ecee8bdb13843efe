"""Typed configs that round-trip through YAML/JSON and accept `key=value` overrides.

Every knob in tessera lives in a dataclass deriving from `Config`. Unknown keys are
errors that list the valid ones; nested configs are dataclass fields.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config file or override that does not match the config's fields."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a parsed YAML/JSON value to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: cannot read {value!r} as {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return tp.from_dict(value, where=where)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


@dataclasses.dataclass
class Config:
    """Base class: strict construction from dicts, YAML/JSON round trip, dotted overrides."""

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], where: str = "") -> C:
        """Build from a mapping; unknown keys raise ConfigError listing the valid ones."""
        types_ = _field_types(cls)
        unknown = sorted(set(data) - set(types_))
        if unknown:
            prefix = f"{where}." if where else ""
            raise ConfigError(
                f"unknown config key {prefix}{unknown[0]!s} for {cls.__name__}; "
                f"valid keys: {', '.join(types_)}"
            )
        kwargs = {k: _coerce(v, types_[k], f"{where}.{k}" if where else k) for k, v in data.items()}
        obj = cls(**kwargs)
        obj.validate()
        return obj

    def validate(self) -> None:
        """Subclasses raise ConfigError for out-of-range values."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists for tuples) suitable for YAML and JSON."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def replace(self: C, **changes: Any) -> C:
        """A validated copy with some fields changed."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def with_overrides(self: C, overrides: list[str]) -> C:
        """Apply `a.b=value` strings (values parsed as YAML scalars)."""
        data = self.to_dict()
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            key, raw = item.split("=", 1)
            node = data
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {key!r}: {part!r} is not a config section")
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
        return type(self).from_dict(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_file(cls: type[C], path: str | Path) -> C:
        """Read a YAML or JSON file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} does not hold a mapping")
        return cls.from_dict(data)


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise ConfigError when value lies outside [low, high] (or the open variants)."""
    bad = (low is not None and (value < low or (low_open and value == low))) or (
        high is not None and (value > high or (high_open and value == high)))
    if bad:
        if high is None:
            bound = f"> {low}" if low_open else f">= {low}"
            raise ConfigError(f"{name}={value} is out of range: it must be {bound}")
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ConfigError(f"{name}={value} is out of range {lo}{low}, {high}{hi}")
