"""The `align rewards` commands, as a user types them."""

from __future__ import annotations

import pytest

from align.cli import main


def test_rewards_list_shows_rules_params_and_columns(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rewards", "list"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "[needs: solution]" in out
    assert "prefilled_think: bool = False" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["accuracy", "--completion", "<think>x</think><answer>\\frac{1}{2}</answer>", "--solution", "0.5"], "1.0"),
        (["accuracy", "--completion", "<answer>3</answer>", "--solution", "4"], "0.0"),
        (["format", "--completion", "<think>x</think><answer>1</answer>\nextra"], "0.0"),
        (["format", "--completion", "x</think><answer>1</answer>", "--param", "prefilled_think=true"], "1.0"),
    ],
)
def test_rewards_try(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    assert main(["rewards", "try", *argv]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_rewards_try_unknown_rule_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rewards", "try", "acuracy", "--completion", "x"]) == 2
    assert "Did you mean 'accuracy'?" in capsys.readouterr().err
