"""Model and tokenizer loading shared by every stage: embedded names, local folders, hub ids, PEFT
adapters; dtypes (by the policy in `align.precision`); LoRA/QLoRA; stop tokens; new heads seeded;
saving loadable checkpoints.

`load_trainable` is the one way a stage gets a model to train (full, LoRA or QLoRA, causal LM or
sequence classifier, float32 master weights); `load_causal_lm` / `load_sequence_classifier` load
frozen ones (references, reward models, teachers, samplers) in the compute dtype."""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from align.embedded import EMBEDDED_MODELS, embedded_model_path, is_embedded
from align.paths import resolve_user_path
from align.precision import Precision, checkpoint_dtype, precision_policy
from align.recipe.schema import LoraSpec, ModelSpec

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger("align")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def model_spec_problem(spec: ModelSpec, base_dir: Path) -> str | None:
    """Why a model spec cannot be loaded, judged without the network; None when it looks loadable."""
    name = spec.name_or_path
    if is_embedded(name):
        if name not in EMBEDDED_MODELS:
            return f"unknown embedded model '{name}'; known: {', '.join(EMBEDDED_MODELS)}"
        return _token_problem(spec, base_dir)
    path = resolve_user_path(name, base_dir)
    if path.exists():
        if not path.is_dir():
            return f"model path {name} is a file; expected a Hugging Face model folder"
        if not ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
            return f"model folder {name} has no config.json or adapter_config.json"
        return _token_problem(spec, base_dir)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return f"model folder not found: {name}"
    if not HUB_ID.match(name):
        return f"'{name}' is neither an existing folder nor a hub id like 'org/model'"
    return None  # a hub id: reachable or not is only known when it is downloaded


def _token_problem(spec: ModelSpec, base_dir: Path) -> str | None:
    """`eos_token` and `stop_tokens` must be tokens of a local model's tokenizer."""
    named = [t for t in (spec.eos_token, *spec.stop_tokens) if t]
    if not named:
        return None
    from transformers import AutoTokenizer

    source = resolve_user_path(spec.tokenizer, base_dir) if spec.tokenizer else resolve_model_path(spec.name_or_path, base_dir)
    try:
        vocab = AutoTokenizer.from_pretrained(str(source)).get_vocab()
    except (OSError, ValueError):
        return None  # no local tokenizer to check against
    missing = [t for t in named if t not in vocab]
    return f"{', '.join(repr(t) for t in missing)} not a token of {spec.name_or_path}'s tokenizer (eos_token / stop_tokens)" if missing else None


def resolve_model_path(name_or_path: str, base_dir: Path | None = None) -> str:
    """Embedded names become their built folder; local paths are made absolute; hub ids pass through."""
    if is_embedded(name_or_path):
        return str(embedded_model_path(name_or_path))
    path = resolve_user_path(name_or_path, base_dir or Path.cwd())
    return str(path.resolve()) if path.exists() else name_or_path


def local_model_dir(spec: ModelSpec, base_dir: Path) -> Path | None:
    """The folder a spec's model is in (an embedded model's build, a local folder), or None (hub ids)."""
    if is_embedded(spec.name_or_path):
        return embedded_model_path(spec.name_or_path) if spec.name_or_path in EMBEDDED_MODELS else None
    path = resolve_user_path(spec.name_or_path, base_dir)
    return path if path.is_dir() else None


def model_config(spec: ModelSpec, base_dir: Path) -> dict[str, Any] | None:
    """The model's config.json as a dict, read without loading weights: a local or embedded folder
    (an adapter's base), else the Hugging Face cache (offline); None when it cannot be read."""
    return _model_config(spec.name_or_path, spec.revision, base_dir)


@functools.lru_cache(maxsize=64)  # validation asks once per stage; a hub lookup costs ~1 s
def _model_config(name_or_path: str, revision: str | None, base_dir: Path) -> dict[str, Any] | None:
    spec = ModelSpec(name_or_path=name_or_path, revision=revision)
    folder = local_model_dir(spec, base_dir)
    if folder is not None:
        if (folder / "config.json").exists():
            return json.loads((folder / "config.json").read_text(encoding="utf-8"))
        adapter = folder / "adapter_config.json"
        base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path") if adapter.exists() else None
        return _model_config(base, None, base_dir) if base else None
    if not HUB_ID.match(spec.name_or_path):
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(spec.name_or_path, revision=spec.revision, local_files_only=True).to_dict()
    except Exception:  # not in the cache (or not a model): unknown offline
        return None


