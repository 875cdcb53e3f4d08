"""align.rewards: resolving rules, reading their signatures, checking parameters, calling them safely."""

from __future__ import annotations

import math
import pickle
import time
from pathlib import Path
from typing import Any

import pytest

from align.rewards import (
    REQUIRED,
    BoundRule,
    RuleResolutionError,
    bind_rule,
    check_rule_params,
    coerce_params,
    describe_rules,
    resolve_rule,
    rule_signature,
    try_rule,
)
from reward_rules import RULES
from reward_rules.accuracy import accuracy
from reward_rules.format import tag_count

RIGHT = "<think>t</think><answer>42</answer>"


class NotARule:
    pass


# ---------------------------------------------------------------- resolve_rule


def test_resolve_builtin_and_near_miss() -> None:
    assert resolve_rule("accuracy") is RULES["accuracy"]
    assert resolve_rule("  format ") is RULES["format"]
    with pytest.raises(RuleResolutionError, match="Did you mean 'accuracy'") as info:
        resolve_rule("acuracy")
    assert isinstance(info.value, ValueError)
    with pytest.raises(RuleResolutionError, match="unknown reward rule 'zzz'.*Known rules: accuracy"):
        resolve_rule("zzz")
    with pytest.raises(RuleResolutionError, match="empty"):
        resolve_rule("")


def test_resolve_dotted_paths() -> None:
    assert resolve_rule("reward_rules.accuracy:accuracy") is accuracy
    assert resolve_rule("reward_rules.accuracy.accuracy") is accuracy
    assert resolve_rule("reward_rules.format.tag_count") is tag_count
    with pytest.raises(RuleResolutionError, match="has no attribute 'acuracy'.*Did you mean 'accuracy'"):
        resolve_rule("reward_rules.accuracy:acuracy")
    with pytest.raises(RuleResolutionError, match="is a str, not a reward function"):
        resolve_rule("reward_rules.accuracy:CHOICE_LETTERS")
    with pytest.raises(RuleResolutionError, match="is a class"):
        resolve_rule(f"{__name__}:NotARule")
    with pytest.raises(RuleResolutionError, match="cannot import a module"):
        resolve_rule("no_such_package_xyz.mod.func")
    with pytest.raises(RuleResolutionError, match="must take a parameter named 'completions'"):
        resolve_rule("os.path:join")


RULE_FILE = '''
def bonus(completions, answer, hint=None, *, weight: float = 1.0, **kwargs):
    """Scores weight for each completion that contains its answer.

    Body.
    """
    return [weight * (a in c) for c, a in zip(completions, answer)]

not_callable = 3
'''


def test_resolve_file_relative_to_base_dir(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "mine.py").write_text(RULE_FILE)
    fn = resolve_rule("rules/mine.py:bonus", base_dir=tmp_path)
    assert fn(["a 42", "b"], answer=["42", "9"], weight=2.0) == [2.0, 0.0]
    assert resolve_rule("rules/mine.py:bonus", base_dir=tmp_path) is fn  # loaded once
    assert resolve_rule(f"{tmp_path}/rules/mine.py:bonus") is fn  # absolute path, no base_dir
    with pytest.raises(RuleResolutionError, match="does not exist"):
        resolve_rule("rules/other.py:bonus", base_dir=tmp_path)
    with pytest.raises(RuleResolutionError, match="Did you mean 'bonus'"):
        resolve_rule("rules/mine.py:bonsu", base_dir=tmp_path)
    with pytest.raises(RuleResolutionError, match="name the function too"):
        resolve_rule("rules/mine.py", base_dir=tmp_path)
    with pytest.raises(RuleResolutionError, match="is a int"):
        resolve_rule("rules/mine.py:not_callable", base_dir=tmp_path)
    (tmp_path / "broken.py").write_text("raise RuntimeError('bad import')\n")
    with pytest.raises(RuleResolutionError, match="bad import"):
        resolve_rule("broken.py:f", base_dir=tmp_path)


def test_resolve_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real (fake-installed) distribution with an align.reward_rules entry point.
    dist = tmp_path / "plugin_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[align.reward_rules]\nplugged = reward_rules.format:tag_count\nbroken_plugin = no_such_mod_xyz:f\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_rule("plugged") is tag_count
    with pytest.raises(RuleResolutionError, match="Did you mean 'plugged'"):
        resolve_rule("pluged")
    with pytest.raises(RuleResolutionError, match="loading entry point 'broken_plugin'"):
        resolve_rule("broken_plugin")
    listed = {rule["name"]: rule for rule in describe_rules()}
    assert listed["plugged"]["source"] == "entry point reward_rules.format:tag_count"
    assert listed["plugged"]["params"]["think_tag"]["default"] == "think"
    assert listed["broken_plugin"]["description"].startswith("(cannot load")


