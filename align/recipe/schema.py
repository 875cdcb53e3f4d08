"""Typed pieces every recipe shares: the run header, model and dataset specs, LoRA, launchers, and the
base every stage config extends. A stage type adds its own fields in `align/stages/<type>.py`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from align.precision import Precision, precision_policy
from align.recipe.aliases import map_reward, note_once

NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_\-]*$"
REFERENCE = re.compile(r"^\$\{stages\.([A-Za-z][A-Za-z0-9_\-]*)\.([A-Za-z_]+)\}$")
REFERENCE_ANYWHERE = re.compile(r"\$\{[^}]*\}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Strict):
    """Which model to load. `name_or_path` is a hub id, a local directory, an embedded name
    (`align:tiny`, `align:tiny-student`) or a reference to an earlier stage (`${stages.sft.model}`)."""

    name_or_path: str = Field(min_length=1)
    revision: str | None = None
    tokenizer: str | None = Field(default=None, description="Tokenizer path if it differs from the model's.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        default=None,
        description="Weights dtype when the model is only run (reference, reward model, teacher, sampling) and the "
        "dtype a trained model is saved in. None: run in the compute dtype (bf16 on a bf16 GPU, float32 on the "
        "CPU), save as the starting checkpoint was; auto: the checkpoint's own dtype (Hugging Face's meaning). "
        "A model being trained keeps float32 master weights either way (see pure_bf16).",
    )
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    chat_template: str | None = Field(
        default=None, description="Override the tokenizer's chat template: Jinja text or a path to a .jinja file."
    )
    eos_token: str | None = Field(
        default=None, description="Set the tokenizer's EOS token (TRL's `eos_token`), e.g. <|im_end|> for a base model "
        "whose chat turns end with it.",
    )
    stop_tokens: list[str] = Field(
        default_factory=list, description="More tokens that end a response, beside EOS and the chat template's end "
        "of turn (found by itself).",
    )


class DataSpec(Strict):
    """A dataset: an embedded task (`align:arithmetic`), a local .jsonl/.json/.parquet/.csv file or a
    `save_to_disk` folder, a `datasets` hub name, or an earlier stage's dataset (`${stages.rs.dataset}`)."""

    path: str = Field(min_length=1)
    name: str | None = Field(default=None, description="Hub dataset config name.")
    split: str = "train"
    num_examples: PositiveInt | None = Field(
        default=None, description="Keep the first N rows (embedded tasks: generate N rows)."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Embedded task parameters.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename columns on load: {old_name: new_name}."
    )
    on_bad_rows: Literal["error", "skip"] = Field(
        default="error",
        description="A row the stage cannot use (a null, empty or wrongly typed field, a malformed line, bytes that "
        "are not UTF-8, a prompt over the token limit): error names its file, line and column and stops before "
        "training; skip drops it, logs it and counts it in the stage's metrics (<key>_skipped_rows).",
    )


def _path_shorthand(key: str) -> BeforeValidator:
    return BeforeValidator(lambda value: {key: value} if isinstance(value, str) else value)


#: A dataset may be written as a bare path string: `dataset: data/train.jsonl`.
Data = Annotated[DataSpec, _path_shorthand("path")]
#: A model may be written as a bare name: `model: align:tiny` or `model: ${stages.sft.model}`.
Model = Annotated[ModelSpec, _path_shorthand("name_or_path")]


class LoraSpec(Strict):
    """LoRA / QLoRA through PEFT; field names are PEFT's `LoraConfig` names."""

    r: PositiveInt = 16
    lora_alpha: PositiveInt = 32
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    load_in_4bit: bool = Field(default=False, description="QLoRA: quantise the frozen base to 4 bit (bitsandbytes, GPU).")
    merge: bool = Field(
        default=False,
        description="Save the stage's model as the base with the adapter merged in (a full checkpoint) instead of the adapter.",
    )


