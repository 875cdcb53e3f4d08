"""Reward rules that misbehave at run time: each failure is caught per call, named, scored None and
counted; NaN and ±inf never reach a score; a rule that fails too often stops its stage."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import pytest

from align.recipe.schema import RewardSpec
from align.rewards import (
    BoundRule,
    RewardModelReward,
    RuleFailureError,
    Scorer,
    bind_rule,
    weighted_total,
)


def scores(values: list[Any]) -> Any:
    """A rule that scores completion "a" values[0], "b" values[1], … (in the batch and alone alike)."""

    def rule(completions: list[str], **kwargs: Any) -> Any:
        return [values["abcdefgh".index(c)] for c in completions]

    return rule


def test_a_rule_that_raises_scores_none_counted_and_named(caplog: pytest.LogCaptureFixture) -> None:
    def broken(completions: list[str], **kwargs: Any) -> list[float]:
        raise KeyError("answer")

    bound = bind_rule(broken, {}, "broken")
    with caplog.at_level(logging.WARNING, logger="align.rewards"):
        assert bound(["a", "b", "c"]) == [None, None, None]
    assert bound.failures == 3 and bound.stats.batch_failures == 1 and bound.stats.sample_failures == 3
    assert bound.stats.last_error == "KeyError: 'answer'"
    assert "reward rule 'broken' raised on the batch" in caplog.text


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_failures_scored_none(bad: float) -> None:
    calls: list[int] = []

    def rule(completions: list[str], **kwargs: Any) -> list[float]:
        calls.append(len(completions))
        return [1.0, bad, 0.5]

    bound = bind_rule(rule, {}, "odd")
    assert bound(["a", "b", "c"]) == [1.0, None, 0.5]
    assert calls == [3]  # the batch's good scores are kept: no retry sample by sample
    assert bound.stats.non_finite == 1 and bound.failures == 1
    assert bound.stats.last_error == f"returned {bad} for sample 1"


def test_an_inf_score_never_reaches_the_total() -> None:
    scorer = Scorer([_term("inf", scores([math.inf, 2.0])), _term("ok", scores([1.0, 1.0]))])
    out = scorer(["q", "q"], ["a", "b"], completion_ids=[[1], [2]], columns={})
    assert out.total == [1.0, 3.0] and out.parts["inf"] == [None, 2.0]
    assert scorer.failures() == {"inf": 1, "ok": 0}
    assert weighted_total({"a": math.inf, "b": math.nan, "c": 2.0}, {"a": 1, "b": 1, "c": 0.5}) == 1.0


@pytest.mark.parametrize(
    ("output", "what"),
    [
        ("1.0", "returned str of length 3, expected 1 rewards"),
        ({"a": 1.0, "b": 1.0, "c": 1.0}, "returned dict of length 3, expected 1 rewards"),
        (0.5, "returned float of length ?, expected 1 rewards"),
        ((x for x in [1.0, 1.0, 1.0]), "returned generator of length ?, expected 1 rewards"),
    ],
    ids=["a string", "a mapping", "a number", "a generator"],
)
def test_outputs_that_are_not_one_reward_per_completion(output: Any, what: str) -> None:
    def rule(completions: list[str], **kwargs: Any) -> Any:
        return output

    bound = bind_rule(rule, {}, "shapeless")
    assert bound(["a", "b", "c"]) == [None, None, None]
    assert bound.stats.invalid_outputs == 4 and bound.failures == 3  # the batch, then each sample
    assert what in (bound.stats.last_error or "")


def test_a_list_of_the_wrong_length_is_retried_sample_by_sample() -> None:
    def one(completions: list[str], **kwargs: Any) -> list[float]:
        return [1.0]

    bound = bind_rule(one, {}, "one")
    assert bound(["a", "b", "c"]) == [1.0, 1.0, 1.0]  # alone, each sample gets its one reward
    assert bound.stats.invalid_outputs == 1 and bound.failures == 0
    assert bound.stats.last_error == "_InvalidOutput: reward rule 'one' returned list of length 1, expected 3 rewards"


@pytest.mark.parametrize("value", ["0.5", b"1", [1.0], object(), 10**400, 1j])
def test_a_reward_that_is_not_a_number(value: Any) -> None:
    bound = bind_rule(scores([1.0, value]), {}, "typed")
    assert bound(["a", "b"]) == [1.0, None]
    assert bound.failures == 1 and "is not a number or None" in (bound.stats.last_error or "")


def test_a_batch_timeout_counts_every_sample_it_cut_off() -> None:
    def slow(completions: list[str], **kwargs: Any) -> list[float]:
        time.sleep(1.0)
        return [1.0] * len(completions)

    bound = bind_rule(slow, {}, "slow", timeout_s=0.05)
    assert bound(["x"] * 16) == [None] * 16
    assert bound.failures == 16 and bound.stats.timed_out_samples == 16 and bound.stats.timeouts == 1
    assert bound.stats.last_error == "RuleTimeout: reward rule 'slow' ran past 0.05 s"


def test_a_hang_after_a_batch_error_times_out_sample_by_sample() -> None:
    def hangs_alone(completions: list[str], **kwargs: Any) -> list[float]:
        if len(completions) > 1:
            raise ValueError("batch")
        if completions[0] == "hang":
            time.sleep(1.0)
        return [1.0]

    bound = bind_rule(hangs_alone, {}, "hangs", timeout_s=0.2)
    started = time.monotonic()
    assert bound(["ok", "hang", "late", "later"]) == [1.0, None, None, None]
    assert time.monotonic() - started < 0.9  # the deadline covers the whole call
    assert bound.failures == 3 and bound.stats.timed_out_samples == 3


def test_a_rule_failing_past_its_rate_stops_with_its_name_and_last_error() -> None:
    def rule(completions: list[str], **kwargs: Any) -> list[float]:
        if any("bad" in c for c in completions):
            raise ValueError(f"cannot parse {completions[0]!r}")
        return [1.0] * len(completions)

    bound = bind_rule(rule, {}, "parser", max_failure_rate=0.25, min_samples=8)
    assert bound(["bad", "bad", "ok", "ok"]) == [None, None, 1.0, 1.0]  # 2 of 4 failed: too few samples to judge
    with pytest.raises(RuleFailureError) as info:
        bound(["ok", "bad", "ok", "ok"])  # 3 of 8 = 38 % > 25 %
    assert str(info.value).startswith(
        "reward rule 'parser' failed on 3 of the 8 samples it scored (38%, more than max_rule_failure_rate 0.25); "
        "last error: ValueError: cannot parse 'bad'. Fix the rule")


def test_one_bad_first_batch_does_not_stop_a_run() -> None:
    state = {"calls": 0}

    def flaky_start(completions: list[str], **kwargs: Any) -> list[float | None]:
        state["calls"] += 1
        if state["calls"] == 1:
            raise RuntimeError("cold cache")
        return [1.0] * len(completions)

    bound = bind_rule(flaky_start, {}, "warmup", max_failure_rate=0.1, min_samples=64)
    bound(["a", "b"])  # the batch call fails; its retries, sample by sample, do not
    for _ in range(40):
        bound(["a", "b"])
    assert bound.failures == 0 and bound.stats.batch_failures == 1
    always = bind_rule(scores([math.nan, math.nan]), {}, "nan", max_failure_rate=0.1, min_samples=64)
    for _ in range(31):
        always(["a", "b"])  # 62 samples, all failed: still under the minimum
    with pytest.raises(RuleFailureError, match="failed on 64 of the 64 samples"):
        always(["a", "b"])


def test_a_rate_of_one_never_stops() -> None:
    bound = bind_rule(scores([math.nan, math.nan]), {}, "nan", max_failure_rate=1.0, min_samples=1)
    for _ in range(10):
        assert bound(["a", "b"]) == [None, None]
    assert bound.failures == 20


def test_none_a_rule_chooses_is_not_a_failure() -> None:
    bound = bind_rule(scores([None, 1.0]), {}, "abstains", max_failure_rate=0.0, min_samples=1)
    for _ in range(5):
        assert bound(["a", "b"]) == [None, 1.0]
    assert bound.failures == 0 and bound.stats.none_samples == 5


def test_the_scorer_binds_the_stage_limits_and_reports_failures(caplog: pytest.LogCaptureFixture) -> None:
    scorer = Scorer.build([RewardSpec(rule="accuracy"), RewardSpec(rule="format")], max_rule_failure_rate=0.2,
                          rule_failure_min_samples=16)  # fmt: skip
    rules = [t.fn for t in scorer.terms]
    assert all(isinstance(f, BoundRule) and f.max_failure_rate == 0.2 and f.min_samples == 16 for f in rules)
    rules[0].stats.sample_failures = 3
    rules[0].stats.last_error = "ValueError: x"
    with caplog.at_level(logging.WARNING, logger="align.rewards"):
        assert scorer.failure_metrics("grpo") == {"accuracy_failures": 3, "format_failures": 0}
    assert "grpo: accuracy scored None on 3 samples because it failed (ValueError: x)" in caplog.text


def test_a_reward_model_that_scores_nan_or_inf(monkeypatch: pytest.MonkeyPatch) -> None:
    import align.rewards as rewards

    monkeypatch.setattr(rewards, "score_with_reward_model", lambda *a, **k: [0.5, math.nan, math.inf])
    model = RewardModelReward(model=None, tokenizer=None)
    assert model(["a", "b", "c"], prompts=["q"] * 3) == [0.5, None, None]
    assert model.failures == 2


def test_stage_keys_are_bounded(tmp_path: Any) -> None:
    from tests.recipe_problems import recipe_problems

    text = """\
name: k
model: align:tiny
stages:
  - {name: g, type: grpo, dataset: {path: "align:arithmetic", num_examples: 8}, rewards: [{rule: format}],
     max_rule_failure_rate: 1.5}
  - {name: p, type: ppo, dataset: {path: "align:arithmetic", num_examples: 8}, rewards: [{rule: format}],
     max_rule_failure_rate: -0.1}
  - {name: r, type: rejection_sampling, dataset: {path: "align:arithmetic", num_examples: 8}, rewards: [{rule: format}],
     rule_failure_min_samples: 0}
"""
    found = recipe_problems(tmp_path, text)
    assert "less than or equal to 1" in found["stages[0].max_rule_failure_rate"]
    assert "greater than or equal to 0" in found["stages[1].max_rule_failure_rate"]
    assert "greater than 0" in found["stages[2].rule_failure_min_samples"]


def _term(name: str, fn: Any) -> Any:
    from align.rewards import RewardTerm

    return RewardTerm(name, 1.0, bind_rule(fn, {}, name))
