"""reward_model: a Bradley–Terry reward model on TRL's `RewardTrainer` (sequence-classification head).

Data, in either layout (plain text or conversational):
- pairs: `chosen`/`rejected`, with an optional `prompt` column (explicit prompt; ignored when it is
  text while `chosen`/`rejected` are whole conversations that already contain it) and an optional
  `margin` column (TRL then trains on −log σ(r_chosen − r_rejected − margin));
- rankings: `prompt` plus a list column (`ranking_column`, default `ranking`) of k ≥ 2 responses
  ordered best → worst, expanded into all C(k, 2) pairs as InstructGPT did.

One prompt must not dominate training just because it came with more responses. InstructGPT puts
all C(k, 2) pairs of a prompt into one batch element; that needs its own collator and loss in place
of TRL's. We keep TRL's data path and weight each expanded pair by 1/C(k, 2) instead
(`pair_weighting: per_prompt`, rescaled so the mean weight is 1, which keeps the logged loss
comparable to plain pairs), so every prompt carries the same total weight per epoch wherever its
pairs land; `per_pair` gives every pair weight 1 (plain TRL). The weighted loss is the batch mean of
wᵢ·(−log σ(Δᵢ − marginᵢ)); with all weights 1 it equals TRL's own loss.

Init from the SFT stage's model (`model: ${stages.sft.model}`): a causal LM gets a fresh scalar head.
`lora:` trains an adapter (the head is always trained in full). After training, the held-out
`eval_dataset` gives `eval_accuracy` (share of pairs with r_chosen > r_rejected) and `eval_margin`
(mean r_chosen − r_rejected). The `model` artifact loads with
`AutoModelForSequenceClassification.from_pretrained` (an adapter folder when LoRA is not merged).
Any other `RewardConfig` key (`center_rewards_coefficient`, `per_device_eval_batch_size`, …) may be
set on the stage as-is.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt

from align.artifacts import EVAL, StageContext
from align.data import PairWeighting, RowLedger, load_dataset, preference_needs, prepare_preference_pairs
from align.models import load_tokenizer, load_trainable
from align.recipe.checks import CheckContext
from align.recipe.schema import Data, LoraSpec, TrlStageConfig
from align.training import (
    attach_console,
    final_train_metrics,
    fit,
    guard_callback,
    metrics_callback,
    save_trained_model,
    trl_config,
)

logger = logging.getLogger("align")

ARTIFACTS = {"model": "model"}


class Config(TrlStageConfig):
    trl_config_class: ClassVar[str | None] = "trl:RewardConfig"

    type: Literal["reward_model"] = "reward_model"
    dataset: Data
    eval_dataset: Data | None = Field(default=None, description="Held-out pairs for accuracy and margin.")
    lora: LoraSpec | None = None
    system_prompt: str | None = Field(default=None, description="Added to conversational prompts that have none.")
    ranking_column: str = Field(default="ranking", description="List column of responses ordered best → worst.")
    pair_weighting: PairWeighting = Field(
        default="per_prompt", description="Rankings: weight each pair 1/C(k,2) (per_prompt) or 1 (per_pair)."
    )
    learning_rate: float = Field(default=1e-5, gt=0)
    max_length: PositiveInt | None = 1024


def check(config: Config, ctx: CheckContext) -> None:
    ctx.check_preference_data(config.dataset, ("dataset",), config.ranking_column)
    ctx.check_preference_data(config.eval_dataset, ("eval_dataset",), config.ranking_column)
    ctx.check_lora(config.lora)
    ctx.check_context(ctx.model_spec(config), config, ("max_length",))


def output_columns(config: Config) -> set[str] | None:
    return None


def _prepare(dataset: Any, config: Config) -> Any:
    """Pairs with only the columns TRL reads (plus `margin` and, for rankings, `weight`)."""
    return prepare_preference_pairs(dataset, ranking_column=config.ranking_column, weighting=config.pair_weighting,
                                    keep=("margin",), system_prompt=config.system_prompt)


def _weighted_trainer(**kwargs: Any) -> Any:
    """TRL's `RewardTrainer` that also reads an optional per-pair `weight` column."""
    from dataclasses import dataclass

    import torch
    import torch.nn.functional as F
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    @dataclass
    class WeightedCollator(DataCollatorForPreference):
        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = super().torch_call(examples)
            if "weight" in examples[0]:
                batch["weight"] = torch.tensor([e["weight"] for e in examples], dtype=torch.float)
            return batch

    class WeightedRewardTrainer(RewardTrainer):
        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            if "weight" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "weight"]

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            weight = inputs.pop("weight", None)
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            if weight is not None:
                # Same forward pass, same TRL metrics; only the loss is reweighted.
                chosen, rejected = outputs.logits.squeeze(-1).chunk(2)
                margin = inputs.get("margin", 0.0)
                loss = (weight * -F.logsigmoid(chosen - rejected - margin)).mean()
                if self.args.center_rewards_coefficient is not None:
                    loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
            return (loss, outputs) if return_outputs else loss

    tokenizer = kwargs["processing_class"]
    collator = WeightedCollator(pad_token_id=tokenizer.pad_token_id)
    return WeightedRewardTrainer(data_collator=collator, **kwargs)