class RewardSpec(Strict):
    """One rule reward in a weighted sum: `{rule: accuracy, weight: 1.0, params: {...}}`. `rule` is a
    name from `reward_rules`, a dotted import path (`pkg.mod:func`), a file (`my_rules.py:func`) or an
    entry point of group `align.reward_rules`."""

    rule: str = Field(min_length=1)
    weight: float = 1.0
    params: dict[str, Any] = Field(default_factory=dict)
    name: str | None = Field(default=None, description="Name to log it under (default: the rule's name).")
    timeout_s: float | None = Field(default=None, gt=0, description="Wall-clock limit per call; a sample past it scores None.")

    @model_validator(mode="before")
    @classmethod
    def _ported_name(cls, data: Any) -> Any:
        """open-r1's and TRL's reward names and parameter names become align's (one notice each)."""
        if isinstance(data, dict) and isinstance(data.get("rule"), str) and isinstance(data.get("params", {}), dict):
            params = data.get("params") or {}
            rule, mapped, notice = map_reward(data["rule"].strip(), params)
            if notice is not None:
                note_once(notice, (data["rule"], tuple(sorted(params))))
                data = {**data, "rule": rule, "params": mapped}
        return data

    @property
    def display_name(self) -> str:
        """The name the reward is logged, weighted and thresholded under."""
        return self.name or self.rule.rsplit(":", 1)[-1]


class LauncherSpec(Strict):
    """How a stage's process is started. `inprocess` runs it inside `align run`; `subprocess` in a fresh
    Python; `accelerate` under `accelerate launch` (multi-GPU / DeepSpeed via `config_file`)."""

    type: Literal["inprocess", "subprocess", "accelerate"] = "inprocess"
    config_file: str | None = None
    num_processes: PositiveInt | None = None
    main_process_port: int | None = Field(default=None, ge=1, le=65535)
    extra_args: list[str] = Field(default_factory=list)


class StageConfig(Strict):
    """Fields every stage has. Stage types subclass this with their own typed fields."""

    #: TRL config class whose remaining fields a stage accepts as-is (learning_rate, beta, …).
    trl_config_class: ClassVar[str | None] = None
    #: Keys of `trl_config_class` that align sets itself.
    reserved_trl_keys: ClassVar[frozenset[str]] = frozenset(
        {"output_dir", "overwrite_output_dir", "do_train", "do_eval", "do_predict", "local_rank", "logging_dir"}
    )

    name: str = Field(pattern=NAME_PATTERN)
    type: str
    model: Model | None = Field(default=None, description="Defaults to the recipe's `model`.")
    seed: int | None = Field(default=None, description="Defaults to the recipe's `seed`.")
    launcher: LauncherSpec | None = Field(default=None, description="Defaults to the recipe's `launcher`.")


def _tracker_list(value: Any) -> Any:
    # `report_to: tensorboard` is shorthand for `[tensorboard]`; `none` means no tracker.
    value = [value] if isinstance(value, str) else value
    if isinstance(value, list) and "none" in value and len(value) > 1:
        raise ValueError("'none' cannot be combined with other trackers")
    return value


#: Experiment trackers (TRL's `report_to` names): `tensorboard`, `wandb`, or `none`.
ReportTo = Annotated[list[Literal["tensorboard", "wandb", "none"]], BeforeValidator(_tracker_list)]


