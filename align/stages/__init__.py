"""Stage types. Each is one module exposing:

- `Config`: its typed config schema (a `StageConfig` subclass) — the single source of its defaults;
- `ARTIFACTS`: artifact name → path inside the stage folder (what `${stages.NAME.ARTIFACT}` refers to);
- `check(config, ctx)`: checks that need more than types (data columns, rules, batch arithmetic);
- `output_columns(config)`: columns of its dataset artifact, if it writes one;
- `run(config, ctx)`: does the work, writing only into `ctx.out_dir`; returns key metrics.

Modules are imported lazily so `align validate` stays cheap for stage types a recipe doesn't use.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGE_TYPES: dict[str, str] = {
    "sft": "align.stages.sft",
    "eval": "align.stages.eval",
    "grpo": "align.stages.grpo",
    "reward_model": "align.stages.reward_model",
    "dpo": "align.stages.dpo",
    "kto": "align.stages.kto",
    "ppo": "align.stages.ppo",
    "rejection_sampling": "align.stages.rejection_sampling",
    "distill": "align.stages.distill",
}


def stage_module(stage_type: str) -> ModuleType:
    return importlib.import_module(STAGE_TYPES[stage_type])
