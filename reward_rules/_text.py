"""Helpers shared by the rules: turning TRL completions into text, lengths, tag extraction."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

# TRL hands completions either as plain strings or, for conversational datasets, as a list of
# messages such as [{"role": "assistant", "content": "..."}]. Content may itself be a list of
# parts ([{"type": "text", "text": "..."}]) for multimodal chat templates.
Completion = str | Sequence[dict[str, Any]] | dict[str, Any]

# Fullwidth ASCII (U+FF01..U+FF5E) maps onto ASCII by a fixed offset; models trained on Chinese
# data often write answers such as "１２" that math parsers do not recognise.
_FULLWIDTH = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)}
_FULLWIDTH.update({0x3000: 0x20, 0x2212: 0x2D})  # ideographic space, unicode minus sign


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, dict):
                if part.get("type", "text") == "text":
                    parts.append(str(part.get("text", "")))
            else:
                parts.append(str(part))
        return "".join(parts)
    return str(content)


def completion_text(completion: Completion | None) -> str:
    """Return the text of one completion, plain string or chat-message list alike.

    For a message list, the contents of the assistant messages are joined with newlines (tool
    messages in multi-turn rollouts are not the model's own words); a list without roles is joined
    whole.
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    messages = list(completion)
    if any(isinstance(m, dict) and "role" in m for m in messages):
        messages = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    return "\n".join(_content_text(m.get("content") if isinstance(m, dict) else m) for m in messages)


def completion_texts(completions: Sequence[Completion]) -> list[str]:
    return [completion_text(c) for c in completions]


def normalize_fullwidth(text: str) -> str:
    """Map fullwidth ASCII forms (０-９, ＋, ．, ／ …) and the unicode minus onto plain ASCII."""
    return text.translate(_FULLWIDTH)


def lengths(texts: Sequence[str], completion_ids: Sequence[Sequence[int]] | None) -> list[int]:
    """Token counts from TRL's ``completion_ids`` when given (and aligned), else character counts."""
    if completion_ids is not None and len(completion_ids) == len(texts):
        return [len(ids) for ids in completion_ids]
    return [len(t) for t in texts]


def prompt_key(prompt: Any) -> str:
    """A hashable key for a prompt (plain string or chat-message list) to group generations."""
    if isinstance(prompt, str):
        return prompt
    try:
        return json.dumps(prompt, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(prompt)


def tag_block(text: str, tag: str) -> str | None:
    """Content of the last complete ``<tag>…</tag>`` block, or None when there is none."""
    matches = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return matches[-1] if matches else None


def last_braced_command(text: str, commands: Sequence[str] = ("boxed", "fbox")) -> str | None:
    r"""Content of the last ``\boxed{…}`` (brace-balanced, so ``\boxed{\frac{1}{2}}`` works)."""
    pattern = re.compile(r"\\(?:" + "|".join(re.escape(c) for c in commands) + r")\s*\{")
    last: str | None = None
    for match in pattern.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    last = text[start:i]
                    break
    return last
