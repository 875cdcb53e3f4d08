"""dpo: offline preference optimisation on TRL's `DPOTrainer` — DPO and every loss of its family that
TRL 1.16 ships (`loss_type`: sigmoid = DPO, hinge, ipo, robust, exo_pair, nca_pair, bco_pair,
sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm; a list of them with
`loss_weights` combines them, e.g. MPO). Every `DPOConfig` key keeps TRL's name: `beta`,
`label_smoothing`, `precompute_ref_log_probs`, `max_length`, `f_divergence_type`, `ld_alpha`,
`use_weighting`, `sync_ref_model`, …; the most-tuned are typed and bounded here, every other
`DPOConfig` field is accepted as-is. Combinations TRL would reject only once training starts
(exo_pair without label smoothing, an f-divergence with a loss that has none, …) fail validation.

Data, the same as the reward_model stage reads (one preparation, `align.data.prepare_preference_pairs`):
`chosen`/`rejected` with an optional `prompt` (plain text or conversational; conversations that hold
the prompt need none), or `prompt` plus a best-first list column (`ranking_column`), expanded into
all its pairs. TRL's DPO has no per-pair weight, so every expanded pair counts once.

The reference is the stage's starting model (`model`, e.g. `${stages.sft.model}`). With `lora:` it
is that model with the adapter disabled — no second copy in memory. For a full fine-tune align hands
TRL a frozen copy loaded exactly as the policy was: TRL would otherwise rebuild the reference from
`model.config._name_or_path`, which for a model merged in memory from an adapter folder names the
adapter's *base* — a different model. With `precompute_ref_log_probs` no copy is kept: TRL scores the
data with the policy before its first step.

Held-out figures (`eval_dataset`), before training and after, on every held-out pair, exactly:
- `eval_reward_accuracy_*`: share of pairs whose implicit reward β·(log π − log π_ref), summed over
  the completion, is higher for chosen than for rejected (a tie counts ½). Before training the policy
  *is* the reference, so every margin is 0 and this is 0.5: the implicit reward cannot yet tell
  chosen from rejected. `reference_logp_max_diff` is the largest |log π₀ − log π_ref| seen then —
  0.0 when the reference TRL trains against really is the starting model;
- `eval_reward_margin_*`: mean implicit-reward margin (what TRL logs as `rewards/margins`);
- `eval_logp_accuracy_*`: share of pairs to whose chosen completion the model itself gives the
  higher log-probability — a measure of the model, not of its change, so its "before" says something.
Training rows in metrics.jsonl carry TRL's own figures (`rewards/accuracies`, `rewards/margins`,
`logps/chosen`, …). The manifest also records the world size (`num_processes`) and the mixed
precision (`mixed_precision`) the trainer's accelerator really ran with. The `model` artifact loads
with `AutoModelForCausalLM` (an adapter folder when LoRA is not merged).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, PositiveInt

from align.artifacts import EVAL, StageContext
from align.data import RowLedger, load_dataset, preference_needs, prepare_preference_pairs
from align.recipe.checks import CheckContext
from align.recipe.schema import Data, LoraSpec, TrlStageConfig
from align.training import fit, preference_trainer, run_metrics, save_trained_model

logger = logging.getLogger("align")

ARTIFACTS = {"model": "model"}

#: Every loss TRL 1.16's DPOTrainer implements (DPOConfig.loss_type).
DpoLoss = Literal[
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]
#: Losses built on the chosen − rejected reward difference: the only ones with an f-divergence form (TRL).
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})


class Config(TrlStageConfig):
    trl_config_class: ClassVar[str | None] = "trl:DPOConfig"

    type: Literal["dpo"] = "dpo"
    dataset: Data = Field(description="Preference pairs (chosen/rejected, optional prompt) or rankings.")
    eval_dataset: Data | None = Field(default=None, description="Held-out pairs: implicit-reward accuracy before/after.")
    lora: LoraSpec | None = None
    system_prompt: str | None = Field(default=None, description="Added to conversational prompts that have none.")
    ranking_column: str = Field(default="ranking", description="List column of responses ordered best → worst.")
    learning_rate: float = Field(default=1e-6, gt=0)
    beta: float = Field(default=0.1, gt=0, description="Strength of the leash to the reference (IPO: τ).")
    loss_type: Annotated[list[DpoLoss], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] = Field(
        default_factory=lambda: ["sigmoid"], description="One loss (a name), or several (a list) with loss_weights.")
    loss_weights: list[float] | None = None
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5, description="robust: flip probability; exo_pair: ε.")
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
    precompute_ref_log_probs: bool = False
    max_length: PositiveInt | None = 1024


def check(config: Config, ctx: CheckContext) -> None:
    ctx.check_preference_data(config.dataset, ("dataset",), config.ranking_column)
    ctx.check_preference_data(config.eval_dataset, ("eval_dataset",), config.ranking_column)
    ctx.check_lora(config.lora)
    extra = config.model_extra or {}
    losses = config.loss_type
    if not losses:
        ctx.error(("loss_type",), "name at least one loss")
    if config.loss_weights is not None and len(config.loss_weights) != len(losses):
        ctx.error(("loss_weights",), f"{len(config.loss_weights)} weights for {len(losses)} loss types; give one each")
    if "exo_pair" in losses and config.label_smoothing == 0.0:
        ctx.error(("label_smoothing",), "loss exo_pair needs label_smoothing > 0 (the EXO paper suggests 1e-3)")
    if config.f_divergence_type != "reverse_kl" and not set(losses) <= F_DIVERGENCE_LOSSES:
        other = ", ".join(sorted(set(losses) - F_DIVERGENCE_LOSSES))
        ctx.error(("f_divergence_type",), f"{config.f_divergence_type} has no form for loss {other}; it works with "
                  f"{', '.join(sorted(F_DIVERGENCE_LOSSES))}")
    if extra.get("use_weighting") and {"aot", "aot_unpaired"} & set(losses):
        ctx.error(("use_weighting",), "WPO weighting does not apply to aot/aot_unpaired (they sort the pairs)")
    ld_alpha = extra.get("ld_alpha")
    if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
        ctx.error(("ld_alpha",), f"ld_alpha must be in [0, 1], got {ld_alpha}")
    if extra.get("sync_ref_model"):
        if config.lora is not None:
            ctx.error(("sync_ref_model",), "sync_ref_model needs a reference copy; with lora the reference is the "
                      "disabled adapter, so there is nothing to sync")
        if config.precompute_ref_log_probs:
            ctx.error(("sync_ref_model",), "sync_ref_model updates the reference, so precomputed reference "
                      "log-probs would go stale; drop one of the two")
    if config.lora is not None and "lm_head" in config.lora.target_modules:
        ctx.error(("lora", "target_modules"), "DPO scores tokens with lm_head.weight directly, so an adapter on "
                  "lm_head would never train; leave lm_head out")


def output_columns(config: Config) -> set[str] | None:
    return None


# ------------------------------------------------------------------------------------------------
# held-out pairs: policy and reference log-probs, before and after
# ------------------------------------------------------------------------------------------------


def completion_logps(model: Any, batch: dict[str, Any]) -> Any:
    """Σ log π(token) over each completion of a TRL preference batch (chosen rows, then rejected): the
    sequence log-probability DPO's implicit reward is built from. Uses the fused LM head TRL adds to
    the models it trains (no full logits)."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {k: v for k, v in batch.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
    out = model(**inputs, labels=labels, use_cache=False, fused_lm_head=True)
    width = batch["completion_mask"].size(1) - 1  # log-probs of tokens 1…L−1 (each scored from the one before)
    return out.log_probs[:, -width:].float().sum(dim=1)


