"""accuracy: extraction order, equivalent forms, and every open-r1 accuracy bug we must not have."""

from __future__ import annotations

import warnings

import pytest

from reward_rules import UnparseableGoldWarning
from reward_rules.accuracy import accuracy, correctness, extract_answer, parse_gold


def score(completion: str, gold: object, **params: object) -> float | None:
    return accuracy([completion], [gold], **params)[0]


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        # open-r1: a bare number inside <answer> gets no credit, although R1-Zero's prompt asks for it.
        ("<think>6*7</think><answer>42</answer>", "42", 1.0),
        ("<think>6*7</think>\n<answer> 42 </answer>", "42", 1.0),
        ("<answer>41</answer>", "42", 0.0),
        # Equivalent forms, both ways round.
        ("<answer>0.5</answer>", r"\frac{1}{2}", 1.0),
        ("<answer>2/4</answer>", r"$\frac{1}{2}$", 1.0),
        (r"<answer>\frac{1}{2}</answer>", "0.5", 1.0),
        (r"<answer>\sqrt{2}/2</answer>", r"\frac{\sqrt2}{2}", 1.0),
        ("<answer>1,000</answer>", "1000", 1.0),
        ("<answer>18 dollars</answer>", "18", 1.0),
        ("<answer>x = 3</answer>", "3", 1.0),
        # "\$" is a currency sign (MATH golds), not a math delimiter
        ("<answer>32348</answer>", r"\$32,348", 1.0),
        (r"<answer>\$18.90</answer>", r"\$18.90", 1.0),
        # open-r1: golds like \frac34 without $ are silently skipped.
        ("<answer>0.75</answer>", r"\frac34", 1.0),
        ("<answer>0.7</answer>", r"\frac34", 0.0),
        # open-r1: fullwidth digits are not normalised.
        ("<answer>１２</answer>", "12", 1.0),
        (r"so \boxed{１２}", "12", 1.0),
        ("<answer>12</answer>", "１２", 1.0),
        # Fallbacks when there is no <answer> block: last \boxed{}, then "the answer is".
        (r"We get \boxed{7}.", "7", 1.0),
        ("Adding them, the answer is 7.", "7", 1.0),
        ("Final answer: 7", "7", 1.0),
        ("I think it is 7", "7", 0.0),  # no answer marker at all
        ("", "7", 0.0),
        # <answer> wins over a \boxed{} elsewhere.
        (r"\boxed{5} <answer>7</answer>", "7", 1.0),
        (r"\boxed{7} <answer>5</answer>", "7", 0.0),
        # Whole-solution golds: MATH's \boxed{} and GSM8K's "####".
        ("<answer>1000</answer>", r"So the total is $10^3 = \boxed{1000}$.", 1.0),
        ("<answer>72</answer>", "She sold 48/2 = 24 in May.\n#### 72", 1.0),
        # Plain-number golds, also as numbers rather than strings.
        ("<answer>42</answer>", 42, 1.0),
        ("<answer>0.25</answer>", 0.25, 1.0),
        ("<answer>43</answer>", 42, 0.0),
    ],
)
def test_accuracy_cases(completion: str, gold: object, expected: float) -> None:
    assert score(completion, gold) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("B", 1.0), ("(B)", 1.0), ("B)", 1.0), ("B.", 1.0), (r"\boxed{B}", 1.0), (r"$\text{(B)}$", 1.0),
     ("The answer is (B).", 1.0), ("C", 0.0), ("(C)", 0.0), ("Because", 0.0)],
)  # fmt: skip
def test_multiple_choice_letter_golds(answer: str, expected: float) -> None:
    # open-r1: letter golds (A–D) are silently skipped (and then score as anything).
    assert score(f"<answer>{answer}</answer>", "B") == expected
    assert score(f"<answer>{answer}</answer>", "(B)") == expected


def test_letter_gold_via_boxed_without_answer_tag() -> None:
    assert score(r"Comparing the options, \boxed{D}", "D") == 1.0
    assert score(r"Comparing the options, \boxed{A}", "D") == 0.0


def test_two_boxed_answers_last_one_wins() -> None:
    # math-verify 0.5 took the first box, 0.9 makes a set of both; ours is pinned to the last box.
    completion = r"First guess \boxed{3}, corrected: \boxed{5}"
    assert extract_answer(completion) == "5"
    assert score(completion, "5") == 1.0
    assert score(completion, "3") == 0.0
    assert score(completion, r"\{3, 5\}") == 0.0


def test_verify_is_called_gold_first() -> None:
    # math-verify is not symmetric: an interval answer matches an inequality gold, not the reverse.
    assert score("<answer>(1, 2)</answer>", "1 < x < 2") == 1.0
    assert score("<answer>1 < x < 2</answer>", "(1, 2)") == 0.0


def test_percent_handling_is_a_parameter() -> None:
    completions = ["<answer>50%</answer>"] * 2
    assert accuracy(completions, ["50", "0.5"]) == [1.0, 0.0]
    assert accuracy(completions, ["50", "0.5"], percent_as_fraction=True) == [0.0, 1.0]
    assert accuracy([r"<answer>50\%</answer>"], ["0.5"], percent_as_fraction=True) == [1.0]


@pytest.mark.parametrize("gold", [r"\frac{", None, "", "   "])
def test_unparseable_gold_gives_none_and_warns_with_index(gold: object) -> None:
    # Never a silent 1.0 (open-r1 returns 1.0 when the gold does not parse) and never a crash.
    completions = ["<answer>1</answer>", "<answer>42</answer>"]
    with pytest.warns(UnparseableGoldWarning, match="sample 1"):
        assert accuracy(completions, ["1", gold]) == [1.0, None]


def test_custom_answer_tag_and_chat_messages() -> None:
    chat = [[{"role": "assistant", "content": "<think>x</think><final>9</final>"}]]
    assert accuracy(chat, ["9"], answer_tag="final") == [1.0]
    assert accuracy(chat, ["9"]) == [0.0]  # no <answer> block, no box, no "answer is"


def test_accepts_trl_kwargs_and_checks_lengths() -> None:
    out = accuracy(["<answer>1</answer>"], ["1"], prompts=["p"], completion_ids=[[1, 2]], trainer_state=None)
    assert out == [1.0]
    with pytest.raises(ValueError, match="1 completions but 2 solutions"):
        accuracy(["<answer>1</answer>"], ["1", "2"])


def test_parse_gold_kinds() -> None:
    assert parse_gold("B") is not None and parse_gold("B").letter == "B"
    assert parse_gold(r"\frac34") is not None and parse_gold(r"\frac34").letter is None
    assert parse_gold(r"\frac{") is None
    assert parse_gold(True) is None


def test_correctness_runs_outside_the_main_thread() -> None:
    # math-verify's signal-based timeout raises off the main thread; we switch it off there.
    import threading

    box: dict[str, object] = {}

    def run() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            box["out"] = correctness(["<answer>0.5</answer>"], [r"\frac12"])

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(30)
    assert box["out"] == [True]
