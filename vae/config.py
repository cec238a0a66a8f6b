"""Frozen, typed, validated configuration dataclasses (pure Python; shared by `vae/` and `pipelines/`).

Every config part is a frozen dataclass deriving from `Config`. Fields carry their constraints as metadata
(`positive()`, `in_range(lo, hi)`, `one_of(...)`), checked in `__post_init__`, so an invalid object can never
exist. `from_dict` builds a part from plain data (YAML, MLflow params, a checkpoint) and names the exact key,
the bad value and what is allowed; an unknown key suggests the closest known one.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key, the value and what is allowed."""


def one_of(*choices: Any) -> dict:
    return {"choices": tuple(choices)}


def in_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open)}


def positive() -> dict:
    return in_range(0, None, lo_open=True)


def non_negative() -> dict:
    return in_range(0, None)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return "list of " + ", ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert plain data to `tp` where the conversion is lossless; raise ConfigError otherwise."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        more = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}{more}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a {_type_name(tp)}, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(tp)}), got {list(value)!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return tp.from_dict(value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _check_meta(key: str, value: Any, meta: typing.Mapping) -> None:
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        hint = difflib.get_close_matches(str(value), [str(c) for c in meta["choices"]], n=1)
        more = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, meta['choices']))}{more}")
    if "range" in meta:
        lo, hi, lo_open = meta["range"]
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if lo is not None and (v < lo or (lo_open and v == lo)):
                rel = ">" if lo_open else ">="
                allowed = f"{rel} {lo}" + (f" and <= {hi}" if hi is not None else "")
                raise ConfigError(f"{key}: {value!r} is out of range; allowed: {allowed}")
            if hi is not None and v > hi:
                allowed = f"<= {hi}" + (f" and >= {lo}" if lo is not None else "")
                raise ConfigError(f"{key}: {value!r} is out of range; allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every config part: validation, dict round trip, dotted overrides."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            coerced = _coerce(value, hints[f.name], self._key(f.name))
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
            _check_meta(self._key(f.name), coerced, f.metadata)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses raise ConfigError naming the fields and the fix."""

    # The dotted prefix under which this part sits in a PipelineConfig, for error messages.
    _prefix: typing.ClassVar[str] = ""

    def _key(self, name: str) -> str:
        return f"{self._prefix}{name}"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: typing.Mapping[str, Any] | None, prefix: str | None = None) -> "Config":
        data = dict(data or {})
        prefix = cls._prefix if prefix is None else prefix
        names = cls.field_names()
        for key in data:
            if key not in names:
                hint = difflib.get_close_matches(key, names, n=1)
                more = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(names)}"
                raise ConfigError(f"unknown key '{prefix}{key}'{more}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
        try:
            return cls(**kwargs)
        except ConfigError as e:
            # A part nested elsewhere (e.g. a DataConfig under tune.data) reports its keys under its real path.
            msg = str(e)
            if prefix and not msg.startswith(prefix):
                own = cls._prefix
                msg = prefix + (msg[len(own):] if own and msg.startswith(own) else msg)
                raise ConfigError(msg) from None
            raise

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Config):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def flat(self, prefix: str = "") -> dict[str, Any]:
        """Flattened `a.b` → value mapping (MLflow params, Ray param spaces)."""
        out: dict[str, Any] = {}
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                for k2, v2 in _flatten(v, f"{prefix}{k}.").items():
                    out[k2] = v2
            else:
                out[f"{prefix}{k}"] = v
        return out


def _flatten(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