def _reference_logps(trainer: Any, batch: dict[str, Any]) -> Any:
    """What TRL trains against: the frozen reference, the model with its adapter disabled, or the
    log-probs it precomputed (from the policy before its first step)."""
    import torch
    from accelerate.utils import is_peft_model
    from trl.trainer.utils import use_adapter

    if "ref_chosen_logps" in batch and trainer.args.ld_alpha is None:
        return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).float()
    if trainer.ref_model is not None:
        return completion_logps(trainer.ref_model, batch)
    if is_peft_model(trainer.model):
        with use_adapter(trainer.accelerator.unwrap_model(trainer.model), adapter_name=None):
            return completion_logps(trainer.model, batch)
    return completion_logps(trainer.model, batch)  # precomputed with ld_alpha: recompute them unweighted


def pair_logps(trainer: Any, references: list[Any] | None = None) -> tuple[Any, list[Any]]:
    """Per held-out pair, over all processes: [log π(chosen), log π(rejected), log π_ref(chosen),
    log π_ref(rejected)] as an (N, 4) tensor. The reference's are computed when `references` is None
    (and returned per batch of this process, to pass in again after training: the reference is
    frozen, and the eval dataloader's order is fixed)."""
    import torch

    model = trainer.model
    was_training = model.training
    model.eval()
    rows, computed = [], []
    try:
        with torch.no_grad(), trainer.accelerator.autocast():
            for i, batch in enumerate(trainer.get_eval_dataloader()):
                batch = trainer._prepare_inputs(batch)
                policy = completion_logps(model, batch)
                reference = _reference_logps(trainer, batch) if references is None else references[i]
                computed.append(reference)
                stacked = torch.stack([*policy.chunk(2), *reference.to(policy.device).chunk(2)], dim=1)
                rows.append(trainer.accelerator.gather_for_metrics(stacked).cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows), computed


