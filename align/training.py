"""Glue between a stage's typed config and a TRL trainer: building the TRL config with device-sane
defaults, logging trainer metrics into the stage's metrics.jsonl, saving the trained model, the
reference model of the preference trainers, and the one SFT routine the sft and distill stages share."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.artifacts import TRAIN, MetricsWriter, drop_metrics_after, metric_kind
from align.checkpoints import checkpoint_dir, complete_checkpoints, latest_checkpoint, mark_complete, step_of
from align.console import StageProgress
from align.data import SFT_NEEDS, with_system_prompt
from align.models import (
    all_finite,
    count_parameters,
    full_parameters,
    load_causal_lm,
    load_tokenizer,
    load_trainable,
    save_dtype,
    save_model,
    use_gradient_checkpointing,
    use_stop_tokens,
)
from align.preempt import Interrupted, signal_name, stop_agreed, stop_requested
from align.recipe.schema import LoraSpec, ModelSpec, StageConfig, TrainingKnobs, TrlStageConfig
from align.recipe.trl_fields import config_class, trl_config_fields
from align.tracking import trackers

if TYPE_CHECKING:
    from align.artifacts import StageContext
    from align.precision import Precision

logger = logging.getLogger("align")


def trl_config(config: StageConfig, output_dir: Path, trl_class: str | None = None, **fixed: Any) -> Any:
    """Build the stage's TRL config: its typed knobs, every passed-through TRL key, then `fixed`
    (values the stage itself decides). bf16 and gradient checkpointing are decided per device.
    `trl_class` ("module:Class") overrides the stage's `trl_config_class`, for a stage that drives
    one of two trainers (distill: SFT or GKD); only that class's fields are taken from the config."""
    import torch

    dotted = trl_class or config.trl_config_class
    assert dotted is not None
    cls = config_class(dotted)
    fields = trl_config_fields(dotted)
    values = config.model_dump()
    kwargs: dict[str, Any] = {k: v for k, v in values.items() if k in fields and k not in ("model",)}
    kwargs.update({k: v for k, v in (config.model_extra or {}).items() if trl_class is None or k in fields})
    if isinstance(config, TrainingKnobs):
        kwargs.update(config.precision().trl_flags)
        kwargs["gradient_checkpointing"] = use_gradient_checkpointing(config.gradient_checkpointing)
    # Where the trackers write is set around the whole stage (align.tracking.tracking_env).
    kwargs["report_to"] = trackers(getattr(config, "report_to", None)) or "none"
    kwargs.setdefault("run_name", config.name)
    # Checkpoints by default, about a tenth of the steps apart, two kept: a killed stage resumes.
    kwargs.setdefault("save_strategy", "steps")
    kwargs.setdefault("save_steps", 0.1)
    kwargs.setdefault("save_total_limit", 2)
    # TRL/transformers would otherwise drop NaN/inf losses from the logged average and hide a diverged run.
    kwargs.setdefault("logging_nan_inf_filter", False)
    kwargs.setdefault("seed", config.seed or 0)
    kwargs.setdefault("data_seed", config.seed or 0)
    kwargs.setdefault("use_cpu", not torch.cuda.is_available())
    kwargs.update(fixed)
    return cls(output_dir=str(output_dir), **kwargs)


#: Column layouts SFT understands, in the order they are tried.
SFT_LAYOUTS: tuple[tuple[str, ...], ...] = tuple(tuple(layout.required) for layout in SFT_NEEDS.layouts)


def sft_layout(columns: Any) -> tuple[str, ...] | None:
    """The first SFT layout whose columns the data has, or None."""
    return next((layout for layout in SFT_LAYOUTS if set(layout) <= set(columns)), None)


def prepare_sft_dataset(dataset: Any, system_prompt: str | None) -> Any:
    """Keep only the columns of the data's SFT layout (TRL would otherwise try to collate the rest) and
    add the system prompt to conversational rows that lack one. Used by the sft and distill stages."""
    keep = sft_layout(dataset.column_names) or SFT_LAYOUTS[-1]
    dataset = dataset.select_columns(list(keep))
    if system_prompt and keep[0] in ("messages", "prompt") and isinstance(dataset[0][keep[0]], list):
        dataset = dataset.map(lambda row: {keep[0]: with_system_prompt(row[keep[0]], system_prompt)})
    return dataset


