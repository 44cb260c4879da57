"""JSON/YAML values against Python type hints: one-line errors naming the file, the key and the value.

Used for model ``config.json`` files (before diffusers/transformers turn a wrong type into a traceback deep
inside a constructor) and for our own YAML configs built from dataclasses (:func:`dataclass_from_dict`).
Only what JSON can hold is checked (``bool``, ``int``, ``float``, ``str``, ``None``, lists for tuples and
lists, dicts, ``Literal`` choices, unions of those); any other annotation is accepted as is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from brushnet.errors import BrushNetError

T = TypeVar("T")


class ConfigTypeError(BrushNetError, ValueError):
    """A config value of the wrong type; the message names the file, the key, the value and the expected type."""


def matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits ``hint`` (lenient for annotations JSON cannot express)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is typing.Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if container in (tuple, list, Sequence):
        if not isinstance(value, list):
            return False
        items = [a for a in args if a is not Ellipsis]
        return not items or all(any(matches(v, a) for a in items) for v in value)
    if container in (dict, Mapping):
        return isinstance(value, dict)
    return True


def describe(hint: Any) -> str:
    """``int``, ``list of int``, ``str or null``, ``one of 'a', 'b'`` ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None) or hint is None:
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if (origin or hint) in (tuple, list, Sequence):
        items = [describe(a) for a in args if a is not Ellipsis]
        return "list of " + " or ".join(dict.fromkeys(items)) if items else "list"
    if (origin or hint) in (dict, Mapping):
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def init_hints(cls: type) -> dict[str, Any]:
    """Type hints of ``cls.__init__``'s parameters (or of the class, for dataclass configs such as
    transformers 5's); empty when they cannot be resolved."""
    # string annotations such as "torch.dtype" name modules the defining module may import lazily
    names = {"torch": "torch", "np": "numpy", "numpy": "numpy"}
    localns = {alias: sys.modules[mod] for alias, mod in names.items() if mod in sys.modules}
    for target in (cls.__init__, cls):
        try:
            hints = typing.get_type_hints(target, localns=localns)
        except Exception:  # unresolvable forward references: try the next, else nothing to check
            continue
        hints.pop("return", None)
        if hints:
            return hints
    return {}


def check_config_file(path: str | os.PathLike, cls: type) -> None:
    """Check every field of a model ``config.json`` that ``cls.__init__`` annotates; the first wrong one
    raises :class:`ConfigTypeError`. A missing or unparsable file is left to the library's own error."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(raw, dict):
        raise ConfigTypeError(f"{path}: expected a JSON object of config fields, got {type(raw).__name__}")
    hints = init_hints(cls)
    for key, value in raw.items():
        if key in hints and not matches(value, hints[key]):
            raise ConfigTypeError(
                f"{path}: field {key!r} = {value!r} ({type(value).__name__}) has the wrong type for "
                f"{cls.__name__}: expected {describe(hints[key])}"
            )


def dataclass_from_dict(cls: type[T], raw: Any, where: str, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys and wrong types raise
    :class:`ConfigTypeError` naming ``where`` (e.g. the file), the dotted key and the value."""
    if not isinstance(raw, dict):
        name = prefix.rstrip(".") or "the top level"
        raise ConfigTypeError(f"{where}: {name} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        section = f"section {prefix.rstrip('.')!r}" if prefix else "the top level"
        raise ConfigTypeError(f"{where}: unknown keys {unknown} in {section} (known: {sorted(known)})")
    values = {}
    for key, value in raw.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = dataclass_from_dict(hint, {} if value is None else value, where, f"{prefix}{key}.")
        elif matches(value, hint):
            values[key] = value
        else:
            raise ConfigTypeError(
                f"{where}: {prefix}{key} = {value!r} ({type(value).__name__}): expected {describe(hint)}"
            )
    return cls(**values)
