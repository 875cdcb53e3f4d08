"""The eval stage's scoring, checked against hand-computed values."""

from __future__ import annotations

import pytest

from align.generation import Sample
from align.stages.eval import pass_at_k, score


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 1, 0.25),  # c/n
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (4, 0, 2, 0.0),
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (3, 2, 2, 1.0),  # fewer than k wrong samples: some k-subset always has a right one
    ],
)
def test_pass_at_k(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def sample(text: str, length: int = 5, finished: bool = True) -> Sample:
    return Sample(text, list(range(length)), finished)


def test_score_hand_checked() -> None:
    prompts = [[{"role": "user", "content": "What is 1+2?"}], [{"role": "user", "content": "Half of 1?"}]]
    solutions = ["3", "0.5"]
    samples = [
        [sample("<think>1+2=3</think><answer>3</answer>", 10), sample("<answer>4</answer>", 4, finished=False)],
        [sample("<think>half</think><answer>\\frac{1}{2}</answer>", 8), sample("so the answer is 1/2", 6)],
    ]
    metrics, records = score(prompts, solutions, samples, [1, 2])
    # correct: yes, no | yes (math-verify: 1/2 == 0.5), yes
    assert metrics["accuracy"] == pytest.approx(3 / 4)
    # exact string match of the extracted answer: only "3"
    assert metrics["exact_match"] == pytest.approx(1 / 4)
    assert metrics["pass@1"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert metrics["pass@2"] == pytest.approx(1.0)
    # strict format: the first completion of each prompt only
    assert metrics["format"] == pytest.approx(2 / 4)
    assert metrics["mean_length"] == pytest.approx((10 + 4 + 8 + 6) / 4)
    assert metrics["truncated"] == pytest.approx(1 / 4)
    assert metrics["num_prompts"] == 2
    assert [s["correct"] for s in records[0]["samples"]] == [True, False]
    assert records[1]["solution"] == "0.5"
