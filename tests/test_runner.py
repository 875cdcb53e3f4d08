"""Planning, fingerprints, skip/re-run and interrupted stages, with a model-free fake stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from align import artifacts as art
from align.recipe.validate import load_recipe
from align.runner import plan, run_recipe
from align.stages import STAGE_TYPES
from tests import fake_stage

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
        (run_dir / name).mkdir(parents=True)
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


def test_hard_kill_mid_stage_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    """SIGKILL the real `align run` process while a stage is writing its artifact."""
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE + "  - {name: d, type: fake, hang: true}\n")
    run_dir = tmp_path / "run"
    code = textwrap.dedent(f"""
        import sys
        from align.stages import STAGE_TYPES
        STAGE_TYPES["fake"] = "tests.fake_stage"
        from align.cli import main
        sys.exit(main(["run", {str(path)!r}, "--run-dir", {str(run_dir)!r}]))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = art.scratch_dir(run_dir, "d") / "started"
    deadline = time.time() + 120
    while not started.exists():
        assert proc.poll() is None and time.time() < deadline, "stage d never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
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
