"""A rule's parameter checks, stated once, in the rule itself.

Bounds on one parameter go in its annotation, as `annotated_types` constraints (which pydantic
enforces): ``max_penalty: Annotated[float, Le(0)] = -1.0``. A relation between parameters is a function
named after what it checks, whose parameters are the rule parameters it relates, returning a
sentence when they do not fit (None when they do), attached with ``@checks(...)``. The same checks
run in two places: ``align validate`` (through ``param_problems``, before any training) and every
direct call of the rule (a ``ValueError``), so a recipe cannot validate "OK" with a value that
makes the rule fail on every sample.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["checks", "param_problems", "relation_problems"]

Relation = Callable[..., "str | None"]


@functools.cache
def _adapter(annotation: Any) -> Any:
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(annotation)
    except Exception:  # an annotation pydantic cannot model: nothing to check against
        return None


@functools.cache
def _keyword_params(fn: Callable[..., Any]) -> dict[str, tuple[Any, Any]]:
    """Keyword-only parameters → (annotation, default), annotations resolved in the rule's module."""
    target = inspect.unwrap(fn)
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:
        hints = {}
    return {
        name: (hints.get(name, Any), p.default)
        for name, p in inspect.signature(target).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def value_problem(annotation: Any, value: Any, name: str | None = None) -> str | None:
    """Why `value` does not fit `annotation` (its type and any pydantic constraints), or None.
    Strict: "3" is not an int and 1 is not a bool, but 3 is a fine float. A value outside a Literal
    reads "unknown <name> 'x'; expected …"."""
    from pydantic import ValidationError

    adapter = _adapter(annotation) if annotation is not Any else None
    if adapter is None:
        return None
    try:
        adapter.validate_python(value, strict=True)
    except ValidationError as error:
        errors = error.errors()
        if name and len(errors) == 1 and errors[0]["type"] == "literal_error":
            return f"unknown {name} {value!r}; expected {errors[0]['ctx']['expected']}"
        return "; ".join(e["msg"] for e in errors)
    return None


def relation_problems(fn: Callable[..., Any], params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(first parameter named, sentence) for each relation of `fn` that `params` (its defaults
    filled in) breaks. Rules without `@checks` have none."""
    relations: tuple[Relation, ...] = getattr(fn, "__rule_checks__", ())
    if not relations:
        return []
    merged = {name: default for name, (_, default) in _keyword_params(fn).items()} | dict(params)
    problems = []
    for relation in relations:
        names = list(inspect.signature(relation).parameters)
        message = relation(**{name: merged[name] for name in names})
        if message:
            problems.append((names[0], message))
    return problems


def param_problems(fn: Callable[..., Any], params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(parameter, sentence) for every given parameter whose value breaks its annotation, then, when
    each value fits on its own, every broken relation. Unknown names are the caller's business."""
    declared = _keyword_params(fn)
    problems = []
    for key, value in params.items():
        if key in declared and (problem := value_problem(declared[key][0], value, key)):
            problems.append((key, problem))
    return problems or relation_problems(fn, {k: v for k, v in params.items() if k in declared})


def checks(*relations: Relation) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Attach a rule's relations between parameters, and make every call check its parameters (the
    annotation bounds and these relations) before scoring: a ValueError naming the rule, the
    parameter and the reason, the same sentence `align validate` reports."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        names = set(inspect.signature(fn).parameters)

        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            given = {k: v for k, v in kwargs.items() if k in names}
            problems = param_problems(checked, given)
            if problems:
                raise ValueError(f"{fn.__name__}: " + "; ".join(f"{key}: {message}" for key, message in problems))
            return fn(*args, **kwargs)

        checked.__rule_checks__ = relations  # type: ignore[attr-defined]
        return checked

    return decorate
