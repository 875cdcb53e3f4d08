"""cosine, length (Kimi k1.5) and soft_overlong (DAPO), with the open-r1 cosine/length bugs."""

from __future__ import annotations

import math

import pytest

from reward_rules import UnparseableGoldWarning
from reward_rules.length import cosine, length, soft_overlong

RIGHT = "<answer>42</answer>"
WRONG = "<answer>41</answer>"


def ids(n: int) -> list[int]:
    return [7] * n


def cos_score(completion: str, n_tokens: int, gold: object = "42", **params: object) -> float | None:
    return cosine([completion], [gold], completion_ids=[ids(n_tokens)], **params)[0]


@pytest.mark.parametrize(
    ("completion", "n_tokens", "expected"),
    [
        (RIGHT, 0, 1.0),
        (RIGHT, 500, 0.75),
        (RIGHT, 1000, 0.5),
        (WRONG, 0, -1.0),
        (WRONG, 500, -0.75),
        (WRONG, 1000, -0.5),
        # open-r1 wraps around past max_len (cos keeps turning): at 2x max_len a correct answer
        # would be back at 1.0 and a wrong one at -1.0. Ours stays clamped.
        (RIGHT, 2000, 0.5),
        (RIGHT, 1500, 0.5),
        (WRONG, 2000, -0.5),
    ],
)
def test_cosine_values(completion: str, n_tokens: int, expected: float) -> None:
    assert cos_score(completion, n_tokens) == pytest.approx(expected)


def test_cosine_quarter_point_matches_formula() -> None:
    expected = 0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 0.25))
    assert cos_score(RIGHT, 250) == pytest.approx(expected)


def test_cosine_measures_tokens_not_characters() -> None:
    # 19 characters but 1000 tokens: the token count decides (open-r1 measures characters).
    assert cos_score(RIGHT, 1000) == pytest.approx(0.5)
    # Without completion_ids the unit is characters (documented fallback).
    assert cosine([RIGHT], ["42"], max_len=len(RIGHT)) == [pytest.approx(0.5)]


def test_cosine_every_correct_beats_every_wrong_with_defaults() -> None:
    lengths = [0, 1, 100, 499, 999, 1000, 5000]
    correct = [cos_score(RIGHT, n) for n in lengths]
    wrong = [cos_score(WRONG, n) for n in lengths]
    assert min(c for c in correct if c is not None) > max(w for w in wrong if w is not None)
    # shorter is better when correct, longer is less bad when wrong
    assert correct == sorted(correct, reverse=True)
    assert wrong == sorted(wrong)


def test_cosine_plain_number_gold_does_not_reward_wrong_answers() -> None:
    # open-r1 cannot parse a plain "42" gold, skips the check and rewards any answer.
    assert cos_score(WRONG, 10, gold="42") < 0
    assert cos_score(WRONG, 10, gold=42) < 0
    assert cos_score(RIGHT, 10, gold=42) > 0


def test_cosine_unparseable_gold_is_none() -> None:
    with pytest.warns(UnparseableGoldWarning, match="cosine.*sample 0"):
        assert cos_score(RIGHT, 10, gold=r"\frac{") is None


def test_cosine_parameters() -> None:
    params = {"min_value_correct": 1.0, "max_value_correct": 2.0, "min_value_wrong": -10.0,
              "max_value_wrong": 0.0, "max_len": 100}  # fmt: skip
    assert cos_score(RIGHT, 0, **params) == pytest.approx(2.0)
    assert cos_score(RIGHT, 100, **params) == pytest.approx(1.0)
    assert cos_score(WRONG, 0, **params) == pytest.approx(-10.0)
    assert cos_score(WRONG, 100, **params) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="max_len"):
        cos_score(RIGHT, 0, max_len=0)


def test_length_kimi_values() -> None:
    completions = [RIGHT, RIGHT, RIGHT, WRONG, WRONG, WRONG]
    out = length(completions, ["42"] * 6, completion_ids=[ids(n) for n in (10, 20, 30, 10, 20, 30)])
    # lambda = 0.5 - (len - 10) / 20: correct -> lambda, wrong -> min(0, lambda)
    assert out == pytest.approx([0.5, 0.0, -0.5, 0.0, 0.0, -0.5])


def test_length_all_same_length_is_zero() -> None:
    out = length([RIGHT, WRONG], ["42", "42"], completion_ids=[ids(5), ids(5)])
    assert out == [0.0, 0.0]


def test_length_groups_by_prompt() -> None:
    completions = [RIGHT, RIGHT, RIGHT, RIGHT]
    prompts = ["p", "p", "q", "q"]
    token_ids = [ids(10), ids(20), ids(100), ids(300)]
    grouped = length(completions, ["42"] * 4, prompts=prompts, completion_ids=token_ids)
    assert grouped == pytest.approx([0.5, -0.5, 0.5, -0.5])
    whole = length(completions, ["42"] * 4, prompts=prompts, completion_ids=token_ids, group_by_prompt=False)
    assert whole == pytest.approx([0.5, 0.5 - 10 / 290, 0.5 - 90 / 290, -0.5])


def test_length_plain_number_gold_and_unparseable_gold() -> None:
    # open-r1 treats "42" as unparseable and scores the wrong answer as if correct.
    out = length([WRONG, RIGHT], ["42", "42"], completion_ids=[ids(10), ids(30)])
    assert out == pytest.approx([0.0, -0.5])
    out = length([WRONG, RIGHT], ["42", "42"], completion_ids=[ids(30), ids(10)])
    assert out == pytest.approx([-0.5, 0.5])
    with pytest.warns(UnparseableGoldWarning, match="sample 1"):
        out = length([RIGHT, RIGHT], ["42", r"\frac{"], completion_ids=[ids(10), ids(30)])
    assert out == [0.5, None]


@pytest.mark.parametrize(
    ("n_tokens", "expected"),
    [(0, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (100, -1.0), (101, -1.0), (10_000, -1.0)],
)
def test_soft_overlong(n_tokens: int, expected: float) -> None:
    out = soft_overlong(["x"], completion_ids=[ids(n_tokens)], max_completion_length=100, overlong_buffer=20)
    assert out == [pytest.approx(expected)]


def test_soft_overlong_character_fallback_and_validation() -> None:
    assert soft_overlong(["x" * 90], max_completion_length=100, overlong_buffer=20) == [pytest.approx(-0.5)]
    for buffer in (0, 101):
        with pytest.raises(ValueError, match="overlong_buffer"):
            soft_overlong(["x"], max_completion_length=100, overlong_buffer=buffer)
