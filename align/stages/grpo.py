"""grpo: R1-Zero-style reinforcement learning on TRL's `GRPOTrainer` — no critic, group-relative
advantages, rule rewards (`reward_rules/`) picked by name with weights and parameters.

Every key a user tunes in GRPO keeps TRL's name (num_generations, temperature, top_p, beta,
loss_type, scale_rewards, epsilon, epsilon_high, mask_truncated_completions, num_iterations,
use_vllm, vllm_mode, …); the most-tuned ones are typed and bounded here, every other `GRPOConfig`
field is accepted as-is. Defaults are TRL's, except bf16/gradient checkpointing, decided per device.

Rewards are rules (`rewards:`) and, optionally, a frozen reward model (`reward_model:`, weighted by
`reward_model_weight`, logged as `reward_model`): the shared scorer's terms, summed by TRL with
their weights.

Logged into metrics.jsonl at every logging step (`train` rows): per-rule mean reward
(`rewards/<rule>/mean`), total reward and its std, the fraction of groups whose rewards all tie
(`frac_reward_zero_std`), KL (when beta > 0), entropy, completion lengths, clip ratios; and a few
sample completions with their scores (`sample` rows). Per-rule failure counts (samples scored None)
go into the manifest.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from align.artifacts import SAMPLE, MetricsWriter, StageContext
from align.data import RowLedger, TokenLimit, chat_prompt, load_dataset, message_text
from align.generation import render_prompt
from align.models import load_tokenizer, load_trainable, materialize_merged, use_stop_tokens
from align.recipe.checks import CheckContext
from align.recipe.schema import Data, LoraSpec, Model, RewardSpec, RuleFailureKnobs, TrlStageConfig
from align.rewards import Scorer, prompt_needs
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
SAMPLES_PER_LOG = 3


class Config(TrlStageConfig, RuleFailureKnobs):
    trl_config_class: ClassVar[str | None] = "trl:GRPOConfig"

    type: Literal["grpo"] = "grpo"
    dataset: Data
    rewards: list[RewardSpec] = Field(default_factory=list, description="Rule rewards (`reward_rules/` names, files, imports).")
    reward_model: Model | None = Field(default=None, description="Frozen sequence-classification reward model.")
    reward_model_weight: float = 1.0
    reward_model_batch_size: PositiveInt = 32
    system_prompt: str | None = Field(default=None, description="Prepended to conversational prompts that lack one.")
    conversational: bool = Field(
        default=True, description="Wrap plain-string prompts as a user message (chat template applies); false keeps raw text."
    )
    max_prompt_length: PositiveInt | None = Field(
        default=None, description="A prompt longer than this many tokens (chat template applied) is a bad row: an error "
        "naming it, or, with the dataset's on_bad_rows: skip, dropped and counted. Never cut.",
    )
    lora: LoraSpec | None = None
    learning_rate: float = Field(default=1e-6, gt=0)
    num_generations: int = Field(default=8, ge=2)
    max_completion_length: PositiveInt = 512
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    beta: float = Field(default=0.0, ge=0, description="KL coefficient (TRL: k3 estimator in the loss); 0 = no reference model.")
    max_kl: float | None = Field(
        default=None, gt=0, description="Stop the stage when the logged KL to the reference (TRL's k3, per token) exceeds this."
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    epsilon: float = Field(default=0.2, gt=0)
    epsilon_high: float | None = Field(default=None, gt=0, description="DAPO clip-higher (e.g. 0.28).")
    mask_truncated_completions: bool = False
    num_iterations: PositiveInt = 1
    use_vllm: bool = False
    vllm_mode: Literal["server", "colocate"] = "colocate"

    @model_validator(mode="after")
    def _needs_a_reward(self) -> Config:
        if not self.rewards and self.reward_model is None:
            raise ValueError("GRPO needs a reward: set rewards, reward_model, or both")
        return self


def check(config: Config, ctx: CheckContext) -> None:
    ctx.require_columns(config.dataset, ("dataset",), {"prompt": "GRPO generates from it"})
    ctx.check_rewards(config.rewards, config.dataset)
    ctx.check_rows(config.dataset, ("dataset",), prompt_needs(config.rewards, ctx.base_dir))
    ctx.check_model(config.reward_model, ("reward_model",))
    ctx.check_lora(config.lora)
    ctx.check_vllm(config.use_vllm)
    ctx.check_context(ctx.model_spec(config), config, ("max_prompt_length", "max_completion_length"))
    if config.max_kl is not None and config.beta == 0:
        ctx.error(("max_kl",), "max_kl needs beta > 0: with beta 0 there is no reference model, and no KL to watch")
    processes = ctx.processes(config)
    steps_per_generation = (config.model_extra or {}).get("steps_per_generation") or config.gradient_accumulation_steps
    generation_batch = config.per_device_train_batch_size * processes * steps_per_generation
    if generation_batch % config.num_generations:
        ctx.error(
            ("per_device_train_batch_size",),
            f"per_device_train_batch_size × processes × steps_per_generation = {generation_batch} completions per "
            f"generation round must be divisible by num_generations ({config.num_generations})",
        )
    if config.epsilon_high is not None and config.epsilon_high < config.epsilon:
        ctx.error(("epsilon_high",), f"epsilon_high ({config.epsilon_high}) must be ≥ epsilon ({config.epsilon})")


def output_columns(config: Config) -> set[str] | None:
    return None


class SampleRecorder:
    """Wraps the reward functions to keep the latest generation round's completions with the scores
    every function gave *them*, so a few can be written out at each logging step (TRL only sends
    them to wandb/rich). A logging step may span several rounds; TRL calls every reward function
    once per round with the same completions, which is how a round is told from the next."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] = {}

    def wrap(self, fn: Any) -> Any:
        recorder = self

        def recorded(completions: list[Any], **kwargs: Any) -> list[float | None]:
            scores = fn(completions, **kwargs)
            if recorder.latest.get("completions") is not completions:  # the first function of a new round
                recorder.latest = {"completions": completions, "prompts": kwargs.get("prompts"), "scores": {}}
            recorder.latest["scores"][fn.__name__] = scores
            return scores

        recorded.__name__ = fn.__name__
        return recorded

    def take(self, count: int) -> list[dict[str, Any]]:
        latest, self.latest = self.latest, {}
        completions = latest.get("completions") or []
        prompts = latest.get("prompts") or [None] * len(completions)
        rows = []
        for i in range(min(count, len(completions))):
            scores = {name: values[i] for name, values in latest.get("scores", {}).items()}
            rows.append({"prompt": message_text(prompts[i]), "completion": message_text(completions[i]), "rewards": scores})
        return rows