def context_length(spec: ModelSpec, base_dir: Path) -> int | None:
    """The model's context in tokens (`max_position_embeddings`), or None when its config is not readable."""
    config = model_config(spec, base_dir)
    if config is None:
        return None
    value = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    return int(value) if value else None


def vocabulary_mismatch(a: ModelSpec | None, b: ModelSpec | None, base_dir: Path, names: tuple[str, str]) -> str | None:
    """Why models `a` and `b` (called `names` in the message) do not share a vocabulary — different
    embedding sizes or token→id maps — or None when they do or it cannot be known offline (hub ids
    not in the cache, outputs of stages that have not run)."""
    if a is None or b is None:
        return None
    specs = (a, b)
    if all(s.name_or_path in EMBEDDED_MODELS and not s.tokenizer for s in specs):
        same = EMBEDDED_MODELS[a.name_or_path].tokenizer == EMBEDDED_MODELS[b.name_or_path].tokenizer
        return None if same else f"{a.name_or_path} and {b.name_or_path} use different embedded tokenizers"
    dirs = [local_model_dir(s, base_dir) for s in specs]
    if any(d is None for d in dirs):
        return None
    sizes = [(model_config(s, base_dir) or {}).get("vocab_size") for s in specs]
    if None not in sizes and sizes[0] != sizes[1]:
        return f"{names[0]} vocab_size {sizes[0]} ≠ {names[1]} vocab_size {sizes[1]}"
    from transformers import AutoTokenizer

    vocabularies = [AutoTokenizer.from_pretrained(s.tokenizer or str(d)).get_vocab() for s, d in zip(specs, dirs, strict=True)]
    if vocabularies[0] != vocabularies[1]:
        differing = sorted(set(vocabularies[0].items()) ^ set(vocabularies[1].items()))[:3]
        return f"their tokenizers map tokens to ids differently (e.g. {differing})"
    return None


def device() -> str:
    """This process's device: its own GPU under a multi-process launcher (LOCAL_RANK), else the CPU."""
    import os

    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def use_gradient_checkpointing(requested: bool | None) -> bool:
    import torch

    # TRL turns it on everywhere; on CPU (and for tiny models) it only costs time.
    return requested if requested is not None else torch.cuda.is_available()


def load_dtype(spec: ModelSpec, role_dtype: str) -> torch.dtype | str:
    """The dtype to load `spec` in: what the spec names (`auto`: the checkpoint's own), else the
    dtype its role asks for (`Precision.frozen_dtype` / `.trainable_dtype`)."""
    import torch

    name = spec.dtype or role_dtype
    return "auto" if name == "auto" else getattr(torch, name)


def save_dtype(spec: ModelSpec) -> str | None:
    """The dtype a trained model is saved in: the spec's, else its starting checkpoint's (None: as is)."""
    if spec.dtype not in (None, "auto"):
        return spec.dtype
    return checkpoint_dtype(resolve_model_path(spec.name_or_path))


def is_adapter(path: str) -> bool:
    return Path(path, "adapter_config.json").exists()


def load_tokenizer(spec: ModelSpec, path: str | None = None, padding_side: str = "left") -> PreTrainedTokenizerBase:
    """The spec's tokenizer with its overrides applied (chat template, `eos_token`), a pad token
    (EOS when it has none), and the padding side the caller needs."""
    from transformers import AutoTokenizer

    source = spec.tokenizer or path or resolve_model_path(spec.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    if spec.chat_template:
        tokenizer.chat_template = chat_template_text(spec.chat_template)
    if spec.eos_token:
        if spec.eos_token not in tokenizer.get_vocab():
            raise ValueError(f"eos_token {spec.eos_token!r} is not a token of {source}'s tokenizer")
        tokenizer.eos_token = spec.eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


#: Stands in for an assistant reply when the chat template is rendered to find what ends a turn.
_REPLY = "\u2063align-reply\u2063"


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The token the chat template writes right after an assistant reply (`<|im_end|>` for ChatML,
    `<|eot_id|>` for Llama 3), found by rendering one; None without a template or a special token there."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _REPLY}], tokenize=False
        )
    except Exception:  # a template that rejects this conversation tells us nothing
        return None
    if _REPLY not in text:
        return None
    after = text.split(_REPLY, 1)[1]
    specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
    return next((token for token in specials if token and after.lstrip(" ").startswith(token)), None)


