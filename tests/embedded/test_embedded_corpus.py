"""The raw-text pretraining corpus: its styles and their shares, correct work, no held-out problem in
it, and the raw-text prompts (`prompt_template`) that R1-Zero-style stages generate from."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from align.embedded.corpus import (
    CORPUS_TASK,
    DEFAULT_STYLES,
    DIALOGUE,
    STYLES,
    is_corpus_task,
    make_corpus_dataset,
    render,
)
from align.embedded.preferences import PREFERENCES_TASK, make_preference_dataset
from align.embedded.tasks import ARITHMETIC_TASK, make_task_dataset, problem_split

QUESTION = re.compile(r"User: What is (\d+)\+(\d+)\? Assistant: (.*)\Z")
EQUATION = re.compile(r"(\d+)\+(\d+)=(\d+)\.\Z")
WORKED = re.compile(r"(.*), so the answer is (\d+)\.\Z")


def _column_steps(a: int, b: int) -> list[str]:
    """Written independently of the task code: the column sums, least significant first."""
    width = max(len(str(a)), len(str(b)))
    steps, carry = [], 0
    for i in range(width):
        x, y = (a // 10**i) % 10, (b // 10**i) % 10
        steps.append(f"{x}+{y}" + (f"+{carry}" if i else "") + f"={x + y + carry}")
        carry = (x + y + carry) // 10
    return steps


def _parse(text: str) -> tuple[str, int, int, str]:
    """(style, a, b, the answer the document gives), checking each style's exact shape."""
    equation = EQUATION.fullmatch(text)
    if equation:
        return "equation", int(equation[1]), int(equation[2]), equation[3]
    match = QUESTION.search(text)
    assert match, text
    a, b, reply = int(match[1]), int(match[2]), match[3]
    if reply.startswith("The answer is "):
        return "direct", a, b, reply.removeprefix("The answer is ").removesuffix(".")
    tagged = re.fullmatch(r"<think>(.*)</think><answer>(\d+)</answer>", reply)
    work = WORKED.fullmatch(tagged[1] if tagged else reply)
    assert work, reply
    assert work[1].split(", then ") == _column_steps(a, b), reply
    answer = tagged[2] if tagged else work[2]
    assert work[2] == answer
    return ("tagged" if tagged else "worked"), a, b, answer


def test_names_and_columns() -> None:
    assert CORPUS_TASK == "align:arithmetic-corpus" and is_corpus_task(CORPUS_TASK)
    assert not is_corpus_task(ARITHMETIC_TASK)
    ds = make_corpus_dataset(CORPUS_TASK, "train", 10)
    assert ds.column_names == ["text", "style", "solution"]
    assert all(isinstance(t, str) and "<|" not in t for t in ds["text"])  # raw text: no chat markers


def test_every_document_is_right_and_says_what_its_style_says() -> None:
    ds = make_corpus_dataset(CORPUS_TASK, "train", 2000, seed=3)
    for row in ds:
        style, a, b, answer = _parse(row["text"])
        assert style == row["style"]
        assert answer == row["solution"] == str(a + b)


def test_style_and_small_problem_shares_follow_the_parameters() -> None:
    n = 4000
    ds = make_corpus_dataset(CORPUS_TASK, "train", n, seed=1, small_share=0.4)
    counts = Counter(ds["style"])
    total = sum(DEFAULT_STYLES.values())
    for style in STYLES:
        assert counts[style] / n == pytest.approx(DEFAULT_STYLES[style] / total, abs=0.03), counts
    small = sum(max(_parse(t)[1:3]) <= 9 for t in ds["text"])
    # Two-digit draws also land in 0..9 now and then (1 % of them), hence the one-sided slack.
    assert 0.37 <= small / n <= 0.45
    only = make_corpus_dataset(CORPUS_TASK, "train", 200, styles={"tagged": 1.0, "direct": 0.0})
    assert set(only["style"]) == {"tagged"}


def test_header_opens_only_transcripts() -> None:
    ds = make_corpus_dataset(CORPUS_TASK, "train", 1000, seed=2, header="Hello there.", header_share=0.5)
    opened = Counter(row["style"] for row in ds if row["text"].startswith("Hello there. User: "))
    transcripts = sum(s != "equation" for s in ds["style"])
    assert "equation" not in opened
    assert sum(opened.values()) / transcripts == pytest.approx(0.5, abs=0.06)
    assert not any(t.startswith("Hello") for t in make_corpus_dataset(CORPUS_TASK, "train", 200)["text"])


def test_a_train_corpus_never_holds_a_held_out_problem() -> None:
    for seed in (0, 1):
        for text in make_corpus_dataset(CORPUS_TASK, "train", 3000, seed=seed)["text"]:
            _, a, b, _ = _parse(text)
            assert problem_split(f"+{min(a, b)},{max(a, b)}") == "train", text
    held_out = make_corpus_dataset(CORPUS_TASK, "test", 300)["text"]
    assert all(problem_split("+{},{}".format(*sorted(_parse(t)[1:3]))) == "test" for t in held_out)


