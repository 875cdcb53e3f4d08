"""A stage type for runner tests: no model, instant, counts its runs, can fail or hang mid-write."""

from __future__ import annotations

import time
from typing import Any, Literal

from align.recipe.schema import Data, StageConfig

ARTIFACTS = {"model": "out.txt"}
RUNS: list[str] = []


class Config(StageConfig):
    type: Literal["fake"] = "fake"
    value: int = 0
    fail: bool = False
    hang: bool = False
    sleep_s: float = 0.0  # works this long (signals do not stop it: it has no step boundary)
    source: str | None = None
    dataset: Data | None = None


def check(config: Config, ctx: Any) -> None:
    pass


def output_columns(config: Config) -> set[str] | None:
    return None


def run(config: Config, ctx: Any) -> dict[str, Any]:
    RUNS.append(config.name)
    out = ctx.artifact("out.txt")
    with out.open("w") as fh:
        fh.write(f"partial {config.value}")
        fh.flush()
        if config.fail:
            raise RuntimeError("boom mid-write")
        if config.hang or config.sleep_s:
            (ctx.out_dir / "started").touch()
            time.sleep(600 if config.hang else config.sleep_s)
        fh.write(f" source={config.source}")
    return {"value": config.value}
