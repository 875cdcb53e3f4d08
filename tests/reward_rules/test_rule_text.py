"""The shared helpers: completion normalisation, fullwidth digits, boxed extraction."""

from __future__ import annotations

from reward_rules._text import completion_text, last_braced_command, lengths, normalize_fullwidth, tag_block


def test_completion_text_forms() -> None:
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "chat"}]) == "chat"
    content = [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]
    assert completion_text([{"role": "assistant", "content": content}]) == "ab"
    multi_turn = [
        {"role": "assistant", "content": "call tool"},
        {"role": "tool", "content": "TOOL OUTPUT"},  # not the model's words
        {"role": "assistant", "content": "final"},
    ]
    assert completion_text(multi_turn) == "call tool\nfinal"
    assert completion_text(None) == ""
    assert completion_text({"role": "assistant", "content": None}) == ""


def test_normalize_fullwidth() -> None:
    assert normalize_fullwidth("１２．５／３＋４") == "12.5/3+4"
    assert normalize_fullwidth("\u22123") == "-3"  # unicode minus sign


def test_last_braced_command_balances_braces() -> None:
    assert last_braced_command(r"\boxed{\frac{1}{2}} and \boxed{x^{2}}") == "x^{2}"
    assert last_braced_command(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_braced_command(r"\fbox{7}") == "7"
    assert last_braced_command(r"\boxed{unclosed") is None
    assert last_braced_command("nothing") is None


def test_tag_block_and_lengths() -> None:
    assert tag_block("<a>1</a><a>2</a>", "a") == "2"
    assert tag_block("<a>1", "a") is None
    assert lengths(["abc", "de"], None) == [3, 2]
    assert lengths(["abc", "de"], [[1], [1, 2, 3, 4]]) == [1, 4]
