"""Synthetic preference data over the embedded arithmetic task, for reward-model training.

Two tasks, both built on :func:`align.embedded.tasks.make_task_dataset` with the same split rule, so
a ``test`` preference set never contains a problem of any ``train`` set:

* ``align:arithmetic-preferences`` — columns ``prompt``, ``chosen``, ``rejected`` (conversational),
  ``solution``, ``kind``. ``chosen`` is the task's gold completion; ``rejected`` is one flaw of kind
  ``kind``, drawn in turn from ``kinds`` (default ``DEFAULT_KINDS``: misread operands twice as often
  as the rest, and no ``wrong_step``, which a ~1 M-parameter reward model learns too slowly for a
  demo that runs in minutes):

  - ``wrong_answer``: the work is right, the final answer has one digit changed;
  - ``wrong_operand``: well-formed work and answer for a *neighbouring* problem (one operand digit
    misread): the mistake is consistent, so only checking the work against the question reveals it;
  - ``wrong_step``: one column sum off by one, carried through to a consistent wrong answer;
  - ``malformed``: the right answer in a broken format (tags missing, unclosed, duplicated, or text
    after ``</answer>``);
  - ``truncated``: the gold completion cut off before the answer.

* ``align:arithmetic-rankings`` — columns ``prompt``, ``ranking`` (a list of completions ordered best
  → worst: gold, malformed-but-right, wrong answer, truncated), ``solution``: InstructGPT-style
  rankings that the ``reward_model`` stage expands into pairs.

Parameters (``params:`` of the dataset spec): the arithmetic task's own (``min_operand``,
``max_operand``, ``num_operands``, ``ops``, ``trace``, ``system_prompt``) and ``kinds`` (a list or a
comma-separated string, preferences task only; a kind listed twice is drawn twice as often).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from align.embedded.tasks import ARITHMETIC_TASK, _problem, make_task_dataset

if TYPE_CHECKING:
    from datasets import Dataset

PREFERENCES_TASK = "align:arithmetic-preferences"
RANKINGS_TASK = "align:arithmetic-rankings"
PREFERENCE_TASKS: tuple[str, ...] = (PREFERENCES_TASK, RANKINGS_TASK)
REJECTION_KINDS: tuple[str, ...] = ("wrong_answer", "wrong_operand", "wrong_step", "malformed", "truncated")
#: What a kinds list defaults to: the correctness flaws a small model learns to see in minutes.
DEFAULT_KINDS: tuple[str, ...] = ("wrong_operand", "wrong_answer", "wrong_operand", "malformed", "truncated")


def is_preference_task(name: str) -> bool:
    return name in PREFERENCE_TASKS


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _split_completion(text: str) -> tuple[str, str]:
    """``<think>W</think><answer>A</answer>`` → ``(W, A)``."""
    think = text[len("<think>") : text.index("</think>")]
    answer = text[text.index("<answer>") + len("<answer>") : text.index("</answer>")]
    return think, answer


def _change_digit(rng: random.Random, number: str) -> str:
    position = rng.randrange(len(number))
    old = number[position]
    # A leading digit never becomes 0, so the result stays a plain number of the same width.
    choices = [d for d in "0123456789" if d != old and not (position == 0 and d == "0" and len(number) > 1)]
    return number[:position] + rng.choice(choices) + number[position + 1 :]


def _operands(question: str) -> tuple[str, list[int]]:
    expression = question.removeprefix("What is ").removesuffix("?")
    op = "-" if "-" in expression else "+"
    return op, [int(x) for x in expression.split(op)]


def wrong_answer(rng: random.Random, gold: str) -> str:
    think, answer = _split_completion(gold)
    return f"<think>{think}</think><answer>{_change_digit(rng, answer)}</answer>"


def wrong_operand(rng: random.Random, question: str, gold: str, trace: str) -> str:
    """The gold completion of a neighbouring problem: one operand with one digit changed."""
    op, operands = _operands(question)
    for _ in range(20):
        i = rng.randrange(len(operands))
        changed = list(operands)
        changed[i] = int(_change_digit(rng, str(operands[i])))
        if op == "-" and changed[0] < changed[1]:
            continue
        text = _problem(changed, op, trace)["completion_text"]
        if _split_completion(text)[1] != _split_completion(gold)[1]:
            return text
    return wrong_answer(rng, gold)


def wrong_step(rng: random.Random, question: str, gold: str) -> str:
    """A column trace with one column sum off by one, carried through consistently to the answer
    (``9+9=17 …``): only re-adding that column reveals it. Falls back to ``wrong_answer`` for
    subtraction or traces without columns."""
    op, operands = _operands(question)
    think, _ = _split_completion(gold)
    steps = think.split(" ")
    if op != "+" or len(steps) != max(len(str(x)) for x in operands) or "=" not in steps[0]:
        return wrong_answer(rng, gold)
    width = len(steps)
    columns = [[(x // 10**i) % 10 for x in operands] for i in range(width)]
    bad = rng.randrange(width)
    delta = rng.choice([d for d in (-1, 1) if sum(columns[bad]) + d >= 0] or [1])
    carry, written, digits = 0, [], []
    for i, column in enumerate(columns):
        total = sum(column) + carry + (delta if i == bad else 0)
        written.append("+".join(map(str, column)) + (f"+{carry}" if i > 0 else "") + f"={total}")
        digits.append(total % 10)
        carry = total // 10
    answer = str(int(str(carry) + "".join(map(str, reversed(digits)))))
    return f"<think>{' '.join(written)}</think><answer>{answer}</answer>"


def malformed(rng: random.Random, gold: str) -> str:
    think, answer = _split_completion(gold)
    variants = [
        f"{think} {answer}",  # no tags at all
        f"<think>{think}<answer>{answer}</answer>",  # think never closed
        f"<think>{think}</think>{answer}",  # answer not tagged
        f"<think>{think}</think><answer>{answer}</answer><answer>{answer}</answer>",  # two answers
        f"<think>{think}</think><answer>{answer}</answer> {think}",  # text after the answer
        f"<answer>{answer}</answer>",  # no work shown
    ]
    return rng.choice(variants)


def truncated(rng: random.Random, gold: str) -> str:
    cut = gold.index("<answer>")
    return gold[: rng.randint(max(1, cut // 3), cut)]


def _flawed(kind: str, rng: random.Random, question: str, gold: str, trace: str) -> str:
    if kind == "wrong_answer":
        return wrong_answer(rng, gold)
    if kind == "wrong_operand":
        return wrong_operand(rng, question, gold, trace)
    if kind == "wrong_step":
        return wrong_step(rng, question, gold)
    if kind == "malformed":
        return malformed(rng, gold)
    return truncated(rng, gold)


def _kinds(value: Any) -> list[str]:
    kinds = [k.strip() for k in value.split(",")] if isinstance(value, str) else list(value)
    unknown = [k for k in kinds if k not in REJECTION_KINDS]
    if not kinds or unknown:
        raise ValueError(f"kinds must be a non-empty subset of {REJECTION_KINDS}, got {value!r}")
    return kinds


def make_preference_dataset(
    name: str, split: str, num_examples: int, seed: int = 0, *, kinds: Any = DEFAULT_KINDS, **task_params: Any
) -> Dataset:
    """``num_examples`` preference (or ranking) rows over ``split`` of the arithmetic task."""
    from datasets import Dataset

    if name not in PREFERENCE_TASKS:
        raise ValueError(f"unknown preference task {name!r}; known: {', '.join(PREFERENCE_TASKS)}")
    chosen_kinds = _kinds(kinds)
    if name == RANKINGS_TASK and kinds is not DEFAULT_KINDS:
        raise ValueError(f"'kinds' applies to {PREFERENCES_TASK} only; a ranking holds one response of each kind")
    base = make_task_dataset(ARITHMETIC_TASK, split, num_examples, seed=seed, **task_params)
    trace = task_params.get("trace", "columns")
    rng = random.Random(f"{name}|{split}|{seed}")
    rows: dict[str, list[Any]] = {"prompt": [], "solution": []}
    for i, row in enumerate(base):
        question = row["prompt"][-1]["content"]
        gold = row["completion"][0]["content"]
        rows["prompt"].append(row["prompt"])
        rows["solution"].append(row["solution"])
        if name == PREFERENCES_TASK:
            kind = chosen_kinds[i % len(chosen_kinds)]
            rows.setdefault("chosen", []).append(_assistant(gold))
            rows.setdefault("rejected", []).append(_assistant(_flawed(kind, rng, question, gold, trace)))
            rows.setdefault("kind", []).append(kind)
        else:
            ranked = [gold, malformed(rng, gold), wrong_answer(rng, gold), truncated(rng, gold)]
            rows.setdefault("ranking", []).append([_assistant(text) for text in ranked])
    if not rows["prompt"]:
        empty = ["chosen", "rejected", "kind"] if name == PREFERENCES_TASK else ["ranking"]
        rows.update({column: [] for column in empty})
    return Dataset.from_dict(rows)
