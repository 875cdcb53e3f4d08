"""`report_to`: TensorBoard and wandb (offline, no network) for TRL's trainers and PPO's own loop; the
files land in each stage's finished folder, one wandb run per stage; and the key is checked before
anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.artifacts import read_metrics
from align.recipe.errors import RecipeError
from align.recipe.validate import load_recipe, load_recipe_text
from align.runner import plan, run_recipe

TRL_RECIPE = """\
name: tracked
seed: 0
model: align:tiny
report_to: [tensorboard, wandb]
stages:
  - name: sft
    type: sft
    dataset: {path: "align:arithmetic", split: train, num_examples: 64}
    learning_rate: 1.0e-3
    max_steps: 4
    per_device_train_batch_size: 8
    logging_steps: 2
    save_steps: 2  # checkpoints force a log row; on logging_steps' own grid they add none
    max_length: 96
  - name: grpo
    type: grpo
    model: ${stages.sft.model}
    dataset: {path: "align:arithmetic", split: train, num_examples: 16}
    rewards: [{rule: accuracy}, {rule: format}]
    learning_rate: 1.0e-4
    max_steps: 2
    per_device_train_batch_size: 8
    num_generations: 4
    max_completion_length: 16
    logging_steps: 1
  - name: ev
    type: eval
    model: ${stages.grpo.model}
    dataset: {path: "align:arithmetic", split: test, num_examples: 4}
    max_completion_length: 16
"""

PPO_RECIPE = """\
name: tracked-ppo
seed: 0
model: align:tiny
stages:
  - name: ppo
    type: ppo
    report_to: [tensorboard, wandb]
    rewards: [{rule: format}]
    dataset: {path: "align:arithmetic", split: train, num_examples: 16}
    eval_dataset: {path: "align:arithmetic", split: test, num_examples: 4}
    per_device_train_batch_size: 4
    num_ppo_epochs: 1
    max_steps: 2
    response_length: 8
    logging_steps: 1
