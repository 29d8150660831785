"""Config entries whose model comes from a registry (act.core.registry): a stage of `stages:`, a loss of
`distill.losses`. The entry's `type` picks the registered config model; its errors keep their full key path."""

from __future__ import annotations

from typing import Any, Tuple, Type

from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from act.core.registry import Registry


def validate_entry(registry: Registry, data: Any, default: Type[BaseModel], loc: Tuple) -> Any:
    """`data` (a dict with `type`) validated as the config model registered for its type (`default` where the entry
    declared none); a model instance passes through. Errors are raised with `loc` in front of their own paths."""
    if isinstance(data, BaseModel) or not isinstance(data, dict):
        return data
    kind = data.get("type")
    if kind is None or kind not in registry:
        detail = ("missing required key" if kind is None else f"unknown {registry.what} {kind!r}; "
                  f"{registry.expected()}")
        raise _error(default, [InitErrorDetails(type=PydanticCustomError("registered", detail), loc=(*loc, "type"),
                                                input=kind)])
    try:
        return registry.config(kind, default).model_validate(data)
    except ValidationError as e:
        raise _error(default, [InitErrorDetails(type=d["type"], loc=(*loc, *d["loc"]), input=d.get("input"),
                                                ctx=d.get("ctx", {})) if d["type"] not in ("value_error",) else
                               InitErrorDetails(type=PydanticCustomError("value_error", d["msg"]),
                                                loc=(*loc, *d["loc"]), input=d.get("input"))
                               for d in e.errors()]) from None


def _error(model: Type[BaseModel], details) -> ValidationError:
    return ValidationError.from_exception_data(model.__name__, details)
