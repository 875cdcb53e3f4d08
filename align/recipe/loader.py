"""YAML loading that remembers where every key came from, so errors can point at a line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from align.recipe.errors import KeyPath, Problem, RecipeError


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's scalars where 1.1 surprises: `1e-3` is a float (1.1 wants a dot, and
    a learning rate silently arriving as the string "1e-3" is the classic recipe bug), and only
    true/false are booleans (1.1 reads `save_strategy: no` as False, which TRL then rejects)."""


# Own copy of the resolver table without 1.1's yes/no/on/off booleans, then YAML 1.2's true/false.
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)

_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_scalar(text: str) -> Any:
    """Parse one override value the way the recipe file would."""
    return yaml.load(text, Loader=_RecipeLoader) if text.strip() else ""


class LocatedYAML:
    """Plain data loaded from YAML plus the 1-based line of every key path in it."""

    def __init__(self, data: Any, lines: dict[KeyPath, int], source: str):
        self.data = data
        self.lines = lines
        self.source = source

    def line_of(self, path: KeyPath) -> int | None:
        # Fall back to the nearest ancestor: a missing key is best shown at its parent mapping.
        for cut in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:cut]))
            if line is not None:
                return line
        return None


def _construct(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], loader: _RecipeLoader,
               inside: frozenset[int] = frozenset()) -> Any:  # fmt: skip
    lines.setdefault(path, node.start_mark.line + 1)
    if id(node) in inside:  # `a: &x [*x]`: a value that holds itself has no plain form
        raise yaml.constructor.ConstructorError(None, None, "an alias inside its own anchor (a recursive value)",
                                                node.start_mark)
    inside = inside | {id(node)}
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            key = str(key)
            lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _construct(value_node, (*path, key), lines, loader, inside)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*path, i), lines, loader, inside) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def parse_yaml(text: str, source: str) -> LocatedYAML:
    loader: _RecipeLoader | None = None
    try:
        loader = _RecipeLoader(text)  # reads the first characters already: a control character fails here
        node = loader.get_single_node()
        lines: dict[KeyPath, int] = {}
        data = {} if node is None else _construct(node, (), lines, loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(err, "problem", None) or str(err)
        raise RecipeError(source, [Problem((), f"invalid YAML: {problem}", line)]) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise RecipeError(source, [Problem((), "invalid YAML: nested too deeply", None)]) from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        raise RecipeError(source, [Problem((), f"a recipe must be a mapping, got {type(data).__name__}", 1)])
    return LocatedYAML(data, lines, source)


def load_yaml_file(path: str | Path) -> LocatedYAML:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), [Problem((), "recipe file not found")])
    return parse_yaml(path.read_text(encoding="utf-8"), str(path))
