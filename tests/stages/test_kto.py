"""kto: the reference is the starting model (as in dpo), short real runs on pairs and on unpaired
labelled answers (LoRA), and the settings validation rejects with their keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from align.recipe.errors import RecipeError
from align.recipe.validate import load_recipe_text
from tests.stage_run import run_stage
from tests.stages.test_dpo import adapter_starting_model, assert_reference_is, stage_context

RECIPE = """\
name: kto-test
seed: 0
model: align:tiny
stages:
  - name: kto
    type: kto
    dataset: {path: "align:arithmetic-preferences", split: train, num_examples: 256, params: {kinds: "malformed,truncated"}}
    eval_dataset: {path: "align:arithmetic-preferences", split: test, num_examples: 24, params: {kinds: "malformed,truncated"}}
    learning_rate: 1.0e-3
    max_steps: 8
    per_device_train_batch_size: 8
    logging_steps: 4
    max_length: 96
"""


def train(tmp_path: Path, *overrides: str) -> tuple[dict[str, Any], Path]:
    metrics, model_dir, _ = run_stage(tmp_path, RECIPE, "kto", *overrides)
    return metrics, model_dir


def test_reference_is_the_starting_model_merged_from_an_adapter(tmp_path: Path) -> None:
    from align.stages.kto import Config, build_trainer

    start_spec = adapter_starting_model(tmp_path)
    config = Config(name="kto", model=start_spec, seed=0, max_length=64,
                    dataset={"path": "align:arithmetic-preferences", "num_examples": 8})  # fmt: skip
    assert_reference_is(build_trainer(config, stage_context(tmp_path)), start_spec)


def test_short_run_on_pairs_separates_good_from_bad_answers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    metrics, model_dir = train(tmp_path)
    assert metrics["steps"] == 8 and metrics["num_processes"] == 1
    # Before the first step the policy is its reference: every implicit reward is 0.
    assert metrics["eval_reward_chosen_before"] == metrics["eval_reward_rejected_before"] == 0.0
    assert metrics["eval_reward_margin_before"] == 0.0 and metrics["eval_kl_before"] == 0.0
    assert metrics["eval_reward_margin_after"] > 0.0  # desirable answers gained on undesirable ones
    assert metrics["eval_reward_margin_after"] == pytest.approx(
        metrics["eval_reward_chosen_after"] - metrics["eval_reward_rejected_after"], abs=1e-3)
    AutoModelForCausalLM.from_pretrained(model_dir)


def test_unpaired_labelled_answers_with_lora(tmp_path: Path) -> None:
    from align.embedded.preferences import make_preference_dataset

    rows = make_preference_dataset("align:arithmetic-preferences", "train", 32, seed=0, kinds="malformed")
    with (tmp_path / "unpaired.jsonl").open("w") as fh:
        for row in rows:  # one labelled answer per line, alternating good and bad
            fh.write(json.dumps({"prompt": row["prompt"], "completion": row["chosen"], "label": True}) + "\n")
            fh.write(json.dumps({"prompt": row["prompt"], "completion": row["rejected"], "label": False}) + "\n")
    metrics, model_dir = train(tmp_path, f"stages.kto.dataset={tmp_path / 'unpaired.jsonl'}",
                               f"stages.kto.eval_dataset={tmp_path / 'unpaired.jsonl'}",
                               "stages.kto.lora={r: 4, lora_alpha: 8}", "stages.kto.max_steps=4",
                               "stages.kto.system_prompt=Add carefully.")  # fmt: skip
    assert metrics["steps"] == 4 and metrics["eval_reward_margin_before"] == 0.0
    assert (model_dir / "adapter_config.json").exists()


BAD = """\
name: bad
model: align:tiny
stages:
  - name: kto
    type: kto
    dataset: {path: "align:arithmetic-preferences", num_examples: 8}
"""


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ("    per_device_train_batch_size: 1\n", "stages.0.per_device_train_batch_size", "at least 2"),
        ("    train_sampling_strategy: random\n", "stages.0.train_sampling_strategy", "sequential"),
        ("    loss_type: sigmoid\n", "stages.0.loss_type", "'kto' or 'apo_zero_unpaired'"),
        ("    lora: {r: 4}\n    sync_ref_model: true\n", "stages.0.sync_ref_model", "reference copy"),
        ("    desirable_weight: 0\n", "stages.0.desirable_weight", "greater than 0"),
    ],
)
def test_bad_settings_are_rejected_with_their_key(extra: str, key: str, words: str) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe_text(BAD + extra)
    problems = {".".join(map(str, p.path)): p.message for p in caught.value.problems}
    assert key in problems and words in problems[key], problems


def test_rankings_are_refused_with_why() -> None:
    text = BAD.replace('"align:arithmetic-preferences"', '"align:arithmetic-rankings"')
    with pytest.raises(RecipeError) as caught:
        load_recipe_text(text)
    (problem,) = caught.value.problems
    assert problem.path == ("stages", 0, "dataset", "path") and "a ranking gives no answer one label" in problem.message
