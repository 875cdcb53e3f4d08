"""Language consistency of the chain of thought (DeepSeek-R1's language-mixing reward)."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Literal

from ._params import checks
from ._text import Completion, completion_texts, tag_block

__all__ = ["LANGUAGES", "language_consistency", "script_counts"]

# Language codes and script names → the Unicode scripts (first word of the character's Unicode
# name) that count as "in the target language". Scripts, not languages: English and French are
# both LATIN, which is all a character-level check can honestly tell apart.
LANGUAGES: dict[str, frozenset[str]] = {
    "en": frozenset({"LATIN"}),
    "latin": frozenset({"LATIN"}),
    "fr": frozenset({"LATIN"}),
    "de": frozenset({"LATIN"}),
    "es": frozenset({"LATIN"}),
    "zh": frozenset({"CJK"}),
    "cjk": frozenset({"CJK"}),
    "ja": frozenset({"CJK", "HIRAGANA", "KATAKANA"}),
    "ko": frozenset({"HANGUL", "CJK"}),
    "ru": frozenset({"CYRILLIC"}),
    "uk": frozenset({"CYRILLIC"}),
    "cyrillic": frozenset({"CYRILLIC"}),
    "el": frozenset({"GREEK"}),
    "greek": frozenset({"GREEK"}),
    "ar": frozenset({"ARABIC"}),
    "arabic": frozenset({"ARABIC"}),
    "he": frozenset({"HEBREW"}),
    "hebrew": frozenset({"HEBREW"}),
    "hi": frozenset({"DEVANAGARI"}),
    "devanagari": frozenset({"DEVANAGARI"}),
}
Language = Literal[
    "en", "latin", "fr", "de", "es", "zh", "cjk", "ja", "ko", "ru", "uk", "cyrillic",
    "el", "greek", "ar", "arabic", "he", "hebrew", "hi", "devanagari",
]  # fmt: skip

# Scripts written without spaces: each character is a unit. Other scripts count words.
_CHARACTER_SCRIPTS = frozenset({"CJK", "HIRAGANA", "KATAKANA"})


@lru_cache(maxsize=65536)
def _script(ch: str) -> str | None:
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    return name.split(" ", 1)[0] if name else None


def script_counts(text: str) -> dict[str, int]:
    """Units per script: words for spaced scripts (LATIN, CYRILLIC…), characters for CJK and kana.

    Digits, punctuation, math symbols and whitespace are not counted. Text is NFKC-normalised
    first so fullwidth Latin letters count as LATIN.
    """
    counts: dict[str, int] = {}
    previous: str | None = None
    for ch in unicodedata.normalize("NFKC", text):
        script = _script(ch)
        if script is not None and (script in _CHARACTER_SCRIPTS or script != previous):
            counts[script] = counts.get(script, 0) + 1
        previous = script
    return counts


@checks()
def language_consistency(
    completions: Sequence[Completion],
    *,
    language: Language = "en",
    think_tag: str = "think",
    **kwargs: Any,
) -> list[float | None]:
    """Share of the chain of thought written in the target language's script, in [0, 1].

    The chain of thought is the last ``<think>…</think>`` block, else the text before ``</think>``
    (pre-filled ``<think>``), else the whole completion. Units are counted by Unicode script: words for scripts written with spaces (Latin,
    Cyrillic, Greek, Arabic, Hebrew, Devanagari, Hangul), single characters for Han and kana.
    Score = units in the target scripts / all units. ``language`` is a code or script name ("en"/
    "latin", "zh"/"cjk", "ja", "ko", "ru"/"cyrillic", …); "ja" accepts kana and kanji, "ko" hangul
    and hanja. A chain of thought with no letters at all (only digits and symbols) gives None.
    """
    targets = LANGUAGES[language]
    rewards: list[float | None] = []
    for text in completion_texts(completions):
        block = tag_block(text, think_tag)
        if block is None and f"</{think_tag}>" in text:  # chat template pre-filled "<think>"
            block = text.split(f"</{think_tag}>", 1)[0]
        counts = script_counts(text if block is None else block)
        total = sum(counts.values())
        if total == 0:
            rewards.append(None)
            continue
        rewards.append(sum(n for script, n in counts.items() if script in targets) / total)
    return rewards