"""


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard event file under `folder` holds: tag → [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted({p.parent for p in folder.rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return found


def wandb_runs(stage: Path) -> list[Path]:
    return sorted((stage / "tracking" / "wandb").glob("offline-run-*/run-*.wandb"))


def run(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    manifest = run_recipe(load_recipe(path), tmp_path / "run", report=lambda _: None)
    assert all(s.status == "complete" for s in manifest.stages), [s.error for s in manifest.stages]
    return tmp_path / "run"


def test_recipe_level_report_to_reaches_every_trl_stage_and_lands_in_its_folder(tmp_path: Path) -> None:
    run_dir = run(tmp_path, TRL_RECIPE)
    sft, grpo = run_dir / "sft", run_dir / "grpo"
    # TensorBoard: the loss TRL logged, at the steps metrics.jsonl has it.
    logged = [(r["step"], r["loss"]) for r in read_metrics(sft / "metrics.jsonl", "train") if "loss" in r]
    assert [step for step, _ in logged] == [2, 4]
    assert [(s, pytest.approx(v, rel=1e-5)) for s, v in scalars(sft / "tracking")["train/loss"]] == logged
    rewards = [(r["step"], r["reward"]) for r in read_metrics(grpo / "metrics.jsonl", "train") if "reward" in r]
    assert [(s, pytest.approx(v, abs=1e-6)) for s, v in scalars(grpo / "tracking")["train/reward"]] == rewards
    assert "train/rewards/format/mean" in scalars(grpo / "tracking")
    # wandb, offline: one run per stage (the first stage's run is finished before the next starts),
    # each in its own stage's folder, holding that stage's metrics.
    for stage, key in ((sft, b"train/loss"), (grpo, b"train/reward")):
        files = wandb_runs(stage)
        assert len(files) == 1, files
        assert key in files[0].read_bytes()
    assert b"train/reward" not in wandb_runs(sft)[0].read_bytes()
    # Nothing is left where TRL would have put it, nor in any scratch folder; eval trains nothing.
    assert not list(run_dir.glob(".*.partial")) and not (sft / "trainer").exists()
    assert not (run_dir / "ev" / "tracking").exists() and not (run_dir / "wandb").exists()


def test_ppo_logs_to_accelerate_trackers_in_its_folder(tmp_path: Path) -> None:
    run_dir = run(tmp_path, PPO_RECIPE)
    stage = run_dir / "ppo"
    rows = read_metrics(stage / "metrics.jsonl", "train")
    found = scalars(stage / "tracking" / "tensorboard")
    assert [(s, pytest.approx(v, abs=1e-5)) for s, v in found["train/score"]] == [(r["step"], r["score"]) for r in rows]
    assert {"train/reward", "train/kl", "train/value_loss", "eval/score"} <= set(found)
    held_out = read_metrics(stage / "metrics.jsonl", "eval")
    assert [s for s, _ in found["eval/score"]] == [r["step"] for r in held_out] == [0, 2]
    files = wandb_runs(stage)
    assert len(files) == 1 and b"train/score" in files[0].read_bytes()


def test_ppo_tracking_under_two_process_ddp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the main process logs, and the run ends cleanly on both ranks (the trackers are finished
    one by one: accelerate's end_training() would also destroy the process group)."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # real DDP over gloo (see test_ppo's DDP test)
    text = PPO_RECIPE.replace("report_to: [tensorboard, wandb]", "report_to: tensorboard").replace(
        "    logging_steps: 1\n", "    logging_steps: 1\n    launcher: {type: accelerate, num_processes: 2, extra_args: [--multi_gpu]}\n")
    run_dir = run(tmp_path, text)
    stage = run_dir / "ppo"
    assert json.loads((stage / "result.json").read_text())["world_size"] == 2
    found = scalars(stage / "tracking" / "tensorboard")
    assert [s for s, _ in found["train/score"]] == [1, 2]  # one row per step: rank 0 alone logs
    assert not (stage / "tracking" / "wandb").exists()


def problems(text: str) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe_text(text)
    return err.value.render()


HEADER = """\
name: r
model: align:tiny
"""
SFT = '  - {name: sft, type: sft, dataset: {path: "align:arithmetic", num_examples: 8}%s}\n'


def test_report_to_is_checked_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    rendered = problems(HEADER + "stages:\n" + SFT % ", report_to: [tensorboard, none]")
    assert "stages[0].report_to" in rendered and "'none' cannot be combined" in rendered
    assert "report_to[0]" in problems(HEADER + "report_to: mlflw\nstages:\n" + SFT % "")
    # eval trains nothing: report_to is not one of its keys
    eval_stage = '  - {name: ev, type: eval, dataset: {path: "align:arithmetic", split: test, num_examples: 4}, report_to: wandb}\n'
    assert "stages[0].report_to: unknown key" in problems(HEADER + "stages:\n" + eval_stage)
    # a tracker whose package is missing is named with the install line
    import align.tracking

    real = align.tracking.importlib.util.find_spec
    monkeypatch.setattr(align.tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    rendered = problems(HEADER + "report_to: wandb\nstages:\n" + SFT % "")
    assert "report_to: report_to 'wandb' needs the wandb package: pip install wandb" in rendered


def test_trackers_do_not_change_fingerprints_and_recipe_level_fills_stages(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(HEADER + "stages:\n" + SFT % "")
    (tmp_path / "b.yaml").write_text(HEADER + "report_to: tensorboard\nstages:\n" + SFT % "")
    (tmp_path / "c.yaml").write_text(HEADER + "report_to: tensorboard\nstages:\n" + SFT % ", report_to: none")
    planned = {name: plan(load_recipe(tmp_path / f"{name}.yaml"), tmp_path / "run")[0] for name in "abc"}
    assert planned["a"].fingerprint == planned["b"].fingerprint == planned["c"].fingerprint
    assert planned["a"].config.report_to is None
    assert planned["b"].config.report_to == ["tensorboard"]  # the recipe's, filled in
    assert planned["c"].config.report_to == ["none"]  # the stage's own wins
