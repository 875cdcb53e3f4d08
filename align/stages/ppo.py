"""ppo: RLHF with PPO (InstructGPT's third step), align's own loop on Accelerate and plain PyTorch.

TRL 1.16 ships no PPO, so this is ours: one file that reads top to bottom. All loss and advantage
math comes from `align.rl.functional`. Key names follow TRL ≤1.12's `PPOConfig`, so a TRL PPO recipe
ports nearly 1:1 (`response_length` may also be written `max_completion_length`).

Models
- actor: the policy (`model`, default the recipe's model); `lora:` trains an adapter on it, and the
  reference is then the same network with the adapter disabled (no second copy in memory);
- reference: a frozen copy of the starting policy (the KL anchor);
- critic: a sequence-classification model whose head, applied at every position, gives V(s_t).
  Initialised from `value_model`, else from the reward model (as TRL and InstructGPT do: it already
  reads responses the way the score does), else from the policy. `value_lora:` trains it as LoRA;
- reward: a frozen reward model (`reward_model`, scored on prompt + response re-rendered with its own
  tokenizer and chat template, exactly as the `reward_model` stage trained it) and/or rule rewards
  (`rewards:`, as in GRPO), summed with weights (`reward_model_weight`, each rule's `weight`; a rule
  that returns None for a sample contributes 0 to it).

One step
1. rollout: a batch of `per_device_train_batch_size × gradient_accumulation_steps × num_mini_batches`
   prompts per process, sampled with the KV cache at `temperature` (top-k/top-p/repetition penalty off,
   so log-probs are those of the tokens' true sampling distribution), up to `response_length` tokens;
2. scoring: score = weighted sum of rewards, minus `missing_eos_penalty` if the response never ended;
   optional running normalisation (`normalize_reward`), then clipping to ±`score_clip`;
3. per-token reward r_t = −β·KL_t (k1 by default, `kl_estimator`) plus the score on the last response
   token; β fixed (`kl_coef`) or adaptive towards `kl_target` nats per sequence (Ziegler et al.);
4. GAE with `gamma`, `lam`; advantages whitened over the whole batch (across processes);
5. `num_ppo_epochs` passes over shuffled mini-batches: clipped surrogate (`cliprange`, optional
   `cliprange_high` and `dual_clip`) + `vf_coef` × clipped value loss (`cliprange_value`), gradient
   accumulation, clipping at `max_grad_norm`. For the first `critic_warmup_steps` steps only the critic
   learns (OpenRLHF's freeze_actor_steps).

Defaults, and why. They are TRL ≤1.12's, so a ported recipe behaves as it did: `num_ppo_epochs` 4,
`kl_coef` 0.05 (k1, in the reward), `cliprange` 0.2, `cliprange_value` 0.2, `vf_coef` 0.1,
`temperature` 0.7, `response_length` 53, `gamma` 1.0 (episodes are one response: nothing to discount),
`lam` 0.95. On λ the anchors differ: 0.95 (TRL, DeepSpeed-Chat, torchtune) lowers variance by leaning
on the critic but discounts a terminal score by 0.95^k for a token k steps before the end; 1.0
(OpenRLHF, veRL) gives Monte-Carlo advantages score − V, unbiased however poor a fresh critic is.
Prefer `lam: 1.0` for long responses or a critic that starts far from the reward's scale.
Score clipping and normalisation are off by default (TRL has neither; OpenRLHF clips at ±10).

Logged every `logging_steps` into metrics.jsonl: mean score (and each part), reward, KL, β, entropy,
policy/value loss, clip fractions, approx KL, explained variance, response length, share without EOS,
learning rate, step time; and `num_sample_rollouts` sample rollouts. With an `eval_dataset`, the mean
greedy score (and each part) on held-out prompts before and after training, plus the sampled KL to the
reference, go into the stage result as `eval_*_before` / `eval_*_after`.

Memory: in a single process the actor's loss is back-propagated before the critic's forward, so only
one network's activations are alive at a time (the gradients are those of the summed loss, since the
two share no parameters); TRL ≤1.12 kept both graphs alive. Only the response positions go through
the LM head (`logits_to_keep`), and log-probs never materialise a full log-softmax.

Scale-out: one `Accelerator`; actor and critic live in one module and one optimiser (one DDP or
DeepSpeed ZeRO-2 engine, as TRL did; there one backward goes through both), the frozen models are
plain per-process copies, prompts are sharded by process, and whitening and logged means are
computed across processes.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    AliasChoices,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from align.artifacts import EVAL, SAMPLE, TRAIN, StageContext, drop_metrics_after
from align.checkpoints import checkpoint_dir, latest_checkpoint, mark_complete, prune
from align.console import StageProgress
from align.data import RowLedger, chat_prompt, load_dataset
from align.generation import encode_prompts, eos_and_pad_ids, generate_rollout
from align.models import (
    device,
    full_parameters,
    load_causal_lm,
    load_tokenizer,
    load_trainable,
    save_dtype,
    save_model,
    use_gradient_checkpointing,
    use_stop_tokens,
    vocabulary_mismatch,
)
from align.preempt import Interrupted, signal_name, stop_agreed
from align.recipe.checks import CheckContext
from align.recipe.schema import (
    Data,
    LoraSpec,
    Model,
    RewardSpec,
    RuleFailureKnobs,
    StageConfig,
    TrainingKnobs,
)
from align.rewards import Scorer, prompt_needs
from align.tracking import accelerate_trackers, flat_config
from align.training import warmup_step_count

if TYPE_CHECKING:
    from torch import Tensor, nn

logger = logging.getLogger("align")

ARTIFACTS = {"model": "model"}


class Config(StageConfig, TrainingKnobs, RuleFailureKnobs):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    type: Literal["ppo"] = "ppo"
    dataset: Data = Field(description="Prompts (`prompt` column); other columns go to rule rewards.")
    eval_dataset: Data | None = Field(default=None, description="Held-out prompts scored before and after.")
    system_prompt: str | None = Field(default=None, description="Added to conversational prompts that have none.")
    conversational: bool = Field(
        default=True, description="Wrap plain-string prompts as a user message (chat template applies); false keeps raw text."
    )

    # rewards and models
    reward_model: Model | None = Field(default=None, description="Frozen sequence-classification reward model.")
    reward_model_weight: float = 1.0
    rewards: list[RewardSpec] = Field(default_factory=list, description="Rule rewards added to the RM score.")
    value_model: Model | None = Field(default=None, description="Critic init; default: reward_model, else the policy.")
    lora: LoraSpec | None = Field(default=None, description="LoRA actor; the reference is the adapter-disabled base.")
    value_lora: LoraSpec | None = Field(default=None, description="LoRA critic.")

    # rollouts
    response_length: PositiveInt = Field(
        default=53, validation_alias=AliasChoices("response_length", "max_completion_length")
    )
    temperature: PositiveFloat = 0.7
    num_mini_batches: PositiveInt = 1
    total_episodes: PositiveInt | None = Field(default=None, description="Rollouts in all; default epochs × prompts.")
    local_rollout_forward_batch_size: PositiveInt = 64
    logits_chunk_size: PositiveInt = Field(
        default=1024, description="Token positions whose full-vocabulary softmax is taken at once in the no-grad "
        "log-prob and entropy passes: bounds their memory (a 152k vocabulary: ~0.6 GB per float32 copy at 1024).",
    )

    # PPO
    learning_rate: PositiveFloat = 3e-6
    value_learning_rate: PositiveFloat | None = Field(default=None, description="Critic LR; default learning_rate.")
    num_ppo_epochs: PositiveInt = 4
    cliprange: PositiveFloat = 0.2
    cliprange_high: PositiveFloat | None = Field(default=None, description="Clip-higher ε; default cliprange.")
    dual_clip: float | None = Field(default=None, gt=1.0, description="Dual-clip bound c for A < 0 (veRL: 3).")
    vf_coef: float = Field(default=0.1, ge=0.0)
    cliprange_value: PositiveFloat | None = 0.2
    gamma: float = Field(default=1.0, ge=0.0, le=1.0)
    lam: float = Field(default=0.95, ge=0.0, le=1.0)
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    normalize_reward: bool = Field(default=False, description="Running mean/std normalisation of scores.")
    score_clip: PositiveFloat | None = Field(default=None, description="Clip scores to ±score_clip.")
    missing_eos_penalty: float | None = Field(default=None, ge=0.0)
    critic_warmup_steps: NonNegativeInt = 0

    # KL
    kl_coef: float = Field(default=0.05, ge=0.0)
    kl_estimator: Literal["k1", "k2", "k3", "abs"] = "k1"
    kl_target: PositiveFloat | None = Field(default=None, description="Adaptive β towards this sequence KL (nats).")
    kl_horizon: PositiveInt = 10_000

    max_kl: PositiveFloat | None = Field(
        default=None, description="Stop the stage when the sampled KL to the reference (nats per sequence) exceeds this."
    )

    # logging and checkpoints (TrainingArguments' names)
    num_sample_rollouts: NonNegativeInt = Field(default=2, description="Rollouts logged each logging interval.")
    eval_steps: PositiveInt | None = Field(default=None, description="Also evaluate every N steps.")
    save_strategy: Literal["steps", "no"] = "steps"
    save_steps: PositiveFloat = Field(
        default=0.1, description="Checkpoint every N steps; a float below 1 is a share of all steps (0.1: every tenth)."
    )
    save_total_limit: PositiveInt | None = Field(default=2, description="Checkpoints kept (None: all).")

    @model_validator(mode="after")
    def _needs_a_reward(self) -> Config:
        if self.reward_model is None and not self.rewards:
            raise ValueError("PPO needs a reward: set reward_model, rewards, or both")
        if self.kl_target is not None and self.kl_coef == 0:
            raise ValueError("kl_target adapts kl_coef multiplicatively, so kl_coef must start above 0")
        return self


def check(config: Config, ctx: CheckContext) -> None:
    prompt = {"prompt": "the prompts to generate from"}
    ctx.check_rewards(config.rewards, config.dataset)
    ctx.require_columns(config.dataset, ("dataset",), prompt)
    if config.eval_dataset is not None:
        ctx.require_columns(config.eval_dataset, ("eval_dataset",), {**prompt, **ctx.rule_columns(config.rewards)})
    for key in ("dataset", "eval_dataset"):
        ctx.check_rows(getattr(config, key), (key,), prompt_needs(config.rewards, ctx.base_dir))
    ctx.check_model(config.reward_model, ("reward_model",))
    ctx.check_model(config.value_model, ("value_model",))
    ctx.check_lora(config.lora)
    ctx.check_lora(config.value_lora, ("value_lora",))
    ctx.check_context(ctx.model_spec(config), config, ("response_length",))
    # The critic reads the policy's token ids, so it must share the policy's vocabulary (the reward
    # model re-tokenises the text itself and need not).
    critic_key = "value_model" if config.value_model is not None else "reward_model"
    critic = config.value_model or config.reward_model
    if critic is not None and ctx.check_models:
        problem = vocabulary_mismatch(ctx.origin_model(ctx.model_spec(config)), ctx.origin_model(critic), ctx.base_dir,
                                      ("policy", "critic"))
        if problem:
            ctx.error((critic_key,), f"the critic starts from {critic_key} and reads the policy's token ids, so they "
                      f"must share a vocabulary: {problem}" + ("; set value_model to a model with the policy's "
                      "tokenizer" if critic_key == "reward_model" else ""))


def output_columns(config: Config) -> set[str] | None:
    return None


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------


def _disable_dropout(model: nn.Module) -> None:
    # Dropout would make the rollout's log-probs and the first PPO pass's disagree: ratio ≠ 1 at start.
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _check_critic_vocabulary(policy: nn.Module, critic: nn.Module) -> None:
    """The critic reads the policy's token ids, so it must embed the same vocabulary."""
    sizes = [m.get_input_embeddings().num_embeddings for m in (policy, critic)]
    if sizes[0] != sizes[1]:
        raise ValueError(f"the critic embeds {sizes[1]} tokens but the policy's vocabulary has {sizes[0]}: the critic "
                         "reads the policy's token ids, so start it (value_model, else reward_model) from a model with "
                         "the policy's tokenizer")


