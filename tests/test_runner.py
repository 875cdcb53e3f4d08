"""Planning, fingerprints, skip/re-run and interrupted stages, with a model-free fake stage."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from align import artifacts as art
from align.recipe.validate import load_recipe
from align.runner import plan, run_recipe
from align.stages import STAGE_TYPES
from tests import fake_stage, kill_run

RECIPE = """\
name: fake
model: align:tiny
stages:
  - {name: a, type: fake, value: 1}
  - {name: b, type: fake, value: 2, source: "${stages.a.model}"}
  - {name: c, type: fake, value: 3}
"""


@pytest.fixture(autouse=True)
def fake_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STAGE_TYPES, "fake", "tests.fake_stage")
    fake_stage.RUNS.clear()


def run(tmp_path: Path, *overrides: str, text: str = RECIPE) -> art.Manifest:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    recipe = load_recipe(path, list(overrides))
    return run_recipe(recipe, tmp_path / "run", report=lambda _: None)


def test_runs_all_then_skips_all(tmp_path: Path) -> None:
    manifest = run(tmp_path)
    assert fake_stage.RUNS == ["a", "b", "c"]
    assert [s.status for s in manifest.stages] == ["complete"] * 3
    assert manifest.stages[1].metrics == {"value": 2}
    run_dir = tmp_path / "run"
    # b read a's artifact through the resolved reference
    assert (run_dir / "b" / "out.txt").read_text() == f"partial 2 source={(run_dir / 'a' / 'out.txt').resolve()}"
    on_disk = json.loads((run_dir / "manifest.json").read_text())
    assert [s["name"] for s in on_disk["stages"]] == ["a", "b", "c"]
    assert on_disk["stages"][0]["artifacts"] == {"model": "a/out.txt"}
    fake_stage.RUNS.clear()
    run(tmp_path)
    assert fake_stage.RUNS == []


CHAIN = RECIPE + """\
  - {name: d, type: fake, value: 4, dataset: "${stages.b.model}"}
