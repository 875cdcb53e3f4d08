"""The embedded tokenizer: deterministic, digits one per token, R1 tags survive skip_special_tokens,
chat template, and AutoTokenizer really loads our tokenizer.json pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from align.embedded import embedded_model_path
from align.embedded.tokenizer import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TAG_TOKENS,
    TokenizerSpec,
    train_tokenizer,
)

TRACE = "<think>7+8=15 4+3+1=8</think><answer>85</answer>"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return embedded_model_path("align:tiny", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


def test_training_is_deterministic() -> None:
    assert train_tokenizer().backend_tokenizer.to_str() == train_tokenizer().backend_tokenizer.to_str()


def test_vocab_is_small(tok: PreTrainedTokenizerBase) -> None:
    assert len(tok) == TokenizerSpec().vocab_size
    assert 256 < len(tok) <= 512


def test_autotokenizer_uses_our_pipeline(tok: PreTrainedTokenizerBase, model_dir: Path) -> None:
    # The trap: a model-specific class (Qwen2Tokenizer) rebuilds its own pre-tokenizer.
    assert type(tok).__name__ in {"TokenizersBackend", "PreTrainedTokenizerFast"}
    saved = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    loaded = json.loads(tok.backend_tokenizer.to_str())
    assert loaded["pre_tokenizer"] == saved["pre_tokenizer"]
    assert loaded["model"]["merges"] == saved["model"]["merges"]
    config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == CHAT_TEMPLATE


def test_special_tokens_and_padding(tok: PreTrainedTokenizerBase) -> None:
    assert tok.eos_token == EOS_TOKEN == "<|end|>"
    assert tok.pad_token == PAD_TOKEN
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    for token in SPECIAL_TOKENS:
        assert token in tok.all_special_tokens
    for token in TAG_TOKENS:
        assert token not in tok.all_special_tokens


def test_digits_are_single_tokens(tok: PreTrainedTokenizerBase) -> None:
    ids = tok("What is 4735+12?", add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    for digit_run in ("4735", "12"):
        assert all(d in pieces for d in digit_run)
    assert all(not (any(c.isdigit() for c in p) and len(p) > 1) for p in pieces)


def test_tags_are_single_tokens_and_survive_skip_special(tok: PreTrainedTokenizerBase) -> None:
    ids = tok(TRACE, add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    for tag in TAG_TOKENS:
        assert pieces.count(tag) == 1
    assert tok.decode(ids, skip_special_tokens=True) == TRACE
    with_eos = [*ids, tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(with_eos, skip_special_tokens=True) == TRACE
    assert tok.decode(with_eos) == TRACE + "<|end|><|pad|>"


def test_round_trip_of_arbitrary_text(tok: PreTrainedTokenizerBase) -> None:
    text = "Héllo  wörld!\n\t12 + 3 = 15 ✓ <answer> 7 </answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_chat_template(tok: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>Be brief.<|end|><|user|>What is 2+3?<|end|><|assistant|>"
    no_prompt = tok.apply_chat_template(messages, tokenize=False)
    assert no_prompt == "<|system|>Be brief.<|end|><|user|>What is 2+3?<|end|>"
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": TRACE}], tokenize=False)
    assert full == text + TRACE + "<|end|>"


def test_chat_template_is_prefix_preserving(tok: PreTrainedTokenizerBase) -> None:
    # TRL's prompt-completion SFT masks the prompt by this prefix property, in token ids.
    prompt = [{"role": "user", "content": "What is 47+38?"}]
    completion = [{"role": "assistant", "content": TRACE}]
    prompt_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    full_ids = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)
    p, f = prompt_ids["input_ids"], full_ids["input_ids"]
    assert f[: len(p)] == p
    assert f[-1] == tok.eos_token_id


def test_chat_template_rejects_unknown_roles(tok: PreTrainedTokenizerBase) -> None:
    with pytest.raises(Exception, match="Unsupported chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_left_padding_batch(tok: PreTrainedTokenizerBase) -> None:
    enc = tok(["1+2", "What is 10+20?"], padding=True, add_special_tokens=False)
    first = enc["input_ids"][0]
    assert first[0] == tok.pad_token_id and first[-1] != tok.pad_token_id
    assert enc["attention_mask"][0][0] == 0
