"""The shipped recipes validate: hub recipes with their models pointed at the embedded tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.recipe.validate import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def first_line(path: Path) -> str:
    return path.read_text(encoding="utf-8").splitlines()[0]


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_starts_with_its_command(path: Path) -> None:
    assert first_line(path).startswith(f"# Run: align run recipes/{path.name}")


def without_vllm(path: Path) -> list[str]:
    """vLLM is a GPU extra, absent here: validate such stages with HF generation instead."""
    import yaml

    stages = yaml.safe_load(path.read_text(encoding="utf-8"))["stages"]
    return [f"stages.{s['name']}.use_vllm=false" for s in stages if s.get("use_vllm")]


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_validates_offline(path: Path) -> None:
    # Hub models and datasets are checked for form only; local and embedded ones fully.
    recipe = load_recipe(path, without_vllm(path))
    assert recipe.stages


def test_r1_zero_with_the_tiny_model(tmp_path: Path) -> None:
    from tests.hub_fixtures import with_context

    path = RECIPES / "r1_zero.yaml"
    tiny = with_context("align:tiny", tmp_path, 4096)  # Qwen2.5-Math-7B's context
    recipe = load_recipe(path, [f"model.name_or_path={tiny}", "model.dtype=float32", "model.eos_token=null",
                                *without_vllm(path)])
    grpo = recipe.stage("grpo")
    assert [r.rule for r in grpo.rewards] == ["accuracy", "format"]
    assert grpo.system_prompt and grpo.system_prompt.startswith("A conversation between User and Assistant.")
    assert grpo.loss_type == "dr_grpo" and grpo.model_extra["vllm_gpu_memory_utilization"] == 0.4
    assert recipe.stage("eval_grpo").model.name_or_path == "${stages.grpo.model}"


def test_sft_lora_with_a_local_tiny_model(tmp_path: Path) -> None:
    from tests.hub_fixtures import with_context

    tiny = with_context("align:tiny", tmp_path, 32768)  # Qwen2.5-0.5B's context
    recipe = load_recipe(RECIPES / "sft_lora.yaml", [f"model.name_or_path={tiny}", "model.dtype=float32",
                                                      "stages.sft.lora.r=4"])
    sft = recipe.stage("sft")
    assert sft.lora is not None and sft.lora.r == 4
    assert sft.model_extra == {"assistant_only_loss": False, "eval_steps": 200, "save_strategy": "steps", "save_steps": 500}
