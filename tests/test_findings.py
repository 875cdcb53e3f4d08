"""Three findings of the field, reproduced in miniature on the embedded world (the recipes
r1_zero_tiny, rlhf_rm_only_tiny and distill_vs_rl_tiny): slow end-to-end runs assert each finding's
direction with the recipe as shipped; reduced runs keep each recipe's wiring honest in CI. The figures
are computed by benchmarks/calibrate_findings.py, the script that calibrated the recipes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from align.artifacts import read_metrics
from align.recipe.validate import load_recipe
from align.runner import run_recipe
from benchmarks.calibrate_findings import (
    accuracy_noise,
    distill_vs_rl_figures,
    ppo_curve,
    r1_zero_figures,
    rising_together,
    rlhf_figures,
    tenths_ratio,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CHAT_MARKERS = re.compile(r"<\|(system|user|assistant|end)\|>")


def run(tmp_path: Path, recipe: str, *overrides: str) -> Path:
    run_dir = tmp_path / "run"
    manifest = run_recipe(load_recipe(RECIPES / recipe, list(overrides)), run_dir, report=lambda _: None)
    failed = {s.name: s.error for s in manifest.stages if s.status != "complete"}
    assert not failed, failed
    return run_dir


def stage_yaml(recipe: str) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in yaml.safe_load((RECIPES / recipe).read_text(encoding="utf-8"))["stages"]}


# ---- the figures ---------------------------------------------------------------------------------


def test_tenths_ratio_compares_the_last_tenth_with_the_first() -> None:
    # 20 steps: tenths of 2. First (2 + 4) / 2 = 3, last (9 + 12) / 2 = 10.5.
    assert tenths_ratio([2.0, 4.0, *[5.0] * 16, 9.0, 12.0]) == pytest.approx(3.5)
    assert tenths_ratio([4.0, 6.0]) == pytest.approx(1.5)  # fewer than ten steps: one each


def test_accuracy_noise_is_two_standard_errors_of_a_difference() -> None:
    # 2 * sqrt(2 * 0.5 * 0.5 / 300) = 2 * sqrt(1 / 600) = 0.08165
    assert accuracy_noise(0.5, 300) == pytest.approx(0.08165, abs=1e-5)
    assert accuracy_noise(0.9, 300) < accuracy_noise(0.5, 300)


def test_rising_together_sees_hacking() -> None:
    together = [{"rm": 1.0, "accuracy": 0.40}, {"rm": 1.5, "accuracy": 0.45}, {"rm": 2.0, "accuracy": 0.55}]
    assert rising_together(together, 300)
    # The RM score climbs while accuracy falls in the middle: that is the RM being gamed.
    hacked = [{"rm": 1.0, "accuracy": 0.40}, {"rm": 2.0, "accuracy": 0.25}, {"rm": 3.0, "accuracy": 0.45}]
    assert not rising_together(hacked, 300)
    # A dip of 0.04 is noise on 300 problems (noise ~0.08 near 0.47), not on 3000 (~0.026).
    dip = [{"rm": 1.0, "accuracy": 0.40}, {"rm": 1.5, "accuracy": 0.50}, {"rm": 2.0, "accuracy": 0.46},
           {"rm": 2.5, "accuracy": 0.52}]  # fmt: skip
    assert rising_together(dip, 300) and not rising_together(dip, 3000)
    assert not rising_together([{"rm": 1.0, "accuracy": 0.4}, {"rm": 2.0, "accuracy": 0.4}], 300)
    assert not rising_together(together[:1], 300)


# ---- R1-Zero: reasoning from RL alone -----------------------------------------------------------


def test_r1_zero_template_is_the_corpus_header_and_frame() -> None:
    # The base must have seen the template as text: it is the corpus's conversation header followed
    # by its transcript frame, and the same R1-Zero system prompt recipes/r1_zero.yaml uses on a hub model.
    from align.embedded.corpus import DIALOGUE, R1_ZERO_HEADER

    stages = stage_yaml("r1_zero_tiny.yaml")
    template = stages["grpo"]["dataset"]["params"]["prompt_template"]
    assert template == f"{R1_ZERO_HEADER} {DIALOGUE}"
    assert stage_yaml("r1_zero.yaml")["grpo"]["system_prompt"] == R1_ZERO_HEADER
    assert stages["eval_base"]["dataset"]["params"]["prompt_template"] == template
    assert stages["grpo"]["conversational"] is False and stages["eval_grpo"]["conversational"] is False
    assert [r["rule"] for r in stages["grpo"]["rewards"]] == ["accuracy", "format"]
    assert stages["grpo"]["model"] == "${stages.pretrain.model}"  # straight from the base: no SFT between


def test_r1_zero_reduced(tmp_path: Path) -> None:
    run_dir = run(tmp_path, "r1_zero_tiny.yaml", "stages.pretrain.max_steps=100",
                  "stages.pretrain.dataset.num_examples=4000", "stages.eval_base.dataset.num_examples=40", "stages.eval_grpo.dataset.num_examples=40",
                  "stages.grpo.max_steps=2", "stages.grpo.per_device_train_batch_size=16",
                  "stages.grpo.dataset.num_examples=16")  # fmt: skip
    pretrain = read_metrics(run_dir / "pretrain" / "metrics.jsonl", "summary")[0]
    assert pretrain["last_loss"] < 0.5 * pretrain["first_loss"]
    # Pretrained on raw text, the base continues the transcript in one of the corpus's reply forms.
    replies = [json.loads(line) for line in (run_dir / "eval_base" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["prompt"].endswith(" Assistant:") and not CHAT_MARKERS.search(r["prompt"]) for r in replies)
    forms = re.compile(r"( The answer is \d+\.| ?<think>.*| \d+\+\d+=\d+.*)")
    assert sum(bool(forms.fullmatch(r["samples"][0]["text"])) for r in replies) >= 0.8 * len(replies)
    # GRPO generated from the raw prompts and logged what the finding is read from.
    figures = r1_zero_figures(run_dir)
    assert figures["length_first_tenth"] > 0 and {"format_base", "format_grpo"} <= set(figures)
    samples = read_metrics(run_dir / "grpo" / "metrics.jsonl", "sample")
    assert samples and not any(CHAT_MARKERS.search(s["prompt"] + s["completion"]) for s in samples)


@pytest.mark.slow
def test_r1_zero_tiny_end_to_end(tmp_path: Path) -> None:
    """The recipe as shipped: accuracy and the tagged format come from the rewards alone, and the
    answers grow longer as the model wraps its worked prose in the tags (and drops direct answers)."""
    f = r1_zero_figures(run(tmp_path, "r1_zero_tiny.yaml"))
    assert f["gain_points"] >= 30, f
    assert f["format_base"] <= 0.2 and f["format_grpo"] >= 0.9, f
    assert f["length_ratio"] >= 1.3, f


# ---- InstructGPT: a learned reward model alone improves the policy ---------------------------------


def test_rlhf_rm_only_rewards_the_reward_model_alone() -> None:
    recipe = load_recipe(RECIPES / "rlhf_rm_only_tiny.yaml")
    ppo = recipe.stage("ppo")
    assert ppo.reward_model is not None and ppo.reward_model.name_or_path == "${stages.reward_model.model}"
    assert all(r.weight == 0.0 for r in ppo.rewards) and "accuracy" in [r.rule for r in ppo.rewards]
    assert ppo.eval_steps and ppo.eval_dataset is not None


def test_rlhf_rm_only_reduced(tmp_path: Path) -> None:
    run_dir = run(tmp_path, "rlhf_rm_only_tiny.yaml", "stages.sft.max_steps=40", "stages.reward_model.max_steps=20",
                  "stages.reward_model.dataset.num_examples=320", "stages.reward_model.eval_dataset.num_examples=32",
                  "stages.ppo.max_steps=4", "stages.ppo.eval_steps=2", "stages.ppo.critic_warmup_steps=1",
                  "stages.ppo.eval_dataset.num_examples=24", "stages.eval_sft.dataset.num_examples=24",
                  "stages.eval_ppo.dataset.num_examples=24")  # fmt: skip
    # Held-out RM score and rule accuracy side by side: before, at every eval_steps, after.
    assert [c["step"] for c in ppo_curve(run_dir)] == [0, 2, 4]
    # Weight 0: the accuracy rule is logged but the score is the RM's alone (minus the no-EOS penalty).
    for row in read_metrics(run_dir / "ppo" / "metrics.jsonl", "train"):
        assert "score/accuracy" in row
        assert row["score"] == pytest.approx(row["score/reward_model"] - row["no_eos"], abs=1e-4)
    assert set(rlhf_figures(run_dir)) >= {"accuracy_sft", "accuracy_ppo", "curve", "rising_together"}


@pytest.mark.slow
def test_rlhf_rm_only_tiny_end_to_end(tmp_path: Path) -> None:
    """PPO on the reward model alone raises held-out accuracy, and the RM score and the rule
    accuracy rise together (no hacking)."""
    f = rlhf_figures(run(tmp_path, "rlhf_rm_only_tiny.yaml"))
    assert f["gain_points"] >= 10, f
    assert f["rising_together"], f


# ---- R1 §4.1: distillation beats RL on the small model ---------------------------------------------


def test_distill_vs_rl_teacher_is_the_quickstarts() -> None:
    # Stage for stage the quickstart's training chain and its distill stage: the same teacher (same
    # seed), and the same distilled student the quickstart ends with.
    quickstart, recipe = stage_yaml("quickstart.yaml"), stage_yaml("distill_vs_rl_tiny.yaml")
    for name in ("cold_start", "grpo_reasoning", "rejection_sampling", "sft", "grpo", "distill"):
        assert recipe[name] == quickstart[name], name
    assert yaml.safe_load((RECIPES / "distill_vs_rl_tiny.yaml").read_text())["seed"] == yaml.safe_load(
        (RECIPES / "quickstart.yaml").read_text())["seed"]
    # Both branches train the same student.
    assert recipe["distill"]["student"] == recipe["student_cold_start"]["model"] == "align:tiny-student"
    assert recipe["student_grpo"]["model"] == "${stages.student_cold_start.model}"


def test_distill_vs_rl_reduced(tmp_path: Path) -> None:
    small = []
    for name, stage in stage_yaml("distill_vs_rl_tiny.yaml").items():
        if stage["type"] == "eval":
            small.append(f"stages.{name}.dataset.num_examples=24")
        elif stage["type"] in ("sft", "distill"):
            small.append(f"stages.{name}.max_steps=8")
        elif stage["type"] == "grpo":
            small += [f"stages.{name}.max_steps=1", f"stages.{name}.per_device_train_batch_size=16"]
        if stage["type"] in ("rejection_sampling", "distill"):
            small.append(f"stages.{name}.dataset.num_examples=32")
    # A teacher trained for 8 steps passes no rule and never stops: keep each prompt's best sample
    # and the teacher's traces, cut off or not, so the chain still reaches the students (what this
    # run checks is the wiring, not the teacher).
    small += ["stages.rejection_sampling.keep=best_of_n", "stages.rejection_sampling.drop_truncated=false",
              "stages.distill.drop_truncated=false"]  # fmt: skip
    f = distill_vs_rl_figures(run(tmp_path, "distill_vs_rl_tiny.yaml", *small))
    assert {"accuracy_distilled", "accuracy_rl_only", "gap_points", "compute_ratio_rl_over_distill"} <= set(f)
    assert f["distill_train_s"] > 0 and f["rl_train_s"] > 0


@pytest.mark.slow
def test_distill_vs_rl_tiny_end_to_end(tmp_path: Path) -> None:
    """With comparable student compute, the distilled student beats the one trained by RL on itself."""
    f = distill_vs_rl_figures(run(tmp_path, "distill_vs_rl_tiny.yaml"))
    assert f["gap_points"] >= 5, f
    assert 0.8 <= f["compute_ratio_rl_over_distill"] <= 1.5, f
