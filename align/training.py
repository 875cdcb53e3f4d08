"""Glue between a stage's typed config and a TRL trainer: building the TRL config with device-sane
defaults, logging trainer metrics into the stage's metrics.jsonl, saving the trained model, the
reference model of the preference trainers, and the one SFT routine the sft and distill stages share."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.artifacts import TRAIN, MetricsWriter, metric_kind
from align.console import StageProgress
from align.data import SFT_NEEDS, with_system_prompt
from align.models import (
    load_causal_lm,
    load_tokenizer,
    load_trainable,
    save_dtype,
    save_model,
    use_gradient_checkpointing,
    use_stop_tokens,
)
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
    kwargs.setdefault("save_strategy", "no")
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
    `load_trainable`, the stage's data, align's metrics callback and console."""
    trainer = cls(model=trainable.model, args=args, train_dataset=train, eval_dataset=evaluation,
                  processing_class=tokenizer, peft_config=trainable.peft_config,
                  callbacks=[metrics_callback(ctx.metrics)], **extra)  # fmt: skip
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


def save_trained_model(trainer: Any, tokenizer: Any, out_dir: Path, lora: LoraSpec | None, work_dir: Path,
                       start: ModelSpec) -> None:  # fmt: skip
    """On the main process, save the trained model (the adapter, or merged if `lora.merge`) as the
    stage's model artifact, in the dtype `start` asks for (default: its checkpoint's), and drop the
    trainer's scratch checkpoints."""
    if trainer.is_world_process_zero():
        save_model(trainer.model, tokenizer, out_dir, merge=bool(lora and lora.merge), dtype=save_dtype(start))
        shutil.rmtree(work_dir, ignore_errors=True)


def metrics_callback(writer: MetricsWriter) -> Any:
    """A transformers callback that writes each logged dict to metrics.jsonl as a `train` row (an
    `eval` row when it holds `eval_*` figures), with the step and epoch."""
    from transformers import TrainerCallback

    class _MetricsCallback(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if logs and state.is_world_process_zero:
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
    trainable = load_trainable(student, lora, precision=config.precision())
    use_stop_tokens(trainable.model, tokenizer, student)  # saved with the model: it stops where its turns end
    num_params = sum(p.numel() for p in trainable.model.parameters())
    work_dir = ctx.artifact("trainer")
    args = trl_config(config, work_dir, trl_class, eval_strategy="steps" if evaluation is not None else "no")
    trainer = make_trainer(SFTTrainer, trainable, args, tokenizer, ctx, train, evaluation)
    logger.info("%s: %d examples, %s", config.type, len(train), "LoRA" if lora else "full fine-tune")
    result = trainer.train()
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


def final_train_metrics(trainer: Any, result: Any) -> dict[str, Any]:
    """Key figures of a finished training run for the manifest."""
    history = [h for h in trainer.state.log_history if "loss" in h]
    metrics: dict[str, Any] = {
        "train_loss": round(float(result.training_loss), 5),
        "steps": int(trainer.state.global_step),
        "train_runtime_s": round(float(result.metrics.get("train_runtime", 0.0)), 2),
    }
    if history:
        metrics["first_loss"] = round(float(history[0]["loss"]), 5)
        metrics["last_loss"] = round(float(history[-1]["loss"]), 5)
    return metrics
