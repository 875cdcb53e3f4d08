"""Shared by the stage tests: run a recipe's stage for real and return what it recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.recipe.validate import load_recipe
from align.runner import run_recipe


def run_stage(tmp_path: Path, text: str, stage: str, *overrides: str) -> tuple[dict[str, Any], Path, Path]:
    """Write `text` as a recipe, run it with `overrides`, and return the stage's metrics, its model
    artifact and its folder (the stage must complete)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    manifest = run_recipe(load_recipe(path, list(overrides)), tmp_path / "run", report=lambda _: None)
    record = manifest.record(stage)
    assert record.status == "complete", record.error
    return record.metrics, tmp_path / "run" / record.artifacts.get("model", ""), tmp_path / "run" / stage
