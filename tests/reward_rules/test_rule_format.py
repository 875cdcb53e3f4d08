"""format and tag_count, including the open-r1 format bugs (trailing text, duplicated and nested blocks)."""

from __future__ import annotations

import pytest

from reward_rules.format import format_reward, tag_count

GOOD = "<think>\n6 times 7\n</think>\n<answer>\n42\n</answer>"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (GOOD, 1.0),
        ("<think>a</think><answer>42</answer>", 1.0),
        ("  \n<think>a</think>\n\n<answer>42</answer>\n  ", 1.0),
        ("<think></think><answer>42</answer>", 1.0),  # an empty think block is allowed
        ("<think>a</think><answer>  </answer>", 0.0),  # a blank answer is not
        # open-r1: text after </answer> on a new line passes.
        (GOOD + "\nBy the way, I am confident.", 0.0),
        (GOOD + " ok", 0.0),
        ("Sure! " + GOOD, 0.0),
        ("<think>a</think> so <answer>42</answer>", 0.0),
        # open-r1: duplicated blocks pass.
        (GOOD + "\n<answer>43</answer>", 0.0),
        ("<think>a</think><think>b</think><answer>42</answer>", 0.0),
        # open-r1: nested blocks pass.
        ("<think>a <think>b</think> c</think><answer>42</answer>", 0.0),
        ("<think>a</think><answer>4<answer>2</answer></answer>", 0.0),
        ("<think>a <answer>1</answer></think><answer>42</answer>", 0.0),
        # missing or misordered tags
        ("<answer>42</answer>", 0.0),
        ("<think>a</think>", 0.0),
        ("<think>a<answer>42</answer></think>", 0.0),
        ("<answer>42</answer><think>a</think>", 0.0),
        ("<think>a</think><answer>42", 0.0),
        ("", 0.0),
    ],
)
def test_format_strict(completion: str, expected: float) -> None:
    assert format_reward([completion]) == [expected]


def test_format_prefilled_think() -> None:
    # The chat template already wrote "<think>": the completion starts inside the block.
    assert format_reward(["6 times 7</think>\n<answer>42</answer>"], prefilled_think=True) == [1.0]
    assert format_reward(["<think>a</think><answer>42</answer>"], prefilled_think=True) == [0.0]
    assert format_reward(["6 times 7</think>\n<answer>42</answer> extra"], prefilled_think=True) == [0.0]
    assert format_reward(["6 times 7</think>\n<answer>42</answer>"]) == [0.0]


def test_format_custom_tags_and_chat_messages() -> None:
    chat = [{"role": "assistant", "content": "<reasoning>a</reasoning><solution>42</solution>"}]
    assert format_reward([chat], think_tag="reasoning", answer_tag="solution") == [1.0]
    assert format_reward([chat]) == [0.0]
    assert format_reward([[{"role": "assistant", "content": GOOD}]], trainer_state=None) == [1.0]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (GOOD, 1.0),
        (GOOD + " trailing text is format's business", 1.0),
        ("<think>a</think>", 0.5),
        ("<think>a</think><answer>42", 0.75),
        ("<think>a</think><think>b</think><answer>42</answer>", 0.5),  # think tags twice: no credit
        ("</think><think><answer>42</answer>", 0.5),  # reversed pair: neither is in order
        ("<answer>42</answer><think>a</think>", 0.0),
        ("no tags", 0.0),
    ],
)
def test_tag_count(completion: str, expected: float) -> None:
    assert tag_count([completion]) == [expected]


def test_tag_count_prefilled_think() -> None:
    assert tag_count(["a</think><answer>42</answer>"], prefilled_think=True) == [1.0]
    assert tag_count(["<think>a</think><answer>42</answer>"], prefilled_think=True) == [0.75]