def test_deterministic() -> None:
    a = make_corpus_dataset(CORPUS_TASK, "train", 100, seed=5).to_list()
    assert a == make_corpus_dataset(CORPUS_TASK, "train", 100, seed=5).to_list()
    assert a != make_corpus_dataset(CORPUS_TASK, "train", 100, seed=6).to_list()


def test_render_matches_the_dialogue_frame() -> None:
    assert render("direct", [47, 38]) == "User: What is 47+38? Assistant: The answer is 85."
    assert render("worked", [47, 38]) == "User: What is 47+38? Assistant: 7+8=15, then 4+3+1=8, so the answer is 85."
    assert render("tagged", [7, 7], "Hi.") == (
        "Hi. User: What is 7+7? Assistant: <think>7+7=14, so the answer is 14.</think><answer>14</answer>"
    )
    assert render("equation", [3, 4], "Hi.") == "3+4=7."
    assert DIALOGUE.format(question="What is 1+2?") == "User: What is 1+2? Assistant:"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "align:nope"}, "unknown corpus task"),
        ({"split": "validation"}, "split"),
        ({"styles": {"poetry": 1.0}}, "unknown style"),
        ({"styles": {"direct": -1.0, "tagged": 2.0}}, "≥ 0"),
        ({"styles": {}}, "mapping"),
        ({"header_share": 1.5}, "header_share"),
        ({"small_share": -0.1}, "small_share"),
        ({"max_operand": 5}, "max_operand"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    args = {"name": CORPUS_TASK, "split": "train", "num_examples": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_corpus_dataset(**args)


def test_a_recipe_loads_it_and_validation_names_a_bad_parameter(tmp_path: Path) -> None:
    from align.data import load_dataset, probe_columns
    from align.recipe.schema import DataSpec
    from tests.recipe_problems import recipe_problems

    spec = DataSpec(path=CORPUS_TASK, num_examples=5, params={"styles": {"direct": 1.0}})
    assert probe_columns(spec, tmp_path) == {"text", "style", "solution"}
    assert set(load_dataset(spec, tmp_path)["style"]) == {"direct"}
    recipe = f"""\
name: c
model: align:tiny
stages:
  - name: pretrain
    type: sft
    dataset: {{path: "{CORPUS_TASK}", num_examples: 10, params: {{styles: {{poetry: 1.0}}}}}}
"""
    problems = recipe_problems(tmp_path, recipe)
    assert "unknown style" in next(iter(problems.values())), problems


# ---- raw-text prompts on the arithmetic task ------------------------------------------------------


def test_prompt_template_makes_raw_text_rows() -> None:
    template = "Solve it. User: {question} Assistant:"
    raw = make_task_dataset(ARITHMETIC_TASK, "test", 20, seed=4, prompt_template=template)
    chat = make_task_dataset(ARITHMETIC_TASK, "test", 20, seed=4)
    for r, c in zip(raw, chat, strict=True):
        assert r["prompt"] == template.replace("{question}", c["prompt"][-1]["content"])
        assert r["completion"] == c["completion"][0]["content"]
        assert (r["solution"], r["difficulty"]) == (c["solution"], c["difficulty"])
    # A prompt in the corpus's own frame is exactly how its transcripts begin.
    row = make_task_dataset(ARITHMETIC_TASK, "test", 1, prompt_template=DIALOGUE)[0]
    a, b = (int(x) for x in re.findall(r"\d+", row["prompt"]))
    assert render("direct", [a, b]) == f"{row['prompt']} The answer is {row['solution']}."
    braces = make_task_dataset(ARITHMETIC_TASK, "test", 1, prompt_template=r"Put it in \boxed{}. {question}")
    assert braces["prompt"][0].startswith(r"Put it in \boxed{}. What is ")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"prompt_template": "no slot"}, "must contain"), ({"prompt_template": "{question}", "system_prompt": "S"}, "system")],
)
def test_prompt_template_errors(kwargs: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_task_dataset(ARITHMETIC_TASK, "train", 2, **kwargs)


def _digest(rows: list[dict[str, object]]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def test_the_existing_tasks_rows_are_unchanged() -> None:
    # Digests of rows made by the code before the corpus and prompt_template existed (commit dcb2b58):
    # the quickstart's fixed point rests on these rows.
    assert _digest(make_task_dataset(ARITHMETIC_TASK, "train", 200, seed=1).to_list()) == "7afd2e3306158470"
    assert _digest(make_task_dataset(ARITHMETIC_TASK, "test", 300, seed=1).to_list()) == "d009c106a1e9c448"
    assert _digest(make_preference_dataset(PREFERENCES_TASK, "train", 200, seed=1).to_list()) == "713e1bd162b1d821"