class TrainingKnobs(BaseModel):
    """The optimiser/scheduler knobs tuned most often, typed and bounded. Names are TRL's/transformers'
    `TrainingArguments` names; every other field of the stage's TRL config is accepted as well."""

    learning_rate: PositiveFloat = 2e-5
    num_train_epochs: PositiveFloat = 1.0
    max_steps: int = Field(default=-1, ge=-1, description="-1: run num_train_epochs.")
    per_device_train_batch_size: PositiveInt = 8
    gradient_accumulation_steps: PositiveInt = 1
    weight_decay: float = Field(default=0.0, ge=0.0)
    warmup_steps: float = Field(
        default=0, ge=0, description="Linear warm-up: whole steps, or a float in [0, 1) as a share of all steps."
    )
    lr_scheduler_type: str = "linear"
    max_grad_norm: float = Field(default=1.0, ge=0.0)
    logging_steps: PositiveInt = 10
    bf16: bool | None = Field(default=None, description="bf16 autocast. None: on when the GPU supports bf16, off on CPU.")
    fp16: bool | None = Field(default=None, description="fp16 autocast. None: on for a GPU without bf16.")
    pure_bf16: bool = Field(
        default=False, description="Train bf16 weights (no float32 master copy): less memory, small updates are lost."
    )
    gradient_checkpointing: bool | None = Field(default=None, description="None: on for GPU, off on CPU.")
    report_to: ReportTo | None = Field(
        default=None, description="Trackers (tensorboard, wandb, none); default: the recipe's `report_to`."
    )

    @model_validator(mode="after")
    def _one_precision(self) -> TrainingKnobs:
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both on; choose one")
        if self.pure_bf16 and (self.bf16 is False or self.fp16):
            raise ValueError("pure_bf16 trains bf16 weights: it needs bf16 compute (leave bf16 unset or true, fp16 off)")
        return self

    def precision(self) -> Precision:
        """How this stage computes and which dtypes it loads, on this process's device."""
        return precision_policy(self.bf16, self.fp16, self.pure_bf16)


class TrlStageConfig(StageConfig, TrainingKnobs):
    """A stage trained by a TRL trainer (`trl_config_class`): every other field of that TRL config is
    accepted on the stage as-is, under TRL's name, and type-checked against TRL's own annotation."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)


class SamplingKnobs(BaseModel):
    """The shared sampler's settings (eval, rejection sampling, distillation traces), under TRL's names.
    A stage type re-declares a field to give it its own default."""

    temperature: float = Field(default=1.0, ge=0.0, description="0 = greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, description="Sampling top-k; None/0 = off.")
    max_completion_length: PositiveInt = 512
    generation_batch_size: PositiveInt = Field(default=64, description="Sequences generated at once (HF generate).")
    use_vllm: bool = False
    vllm_gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    vllm_tensor_parallel_size: PositiveInt = 1
    vllm_max_model_length: PositiveInt | None = None


#: A failed sample gets no reward from the rule, which in a group-relative advantage reads like a
#: wrong answer: at a tenth of the samples that is already a tenth of the rule's signal turned to
#: noise, while a working rule fails on next to none (a pathological output now and then).
MAX_RULE_FAILURE_RATE = 0.1
#: Enough samples for a share to mean something: one bad first batch of 2 stops nothing.
RULE_FAILURE_MIN_SAMPLES = 64


class RuleFailureKnobs(BaseModel):
    """When a reward rule that misbehaves (raises, times out, returns NaN/±inf or no number) stops the
    stage scoring with it, instead of training on silently. Every failed sample scores None (no
    reward from that rule) and is counted in `<rule>_failures`."""

    max_rule_failure_rate: float = Field(
        default=MAX_RULE_FAILURE_RATE, ge=0.0, le=1.0,
        description="Stop the stage once a rule has failed on more than this share of the samples it scored "
        "(1: never stop).",
    )
    rule_failure_min_samples: PositiveInt = Field(
        default=RULE_FAILURE_MIN_SAMPLES, description="Samples a rule must have scored before its failure share is judged.",
    )


class RecipeHeader(Strict):
    """Run-level settings; `stages` is validated per stage type afterwards."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    seed: int = 0
    run_dir: str | None = Field(default=None, description="Default: ./runs/<name>.")
    model: Model
    launcher: LauncherSpec = Field(default_factory=LauncherSpec)
    report_to: ReportTo | None = Field(
        default=None, description="Trackers for every stage that trains (tensorboard, wandb, none); default none."
    )
    stages: list[dict[str, Any]] = Field(min_length=1)


#: The spec types whose fields name files, folders or models.
PathSpec = ModelSpec | DataSpec | RewardSpec


def walk_specs(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], PathSpec]]:
    """Every model, dataset and reward spec inside a config, with its key path (`("rewards", 0)`)."""
    if isinstance(value, ModelSpec | DataSpec | RewardSpec):
        yield path, value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from walk_specs(getattr(value, name), (*path, name))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from walk_specs(item, (*path, i))
