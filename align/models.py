"""Model and tokenizer loading shared by every stage: embedded names, local folders, hub ids, PEFT
adapters; device and dtype decisions; LoRA/QLoRA; saving loadable checkpoints.

`load_trainable` is the one way a stage gets a model to train (full, LoRA or QLoRA, causal LM or
sequence classifier); `load_causal_lm` / `load_sequence_classifier` load frozen ones (references,
reward models, teachers, samplers)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from align.embedded import EMBEDDED_MODELS, embedded_model_path, is_embedded
from align.paths import resolve_user_path
from align.recipe.schema import LoraSpec, ModelSpec

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def model_spec_problem(spec: ModelSpec, base_dir: Path) -> str | None:
    """Why a model spec cannot be loaded, judged without the network; None when it looks loadable."""
    name = spec.name_or_path
    if is_embedded(name):
        if name not in EMBEDDED_MODELS:
            return f"unknown embedded model '{name}'; known: {', '.join(EMBEDDED_MODELS)}"
        return None
    path = resolve_user_path(name, base_dir)
    if path.exists():
        if not path.is_dir():
            return f"model path {name} is a file; expected a Hugging Face model folder"
        if not ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
            return f"model folder {name} has no config.json or adapter_config.json"
        return None
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return f"model folder not found: {name}"
    if not HUB_ID.match(name):
        return f"'{name}' is neither an existing folder nor a hub id like 'org/model'"
    return None  # a hub id: reachable or not is only known when it is downloaded


def resolve_model_path(name_or_path: str, base_dir: Path | None = None) -> str:
    """Embedded names become their built folder; local paths are made absolute; hub ids pass through."""
    if is_embedded(name_or_path):
        return str(embedded_model_path(name_or_path))
    path = resolve_user_path(name_or_path, base_dir or Path.cwd())
    return str(path.resolve()) if path.exists() else name_or_path


def device() -> str:
    """This process's device: its own GPU under a multi-process launcher (LOCAL_RANK), else the CPU."""
    import os

    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def use_bf16(requested: bool | None) -> bool:
    import torch

    if requested is not None:
        return requested
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def use_gradient_checkpointing(requested: bool | None) -> bool:
    import torch

    # TRL turns it on everywhere; on CPU (and for tiny models) it only costs time.
    return requested if requested is not None else torch.cuda.is_available()


def torch_dtype(spec: ModelSpec) -> torch.dtype | str:
    import torch

    if spec.dtype == "auto":
        return torch.bfloat16 if use_bf16(None) else torch.float32
    return getattr(torch, spec.dtype)


def is_adapter(path: str) -> bool:
    return Path(path, "adapter_config.json").exists()


def load_tokenizer(spec: ModelSpec, path: str | None = None, padding_side: str = "left") -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    source = spec.tokenizer or path or resolve_model_path(spec.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.chat_template:
        tokenizer.chat_template = chat_template_text(spec.chat_template)
    tokenizer.padding_side = padding_side
    return tokenizer


def chat_template_text(value: str) -> str:
    """A chat template given inline (Jinja) or as a path to a .jinja file."""
    path = Path(value).expanduser()
    return path.read_text(encoding="utf-8") if "{" not in value and path.is_file() else value


def model_init_kwargs(spec: ModelSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": torch_dtype(spec), "trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    return kwargs


def load_causal_lm(
    spec: ModelSpec, path: str | None = None, *, merge_adapter: bool = True, quantization: Any = None
) -> PreTrainedModel:
    """Load a causal LM; a PEFT adapter folder loads onto its base and, by default, is merged so the
    caller gets a plain model to train further or generate from."""
    from transformers import AutoModelForCausalLM

    source = path or resolve_model_path(spec.name_or_path)
    kwargs = model_init_kwargs(spec)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if is_adapter(source):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(source, **kwargs)
        return model.merge_and_unload() if merge_adapter else model
    return AutoModelForCausalLM.from_pretrained(source, **kwargs)


def peft_config(lora: LoraSpec, task_type: str = "CAUSAL_LM") -> Any:
    from peft import LoraConfig

    return LoraConfig(
        task_type=task_type,
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
    )


@dataclass
class Trainable:
    """A model ready to train and, for a LoRA run that a TRL trainer wraps itself, the PEFT config to
    hand it (`peft_config=`); None for a full fine-tune or a model that is already a `PeftModel`."""

    model: Any
    peft_config: Any = None


def load_trainable(
    spec: ModelSpec,
    lora: LoraSpec | None = None,
    *,
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm",
    wrap_lora: bool = False,
    gradient_checkpointing: bool = False,
) -> Trainable:
    """The one loader for a model a stage trains: full, LoRA or QLoRA (`lora.load_in_4bit`: the frozen
    base quantised to 4 bit and prepared for k-bit training), causal LM or sequence classifier (new
    scalar head for reward and value models).

    With `wrap_lora` (a loop of align's own, not a TRL trainer) the adapter is applied here and
    `gradient_checkpointing` switched on here; a TRL trainer does both itself from its config."""
    quantization = quantization_config(lora)
    if task == "causal_lm":
        model = load_causal_lm(spec, quantization=quantization)
    else:
        model = load_sequence_classifier(spec, quantization=quantization)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing or not wrap_lora)
    elif wrap_lora and gradient_checkpointing:
        model.gradient_checkpointing_enable()
    config = peft_config(lora, task_type="CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS") if lora else None
    if not wrap_lora or config is None:
        return Trainable(model, config)
    from peft import get_peft_model

    model = get_peft_model(model, config)
    if gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return Trainable(model)


def quantization_config(lora: LoraSpec | None) -> Any:
    if lora is None or not lora.load_in_4bit:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def save_model(model: Any, tokenizer: Any, out_dir: Path, *, merge: bool = False) -> None:
    """Save a loadable checkpoint: a full model, or a PEFT adapter (merged into a full model if asked)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def load_sequence_classifier(
    spec: ModelSpec, path: str | None = None, *, num_labels: int = 1, quantization: Any = None
) -> PreTrainedModel:
    """A sequence-classification model (reward or value model) from any checkpoint: a reward model,
    a causal LM (the head is new), or a PEFT adapter of either (merged). `pad_token_id` is always set,
    because the head pools at the last non-pad token and cannot find it without one."""
    from transformers import AutoModelForSequenceClassification

    source = path or resolve_model_path(spec.name_or_path)
    kwargs = model_init_kwargs(spec)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if is_adapter(source):
        task = json.loads(Path(source, "adapter_config.json").read_text(encoding="utf-8")).get("task_type")
        if task == "SEQ_CLS":
            from peft import AutoPeftModelForSequenceClassification

            model = AutoPeftModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, **kwargs)
            model = model.merge_and_unload()
        else:
            # A causal-LM adapter: merge it, then move the backbone weights under a fresh head.
            causal = load_causal_lm(spec, source)
            causal.config.num_labels = num_labels
            model = AutoModelForSequenceClassification.from_config(causal.config, dtype=causal.dtype)
            model.load_state_dict(causal.state_dict(), strict=False)
    else:
        from transformers.utils import logging as hf_logging

        # "score.weight newly initialised" is the expected outcome for a causal LM, not a problem.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        tokenizer = load_tokenizer(spec, None if spec.tokenizer else source)
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def checkpoint_parameter_count(path: str) -> int | None:
    """Parameters of a local full checkpoint, read from its safetensors headers without loading any
    weights (a teacher used only through its traces need not be loaded to be measured). None for hub
    ids, adapters and other formats."""
    import math

    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() and not is_adapter(path) else []
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118
    return total
