"""Property-based fuzzing (hypothesis) of what users type and what rules are handed: recipe text, override
strings, and reward-rule inputs. No model is loaded; each test takes a few seconds."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from align.recipe.errors import RecipeError, format_path
from align.recipe.overrides import OverrideError, apply_overrides, parse_override
from align.recipe.validate import load_recipe_text
from align.rewards import bind_rule, check_rule_params, rule_signature
from reward_rules import RULES

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- the recipe loader

KEYS = ["name", "model", "seed", "stages", "type", "dataset", "path", "num_examples", "split", "rewards", "rule",
        "weight", "params", "learning_rate", "max_steps", "lora", "r", "launcher", "num_processes", "eval_dataset",
        "on_bad_rows", "max_rule_failure_rate", "columns", "report_to", "name_or_path", "teacher", "sedd", "<<"]
STAGE_TYPES = ["sft", "eval", "grpo", "ppo", "rejection_sampling", "distill", "reward_model", "dpo", "kto", "nope"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["align:tiny", "align:arithmetic", "${stages.a.model}", "${stages.b.dataset}", "${oops",
                     "accuracy", "format", "x.jsonl", "error", "skip", "", " ", "1e-3", "tensorboard"]),
    st.sampled_from(STAGE_TYPES), st.text(max_size=8),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=4)),
    max_leaves=12,
)
STAGE = st.fixed_dictionaries(
    {"name": st.sampled_from(["a", "b", "a b", 3]), "type": st.sampled_from(STAGE_TYPES) | VALUES},
    optional={key: VALUES for key in KEYS if key not in ("name", "type")},
)
RECIPE = st.fixed_dictionaries(
    {"name": st.sampled_from(["r", "bad name", 7]), "model": st.sampled_from(["align:tiny", {"name_or_path": "align:tiny"}]) | VALUES},
    optional={"seed": VALUES, "stages": st.lists(STAGE | VALUES, max_size=3) | VALUES, "launcher": VALUES,
              "report_to": VALUES, "sedd": VALUES},
)


def assert_loads_or_locates(text: str, tmp_path: Path) -> None:
    """Either a validated recipe, or a RecipeError whose every problem has a key path and a message."""
    try:
        recipe = load_recipe_text(text, base_dir=tmp_path, check_files=False, check_models=False)
    except RecipeError as err:
        assert err.problems
        for problem in err.problems:
            assert isinstance(problem.path, tuple) and problem.message
            assert problem.line is None or problem.line >= 1
            format_path(problem.path)
        assert err.render().startswith(f"{err.source}: {len(err.problems)} problem")
    else:
        assert recipe.stages and recipe.name


@FAST
@given(text=st.text(max_size=200))
@example(text="a: &x [*x]")  # a recursive alias
@example(text="---\nname: a\n---\nname: b\n")  # two documents
@example(text="name: !!python/object:os.system x\n")
@example(text="? [a, b]\n: 1\n")  # a key that is a list
@example(text="stages: [{name: [1], type: [sft]}]\nname: r\nmodel: align:tiny\n")  # unhashable name and type
@example(text="name: r\nmodel: align:tiny\nstages:\n  - {name: a, type: sft, dataset: {path: x.jsonl}, <<: {seed: 1}}\n")
def test_any_text_is_a_recipe_or_located_problems(text: str, tmp_path_factory: Any) -> None:
    assert_loads_or_locates(text, tmp_path_factory.getbasetemp())


@FAST
@given(recipe=RECIPE)
def test_any_recipe_shape_is_a_recipe_or_located_problems(recipe: dict[str, Any], tmp_path_factory: Any) -> None:
    assert_loads_or_locates(yaml.safe_dump(recipe, allow_unicode=True), tmp_path_factory.getbasetemp())


# ---------------------------------------------------------------- the overrides parser

BASE = {
    "name": "r", "model": "align:tiny", "seed": 0,
    "stages": [{"name": "sft", "type": "sft", "dataset": {"path": "align:arithmetic", "num_examples": 8},
                "lora": None, "rewards": [{"rule": "accuracy"}]},
               {"name": "ev", "type": "eval", "dataset": {"path": "align:arithmetic", "num_examples": 8}}],
}  # fmt: skip
SEGMENTS = st.sampled_from(["stages", "sft", "ev", "0", "1", "-1", "9", "²", "dataset", "lora", "r", "rewards",
                            "name", "seed", "", " ", "model", "nope"]) | st.text(max_size=5)
OVERRIDE = st.one_of(
    st.text(max_size=40),
    st.builds(lambda keys, value: ".".join(keys) + "=" + value, st.lists(SEGMENTS, min_size=1, max_size=5),
              st.sampled_from(["1", "[1, 2", "{a: 1}", "a: b: c", "!!python/name:os.system", "", "x=y", "'", "null",
                               ".inf", "[{rule: format}]", "- a\n- b", "\t"]) | st.text(max_size=10)),
)


@FAST
@given(text=st.text(max_size=60))
@example(text="seed=[1, 2")  # YAML that does not parse
@example(text="seed=!!python/name:os.system")
def test_an_override_parses_or_says_why(text: str) -> None:
    try:
        keys, _ = parse_override(text)
    except OverrideError as err:
        assert str(err)
    else:
        assert keys and all(keys)


@FAST
@given(overrides=st.lists(OVERRIDE, max_size=4))
@example(overrides=["stages.²=1"])  # a digit int() does not read
@example(overrides=["stages.sft.lora.r=16", "stages.0.dataset.num_examples=[1, 2"])
def test_overrides_apply_or_become_problems(overrides: list[str], tmp_path_factory: Any) -> None:
    data = copy.deepcopy(BASE)
    problems = apply_overrides(data, overrides)
    assert all(p.path == ("<override>",) and p.message for p in problems)
    if not problems:
        assert_loads_or_locates(yaml.safe_dump(data, allow_unicode=True), tmp_path_factory.getbasetemp())


# ---------------------------------------------------------------- reward rules

TEXT = st.text(max_size=40) | st.sampled_from([
    "<think>1+1=2</think><answer>2</answer>", "<think>a</think>\n<answer>\\frac{1}{2}</answer>",
    "\\boxed{3}", "The answer is 42", "<answer></answer>", "```python\nprint(1)\n```", "１２", "思考",
])
COMPLETION = TEXT | st.builds(lambda t: [{"role": "assistant", "content": t}], TEXT)
SOLUTION = st.one_of(st.none(), TEXT, st.integers(-1000, 1000), st.floats(allow_nan=True), st.sampled_from(
    ["2", "\\frac12", "A", "#### 5", "\\boxed{x}", "[1, 2]"]))
TEST_CASES = st.one_of(st.none(), TEXT, st.lists(st.fixed_dictionaries({"input": TEXT, "output": TEXT}), max_size=2),
                       st.integers())
PARAM_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-5, 2000), st.floats(allow_nan=True), TEXT,
                        st.sampled_from(["en", "zh", "python", "answer", "think"]), st.lists(TEXT, max_size=2))
# The code rule runs sandboxed processes; its fuzzing is kept to inputs without a code block.
RULE_NAMES = sorted(RULES)


@st.composite
def rule_calls(draw: Any, valid_params: bool) -> tuple[str, list[Any], dict[str, Any], dict[str, Any]]:
    name = draw(st.sampled_from(RULE_NAMES))
    signature = rule_signature(RULES[name])
    n = draw(st.integers(0, 4))
    completions = draw(st.lists(COMPLETION, min_size=n, max_size=n))
    if name == "code":
        completions = [c.replace("```", "") if isinstance(c, str) else c for c in completions]
    columns = {column: draw(st.lists(TEST_CASES if column == "test_cases" else SOLUTION, min_size=n, max_size=n))
               for column in signature.columns}
    if draw(st.booleans()):
        columns["completion_ids"] = [list(range(draw(st.integers(0, 30)))) for _ in range(n)]
    if draw(st.booleans()):
        columns["prompts"] = draw(st.lists(TEXT, min_size=n, max_size=n))
    names = list(signature.params)
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names))) if names else []
    params = {key: draw(PARAM_VALUE) for key in chosen}
    if valid_params:
        params = {key: value for key, value in params.items() if not check_rule_params(RULES[name], {key: value})}
        if check_rule_params(RULES[name], params):  # fine alone, not together (a relation): keep the defaults
            params = {}
    return name, completions, columns, params


def finite_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isfinite(value))


@FAST
@given(call=rule_calls(valid_params=True))
def test_a_rule_with_valid_params_scores_every_completion(call: tuple[str, list[Any], dict[str, Any], dict[str, Any]]) -> None:
    name, completions, columns, params = call
    try:
        out = RULES[name](completions, **columns, **params)
    except (ValueError, TypeError) as err:  # a clean refusal of the input, naming the rule and what is wrong
        assert str(err).startswith(f"{name}: "), err
        return
    assert len(out) == len(completions)
    assert all(finite_or_none(v) for v in out), out


@FAST
@given(call=rule_calls(valid_params=False))
def test_a_bound_rule_never_raises_and_never_scores_nan_or_inf(call: tuple[str, list[Any], dict[str, Any], dict[str, Any]]) -> None:
    name, completions, columns, params = call
    bound = bind_rule(RULES[name], params, name)
    out = bound(completions, **columns)
    assert len(out) == len(completions)
    assert all(finite_or_none(v) for v in out), out
    if check_rule_params(RULES[name], params) and completions:
        assert bound.failures == len(completions)  # bad params fail every sample, counted


@FAST
@given(call=rule_calls(valid_params=False))
def test_bad_params_are_refused_by_the_rule_itself(call: tuple[str, list[Any], dict[str, Any], dict[str, Any]]) -> None:
    name, completions, columns, params = call
    problems = check_rule_params(RULES[name], params)
    if not problems:
        return
    try:
        RULES[name](completions, **columns, **params)
    except ValueError as err:
        assert str(err).startswith(f"{RULES[name].__name__}: ")  # names the rule, then the parameter
    else:
        raise AssertionError(f"{name} accepted {params} despite {problems}")
