"""Rule-based rewards for GRPO-style training, with TRL's reward-function signature.

Every rule is ``f(completions, <dataset columns>, *, <recipe parameters>, **kwargs) -> list[float | None]``:

* ``completions``: plain strings or chat-message lists (``[{"role": "assistant", "content": …}]``);
* named positional-or-keyword parameters after it are dataset columns the rule needs (``solution``);
* keyword-only parameters with defaults and annotations are what a recipe may set;
* TRL's own kwargs (``prompts``, ``completion_ids``, ``trainer_state``…) arrive in ``**kwargs``;
* ``None`` for a sample means "no reward for it" (TRL turns it into NaN and ignores it).
"""

from __future__ import annotations

from collections.abc import Callable

# Submodules, not their functions, are the package attributes: a rule named like its module
# (accuracy, length, code) would otherwise hide the module from ``import reward_rules.code``.
from . import accuracy, code, format, language, length, reasoning, repetition
from .accuracy import UnparseableGoldWarning
from .code import UnusableTestCasesWarning

RULES: dict[str, Callable[..., list[float | None]]] = {
    "accuracy": accuracy.accuracy,
    "format": format.format_reward,
    "tag_count": format.tag_count,
    "reasoning_steps": reasoning.reasoning_steps,
    "cosine": length.cosine,
    "length": length.length,
    "soft_overlong": length.soft_overlong,
    "repetition": repetition.repetition,
    "language_consistency": language.language_consistency,
    "code": code.code,
}

__all__ = ["RULES", "UnparseableGoldWarning", "UnusableTestCasesWarning"]
