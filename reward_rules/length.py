"""Length shaping rules: cosine length scaling, Kimi k1.5 length reward, DAPO overlong punishment.

TRL's standard kwargs (``prompts``, ``completion_ids``) are read from ``**kwargs`` rather than
declared, so that a rule's keyword-only parameters are exactly its recipe parameters.
Lengths are token counts when TRL passes ``completion_ids`` (it always does in GRPO/RLOO) and
character counts otherwise (e.g. ``align rewards try`` on a bare string): set the length
parameters in the unit you will train with.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Annotated, Any

from annotated_types import Gt

from ._params import checks
from ._text import Completion, completion_texts, lengths, prompt_key
from .accuracy import correctness

__all__ = ["cosine", "length", "soft_overlong"]


@checks()
def cosine(
    completions: Sequence[Completion],
    solution: Sequence[Any],
    *,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    max_len: Annotated[int, Gt(0)] = 1000,
    answer_tag: str = "answer",
    percent_as_fraction: bool = False,
    **kwargs: Any,
) -> list[float | None]:
    """Cosine length-scaled correctness (Yeo et al. 2025, "Demystifying Long CoT Reasoning").

    With p = min(len, max_len) / max_len and c = cos(pi * p): a correct answer scores
    ``min_value_correct + (max_value_correct - min_value_correct) * (1 + c) / 2`` (short → 1.0,
    at max_len → 0.5 with the defaults); a wrong answer (or none) scores
    ``max_value_wrong + (min_value_wrong - max_value_wrong) * (1 + c) / 2`` (short → -1.0, long →
    -0.5: longer is less bad). Length is clamped at ``max_len``, so nothing wraps around past it;
    it is counted in tokens from ``completion_ids`` when given, else in characters. The default
    values keep every correct answer above every wrong one (min_value_correct > max_value_wrong).
    Correctness is the ``accuracy`` rule's check; a gold that cannot be parsed gives None.
    """
    texts = completion_texts(completions)
    correct = correctness(
        completions, solution, answer_tag=answer_tag, percent_as_fraction=percent_as_fraction, rule="cosine"
    )
    rewards: list[float | None] = []
    for ok, n in zip(correct, lengths(texts, kwargs.get("completion_ids")), strict=True):
        if ok is None:
            rewards.append(None)
            continue
        # Clamping is the fix for open-r1's wrap-around: cos(pi * p) rises again for p > 1.
        progress = min(n, max_len) / max_len
        half_cos = 0.5 * (1.0 + math.cos(math.pi * progress))
        if ok:
            rewards.append(min_value_correct + (max_value_correct - min_value_correct) * half_cos)
        else:
            rewards.append(max_value_wrong + (min_value_wrong - max_value_wrong) * half_cos)
    return rewards


@checks()
def length(
    completions: Sequence[Completion],
    solution: Sequence[Any],
    *,
    group_by_prompt: bool = True,
    answer_tag: str = "answer",
    percent_as_fraction: bool = False,
    **kwargs: Any,
) -> list[float | None]:
    """Kimi k1.5 length reward: among answers to the same question, shorter correct ones score more.

    lambda = 0.5 - (len - min_len) / (max_len - min_len), with min_len/max_len over the group; a
    correct answer scores lambda (in [-0.5, 0.5]), a wrong one min(0, lambda); a group whose
    completions all have the same length scores 0.0. The group is the completions sharing a
    prompt, as in the paper, when ``group_by_prompt`` and TRL passes ``prompts``; otherwise the
    whole batch. Length in tokens from ``completion_ids`` when given, else characters. A gold that
    cannot be parsed gives None (its length still counts towards the group's range).
    """
    texts = completion_texts(completions)
    correct = correctness(
        completions, solution, answer_tag=answer_tag, percent_as_fraction=percent_as_fraction, rule="length"
    )
    sizes = lengths(texts, kwargs.get("completion_ids"))
    groups: dict[str, list[int]] = defaultdict(list)
    prompts = kwargs.get("prompts")
    if group_by_prompt and prompts is not None and len(prompts) == len(texts):
        for i, prompt in enumerate(prompts):
            groups[prompt_key(prompt)].append(i)
    elif texts:
        groups[""] = list(range(len(texts)))

    rewards: list[float | None] = [None] * len(texts)
    for members in groups.values():
        lo = min(sizes[i] for i in members)
        hi = max(sizes[i] for i in members)
        for i in members:
            ok = correct[i]
            if ok is None:
                continue
            if hi == lo:
                rewards[i] = 0.0
                continue
            lam = 0.5 - (sizes[i] - lo) / (hi - lo)
            rewards[i] = lam if ok else min(0.0, lam)
    return rewards


def _buffer_inside_the_limit(overlong_buffer: int, max_completion_length: int) -> str | None:
    if overlong_buffer >= max_completion_length:
        return (f"overlong_buffer ({overlong_buffer}) must be less than max_completion_length "
                f"({max_completion_length}): the penalty starts max_completion_length − overlong_buffer tokens in")
    return None


@checks(_buffer_inside_the_limit)
def soft_overlong(
    completions: Sequence[Completion],
    *,
    max_completion_length: Annotated[int, Gt(0)] = 512,
    overlong_buffer: Annotated[int, Gt(0)] = 128,
    **kwargs: Any,
) -> list[float]:
    """DAPO soft overlong punishment: 0 up to max_completion_length - overlong_buffer, then linear to -1.

    With L = max_completion_length and B = overlong_buffer (0 < B < L): len <= L - B → 0.0;
    L - B < len <= L → (L - B - len) / B; len > L → -1.0. Set L to the trainer's ``max_completion_length`` (TRL
    default 512). Length in tokens from ``completion_ids`` when given, else characters.
    """
    threshold = max_completion_length - overlong_buffer
    rewards = []
    for n in lengths(completion_texts(completions), kwargs.get("completion_ids")):
        if n <= threshold:
            rewards.append(0.0)
        elif n <= max_completion_length:
            rewards.append((threshold - n) / overlong_buffer)
        else:
            rewards.append(-1.0)
    return rewards
