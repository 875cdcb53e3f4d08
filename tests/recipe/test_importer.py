"""`align recipes import` on open-r1's own GRPO configs (tests/recipe/open_r1/, copied with their
licence header): every key lands somewhere or is listed with why, and the imported recipe validates
with its model pointed at the embedded tiny one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from align.cli import main
from align.recipe.importer import SKIPPED, import_file, import_grpo_config
from align.recipe.trl_fields import trl_config_fields
from align.recipe.validate import load_recipe

CONFIGS = Path(__file__).parent / "open_r1"
DEMO = CONFIGS / "qwen2.5-1.5b-instruct_grpo_config_demo.yaml"
MATH_7B = CONFIGS / "qwen2.5-math-7b_grpo_config_simple_rl.yaml"


def imported(tmp_path: Path, config: Path) -> tuple[Path, dict[str, Any], str]:
    text = import_file(config)
    path = tmp_path / "imported.yaml"
    path.write_text(text)
    return path, yaml.safe_load(text), text


def tiny_with_a_hub_context(root: Path) -> Path:
    """The tiny model standing in for the configs' 1.5B–7B Qwen models: 32k positions (Qwen2.5-1.5B's),
    so the configs' lengths are checked against a real context rather than the tiny model's 512."""
    from tests.hub_fixtures import with_context

    return with_context("align:tiny", root, 32768)


def validate_with_tiny(path: Path) -> Any:
    stages = yaml.safe_load(path.read_text())["stages"]
    overrides = [f"model.name_or_path={tiny_with_a_hub_context(path.parent)}", "model.dtype=float32",
                 "model.attn_implementation=null", "model.chat_template=null"]  # fmt: skip
    overrides += [f"stages.{s['name']}.use_vllm=false" for s in stages if s.get("use_vllm")]  # vLLM: a GPU extra
    return load_recipe(path, overrides)


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_open_r1_configs_import_and_validate(tmp_path: Path, config: Path) -> None:
    path, recipe, text = imported(tmp_path, config)
    source = yaml.safe_load(config.read_text())
    validated = validate_with_tiny(path)
    grpo = validated.stage("grpo")
    # rewards: the names, in order, with their weights
    weights = source.get("reward_weights") or [1.0] * len(source["reward_funcs"])
    assert [r.weight for r in grpo.rewards] == weights
    assert len(grpo.rewards) == len(source["reward_funcs"])
    # every GRPOConfig key is on the stage as it was, or named in the header with why
    grpo_fields = trl_config_fields("trl:GRPOConfig")
    stage = recipe["stages"][0]
    for key, value in source.items():
        if key in grpo_fields and key not in ("seed", "reward_weights"):  # weights: on the rewards, above
            assert stage.get(key) == value or f"#   {key}" in text or key in SKIPPED, key
    assert recipe.get("seed") == source.get("seed")
    assert grpo.system_prompt == source.get("system_prompt")
    assert grpo.dataset.path == source["dataset_name"]
    if source.get("dataset_prompt_column", "prompt") != "prompt":
        assert grpo.dataset.columns[source["dataset_prompt_column"]] == "prompt"


def test_the_qwen_1_5b_demo_maps_key_by_key(tmp_path: Path) -> None:
    path, recipe, text = imported(tmp_path, DEMO)
    assert recipe["name"] == "Qwen2-5-1-5B-Open-R1-GRPO" and recipe["seed"] == 42
    assert recipe["model"] == {"name_or_path": "Qwen/Qwen2.5-1.5B-Instruct", "revision": "main", "dtype": "bfloat16",
                               "attn_implementation": "flash_attention_2"}
    (stage,) = recipe["stages"]
    assert stage["rewards"] == [{"rule": "accuracy", "weight": 1.0}, {"rule": "format", "weight": 1.0},
                                {"rule": "tag_count", "weight": 1.0}]
    assert stage["dataset"] == {"path": "open-r1/OpenR1-Math-220k", "split": "train", "columns": {"problem": "prompt"}}
    assert stage["num_generations"] == 16 and stage["learning_rate"] == 2.0e-05 and stage["log_completions"] is True
    assert stage["warmup_steps"] == 0.1 and "warmup_ratio" not in stage  # transformers 5 has only warmup_steps
    assert "launcher" not in stage  # 16 × 1 × 4 is divisible by 16
    for reserved in ("output_dir", "overwrite_output_dir"):
        assert reserved not in stage and f"#   {reserved}: set by align" in text
    assert text.startswith("# Run: align run RECIPE.yaml\n")


def test_the_math_7b_config_gets_its_processes_and_an_eval_stage(tmp_path: Path) -> None:
    path, recipe, text = imported(tmp_path, MATH_7B)
    grpo, evaluation = recipe["stages"]
    # 16 per device × 8 accumulation steps is not divisible by 7 generations in one process; in 7 it is.
    assert grpo["launcher"] == {"type": "accelerate", "num_processes": 7}
    assert "eval_strategy" not in grpo and "eval_steps" not in grpo
    assert evaluation["type"] == "eval" and evaluation["model"] == "${stages.grpo.model}"
    assert evaluation["dataset"] == {"path": "DigitalLearningGmbH/MATH-lighteval", "split": "test", "name": "default",
                                     "columns": {"problem": "prompt"}}
    validated = validate_with_tiny(path)
    assert validated.stage("eval_grpo").system_prompt == validated.stage("grpo").system_prompt
    # One process is what the user asked for: then the batch arithmetic is align validate's to report.
    recipe_one, _ = import_grpo_config(yaml.safe_load(MATH_7B.read_text()), str(MATH_7B), num_processes=1)
    assert "launcher" not in recipe_one["stages"][0]


def test_filter_python_uses_binary_code_on_verification_info(tmp_path: Path) -> None:
    path, recipe, text = imported(tmp_path, CONFIGS / "dataset_filtering_filter_python.yaml")
    (stage,) = recipe["stages"]
    assert stage["rewards"] == [{"rule": "code", "weight": 1.0, "params": {"binary": True}}]
    assert stage["dataset"]["columns"] == {"problem": "prompt", "verification_info": "test_cases"}
    assert "#   pass_rate_min: neither a GRPOConfig" in text and "e2b_router_url" not in yaml.safe_dump(recipe)


def test_reward_function_arguments_follow_their_reward() -> None:
    config = {"model_name_or_path": "Qwen/Qwen2.5-0.5B", "dataset_name": "org/data", "reward_funcs":
              ["cosine", "repetition_penalty", "soft_overlong_punishment", "code_format"],
              "reward_weights": [1.0, 0.5, 1.0, 0.2], "cosine_max_len": 800, "repetition_n_grams": 4,
              "repetition_max_penalty": -0.5, "max_completion_len": 1024, "soft_punish_cache": 256,
              "code_language": "cpp", "max_completion_length": 1024, "num_generations": 4}  # fmt: skip
    recipe, notes = import_grpo_config(config, "config.yaml")
    assert recipe["stages"][0]["rewards"] == [
        {"rule": "cosine", "weight": 1.0, "params": {"max_len": 800}},
        {"rule": "repetition", "weight": 0.5, "params": {"ngram_size": 4, "max_penalty": -0.5}},
        {"rule": "soft_overlong", "weight": 1.0, "params": {"max_completion_length": 1024, "overlong_buffer": 256}},
        {"rule": "code_format", "weight": 0.2, "params": {"language": "cpp"}},
    ]
    assert notes == []
    with pytest.raises(ValueError, match="2 reward_funcs but 1 reward_weights"):
        import_grpo_config({**config, "reward_funcs": ["accuracy", "format"], "reward_weights": [1.0]}, "c.yaml")


def test_cli_writes_a_recipe_that_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.yaml"
    assert main(["recipes", "import", str(DEMO), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_text().startswith(f"# Run: align run {out}\n")
    code = main(["validate", str(out), f"model.name_or_path={tiny_with_a_hub_context(tmp_path)}",
                 "model.attn_implementation=null", "stages.grpo.use_vllm=false"])
    assert code == 0, capsys.readouterr().err
    assert main(["recipes", "import", str(tmp_path / "missing.yaml")]) == 2
