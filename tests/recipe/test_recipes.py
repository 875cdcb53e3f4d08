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


def test_zephyr_dpo_with_the_tiny_model(tmp_path: Path) -> None:
    """recipes/dpo.yaml as written (ZeRO-3 launchers and all) validates with the tiny model, and its
    stages, on embedded data, in-process and for two steps, run through."""
    from align.runner import run_recipe
    from tests.hub_fixtures import with_context

    path = RECIPES / "dpo.yaml"
    tiny = [f"model.name_or_path={with_context('align:tiny', tmp_path, 32768)}", "model.dtype=float32"]  # Mistral-7B's context
    recipe = load_recipe(path, tiny)
    dpo = recipe.stage("dpo")
    assert dpo.model.name_or_path == "${stages.sft.model}" and dpo.beta == 0.01 and dpo.loss_type == ["sigmoid"]
    assert dpo.learning_rate == 5.0e-7 and dpo.launcher.num_processes == 8 and dpo.lora is None
    assert recipe.stage("sft").dataset.split == "train_sft" and dpo.dataset.split == "train_prefs"

    small = [
        *tiny, "model.chat_template=null",
        "stages.sft.launcher={type: inprocess}", "stages.dpo.launcher={type: inprocess}",
        "stages.sft.dataset={path: 'align:arithmetic', num_examples: 64}", "stages.sft.eval_dataset=null",
        "stages.sft.max_steps=2", "stages.sft.per_device_train_batch_size=4", "stages.sft.max_length=96",
        "stages.dpo.dataset={path: 'align:arithmetic-preferences', num_examples: 32}",
        "stages.dpo.eval_dataset={path: 'align:arithmetic-preferences', split: test, num_examples: 8}",
        "stages.dpo.max_steps=2", "stages.dpo.per_device_train_batch_size=4", "stages.dpo.max_length=96",
        "stages.eval_dpo.dataset={path: 'align:arithmetic', split: test, num_examples: 4}",
        "stages.eval_dpo.max_completion_length=16",
    ]  # fmt: skip
    manifest = run_recipe(load_recipe(path, small), tmp_path / "run", report=lambda _: None)
    for stage in ("sft", "dpo", "eval_dpo"):
        assert manifest.record(stage).status == "complete", manifest.record(stage).error
    metrics = manifest.record("dpo").metrics
    assert metrics["mixed_precision"] == "bf16" and metrics["reference_logp_max_diff"] == 0.0


def test_dpo_tiny_and_its_rejection_sampling_pairs() -> None:
    recipe = load_recipe(RECIPES / "dpo_tiny.yaml")
    assert [s.type for s in recipe.stages] == ["sft", "eval", "dpo", "eval"]
    assert recipe.stage("dpo").eval_dataset is not None
    pairs = load_recipe(RECIPES / "dpo_rs_tiny.yaml")
    assert pairs.stage("pairs").output == "pairs" and pairs.stage("dpo").dataset.path == "${stages.pairs.dataset}"
