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


def test_majority_vote_groups_equivalent_answers_and_breaks_ties_by_first_seen() -> None:
    from reward_rules.accuracy import majority_vote

    # 4 and 4.0 are one group (math-verify), 5 and 5 another: 2 votes each; the tie goes to the group
    # seen first (index 0). A sample without an answer does not vote.
    texts = ["<answer>4</answer>", "<answer>4.0</answer>", "<answer>5</answer>", "<answer>5</answer>", "no answer"]
    assert majority_vote(texts) == 0
    # \frac{1}{2} and 0.5 are one group (2 votes) against 3 (1 vote): the winner is its first member.
    assert majority_vote(["<answer>3</answer>", "<answer>\\frac{1}{2}</answer>", "the answer is 0.5"]) == 1
    # Order decides ties, nothing else: the same votes reversed pick the other group.
    assert majority_vote(["<answer>5</answer>", "<answer>4</answer>"]) == 0
    assert majority_vote(["<answer>4</answer>", "<answer>5</answer>"]) == 0
    assert majority_vote(["nothing", "at all"]) is None
    assert majority_vote([]) is None


def test_maj_at_k_hand_checked() -> None:
    prompts = ["p1", "p2", "p3"]
    solutions = ["4", "7", "2"]
    answers = [
        ["5", "4", "4", "5"],  # maj@1: 5 ✗; maj@3: 4 (2 votes) ✓; maj@4: tie 5 vs 4 → 5 came first ✗
        ["7", "1", "1", "7.0"],  # maj@1 ✓; maj@3: 1 (2) ✗; maj@4: tie 7 (7, 7.0) vs 1 → 7 first ✓
        [None, None, "2", "3"],  # maj@1: no answer ✗; maj@3: 2 ✓; maj@4: tie 2 vs 3 → 2 first ✓
    ]
    samples = [[sample(f"<answer>{a}</answer>" if a is not None else "I don't know") for a in row] for row in answers]
    metrics, records = score(prompts, solutions, samples, [1, 4], [1, 3, 4])  # metrics are rounded to 4 places
    assert metrics["maj@1"] == pytest.approx(1 / 3, abs=1e-4)
    assert metrics["maj@3"] == pytest.approx(2 / 3, abs=1e-4)
    assert metrics["maj@4"] == pytest.approx(2 / 3, abs=1e-4)
    # pass@k next to it, from the same samples: correct counts 2, 2, 1 of 4.
    assert metrics["pass@1"] == pytest.approx((2 / 4 + 2 / 4 + 1 / 4) / 3, abs=1e-4)
    assert metrics["pass@4"] == pytest.approx(1.0, abs=1e-4)
    assert [r["majority"] for r in records] == [
        {"maj@1": False, "maj@3": True, "maj@4": False},
        {"maj@1": True, "maj@3": False, "maj@4": True},
        {"maj@1": False, "maj@3": True, "maj@4": True},
    ]


def test_maj_k_needs_enough_samples_and_defaults_to_num_samples() -> None:
    from align.recipe.errors import RecipeError
    from align.recipe.validate import load_recipe_text

    text = """\
name: e
model: align:tiny
stages:
  - {name: ev, type: eval, dataset: {path: "align:arithmetic", split: test, num_examples: 4}, num_samples: 4,
     temperature: 1.0, maj_k: [2, 8]}
"""
    with pytest.raises(RecipeError) as err:
        load_recipe_text(text)
    assert "stages[0].maj_k[1]: maj@8 needs at least 8 samples per prompt (num_samples is 4)" in err.value.render()
