"""`align validate` holds prompt + completion lengths (and SFT/RM max_length) against the context of
the model each stage starts from: read from a local or embedded config.json, or from the hub cache
offline; a hub model it cannot read is a one-line notice, not silence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_fixtures import hub_cache_with_configs
from tests.recipe_problems import recipe_problems

ROOT = Path(__file__).resolve().parents[2]

GRPO = """\
name: ctx
model: align:tiny            # 512 positions
stages:
  - name: sft
    type: sft
    dataset: {path: "align:arithmetic", num_examples: 8}
    max_length: 128
  - name: grpo
    type: grpo
    model: ${stages.sft.model}
    dataset: {path: "align:arithmetic", num_examples: 8}
    rewards: [{rule: format}]
    per_device_train_batch_size: 8
    max_prompt_length: 256
    max_completion_length: 200
"""


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("stages.grpo.max_completion_length=300", "stages[1].max_completion_length",
         "max_prompt_length (256) + max_completion_length (300) = 556 tokens exceeds the context of align:tiny"),
        ("stages.sft.max_length=1024", "stages[0].max_length", "max_length (1024) = 1024 tokens exceeds"),
    ],
)
def test_lengths_beyond_the_context_are_rejected(tmp_path: Path, override: str, key: str, fragment: str) -> None:
    problems = recipe_problems(tmp_path, GRPO, override)
    assert fragment in problems[key] and "max_position_embeddings is 512" in problems[key]


QWEN_MATH = {"model_type": "qwen2", "max_position_embeddings": 4096, "vocab_size": 152064}


def validate(recipe: Path, cache: Path | None, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if cache is not None:
        env["HF_HUB_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "align.cli", "validate", str(recipe), *overrides],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def without_vllm(recipe: Path) -> list[str]:
    import yaml

    return [f"stages.{s['name']}.use_vllm=false" for s in yaml.safe_load(recipe.read_text())["stages"] if s.get("use_vllm")]


@pytest.mark.parametrize("name", ["r1.yaml", "r1_zero.yaml"])
def test_the_r1_recipes_fit_qwen_math(tmp_path: Path, name: str) -> None:
    """With the real models' config.json in the hub cache (Qwen2.5-Math-1.5B/7B: 4096 positions) the
    shipped recipes validate, and the 8192-token completions they once asked for do not."""
    recipe = ROOT / "recipes" / name
    cache = hub_cache_with_configs(tmp_path / "hub", {"Qwen/Qwen2.5-Math-7B": QWEN_MATH,
                                                      "Qwen/Qwen2.5-Math-1.5B": QWEN_MATH})
    done = validate(recipe, cache, *without_vllm(recipe))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not checked" not in done.stdout
    stage = "grpo_reasoning" if name == "r1.yaml" else "grpo"
    done = validate(recipe, cache, *without_vllm(recipe), f"stages.{stage}.max_completion_length=8192")
    assert done.returncode == 2
    assert "exceeds the context of Qwen/Qwen2.5-Math-7B: max_position_embeddings is 4096" in done.stderr


def test_a_hub_model_not_readable_offline_is_a_notice(tmp_path: Path) -> None:
    recipe = ROOT / "recipes" / "r1_zero.yaml"
    done = validate(recipe, tmp_path / "empty-cache", *without_vllm(recipe))
    assert done.returncode == 0, done.stderr
    assert "notice: Qwen/Qwen2.5-Math-7B: context length not checked (no config.json readable offline)" in done.stdout
    assert done.stdout.count("notice:") == 1  # once per model, not once per stage