def make_trainer(cls: Any, trainable: Any, args: Any, tokenizer: Any, ctx: StageContext, train: Any,
                 evaluation: Any = None, **extra: Any) -> Any:
    """A TRL trainer of class `cls` for a stage: the model (and the PEFT config it wraps itself) from
    `load_trainable`, the stage's data, align's metrics callback, guard (checkpoints, signals,
    divergence) and console."""
    trainer = cls(model=trainable.model, args=args, train_dataset=train, eval_dataset=evaluation,
                  processing_class=tokenizer, peft_config=trainable.peft_config,
                  callbacks=[metrics_callback(ctx.metrics), guard_callback()], **extra)  # fmt: skip
    return attach_console(trainer, ctx)


def preference_trainer(cls: Any, config: Any, ctx: StageContext, train: Any, evaluation: Any = None) -> Any:
    """A TRL preference trainer (DPOTrainer, KTOTrainer) whose reference is the stage's starting model
    (`frozen_reference`). `config` has `model`, `lora` and `precompute_ref_log_probs`."""
    args = trl_config(config, ctx.artifact("trainer"))  # first: ZeRO-3 partitions only models loaded after it
    tokenizer = load_tokenizer(config.model, padding_side="left")
    precision = config.precision()
    trainable = load_trainable(config.model, config.lora, precision=precision)
    reference = frozen_reference(config.model, config.lora, config.precompute_ref_log_probs, precision)
    return make_trainer(cls, trainable, args, tokenizer, ctx, train, evaluation, ref_model=reference)


def run_metrics(trainer: Any, result: Any) -> dict[str, Any]:
    """`final_train_metrics` plus what the trainer's accelerator really ran with: the world size
    (`num_processes`) and the mixed precision."""
    accelerator = trainer.accelerator
    return {**final_train_metrics(trainer, result), "num_processes": accelerator.num_processes,
            "mixed_precision": str(accelerator.mixed_precision)}  # fmt: skip


def frozen_reference(spec: ModelSpec, lora: LoraSpec | None, precomputed: bool, precision: Precision | None = None) -> Any:
    """The reference model to hand a TRL preference trainer (DPO, KTO) whose reference must be the
    stage's starting model. None with LoRA (the trainer disables the adapter: no second copy) and with
    precomputed reference log-probs (the trainer scores the data with the policy before its first
    step). Otherwise a frozen copy, loaded exactly as the policy is: left to itself, the trainer would
    rebuild it from `model.config._name_or_path`, which for a model merged in memory from an adapter
    folder names the adapter's base — another model."""
    if lora is not None or precomputed:
        return None
    # In the policy's own dtype (float32 masters), not the frozen compute dtype: under the same
    # autocast the two then agree exactly at step 0, and the implicit rewards start at 0.
    return load_causal_lm(spec, precision=precision, trainable=True).requires_grad_(False).eval()


