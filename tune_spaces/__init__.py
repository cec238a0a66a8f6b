"""Search spaces for the tune stage: YAML files whose keys name config fields, and the loader that checks them and
turns them into Ray Tune spaces.

    space = load_space("gwae_weights", PipelineConfig)  # a file shipped here, or any path to a YAML file
    check_values(space, cfg)                             # every bound and choice, applied alone to the real config
    tuner = Tuner(trainable, param_space=to_tune_space(space), ...)
    cfg = apply(cfg, sampled)                            # a trial's config

The config class is the caller's: a dataclass whose dataclass-typed fields are the sections (e.g. PipelineConfig's
`gwae`, `train`), with `to_dict()`, a `from_dict()` classmethod that validates, and a ValueError for a bad value.
A space file maps `section.field` (a field of one of those sections, e.g. `gwae.lambda_w`) to a distribution:

    gwae.lambda_w: {type: loguniform, low: 0.1, high: 10}     # low > 0
    gwae.lambda_h: {type: uniform, low: 0.0, high: 0.1}
    gwae.z_dim:    {type: quniform, low: 4, high: 16, q: 4}    # multiples of q between low and high
    gwae.critic_steps: {type: randint, low: 1, high: 6}        # integers, high exclusive (as in Ray)
    gwae.prior:    {type: choice, values: [np, fnp, gmp]}      # sampled
    gwae.prior:    {type: grid, values: [np, gmp]}             # every value, num_samples times (random search only)

Every mistake is a `SpaceError` (a ValueError) naming the file and the line (from yaml's node marks), before any
trial starts. Importing this package is light: yaml and the standard library only, nothing of the project. Ray is
imported by `to_tune_space` alone.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar, Union

import yaml

C = TypeVar("C")

SHIPPED_DIR = Path(__file__).resolve().parent

# The keys each distribution type needs, and those it may have.
TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "loguniform": (("low", "high"), ()),
    "uniform": (("low", "high"), ()),
    "quniform": (("low", "high", "q"), ()),
    "randint": (("low", "high"), ()),
    "choice": (("values",), ()),
    "grid": (("values",), ()),
}
_CONTINUOUS = ("loguniform", "uniform")


class SpaceError(ValueError):
    """A search space is wrong; the message starts with the file and line ("path:line: ...") and says the fix."""


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched field: `key` = "section.field", a distribution, and where the file defines it."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    q: float | None = None
    values: tuple = ()
    where: str = ""  # "path:line" of the key, for error messages

    @property
    def file(self) -> str:
        return self.where.rsplit(":", 1)[0]

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def field(self) -> str:
        return self.key.split(".", 1)[1]

    def candidates(self) -> list[Any]:
        """Values a trial can get that bound the space: both ends of a range, or every listed value."""
        if self.type in ("choice", "grid"):
            return list(self.values)
        if self.type == "randint":
            return [int(self.low), int(self.high) - 1]
        if self.type == "quniform":
            return [math.ceil(self.low / self.q) * self.q, math.floor(self.high / self.q) * self.q]
        return [self.low, self.high]

    def domain(self) -> Any:
        from ray import tune

        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        if self.type == "quniform":
            return tune.quniform(self.low, self.high, self.q)
        if self.type == "randint":
            return tune.randint(int(self.low), int(self.high))
        if self.type == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))


def _error(where: str, message: str) -> SpaceError:
    return SpaceError(f"{where}: {message}")


def shipped_spaces() -> list[str]:
    """Names of the spaces shipped in tune_spaces/ (file names without .yaml)."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def space_path(name_or_path: str | Path) -> Path:
    """A path to an existing YAML file, or the shipped file of that name (with or without .yaml)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if path.parent == Path(".") and name in shipped_spaces():
        return SHIPPED_DIR / f"{name}.yaml"
    shipped = shipped_spaces()
    hint = difflib.get_close_matches(name, shipped, n=1)
    more = f"; did you mean {hint[0]!r}?" if hint else ""
    raise _error(str(name_or_path), f"no such search space: not a file, and not one of the spaces shipped in "
                                    f"{SHIPPED_DIR} ({', '.join(shipped)}){more}")


def _sections(config_cls: type) -> dict[str, type]:
    """The sections of `config_cls` a space may name: its fields typed by a dataclass, e.g. {"gwae": GWAEConfig}."""
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        raise TypeError(f"config_cls must be a dataclass class such as PipelineConfig, got {config_cls!r}")
    hints = typing.get_type_hints(config_cls)  # the annotations may be strings (from __future__ import annotations)
    found = {f.name: hints[f.name] for f in dataclasses.fields(config_cls)
             if isinstance(hints.get(f.name), type) and dataclasses.is_dataclass(hints[f.name])}
    if not found:
        raise TypeError(f"{config_cls.__name__} has no sections (fields typed by a dataclass) for a space to name")
    return found


def _kind(tp: Any) -> str:
    """"int", "float" or "other" for a field's type (Optional[...] looks at what it wraps)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    if tp is int:
        return "int"
    if tp is float:
        return "float"
    return "other"