def pair_metrics(logps: Any, beta: float) -> dict[str, float]:
    """Implicit-reward accuracy (ties ½) and mean margin, and log-probability accuracy, of (N, 4) rows
    [log π(c), log π(r), log π_ref(c), log π_ref(r)]."""
    margin = beta * ((logps[:, 0] - logps[:, 2]) - (logps[:, 1] - logps[:, 3]))
    accuracy = (margin > 0).float() + 0.5 * (margin == 0).float()
    return {
        "eval_reward_accuracy": round(float(accuracy.mean()), 4),
        "eval_reward_margin": round(float(margin.mean()), 4),
        "eval_logp_accuracy": round(float((logps[:, 0] > logps[:, 1]).float().mean()), 4),
    }


# ------------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------------


def build_trainer(config: Config, ctx: StageContext, ledger: RowLedger | None = None) -> Any:
    """The DPOTrainer for this stage, not yet trained: data prepared (rows skipped under on_bad_rows:
    skip counted in `ledger`), reference decided (see the module docstring), align's metrics callback
    attached."""
    from trl import DPOTrainer

    assert config.model is not None
    prepare = dict(ranking_column=config.ranking_column, weighting=None, system_prompt=config.system_prompt)
    need = preference_needs(config.ranking_column)
    train = prepare_preference_pairs(load_dataset(config.dataset, ctx.base_dir, ctx.seed, need=need, ledger=ledger),
                                     **prepare)  # fmt: skip
    evaluation = None
    if config.eval_dataset is not None:
        evaluation = prepare_preference_pairs(load_dataset(config.eval_dataset, ctx.base_dir, ctx.seed, need=need,
                                                           ledger=ledger, key="eval_dataset"), **prepare)  # fmt: skip
    return preference_trainer(DPOTrainer, config, ctx, train, evaluation)


def run(config: Config, ctx: StageContext) -> dict[str, Any]:
    ledger = RowLedger()
    trainer = build_trainer(config, ctx, ledger)
    logger.info("dpo: %d pairs, loss %s, beta %g, %s, %d process(es)", len(trainer.train_dataset),
                "+".join(config.loss_type), config.beta, "LoRA" if config.lora else "full fine-tune",
                trainer.accelerator.num_processes)  # fmt: skip
    before: dict[str, float] = {}
    references: list[Any] = []
    if trainer.eval_dataset is not None:
        start, references = pair_logps(trainer)
        before = pair_metrics(start, config.beta)
        drift = float((start[:, :2] - start[:, 2:]).abs().max()) if len(start) else 0.0
        if trainer.is_world_process_zero():
            ctx.metrics.log(EVAL, 0, **before)
    metrics = {**run_metrics(trainer, fit(trainer, ctx.metrics.path)), **ledger.metrics()}
    if trainer.eval_dataset is not None:
        end, _ = pair_logps(trainer, references)
        after = pair_metrics(end, config.beta)
        if trainer.is_world_process_zero():
            ctx.metrics.log(EVAL, int(trainer.state.global_step), **after)
        metrics["eval_pairs"] = len(end)
        for key in before:
            metrics[f"{key}_before"], metrics[f"{key}_after"] = before[key], after[key]
        metrics["reference_logp_max_diff"] = round(drift, 6)
        if drift > 1e-3:
            logger.warning("dpo: the reference differs from the starting model (max |Δ log p| = %.4g)", drift)
    save_trained_model(trainer, trainer.processing_class, ctx.artifact(ARTIFACTS["model"]), config.lora,
                       ctx.artifact("trainer"), config.model)  # fmt: skip
    return metrics
