"""Math answer checking with math-verify, and the ``accuracy`` rule built on it.

The extraction is ours, not math-verify's: math-verify changed what it extracts between releases
(0.5 → 0.9 turned two ``\\boxed{}`` into a set), so we pick the one answer string ourselves and hand
math-verify only that string. ``verify`` is always called gold first (it is not symmetric).
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ._params import checks
from ._text import Completion, completion_texts, last_braced_command, normalize_fullwidth, tag_block

__all__ = ["UnparseableGoldWarning", "Gold", "accuracy", "correctness", "extract_answer", "majority_vote", "parse_gold"]


class UnparseableGoldWarning(UserWarning):
    """A dataset's gold answer could not be parsed; that sample gets no reward (None)."""


CHOICE_LETTERS = "ABCDE"

_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(\S[^\n]*)", re.IGNORECASE)
_MATH_DELIMITERS = re.compile(r"\$|\\\(|\\\[")
# A word of two or more letters that is not a LaTeX command: units ("18 dollars") or prose, which
# would otherwise be parsed as a product of symbols when the answer is wrapped in $…$.
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*\\?%")
_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textrm)\s*\{([^{}]*)\}")
_GOLD_CHOICE = re.compile(rf"\(?([{CHOICE_LETTERS}])\)?")
_ANSWER_CHOICE = re.compile(
    rf"(?:(?:option|choice)\s+)?(?:\(([{CHOICE_LETTERS}])\)|([{CHOICE_LETTERS}])(?:[.):]|$))",
    re.IGNORECASE,
)


@lru_cache(maxsize=1)
def _math_verify() -> tuple[Callable[..., Any], Callable[..., Any], tuple[type, ...]]:
    # Imported on first use: sympy takes ~0.4 s to import, which a recipe check should not pay.
    from math_verify import parse, verify
    from sympy import Basic, MatrixBase

    return parse, verify, (Basic, MatrixBase)


def _timeout() -> int | None:
    # math-verify times out with signal.alarm, which raises in any thread but the main one.
    return 5 if threading.current_thread() is threading.main_thread() else None


@dataclass(frozen=True)
class Gold:
    """A parsed gold answer: a multiple-choice letter or math-verify's parsed expressions."""

    letter: str | None = None
    parsed: tuple[Any, ...] = ()


def _clean_choice_text(text: str) -> str:
    text = text.replace("$", "").replace("**", "").strip()
    for _ in range(3):  # \textbf{\text{(B)}}
        text = _WRAPPERS.sub(r"\1", text)
    inner = last_braced_command(text)
    if inner is not None:
        text = inner
    return text.strip().rstrip(".").strip()


def _answer_is_tail(text: str) -> str | None:
    matches = _ANSWER_IS.findall(text)
    if not matches:
        return None
    tail = matches[-1].strip().strip("*").strip()
    return tail.rstrip(".").strip() or None


def extract_answer(text: str, answer_tag: str = "answer") -> str | None:
    r"""Pick the one answer string of a completion, or None when it gives none.

    Order: the last ``<answer>…</answer>`` block (inside it: its last ``\boxed{}``, else what follows
    "the answer is"/"answer:", else the whole block, so a bare number counts); else the last
    ``\boxed{}`` anywhere; else what follows the last "the answer is"/"answer:" on its line.
    """
    text = normalize_fullwidth(text)
    block = tag_block(text, answer_tag)
    if block is not None:
        boxed = last_braced_command(block)
        if boxed is not None:
            return boxed
        return _answer_is_tail(block) or block.strip() or None
    boxed = last_braced_command(text)
    if boxed is not None:
        return boxed
    return _answer_is_tail(text)


def _is_parsed(item: Any) -> bool:
    return isinstance(item, _math_verify()[2])


