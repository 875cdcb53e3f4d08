"""kto: preference optimisation from answers labelled good or bad, on TRL's `KTOTrainer` (Ethayarajh et
al. 2024: Kahneman–Tversky optimisation; `loss_type: apo_zero_unpaired` is APO-zero's unpaired form).
Every `KTOConfig` key keeps TRL's name (`beta`, `desirable_weight`, `undesirable_weight`,
`precompute_ref_log_probs`, `max_length`, …); the most-tuned are typed and bounded here.

Data: unpaired — `prompt`, `completion`, `label` (True: desirable) — or the pairs every pairwise stage
reads (`chosen`/`rejected`, optional `prompt`; one preparation, `align.data.prepare_preference_pairs`),
which TRL splits into one desirable and one undesirable example each. Rankings are refused: a
response in the middle of a ranking is both better and worse than others, so it has no one label.

The reference is the stage's starting model, decided as in the dpo stage (`align.training.frozen_reference`):
the adapter disabled with `lora:`, a frozen copy loaded like the policy for a full fine-tune (TRL
would rebuild an adapter-merged model's base from `_name_or_path`), none with precomputed log-probs.
KTO estimates its KL term from completions rotated within each batch, so it needs at least two per
device and TRL's sequential sampler.

Held-out figures (`eval_dataset`), before and after training, are TRL's own evaluation (batch means):
`eval_reward_chosen_*` and `eval_reward_rejected_*` (mean implicit reward β·log(π/π_ref) of the
desirable and of the undesirable answers; 0 before training, when the policy is its reference), their
difference `eval_reward_margin_*`, and `eval_kl_*`. The manifest records the world size and mixed precision the trainer ran with.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt

from align.artifacts import StageContext
from align.data import (
    Layout,
    Needs,
    RowLedger,
    load_dataset,
    preference_layout,
    preference_needs,
    prepare_preference_pairs,
    with_system_prompt,
)
from align.recipe.checks import CheckContext
from align.recipe.schema import Data, DataSpec, LoraSpec, TrlStageConfig
from align.training import fit, preference_trainer, run_metrics, save_trained_model

logger = logging.getLogger("align")

ARTIFACTS = {"model": "model"}
UNPAIRED = ("prompt", "completion", "label")
#: Every row: an answer and its label, or a pair (the layouts `_layout` tells apart, in its order).
NEEDS = Needs((Layout({"prompt": "prompt", "completion": "completion", "label": "label"}), preference_needs().layouts[0]))
#: TRL's evaluation figures reported before and after training, under align's names.
HELD_OUT = {"eval_rewards/chosen": "eval_reward_chosen", "eval_rewards/rejected": "eval_reward_rejected",
            "eval_kl": "eval_kl"}  # fmt: skip


class Config(TrlStageConfig):
    trl_config_class: ClassVar[str | None] = "trl:KTOConfig"

    type: Literal["kto"] = "kto"
    dataset: Data = Field(description="prompt/completion/label, or chosen/rejected pairs.")
    eval_dataset: Data | None = Field(default=None, description="Held-out examples, in either layout.")
    lora: LoraSpec | None = None
    system_prompt: str | None = Field(default=None, description="Added to conversational prompts that have none.")
    learning_rate: float = Field(default=1e-6, gt=0)
    beta: float = Field(default=0.1, gt=0)
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    desirable_weight: float = Field(default=1.0, gt=0)
    undesirable_weight: float = Field(default=1.0, gt=0)
    precompute_ref_log_probs: bool = False
    max_length: PositiveInt | None = 1024


def _layout(columns: set[str]) -> str | None:
    if set(UNPAIRED) <= columns:
        return "unpaired"
    return "pairs" if preference_layout(columns) == "pairs" else None


def _check_data(spec: DataSpec | None, key: str, ctx: CheckContext) -> None:
    columns = ctx.dataset_columns(spec, (key,)) if spec is not None else None
    if spec is not None and columns is not None and _layout(columns) is None:
        ranked = " (a ranking gives no answer one label: expand it into pairs first)" if "ranking" in columns else ""
        ctx.error((key, "path"), f"dataset '{spec.path}' needs columns prompt+completion+label (unpaired) or "
                  f"chosen+rejected (pairs){ranked}; it has: {', '.join(sorted(columns))}")


def check(config: Config, ctx: CheckContext) -> None:
    _check_data(config.dataset, "dataset", ctx)
    _check_data(config.eval_dataset, "eval_dataset", ctx)
    for key in ("dataset", "eval_dataset"):
        ctx.check_rows(getattr(config, key), (key,), NEEDS)
    ctx.check_lora(config.lora)
    extra = config.model_extra or {}
    if config.loss_type == "kto" and config.per_device_train_batch_size < 2:
        ctx.error(("per_device_train_batch_size",), "KTO estimates its KL term from the other completions of a "
                  "batch: per_device_train_batch_size must be at least 2")
    if config.loss_type == "kto" and extra.get("train_sampling_strategy", "sequential") != "sequential":
        ctx.error(("train_sampling_strategy",), "KTO's KL completions are fixed per batch at data preparation; "
                  "only the sequential sampler keeps them with their batch")
    if extra.get("sync_ref_model") and (config.lora is not None or config.precompute_ref_log_probs):
        ctx.error(("sync_ref_model",), "sync_ref_model needs a reference copy to update: not with lora, not with "
                  "precompute_ref_log_probs")


def output_columns(config: Config) -> set[str] | None:
    return None


def _prepare(dataset: Any, config: Config) -> Any:
    if _layout(set(dataset.column_names)) == "pairs":
        return prepare_preference_pairs(dataset, weighting=None, system_prompt=config.system_prompt)
    dataset = dataset.select_columns(list(UNPAIRED))
    if config.system_prompt and isinstance(dataset[0]["prompt"], list):
        dataset = dataset.map(lambda row: {"prompt": with_system_prompt(row["prompt"], config.system_prompt)})
    return dataset


def build_trainer(config: Config, ctx: StageContext, ledger: RowLedger | None = None) -> Any:
    """The KTOTrainer for this stage, not yet trained (rows skipped under on_bad_rows: skip counted in `ledger`)."""
    from trl import KTOTrainer

    assert config.model is not None
    train = _prepare(load_dataset(config.dataset, ctx.base_dir, ctx.seed, need=NEEDS, ledger=ledger), config)
    evaluation = None
    if config.eval_dataset is not None:
        evaluation = _prepare(load_dataset(config.eval_dataset, ctx.base_dir, ctx.seed, need=NEEDS, ledger=ledger,
                                           key="eval_dataset"), config)  # fmt: skip
    return preference_trainer(KTOTrainer, config, ctx, train, evaluation)


def _held_out(trainer: Any) -> dict[str, float]:
    figures = trainer.evaluate()
    held_out = {name: round(float(figures[key]), 4) for key, name in HELD_OUT.items() if key in figures}
    if {"eval_reward_chosen", "eval_reward_rejected"} <= set(held_out):
        # TRL logs a margin only for batches holding both kinds, and unpaired pairs come in two runs.
        held_out["eval_reward_margin"] = round(held_out["eval_reward_chosen"] - held_out["eval_reward_rejected"], 4)
    return held_out


def run(config: Config, ctx: StageContext) -> dict[str, Any]:
    ledger = RowLedger()
    trainer = build_trainer(config, ctx, ledger)
    logger.info("kto: %d examples, loss %s, beta %g, %s, %d process(es)", len(trainer.train_dataset),
                config.loss_type, config.beta, "LoRA" if config.lora else "full fine-tune",
                trainer.accelerator.num_processes)  # fmt: skip
    before = _held_out(trainer) if trainer.eval_dataset is not None else {}
    metrics = {**run_metrics(trainer, fit(trainer, ctx.metrics.path)), **ledger.metrics()}
    if trainer.eval_dataset is not None:
        after = _held_out(trainer)
        for key in after:  # (both evaluations are also `eval` rows in metrics.jsonl, under TRL's names)
            metrics[f"{key}_before"], metrics[f"{key}_after"] = before.get(key), after[key]
    save_trained_model(trainer, trainer.processing_class, ctx.artifact(ARTIFACTS["model"]), config.lora,
                       ctx.artifact("trainer"), config.model)  # fmt: skip
    return metrics
