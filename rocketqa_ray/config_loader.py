"""The machinery behind `rocketqa_ray.config`: a config is a dataclass of section dataclasses, and this module
fills one from YAML mappings and `section.key=value` strings, checking each value against its field's
annotation (`Literal[...]` choices included) and reading each field's one-line help from its metadata.

It knows no section or key by name, so `config.py` stays the one place that declares them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rocketqa_ray.errors import ConfigError

C = TypeVar("C")


def setting(default: Any = dataclasses.MISSING, *, help: str, factory: Any = dataclasses.MISSING,
            ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A dataclass field with its one-line help text (`field_help` reads it back) and, for a number, its valid
    range (`check_range` enforces it; None = no bound on that side)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help, "range": bounds})


def range_text(f: dataclasses.Field) -> str:
    """The field's valid range in words, e.g. '> 0', '>= 1', 'in [0, 1)'; '' when it has none."""
    b = f.metadata.get("range") or {}
    lo = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
    hi = ("]", b["le"]) if "le" in b else (")", b["lt"]) if "lt" in b else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]:g}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {hi[1]:g}"
    return ""


def check_range(value: Any, f: dataclasses.Field, where: str) -> None:
    """A ConfigError naming the valid range when a number lies outside its field's range (None is not checked)."""
    b = f.metadata.get("range") or {}
    if value is None or not b or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    ok = (("ge" not in b or value >= b["ge"]) and ("gt" not in b or value > b["gt"])
          and ("le" not in b or value <= b["le"]) and ("lt" not in b or value < b["lt"]))
    if not ok:
        raise ConfigError(f"{where}={value!r} is out of range: it must be {range_text(f)}")


def check_ranges(obj: Any, section: str) -> None:
    """`check_range` for every field of a section dataclass."""
    for f in dataclasses.fields(obj):
        check_range(getattr(obj, f.name), f, f"{section}.{f.name}")


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def literal_choices(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal[...]` annotation, also inside `Optional`; None for any other type."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if (found := literal_choices(arg)) is not None:
                return found
    return None


def type_name(tp: Any) -> str:
    """A short readable name for an annotation: `int | None`, `list[str]`, `mean | cls` for a Literal."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting the lossless cases (int -> float, 'true' -> bool)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        try:
            value = coerce(value, type(allowed[0]), where)
        except ConfigError:
            pass  # the message below names the allowed values, which says more than the wrong type
        if value not in allowed:
            raise ConfigError(f"{where}={value!r} is not one of: {', '.join(str(a) for a in allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, item_tp, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):
            return "true" if value else "false"  # bf16: true in YAML means the string "true"
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def _valid_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _apply_section(obj: Any, values: dict[str, Any], section: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{section}' must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(
                f"unknown config key '{section}.{key}'; valid keys in '{section}': {', '.join(_valid_keys(type(obj)))}"
            )
        value = coerce(value, hints[key], f"{section}.{key}")
        check_range(value, fields[key], f"{section}.{key}")
        setattr(obj, key, value)


def apply_dict(cfg: C, values: dict[str, Any] | None, source: str = "config") -> C:
    """Apply a nested dict {section: {key: value}} onto `cfg` (in place), validating keys and types."""
    if values is None:
        return cfg
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(values).__name__}")
    sections = _valid_keys(type(cfg))
    for section, sub in values.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown config section '{section}'; valid sections: {', '.join(sections)}")
        _apply_section(getattr(cfg, section), sub, section)
    return cfg


def _parse_scalar(text: str) -> Any:
    # YAML gives 3 -> int, 0.1 -> float, true -> bool, null -> None, [a, b] -> list
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: C, overrides: list[str] | None) -> C:
    """Apply `section.key=value` strings."""
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"bad override {item!r}: expected section.key=value, e.g. dual.lr=2e-5")
        dotted, raw = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        value = _parse_scalar(raw)
        if isinstance(value, str) and value.strip() == "":
            value = raw
        apply_dict(cfg, {section: {key: value}}, source=f"--set {item}")
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
