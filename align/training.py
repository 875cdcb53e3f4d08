"""Glue between a stage's typed config and a TRL trainer: building the TRL config with device-sane
defaults, and logging trainer metrics into the stage's metrics.jsonl."""

from __future__ import annotations

import importlib
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from align.artifacts import MetricsWriter
from align.models import save_model, use_bf16, use_gradient_checkpointing
from align.recipe.schema import LoraSpec, StageConfig, TrainingKnobs
from align.recipe.validate import trl_config_fields

logger = logging.getLogger("align")


def trl_config(config: StageConfig, output_dir: Path, config_class: str | None = None, **fixed: Any) -> Any:
    """Build the stage's TRL config: its typed knobs, every passed-through TRL key, then `fixed`
    (values the stage itself decides). bf16 and gradient checkpointing are decided per device.
    `config_class` ("module:Class") overrides the stage's `trl_config_class`, for a stage that drives
    one of two trainers (distill: SFT or GKD); only that class's fields are taken from the config."""
    import torch

    dotted = config_class or config.trl_config_class
    assert dotted is not None
    module_name, _, class_name = dotted.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    fields = trl_config_fields(dotted)
    values = config.model_dump()
    kwargs: dict[str, Any] = {k: v for k, v in values.items() if k in fields and k not in ("model",)}
    kwargs.update({k: v for k, v in (config.model_extra or {}).items() if config_class is None or k in fields})
    if isinstance(config, TrainingKnobs):
        kwargs["bf16"] = use_bf16(config.bf16)
        kwargs["gradient_checkpointing"] = use_gradient_checkpointing(config.gradient_checkpointing)
    kwargs.setdefault("report_to", "none")
    kwargs.setdefault("save_strategy", "no")
    kwargs.setdefault("seed", config.seed or 0)
    kwargs.setdefault("data_seed", config.seed or 0)
    kwargs.setdefault("use_cpu", not torch.cuda.is_available())
    kwargs.update(fixed)
    return cls(output_dir=str(output_dir), **kwargs)


#: Column layouts SFT understands, in the order they are tried.
SFT_LAYOUTS: tuple[tuple[str, ...], ...] = (("messages",), ("prompt", "completion"), ("text",))


def sft_layout(columns: Any) -> tuple[str, ...] | None:
    """The first SFT layout whose columns the data has, or None."""
    return next((layout for layout in SFT_LAYOUTS if set(layout) <= set(columns)), None)


def prepare_sft_dataset(dataset: Any, system_prompt: str | None) -> Any:
    """Keep only the columns of the data's SFT layout (TRL would otherwise try to collate the rest) and
    add the system prompt to conversational rows that lack one. Used by the sft and distill stages."""
    from align.generation import with_system_prompt

    keep = sft_layout(dataset.column_names) or SFT_LAYOUTS[-1]
    dataset = dataset.select_columns(list(keep))
    if system_prompt and keep[0] in ("messages", "prompt") and isinstance(dataset[0][keep[0]], list):
        dataset = dataset.map(lambda row: {keep[0]: with_system_prompt(row[keep[0]], system_prompt)})
    return dataset


def warmup_step_count(warmup_steps: float, total_steps: int) -> int:
    """transformers' convention: a float below 1 is a share of all steps, anything else whole steps."""
    return math.ceil(warmup_steps * total_steps) if 0 < warmup_steps < 1 else int(warmup_steps)


def save_trained_model(trainer: Any, tokenizer: Any, out_dir: Path, lora: LoraSpec | None, work_dir: Path) -> None:
    """On the main process, save the trained model (the adapter, or merged if `lora.merge`) as the
    stage's model artifact and drop the trainer's scratch checkpoints."""
    if trainer.is_world_process_zero():
        save_model(trainer.model, tokenizer, out_dir, merge=bool(lora and lora.merge))
        shutil.rmtree(work_dir, ignore_errors=True)


def metrics_callback(writer: MetricsWriter) -> Any:
    """A transformers callback that appends each logged dict (with step/epoch) to metrics.jsonl."""
    from transformers import TrainerCallback

    class _MetricsCallback(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if logs and state.is_world_process_zero:
                writer.write({"step": state.global_step, "epoch": state.epoch, **_plain(logs)})

    return _MetricsCallback()


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
