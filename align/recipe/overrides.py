"""Dotted command-line overrides: `stages.sft.lora.r=16`, `stages.0.learning_rate=1e-4`, `seed=3`.

A path segment under `stages` may be a stage's name or its index; list values use YAML syntax
(`stages.grpo.rewards=[{rule: accuracy}]`). Keys that do not exist yet are created, so a typo
is still caught by validation ("unknown key … did you mean").
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from align.recipe.errors import KeyPath, Problem, did_you_mean, format_path
from align.recipe.loader import parse_scalar


class OverrideError(ValueError):
    pass


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise OverrideError(f"override '{text}' is not of the form key.path=value")
    try:
        return key.split("."), parse_scalar(value)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise OverrideError(f"the value of override '{text}' is not valid YAML: {problem}") from None


def _list_index(items: list[Any], segment: str, path: KeyPath) -> int:
    if re.fullmatch(r"-?[0-9]+", segment):  # not str.isdigit(): it takes "²", which int() does not
        index = int(segment)
        if not -len(items) <= index < len(items):
            raise OverrideError(f"{format_path(path)}: index {index} out of range (list has {len(items)} items)")
        return index % len(items)
    names = [item.get("name") for item in items if isinstance(item, dict)]
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == segment:
            return i
    hint = did_you_mean(segment, [n for n in names if isinstance(n, str)])
    raise OverrideError(f"{format_path(path)}: no item named '{segment}'{hint}")


def apply_override(data: dict[str, Any], keys: list[str], value: Any) -> KeyPath:
    """Set `value` at `keys` inside `data` (in place); return the resolved key path."""
    node: Any = data
    path: KeyPath = ()
    for depth, segment in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            index = _list_index(node, segment, path)
            path = (*path, index)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            path = (*path, segment)
            if last:
                node[segment] = value
            else:
                if node.get(segment) is None:
                    node[segment] = {}
                node = node[segment]
        else:
            raise OverrideError(f"{format_path(path)} is a {type(node).__name__}, it has no key '{segment}'")
    return path


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> list[Problem]:
    """Apply every override; problems are collected rather than raised so all are reported."""
    problems: list[Problem] = []
    for text in overrides:
        try:
            keys, value = parse_override(text)
            apply_override(data, keys, value)
        except OverrideError as err:
            problems.append(Problem(("<override>",), f"{err} (in '{text}')"))
    return problems
