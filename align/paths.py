"""How a name in a recipe becomes a path on disk. A leaf: imports nothing of align.

One rule for every path a recipe names (datasets, model folders, tokenizers, chat templates, rule
files, accelerate configs): an absolute path is itself; a relative one is looked up from the current
directory first, then beside the recipe (`base_dir`). The orchestrator resolves a stage's paths with
this rule before the stage starts, so a stage process never resolves anything against its own cwd.
"""

from __future__ import annotations

import re
from pathlib import Path

#: `path/to/rules.py:function` (the function part is optional here; the rule resolver insists on it).
RULE_FILE = re.compile(r"^(?P<path>.+?\.py)(?::(?P<attr>[A-Za-z_][\w.]*))?$")


def resolve_user_path(value: str, base_dir: Path) -> Path:
    """The path `value` names: absolute as given, else from the cwd if it exists there, else beside
    the recipe (returned even when it does not exist there either, so errors can name it)."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    beside = base_dir / path
    return beside if beside.exists() else path


def absolute_if_local(value: str, base_dir: Path) -> str:
    """`value` made absolute when it names something that exists on disk; unchanged otherwise
    (hub ids, embedded names, missing files that validation already reported)."""
    path = resolve_user_path(value, base_dir)
    return str(path.resolve()) if path.exists() else value


def absolute_rule(spec: str, base_dir: Path) -> str:
    """A rule spec with its file part made absolute (`rules.py:f` → `/abs/rules.py:f`); names and
    dotted import paths are returned unchanged."""
    match = RULE_FILE.match(spec.strip())
    if not match:
        return spec
    attr = match.group("attr")
    path = absolute_if_local(match.group("path"), base_dir)
    return f"{path}:{attr}" if attr else path