def parse_math(text: str, percent_as_fraction: bool = False) -> list[Any]:
    """Parse one answer string with math-verify; ``[]`` when nothing parses.

    A string without math delimiters is wrapped in ``$…$`` so bare LaTeX (``\\frac34``, ``\\sqrt2``)
    and lists (``2, 3``) parse whole. When that yields symbols and the string has words in it
    (units, prose), the unwrapped parse (which finds the number in "18 dollars") is used instead.
    ``N%`` becomes N/100 when ``percent_as_fraction``, else the percent sign is dropped.
    """
    # "\$" is a currency sign, not a math delimiter; left in, it makes the string unparseable.
    text = normalize_fullwidth(text).replace("\\$", "").strip().rstrip(".").strip()
    text = _PERCENT.sub(r"\\frac{\1}{100}" if percent_as_fraction else r"\1", text)
    if not text:
        return []
    timeout = _timeout()
    parse = _math_verify()[0]
    try:
        if _MATH_DELIMITERS.search(text):
            return parse(text, parsing_timeout=timeout)
        wrapped = parse(f"${text}$", parsing_timeout=timeout)
        symbolic = not wrapped or (_is_parsed(wrapped[0]) and bool(getattr(wrapped[0], "free_symbols", ())))
        if symbolic and _WORD.search(text):
            unwrapped = parse(text, parsing_timeout=timeout)
            if unwrapped:
                return unwrapped
        return wrapped
    except Exception:  # math-verify is lenient by default; a parser crash is just "no answer"
        return []


@lru_cache(maxsize=8192)
def _parse_gold_cached(gold: str, percent_as_fraction: bool) -> Gold | None:
    text = normalize_fullwidth(gold).strip()
    if "####" in text:  # GSM8K solutions end with "#### 42"
        text = text.rsplit("####", 1)[1].strip()
    boxed = last_braced_command(text)
    if boxed is not None:  # MATH-style golds are whole solutions ending in \boxed{}
        text = boxed
    choice = _GOLD_CHOICE.fullmatch(_clean_choice_text(text))
    if choice:
        return Gold(letter=choice.group(1))
    parsed = parse_math(text, percent_as_fraction)
    if not any(_is_parsed(p) for p in parsed):
        return None
    return Gold(parsed=tuple(parsed))


def parse_gold(gold: Any, percent_as_fraction: bool = False) -> Gold | None:
    """Parse a dataset's gold answer (str or number); None when it cannot be parsed.

    Accepted: plain numbers (``42``, ``0.5``, ints and floats), LaTeX with or without ``$``
    (``\\frac34``), whole solutions ending in ``\\boxed{…}`` or ``#### N``, and multiple-choice
    letters A–E (``B``, ``(B)``, ``\\boxed{B}``).
    """
    if gold is None or isinstance(gold, bool):
        return None
    if isinstance(gold, (int, float)):
        gold = repr(gold)
    if not isinstance(gold, str) or not gold.strip():
        return None
    return _parse_gold_cached(gold, percent_as_fraction)


def is_correct(
    text: str, gold: Gold, *, answer_tag: str = "answer", percent_as_fraction: bool = False
) -> bool:
    """Whether a completion's extracted answer matches a parsed gold (False when it gives none)."""
    answer = extract_answer(text, answer_tag)
    if answer is None:
        return False
    if gold.letter is not None:
        match = _ANSWER_CHOICE.match(_clean_choice_text(answer))
        return bool(match) and (match.group(1) or match.group(2)).upper() == gold.letter
    parsed = parse_math(answer, percent_as_fraction)
    if not parsed:
        return False
    verify = _math_verify()[1]
    try:
        return bool(verify(list(gold.parsed), parsed, timeout_seconds=_timeout()))
    except Exception:
        return False