def _number(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _error(where, f"{key} must be a number, got {value!r}")
    try:
        number = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    except ValueError:
        raise _error(where, f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise _error(where, f"{key} must be finite, got {value!r}")
    return number


def _mapping(node: yaml.Node, where: str, what: str) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
    """The (key, value) node pairs of a mapping node, refusing other nodes and repeated keys."""
    if not isinstance(node, yaml.MappingNode):
        raise _error(where, f"{what} must be a mapping")
    seen: dict[str, int] = {}
    for key, _ in node.value:
        line = key.start_mark.line + 1
        if not isinstance(key, yaml.ScalarNode):
            raise _error(f"{where.rsplit(':', 1)[0]}:{line}", "keys must be plain names")
        if key.value in seen:
            raise _error(f"{where.rsplit(':', 1)[0]}:{line}", f"{key.value!r} is repeated (first at line "
                                                               f"{seen[key.value]}); keep one")
        seen[key.value] = line
    return node.value


def load_space(name_or_path: str | Path, config_cls: type) -> dict[str, Param]:
    """Read and check a space file: {"gwae.lambda_w": Param(...), ...} in file order.

    Keys name a field of a section of `config_cls` (its fields typed by a dataclass, e.g. PipelineConfig.gwae).
    A `SpaceError` naming the file and line refuses: YAML errors, keys that are not `section.field` of a known
    section and field (the closest is suggested), unknown distribution types or options, missing options,
    low >= high, non-positive loguniform bounds, q <= 0, non-integer randint bounds, continuous types on integer
    fields, numeric types on fields that are not numbers, empty or non-scalar value lists, and files that cannot be
    read as text. A `config_cls` that is not a dataclass with dataclass-typed sections is a TypeError.
    """
    known = _sections(config_cls)
    path = space_path(name_or_path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _error(f"{file}:1", f"cannot read the file as UTF-8 text: {e}") from None
    try:
        loader = yaml.SafeLoader(text)  # the reader refuses control characters here
    except yaml.YAMLError as e:
        line = text.count("\n", 0, getattr(e, "position", 0)) + 1
        raise _error(f"{file}:{line}", f"not valid YAML: {e}") from None
    try:
        root = loader.get_single_node()
        if root is None:
            raise _error(f"{file}:1", "the file defines no parameters; add e.g. "
                                      "`gwae.lambda_w: {type: loguniform, low: 0.1, high: 10}`")
        space: dict[str, Param] = {}
        for key_node, spec_node in _mapping(root, f"{file}:1", "a search space"):
            where = f"{file}:{key_node.start_mark.line + 1}"
            space[key_node.value] = _param(key_node.value, spec_node, where, file, loader, known)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise _error(f"{file}:{line}", f"not valid YAML: {e.problem or e}") from None
    finally:
        loader.dispose()
    if not space:
        raise _error(f"{file}:1", "the file defines no parameters")
    return space


def _param(key: str, node: yaml.Node, where: str, file: str, loader: yaml.SafeLoader,
           known: Mapping[str, type]) -> Param:
    section, _, field = key.partition(".")
    if section not in known or not field or "." in field:
        hint = difflib.get_close_matches(section, list(known), n=1)
        more = f" (did you mean {hint[0]!r}?)" if hint and section not in known else ""
        raise _error(where, f"{key!r} must name a config field as section.field, e.g. gwae.lambda_w; sections: "
                            f"{', '.join(known)}{more}")
    names = [f.name for f in dataclasses.fields(known[section])]
    if field not in names:
        hint = difflib.get_close_matches(field, names, n=1)
        more = f"; did you mean '{section}.{hint[0]}'?" if hint else f"; fields: {', '.join(names)}"
        raise _error(where, f"{key!r} is not a field of {known[section].__name__}{more}")
    pairs = _mapping(node, where, f"{key}'s distribution ({{type: ..., ...}})")
    lines = {k.value: f"{file}:{k.start_mark.line + 1}" for k, _ in pairs}
    spec = {k.value: loader.construct_object(v, deep=True) for k, v in pairs}
    kind = spec.get("type")
    if kind not in TYPES:
        hint = difflib.get_close_matches(str(kind), list(TYPES), n=1)
        more = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise _error(lines.get("type", where), f"{key}: type {kind!r} is not one of {', '.join(TYPES)}{more}")
    required, optional = TYPES[kind]
    for name in spec:
        if name != "type" and name not in required + optional:
            hint = difflib.get_close_matches(name, list(required + optional), n=1)
            more = f"; did you mean {hint[0]!r}?" if hint else ""
            raise _error(lines[name], f"{key}: {kind} takes {', '.join(required + optional)}, not {name!r}{more}")
    for name in required:
        if name not in spec:
            raise _error(where, f"{key}: {kind} needs {', '.join(required)}; {name!r} is missing")
    field_type = typing.get_type_hints(known[section])[field]
    if kind in ("choice", "grid"):
        return Param(key, kind, values=_values(spec["values"], lines["values"], key), where=where)
    low, high = (_number(lines[k], f"{key}: {k}", spec[k]) for k in ("low", "high"))
    field_kind = _kind(field_type)
    if field_kind == "other":
        raise _error(lines["type"], f"{key} is not a number field; search it with type choice or grid")
    if low >= high:
        raise _error(lines["low"], f"{key}: low ({low:g}) must be below high ({high:g})")
    if kind == "loguniform" and low <= 0:
        raise _error(lines["low"], f"{key}: loguniform needs low > 0, got {low:g}; use uniform to include 0")
    if kind in _CONTINUOUS and field_kind == "int":
        raise _error(lines["type"], f"{key} is an integer field; search it with randint or quniform")
    q = None
    if kind == "quniform":
        q = _number(lines["q"], f"{key}: q", spec["q"])
        if q <= 0:
            raise _error(lines["q"], f"{key}: q must be > 0, got {q:g}")
        if math.ceil(low / q) * q > high:
            raise _error(lines["q"], f"{key}: no multiple of q={q:g} lies between {low:g} and {high:g}")
        if field_kind == "int" and not q.is_integer():
            raise _error(lines["q"], f"{key} is an integer field; q must be a whole number, got {q:g}")
    if kind == "randint" and not (low.is_integer() and high.is_integer()):
        raise _error(lines["low"], f"{key}: randint bounds must be integers, got {low:g} and {high:g}")
    return Param(key, kind, low=low, high=high, q=q, where=where)


def _values(values: Any, where: str, key: str) -> tuple:
    if not isinstance(values, list) or not values:
        raise _error(where, f"{key}: values must be a non-empty list, e.g. [np, fnp, gmp]; got {values!r}")
    for v in values:
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise _error(where, f"{key}: values must be numbers, strings, booleans or null; got {v!r}")
    if len(set(map(repr, values))) != len(values):
        raise _error(where, f"{key}: values repeat; list each once")
    return tuple(values)


def to_tune_space(space: Mapping[str, Param]) -> dict[str, Any]:
    """The `param_space` for `ray.tune.Tuner`: {"gwae.lambda_w": tune.loguniform(0.1, 10), ...}."""
    return {key: param.domain() for key, param in space.items()}


def apply(config: C, values: Mapping[str, Any]) -> C:
    """`config` with {"section.field": value} applied, through `type(config).from_dict` so every value is validated:
    a value or combination the config refuses raises the config's own error (e.g. a ConfigError), unwrapped."""
    data = config.to_dict()
    for key, value in values.items():
        section, field = key.split(".", 1)
        data[section][field] = value
    return type(config).from_dict(data)


def check_values(space: Mapping[str, Param], config: Any) -> None:
    """Apply each bound and listed value alone to `config`; the first one it refuses (a ValueError from its
    validation) is a SpaceError naming the space's file and line and quoting the config's message. Combinations of
    searched values can still clash (they are only known per trial)."""
    for param in space.values():
        for value in param.candidates():
            try:
                apply(config, {param.key: value})
            except ValueError as e:
                raise _error(param.where, f"{param.key} = {value!r} is refused by the config: {e}") from None


__all__ = ["Param", "SpaceError", "TYPES", "apply", "check_values", "load_space", "shipped_spaces", "space_path",
           "to_tune_space"]