def _samples_callback(recorder: SampleRecorder, writer: MetricsWriter) -> Any:
    from transformers import TrainerCallback

    class _Samples(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                for row in recorder.take(SAMPLES_PER_LOG):
                    writer.log(SAMPLE, state.global_step, **row)

    return _Samples()


def _prepare(dataset: Any, config: Config) -> Any:
    if config.conversational or config.system_prompt:
        dataset = dataset.map(lambda row: {"prompt": chat_prompt(row["prompt"], config.system_prompt, config.conversational)})
    return dataset


def prompt_limit(tokenizer: Any, config: Config) -> TokenLimit | None:
    """`max_prompt_length` as a row check: the prompt's tokens as the model sees it (chat template applied)."""
    if not config.max_prompt_length:
        return None

    def count(prompt: Any) -> int:
        return len(tokenizer(render_prompt(tokenizer, chat_prompt(prompt, config.system_prompt, config.conversational)))["input_ids"])

    return TokenLimit("prompt", config.max_prompt_length, "max_prompt_length", count)


def _first_and_last(history: list[dict[str, Any]], key: str) -> dict[str, float]:
    """`first_<key>`/`last_<key>` over the logged steps that have a finite value: TRL logs None for a
    step on which every reward was None, and that must not cost the trained model."""
    values = [float(h[key]) for h in history if isinstance(h.get(key), int | float) and math.isfinite(h[key])]
    return {f"first_{key}": round(values[0], 4), f"last_{key}": round(values[-1], 4)} if values else {}


def run(config: Config, ctx: StageContext) -> dict[str, Any]:
    from trl import GRPOTrainer

    assert config.model is not None
    precision = config.precision()
    tokenizer = load_tokenizer(config.model, padding_side="left")
    ledger = RowLedger()
    need = prompt_needs(config.rewards, ctx.base_dir).limited(prompt_limit(tokenizer, config))
    train = _prepare(load_dataset(config.dataset, ctx.base_dir, ctx.seed, need=need, ledger=ledger), config)
    scorer = Scorer.build(config.rewards, config.reward_model, config.reward_model_weight, base_dir=ctx.base_dir,
                          reward_model_batch_size=config.reward_model_batch_size, precision=precision, seed=ctx.seed,
                          max_rule_failure_rate=config.max_rule_failure_rate,
                          rule_failure_min_samples=config.rule_failure_min_samples)  # fmt: skip
    recorder = SampleRecorder()
    work_dir = ctx.artifact("trainer")
    args = trl_config(config, work_dir, reward_weights=[t.weight for t in scorer.terms])
    start = config.model
    if config.beta > 0 and config.lora is None:
        # TRL rebuilds the KL reference from `config._name_or_path`, which for an adapter merged in
        # memory names the base without the adapter: give it a folder that holds the merged model.
        start = materialize_merged(config.model, work_dir / "start-model", precision)
    trainable = load_trainable(start, config.lora, precision=precision)
    use_stop_tokens(trainable.model, tokenizer, config.model)  # TRL stops and masks completions at these
    trainer = GRPOTrainer(
        model=trainable.model,
        reward_funcs=[recorder.wrap(fn) for fn in scorer.functions],
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=trainable.peft_config,
        callbacks=[metrics_callback(ctx.metrics), _samples_callback(recorder, ctx.metrics), guard_callback(max_kl=config.max_kl)],
    )
    attach_console(trainer, ctx)
    logger.info("grpo: %d prompts, %d generations each, rewards: %s", len(train), config.num_generations,
                ", ".join(f"{t.name}×{t.weight:g}" for t in scorer.terms))
    result = fit(trainer, ctx.metrics.path)
    metrics = {**final_train_metrics(trainer, result), **_first_and_last(trainer.state.log_history, "reward"),
               **scorer.failure_metrics("grpo"), **ledger.metrics()}  # fmt: skip
    save_trained_model(trainer, tokenizer, ctx.artifact(ARTIFACTS["model"]), config.lora, work_dir, config.model)
    return metrics
