"""Training that goes wrong stops loudly: NaN loss or weights, KL beyond its bound, nothing trained.
A diverged model is never published."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from align import artifacts as art
from align import checkpoints
from align.models import NonFiniteWeights, save_model
from align.recipe.validate import load_recipe
from align.runner import StageFailed, run_recipe
from align.training import NothingTrained, TrainingDiverged, fit, guard_callback
from tests.recipe_problems import recipe_problems

SFT = """\
name: diverge
seed: 0
model: align:tiny
stages:
  - name: sft
    type: sft
    dataset: {path: "align:arithmetic", split: train, num_examples: 128}
    learning_rate: 2.0e-3
    max_steps: 12
    per_device_train_batch_size: 8
    logging_steps: 1
    save_steps: 1
    max_length: 96
"""

GRPO = """\
name: grpo-kl
seed: 0
model: align:tiny
stages:
  - name: grpo
    type: grpo
    dataset: {path: "align:arithmetic", split: train, num_examples: 32}
    rewards: [{rule: format}]
    learning_rate: 1.0e-3
    max_steps: 4
    per_device_train_batch_size: 8
    num_generations: 4
    max_completion_length: 12
    logging_steps: 1
"""


def run_failing(tmp_path: Path, text: str, stage: str, *overrides: str) -> art.StageRecord:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(StageFailed):
        run_recipe(load_recipe(path, list(overrides)), tmp_path / "run", report=lambda _: None)
    manifest = art.Manifest.read(tmp_path / "run")
    assert manifest is not None
    record = manifest.record(stage)
    assert record.status == art.FAILED and not (tmp_path / "run" / stage).exists()  # nothing published
    return record


def test_sft_at_learning_rate_10_fails_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    record = run_failing(tmp_path, SFT, "sft", "stages.sft.learning_rate=10")
    assert "TrainingDiverged" in (record.error or "") and "learning rate too high?" in (record.error or "")
    kept = checkpoints.complete_checkpoints(art.scratch_dir(tmp_path / "run", "sft") / "trainer")
    assert kept and f"{kept[-1].name}, the last complete checkpoint, stays" in (record.error or "")
    from safetensors.torch import load_file

    weights = load_file(str(kept[-1] / "model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())  # the checkpoint kept is a good one


def test_grpo_stops_when_the_kl_passes_max_kl(tmp_path: Path) -> None:
    # a reward that varies on a fresh model's babble, so the advantages are not all 0 and it moves
    (tmp_path / "rules.py").write_text("def by_length(completions, **kwargs):\n"
                                       "    return [float(len(str(c)) % 7) for c in completions]\n")
    record = run_failing(tmp_path, GRPO, "grpo", "stages.grpo.beta=0.1", "stages.grpo.max_kl=1e-9",
                         f"stages.grpo.rewards=[{{rule: {tmp_path}/rules.py:by_length}}]")
    assert "beyond max_kl (1e-09)" in (record.error or "")


def test_max_kl_without_a_reference_is_rejected(tmp_path: Path) -> None:
    found = recipe_problems(tmp_path, GRPO, "stages.grpo.max_kl=0.5")
    assert "max_kl needs beta > 0" in found["stages[0].max_kl"]


def test_grpo_with_every_prompt_dropped_fails_with_the_reason(tmp_path: Path) -> None:
    record = run_failing(tmp_path, GRPO, "grpo", "stages.grpo.max_prompt_length=2", "stages.grpo.dataset.on_bad_rows=skip")
    assert "every one of the 32 rows read is bad (on_bad_rows: skip left none)" in (record.error or "")
    assert "max_prompt_length" in (record.error or "")


def test_weights_that_turned_nan_are_caught_at_the_checkpoint(tmp_path: Path) -> None:
    guard = guard_callback()
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=4, is_world_process_zero=True)
    model = torch.nn.Linear(2, 2)
    checkpoints.checkpoint_dir(tmp_path, 4).mkdir()
    guard.on_save(args, state, None, model=model)
    assert checkpoints.latest_checkpoint(tmp_path) == checkpoints.checkpoint_dir(tmp_path, 4)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    state.global_step = 5
    checkpoints.checkpoint_dir(tmp_path, 5).mkdir()
    with pytest.raises(TrainingDiverged, match="checkpoint-4, the last complete checkpoint, stays"):
        guard.on_save(args, state, None, model=model)
    assert not checkpoints.checkpoint_dir(tmp_path, 5).exists()


def test_a_model_with_nan_weights_is_never_saved(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.bias[1] = float("inf")
    with pytest.raises(NonFiniteWeights):
        save_model(model, None, tmp_path / "model")
    assert not (tmp_path / "model").exists()


class _NoSteps:
    """A trainer whose data ran out before the first step (what `fit` sees, nothing else)."""

    def __init__(self, output_dir: Path) -> None:
        self.args = SimpleNamespace(output_dir=str(output_dir))
        self.state = SimpleNamespace(global_step=0, max_steps=0)

    def train(self, resume_from_checkpoint: str | None = None) -> Any:
        return SimpleNamespace(metrics={}, training_loss=0.0)

    def is_world_process_zero(self) -> bool:
        return True


def test_a_stage_that_took_no_step_fails(tmp_path: Path) -> None:
    with pytest.raises(NothingTrained, match="0 steps"):
        fit(_NoSteps(tmp_path))
