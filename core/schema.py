"""Typed config sections built from plain dicts, with errors that name the dotted key.

Every room declares its config section as a frozen dataclass with type hints and defaults
(``data/config.py: DataConfig``, ``teacher/config.py: TeacherConfig``, ...). :func:`build`
turns the dict that ``yaml.safe_load`` produced into that dataclass, checking every key and
type on the way, so that a typo fails at start-up instead of an hour into training:

    unknown key 'techer.epochs' — did you mean 'teacher.epochs'?
    'teacher.epochs' must be an integer, got 'ten' (str)

A dataclass may check ranges in ``__post_init__`` by raising :class:`FieldError` with the
field's name; the builder prefixes the section path. This module only knows dataclasses and
typing; YAML files and ``a.b=c`` overrides are handled by ``distill/config.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from core.errors import UserError

__all__ = ["FieldError", "build", "dotted_keys", "type_at", "to_dict", "describe_type", "changed_keys"]


class FieldError(ValueError):
    """Raised by a section's ``__post_init__``: ``FieldError("epochs", "must be >= 1, got 0")``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> Any:
    """``X | None`` -> ``X`` (for walking into a section that may be omitted)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every valid dotted key of a dataclass tree, sections and leaves alike."""
    keys: list[str] = []
    for name, tp in _hints(cls).items():
        path = f"{prefix}{name}"
        keys.append(path)
        inner = _unwrap_optional(tp)
        if _is_dataclass_type(inner):
            keys.extend(dotted_keys(inner, path + "."))
    return keys


def type_at(cls: type, dotted: str) -> Any:
    """The declared type of a dotted key, or ``Any`` inside a free-form dict; raises KeyError."""
    tp: Any = cls
    for part in dotted.split("."):
        inner = _unwrap_optional(tp)
        if _is_dataclass_type(inner):
            hints = _hints(inner)
            if part not in hints:
                raise KeyError(dotted)
            tp = hints[part]
        elif typing.get_origin(inner) is dict or inner is dict:
            args = typing.get_args(inner)
            tp = args[1] if len(args) == 2 else Any
        elif inner is Any:
            tp = Any
        else:
            raise KeyError(dotted)
    return tp


def describe_type(tp: Any) -> str:
    """A short human name for a type hint: 'an integer', 'one of: yolo, folder', ..."""
    origin = typing.get_origin(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of: " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        parts = [describe_type(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + (" (or null)" if type(None) in args else "")
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = describe_type(args[0]) if args else "values"
        return f"a list of {inner.removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if _is_dataclass_type(tp):
        return "a mapping (section)"
    return getattr(tp, "__name__", str(tp))


def _closest(key: str, candidates: list[str]) -> str | None:
    found = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if found:
        return found[0]
    # A right leaf name in the wrong section ('epochs' under 'data'): match on the last part.
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf]
    return same_leaf[0] if len(same_leaf) == 1 else None


def unknown_key_error(key: str, root: type, where: str = "") -> UserError:
    hint = _closest(key, dotted_keys(root))
    text = f"unknown key '{key}'{where}"
    text += f" — did you mean '{hint}'?" if hint else " — it is not a setting of this project."
    return UserError(text)


def _type_error(key: str, tp: Any, value: Any, where: str) -> UserError:
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return UserError(
        f"'{key}'{where} must be {describe_type(tp)}, got {shown} ({type(value).__name__})"
    )


def _convert(value: Any, tp: Any, key: str, root: type, where: Any) -> Any:
    """Check ``value`` against the hint ``tp`` and return it in the declared shape."""
    loc = where(key) if callable(where) else ""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _type_error(key, tp, value, loc)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, root, where)
            except UserError as exc:
                errors.append(exc)
        # A single non-None alternative keeps its own, more precise message.
        if len(errors) == 1:
            raise errors[0]
        raise _type_error(key, tp, value, loc)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        raise UserError(
            f"'{key}'{loc} must be {describe_type(tp)}, got {value!r}{hint}"
        )
    if _is_dataclass_type(tp):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value, loc)
        return _build(tp, value, key + ".", root, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value, loc)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _type_error(key, tp, value, loc)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads '1e-3' (no dot) as a string; accept what is plainly a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, tp, value, loc)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, tp, value, loc)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value, loc)
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(
                    f"'{key}'{loc} must be a list of {len(args)} values, got {len(value)}"
                )
            return tuple(
                _convert(v, a, f"{key}[{i}]", root, where) for i, (v, a) in enumerate(zip(value, args))
            )
        inner = args[0] if args else Any
        items = [_convert(v, inner, f"{key}[{i}]", root, where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value, loc)
        args = typing.get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, f"{key}.{k}", root, where) for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(key, tp, value, loc)


def _build(cls: type, raw: Mapping[str, Any], prefix: str, root: type, where: Any) -> Any:
    hints = _hints(cls)
    for key in raw:
        if key not in hints:
            full = f"{prefix}{key}"
            # A misspelt section ('techer: {epochs: 3}') is named by its first leaf,
            # so the suggestion is the full key the user meant ('teacher.epochs').
            value = raw[key]
            while isinstance(value, Mapping) and value:
                sub = next(iter(value))
                full, value = f"{full}.{sub}", value[sub]
            raise unknown_key_error(full, root, where(full) if callable(where) else "")
    kwargs = {name: _convert(raw[name], hints[name], f"{prefix}{name}", root, where)
              for name in hints if name in raw}
    try:
        return cls(**kwargs)
    except FieldError as exc:
        full = f"{prefix}{exc.key}"
        loc = where(full) if callable(where) else ""
        raise UserError(f"'{full}'{loc} {exc.message}") from None


def build(cls: type, raw: Mapping[str, Any] | None, where: Any = None) -> Any:
    """Build the dataclass ``cls`` from a plain mapping, validating every key and type.

    ``where(dotted_key)`` may return a location suffix for messages, e.g. ``" (config.yaml line 12)"``.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise UserError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    return _build(cls, raw, "", cls, where)


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML/JSON-ready values (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    keys: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            keys.extend(changed_keys(a, b, f"{prefix}{key}."))
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys
