"""The embedded tokenizer: a small byte-level BPE trained on the synthetic tasks, no hub needed.

Design choices, and why:

* Byte-level BPE, so any text (a user's own prompt, a reward rule's message) encodes without an
  unknown token; the vocabulary stays at a few hundred entries, most of them the 256 bytes.
* Digits are split one per token (``Digits(individual_digits=True)``) so that numbers are spelt the
  same way wherever they appear: the column-by-column traces of the arithmetic task rely on it.
* Chat-role markers and the pad token are *special* tokens; the R1 tags ``<think>``, ``</think>``,
  ``<answer>``, ``</answer>`` are *normal* added tokens, because TRL's GRPO / RLOO / distillation
  trainers decode completions with ``skip_special_tokens=True`` and format rewards must still see them.
* eos is ``<|end|>``, the token that closes every chat turn, so generation stops after one answer.
* Padding side is **left**: batched generation (evaluation, GRPO) needs prompts flush against the
  first generated token; TRL's SFT collator pads on its own and ignores this setting.
* The model that ships with this tokenizer is a Llama architecture (see ``model.py``), and the saved
  ``tokenizer_class`` is ``PreTrainedTokenizerFast``: with ``model_type`` ``qwen2`` transformers 5's
  ``AutoTokenizer`` would return ``Qwen2Tokenizer``, which rebuilds its own pre-tokenizer and ignores
  this ``tokenizer.json`` pipeline; Llama has no such override.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"
EOS_TOKEN = END_TOKEN
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN)
# Normal (non-special) added tokens: they survive decode(..., skip_special_tokens=True).
TAG_TOKENS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")

PADDING_SIDE = "left"
TOKENIZER_CLASS = "PreTrainedTokenizerFast"

# One turn is ``<|role|>content<|end|>``, no newlines: fewer tokens per example keeps GRPO generation
# cheap, and ``<|end|>`` (= eos) closes the assistant turn so SFT teaches the model to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('Unsupported chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)

# A little ordinary prose so the merges also cover the words users and recipes put in prompts.
GENERIC_TEXT = """\
You are a helpful assistant. Think step by step, then give the final answer.
Answer the question below. Show your reasoning inside the think tags and the result inside the answer tags.
What is the sum of these numbers? What is the difference? Compute the value of the expression.
Solve the problem and explain the answer. The answer is a number. Please reason carefully.
A user asks a question and the assistant solves it. The assistant first thinks about the reasoning
process in the mind and then provides the user with the answer.
Use the numbers to reach the target. Each number can be used once. Write an equation that equals the target.
The quick brown fox jumps over the lazy dog. This is a small model trained for testing the pipeline.
Hello! How are you today? I am fine, thank you. Good. Yes, no, maybe, correct, wrong, true, false.
"""


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything that determines the trained tokenizer; part of the cache key of embedded models."""

    vocab_size: int = 384
    corpus_examples: int = 2000
    corpus_seed: int = 0
    model_max_length: int = 512

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _training_corpus(spec: TokenizerSpec) -> Iterator[str]:
    """Deterministic training text: rendered task rows in several styles plus the generic prose."""
    # Imported here, not at module top, because tasks.py imports this module for the tag names.
    from align.embedded.tasks import arithmetic_example

    rng = random.Random(spec.corpus_seed)
    for _ in range(8):
        yield GENERIC_TEXT
    styles = ("columns", "equation", "none")
    for i in range(spec.corpus_examples):
        max_operand = rng.choice((9, 30, 99, 999))
        ops = rng.choice(("+", "-"))
        row = arithmetic_example(
            rng, max_operand=max_operand, num_operands=2, ops=ops, trace=styles[i % len(styles)]
        )
        yield row["prompt_text"]
        yield row["completion_text"]


def train_tokenizer(spec: TokenizerSpec | None = None) -> PreTrainedTokenizerFast:
    """Train the embedded tokenizer and wrap it; same spec → byte-identical ``tokenizer.json``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = spec or TokenizerSpec()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size - len(SPECIAL_TOKENS) - len(TAG_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_training_corpus(spec), trainer=trainer)
    # Special tokens first so that pad gets a stable id right after the learnt vocabulary.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens=[SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN],
        chat_template=CHAT_TEMPLATE,
        padding_side=PADDING_SIDE,
        clean_up_tokenization_spaces=False,
        model_max_length=spec.model_max_length,
    )
    return wrapped


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str) -> None:
    """``save_pretrained`` and pin ``tokenizer_class`` so ``AutoTokenizer`` keeps our pipeline."""
    import json
    from pathlib import Path

    tokenizer.save_pretrained(directory)
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = TOKENIZER_CLASS
    config["padding_side"] = PADDING_SIDE
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