# ---------------------------------------------------------------- signatures and parameters


def test_rule_signature() -> None:
    sig = rule_signature(RULES["accuracy"])
    assert sig.columns == ("solution",)
    assert sig.params == {"answer_tag": (str, "answer"), "percent_as_fraction": (bool, False)}
    assert sig.accepts_kwargs

    def custom(
        completions: list[str],
        answer: list[str],
        hint: list[str] | None = None,
        *,
        weight: float,
        scale: int = 2,
        prompts: list[str] | None = None,
        completion_ids: list[list[int]] | None = None,
    ) -> list[float]:
        return [0.0]

    sig = rule_signature(custom)
    assert sig.columns == ("answer",)
    assert sig.optional_columns == ("hint",)
    assert sig.params == {"weight": (float, REQUIRED), "scale": (int, 2)}  # TRL kwargs are not params
    assert not sig.accepts_kwargs


def test_check_rule_params() -> None:
    fmt = RULES["format"]
    assert check_rule_params(fmt, {}) == []
    assert check_rule_params(fmt, {"think_tag": "reasoning", "prefilled_think": True}) == []
    (problem,) = check_rule_params(fmt, {"thinktag": "x"})
    assert "unknown parameter 'thinktag'" in problem and "Did you mean 'think_tag'?" in problem
    (problem,) = check_rule_params(fmt, {"think_tag": 3})
    assert "parameter 'think_tag' must be str, got 3" in problem
    (problem,) = check_rule_params(fmt, {"prefilled_think": 1})
    assert "must be bool" in problem
    assert check_rule_params(RULES["cosine"], {"max_len": 500, "max_value_correct": 2}) == []  # int as float
    (problem,) = check_rule_params(RULES["cosine"], {"max_len": 1.5})
    assert "'max_len' must be int" in problem
    (problem,) = check_rule_params(RULES["accuracy"], {"solution": "42"})
    assert "'solution' is a dataset column" in problem
    (problem,) = check_rule_params(RULES["language_consistency"], {"language": "klingon"})
    assert "'language'" in problem and "'en'" in problem

    def needs(completions: list[str], *, threshold: float, **kwargs: Any) -> list[float]:
        return [0.0]

    assert check_rule_params(needs, {}) == ["missing required parameter 'threshold' (float)"]


def test_unresolvable_annotation_is_left_unchecked(tmp_path: Path) -> None:
    (tmp_path / "odd.py").write_text(
        "from __future__ import annotations\n"
        "def rule(completions, *, weight: float = 1.0, thing: NotDefinedAnywhere = None, **kwargs):\n"
        "    return [weight] * len(completions)\n"
    )
    fn = resolve_rule("odd.py:rule", base_dir=tmp_path)
    assert rule_signature(fn).params["weight"] == (float, 1.0)
    assert check_rule_params(fn, {"thing": 3}) == []
    assert check_rule_params(fn, {"weight": "heavy"}) != []


def test_coerce_params() -> None:
    cosine = RULES["cosine"]
    typed = coerce_params(cosine, {"max_len": "100", "min_value_wrong": "-2", "answer_tag": "42"})
    assert typed == {"max_len": 100, "min_value_wrong": -2, "answer_tag": "42"}
    assert coerce_params(RULES["format"], {"prefilled_think": "true"}) == {"prefilled_think": True}
    assert coerce_params(RULES["format"], {"prefilled_think": "maybe"}) == {"prefilled_think": "maybe"}


# ---------------------------------------------------------------- bind_rule


def flaky(
    completions: list[str], solution: list[str], *, bonus: float = 0.0, **kwargs: Any
) -> list[float | None]:
    """Raises on the whole batch when one completion says boom; scores solution membership."""
    if any("boom" in c for c in completions):
        raise RuntimeError("boom")
    return [float(s in c) + bonus for c, s in zip(completions, solution, strict=True)]


