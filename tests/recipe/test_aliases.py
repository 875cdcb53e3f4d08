"""open-r1's and TRL's reward names and parameters in a recipe map to align's rules, with one notice."""

from __future__ import annotations

import logging

import pytest

from align.recipe.aliases import RULE_ALIASES, map_reward
from align.recipe.errors import RecipeError
from align.recipe.validate import load_recipe_text
from align.rewards import resolve_rule, rule_signature

RECIPE = """\
name: ported
model: align:tiny
stages:
  - name: grpo
    type: grpo
    dataset: {path: "align:arithmetic", num_examples: 8}
    num_generations: 2
    per_device_train_batch_size: 2
    rewards:
      - {rule: accuracy}
      - {rule: soft_overlong_punishment, params: {max_completion_len: 512, soft_punish_cache: 128}}
      - {rule: repetition_penalty, params: {repetition_n_grams: 4, repetition_max_penalty: -0.5}}
      - {rule: cosine, params: {cosine_max_len: 700, cosine_min_value_wrong: 0.0}}
      - {rule: code_format, params: {code_language: javascript}}
"""


def test_open_r1_names_and_parameters_port_as_they_are(caplog: pytest.LogCaptureFixture) -> None:
    import align.recipe.aliases as aliases

    aliases._noticed.clear()
    with caplog.at_level(logging.INFO, logger="align"):
        recipe = load_recipe_text(RECIPE)
    rewards = [(r.rule, r.params) for r in recipe.stage("grpo").rewards]
    assert rewards == [
        ("accuracy", {}),
        ("soft_overlong", {"max_completion_length": 512, "overlong_buffer": 128}),
        ("repetition", {"ngram_size": 4, "max_penalty": -0.5}),
        ("cosine", {"max_len": 700, "min_value_wrong": 0.0}),
        ("code_format", {"language": "javascript"}),
    ]
    notices = [r.getMessage() for r in caplog.records if "open-r1" in r.getMessage()]
    assert len(notices) == 4 and all("\n" not in n for n in notices)  # one line each, accuracy needs none
    assert "'soft_overlong_punishment' is open-r1's name for align's 'soft_overlong' (max_completion_len → " \
           "max_completion_length, soft_punish_cache → overlong_buffer)" in notices[0]
    for rule, params in rewards:  # and the mapped parameters are the rule's own
        assert set(params) <= set(rule_signature(resolve_rule(rule)).params)


def test_binary_code_is_code_with_binary_and_its_provider_dropped() -> None:
    rule, params, notice = map_reward("binary_code", {"code_provider": "e2b", "parallel_code_exec_per_proc": 2})
    assert (rule, params) == ("code", {"binary": True, "max_workers": 2})
    assert notice is not None and "code_provider dropped" in notice and "binary: True" in notice


def test_ported_names_keep_align_checks_and_conflicts_are_errors() -> None:
    bad = RECIPE.replace("soft_punish_cache: 128", "soft_punish_cache: 512")
    with pytest.raises(RecipeError) as caught:
        load_recipe_text(bad)
    messages = {".".join(map(str, p.path)): p.message for p in caught.value.problems}
    assert "overlong_buffer (512) must be less than max_completion_length (512)" in messages[
        "stages.0.rewards.1.params"]  # named by align's name of the key
    twice = RECIPE.replace("repetition_n_grams: 4,", "repetition_n_grams: 4, ngram_size: 2,")
    with pytest.raises(RecipeError, match="'ngram_size' is given twice: as 'repetition_n_grams' and as 'ngram_size'"):
        load_recipe_text(twice)


def test_every_alias_names_a_rule_that_resolves_with_its_parameters() -> None:
    for name, alias in RULE_ALIASES.items():
        fn = resolve_rule(alias.rule)
        known = set(rule_signature(fn).params)
        assert set(alias.params.values()) <= known, name
        assert set(alias.fixed) <= known, name
