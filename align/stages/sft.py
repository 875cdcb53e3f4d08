"""sft: supervised fine-tuning on demonstrations (also R1's cold start), on TRL's `SFTTrainer`.

Data: conversational `messages`, `prompt`/`completion` (plain or conversational), or `text`.
Prompt-completion data trains on the completion only (TRL's `completion_only_loss`). Full fine-tune
by default; `lora:` switches to LoRA (and `lora.load_in_4bit` to QLoRA). Any other `SFTConfig` key
(`packing`, `lr_scheduler_type`, `neftune_noise_alpha`, …) may be set on the stage as-is.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, PositiveInt

from align.recipe.schema import Data, LoraSpec, StageConfig, TrainingKnobs
from align.recipe.validate import CheckContext
from align.training import SFT_LAYOUTS
from align.training import prepare_sft_dataset as _prepare

logger = logging.getLogger("align")

ARTIFACTS = {"model": "model"}
#: Column layouts SFT understands, in the order they are tried (shared with distill).
LAYOUTS = SFT_LAYOUTS


class Config(StageConfig, TrainingKnobs):
    model_config = ConfigDict(extra="allow", validate_assignment=True)
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
        if columns is not None and not any(set(layout) <= columns for layout in LAYOUTS):
            wanted = " or ".join("+".join(layout) for layout in LAYOUTS)
            ctx.error((key, "path"), f"dataset '{spec.path}' needs columns {wanted}; it has: {', '.join(sorted(columns))}")
    if config.lora is not None and config.lora.load_in_4bit and ctx.check_models:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            ctx.error(("lora", "load_in_4bit"), "QLoRA needs the 'bitsandbytes' package (and a GPU)")


def output_columns(config: Config) -> set[str] | None:
    return None


def run(config: Config, ctx: Any) -> dict[str, Any]:
    from trl import SFTTrainer

    from align.data import load_dataset
    from align.models import load_causal_lm, load_tokenizer, peft_config, quantization_config
    from align.training import final_train_metrics, metrics_callback, save_trained_model, trl_config

    assert config.model is not None
    train = _prepare(load_dataset(config.dataset, ctx.base_dir, ctx.seed), config.system_prompt)
    evaluation = (
        _prepare(load_dataset(config.eval_dataset, ctx.base_dir, ctx.seed), config.system_prompt)
        if config.eval_dataset
        else None
    )
    tokenizer = load_tokenizer(config.model, padding_side="right")
    model = load_causal_lm(config.model, quantization=quantization_config(config.lora))
    if config.lora is not None and config.lora.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    work_dir = ctx.artifact("trainer")
    args = trl_config(config, work_dir, eval_strategy="steps" if evaluation is not None else "no")
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config(config.lora) if config.lora else None,
        callbacks=[metrics_callback(ctx.metrics)],
    )
    logger.info("sft: %d examples, %s", len(train), "LoRA" if config.lora else "full fine-tune")
    result = trainer.train()
    metrics = final_train_metrics(trainer, result)
    if evaluation is not None:
        metrics["eval_loss"] = round(float(trainer.evaluate()["eval_loss"]), 5)
    save_trained_model(trainer, tokenizer, ctx.artifact(ARTIFACTS["model"]), config.lora, work_dir)
    return metrics
