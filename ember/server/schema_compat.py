"""Requests as JSON Schema reads them: an integral number such as `0.0` IS an integer there
(and so in /openapi.json), while pydantic's strict mode rejects it. `_Request` models run
`integral_floats` first so such values are taken as the integers they are; every other type
stays strict (no "1" -> 1 coercion)."""

from __future__ import annotations

import types
import typing
from functools import cache
from typing import Any, get_args, get_origin

from pydantic import BaseModel


def _mentions_int(annotation: Any) -> bool:
    if annotation is int:
        return True
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return _mentions_int(get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, tuple, typing.Literal):
        return origin is not typing.Literal and any(_mentions_int(a) for a in get_args(annotation))
    return False


@cache
def _int_fields(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(f.alias or name for name, f in model.model_fields.items()
                     if _mentions_int(f.annotation))


def _to_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, list):
        return [_to_int(v) for v in value]
    return value


def integral_floats(model: type[BaseModel], data: Any) -> Any:
    """`data` with integral floats of the model's integer fields (and lists of them) as ints."""
    if not isinstance(data, dict):
        return data
    fields = _int_fields(model)
    if not fields or not any(k in fields for k in data):
        return data
    return {k: _to_int(v) if k in fields else v for k, v in data.items()}
