"""Tiny randomly initialised causal LMs for the embedded default, built and cached on demand.

The architecture is Llama, not Qwen2: transformers 5's ``AutoTokenizer`` maps ``model_type`` qwen2
to ``Qwen2Tokenizer`` whatever ``tokenizer_config.json`` says, and that class ignores our
``tokenizer.json`` pipeline (see ``tokenizer.py``). Llama has no tokenizer override, so
``AutoTokenizer.from_pretrained(dir)`` loads exactly the tokenizer we saved.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from align.embedded.tokenizer import TokenizerSpec

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

# Bump when the build procedure changes in a way the specs do not capture: it invalidates caches.
BUILD_VERSION = 1
MARKER_FILE = "align_embedded.json"
# Weight init draws from torch's global RNG: two threads seeding it at once would interleave draws.
_BUILD_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one embedded model; with the tokenizer spec it fixes the built weights for a seed."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def spec_hash(self) -> str:
        """Short stable hash of everything that shapes the build (the cache key)."""
        shape = {k: v for k, v in self.to_dict().items() if k != "description"}
        payload = json.dumps({"build_version": BUILD_VERSION, **shape}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def build_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model; same spec, tokenizer and seed → identical parameters."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        # No bos: the chat template starts with a role marker that plays that part.
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    # fork_rng restores the caller's global RNG state afterwards: building a model must not change
    # what the caller's own torch.manual_seed-driven code draws next.
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return model


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def parameter_checksum(model: nn.Module) -> str:
    """sha256 over every tensor of the state dict in name order: equal ⇔ bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_model_dir(
    directory: Path, name: str, spec: ModelSpec, seed: int, tokenizer: PreTrainedTokenizerFast
) -> None:
    """Save model, tokenizer and the completion marker (written last) into ``directory``."""
    from align.embedded.tokenizer import save_tokenizer

    model = build_model(spec, tokenizer, seed)
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, str(directory))
    marker = {
        "name": name,
        "seed": seed,
        "spec_hash": spec.spec_hash(),
        "spec": spec.to_dict(),
        "num_parameters": count_parameters(model),
        "parameter_checksum": parameter_checksum(model),
    }
    (directory / MARKER_FILE).write_text(
        json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
