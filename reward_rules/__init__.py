"""Rule-based rewards for GRPO-style training, with TRL's reward-function signature.

Every rule is ``f(completions, <dataset columns>, *, <recipe parameters>, **kwargs) -> list[float | None]``:

* ``completions``: plain strings or chat-message lists (``[{"role": "assistant", "content": …}]``);
* named positional-or-keyword parameters after it are dataset columns the rule needs (``solution``);
* keyword-only parameters with defaults and annotations are what a recipe may set; their bounds are
  in the annotations and their relations in ``@checks`` (``reward_rules._params``), checked by
  ``align validate`` and on every call;
* TRL's own kwargs (``prompts``, ``completion_ids``, ``trainer_state``…) arrive in ``**kwargs``;
* ``None`` for a sample means "no reward for it" (TRL turns it into NaN and ignores it).

Each built-in rule is importable as a function in one line, for a TRL script of your own::

    from reward_rules import accuracy, code_format, format_reward, soft_overlong

    trainer = GRPOTrainer(..., reward_funcs=[accuracy, format_reward])

(The rule named ``format`` is the function ``format_reward``, so as not to hide Python's ``format``.
Bind parameters with ``reward_rules.configure(repetition, ngram_size=4)``: checked at once, and named
for TRL's logs. The helpers of a family live in its module: ``from reward_rules.accuracy import
extract_answer``.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ._params import checks, param_problems
from .accuracy import UnparseableGoldWarning, accuracy
from .code import UnusableTestCasesWarning, code, code_format
from .format import format_reward, tag_count
from .language import language_consistency
from .length import cosine, length, soft_overlong
from .reasoning import reasoning_steps
from .repetition import repetition

RULES: dict[str, Callable[..., list[float | None]]] = {
    "accuracy": accuracy,
    "format": format_reward,
    "tag_count": tag_count,
    "reasoning_steps": reasoning_steps,
    "cosine": cosine,
    "length": length,
    "soft_overlong": soft_overlong,
    "repetition": repetition,
    "language_consistency": language_consistency,
    "code": code,
    "code_format": code_format,
}

#: What each built-in rule scores, in the words a "did you mean" compares (see align.rewards).
RULE_KINDS: dict[str, frozenset[str]] = {
    "accuracy": frozenset({"math"}),
    "format": frozenset({"format"}),
    "tag_count": frozenset({"format"}),
    "reasoning_steps": frozenset({"reasoning"}),
    "cosine": frozenset({"math", "length"}),
    "length": frozenset({"math", "length"}),
    "soft_overlong": frozenset({"length"}),
    "repetition": frozenset({"repetition"}),
    "language_consistency": frozenset({"language"}),
    "code": frozenset({"code"}),
    "code_format": frozenset({"code", "format"}),
}


def configure(rule: Callable[..., list[float | None]], /, **params: Any) -> Callable[..., list[float | None]]:
    """``rule`` with ``params`` bound, checked now (a ValueError names the parameter and why), and
    named like the rule, as TRL's GRPOTrainer logs each reward function under its ``__name__``."""
    if problems := param_problems(rule, params):
        raise ValueError(f"{rule.__name__}: " + "; ".join(f"{key}: {message}" for key, message in problems))
    bound = functools.partial(rule, **params)
    return functools.update_wrapper(bound, rule)  # type: ignore[return-value]


__all__ = [
    "RULES",
    "RULE_KINDS",
    "UnparseableGoldWarning",
    "UnusableTestCasesWarning",
    "accuracy",
    "checks",
    "code",
    "code_format",
    "configure",
    "cosine",
    "format_reward",
    "language_consistency",
    "length",
    "reasoning_steps",
    "repetition",
    "soft_overlong",
    "tag_count",
]