def stop_token_ids(model: Any, tokenizer: Any, extra: list[str] | tuple[str, ...] = ()) -> list[int]:
    """Every id that ends a response: the model's `generation_config` EOS ids, the tokenizer's EOS, the
    chat template's end of turn (a chat-templated base model such as Qwen2.5 ends turns with
    `<|im_end|>` but has EOS `<|endoftext|>`), and the spec's `stop_tokens`."""
    config = getattr(model, "generation_config", None)
    ids = config.eos_token_id if config is not None else None
    found: list[int] = [ids] if isinstance(ids, int) else list(ids or [])
    vocab = tokenizer.get_vocab()
    names = [tokenizer.eos_token, end_of_turn_token(tokenizer), *extra]
    for name in names:
        if name is None:
            continue
        if name not in vocab:
            raise ValueError(f"stop token {name!r} is not a token of the tokenizer")
        if vocab[name] not in found:
            found.append(vocab[name])
    return found


def use_stop_tokens(model: Any, tokenizer: Any, spec: ModelSpec) -> list[int]:
    """Write the stop ids into the model's generation config, where TRL's generation (and every saved
    checkpoint) reads them; returns them."""
    ids = stop_token_ids(model, tokenizer, spec.stop_tokens)
    model.generation_config.eos_token_id = ids
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return ids


def chat_template_text(value: str) -> str:
    """A chat template given inline (Jinja) or as a path to a .jinja file."""
    path = Path(value).expanduser()
    return path.read_text(encoding="utf-8") if "{" not in value and path.is_file() else value


def model_init_kwargs(spec: ModelSpec, dtype: torch.dtype | str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    return kwargs


def _dtype_for(spec: ModelSpec, precision: Precision | None, trainable: bool) -> torch.dtype | str:
    """Trainable: float32 master weights (bf16 with `pure_bf16`), whatever the spec says; frozen: the
    spec's dtype, else the compute dtype."""
    import torch

    precision = precision or precision_policy()
    if trainable:
        if spec.dtype in ("bfloat16", "float16") and not precision.pure_bf16:
            logger.info("%s: training float32 master weights (%s compute); set pure_bf16: true to train %s weights",
                        spec.name_or_path, precision.mixed, spec.dtype)
        return getattr(torch, precision.trainable_dtype)
    return load_dtype(spec, precision.frozen_dtype)


def load_causal_lm(
    spec: ModelSpec,
    path: str | None = None,
    *,
    precision: Precision | None = None,
    trainable: bool = False,
    merge_adapter: bool = True,
    quantization: Any = None,
) -> PreTrainedModel:
    """Load a causal LM in the dtype its role takes under `precision` (default: the device's own): a
    frozen model in the compute dtype, a trainable one in float32. A PEFT adapter folder loads onto
    its base and, by default, is merged so the caller gets a plain model to train or generate from."""
    from transformers import AutoModelForCausalLM

    source = path or resolve_model_path(spec.name_or_path)
    kwargs = model_init_kwargs(spec, _dtype_for(spec, precision, trainable))
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
    precision: Precision | None = None,
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm",
    seed: int = 0,
    wrap_lora: bool = False,
    gradient_checkpointing: bool = False,
) -> Trainable:
    """The one loader for a model a stage trains: full, LoRA or QLoRA (`lora.load_in_4bit`: the frozen
    base quantised to 4 bit and prepared for k-bit training), causal LM or sequence classifier (a new
    scalar head for reward and value models, initialised from `seed`). A full fine-tune gets float32
    master weights (bf16 with `precision.pure_bf16`); a LoRA base loads in the compute dtype.

    With `wrap_lora` (a loop of align's own, not a TRL trainer) the adapter is applied here and
    `gradient_checkpointing` switched on here; a TRL trainer does both itself from its config."""
    quantization = quantization_config(lora)
    # Under LoRA the base is frozen: it loads like any frozen model (the compute dtype), and PEFT
    # keeps the adapter weights, the only ones that learn, in float32.
    full = lora is None
    if task == "causal_lm":
        model = load_causal_lm(spec, precision=precision, trainable=full, quantization=quantization)
    else:
        model = load_sequence_classifier(spec, precision=precision, trainable=full, seed=seed, quantization=quantization)
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


