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


def test_status_says_live_killed_or_failed_with_the_log(tmp_path: Path, fake_type: None,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import signal

    from align.artifacts import LOG, MANIFEST, scratch_dir
    from tests import kill_run

    run_dir = tmp_path / "run"
    (tmp_path / "recipe.yaml").write_text(OK_THEN_HANG)
    proc = kill_run.start(tmp_path / "recipe.yaml", run_dir, prelude=kill_run.FAKE_STAGE)
    try:
        kill_run.wait_until(proc, (scratch_dir(run_dir, "h") / "started").exists, "stage h to start")
        assert main(["status", str(run_dir)]) == 0
        out = capsys.readouterr().out
        assert f"run: live (pid {proc.pid} on " in out
        assert "Running\nh: " in out
    finally:
        kill_run.kill(proc, signal.SIGKILL)
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "run: not running — stage 'h' was killed while it ran; `align run` again resumes it" in out
    assert "Running" not in out  # no live progress from a dead run

    (tmp_path / "recipe.yaml").write_text(FAKE)
    assert main(["run", str(tmp_path / "recipe.yaml"), "--run-dir", str(run_dir)]) == 1
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "run: not running\n" in out
    assert f"b failed: rank 0: RuntimeError: boom mid-write\n  log: {scratch_dir(run_dir, 'b') / LOG}" in out

    (run_dir / MANIFEST).write_bytes(b"\x00\x00\x00")  # a crash mid-write on some file systems
    assert main(["status", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "manifest.json cannot be read" in err and "rebuilds it from the finished stage folders" in err
    assert "Traceback" not in err


OK_THEN_HANG = """\
name: fake
model: align:tiny
stages:
  - {name: a, type: fake, value: 1}
  - {name: h, type: fake, hang: true}
"""


# ---------------------------------------------------------------- overrides anywhere

OK = """\
name: fake
model: align:tiny
stages:
  - {name: a, type: fake, value: 1}
"""


def test_overrides_may_follow_flags(tmp_path: Path, fake_type: None, capsys: pytest.CaptureFixture[str]) -> None:
    from align.artifacts import Manifest

    recipe, run_dir = tmp_path / "recipe.yaml", tmp_path / "run"
    recipe.write_text(OK)
    argv = ["run", str(recipe), "--run-dir", str(run_dir), "stages.a.value=7", "seed=3"]
    assert main(argv) == 0
    manifest = Manifest.read(run_dir)
    assert manifest is not None and manifest.record("a").metrics == {"value": 7}
    assert manifest.run["command"] == "align " + " ".join(argv)
    assert main(["validate", str(recipe), "--skip-model-check", "stages.a.value=8"]) == 0
    assert main(["validate", str(recipe), "--skip-model-check", "stages.a.valu=8"]) == 2  # still validated
    assert "did you mean 'value'" in capsys.readouterr().err
    for bad in (["run", str(recipe), "--run-dir", str(run_dir), "--frobnicate"], ["status", str(run_dir), "a=1"]):
        with pytest.raises(SystemExit):
            main(bad)
        assert "unrecognized arguments" in capsys.readouterr().err


# ---------------------------------------------------------------- align report

def test_report_command_writes_the_report_or_says_why_not(tmp_path: Path, fake_type: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "recipe.yaml").write_text(OK)
    assert main(["run", str(tmp_path / "recipe.yaml"), "--run-dir", str(tmp_path / "run")]) == 0
    (tmp_path / "run" / "report.md").unlink()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "run" / "report.html"), str(tmp_path / "run" / "report.md")]
    assert "| a | fake | complete |" in (tmp_path / "run" / "report.md").read_text()
    assert main(["report", str(tmp_path)]) == 2
    assert "no manifest.json (not a run directory)" in capsys.readouterr().err


# ---------------------------------------------------------------- align recipes

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_recipes_lists_every_shipped_recipe_with_its_first_comment(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert main(["recipes", "list"]) == 0
    assert capsys.readouterr().out == out
    shipped = sorted(RECIPES.glob("*.yaml"))
    assert shipped
    for path in shipped:
        first = next(line.lstrip("#").strip() for line in path.read_text().splitlines()
                     if line.startswith("#") and not line.lstrip("#").strip().startswith("Run:") and line.strip("# "))
        assert any(line.split(None, 1) == [path.stem, first] for line in out.splitlines()), (path.stem, first)


def test_recipes_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from align.recipe.validate import load_recipe

    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "copy", "quickstart"]) == 0
    assert (tmp_path / "quickstart.yaml").read_bytes() == (RECIPES / "quickstart.yaml").read_bytes()
    assert main(["recipes", "copy", "quickstart.yaml"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["recipes", "copy", "quickstart", "--force"]) == 0
    # into a new folder: the Accelerate configs it names come along, so the copy validates there
    assert main(["recipes", "copy", "r1", "edit/"]) == 0
    assert sorted(p.name for p in (tmp_path / "edit" / "accelerate_configs").iterdir()) == ["zero2.yaml", "zero3.yaml"]
    load_recipe(tmp_path / "edit" / "r1.yaml", check_models=False)
    assert main(["recipes", "copy", "r1_zero", str(tmp_path / "mine.yaml")]) == 0
    assert (tmp_path / "mine.yaml").read_bytes() == (RECIPES / "r1_zero.yaml").read_bytes()
    capsys.readouterr()
    assert main(["recipes", "copy", "quickstat"]) == 2
    assert "no shipped recipe 'quickstat' (did you mean 'quickstart'?)" in capsys.readouterr().err


# ---------------------------------------------------------------- align chat

def test_chat_reads_turns_from_stdin_and_keeps_the_conversation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import io
    import shutil

    from align.chat import reply_text
    from align.embedded import embedded_model_path
    from align.generation import eos_and_pad_ids, generate
    from align.models import load_causal_lm, load_tokenizer
    from align.recipe.schema import ModelSpec

    stage = tmp_path / "run" / "sft"  # chat takes a stage folder and uses its model/
    shutil.copytree(embedded_model_path("align:tiny"), stage / "model")
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2+3?\n\n/reset\nWhat is 2+3?\nAnd 1+1?\n"))
    assert main(["chat", str(stage), "--temperature", "0", "--max-new-tokens", "10", "--system", "Be brief."]) == 0
    out = capsys.readouterr().out

    spec = ModelSpec(name_or_path=str(stage / "model"))
    model, tokenizer = load_causal_lm(spec).eval(), load_tokenizer(spec)
    eos_ids, pad_id = eos_and_pad_ids(model, tokenizer)

    def reply(conversation: list[dict[str, str]]) -> str:
        ids = generate(model, tokenizer, [conversation], max_new_tokens=10)[0][0].token_ids
        return reply_text(ids, tokenizer, [*eos_ids, pad_id])

    system = {"role": "system", "content": "Be brief."}
    first = reply([system, {"role": "user", "content": "What is 2+3?"}])
    # after /reset the same question starts a fresh conversation; the next turn sees the one before it
    second = reply([system, {"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "And 1+1?"}])  # fmt: skip
    assert out == f"{first}\n{first}\n{second}\n"


def test_chat_shows_the_r1_tags_and_drops_only_the_end_token() -> None:
    from align.chat import reply_text, resolve_chat_model
    from align.models import load_tokenizer
    from align.recipe.schema import ModelSpec

    tokenizer = load_tokenizer(ModelSpec(name_or_path="align:tiny"))
    text = "<think>2+3=5</think><answer>5</answer>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert reply_text(ids, tokenizer, [tokenizer.eos_token_id]) == text
    with pytest.raises(FileNotFoundError, match="no model here"):
        resolve_chat_model("/nonexistent/run/sft")
