"""Code rules: run the completion's last ```python block against test cases in a sandbox (`code`), and
check that the answer is a fenced block of the expected language (`code_format`)."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any

from annotated_types import Ge, Gt, Interval

from ._params import checks
from ._sandbox import run_python
from ._text import Completion, completion_texts, tag_block
from .format import is_well_formed

__all__ = ["TestCase", "UnusableTestCasesWarning", "code", "code_format", "extract_code", "parse_test_cases"]

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)


class UnusableTestCasesWarning(UserWarning):
    """A sample's test cases could not be read; that sample gets no reward (None)."""


@dataclass(frozen=True)
class TestCase:
    """One check: feed ``stdin`` and compare stdout with ``expected``, or run ``assertion`` after the code."""

    __test__ = False  # not a pytest class, despite the name

    stdin: str = ""
    expected: str | None = None
    assertion: str | None = None


@lru_cache(maxsize=1)
def _sandbox_works() -> None:
    # Once per process: a sandbox that cannot start at all (odd permissions, missing interpreter)
    # would otherwise score every completion 0.0 without a word. Raising lets the bound rule
    # report it and give None instead.
    result = run_python("print('ok')", timeout_s=30)
    if result.stdout != "ok\n":
        raise RuntimeError(
            f"the code sandbox does not work here (exit status {result.returncode}): {result.stderr[-500:]}"
        )


