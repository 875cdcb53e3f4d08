"""The `align rewards` commands, as a user types them."""

from __future__ import annotations

from pathlib import Path

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


# ---------------------------------------------------------------- loud failures

FAKE = """\
name: fake
model: align:tiny
stages:
  - {name: a, type: fake, value: 1}
  - {name: b, type: fake, value: 2, fail: true}
"""


@pytest.fixture
def fake_type(monkeypatch: pytest.MonkeyPatch) -> None:
    from align.stages import STAGE_TYPES

    monkeypatch.setitem(STAGE_TYPES, "fake", "tests.fake_stage")


def test_a_run_dir_that_cannot_be_made_is_a_message(tmp_path: Path, fake_type: None,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "recipe.yaml").write_text(FAKE)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = main(["run", str(tmp_path / "recipe.yaml"), "--run-dir", str(blocker / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("align: ") and str(blocker) in err and "Traceback" not in err
    with pytest.raises(OSError):
        main(["--debug", "run", str(tmp_path / "recipe.yaml"), "--run-dir", str(blocker / "run")])


def test_a_failed_stage_logs_its_traceback_and_shows_the_tail(tmp_path: Path, fake_type: None,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from align.artifacts import LOG, Manifest, scratch_dir

    (tmp_path / "recipe.yaml").write_text(FAKE)
    run_dir = tmp_path / "run"
    assert main(["run", str(tmp_path / "recipe.yaml"), "--run-dir", str(run_dir)]) == 1
    captured = capsys.readouterr()
    log = scratch_dir(run_dir, "b") / LOG
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: boom mid-write" in text
    assert "fake_stage.py" in text  # the whole traceback, down to the raising frame
    assert "[align] FAILED b: rank 0: RuntimeError: boom mid-write" in captured.out
    assert "RuntimeError: boom mid-write" in captured.out.split("FAILED b")[1]  # the log's tail
    assert f"full log: {log}" in captured.out
    assert "stage 'b' failed" in captured.err
    manifest = Manifest.read(run_dir)
    assert manifest is not None and manifest.record("b").error == "rank 0: RuntimeError: boom mid-write"
