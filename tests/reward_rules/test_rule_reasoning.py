"""reasoning_steps: every list item counts, numbers are not bullets (both open-r1 bugs)."""

from __future__ import annotations

import pytest

from reward_rules.reasoning import count_steps, reasoning_steps


@pytest.mark.parametrize(
    ("text", "steps"),
    [
        ("Step 1: add.\nStep 2: carry.\nStep 3: done.", 3),
        ("step 1 - add\nSTEP 2) carry", 2),
        # open-r1 sees only the first item of a numbered list, and none after an intro line.
        ("1. add the units\n2. carry the one\n3. add the tens\n4. write it down", 4),
        ("Here is my plan:\n1. add the units\n2. carry the one\n3. add the tens", 3),
        ("Plan:\n  1) add\n  2) carry\n(3) check", 3),
        ("- add the units\n- carry\n* add the tens\n• write", 4),
        ("First, add.\nSecond, carry.\nNext, add tens.\nThen write.\nFinally, check.", 5),
        ("**Step 1:** add\n## Step 2: carry\n**3.** check", 3),
        # open-r1 counts negative numbers as bullets; decimals are not list items either.
        ("-3 is negative\n-12 + 5 = -7\n1.5 is a decimal\n2.75 too", 0),
        ("--- a rule line\n*emphasis* is not a bullet", 0),
        ("First, a. Then b. Finally c.", 1),  # one line, one step
        ("Just the answer: 42", 0),
        ("", 0),
    ],
)
def test_count_steps(text: str, steps: int) -> None:
    assert count_steps(text) == steps


def test_score_is_steps_over_min_steps_capped_at_one() -> None:
    texts = [
        "Step 1: a",
        "Step 1: a\nStep 2: b",
        "1. a\n2. b\n3. c",
        "1. a\n2. b\n3. c\n4. d\n5. e",
        "no steps",
    ]
    assert reasoning_steps(texts) == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 0.0])
    assert reasoning_steps(texts, min_steps=2) == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="min_steps"):
        reasoning_steps(texts, min_steps=0)


def test_chat_messages() -> None:
    chat = [[{"role": "assistant", "content": "1. a\n2. b\n3. c"}]]
    assert reasoning_steps(chat, prompts=["q"]) == [1.0]
