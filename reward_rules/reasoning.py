"""Step-by-step reasoning rule."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any

from annotated_types import Ge

from ._params import checks
from ._text import Completion, completion_texts

__all__ = ["count_steps", "reasoning_steps"]

# One pattern per kind of marker, each anchored at the start of a (stripped) line. Bullets and
# numbered items need whitespace after the marker: "-3 is negative" and "1.5 is a decimal" are not
# steps, "- add" and "2. add" are.
_STEP_MARKERS = re.compile(
    r"""
    (?: step\s*\d+\s*[:.)\-]          # Step 1: / Step 2.
      | \d+[.)](?:\*\*)?\s+\S         # 1. / 2) / **3.** numbered item, wherever the list starts
      | \(\d+\)\s+\S                  # (3) item
      | [-*+\u2022]\s+\S              # bullets - * + •
      | (?:first(?:ly)?|second(?:ly)?|third(?:ly)?|fourth|fifth|next|then|finally|lastly)\b,?\s*\S
    )
    """,
    re.IGNORECASE | re.VERBOSE,
)
_LEADING_DECORATION = re.compile(r"^(?:#{1,6}\s+|\*\*|__|>\s*)+")


def count_steps(text: str) -> int:
    """Number of lines that start with a step marker (at most one step per line)."""
    steps = 0
    for raw_line in text.splitlines():
        line = _LEADING_DECORATION.sub("", raw_line.strip())
        if _STEP_MARKERS.match(line):
            steps += 1
    return steps


@checks()
def reasoning_steps(
    completions: Sequence[Completion], *, min_steps: Annotated[int, Ge(1)] = 3, **kwargs: Any
) -> list[float]:
    """Rewards visible step-by-step reasoning: min(1, steps / min_steps).

    A step is a line (leading spaces, markdown headings and bold markers ignored) that starts with
    "Step N:", a numbered-list item ("1." / "2)" / "(3)" followed by a space; every item counts,
    also when the list follows an intro line), a bullet ("-", "*", "+", "•" followed by a space) or
    First/Second/Third/Next/Then/Finally/Lastly. Each line counts at most once; "-3 is…" and
    "1.5 is…" are numbers, not steps.
    """
    return [min(1.0, count_steps(text) / min_steps) for text in completion_texts(completions)]