def materialize_merged(spec: ModelSpec, out_dir: Path, precision: Precision | None = None) -> ModelSpec:
    """`spec` itself when it names a full checkpoint; for an unmerged PEFT adapter, the adapter merged
    into its base and saved in `out_dir` (float32), and a spec pointing there — for trainers that
    rebuild a reference model from the policy's `config._name_or_path` (TRL's GRPO, RLOO, DPO)."""
    source = resolve_model_path(spec.name_or_path)
    if not is_adapter(source):
        return spec
    load_causal_lm(spec, precision=precision, trainable=True).save_pretrained(str(out_dir))
    load_tokenizer(spec).save_pretrained(str(out_dir))
    return spec.model_copy(update={"name_or_path": str(out_dir), "tokenizer": None, "chat_template": None})


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


def count_parameters(model: Any) -> int:
    """Parameters of `model`, whole even where ZeRO-3 holds only this rank's shard (`ds_numel`)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


def is_partitioned(model: Any) -> bool:
    """Whether DeepSpeed ZeRO-3 partitioned the parameters (each rank holds a shard; `p.data` is empty)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextmanager
def full_parameters(model: Any) -> Iterator[None]:
    """Inside, every parameter is whole on every rank, also under ZeRO-3 — where a plain rank-0
    `save_pretrained` would write zero-element tensors. Every rank must enter it (it all-gathers); a
    model that is not partitioned passes through. The gathered copy costs one full model per rank, for
    the length of the save."""
    if not is_partitioned(model):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


def all_finite(model: Any) -> bool:
    """No parameter holds NaN or inf."""
    import torch

    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.numel())


class NonFiniteWeights(RuntimeError):
    """A model about to be published holds NaN or inf."""


def save_model(model: Any, tokenizer: Any, out_dir: Path, *, merge: bool = False, dtype: str | None = None) -> None:
    """Save a loadable checkpoint: a full model, or a PEFT adapter (merged into a full model if asked),
    its weights cast to `dtype` (None: as they are). A model with NaN or inf weights is refused: it
    would be published as the stage's result and break every stage after it."""
    import torch

    if not all_finite(model):
        raise NonFiniteWeights("the trained weights hold NaN or inf (the run diverged: learning rate too high?); "
                               "not saved as the stage's model")
    out_dir.mkdir(parents=True, exist_ok=True)
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if dtype is not None:
        model = model.to(getattr(torch, dtype))  # training is over: the master copy is no longer needed
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def load_sequence_classifier(
    spec: ModelSpec,
    path: str | None = None,
    *,
    precision: Precision | None = None,
    trainable: bool = False,
    seed: int = 0,
    num_labels: int = 1,
    quantization: Any = None,
) -> PreTrainedModel:
    """A sequence-classification model (reward or value model) from any checkpoint: a reward model,
    a causal LM (the head is new), or a PEFT adapter of either (merged). A new head is drawn from
    `seed` (not the global RNG, so a run's reward model and critic follow from the recipe's seed, and
    the global RNG is left as it was). `pad_token_id` is always set, because the head pools at the
    last non-pad token and cannot find it without one."""
    import torch
    from transformers import AutoModelForSequenceClassification

    source = path or resolve_model_path(spec.name_or_path)
    kwargs = model_init_kwargs(spec, _dtype_for(spec, precision, trainable))
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if is_adapter(source):
            task = json.loads(Path(source, "adapter_config.json").read_text(encoding="utf-8")).get("task_type")
            if task == "SEQ_CLS":
                from peft import AutoPeftModelForSequenceClassification

                model = AutoPeftModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, **kwargs)
                model = model.merge_and_unload()
            else:
                # A causal-LM adapter: merge it, then move the backbone weights under a fresh head.
                causal = load_causal_lm(spec, source, precision=precision, trainable=trainable)
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
