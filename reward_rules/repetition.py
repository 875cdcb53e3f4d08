"""N-gram repetition penalty that also works for text written without spaces (Chinese, Japanese)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ._text import Completion, completion_texts

__all__ = ["repetition", "tokenize_for_repetition"]

# Han, kana and hangul syllables: scripts where a character, not a space-separated word, is the
# unit. Whitespace tokenisation sees a whole Chinese paragraph as one "word", which is why a
# space-based penalty never fires on CJK text.
_CJK_CHAR = (
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
    r"\U00020000-\U0002a6df\U0002a700-\U0002ebef]"
)
_TOKEN = re.compile(rf"{_CJK_CHAR}|(?:(?!{_CJK_CHAR})\S)+")


def tokenize_for_repetition(text: str) -> list[str]:
    """Whitespace words, except that every CJK character is a token of its own.

    Text with no whitespace at all (a long unbroken string) is split into characters.
    """
    text = text.strip()
    if text and not any(ch.isspace() for ch in text):
        return list(text)
    return _TOKEN.findall(text.lower())


def repetition(
    completions: Sequence[Completion],
    *,
    ngram_size: int = 3,
    max_penalty: float = -1.0,
    **kwargs: Any,
) -> list[float]:
    """N-gram repetition penalty: max_penalty * (1 - distinct n-grams / total n-grams), in [max_penalty, 0].

    Tokens are lower-cased whitespace-separated words; CJK characters (han, kana, hangul) are one
    token each, and text with no whitespace at all is split into characters, so the penalty fires
    on Chinese too. Completions with fewer than ``ngram_size`` tokens score 0.0. ``max_penalty``
    must be <= 0.
    """
    if max_penalty > 0:
        raise ValueError(f"repetition: max_penalty must be <= 0, got {max_penalty}")
    if ngram_size < 1:
        raise ValueError(f"repetition: ngram_size must be >= 1, got {ngram_size}")
    rewards = []
    for text in completion_texts(completions):
        tokens = tokenize_for_repetition(text)
        if len(tokens) < ngram_size:
            rewards.append(0.0)
            continue
        ngrams = [tuple(tokens[i : i + ngram_size]) for i in range(len(tokens) - ngram_size + 1)]
        penalty = max_penalty * (1.0 - len(set(ngrams)) / len(ngrams))
        rewards.append(penalty if penalty else 0.0)  # no -0.0 in logs
    return rewards
