"""Synthetic verifiable tasks for the embedded default: arithmetic with R1-style traces.

Rows are conversational and TRL-compatible:

* ``prompt``: ``[{"role": "user", "content": "What is 47+38?"}]`` (a system message first if asked);
* ``completion``: ``[{"role": "assistant", "content": "<think>7+8=15 4+3+1=8</think><answer>85</answer>"}]``;
* ``solution``: the gold answer as a string (``"85"``);
* ``difficulty``: the number of carries (addition) or borrows (subtraction) the problem needs.

With ``prompt_template`` (a string holding ``{question}``) the rows are raw text instead: ``prompt`` is
the template with the question filled in and ``completion`` the plain completion string, for stages
that generate from a raw prompt (``conversational: false``), as R1-Zero prompted its base model.

Train and test never share a problem: the split of a problem is decided by a hash of its canonical
form (operands sorted for ``+``), not by sampling order, so any number of rows drawn with any seed
from ``train`` never contains a ``test`` problem, ``47+38`` and ``38+47`` included.

The column trace (``trace="columns"``) spells the work out digit by digit, least significant first,
with the carry written into the next column: the R1 idea in miniature. Every step is a local
one-digit sum that a ~1 M-parameter model can learn, and a mistake is a wrong digit in one place,
which is what RL then has to fix.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset

ARITHMETIC_TASK = "align:arithmetic"
EMBEDDED_TASKS: tuple[str, ...] = (ARITHMETIC_TASK,)
SPLITS: tuple[str, ...] = ("train", "test")
TRACE_STYLES: tuple[str, ...] = ("columns", "equation", "none")

# Fixed, not a parameter: if it varied between calls, a train set drawn with one value could hold
# problems that a test set drawn with another value holds.
TEST_FRACTION = 0.2
_SPLIT_SALT = "align-embedded-split-v1"
# Below this many problems the whole space is enumerated and sampled without replacement.
_ENUMERATE_LIMIT = 200_000

# Calibrated defaults: with align:tiny, SFT of 225 steps lands at 36–66 % held-out greedy accuracy and
# GRPO adds 30–49 points (benchmarks/calibrate_embedded.py, whose docstring records the figures).
DEFAULT_MIN_OPERAND = 0
DEFAULT_MAX_OPERAND = 99
DEFAULT_NUM_OPERANDS = 2
DEFAULT_OPS = "+"
DEFAULT_TRACE = "columns"
#: Where ``prompt_template`` puts the question.
QUESTION_FIELD = "{question}"


def is_embedded_task(name: str) -> bool:
    return name in EMBEDDED_TASKS


def problem_split(key: str) -> str:
    """``"test"`` or ``"train"`` for a canonical problem key, stable across runs and machines."""
    digest = hashlib.sha256(f"{_SPLIT_SALT}|{key}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if fraction < TEST_FRACTION else "train"


def _digits_lsb_first(value: int, width: int) -> list[int]:
    return [(value // 10**i) % 10 for i in range(width)]


def _column_trace_add(operands: Sequence[int]) -> tuple[str, int]:
    width = max(len(str(x)) for x in operands)
    columns = [_digits_lsb_first(x, width) for x in operands]
    steps: list[str] = []
    carry = 0
    carries = 0
    for i in range(width):
        digits = [col[i] for col in columns]
        total = sum(digits) + carry
        # The first column has no carry in; writing "+0" there would only lengthen every completion.
        terms = "+".join(str(d) for d in digits) + (f"+{carry}" if i > 0 else "")
        steps.append(f"{terms}={total}")
        carry = total // 10
        carries += carry > 0
    return " ".join(steps), carries


def _column_trace_sub(a: int, b: int) -> tuple[str, int]:
    """``a - b`` with ``a >= b``; a borrowed ten shows as a leading 1 on the top digit (``12-7=5``)."""
    width = len(str(a))
    top, bottom = _digits_lsb_first(a, width), _digits_lsb_first(b, width)
    steps: list[str] = []
    borrow = 0
    borrows = 0
    for i in range(width):
        t, u = top[i], bottom[i]
        need = t - u - borrow < 0
        lhs = f"1{t}" if need else str(t)
        terms = f"{lhs}-{u}" + (f"-{borrow}" if i > 0 else "")
        steps.append(f"{terms}={t + 10 * need - u - borrow}")
        borrow = int(need)
        borrows += borrow
    return " ".join(steps), borrows


def _problem(operands: Sequence[int], op: str, trace: str) -> dict[str, Any]:
    if op == "+":
        value = sum(operands)
        work, difficulty = _column_trace_add(operands)
        key_operands = sorted(operands)
    else:
        a, b = operands
        value = a - b
        work, difficulty = _column_trace_sub(a, b)
        key_operands = list(operands)
    expression = op.join(str(x) for x in operands)
    if trace == "columns":
        think = work
    elif trace == "equation":
        think = f"{expression}={value}"
    else:
        think = ""
    return {
        "key": op + ",".join(str(x) for x in key_operands),
        "prompt_text": f"What is {expression}?",
        "completion_text": f"<think>{think}</think><answer>{value}</answer>",
        "solution": str(value),
        "difficulty": difficulty,
    }


def _validate(min_operand: int, max_operand: int, num_operands: int, ops: str, trace: str) -> None:
    if not 0 <= min_operand <= max_operand:
        raise ValueError(f"need 0 <= min_operand <= max_operand, got {min_operand}, {max_operand}")
    if num_operands < 2:
        raise ValueError(f"num_operands must be >= 2, got {num_operands}")
    if not ops or set(ops) - {"+", "-"}:
        raise ValueError(f"ops must be made of '+' and '-', got {ops!r}")
    if "-" in ops and num_operands != 2:
        raise ValueError("subtraction ('-' in ops) supports exactly 2 operands")
    if trace not in TRACE_STYLES:
        raise ValueError(f"trace must be one of {TRACE_STYLES}, got {trace!r}")


def _draw(
    rng: random.Random, min_operand: int, max_operand: int, num_operands: int, ops: str
) -> tuple[str, list[int]]:
    op = rng.choice(sorted(set(ops)))
    operands = [rng.randint(min_operand, max_operand) for _ in range(num_operands)]
    if op == "-":
        # Non-negative results keep the subtraction trace a plain borrow chain.
        operands.sort(reverse=True)
    return op, operands


def arithmetic_example(
    rng: random.Random,
    *,
    min_operand: int = DEFAULT_MIN_OPERAND,
    max_operand: int = DEFAULT_MAX_OPERAND,
    num_operands: int = DEFAULT_NUM_OPERANDS,
    ops: str = DEFAULT_OPS,
    trace: str = DEFAULT_TRACE,
) -> dict[str, Any]:
    """One random problem from either split, as plain text (used to train the tokenizer)."""
    _validate(min_operand, max_operand, num_operands, ops, trace)
    op, operands = _draw(rng, min_operand, max_operand, num_operands, ops)
    return _problem(operands, op, trace)


def _space_size(min_operand: int, max_operand: int, num_operands: int, ops: str) -> int:
    return len(set(ops)) * (max_operand - min_operand + 1) ** num_operands


def _sample_problems(
    rng: random.Random,
    split: str,
    num_examples: int,
    min_operand: int,
    max_operand: int,
    num_operands: int,
    ops: str,
) -> list[tuple[str, list[int]]]:
    """Distinct problems of ``split`` while the split has any left, then repeats (small spaces only)."""
    if _space_size(min_operand, max_operand, num_operands, ops) <= _ENUMERATE_LIMIT:
        pool: list[tuple[str, list[int]]] = []
        seen: set[tuple[str, tuple[int, ...]]] = set()
        for op in sorted(set(ops)):
            for combo in itertools.product(range(min_operand, max_operand + 1), repeat=num_operands):
                operands = sorted(combo, reverse=True) if op == "-" else list(combo)
                ident = (op, tuple(operands))
                if ident in seen:
                    continue
                seen.add(ident)
                if problem_split(_problem(operands, op, "none")["key"]) == split:
                    pool.append((op, operands))
        if not pool:
            raise ValueError(f"the {split!r} split of this problem space is empty; widen the operand range")
        rng.shuffle(pool)
        return [pool[i % len(pool)] for i in range(num_examples)]

    out: list[tuple[str, list[int]]] = []
    seen_prompts: set[tuple[str, tuple[int, ...]]] = set()
    while len(out) < num_examples:
        op, operands = _draw(rng, min_operand, max_operand, num_operands, ops)
        ident = (op, tuple(operands))
        if ident in seen_prompts or problem_split(_problem(operands, op, "none")["key"]) != split:
            continue
        seen_prompts.add(ident)
        out.append((op, operands))
    return out


def check_request(kind: str, name: str, known: tuple[str, ...], split: str, num_examples: int) -> None:
    """The checks every embedded dataset builder makes of what it is asked for."""
    if name not in known:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(known)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")


def make_task_dataset(
    name: str,
    split: str,
    num_examples: int,
    seed: int = 0,
    *,
    min_operand: int = DEFAULT_MIN_OPERAND,
    max_operand: int = DEFAULT_MAX_OPERAND,
    num_operands: int = DEFAULT_NUM_OPERANDS,
    ops: str = DEFAULT_OPS,
    trace: str = DEFAULT_TRACE,
    system_prompt: str | None = None,
    prompt_template: str | None = None,
) -> Dataset:
    """``num_examples`` rows of an embedded task for ``split`` (``"train"`` or ``"test"``).

    Same arguments → same rows. Rows are distinct problems as long as the split has enough of them.
    """
    from datasets import Dataset

    check_request("embedded task", name, EMBEDDED_TASKS, split, num_examples)
    _validate(min_operand, max_operand, num_operands, ops, trace)
    if prompt_template is not None:
        if QUESTION_FIELD not in prompt_template:
            raise ValueError(f"prompt_template must contain {QUESTION_FIELD} (where the question goes)")
        if system_prompt:
            raise ValueError("prompt_template makes raw-text prompts, which have no system message: write it into the template")

    rng = random.Random(f"{name}|{split}|{seed}")
    problems = _sample_problems(rng, split, num_examples, min_operand, max_operand, num_operands, ops)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    rows: dict[str, list[Any]] = {"prompt": [], "completion": [], "solution": [], "difficulty": []}
    for op, operands in problems:
        problem = _problem(operands, op, trace)
        prompt: Any
        completion: Any
        if prompt_template is not None:
            # str.replace, not str.format: a template may hold other braces (\boxed{}).
            prompt = prompt_template.replace(QUESTION_FIELD, problem["prompt_text"])
            completion = problem["completion_text"]
        else:
            prompt = [*system, {"role": "user", "content": problem["prompt_text"]}]
            completion = [{"role": "assistant", "content": problem["completion_text"]}]
        rows["prompt"].append(prompt)
        rows["completion"].append(completion)
        rows["solution"].append(problem["solution"])
        rows["difficulty"].append(problem["difficulty"])
    return Dataset.from_dict(rows)