def test_bound_rule_is_a_named_trl_reward_function() -> None:
    bound = bind_rule(RULES["accuracy"], {"answer_tag": "answer"}, name="math_accuracy")
    assert isinstance(bound, BoundRule)
    assert bound.__name__ == "math_accuracy"  # TRL logs rewards/<__name__>
    out = bound(
        prompts=["q", "q"],
        completions=[RIGHT, [{"role": "assistant", "content": "<answer>41</answer>"}]],
        completion_ids=[[1], [2]],
        solution=["42", "42"],
        trainer_state=None,
    )
    assert out == [1.0, 0.0]
    assert bound.stats.calls == 1 and bound.failures == 0
    clone = pickle.loads(pickle.dumps(bound))
    assert clone.__name__ == "math_accuracy" and clone([RIGHT], solution=["42"]) == [1.0]


def test_bound_rule_binds_params_over_columns() -> None:
    bound = bind_rule(flaky, {"bonus": 0.5}, name="flaky")
    assert bound(["has 1", "none"], solution=["1", "2"]) == [1.5, 0.5]


def test_bound_rule_falls_back_to_sample_by_sample() -> None:
    bound = bind_rule(flaky, {}, name="flaky")
    metrics: list[tuple[str, float]] = []
    out = bound(
        completions=["a 1", "boom", "c 3", "d"],
        solution=["1", "2", "3", "4"],
        completion_ids=[[1], [2], [3], [4]],
        trainer_state=object(),
        log_metric=lambda name, value: metrics.append((name, value)),
    )
    # Columns are sliced per sample, so the 3rd sample is still checked against its own solution.
    assert out == [1.0, None, 1.0, 0.0]
    assert bound.stats.batch_failures == 1
    assert bound.stats.sample_failures == 1 and bound.failures == 1
    assert bound.stats.last_error == "RuntimeError: boom"
    assert metrics == [("reward_errors/flaky", 0.25)]


def test_bound_rule_bad_outputs() -> None:
    def wrong_length(completions: list[str], **kwargs: Any) -> list[float]:
        return [1.0]

    def nan_and_text(completions: list[str], **kwargs: Any) -> list[Any]:
        return [math.nan if c == "nan" else ("x" if c == "text" else 1) for c in completions]

    bound = bind_rule(wrong_length, {}, name="short")
    # the batch is invalid, per sample it is fine
    assert bound(["a", "b"]) == [1.0, 1.0]
    assert bound.stats.invalid_outputs == 1
    bound = bind_rule(nan_and_text, {}, name="mixed")
    assert bound(["nan", "text", "ok"]) == [None, None, 1.0]
    assert bound.stats.sample_failures == 1 and bound.stats.none_samples == 2


def test_bound_rule_without_kwargs_gets_only_what_it_declares() -> None:
    def strict(completions: list[str], solution: list[str]) -> list[float]:
        return [float(c == s) for c, s in zip(completions, solution, strict=True)]

    bound = bind_rule(strict, {}, name="strict")
    assert bound(completions=["1"], solution=["1"], prompts=["q"], trainer_state=None, log_metric=print) == [
        1.0
    ]
    assert bound.failures == 0


def test_bound_rule_timeout() -> None:
    def slow(completions: list[str], **kwargs: Any) -> list[float]:
        time.sleep(1.5)
        return [1.0] * len(completions)

    bound = bind_rule(slow, {}, name="slow", timeout_s=0.2)
    start = time.monotonic()
    assert bound(["a", "b"]) == [None, None]
    assert time.monotonic() - start < 1.0
    assert bound.stats.timeouts == 1
    fast = bind_rule(RULES["accuracy"], {}, name="acc", timeout_s=30)  # math-verify off the main thread
    assert fast([RIGHT], solution=["42"]) == [1.0]


# ---------------------------------------------------------------- CLI helpers


def test_describe_rules() -> None:
    listed = {rule["name"]: rule for rule in describe_rules(include_entry_points=False)}
    assert set(listed) == set(RULES)
    acc = listed["accuracy"]
    assert acc["columns"] == ["solution"]
    assert acc["params"]["percent_as_fraction"] == {"type": "bool", "default": False, "required": False}
    assert acc["description"].startswith("Math answer correctness")
    assert listed["code"]["columns"] == ["test_cases"]
    assert listed["language_consistency"]["params"]["language"]["type"].startswith("Literal[")
    assert all(rule["description"] and rule["source"] == "builtin" for rule in listed.values())