def _seq_cls_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone, head) of a sequence-classification model, PEFT-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, inner.base_model_prefix)
    head = getattr(inner, "score", None) or inner.classifier
    return backbone, head


def _actor_critic_class() -> type:
    # Built on demand: importing torch at module level would slow down `align validate`.
    import torch

    class _ActorCritic(torch.nn.Module):
        """Policy and critic in one module: one optimiser, one DDP/ZeRO engine, one backward."""

        def __init__(self, policy: nn.Module, critic: nn.Module) -> None:
            super().__init__()
            self.policy = policy
            self.critic = critic

        def forward(self, batch: dict[str, Tensor], response_length: int, *,
                    policy: bool = True, critic: bool = True) -> tuple[Tensor | None, Tensor | None]:
            """Logits and values for the `response_length` response positions; either part can be
            skipped (None)."""
            logits = _policy_logits(self.policy, batch, response_length) if policy else None
            return logits, _values(self.critic, batch, response_length) if critic else None

    return _ActorCritic


def _policy_logits(policy: nn.Module, batch: dict[str, Tensor], response_length: int) -> Tensor:
    # logits_to_keep skips the LM head on prompt positions; position t predicts token t + 1.
    out = policy(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=response_length + 1,
        use_cache=False,
    )
    # Raw logits in the compute dtype: the log-prob functions upcast and divide by the temperature
    # chunk by chunk, so no full float32 copy of a [B, T, V] tensor is made here.
    return out.logits[:, :-1]


