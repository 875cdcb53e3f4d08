"""The recipes that ship with align, as starting points: `align recipes` lists them, `align recipes copy
NAME [DEST]` copies one to edit (torchtune's `tune cp`).

They live in the top-level `recipes/` folder and ship in the wheel as package data (`align._recipes`,
mapped onto that folder in pyproject), with the Accelerate configs they name (`align._accelerate_configs`
from `accelerate_configs/`). From a checkout or an editable install the folders are read where they are."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.recipe.errors import did_you_mean

PACKAGE = Path(__file__).resolve().parent


def _shipped(installed: str, checkout: str) -> Path:
    """A data folder: the installed package's copy (a wheel puts it inside `align/`), else the
    checkout's own (an editable install or the source tree, where the mapped package is not a folder)."""
    inside = PACKAGE / installed
    return inside if inside.is_dir() else PACKAGE.parent / checkout


def recipes_dir() -> Path:
    return _shipped("_recipes", "recipes")


def accelerate_configs_dir() -> Path:
    return _shipped("_accelerate_configs", "accelerate_configs")


@dataclass(frozen=True)
class ShippedRecipe:
    name: str
    path: Path
    summary: str  # its first comment line that is not the `# Run: …` line


def _summary(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text and not text.startswith("Run:"):
            return text
    return ""


def shipped_recipes() -> list[ShippedRecipe]:
    return [ShippedRecipe(p.stem, p, _summary(p)) for p in sorted(recipes_dir().glob("*.yaml"))]


def find_recipe(name: str) -> ShippedRecipe:
    recipes = {r.name: r for r in shipped_recipes()}
    stem = name.removesuffix(".yaml").removesuffix(".yml")
    if stem not in recipes:
        raise ValueError(f"no shipped recipe '{name}'{did_you_mean(stem, list(recipes))}; "
                         f"shipped: {', '.join(recipes) or 'none'}")  # fmt: skip
    return recipes[stem]


def _config_files(value: Any) -> list[str]:
    """Every `config_file:` value inside a recipe (launchers name their Accelerate configs so)."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "config_file" and isinstance(item, str):
                found.append(item)
            else:
                found += _config_files(item)
    elif isinstance(value, list):
        for item in value:
            found += _config_files(item)
    return found


def copy_recipe(name: str, dest: str | Path | None = None, *, force: bool = False) -> list[Path]:
    """Copy shipped recipe `name` to `dest` (a file, or a folder to copy it into; default: the current
    folder), with the shipped Accelerate configs it names beside it so it validates where it lands.
    Returns the files written; an existing recipe file is kept unless `force`, an existing config always."""
    import yaml

    recipe = find_recipe(name)
    target = Path(dest) if dest is not None else Path.cwd()
    if target.is_dir() or (dest is not None and str(dest).endswith(("/", "\\"))):
        target = target / recipe.path.name
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(recipe.path, target)
    written = [target]
    shipped_configs = accelerate_configs_dir()
    for config in _config_files(yaml.safe_load(recipe.path.read_text(encoding="utf-8"))):
        source = shipped_configs / Path(config).name
        landing = target.parent / config
        if Path(config).is_absolute() or not source.is_file() or landing.exists():
            continue
        landing.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, landing)
        written.append(landing)
    return written