def pairwise_metrics(trainer: Any) -> dict[str, Any]:
    """Exact held-out pairwise accuracy and mean margin over the trainer's (prepared) eval set."""
    import torch

    model = trainer.model
    was_training = model.training
    model.eval()
    differences = []
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            batch = trainer._prepare_inputs(batch)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            chosen, rejected = logits.squeeze(-1).float().chunk(2)
            differences.append(trainer.accelerator.gather_for_metrics(chosen - rejected))
    model.train(was_training)
    diff = torch.cat(differences)
    return {
        "eval_accuracy": round(float((diff > 0).float().mean()), 4),
        "eval_margin": round(float(diff.mean()), 4),
        "eval_pairs": int(diff.numel()),
    }


def run(config: Config, ctx: StageContext) -> dict[str, Any]:
    assert config.model is not None
    ledger = RowLedger()  # rows dropped under on_bad_rows: skip
    need = preference_needs(config.ranking_column)
    train = _prepare(load_dataset(config.dataset, ctx.base_dir, ctx.seed, need=need, ledger=ledger), config)
    evaluation = (_prepare(load_dataset(config.eval_dataset, ctx.base_dir, ctx.seed, need=need, ledger=ledger,
                                        key="eval_dataset"), config) if config.eval_dataset else None)  # fmt: skip
    tokenizer = load_tokenizer(config.model, padding_side="right")
    work_dir = ctx.artifact("trainer")
    args = trl_config(config, work_dir)  # first: ZeRO-3 partitions only models loaded after it
    trainable = load_trainable(config.model, config.lora, precision=config.precision(), task="sequence_classification",
                               seed=ctx.seed)  # fmt: skip
    trainable.model.config.pad_token_id = tokenizer.pad_token_id
    trainer = _weighted_trainer(
        model=trainable.model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=trainable.peft_config,
        callbacks=[metrics_callback(ctx.metrics), guard_callback()],
    )
    attach_console(trainer, ctx)
    logger.info("reward_model: %d pairs, %s", len(train), "LoRA" if config.lora else "full fine-tune")
    result = fit(trainer, ctx.metrics.path)
    metrics = {**final_train_metrics(trainer, result), **ledger.metrics()}
    if evaluation is not None:
        held_out = pairwise_metrics(trainer)
        metrics.update(held_out)
        if trainer.is_world_process_zero():
            ctx.metrics.log(EVAL, int(trainer.state.global_step), **held_out)
    save_trained_model(trainer, tokenizer, ctx.artifact(ARTIFACTS["model"]), config.lora, work_dir, config.model)
    return metrics
