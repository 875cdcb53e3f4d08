"""Structure rules: strict think/answer format and partial credit per tag."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ._params import checks
from ._text import Completion, completion_texts

__all__ = ["format_reward", "is_well_formed", "tag_count"]


def _tags(think_tag: str, answer_tag: str) -> tuple[str, str, str, str]:
    return f"<{think_tag}>", f"</{think_tag}>", f"<{answer_tag}>", f"</{answer_tag}>"


def is_well_formed(text: str, think_tag: str, answer_tag: str, prefilled_think: bool) -> bool:
    """The strict R1 format (see ``format_reward``)."""
    open_think, close_think, open_answer, close_answer = _tags(think_tag, answer_tag)
    # Counting every tag first is what rejects duplicated and nested blocks: a lazy regex alone
    # happily matches "<think>a<think>b</think>" or two answer blocks.
    expected = {open_think: 0 if prefilled_think else 1, close_think: 1, open_answer: 1, close_answer: 1}
    if any(text.count(tag) != count for tag, count in expected.items()):
        return False
    start = r"\A" if prefilled_think else r"\A\s*" + re.escape(open_think)
    pattern = (
        start
        + r"(?P<think>.*)"
        + re.escape(close_think)
        + r"\s*"
        + re.escape(open_answer)
        + r"(?P<answer>.*)"
        + re.escape(close_answer)
        + r"\s*\Z"
    )
    match = re.match(pattern, text, flags=re.DOTALL)
    return bool(match) and bool(match.group("answer").strip())


def _distinct_tags(think_tag: str, answer_tag: str) -> str | None:
    return None if think_tag != answer_tag else f"think_tag and answer_tag are both {think_tag!r}; they must differ"


@checks(_distinct_tags)
def format_reward(
    completions: Sequence[Completion],
    *,
    think_tag: str = "think",
    answer_tag: str = "answer",
    prefilled_think: bool = False,
    **kwargs: Any,
) -> list[float]:
    """Strict R1 format: 1.0 if the completion is exactly <think>…</think> then <answer>…</answer>, else 0.0.

    Only whitespace may precede the think block, separate the blocks and follow ``</answer>``; each
    tag must occur exactly once (duplicated or nested blocks → 0.0) and the answer must not be
    blank (the think block may be empty). With ``prefilled_think`` the chat template already wrote
    ``<think>``: the completion starts inside the think block and must not contain ``<think>``.
    Tag names are configurable (``think_tag``, ``answer_tag``, written without angle brackets).
    """
    return [
        float(is_well_formed(text, think_tag, answer_tag, prefilled_think))
        for text in completion_texts(completions)
    ]


def _tag_credit(text: str, think_tag: str, answer_tag: str, prefilled_think: bool) -> float:
    tags = _tags(think_tag, answer_tag)
    counts = [text.count(tag) for tag in tags]
    # The pre-filled opening tag sits before the completion; it is "present once" when absent here.
    positions = [text.find(tag) for tag in tags]
    if prefilled_think:
        counts[0] = 1 if counts[0] == 0 else 2
        positions[0] = -1
    credit = 0.0
    for i in range(4):
        if counts[i] != 1:
            continue
        in_order = all(
            (positions[j] < positions[i]) if j < i else (positions[j] > positions[i])
            for j in range(4)
            if j != i and counts[j] == 1
        )
        if in_order:
            credit += 0.25
    return credit


@checks(_distinct_tags)
def tag_count(
    completions: Sequence[Completion],
    *,
    think_tag: str = "think",
    answer_tag: str = "answer",
    prefilled_think: bool = False,
    **kwargs: Any,
) -> list[float]:
    """Partial format credit: 0.25 for each of <think>, </think>, <answer>, </answer> found exactly once in order.

    A tag earns its 0.25 when it occurs exactly once and sits after every earlier tag and before
    every later tag among those that also occur exactly once (so "</think>…<think>" earns nothing
    for that pair). Text outside the tags is not judged (``format`` does that). With
    ``prefilled_think`` the opening tag is in the prompt: its 0.25 is earned when the completion
    does not repeat it.
    """
    return [
        _tag_credit(text, think_tag, answer_tag, prefilled_think) for text in completion_texts(completions)
    ]
