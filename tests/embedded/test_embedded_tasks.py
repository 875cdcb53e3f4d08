"""Synthetic arithmetic task: row format, correct solutions and traces, disjoint splits."""

from __future__ import annotations

import re

import pytest

from align.embedded.tasks import (
    ARITHMETIC_TASK,
    EMBEDDED_TASKS,
    TEST_FRACTION,
    is_embedded_task,
    make_task_dataset,
    problem_split,
)

PROMPT_RE = re.compile(r"^What is (\d+(?:[+-]\d+)+)\?$")
COMPLETION_RE = re.compile(r"^<think>([^<>]*)</think><answer>([^<>]*)</answer>$")


def _operands(prompt: list[dict[str, str]]) -> tuple[str, list[int]]:
    expression = PROMPT_RE.fullmatch(prompt[-1]["content"]).group(1)
    op = "-" if "-" in expression else "+"
    return op, [int(x) for x in expression.split(op)]


def _key(prompt: list[dict[str, str]]) -> tuple[str, tuple[int, ...]]:
    op, operands = _operands(prompt)
    return op, tuple(sorted(operands) if op == "+" else operands)


def test_names() -> None:
    assert ARITHMETIC_TASK == "align:arithmetic" and ARITHMETIC_TASK in EMBEDDED_TASKS
    assert is_embedded_task("align:arithmetic") and not is_embedded_task("gsm8k")


def test_columns_and_format() -> None:
    ds = make_task_dataset(ARITHMETIC_TASK, "train", 20)
    assert set(ds.column_names) == {"prompt", "completion", "solution", "difficulty"}
    row = ds[0]
    assert [m["role"] for m in row["prompt"]] == ["user"]
    assert [m["role"] for m in row["completion"]] == ["assistant"]
    assert COMPLETION_RE.fullmatch(row["completion"][0]["content"])
    assert isinstance(row["solution"], str) and isinstance(row["difficulty"], int)


def test_system_prompt() -> None:
    ds = make_task_dataset(ARITHMETIC_TASK, "test", 3, system_prompt="Think first.")
    assert ds[0]["prompt"][0] == {"role": "system", "content": "Think first."}
    assert ds[0]["prompt"][1]["role"] == "user"


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"max_operand": 999, "trace": "columns"},
        {"ops": "+-", "max_operand": 999},
        {"num_operands": 3, "max_operand": 99},
        {"trace": "equation", "max_operand": 30},
        {"trace": "none"},
    ],
)
def test_solutions_and_traces_are_correct(params: dict[str, object]) -> None:
    ds = make_task_dataset(ARITHMETIC_TASK, "train", 300, seed=3, **params)
    for row in ds:
        op, operands = _operands(row["prompt"])
        value = sum(operands) if op == "+" else operands[0] - operands[1]
        assert row["solution"] == str(value)
        think, answer = COMPLETION_RE.fullmatch(row["completion"][0]["content"]).groups()
        assert answer == row["solution"]
        trace = params.get("trace", "columns")
        if trace == "columns":
            _check_column_trace(think, op, operands, row["difficulty"])
        elif trace == "equation":
            assert think == f"{op.join(map(str, operands))}={value}"
        else:
            assert think == ""


def _check_column_trace(think: str, op: str, operands: list[int], difficulty: int) -> None:
    """Independent re-derivation: every step is right and the carries/borrows chain."""
    steps = think.split(" ")
    width = max(len(str(x)) for x in operands)
    assert len(steps) == width
    carry = 0
    carries = 0
    for i, step in enumerate(steps):
        lhs, rhs = step.split("=")
        digits = [(x // 10**i) % 10 for x in operands]
        if op == "+":
            terms = [int(t) for t in lhs.split("+")]
            assert terms == digits + ([carry] if i else [])
            assert int(rhs) == sum(terms)
            carry = int(rhs) // 10
        else:
            terms = lhs.split("-")
            top = int(terms[0])
            borrowed = top >= 10
            assert top == digits[0] + 10 * borrowed
            assert int(terms[1]) == digits[1]
            if i:
                assert int(terms[2]) == carry
            assert int(rhs) == top - int(terms[1]) - (carry if i else 0)
            assert 0 <= int(rhs) <= 9
            carry = int(borrowed)
        carries += carry > 0
    assert difficulty == carries


def test_deterministic() -> None:
    a = make_task_dataset(ARITHMETIC_TASK, "train", 50, seed=7)
    b = make_task_dataset(ARITHMETIC_TASK, "train", 50, seed=7)
    c = make_task_dataset(ARITHMETIC_TASK, "train", 50, seed=8)
    assert a.to_list() == b.to_list()
    assert a.to_list() != c.to_list()


@pytest.mark.parametrize("params", [{}, {"max_operand": 30}, {"ops": "+-", "max_operand": 999}])
def test_train_and_test_never_overlap(params: dict[str, object]) -> None:
    train = set()
    for seed in (0, 1):
        train |= {
            _key(p) for p in make_task_dataset(ARITHMETIC_TASK, "train", 3000, seed=seed, **params)["prompt"]
        }
    test = {_key(p) for p in make_task_dataset(ARITHMETIC_TASK, "test", 500, seed=0, **params)["prompt"]}
    assert train and test
    assert not train & test


def test_split_is_a_function_of_the_problem() -> None:
    keys = [f"+{a},{b}" for a in range(100) for b in range(a, 100)]
    share = sum(problem_split(k) == "test" for k in keys) / len(keys)
    assert abs(share - TEST_FRACTION) < 0.03
    assert problem_split("+38,47") == problem_split("+38,47")


def test_test_rows_are_distinct_while_possible() -> None:
    ds = make_task_dataset(ARITHMETIC_TASK, "test", 300)
    prompts = [p[-1]["content"] for p in ds["prompt"]]
    assert len(set(prompts)) == len(prompts)


def test_small_space_repeats_instead_of_failing() -> None:
    ds = make_task_dataset(ARITHMETIC_TASK, "test", 200, max_operand=9)
    prompts = [p[-1]["content"] for p in ds["prompt"]]
    assert len(prompts) == 200 and len(set(prompts)) < 200


def test_difficulty_counts_carries() -> None:
    ds = make_task_dataset(ARITHMETIC_TASK, "train", 500)
    assert set(ds["difficulty"]) == {0, 1, 2}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "align:nope"}, "unknown embedded task"),
        ({"split": "validation"}, "split"),
        ({"ops": "*"}, "ops"),
        ({"ops": "-", "num_operands": 3}, "subtraction"),
        ({"trace": "fancy"}, "trace"),
        ({"min_operand": 5, "max_operand": 2}, "min_operand"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    args = {"name": ARITHMETIC_TASK, "split": "train", "num_examples": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_task_dataset(**args)


def test_unknown_parameter_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        make_task_dataset(ARITHMETIC_TASK, "train", 2, operand_range=5)
