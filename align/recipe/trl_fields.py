"""What a TRL config dataclass accepts: field names and types, read from TRL itself, so a stage passes
every `SFTConfig`/`GRPOConfig`/… key through under TRL's own name and checks its type up front."""

from __future__ import annotations

import dataclasses
import importlib
import typing
from functools import cache
from typing import Any

from pydantic import TypeAdapter


def config_class(dotted: str) -> type:
    """The class a `"module:Class"` name points at (e.g. `"trl:SFTConfig"`)."""
    module_name, _, class_name = dotted.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


@cache
def trl_config_fields(dotted: str) -> dict[str, Any]:
    """Field name → type of a TRL config dataclass (e.g. `"trl:SFTConfig"`)."""
    cls = config_class(dotted)
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


@cache
def field_adapter(annotation: Any) -> TypeAdapter[Any] | None:
    """A pydantic validator for one TRL field type, or None where pydantic cannot model it."""
    try:
        return TypeAdapter(annotation)
    except Exception:  # some TRL field types (enums of enums, callables) have no pydantic schema
        return None
