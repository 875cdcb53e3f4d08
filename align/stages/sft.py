"""sft: supervised fine-tuning on demonstrations (also R1's cold start), on TRL's `SFTTrainer`.

Data: conversational `messages`, `prompt`/`completion` (plain or conversational), or `text`.
Prompt-completion data trains on the completion only (TRL's `completion_only_loss`). Full fine-tune
by default; `lora:` switches to LoRA (and `lora.load_in_4bit` to QLoRA). Any other `SFTConfig` key
(`packing`, `lr_scheduler_type`, `neftune_noise_alpha`, …) may be set on the stage as-is.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt

from align.artifacts import StageContext
from align.data import SFT_NEEDS, RowLedger, load_dataset
from align.recipe.checks import CheckContext
from align.recipe.schema import Data, LoraSpec, TrlStageConfig
from align.training import SFT_LAYOUTS, run_sft, sft_layout

ARTIFACTS = {"model": "model"}


class Config(TrlStageConfig):
    trl_config_class: ClassVar[str | None] = "trl:SFTConfig"

    type: Literal["sft"] = "sft"
    dataset: Data
    eval_dataset: Data | None = None
    lora: LoraSpec | None = None
    system_prompt: str | None = Field(default=None, description="Added to conversational prompts that have none.")
    learning_rate: float = Field(default=2e-5, gt=0)
    max_length: PositiveInt | None = 1024
    packing: bool = False


def check(config: Config, ctx: CheckContext) -> None:
    for key, spec in (("dataset", config.dataset), ("eval_dataset", config.eval_dataset)):
        if spec is None:
            continue
        columns = ctx.dataset_columns(spec, (key,))
        if columns is not None and sft_layout(columns) is None:
            wanted = " or ".join("+".join(layout) for layout in SFT_LAYOUTS)
            ctx.error((key, "path"), f"dataset '{spec.path}' needs columns {wanted}; it has: {', '.join(sorted(columns))}")
        ctx.check_rows(spec, (key,), SFT_NEEDS)
    ctx.check_lora(config.lora)
    ctx.check_context(ctx.model_spec(config), config, ("max_length",))


def output_columns(config: Config) -> set[str] | None:
    return None


def run(config: Config, ctx: StageContext) -> dict[str, Any]:
    assert config.model is not None
    ledger = RowLedger()
    train = load_dataset(config.dataset, ctx.base_dir, ctx.seed, need=SFT_NEEDS, ledger=ledger)
    evaluation = (load_dataset(config.eval_dataset, ctx.base_dir, ctx.seed, need=SFT_NEEDS, ledger=ledger, key="eval_dataset")
                  if config.eval_dataset else None)  # fmt: skip
    _, metrics = run_sft(config, ctx, config.model, train, evaluation, lora=config.lora, system_prompt=config.system_prompt)
    return {**metrics, **ledger.metrics()}
