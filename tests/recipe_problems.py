"""Shared by the stage tests: validate recipe text and collect its problems by key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.recipe.errors import RecipeError, format_path
from align.recipe.validate import load_recipe


def recipe_problems(tmp_path: Path, text: str, *overrides: str) -> dict[str, str]:
    """Write `text` as a recipe, apply `overrides`, and return {key path: message} of the RecipeError."""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return {format_path(p.path): p.message for p in info.value.problems}