def extract_code(text: str) -> str | None:
    """The body of the LAST fenced block labelled python/py/python3, or None."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else None


def _case(item: Any) -> TestCase:
    if isinstance(item, str):
        return TestCase(assertion=item)
    if isinstance(item, dict):
        stdin = item.get("input", item.get("stdin", ""))
        expected = item.get("output", item.get("expected_output", item.get("stdout")))
        if expected is None:
            raise ValueError(f"test case without 'output': {item!r:.80}")
        return TestCase(stdin=str(stdin), expected=str(expected))
    raise ValueError(f"unsupported test case {item!r:.80}")


def parse_test_cases(raw: Any) -> list[TestCase]:
    """Read a dataset's test cases; raises ValueError when they cannot be used.

    Accepted: a list of ``{"input": stdin, "output": expected stdout}`` dicts (also ``stdin`` /
    ``expected_output`` keys); a list of assert statements (strings) run after the code; a dict
    ``{"inputs": [...], "outputs": [...]}`` (APPS); a dict with a ``test_cases`` list (open-r1's
    ``verification_info``); or a JSON string of any of these.
    """
    if isinstance(raw, str):
        raw = json.loads(raw)
    if isinstance(raw, dict):
        if "test_cases" in raw:
            raw = raw["test_cases"]
        elif "inputs" in raw and "outputs" in raw:
            if len(raw["inputs"]) != len(raw["outputs"]):
                raise ValueError("'inputs' and 'outputs' differ in length")
            raw = [{"input": i, "output": o} for i, o in zip(raw["inputs"], raw["outputs"], strict=True)]
        else:
            raise ValueError(f"unsupported test case dict with keys {sorted(raw)}")
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ValueError("expected a non-empty list of test cases")
    return [_case(item) for item in raw]


def _normalise_output(text: str) -> str:
    # Judges differ on trailing spaces and final newlines; a model should not fail on those.
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").strip().splitlines())


def _pass_fraction(
    source: str, cases: list[TestCase], *, timeout_s: float, memory_mb: int, skip_after_timeout: bool
) -> float:
    passed = 0
    for case in cases:
        if case.assertion is not None:
            result = run_python(f"{source}\n\n{case.assertion}\n", timeout_s=timeout_s, memory_mb=memory_mb)
            ok = result.ok
        else:
            result = run_python(source, case.stdin, timeout_s=timeout_s, memory_mb=memory_mb)
            ok = (
                result.ok
                and case.expected is not None
                and _normalise_output(result.stdout) == _normalise_output(case.expected)
            )
        passed += ok
        if result.timed_out and skip_after_timeout:
            break  # the remaining cases count as failed: a looping program would only loop again
    return passed / len(cases)


@checks()
def code(
    completions: Sequence[Completion],
    test_cases: Sequence[Any],
    *,
    timeout_s: Annotated[float, Gt(0)] = 2.0,
    memory_mb: Annotated[int, Ge(16)] = 512,
    skip_after_timeout: bool = True,
    max_workers: Annotated[int, Ge(1)] = 1,
    binary: bool = False,
    binary_threshold: Annotated[float, Interval(ge=0.0, lt=1.0)] = 0.99,
    **kwargs: Any,
) -> list[float | None]:
    """Fraction of test cases passed by the completion's last ```python block, run in a sandbox.

    Each test case runs the code in a fresh sandboxed process (see ``reward_rules._sandbox``:
    ``python -I``, throwaway working directory, wall-clock ``timeout_s``, ``memory_mb`` address
    space, CPU/process/file-size limits, no process spawning, no sockets, no writes outside the
    working directory). A stdin/stdout case passes when the exit status is 0 and stdout equals the
    expected output up to trailing whitespace on each line and leading/trailing blank lines; an
    assert case (a string) passes when the code followed by the assertion exits with status 0.
    After a case times out, the remaining cases of that completion are not run and count as failed
    (``skip_after_timeout``). No python block → 0.0. ``test_cases``: see ``parse_test_cases``;
    unusable test cases → None and an ``UnusableTestCasesWarning`` naming the sample index.
    ``max_workers`` completions are checked in parallel. With ``binary`` the score is 1.0 when the
    fraction passed exceeds ``binary_threshold`` (0.99: all of them, as open-r1's ``binary_code``)
    and 0.0 otherwise; None stays None.
    """
    texts = completion_texts(completions)
    if len(test_cases) != len(texts):
        raise ValueError(f"code: got {len(texts)} completions but {len(test_cases)} test case entries")
    _sandbox_works()

    def score(index: int) -> float | None:
        try:
            cases = parse_test_cases(test_cases[index])
        except (ValueError, TypeError) as error:
            warnings.warn(
                f"code: the test cases of sample {index} cannot be used ({error}); "
                "that sample gets no reward (None)",
                UnusableTestCasesWarning,
                stacklevel=2,
            )
            return None
        source = extract_code(texts[index])
        if source is None:
            return 0.0
        passed = _pass_fraction(
            source, cases, timeout_s=timeout_s, memory_mb=memory_mb, skip_after_timeout=skip_after_timeout
        )
        return float(passed > binary_threshold) if binary else passed

    if max_workers <= 1 or len(texts) <= 1:
        return [score(i) for i in range(len(texts))]
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(score, range(len(texts))))


#: Info strings that name a language's fenced blocks (case-insensitive); other languages name themselves.
LANGUAGE_ALIASES: dict[str, tuple[str, ...]] = {
    "python": ("python", "python3", "py"),
    "javascript": ("javascript", "js"),
    "typescript": ("typescript", "ts"),
    "cpp": ("cpp", "c++"),
    "bash": ("bash", "sh", "shell"),
}


def _canonical_language(name: str) -> str:
    name = name.lower()
    return next((lang for lang, names in LANGUAGE_ALIASES.items() if name in names), name)


def _fenced_languages(text: str) -> list[str]:
    """Info-string words of the complete fenced blocks in ``text``, lower-cased ("" when unlabelled)."""
    return [m.lower() for m in re.findall(r"```[ \t]*([^\s`]*)[^\n]*\n.*?```", text, flags=re.DOTALL)]


@checks()
def code_format(
    completions: Sequence[Completion],
    *,
    language: str | Sequence[str] = "python",
    think_tag: str = "think",
    answer_tag: str = "answer",
    prefilled_think: bool = False,
    **kwargs: Any,
) -> list[float]:
    """Code answer format: 1.0 if the completion has the strict R1 format and its answer holds a fenced code block of ``language``, else 0.0.

    The format is the ``format`` rule's (exactly one ``<think>…</think>`` then one
    ``<answer>…</answer>``, only whitespace around them; ``prefilled_think`` and the tag names as
    there). Inside the answer there must be a complete fenced block whose info string names the
    language (```` ```python ````; also ``py``/``python3``, ``js`` for javascript, ``c++`` for cpp,
    ``sh``/``shell`` for bash; case-insensitive); blocks inside the think part do not count.
    ``language`` may also be a dataset column of one language per sample (open-r1's mixed-language
    training), which TRL passes as a list.
    """
    texts = completion_texts(completions)
    languages = [language] * len(texts) if isinstance(language, str) else list(language)
    if len(languages) != len(texts):
        raise ValueError(f"code_format: language lists {len(languages)} languages for {len(texts)} completions; "
                         "give one language, or one per completion (a dataset column)")
    rewards = []
    for text, wanted in zip(texts, languages, strict=True):
        answer = tag_block(text, answer_tag) if is_well_formed(text, think_tag, answer_tag, prefilled_think) else None
        found = {_canonical_language(name) for name in _fenced_languages(answer)} if answer is not None else set()
        rewards.append(float(_canonical_language(wanted) in found))
    return rewards