"""


def test_a_changed_stage_reruns_with_the_stages_that_read_from_it(tmp_path: Path) -> None:
    run(tmp_path, text=CHAIN)
    fake_stage.RUNS.clear()
    run(tmp_path, "stages.a.value=10", text=CHAIN)
    assert fake_stage.RUNS == ["a", "b", "d"]  # b reads a, d reads b; c reads nothing
    fake_stage.RUNS.clear()
    run(tmp_path, "stages.a.value=10", "stages.c.value=30", text=CHAIN)
    assert fake_stage.RUNS == ["c"]  # nobody reads c
    fake_stage.RUNS.clear()
    run(tmp_path, "stages.a.value=10", "stages.c.value=30", "stages.d.value=40", text=CHAIN)
    assert fake_stage.RUNS == ["d"]


def test_plan_says_why(tmp_path: Path) -> None:
    run(tmp_path, text=CHAIN)
    path = tmp_path / "recipe.yaml"
    recipe = load_recipe(path, ["stages.a.value=5"])
    planned = plan(recipe, tmp_path / "run")
    assert [(p.config.name, p.run, p.reason) for p in planned] == [
        ("a", True, "its config or inputs changed"),
        ("b", True, "stage 'a' it reads from runs again"),
        ("c", False, "complete, unchanged"),
        ("d", True, "stage 'b' it reads from runs again"),
    ]
    assert [p.depends_on for p in planned] == [(), ("a",), (), ("b",)]


def test_a_stage_whose_input_was_rerun_for_another_reason_runs_again(tmp_path: Path) -> None:
    """An input re-run with the same fingerprint (its folder was lost) still re-runs its readers."""
    import shutil

    run(tmp_path, text=CHAIN)
    shutil.rmtree(tmp_path / "run" / "a")
    reasons = {p.config.name: p.reason for p in plan(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "run") if p.run}
    assert reasons == {"a": "its stage folder is gone",
                       "b": "stage 'a' it reads from runs again", "d": "stage 'b' it reads from runs again"}


def test_fingerprint_covers_align_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import align

    run(tmp_path)
    monkeypatch.setattr(align, "__version__", "99.0")
    assert all(p.run for p in plan(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "run"))


def test_quickstart_plan_follows_references(tmp_path: Path) -> None:
    """On the real quickstart: editing eval_base re-runs eval_base only; editing cold_start re-runs
    every stage downstream of it and none that is not (eval_base, and the base-model sft reads the
    rejection-sampling data, so it is downstream too)."""
    from align.runner import effective_config

    quickstart = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    recipe = load_recipe(quickstart)
    run_dir = tmp_path / "run"
    manifest = art.Manifest(recipe.name, recipe.source, [])
    for item in plan(recipe, run_dir):  # pretend every stage finished
        name = item.config.name
        (run_dir / name / "model").mkdir(parents=True)
        (run_dir / name / "d.jsonl").write_text("")
        (run_dir / name / art.RESULT).write_text("{}")
        manifest.stages.append(art.StageRecord(name, item.config.type, art.COMPLETE, item.fingerprint,
                                               artifacts={"model": f"{name}/model", "dataset": f"{name}/d.jsonl"}))
    manifest.write(run_dir)
    assert not any(p.run for p in plan(recipe, run_dir))
    edited = load_recipe(quickstart, ["stages.eval_base.generation_batch_size=10"])
    assert [p.config.name for p in plan(edited, run_dir) if p.run] == ["eval_base"]
    edited = load_recipe(quickstart, ["stages.cold_start.max_steps=10"])
    names = [effective_config(recipe, s).name for s in recipe.stages]
    assert [p.config.name for p in plan(edited, run_dir) if p.run] == names[1:]


def test_launcher_change_does_not_rerun(tmp_path: Path) -> None:
    run(tmp_path)
    fake_stage.RUNS.clear()
    recipe = load_recipe(tmp_path / "recipe.yaml", ["stages.a.launcher={type: inprocess, extra_args: [--x]}"])
    assert not any(p.run for p in plan(recipe, tmp_path / "run"))


def test_local_input_file_change_reruns(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"x": 1}\n')
    run(tmp_path, text=RECIPE.replace("value: 3}", f"value: 3, dataset: {data}}}"))
    recipe = load_recipe(tmp_path / "recipe.yaml")
    assert not any(p.run for p in plan(recipe, tmp_path / "run"))
    data.write_text('{"x": 2}\n')
    assert [(p.config.name, p.run) for p in plan(recipe, tmp_path / "run")] == [("a", False), ("b", False), ("c", True)]


def test_failed_stage_is_not_complete_and_stops_the_run(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        run(tmp_path, "stages.b.fail=true")
    run_dir = tmp_path / "run"
    manifest = art.Manifest.read(run_dir)
    assert manifest is not None
    assert [s.status for s in manifest.stages] == ["complete", "failed", "pending"]
    assert "boom mid-write" in (manifest.stages[1].error or "")
    assert not (run_dir / "b").exists()  # the half-written artifact stays in the scratch folder
    fake_stage.RUNS.clear()
    run(tmp_path)
    assert fake_stage.RUNS == ["b", "c"]
    assert not art.scratch_dir(run_dir, "b").exists()


def test_killed_between_publish_and_manifest_is_rerun(tmp_path: Path) -> None:
    run(tmp_path)
    run_dir = tmp_path / "run"
    manifest = art.Manifest.read(run_dir)
    assert manifest is not None
    manifest.record("c").status = art.RUNNING  # as if killed right after the folder was renamed
    manifest.write(run_dir)
    recipe = load_recipe(tmp_path / "recipe.yaml")
    assert [(p.config.name, p.run) for p in plan(recipe, run_dir)] == [("a", False), ("b", False), ("c", True)]


def start_cli(tmp_path: Path, text: str) -> kill_run.Run:
    """`align run` on the fake recipe `text`, in a real process."""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return kill_run.start(path, tmp_path / "run", prelude=kill_run.FAKE_STAGE)


def wait_for(path: Path, proc: kill_run.Run) -> None:
    kill_run.wait_until(proc, path.exists, f"{path} to appear", timeout=120)


HANGING = RECIPE + "  - {name: d, type: fake, hang: true}\n"


def test_hard_kill_mid_stage_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    """SIGKILL the real `align run` process while a stage is writing its artifact."""
    run_dir, path = tmp_path / "run", tmp_path / "recipe.yaml"
    proc = start_cli(tmp_path, HANGING)
    wait_for(art.scratch_dir(run_dir, "d") / "started", proc)
    assert kill_run.kill(proc, signal.SIGKILL) == -signal.SIGKILL
    manifest = art.Manifest.read(run_dir)
    assert manifest is not None
    record = manifest.record("d")
    assert record.status == art.RUNNING
    assert not art.is_complete(run_dir, record)
    assert not (run_dir / "d").exists()
    assert (art.scratch_dir(run_dir, "d") / "out.txt").read_text() == "partial 0"
    recipe = load_recipe(path)
    assert [(p.config.name, p.run, p.reason) for p in plan(recipe, run_dir)][-1] == (
        "d", True, "previous attempt did not finish (status: running)"
    )


def test_stage_in_its_own_process(tmp_path: Path) -> None:
    """`launcher: subprocess` runs the stage through `python -m align.execute`; the orchestrator
    only sees what it wrote to disk."""
    from align.runner import render_report

    text = """\
name: sub
model: align:tiny
launcher: {type: subprocess}
stages:
  - name: ev
    type: eval
    dataset: {path: "align:arithmetic", split: test, num_examples: 4}
    max_completion_length: 8
