"""Every built-in rule keeps the contract the rest of align relies on."""

from __future__ import annotations

import inspect
import typing

import pytest

from align.rewards import check_rule_params, rule_signature
from reward_rules import RULES

EXPECTED_COLUMNS = {
    "accuracy": ("solution",),
    "format": (),
    "tag_count": (),
    "reasoning_steps": (),
    "cosine": ("solution",),
    "length": ("solution",),
    "soft_overlong": (),
    "repetition": (),
    "language_consistency": (),
    "code": ("test_cases",),
    "code_format": (),
}
COMPLETION = "<think>Step 1: think.\nStep 2: more.</think>\n<answer>42</answer>"
COLUMN_VALUES = {"solution": "42", "test_cases": [{"input": "", "output": "42"}]}


def test_rule_names() -> None:
    assert set(RULES) == set(EXPECTED_COLUMNS)


@pytest.mark.parametrize("name", sorted(EXPECTED_COLUMNS))
def test_signature_shape(name: str) -> None:
    fn = RULES[name]
    parameters = list(inspect.signature(fn).parameters.values())
    assert parameters[0].name == "completions"
    assert parameters[-1].kind is inspect.Parameter.VAR_KEYWORD
    assert rule_signature(fn).columns == EXPECTED_COLUMNS[name]
    hints = typing.get_type_hints(fn)
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
            assert parameter.default is not inspect.Parameter.empty, parameter.name
            assert parameter.name in hints, parameter.name
    defaults = {key: default for key, (_, default) in rule_signature(fn).params.items()}
    assert check_rule_params(fn, defaults) == []


@pytest.mark.parametrize("name", sorted(EXPECTED_COLUMNS))
def test_docstring(name: str) -> None:
    doc = inspect.getdoc(RULES[name])
    assert doc is not None
    first, _, body = doc.partition("\n")
    assert first.strip() and body.strip(), "a one-line description, then what it scores"


@pytest.mark.parametrize("name", sorted(EXPECTED_COLUMNS))
def test_called_like_trl_calls_it(name: str) -> None:
    fn = RULES[name]
    n = 2
    completions = [COMPLETION, [{"role": "assistant", "content": COMPLETION}]]
    columns = {c: [COLUMN_VALUES[c]] * n for c in rule_signature(fn).columns}
    out = fn(
        prompts=["q", [{"role": "user", "content": "q"}]],
        completions=completions,
        completion_ids=[[1] * 30, [1] * 30],
        trainer_state=None,
        log_extra=lambda *a: None,
        log_metric=lambda *a: None,
        an_unrelated_column=["x"] * n,
        **columns,
    )
    assert isinstance(out, list) and len(out) == n
    assert all(v is None or isinstance(v, float) for v in out)
    assert out[0] == out[1]  # plain string and chat message score the same


@pytest.mark.parametrize("name", sorted(EXPECTED_COLUMNS))
def test_importable_as_a_function_in_one_line(name: str) -> None:
    import reward_rules

    fn = RULES[name]
    assert getattr(reward_rules, fn.__name__) is fn and callable(fn)
    assert fn.__name__ in reward_rules.__all__


def test_configure_binds_checked_parameters_under_the_rules_name() -> None:
    from reward_rules import configure, repetition

    penalty = configure(repetition, ngram_size=2, max_penalty=-0.5)
    assert penalty.__name__ == "repetition"
    assert penalty(["a b a b"]) == pytest.approx([-0.5 * (1 - 2 / 3)])  # 3 bigrams, 2 distinct
    with pytest.raises(ValueError, match="max_penalty: Input should be less than or equal to 0"):
        configure(repetition, max_penalty=0.5)