def _values(critic: nn.Module, batch: dict[str, Tensor], response_length: int) -> Tensor:
    # V(s_t) for the state before response token t: hidden state at position t − 1.
    backbone, head = _seq_cls_parts(critic)
    hidden = backbone(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state
    return head(hidden[:, -response_length - 1 : -1]).squeeze(-1).float()


# --------------------------------------------------------------------------------------------------
# rollouts
# --------------------------------------------------------------------------------------------------


@dataclass
class Experience:
    """One rollout batch with everything the PPO epochs need; token tensors are [B, Lr]."""

    batch: dict[str, Tensor]  # input_ids, attention_mask, position_ids over prompt + response
    responses: Tensor
    mask: Tensor
    logprobs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor
    stats: dict[str, Tensor]  # per-sequence [B] tensors to average for logging
    texts: list[str]
    prompts: list[Any]

    def __len__(self) -> int:
        return self.responses.shape[0]

    def micro(self, index: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return ({k: v[index] for k, v in self.batch.items()}, self.responses[index], self.mask[index],
                self.logprobs[index], self.values[index], self.advantages[index], self.returns[index])


def _full_batch(query_ids: Tensor, query_mask: Tensor, responses: Tensor, mask: Tensor) -> dict[str, Tensor]:
    import torch

    attention = torch.cat([query_mask.bool(), mask], dim=1).long()
    positions = (attention.cumsum(dim=1) - 1).clamp_min(0)
    return {"input_ids": torch.cat([query_ids, responses], dim=1), "attention_mask": attention, "position_ids": positions}


class PromptStream:
    """Endless per-process index batches: one seeded shuffle per epoch, the same on every process,
    each process taking its own slice of every global batch. Its position is part of PPO's
    checkpoint (`state_dict`), so a resumed run sees the prompts the uninterrupted one would."""

    def __init__(self, n: int, per_process: int, world: int, rank: int, seed: int) -> None:
        import torch

        if n == 0:
            raise ValueError("the dataset has no prompts to train on")
        self.n, self.per_process, self.world, self.rank = n, per_process, world, rank
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def __next__(self) -> list[int]:
        import torch

        while len(self.order) < self.per_process * self.world:
            self.order += torch.randperm(self.n, generator=self.generator).tolist()
        global_batch, self.order = self.order[: self.per_process * self.world], self.order[self.per_process * self.world :]
        return global_batch[self.rank * self.per_process : (self.rank + 1) * self.per_process]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": list(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order = list(state["order"])


@dataclass
class LoopState:
    """What PPO's loop carries from one step to the next, beside the weights, optimiser, scheduler and
    RNG states that Accelerate's `save_state` writes itself: checkpointed with them, so a resumed run
    continues exactly where the interrupted one stopped."""

    kl_controller: Any
    moments: Any  # RunningMoments, or None without normalize_reward
    stream: PromptStream
    step: int = 0
    first_score: float = math.nan
    last_score: float = math.nan
    results: dict[str, Any] = field(default_factory=dict)  # held-out figures from before training

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "first_score": self.first_score, "last_score": self.last_score,
                "results": dict(self.results), "kl_controller": self.kl_controller.state_dict(),
                "moments": self.moments.state_dict() if self.moments is not None else None,
                "stream": self.stream.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.first_score, self.last_score = state["step"], state["first_score"], state["last_score"]
        self.results = dict(state["results"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        if self.moments is not None and state["moments"] is not None:
            self.moments.load_state_dict(state["moments"])
        self.stream.load_state_dict(state["stream"])


def _whiten(accelerator: Any, x: Tensor, mask: Tensor) -> Tensor:
    """Advantage whitening with statistics over every process's batch, not just this one's."""
    from align.rl.functional import masked_whiten

    if accelerator.num_processes == 1:
        return masked_whiten(x, mask)
    rows, width = x.shape
    xs = accelerator.gather(accelerator.pad_across_processes(x, dim=1))
    ms = accelerator.gather(accelerator.pad_across_processes(mask.long(), dim=1))
    start = accelerator.process_index * rows
    return masked_whiten(xs, ms)[start : start + rows, :width]


def _mean(accelerator: Any, values: Tensor) -> float:
    """Mean over all processes' entries (NaN entries, e.g. a rule's None, are left out)."""
    import torch

    values = values.detach().float().reshape(-1).to(accelerator.device)
    keep = ~torch.isnan(values)
    sums = torch.stack([torch.where(keep, values, 0.0).sum(), keep.sum().float()])
    sums = accelerator.reduce(sums, reduction="sum")
    return float(sums[0] / sums[1]) if sums[1] > 0 else math.nan


def _deepspeed_plugin(config: Config) -> Any:
    """The DeepSpeed plugin `accelerate launch` asked for (None without one), with what DeepSpeed
    would otherwise take from a trainer: gradient clipping is the engine's (Accelerate's
    `clip_grad_norm_` only reports the norm under DeepSpeed)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()
    if plugin.deepspeed_config.get("gradient_clipping", "auto") == "auto":
        plugin.deepspeed_config["gradient_clipping"] = config.max_grad_norm
    return plugin


@contextmanager
def _whole_models(plugin: Any) -> Iterator[None]:
    """Models loaded inside are not partitioned by ZeRO-3's zero.Init."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    if plugin is None or not is_deepspeed_zero3_enabled():
        yield
        return
    # Accelerate's zero3_init_context_manager(enable=False) keeps a stage-3 config alive, and
    # transformers partitions at load whenever one is: the config goes for the length of the load.
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def _backward_ppo_losses(actor_critic: nn.Module, backward: Any, micro_batch: tuple[Any, ...], config: Config,
                         actor_weight: float, *, one_backward: bool) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Clipped policy and value losses of one micro-batch, back-propagated; returns them and their stats.

    Actor and critic share no parameters, so their losses can be back-propagated one after the other
    with the same gradients as one backward of the sum: only one network's activations are then alive
    at a time, which halves peak activation memory for equal-sized models. A DDP or DeepSpeed engine
    expects exactly one backward per step, so there (`one_backward`) both go through at once."""
    from align.rl.functional import logprobs_from_logits, policy_loss, value_loss

    batch, responses, mask, old_logp, old_values, advantages, returns = micro_batch
    width = responses.shape[1]

    def actor_loss(logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return policy_loss(logprobs_from_logits(logits, responses, temperature=config.temperature), old_logp, advantages, mask, config.cliprange,
                           config.cliprange_high, config.dual_clip)

    def critic_loss(values: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return value_loss(values, old_values, returns, mask, config.cliprange_value)

    if one_backward:
        logits, values = actor_critic(batch, width)
        (pg_loss, pg_stats), (vf_loss, vf_stats) = actor_loss(logits), critic_loss(values)
        backward(actor_weight * pg_loss + config.vf_coef * vf_loss)
        return pg_loss, vf_loss, pg_stats, vf_stats
    logits, _ = actor_critic(batch, width, critic=False)
    pg_loss, pg_stats = actor_loss(logits)
    backward(actor_weight * pg_loss)
    del logits  # the actor's activations are freed before the critic's forward
    _, values = actor_critic(batch, width, policy=False)
    vf_loss, vf_stats = critic_loss(values)
    backward(config.vf_coef * vf_loss)
    return pg_loss, vf_loss, pg_stats, vf_stats


# --------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------


def run(config: Config, ctx: StageContext) -> dict[str, Any]:
    return PPORun(config, ctx).train()


class PPORun:
    """One PPO stage, top to bottom: `__init__` builds the models, data, optimiser and the loop's
    state (resuming from the newest complete checkpoint when an earlier attempt left one), `train`
    runs the steps — rollout, scoring, advantages, the clipped updates — checkpointing every
    `save_steps` and when a signal asks it to stop, and `finish` evaluates and saves the policy."""

    def __init__(self, config: Config, ctx: StageContext) -> None:
        import torch
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType, set_seed
        from transformers import get_scheduler

        from align.rl.functional import AdaptiveKLController, FixedKLController, RunningMoments

        assert config.model is not None
        self.config, self.ctx = config, ctx
        precision = config.precision()
        trackers = accelerate_trackers(config.report_to, ctx.out_dir, config.name)
        # Accelerate keeps one process-wide state: an earlier in-process stage may have set another
        # mixed precision, which Accelerator() would refuse to change (transformers' Trainer resets it too).
        AcceleratorState._reset_state()
        # Under `accelerate launch` with a DeepSpeed config: Accelerator(cpu=True) would silently drop
        # the plugin and run plain DDP, so on the CPU DeepSpeed is handed its plugin explicitly.
        plugin = _deepspeed_plugin(config)
        if plugin is not None and device() == "cpu":
            from accelerate import PartialState

            # As transformers' TrainingArguments(use_cpu=True) does: the process group over gloo first
            # (left to DeepSpeed on the CPU it sees a world of one), then the DeepSpeed state on top.
            PartialState(cpu=True, backend="gloo")
        self.accelerator = accelerator = Accelerator(
            cpu=device() == "cpu" and plugin is None,  # with a plugin, cpu=True would drop it
            deepspeed_plugin=plugin,
            mixed_precision=precision.mixed,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=trackers or None,
        )
        if trackers:
            accelerator.init_trackers(config.name, config=flat_config(config.model_dump(mode="json")))
        set_seed(ctx.seed, device_specific=True)  # different samples on every process
        self.is_main = accelerator.is_main_process

        # ---- models -------------------------------------------------------------------------
        self.tokenizer = load_tokenizer(config.model, padding_side="left")
        policy = load_trainable(config.model, config.lora, precision=precision, wrap_lora=True,
                                gradient_checkpointing=use_gradient_checkpointing(config.gradient_checkpointing)).model
        _disable_dropout(policy)  # after LoRA is applied: its dropout too would make ratio ≠ 1 at the start
        # With LoRA the reference is the policy with its adapter disabled: no second copy. Otherwise a copy
        # in the policy's own dtype, so that under the same autocast the KL starts at exactly 0.
        # The frozen models are whole on every rank, also under ZeRO-3 (no engine runs them; they are
        # the same size as the policy): loaded outside zero.Init.
        with _whole_models(plugin):
            self.reference = (None if config.lora else load_causal_lm(config.model, precision=precision, trainable=True)
                              .requires_grad_(False).eval().to(accelerator.device))
            self.scorer = Scorer.build(config.rewards, config.reward_model, config.reward_model_weight,
                                       base_dir=ctx.base_dir, reward_model_batch_size=config.local_rollout_forward_batch_size,
                                       precision=precision, seed=ctx.seed, max_rule_failure_rate=config.max_rule_failure_rate,
                                       rule_failure_min_samples=config.rule_failure_min_samples)  # fmt: skip
        critic = load_trainable(config.value_model or config.reward_model or config.model, config.value_lora,
                                precision=precision, task="sequence_classification", seed=ctx.seed,
                                wrap_lora=True).model  # fmt: skip
        _disable_dropout(critic)
        _check_critic_vocabulary(policy, critic)
        use_stop_tokens(policy, self.tokenizer, config.model)  # rollouts end there, and the saved model keeps them
        self.eos_ids, self.pad_id = eos_and_pad_ids(policy, self.tokenizer)

        # ---- data -----------------------------------------------------------------------------
        self.ledger = RowLedger()  # rows dropped under on_bad_rows: skip
        self.table = self.prompt_table(config.dataset)
        self.eval_table = self.prompt_table(config.eval_dataset, "eval_dataset") if config.eval_dataset is not None else None
        self.micro = config.per_device_train_batch_size
        self.mini = self.micro * config.gradient_accumulation_steps
        local_batch = self.mini * config.num_mini_batches
        self.global_batch = local_batch * accelerator.num_processes
        if config.max_steps > 0:
            self.total_steps = config.max_steps
        else:
            episodes = config.total_episodes or int(config.num_train_epochs * len(self.table[0]))
            self.total_steps = max(1, math.ceil(episodes / self.global_batch))

        # ---- optimiser ------------------------------------------------------------------------
        actor_critic = _actor_critic_class()(policy, critic)
        groups = [
            {"params": [p for p in policy.parameters() if p.requires_grad], "lr": config.learning_rate},
            {"params": [p for p in critic.parameters() if p.requires_grad],
             "lr": config.value_learning_rate or config.learning_rate},
        ]
        optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        scheduler = get_scheduler(config.lr_scheduler_type, optimizer,
                                  num_warmup_steps=warmup_step_count(config.warmup_steps, self.total_steps),
                                  num_training_steps=self.total_steps)
        if plugin is not None:
            # DeepSpeed takes its micro-batch size from a prepared dataloader, and PPO has none.
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.micro
        # The schedule is NOT prepared: Accelerate's wrapper steps it once per process per call (N× too
        # fast with N processes) and under DeepSpeed the engine would step it at every optimizer step;
        # it is one PPO step per step here, on every engine, and checkpointed with the rest.
        self.actor_critic, self.optimizer = accelerator.prepare(actor_critic, optimizer)
        self.scheduler = scheduler
        accelerator.register_for_checkpointing(scheduler)
        self.actor_params = groups[0]["params"]
        # A DDP or DeepSpeed engine expects one backward per step; alone, the two passes halve peak memory.
        self.one_backward = accelerator.distributed_type != DistributedType.NO

        # ---- the loop's own state, checkpointed with the rest --------------------------------------
        kl_controller = (AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
                         if config.kl_target is not None else FixedKLController(config.kl_coef))
        self.state = LoopState(kl_controller, RunningMoments() if config.normalize_reward else None,
                               PromptStream(len(self.table[0]), local_batch, accelerator.num_processes,
                                            accelerator.process_index, ctx.seed))  # fmt: skip
        accelerator.register_for_checkpointing(self.state)
        self.work_dir = ctx.artifact("trainer")
        every = config.save_steps
        self.save_every = max(1, math.ceil(every * self.total_steps)) if every < 1 else int(every)
        self.resumed_from = self.resume()

    # ---- pieces -----------------------------------------------------------------------------------

    def unwrapped(self) -> Any:
        return self.accelerator.unwrap_model(self.actor_critic)

    def prompt_table(self, spec: Any, key: str = "dataset") -> tuple[list[Any], list[list[int]], dict[str, list[Any]]]:
        """Prompts as the model sees them, their token ids, and the other columns (for the rules)."""
        data = load_dataset(spec, self.ctx.base_dir, self.ctx.seed, need=prompt_needs(self.config.rewards, self.ctx.base_dir),
                            ledger=self.ledger, key=key)  # fmt: skip
        prompts = [chat_prompt(p, self.config.system_prompt, self.config.conversational) for p in data["prompt"]]
        columns = {c: data[c] for c in data.column_names if c != "prompt"}
        return prompts, encode_prompts(self.tokenizer, prompts), columns

    def reference_logits(self, batch: dict[str, Tensor], response_length: int) -> Tensor:
        if self.reference is not None:
            return _policy_logits(self.reference, batch, response_length)
        with self.unwrapped().policy.disable_adapter():
            return _policy_logits(self.unwrapped().policy, batch, response_length)

    # Rollout, log-prob and evaluation passes run under the same autocast as the training forward
    # (Accelerate wraps the prepared model's forward in it), or the first update's ratio is not 1.
    def rollout(self, queries: list[list[int]], temperature: float) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, list[str]]:
        """Generate for prompt token lists in chunks; returns full batch, responses, mask, finished, texts."""
        import torch

        config = self.config
        # Under ZeRO-3 the shards are gathered for the length of the generation: ranks generate
        # different lengths, so a layer-by-layer fetch (collective per forward) would hang.
        with torch.no_grad(), self.accelerator.autocast(), full_parameters(self.unwrapped()):
            out = generate_rollout(self.unwrapped().policy, queries, chunk_size=config.local_rollout_forward_batch_size,
                                   max_new_tokens=config.response_length, eos_ids=self.eos_ids, pad_id=self.pad_id,
                                   temperature=temperature)  # fmt: skip
        responses, mask = out.response_ids, out.response_mask
        texts = self.tokenizer.batch_decode(torch.where(mask, responses, self.pad_id), skip_special_tokens=True)
        return _full_batch(out.query_ids, out.query_mask, responses, mask), responses, mask, out.finished, texts

    def forward_in_chunks(self, batch: dict[str, Tensor], responses: Tensor, with_values: bool = True
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Log-probs of policy and reference, policy entropy and values, chunk by chunk."""
        import torch

        from align.rl.functional import entropy_from_logits, logprobs_from_logits

        config = self.config
        width = responses.shape[1]
        chunk = config.logits_chunk_size
        size = config.local_rollout_forward_batch_size
        outs: dict[str, list[Tensor]] = {"logp": [], "ref": [], "entropy": [], "values": []}
        model = self.unwrapped()
        with torch.no_grad(), self.accelerator.autocast():
            for start in range(0, responses.shape[0], size):
                part = {k: v[start : start + size] for k, v in batch.items()}
                labels = responses[start : start + size]
                logits = _policy_logits(model.policy, part, width)
                outs["logp"].append(logprobs_from_logits(logits, labels, chunk, temperature=config.temperature))
                outs["entropy"].append(entropy_from_logits(logits, chunk, temperature=config.temperature))
                del logits  # one [chunk, T, V] logits tensor alive at a time, not the policy's and the reference's
                outs["ref"].append(logprobs_from_logits(self.reference_logits(part, width), labels, chunk,
                                                        temperature=config.temperature))
                if with_values:
                    outs["values"].append(_values(model.critic, part, width))
        cat = {k: torch.cat(v) if v else None for k, v in outs.items()}
        return cat["logp"], cat["ref"], cat["entropy"], cat["values"]

    def score(self, rows: list[int], texts: list[str], responses: Tensor, mask: Tensor,
              table: tuple[list[Any], list[list[int]], dict[str, list[Any]]]) -> tuple[Tensor, dict[str, Tensor]]:
        import torch

        row_prompts, _, row_columns = table
        ids = [r[m].tolist() for r, m in zip(responses.cpu(), mask.cpu(), strict=True)]
        scores = self.scorer([row_prompts[i] for i in rows], texts, completion_ids=ids,
                             columns={c: [v[i] for i in rows] for c, v in row_columns.items()})  # fmt: skip
        parts = {name: torch.tensor([math.nan if v is None else float(v) for v in values])
                 for name, values in scores.parts.items()}  # fmt: skip
        return torch.tensor(scores.total), parts

    def make_experience(self, rows: list[int]) -> Experience:
        from align.rl.functional import (
            clip_scores,
            compute_gae,
            explained_variance,
            masked_mean,
            masked_sum,
            masked_whiten,
            per_token_rewards,
        )

        config, accelerator, state = self.config, self.accelerator, self.state
        prompts, encoded, _ = self.table
        batch, responses, mask, finished, texts = self.rollout([encoded[i] for i in rows], config.temperature)
        logprobs, ref_logprobs, entropy, values = self.forward_in_chunks(batch, responses)
        scores, parts = self.score(rows, texts, responses, mask, self.table)
        if config.missing_eos_penalty is not None:
            scores = scores - config.missing_eos_penalty * (~finished.cpu()).float()
        raw_scores = scores.clone()
        if state.moments is not None:
            state.moments.update(accelerator.gather(scores.to(accelerator.device)).cpu())
            scores = state.moments.normalize(scores)
        scores = clip_scores(scores, config.score_clip).to(accelerator.device)
        rewards, kl = per_token_rewards(scores, logprobs, ref_logprobs, mask, state.kl_controller.value,
                                        config.kl_estimator)  # fmt: skip
        if config.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = _whiten(accelerator, advantages, mask)
        stats = {
            "score": raw_scores, **{f"score/{k}": v for k, v in parts.items()},
            "reward": masked_sum(rewards, mask, dim=1), "kl": masked_sum(kl, mask, dim=1),
            "entropy": masked_mean(entropy, mask, dim=1), "response_length": mask.sum(dim=1).float(),
            "no_eos": (~finished).float(),
        }
        return Experience(batch, responses, mask, logprobs, values, advantages, returns,
                          {**stats, "explained_variance": explained_variance(values, returns, mask).reshape(1)},
                          texts, [prompts[i] for i in rows])

    def evaluate(self) -> dict[str, float]:
        """Greedy responses scored by the reward(s); sampled responses for KL to the reference."""
        import torch

        from align.rl.functional import kl_penalty, masked_sum

        table, accelerator = self.eval_table, self.accelerator
        assert table is not None
        # The same number of rows on every rank (under ZeRO-3 every forward is collective, and a rank
        # with no rows would have nothing to run): the last ranks repeat rows, scored NaN, left out.
        count, ranks = len(table[0]), accelerator.num_processes
        slots = range(accelerator.process_index, -(-count // ranks) * ranks, ranks)
        rows = [slot % count for slot in slots]
        padding = torch.tensor([slot >= count for slot in slots])
        queries = [table[1][i] for i in rows]
        batch, responses, mask, _, texts = self.rollout(queries, 0.0)
        scores, parts = self.score(rows, texts, responses, mask, table)
        batch, responses, mask, _, _ = self.rollout(queries, self.config.temperature)
        logp, ref_logp, _, _ = self.forward_in_chunks(batch, responses, with_values=False)
        kl = masked_sum(kl_penalty(logp, ref_logp, "k1"), mask, dim=1).detach().float().cpu()
        for values in (scores, kl, *parts.values()):
            values[padding] = math.nan
        out = {"score": _mean(accelerator, scores), "kl": _mean(accelerator, kl)}
        out.update({f"score/{k}": _mean(accelerator, v) for k, v in parts.items()})
        return out

    def log_eval(self, step: int, figures: dict[str, float]) -> None:
        if self.is_main:
            self.ctx.metrics.log(EVAL, step, **figures)
            self.accelerator.log({f"eval/{k}": v for k, v in figures.items()}, step=step)

    def update(self, experience: Experience, actor_learns: bool) -> tuple[dict[str, Tensor], int]:
        """`num_ppo_epochs` passes of clipped updates over shuffled mini-batches; summed statistics."""
        import torch

        config, accelerator = self.config, self.accelerator
        sums: dict[str, Tensor] = {}
        updates = 0
        for _ in range(config.num_ppo_epochs):
            order = torch.randperm(len(experience))
            for mb_start in range(0, len(experience), self.mini):
                for mu_start in range(mb_start, mb_start + self.mini, self.micro):
                    index = order[mu_start : mu_start + self.micro]
                    with accelerator.accumulate(self.actor_critic):
                        # × 0 during critic warm-up keeps the actor in the graph (DDP expects every parameter).
                        actor_weight = 1.0 if actor_learns else 0.0
                        pg_loss, vf_loss, pg_stats, vf_stats = _backward_ppo_losses(
                            self.actor_critic, accelerator.backward, experience.micro(index), config, actor_weight,
                            one_backward=self.one_backward)
                        if accelerator.sync_gradients:
                            if config.max_grad_norm > 0:
                                accelerator.clip_grad_norm_(self.actor_critic.parameters(), config.max_grad_norm)
                            if not actor_learns:
                                for p in self.actor_params:
                                    p.grad = None  # AdamW then leaves the actor (and its moments) untouched
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    for key, value in (("policy_loss", pg_loss), ("value_loss", vf_loss),
                                       ("policy_clip_fraction", pg_stats["clip_fraction"]),
                                       ("dual_clip_fraction", pg_stats["dual_clip_fraction"]),
                                       ("approx_kl", pg_stats["approx_kl"]), ("ratio", pg_stats["ratio_mean"]),
                                       ("value_clip_fraction", vf_stats["clip_fraction"])):
                        sums[key] = sums.get(key, 0.0) + value.detach()
                    updates += 1
        return sums, updates

    def log_step(self, step: int, experience: Experience, sums: dict[str, Tensor], updates: int, kl_coef: float,
                 learning_rate: float, step_time: float, progress: StageProgress) -> None:  # fmt: skip
        config, accelerator = self.config, self.accelerator
        record: dict[str, Any] = {"episodes": step * self.global_batch}
        record.update({k: _mean(accelerator, v) for k, v in experience.stats.items()})
        record.update({k: _mean(accelerator, v / updates) for k, v in sums.items()})
        record.update({"kl_coef": kl_coef, "learning_rate": learning_rate, "step_time_s": step_time})
        if not self.is_main:
            return
        self.ctx.metrics.log(TRAIN, step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()})
        accelerator.log({f"train/{k}": v for k, v in record.items()}, step=step)
        progress.summary(record, step)
        parts = {k.removeprefix("score/"): v for k, v in experience.stats.items() if k.startswith("score/")}
        for i in range(min(config.num_sample_rollouts, len(experience))):
            prompt = experience.prompts[i]
            rewards = {"score": round(float(experience.stats["score"][i]), 4),
                       **{k: round(float(v[i]), 4) for k, v in parts.items()}}
            self.ctx.metrics.log(SAMPLE, step, prompt=prompt if isinstance(prompt, str) else prompt[-1]["content"],
                                 completion=experience.texts[i], rewards=rewards)  # fmt: skip

    # ---- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Weights, optimiser, scheduler, every process's RNG and the loop's state, via Accelerate;
        it counts once marked complete (after every rank wrote its part)."""
        folder = checkpoint_dir(self.work_dir, self.state.step)
        self.accelerator.save_state(str(folder))
        self.accelerator.wait_for_everyone()
        if self.is_main:
            mark_complete(folder)
            prune(self.work_dir, self.config.save_total_limit)
        self.accelerator.wait_for_everyone()

    def resume(self) -> int | None:
        """Load the newest complete checkpoint an earlier attempt left; returns its step (None: fresh)."""
        checkpoint = latest_checkpoint(self.work_dir)
        if checkpoint is None:
            return None
        self.accelerator.load_state(str(checkpoint))
        logger.info("ppo: resuming from %s (step %d of %d)", checkpoint, self.state.step, self.total_steps)
        if self.is_main:
            drop_metrics_after(self.ctx.metrics.path, self.state.step)
        return self.state.step

    # ---- the loop -----------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        import torch

        from align.training import TrainingDiverged

        config, accelerator, state = self.config, self.accelerator, self.state
        if self.eval_table is not None and state.step == 0:
            before = self.evaluate()
            state.results = {f"eval_{k.replace('/', '_')}_before": round(v, 4) for k, v in before.items() if k != "kl"}
            self.log_eval(0, before)
        logger.info("ppo: %d steps × %d rollouts (%s actor, %s critic) on %d process(es), %s", self.total_steps,
                    self.global_batch, "LoRA" if config.lora else "full", "LoRA" if config.value_lora else "full",
                    accelerator.num_processes, accelerator.distributed_type.value)
        started = time.perf_counter()
        progress = StageProgress(self.ctx.out_dir, config.name, self.total_steps, main_process=self.is_main)
        while state.step < self.total_steps:
            step = state.step + 1
            step_start = time.perf_counter()
            self.unwrapped().eval()
            experience = self.make_experience(next(state.stream))
            self.unwrapped().train()
            sums, updates = self.update(experience, actor_learns=step > config.critic_warmup_steps)
            if not all(bool(torch.isfinite(sums[k])) for k in ("policy_loss", "value_loss")):
                raise TrainingDiverged(f"the PPO loss is not finite at step {step} (learning rate too high?); the last "
                                       "complete checkpoint before it stays")
            learning_rate = float(self.optimizer.param_groups[0]["lr"])  # what the step used, as the engine holds it
            self.scheduler.step()
            mean_kl = _mean(accelerator, experience.stats["kl"])
            if config.max_kl is not None and mean_kl > config.max_kl:
                raise TrainingDiverged(f"the KL to the reference is {mean_kl:.3g} nats per sequence at step {step}, "
                                       f"beyond max_kl ({config.max_kl:g})")
            kl_coef = state.kl_controller.value
            state.kl_controller.update(mean_kl, self.global_batch)
            mean_score = _mean(accelerator, experience.stats["score"])
            state.first_score = mean_score if step == 1 else state.first_score
            state.last_score = mean_score
            state.step = step
            progress.update(step)
            if step % config.logging_steps == 0 or step in (1, self.total_steps):
                self.log_step(step, experience, sums, updates, kl_coef, learning_rate,
                              time.perf_counter() - step_start, progress)  # fmt: skip
            if self.eval_table is not None and config.eval_steps and step % config.eval_steps == 0 and step != self.total_steps:
                self.log_eval(step, self.evaluate())
            stopping = stop_agreed()
            if config.save_strategy == "steps" and step < self.total_steps and (step % self.save_every == 0 or stopping):
                self.save_checkpoint()
            if stopping and step < self.total_steps:
                progress.close()
                raise Interrupted(f"stopped by {signal_name()} at step {step} of {self.total_steps}, checkpoint written")
        progress.close()
        return self.finish(time.perf_counter() - started)

    def finish(self, runtime: float) -> dict[str, Any]:
        config, accelerator, state = self.config, self.accelerator, self.state
        results = dict(state.results)
        if self.eval_table is not None:
            self.unwrapped().eval()
            after = self.evaluate()
            results.update({f"eval_{k.replace('/', '_')}_after": round(v, 4) for k, v in after.items()})
            self.log_eval(self.total_steps, after)
        accelerator.wait_for_everyone()
        for tracker in accelerator.trackers:  # not end_training(): it also tears down the process group
            tracker.finish()
        with full_parameters(self.unwrapped()):  # every rank: ZeRO-3's shards are gathered for the save
            if self.is_main:
                save_model(self.unwrapped().policy, self.tokenizer, self.ctx.artifact(ARTIFACTS["model"]),
                           merge=bool(config.lora and config.lora.merge), dtype=save_dtype(config.model))
                shutil.rmtree(self.work_dir, ignore_errors=True)  # the checkpoints: the stage is done
        accelerator.wait_for_everyone()
        return {
            "steps": self.total_steps,
            "episodes": self.total_steps * self.global_batch,
            "num_processes": accelerator.num_processes,
            "mixed_precision": str(accelerator.mixed_precision),
            "first_score": round(state.first_score, 4),
            "last_score": round(state.last_score, 4),
            **results,
            **({"resumed_from_step": self.resumed_from} if self.resumed_from else {}),
            "train_runtime_s": round(runtime, 2),
            "s_per_step": round(runtime / max(1, self.total_steps - (self.resumed_from or 0)), 4),
            **self.scorer.failure_metrics("ppo"),
            **self.ledger.metrics(),
        }