def warmup_step_count(warmup_steps: float, total_steps: int) -> int:
    """transformers' convention: a float below 1 is a share of all steps, anything else whole steps."""
    return math.ceil(warmup_steps * total_steps) if 0 < warmup_steps < 1 else int(warmup_steps)


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or the weights stopped being finite."""


class NothingTrained(RuntimeError):
    """A stage ended without a single optimisation step."""


def _last_good(work_dir: Path) -> str:
    found = complete_checkpoints(work_dir)
    return f"{found[-1].name}, the last complete checkpoint, stays" if found else "no checkpoint was written before it"


def guard_callback(max_kl: float | None = None) -> Any:
    """The callback every TRL stage runs with: marks each checkpoint complete once it is written,
    stops at the next step boundary (after a checkpoint) when a signal asked for it, logs at every
    checkpoint and at the last step (so the logged windows cover every step, across a resume), and
    stops the run when the loss, gradient or weights are no longer finite, or the logged KL to the
    reference exceeds `max_kl` — before a bad checkpoint could be the one a resume picks."""
    from transformers import TrainerCallback

    class _Guard(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if stop_agreed():
                control.should_save = True
                control.should_training_stop = True
            if control.should_save or control.should_training_stop or state.global_step >= state.max_steps:
                control.should_log = True

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            for key in ("loss", "grad_norm"):
                value = (logs or {}).get(key)
                if isinstance(value, float) and not math.isfinite(value):
                    raise TrainingDiverged(f"{key} is {value} at step {state.global_step}: the run diverged (learning "
                                           f"rate too high?); {_last_good(Path(args.output_dir))}")
            kl = (logs or {}).get("kl")
            if max_kl is not None and isinstance(kl, float) and kl > max_kl:
                raise TrainingDiverged(f"the KL to the reference is {kl:.3g} at step {state.global_step}, beyond max_kl "
                                       f"({max_kl:g}); {_last_good(Path(args.output_dir))}")

        def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            folder = checkpoint_dir(Path(args.output_dir), state.global_step)
            if model is not None and not all_finite(model):
                shutil.rmtree(folder, ignore_errors=True)
                raise TrainingDiverged(f"the weights hold NaN or inf at step {state.global_step}; that checkpoint "
                                       f"was removed; {_last_good(Path(args.output_dir))}")
            if state.is_world_process_zero and folder.is_dir():
                mark_complete(folder)

    return _Guard()


def fit(trainer: Any, metrics_path: Path | None = None) -> Any:
    """`trainer.train()`, resumed from the newest complete checkpoint in its output folder if a
    previous attempt left one (metrics logged after that checkpoint are dropped, to be logged again).
    Raises `Interrupted` when a signal stopped it (its checkpoint written), `NothingTrained` after 0 steps."""
    work_dir = Path(trainer.args.output_dir)
    checkpoint = latest_checkpoint(work_dir)
    if checkpoint is not None:
        logger.info("resuming from %s (step %d)", checkpoint, step_of(checkpoint))
        if metrics_path is not None and trainer.is_world_process_zero():
            drop_metrics_after(metrics_path, step_of(checkpoint))
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if checkpoint is not None:
        result.metrics["resumed_from_step"] = step_of(checkpoint)
    if stop_requested() and trainer.state.global_step < trainer.state.max_steps:
        # (a signal during the last step lets the stage finish: its model is one save away)
        raise Interrupted(f"stopped by {signal_name()} at step {trainer.state.global_step}, checkpoint written")
    if trainer.state.global_step == 0:
        raise NothingTrained("training ended after 0 steps (no data left to train on?)")
    return result


def save_trained_model(trainer: Any, tokenizer: Any, out_dir: Path, lora: LoraSpec | None, work_dir: Path,
                       start: ModelSpec) -> None:  # fmt: skip
    """On the main process, save the trained model (the adapter, or merged if `lora.merge`) as the
    stage's model artifact, in the dtype `start` asks for (default: its checkpoint's), and drop the
    trainer's scratch checkpoints."""
    with full_parameters(trainer.model):  # every rank: under ZeRO-3 the shards are gathered for the save
        if trainer.is_world_process_zero():
            save_model(trainer.model, tokenizer, out_dir, merge=bool(lora and lora.merge), dtype=save_dtype(start))
            shutil.rmtree(work_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()


def metrics_callback(writer: MetricsWriter) -> Any:
    """A transformers callback that writes each logged dict to metrics.jsonl as a `train` row (an
    `eval` row when it holds `eval_*` figures), with the step and epoch."""
    from transformers import TrainerCallback

    class _MetricsCallback(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not logs or not state.is_world_process_zero:
                return
            if "train_runtime" in logs and stop_requested() and state.global_step < state.max_steps:
                return  # the end-of-training row of an attempt that stopped early: the resumed one writes it
            values = {"epoch": state.epoch, **_plain(logs)}
            writer.log(metric_kind(values, default=TRAIN), state.global_step, **values)

    return _MetricsCallback()


def attach_console(trainer: Any, ctx: StageContext) -> Any:
    """Replace the trainer's console output (transformers' tqdm bar that prints every logged dict, or
    its printer) with align's: one progress bar and a one-line summary per logging step; the full
    rows go to log.txt (and metrics.jsonl, through `metrics_callback`). Returns the trainer."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class _Console(TrainerCallback):
        progress: StageProgress | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.is_world_process_zero:
                self.progress = StageProgress(ctx.out_dir, ctx.name, state.max_steps)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.progress is not None:
                self.progress.update(state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            # The end-of-training row (train_runtime, mean train_loss) is what the runner's "done" line shows.
            if self.progress is not None and logs and "train_runtime" not in logs:
                self.progress.summary(_plain(logs), state.global_step)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.progress is not None:
                self.progress.close()
                self.progress = None

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_Console())
    return trainer


def run_sft(
    config: TrlStageConfig,
    ctx: StageContext,
    student: ModelSpec,
    train: Any,
    evaluation: Any = None,
    *,
    lora: LoraSpec | None,
    system_prompt: str | None,
    trl_class: str = "trl:SFTConfig",
) -> tuple[Any, dict[str, Any]]:
    """Supervised fine-tuning of `student` on `train` with TRL's `SFTTrainer` (completion-only loss on
    prompt/completion data), saved as the stage's `model` artifact. `config` supplies the SFTConfig
    keys. Returns the trainer and the key metrics, `num_params` (the model's parameters before LoRA)
    among them. Used by the sft stage and by distill's sequence method."""
    from trl import SFTTrainer

    train = prepare_sft_dataset(train, system_prompt)
    evaluation = prepare_sft_dataset(evaluation, system_prompt) if evaluation is not None else None
    tokenizer = load_tokenizer(student, padding_side="right")
    work_dir = ctx.artifact("trainer")
    # The TRL config first: under ZeRO-3 with zero3_init_flag, only a model loaded after it is partitioned at load.
    args = trl_config(config, work_dir, trl_class, eval_strategy="steps" if evaluation is not None else "no")
    trainable = load_trainable(student, lora, precision=config.precision())
    use_stop_tokens(trainable.model, tokenizer, student)  # saved with the model: it stops where its turns end
    num_params = count_parameters(trainable.model)
    trainer = make_trainer(SFTTrainer, trainable, args, tokenizer, ctx, train, evaluation)
    logger.info("%s: %d examples, %s", config.type, len(train), "LoRA" if lora else "full fine-tune")
    result = fit(trainer, ctx.metrics.path)
    metrics = {**final_train_metrics(trainer, result), "num_params": num_params}
    if evaluation is not None:
        metrics["eval_loss"] = round(float(trainer.evaluate()["eval_loss"]), 5)
    save_trained_model(trainer, tokenizer, ctx.artifact("model"), lora, work_dir, student)
    return trainer, metrics


def _plain(logs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in logs.items():
        if isinstance(value, int | float | str | bool) or value is None:
            out[key] = value
        elif hasattr(value, "item"):
            out[key] = value.item()
    return out


def train_loss(log_history: list[dict[str, Any]]) -> float | None:
    """Mean loss per step over the whole run, from the logged window means weighted by their number
    of steps. Unlike transformers' own `training_loss` (the steps of this call only) it stays the
    whole run's mean across a resume; the guard callback logs at every checkpoint and at the last step."""
    previous, total, steps = 0, 0.0, 0
    for entry in log_history:
        if "loss" in entry:
            window = entry["step"] - previous
            total, steps, previous = total + entry["loss"] * window, steps + window, entry["step"]
    return total / steps if steps else None


def final_train_metrics(trainer: Any, result: Any) -> dict[str, Any]:
    """Key figures of a finished training run for the manifest."""
    history = [h for h in trainer.state.log_history if "loss" in h]
    loss = train_loss(trainer.state.log_history)
    metrics: dict[str, Any] = {
        "train_loss": round(float(result.training_loss if loss is None else loss), 5),
        "steps": int(trainer.state.global_step),
        "train_runtime_s": round(float(result.metrics.get("train_runtime", 0.0)), 2),
    }
    if history:
        metrics["first_loss"] = round(float(history[0]["loss"]), 5)
        metrics["last_loss"] = round(float(history[-1]["loss"]), 5)
    if "resumed_from_step" in result.metrics:
        metrics["resumed_from_step"] = result.metrics["resumed_from_step"]
    return metrics