"""
    manifest = run(tmp_path, text=text)
    record = manifest.record("ev")
    assert record.status == "complete"
    assert record.metrics["num_prompts"] == 4
    assert (tmp_path / "run" / "ev" / "predictions.jsonl").read_text().count("\n") == 4
    assert "Held-out accuracy" in render_report(manifest) and "ev " in render_report(manifest)


# ---------------------------------------------------------------- one run per run dir, signals, damage


def test_a_second_run_on_a_run_dir_in_use_is_refused_at_once(tmp_path: Path) -> None:
    first = start_cli(tmp_path, HANGING)
    try:
        wait_for(art.scratch_dir(tmp_path / "run", "d") / "started", first)
        second = start_cli(tmp_path, HANGING)
        assert second.wait(timeout=120) == 2
        err = second.output()
        assert f"{tmp_path / 'run'} is in use by pid {first.pid}" in err
        assert (art.scratch_dir(tmp_path / "run", "d") / "started").exists()  # the first run's work is untouched
        assert art.lock_holder(tmp_path / "run") is not None
    finally:
        first.kill()
        first.wait()
    # the kernel dropped the dead process's lock: the file left behind is stale, not a live run
    assert (tmp_path / "run" / art.LOCK).exists() and art.lock_holder(tmp_path / "run") is None
    fake_stage.RUNS.clear()
    run(tmp_path)  # takes the run dir over
    assert fake_stage.RUNS == []  # a, b, c were complete; d is not in this recipe


def test_sigterm_during_a_stage_without_steps_stops_before_the_next_stage(tmp_path: Path) -> None:
    text = RECIPE.replace("value: 1}", "value: 1, sleep_s: 2}")
    proc = start_cli(tmp_path, text)
    wait_for(art.scratch_dir(tmp_path / "run", "a") / "started", proc)
    assert kill_run.kill(proc, signal.SIGTERM) == 75
    err = proc.output()
    assert "stopped by SIGTERM before stage 'b' started" in err
    manifest = art.Manifest.read(tmp_path / "run")
    assert manifest is not None
    assert [s.status for s in manifest.stages] == ["complete", "pending", "pending"]
    fake_stage.RUNS.clear()
    run(tmp_path, text=text)
    assert fake_stage.RUNS == ["b", "c"]


def test_a_corrupted_manifest_is_set_aside_and_rebuilt_from_the_stage_folders(tmp_path: Path) -> None:
    run(tmp_path)
    run_dir = tmp_path / "run"
    (run_dir / art.MANIFEST).write_text('{"recipe": "fake", "stages": [{"na')  # cut off mid-write by a full disk
    with pytest.raises(art.ManifestError, match="manifest.json cannot be read"):
        art.Manifest.read(run_dir)
    messages: list[str] = []
    fake_stage.RUNS.clear()
    path = tmp_path / "recipe.yaml"
    manifest = run_recipe(load_recipe(path), run_dir, report=messages.append)
    assert fake_stage.RUNS == []  # every finished stage was recognised from its result.json
    assert [s.status for s in manifest.stages] == ["complete"] * 3
    assert any("rebuilt it from the finished stage folders (3 of 3 stages complete)" in m for m in messages)
    assert len(list(run_dir.glob("manifest.json.corrupt-*"))) == 1


def test_a_stage_folder_deleted_by_hand_reruns_with_what_depends_on_it(tmp_path: Path) -> None:
    import shutil

    run(tmp_path)
    shutil.rmtree(tmp_path / "run" / "a")
    recipe = load_recipe(tmp_path / "recipe.yaml")
    reasons = {p.config.name: (p.run, p.reason) for p in plan(recipe, tmp_path / "run")}
    assert reasons["a"] == (True, "its stage folder is gone")
    assert reasons["b"][0] and not reasons["c"][0]
    fake_stage.RUNS.clear()
    run(tmp_path)
    assert fake_stage.RUNS == ["a", "b"]


def test_an_artifact_deleted_by_hand_is_not_taken_as_complete(tmp_path: Path) -> None:
    run(tmp_path)
    (tmp_path / "run" / "c" / "out.txt").unlink()
    fake_stage.RUNS.clear()
    run(tmp_path)
    assert fake_stage.RUNS == ["c"]


def test_an_unfinished_attempt_of_another_config_is_discarded_and_said_so(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        run(tmp_path, "stages.b.fail=true")
    scratch = art.scratch_dir(tmp_path / "run", "b")
    (scratch / "leftover").write_text("from the failed attempt")
    messages: list[str] = []
    path = tmp_path / "recipe.yaml"
    run_recipe(load_recipe(path), tmp_path / "run", report=messages.append)
    assert any("its unfinished attempt ran another config: discarding .b.partial" in m for m in messages), messages
    assert not (tmp_path / "run" / "b" / "leftover").exists()
