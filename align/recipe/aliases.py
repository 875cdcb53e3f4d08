"""Other toolkits' names for align's reward rules: a recipe may name open-r1's reward functions (and
TRL's) with their parameters, and they are mapped to align's rules with a one-line notice.

Used by `RewardSpec` (every recipe) and by `align recipes import` (open-r1 / TRL GRPO configs), so
one table decides what a ported name means.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("align")


@dataclass(frozen=True)
class RuleAlias:
    """What another toolkit's reward name is in align: `rule`, with their parameter names renamed
    (`params`: theirs → align's), `fixed` parameters the name itself implies (open-r1's
    `binary_code` is `code` with `binary: true`), and `dropped` parameters that choose something
    align does not have (a remote code-execution provider)."""

    rule: str
    origin: str
    params: dict[str, str] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()


_COSINE = {
    "cosine_min_value_wrong": "min_value_wrong",
    "cosine_max_value_wrong": "max_value_wrong",
    "cosine_min_value_correct": "min_value_correct",
    "cosine_max_value_correct": "max_value_correct",
    "cosine_max_len": "max_len",
}
_REPETITION = {"repetition_n_grams": "ngram_size", "repetition_max_penalty": "max_penalty"}
_OVERLONG = {"max_completion_len": "max_completion_length", "soft_punish_cache": "overlong_buffer"}
_CODE = {"parallel_code_exec_per_proc": "max_workers", "num_parallel": "max_workers"}
#: open-r1's code-execution settings: align runs Python tests in its own local sandbox instead.
_CODE_PROVIDER = ("code_provider", "provider_type", "e2b_router_url", "morph_router_url", "enforce_same_language")

#: Reward names of open-r1 (its `reward_funcs` registry and its function names) and of TRL's GRPO
#: script, with align's rule for each. Names align shares (accuracy, format, tag_count, cosine,
#: length, reasoning_steps, code, code_format) only get their parameters renamed.
RULE_ALIASES: dict[str, RuleAlias] = {
    # open-r1 registry names that differ from align's
    "repetition_penalty": RuleAlias("repetition", "open-r1", _REPETITION),
    "soft_overlong_punishment": RuleAlias("soft_overlong", "open-r1", _OVERLONG),
    "binary_code": RuleAlias("code", "open-r1", _CODE, {"binary": True}, _CODE_PROVIDER),
    # open-r1 registry names align shares, whose parameters open-r1 spells its own way
    "cosine": RuleAlias("cosine", "open-r1", _COSINE),
    "code": RuleAlias("code", "open-r1", _CODE, dropped=_CODE_PROVIDER),
    "code_format": RuleAlias("code_format", "open-r1", {"code_language": "language"}),
    # open-r1's function names
    "accuracy_reward": RuleAlias("accuracy", "open-r1 / TRL"),
    "format_reward": RuleAlias("format", "open-r1"),
    "tag_count_reward": RuleAlias("tag_count", "open-r1"),
    "reasoning_steps_reward": RuleAlias("reasoning_steps", "open-r1"),
    "len_reward": RuleAlias("length", "open-r1"),
    "cosine_scaled_reward": RuleAlias("cosine", "open-r1", _COSINE),
    "repetition_penalty_reward": RuleAlias("repetition", "open-r1", _REPETITION),
    "code_reward": RuleAlias("code", "open-r1", _CODE, dropped=_CODE_PROVIDER),
    "binary_code_reward": RuleAlias("code", "open-r1", _CODE, {"binary": True}, _CODE_PROVIDER),
    "code_format_reward": RuleAlias("code_format", "open-r1", {"code_language": "language"}),
    "soft_overlong_punishment_reward": RuleAlias("soft_overlong", "open-r1", _OVERLONG),
    # TRL's GRPO script (trl/scripts/grpo.py) fixes the overlong punishment at 1280 / 256
    "get_soft_overlong_punishment": RuleAlias("soft_overlong", "TRL", _OVERLONG,
                                              {"max_completion_length": 1280, "overlong_buffer": 256}),
    # TRL's own rules that align has no equivalent of: TRL's function, run as it is
    "think_format_reward": RuleAlias("trl.rewards:think_format_reward", "TRL"),
    "reasoning_accuracy_reward": RuleAlias("trl.rewards:reasoning_accuracy_reward", "TRL"),
}

#: Names that have no align counterpart, with why (resolve_rule says so instead of a lookalike).
UNSUPPORTED_RULES: dict[str, str] = {
    "ioi_code": "open-r1's ioi_code grades C++ on IOI subtasks through a Piston or Morph execution server",
    "cf_code": "open-r1's cf_code grades Codeforces submissions through a Piston execution server",
}

_noticed: set[tuple[str, tuple[str, ...]]] = set()


def map_reward(rule: str, params: dict[str, Any]) -> tuple[str, dict[str, Any], str | None]:
    """(align's rule, its parameters, the one-line notice or None) for a reward a recipe names.
    Unknown names pass through unchanged; a parameter given under both its ported and its align
    name is a ValueError."""
    alias = RULE_ALIASES.get(rule)
    renames = {k: v for k, v in (alias.params if alias else {}).items() if k in params and k != v}
    dropped = [k for k in (alias.dropped if alias else ()) if k in params]
    if alias is None or (alias.rule == rule and not renames and not dropped and not alias.fixed):
        return rule, params, None
    mapped: dict[str, Any] = dict(alias.fixed)
    given_as: dict[str, str] = {}
    for key, value in params.items():
        if key in dropped:
            continue
        target = renames.get(key, key)
        if target in given_as:
            raise ValueError(f"parameter {target!r} is given twice: as {given_as[target]!r} and as {key!r}")
        given_as[target] = key
        mapped[target] = value
    parts = [f"{k} → {v}" for k, v in renames.items()]
    parts += [f"{k}: {v!r}" for k, v in alias.fixed.items() if k not in params]
    parts += [f"{k} dropped: align runs the tests in its own sandbox" for k in dropped]
    if ":" in alias.rule:
        name = f"'{rule}' is {alias.origin}'s own rule, with no align equivalent: running {alias.rule} as it is"
    elif alias.rule != rule:
        name = f"'{rule}' is {alias.origin}'s name for align's '{alias.rule}'"
    else:
        name = f"'{rule}' takes {alias.origin}'s parameter names"
    notice = f"reward {name}" + (f" ({', '.join(parts)})" if parts else "")
    return alias.rule, mapped, notice


def note_once(notice: str, key: tuple[str, tuple[str, ...]]) -> None:
    """Log a mapping notice once per process (a recipe is validated more than once)."""
    if key not in _noticed:
        _noticed.add(key)
        logger.info("[align] %s", notice)
