"""N-gram repetition penalty that also works for text written without spaces (Chinese, Japanese)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any

from annotated_types import Ge, Le

from ._params import checks
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
#: Unbroken text (no whitespace, no CJK) at least this long is split into characters by default.
CHAR_FALLBACK_LENGTH = 100


def tokenize_for_repetition(text: str, char_fallback_length: int = CHAR_FALLBACK_LENGTH) -> list[str]:
    """Lower-cased whitespace words, except that every CJK character is a token of its own.

    Text with no whitespace at all is split into characters only when it is at least
    ``char_fallback_length`` long (a looping run-on string): a short unbroken answer such as
    ``\\boxed{1000000}`` or ``2+2+2=6`` is one word, not a string of repeated characters.
    """
    text = text.strip().lower()
    if text and len(text) >= char_fallback_length and not any(ch.isspace() for ch in text):
        return list(text)
    return _TOKEN.findall(text)


@checks()
def repetition(
    completions: Sequence[Completion],
    *,
    ngram_size: Annotated[int, Ge(1)] = 3,
    max_penalty: Annotated[float, Le(0)] = -1.0,
    char_fallback_length: Annotated[int, Ge(1)] = CHAR_FALLBACK_LENGTH,
    **kwargs: Any,
) -> list[float]:
    """N-gram repetition penalty: max_penalty * (1 - distinct n-grams / total n-grams), in [max_penalty, 0].

    Tokens are lower-cased whitespace-separated words; CJK characters (han, kana, hangul) are one
    token each, so the penalty fires on Chinese too. Text with no whitespace at all is split into
    characters only from ``char_fallback_length`` characters on, so short unbroken answers
    (``<answer>100000</answer>``) are one word and score 0.0, while a long looping string is still
    penalised. Completions with fewer than ``ngram_size`` tokens score 0.0. ``max_penalty`` ≤ 0,
    ``ngram_size`` ≥ 1.
    """
    rewards = []
    for text in completion_texts(completions):
        tokens = tokenize_for_repetition(text, char_fallback_length)
        if len(tokens) < ngram_size:
            rewards.append(0.0)
            continue
        ngrams = [tuple(tokens[i : i + ngram_size]) for i in range(len(tokens) - ngram_size + 1)]
        penalty = max_penalty * (1.0 - len(set(ngrams)) / len(ngrams))
        rewards.append(penalty if penalty else 0.0)  # no -0.0 in logs
    return rewards
