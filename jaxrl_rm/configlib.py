"""Typed config machinery: dataclasses <- YAML (with `extends:`) <- dotted CLI overrides.

Every error names the offending key (and lists the valid ones) or the missing file, so a typo in a
200-line YAML or a launch script's override fails at start-up, not three hours into a run.
The schema itself (which sections and fields exist) lives in `jaxrl_rm/config.py`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key or file."""


# --- YAML files and overrides -----------------------------------------------------------------
def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML config; `extends: other.yaml` (relative to this file) is merged underneath."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: circular 'extends' chain {[str(p) for p in _seen]}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("extends", None)
    if bases is None:
        return data
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, read_yaml(path.parent / base, _seen + (path.resolve(),)))
    return deep_merge(merged, data)


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_override(data: dict, override: str) -> dict:
    """`a.b.c=value` (value parsed as YAML: `3`, `0.1`, `true`, `[1, 2]`, `null`, text)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value (e.g. optim.learning_rate=1e-4)")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):  # `grpo.tasks.1.ratio=2`: an element of a list of sections
            node = _list_item(node, part, override)
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    if isinstance(node, list):
        index = _index(node, parts[-1], override)
        node[index] = value
    else:
        node[parts[-1]] = value
    return data


def _index(items: list, part: str, override: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(items) <= int(part) < len(items):
        raise ConfigError(f"override {override!r}: {part!r} is not an index of a list of {len(items)} items")
    return int(part)


def _list_item(items: list, part: str, override: str) -> dict:
    item = items[_index(items, part, override)]
    if not isinstance(item, dict):
        raise ConfigError(f"override {override!r}: item {part} is not a section")
    return item


# --- dataclass construction with type checks --------------------------------------------------
def _type_name(tp) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str):
    """Check `value` against annotation `tp`; int->float widening and YAML's 1e-4 strings allowed."""
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
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: expected one of {list(get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads `1e-4` as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp}")


def from_dict(cls, data: dict, *, prefix: str = ""):
    """Build dataclass `cls` from a (nested) dict; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"under '{prefix}'" if prefix else "at the top level"
        full = ".".join(filter(None, [prefix, str(unknown[0])]))
        raise ConfigError(f"unknown config key '{full}'; valid keys {where}: {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(value, hints[name], ".".join(filter(None, [prefix, name])))
              for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None
    return obj


def to_dict(obj) -> Any:
    """Dataclass tree -> plain dict (for writing the resolved config)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def check(condition: bool, key: str, message: str) -> None:
    """Range/consistency validation helper used by the schema's `validate` methods."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def describe(cls, prefix: str = "", indent: int = 0) -> list[str]:
    """Lines documenting a config dataclass (key, type, default, docstring line) for --help."""
    lines = []
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = ".".join(filter(None, [prefix, f.name]))
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{'  ' * indent}{key}:  {docs.get(f.name, '')}".rstrip())
            lines += describe(tp, key, indent + 1)
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "<required>")
        lines.append(f"{'  ' * indent}{key} ({_type_name(tp)}) = {default!r}  {docs.get(f.name, '')}".rstrip())
    return lines


def _field_docs(cls) -> dict[str, str]:
    """Field docs written as `#:` comments or a string literal right after the field."""
    import inspect

    try:
        source = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    docs, pending = {}, []
    for line in source:
        s = line.strip()
        if s.startswith("#:"):
            pending.append(s[2:].strip())
            continue
        if ":" in s and not s.startswith(("def ", "class ", "#", '"', "@")):
            name = s.split(":", 1)[0].strip()
            if name.isidentifier():
                if pending:
                    docs[name] = " ".join(pending)
                comment = s.split("#", 1)[1].strip() if "  # " in s else ""
                if comment and name not in docs:
                    docs[name] = comment
        pending = []
    return docs
