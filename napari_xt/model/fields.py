"""Frozen dataclasses from plain mappings (JSON, YAML, checkpoint headers): one strict reader.

`from_mapping(cls, data, where=None)` builds dataclass `cls` from the mapping `data`:

- a non-mapping is a ValueError naming `where` (or the class);
- unknown keys are a ValueError listing them and the known fields;
- a field whose type hint is a dataclass (or ``X | None`` with a mapping value) is built
  recursively from its mapping; an instance of that dataclass is kept as it is;
- lists become tuples (recursively) except in fields whose hint is a list; other values
  (dicts, scalars) are passed on unchanged, and the dataclass checks them itself.

`check_fields(cls, keys, where=None)` is the unknown-key check alone (for overrides applied
with `dataclasses.replace`).

Error messages: with `where` (a dotted path such as ``config.optim``) they read
``config.optim: unknown keys ['stepz']; known: [...]``; without it they name the class:
``unknown XTConfig fields: ['bogus']; known: [...]``. Nested fields extend `where` with their
name (``config.data.normalize``) when it is given.

This module imports nothing from napari_xt (and neither torch nor timm), so `model` and
`train` can both use it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["check_fields", "from_mapping"]


def from_mapping(
    cls: type[T],
    data: Any,
    where: str | None = None,
    *,
    none_is_empty: bool = False,
) -> T:
    """Dataclass `cls` from mapping `data` (see the module docstring for the rules).

    `none_is_empty`: a None value for a nested dataclass field whose hint does not allow None
    builds that field's defaults, as an empty YAML section (``run:``) does; applies at every
    depth. Without it such a None is refused like any other non-mapping.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_mapping needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    check_fields(cls, data, where)
    hints = _hints(cls)
    values = {}
    for key, value in data.items():
        sub, optional, is_list = _kind(hints.get(key))
        if sub is not None and not isinstance(value, sub):
            if value is None and optional:
                values[key] = None
                continue
            if value is None and none_is_empty:
                value = {}
            child = None if where is None else f"{where}.{key}"
            values[key] = from_mapping(sub, value, child, none_is_empty=none_is_empty)
        elif is_list:
            values[key] = value
        else:
            values[key] = _tupleize(value)
    return cls(**values)


def check_fields(cls: type, keys: Iterable[str], where: str | None = None) -> None:
    """ValueError when `keys` holds names that are not fields of dataclass `cls`."""
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(keys) - set(known), key=str)
    if not unknown:
        return
    if where is None:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}; known: {known}")
    raise ValueError(f"{where}: unknown keys {unknown}; known: {known}")


def _tupleize(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupleize(v) for v in value)
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of `cls`'s fields (string annotations evaluated)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def _kind(hint: Any) -> tuple[type | None, bool, bool]:
    """(nested dataclass or None, whether None is allowed, whether the hint is a list)."""
    if hint is None:
        return None, False, False
    arms = typing.get_args(hint) if _is_union(hint) else (hint,)
    optional = any(a is type(None) for a in arms)
    is_list = any(a is list or typing.get_origin(a) is list for a in arms)
    nested = [a for a in arms if isinstance(a, type) and dataclasses.is_dataclass(a)]
    return (nested[0] if len(nested) == 1 else None), optional, is_list


def _is_union(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    return origin is typing.Union or origin is types.UnionType
