"""A raw-text pretraining corpus over the embedded arithmetic world: ``align:arithmetic-corpus``.

What a web crawl holds about sums, in miniature, so that a model pretrained on it *knows some
arithmetic and has seen the R1 tags* but is not yet an assistant (DeepSeek-R1-Zero starts RL from
such a base). One column, ``text`` (plus ``style`` and ``solution``, for analysis): one document per
row, no chat template, no prompt/completion split. A stage trains it as a causal LM (the ``sft``
stage on the ``text`` column, usually with ``packing``). Documents come in four styles:

* ``equation``: a bare result, ``47+38=85.``;
* ``direct``: a transcript whose assistant gives only the result,
  ``User: What is 47+38? Assistant: The answer is 85.``;
* ``worked``: the same transcript with the work in prose, column by column as the arithmetic task's
  trace does it, ``… Assistant: 7+8=15, then 4+3+1=8, so the answer is 85.``;
* ``tagged``: the transcript in the R1 format, the worked prose inside the tags,
  ``… Assistant: <think>7+8=15, then 4+3+1=8, so the answer is 85.</think><answer>85</answer>``.

``styles`` sets the share of each (default ``DEFAULT_STYLES``: mostly bare and direct results, a
quarter worked, a small share tagged). Direct answers are what a small model gets wrong on two-digit
sums with carries, while the worked and tagged forms get them right one digit at a time: an RL
stage that rewards accuracy has a reason to move to longer, worked answers, and a format reward has a
rare but present behaviour to amplify. ``small_share`` of the problems have one-digit operands, on
which direct answers are learnable (the base "knows some arithmetic").

The transcript frame is ``DIALOGUE`` (``User: {question} Assistant:``). A prompt written the same way,
for instance the R1-Zero template through ``align:arithmetic``'s ``prompt_template`` parameter, makes
the base continue as one of these styles. ``header_share`` of the transcripts start with a
conversation header (``header``, default the first sentence of the R1-Zero template), so a preamble
before the question is familiar text and not the only long context the model has never seen.

Problems are drawn from the arithmetic task's own split (``split``), so a ``train`` corpus never holds
a problem of that task's ``test`` split: pretraining does not leak the held-out set.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from align.embedded.tasks import DEFAULT_MAX_OPERAND, _column_trace_add, _sample_problems, check_request

if TYPE_CHECKING:
    from datasets import Dataset

CORPUS_TASK = "align:arithmetic-corpus"
CORPUS_TASKS: tuple[str, ...] = (CORPUS_TASK,)
STYLES: tuple[str, ...] = ("equation", "direct", "worked", "tagged")
#: Shares of each style. Most documents give only the result, so a base prompted with a transcript
#: mostly answers directly and rarely in the tagged format; see the module docstring.
DEFAULT_STYLES: Mapping[str, float] = {"equation": 0.3, "direct": 0.35, "worked": 0.25, "tagged": 0.1}
DIALOGUE = "User: {question} Assistant:"
#: DeepSeek-R1-Zero's prompt preamble (R1 paper, Table 1), the same text recipes/r1_zero.yaml uses as
#: its system prompt. Web text holds transcripts under such headers; a base that has read it as text
#: continues a prompt written with it the way it continues any transcript.
R1_ZERO_HEADER = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>."
)
DEFAULT_HEADER = R1_ZERO_HEADER
#: A few transcripts under the header are enough for a fixed text, and each one costs ~175 tokens.
DEFAULT_HEADER_SHARE = 0.05
DEFAULT_SMALL_SHARE = 0.25
SMALL_MAX_OPERAND = 9


def is_corpus_task(name: str) -> bool:
    return name in CORPUS_TASKS


def _styles(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"styles must be a mapping of style → share over {STYLES}, got {value!r}")
    unknown = [k for k in value if k not in STYLES]
    if unknown:
        raise ValueError(f"unknown style(s) {unknown}; known: {', '.join(STYLES)}")
    shares = {k: float(v) for k, v in value.items()}
    if any(v < 0 for v in shares.values()) or sum(shares.values()) <= 0:
        raise ValueError(f"style shares must be ≥ 0 and not all 0, got {dict(value)}")
    return shares


def _share(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def render(style: str, operands: list[int], header: str | None = None) -> str:
    """One document of ``style`` for the sum of ``operands`` (``header`` opens a transcript)."""
    expression = "+".join(str(x) for x in operands)
    question, value = f"What is {expression}?", str(sum(operands))
    if style == "equation":
        return f"{expression}={value}."
    steps = _column_trace_add(operands)[0].split(" ")
    worked = f"{', then '.join(steps)}, so the answer is {value}."
    # The tagged form holds the same prose work inside <think>, as R1's traces do: it is the worked
    # form plus the tags, so a model moving to it writes *more*, never less.
    answers = {"direct": f"The answer is {value}.", "worked": worked, "tagged": f"<think>{worked}</think><answer>{value}</answer>"}
    if style not in answers:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    transcript = f"{DIALOGUE.format(question=question)} {answers[style]}"
    return f"{header} {transcript}" if header else transcript


def make_corpus_dataset(
    name: str,
    split: str,
    num_examples: int,
    seed: int = 0,
    *,
    styles: Mapping[str, float] = DEFAULT_STYLES,
    max_operand: int = DEFAULT_MAX_OPERAND,
    small_share: float = DEFAULT_SMALL_SHARE,
    header: str = DEFAULT_HEADER,
    header_share: float = DEFAULT_HEADER_SHARE,
) -> Dataset:
    """``num_examples`` documents (columns ``text``, ``style``, ``solution``) over ``split``'s problems.

    Same arguments → same rows. Addition of two operands in 0..``max_operand`` (``small_share`` of
    them in 0..9), each document in a style drawn with the ``styles`` shares."""
    from datasets import Dataset

    check_request("corpus task", name, CORPUS_TASKS, split, num_examples)
    if max_operand < SMALL_MAX_OPERAND:
        raise ValueError(f"max_operand must be >= {SMALL_MAX_OPERAND}, got {max_operand}")
    shares = _styles(styles)
    _share("small_share", small_share)
    _share("header_share", header_share)

    rng = random.Random(f"{name}|{split}|{seed}")
    small = sum(rng.random() < small_share for _ in range(num_examples))
    problems = _sample_problems(rng, split, small, 0, SMALL_MAX_OPERAND, 2, "+") + _sample_problems(
        rng, split, num_examples - small, 0, max_operand, 2, "+"
    )
    rng.shuffle(problems)
    names, weights = list(shares), list(shares.values())
    rows: dict[str, list[Any]] = {"text": [], "style": [], "solution": []}
    for _, operands in problems:
        style = rng.choices(names, weights)[0]
        opened = header if style != "equation" and rng.random() < header_share else None
        rows["text"].append(render(style, operands, opened))
        rows["style"].append(style)
        rows["solution"].append(str(sum(operands)))
    return Dataset.from_dict(rows)