def majority_vote(
    texts: Sequence[str], *, answer_tag: str = "answer", percent_as_fraction: bool = False
) -> int | None:
    """Index of the sample whose answer wins a majority vote over `texts`, or None when none gives an
    answer (self-consistency; R1's cons@64).

    Answers (``extract_answer``) are grouped by equivalence: identical strings, or math-verify
    ``verify(first member, answer)`` — the first answer seen is each group's representative, as the
    gold is for the accuracy rule (``verify`` is not symmetric). Samples without an answer do not
    vote. The biggest group wins; a tie goes to the group whose first member came first, so the
    result depends only on the samples and their order. The winner is that group's first member."""
    groups: list[_Group] = []
    parsed: dict[str, list[Any]] = {}

    def parse(answer: str) -> list[Any]:
        if answer not in parsed:
            parsed[answer] = parse_math(answer, percent_as_fraction)
        return parsed[answer]

    def same(representative: str, answer: str) -> bool:
        if representative == answer:
            return True
        left, right = parse(representative), parse(answer)
        if not left or not right:
            return False
        try:
            return bool(_math_verify()[1](left, right, timeout_seconds=_timeout()))
        except Exception:
            return False

    for index, text in enumerate(texts):
        answer = (extract_answer(text, answer_tag) or "").strip()
        if not answer:
            continue
        group = next((g for g in groups if same(g.answer, answer)), None)
        if group is None:
            groups.append(_Group(index, answer))
        else:
            group.votes += 1
    if not groups:
        return None
    return max(groups, key=lambda g: (g.votes, -g.first)).first


@dataclass
class _Group:
    """Answers of one majority-vote group: the first one's index and text, and how many there are."""

    first: int
    answer: str
    votes: int = 1


def correctness(
    completions: Sequence[Completion],
    solution: Sequence[Any],
    *,
    answer_tag: str = "answer",
    percent_as_fraction: bool = False,
    rule: str = "accuracy",
) -> list[bool | None]:
    """Per-sample correctness; None (with an UnparseableGoldWarning naming the index) for bad golds."""
    texts = completion_texts(completions)
    if len(solution) != len(texts):
        raise ValueError(f"{rule}: got {len(texts)} completions but {len(solution)} solutions")
    results: list[bool | None] = []
    for index, (text, raw_gold) in enumerate(zip(texts, solution, strict=True)):
        gold = parse_gold(raw_gold, percent_as_fraction)
        if gold is None:
            warnings.warn(
                f"{rule}: the gold answer of sample {index} cannot be parsed ({str(raw_gold)[:80]!r}); "
                "that sample gets no reward (None)",
                UnparseableGoldWarning,
                stacklevel=3,
            )
            results.append(None)
            continue
        results.append(is_correct(text, gold, answer_tag=answer_tag, percent_as_fraction=percent_as_fraction))
    return results


@checks()
def accuracy(
    completions: Sequence[Completion],
    solution: Sequence[Any],
    *,
    answer_tag: str = "answer",
    percent_as_fraction: bool = False,
    **kwargs: Any,
) -> list[float | None]:
    r"""Math answer correctness: 1.0 if the completion's answer equals the gold ``solution``, else 0.0.

    The answer is the content of the last ``<answer>…</answer>`` block (its last ``\boxed{}`` if it
    has one; a bare number counts), else the LAST ``\boxed{}`` in the text (two boxes: the last one
    wins), else what follows "the answer is" / "answer:". No answer → 0.0. Equality is math-verify's
    ``verify(gold, answer)`` (gold first): 0.5 = \frac{1}{2} = 2/4. Fullwidth digits are normalised.
    ``percent_as_fraction``: "50%" means 0.5 (else the % sign is ignored, so "50%" means 50).
    Golds may be plain numbers, LaTeX with or without ``$``, solutions ending in ``\boxed{}`` or
    ``#### N``, or letters A–E (then "B", "(B)", "B)", "\boxed{B}" match "B"). A gold that cannot
    be parsed gives None and an ``UnparseableGoldWarning`` naming the sample index.
    """
    return [
        None if ok is None else float(ok)
        for ok in correctness(
            completions, solution, answer_tag=answer_tag, percent_as_fraction=percent_as_fraction
        )
    ]