def test_try_rule() -> None:
    assert try_rule("accuracy", RIGHT, "42") == 1.0
    assert try_rule("accuracy", RIGHT, "41") == 0.0
    assert try_rule("format", RIGHT) == 1.0
    # string parameters from the command line are typed; lengths are characters here
    assert try_rule("cosine", RIGHT, "42", {"max_len": str(len(RIGHT))}) == pytest.approx(0.5)
    assert try_rule("format", "a</think><answer>1</answer>", None, {"prefilled_think": "true"}) == 1.0
    assert try_rule("code", "```python\nprint(42)\n```", '[{"input": "", "output": "42"}]') == 1.0
    with pytest.raises(ValueError, match="needs the dataset column 'solution'"):
        try_rule("accuracy", RIGHT)
    with pytest.raises(ValueError, match="Did you mean 'max_len'"):
        try_rule("cosine", RIGHT, "42", {"maxlen": "5"})
    with pytest.raises(RuleResolutionError):
        try_rule("acuracy", RIGHT, "42")


# ---------------------------------------------------------------- a rule's own parameter checks

GRPO = """\
name: rules
model: align:tiny
stages:
  - name: grpo
    type: grpo
    dataset: {path: "align:arithmetic", num_examples: 8}
    num_generations: 2
    per_device_train_batch_size: 2
    rewards:
      - REWARD
"""


@pytest.mark.parametrize(
    ("reward", "key", "reason"),
    [
        ("{rule: repetition, params: {max_penalty: 1.0}}", "max_penalty", "must be float ≤ 0, got 1.0"),
        ("{rule: soft_overlong, params: {overlong_buffer: 0}}", "overlong_buffer", "must be int > 0, got 0"),
        ("{rule: soft_overlong, params: {overlong_buffer: 512}}", "overlong_buffer",
         "overlong_buffer (512) must be less than max_completion_length (512)"),
        ("{rule: soft_overlong, params: {overlong_buffer: 600, max_completion_length: 256}}", "overlong_buffer",
         "overlong_buffer (600) must be less than max_completion_length (256)"),
        ("{rule: reasoning_steps, params: {min_steps: 0}}", "min_steps", "must be int ≥ 1, got 0"),
        ("{rule: cosine, params: {max_len: 0}}", "max_len", "must be int > 0, got 0"),
        ("{rule: code, params: {binary: true, binary_threshold: 1.5}}", "binary_threshold", "float in [0.0, 1.0)"),
        ("{rule: format, params: {think_tag: answer}}", "think_tag", "they must differ"),
    ],
)
def test_validate_runs_each_rules_own_checks(reward: str, key: str, reason: str) -> None:
    """Each of these validated "OK" before and then made the rule score None for every sample."""
    from align.recipe.errors import RecipeError
    from align.recipe.validate import load_recipe_text

    with pytest.raises(RecipeError) as caught:
        load_recipe_text(GRPO.replace("REWARD", reward), check_files=False)
    (problem,) = caught.value.problems
    rule = reward.split(",")[0].removeprefix("{rule: ")
    assert problem.path == ("stages", 0, "rewards", 0, "params")
    assert problem.message.startswith(f"reward rule '{rule}': ") and reason in problem.message
    assert key in problem.message  # the key, by name
    # The call runs the very same check.
    import yaml

    from reward_rules._params import param_problems

    params = yaml.safe_load(reward)["params"]
    ((found_key, found),) = param_problems(RULES[rule], params)
    assert found_key == key and found in problem.message  # the rule's sentence is the one validate shows
    with pytest.raises(ValueError, match=key):
        RULES[rule](["x"], **params, **({"solution": ["1"]} if rule == "cosine" else {}),
                    **({"test_cases": [[{"input": "", "output": ""}]]} if rule == "code" else {}))


def test_did_you_mean_offers_only_rules_that_score_the_same() -> None:
    from align.rewards import _did_you_mean, _did_you_mean_rule

    without_code_format = [name for name in RULES if name != "code_format"]
    # The case: before align had code_format, its lookalike `format` (R1 tags) was offered.
    assert "'format'" in _did_you_mean("code_format", without_code_format)
    assert _did_you_mean_rule("code_format", without_code_format) == ""
    assert "'code_format'" in _did_you_mean_rule("format_code", list(RULES))
    assert "'length'" in _did_you_mean_rule("length_penalty", list(RULES))
    assert _did_you_mean_rule("format_accuracy", list(RULES)) == ""  # nothing scores both
    assert "'accuracy'" in _did_you_mean_rule("acuracy", list(RULES))  # a typo says nothing: spelling decides
    with pytest.raises(RuleResolutionError) as info:
        resolve_rule("python_format")  # code + format: only code_format qualifies, never `format`
    assert "Did you mean 'code_format'?" in str(info.value)
    with pytest.raises(RuleResolutionError, match="Piston"):
        resolve_rule("ioi_code")
