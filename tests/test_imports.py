"""align's modules import each other in one direction: cli → runner → validate → launch → execute →
stages → checks → shared mechanics (and the report, chat, tracking, recipe catalog) → recipe schema /
paths / artifacts / console. Imports inside functions and
under TYPE_CHECKING count: they hide a circle from Python, not from a reader."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "align"

#: Rank of each layer; an import may only point at the same rank or a lower one.
LAYERS: list[tuple[int, tuple[str, ...]]] = [
    (8, ("align.cli",)),
    (7, ("align.runner",)),
    (6, ("align.recipe.validate",)),
    (5, ("align.launch",)),
    (4, ("align.execute",)),
    (3, ("align.stages",)),
    (2, ("align.recipe.checks",)),
    (1, ("align.models", "align.data", "align.generation", "align.rewards", "align.training", "align.rl",
         "align.tracking", "align.report", "align.chat", "align.catalog", "align.launch_config")),
    (0, ("align.paths", "align.precision", "align.preempt", "align.checkpoints", "align.artifacts", "align.console", "align.embedded", "align.recipe")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The align modules `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from align import artifacts` imports the module align.artifacts, not just the package.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def rank(name: str) -> int:
    if name == "align":  # the package itself: its version
        return 0
    for layer_rank, prefixes in LAYERS:
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return layer_rank
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_imports_inside_functions_and_finds_circles(tmp_path: Path) -> None:
    source = "def f():\n    from align.runner import plan\n    import align.models\n"
    path = PACKAGE / "stages" / "sft.py"  # only its package matters for relative imports
    tree_file = tmp_path / "m.py"
    tree_file.write_text(source)
    known = set(modules())
    assert imports_of("align.stages.sft", tree_file, known) == {"align.runner", "align.models"}
    assert imports_of("align.stages.sft", path, known)  # the real module imports something
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle() -> None:
    assert cycles(graph()) == []


def test_imports_point_down_the_layers() -> None:
    upward = [f"{src} → {dst}" for src, targets in graph().items() for dst in sorted(targets) if rank(dst) > rank(src)]
    assert upward == []


def test_no_stage_imports_another_stage() -> None:
    stage_edges = [f"{src} → {dst}" for src, targets in graph().items() if src.startswith("align.stages.")
                   for dst in targets if dst.startswith("align.stages")]
    assert stage_edges == []


def test_benchmark_scripts_import_names_that_exist() -> None:
    """The benchmarks run by hand, not in CI: an import of a name align no longer has must fail here."""
    import importlib

    missing = []
    for script in sorted((PACKAGE.parent / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("align"):
                module = importlib.import_module(node.module)
                missing += [f"{script.name}: {node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)]
    assert missing == []
