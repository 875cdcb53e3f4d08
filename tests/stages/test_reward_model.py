"""reward_model: rankings → pairs (hand-checked), the weighted Bradley–Terry loss, a real short run on
synthetic preferences that beats chance on held-out pairs, LoRA + rankings, and config checks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from align.artifacts import read_metrics
from align.data import expand_rankings
from align.recipe.errors import RecipeError
from align.recipe.validate import load_recipe, load_recipe_text
from align.runner import run_recipe


def test_rankings_expand_into_every_ordered_pair_with_per_prompt_weights() -> None:
    rows = {
        "prompt": ["p1", "p2", "p3"],
        "ranking": [["a", "b", "c"], ["x", "y"], ["only"]],
        "margin": [0.5, 1.0, 2.0],
    }
    out = expand_rankings(rows, "ranking", "per_prompt")
    pairs = list(zip(out["prompt"], out["chosen"], out["rejected"], strict=True))
    # C(3,2) = 3 pairs for p1, best first; C(2,2) = 1 for p2; p3 has nothing to compare.
    assert pairs == [("p1", "a", "b"), ("p1", "a", "c"), ("p1", "b", "c"), ("p2", "x", "y")]
    # Raw weights 1/3, 1/3, 1/3, 1 (mean 1/2), rescaled to mean 1: 2/3 ×3 and 2.
    assert out["weight"] == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])
    # Each prompt carries the same total weight, however many responses it came with.
    assert sum(out["weight"][:3]) == pytest.approx(out["weight"][3])
    assert out["margin"] == [0.5, 0.5, 0.5, 1.0]

    plain = expand_rankings(rows, "ranking", "per_pair")
    assert plain["weight"] == [1.0, 1.0, 1.0, 1.0]


def test_embedded_rankings_are_ordered_best_first() -> None:
    from align.embedded.preferences import make_preference_dataset
    from reward_rules import RULES

    data = make_preference_dataset("align:arithmetic-rankings", "test", 6, seed=3)
    out = expand_rankings(data.to_dict(), "ranking", "per_prompt")
    assert len(out["chosen"]) == 6 * math.comb(4, 2)
    accuracy, fmt = RULES["accuracy"], RULES["format"]
    for ranking, solution in zip(data["ranking"], data["solution"], strict=True):
        texts = [r[0]["content"] for r in ranking]
        # gold (right, well-formed) > malformed but right > wrong answer, well-formed > cut off: neither
        assert [f or 0.0 for f in fmt(texts)] == [1.0, 0.0, 1.0, 0.0]
        assert accuracy([texts[0], texts[2]], solution=[solution] * 2) == [1.0, 0.0]
        assert solution in texts[1] and "<answer>" not in texts[3]


def test_preference_splits_never_share_a_problem() -> None:
    from align.embedded.preferences import make_preference_dataset

    train = make_preference_dataset("align:arithmetic-preferences", "train", 2000, seed=0, max_operand=30)
    test = make_preference_dataset("align:arithmetic-preferences", "test", 300, seed=0, max_operand=30)

    def key(prompt: list[dict[str, str]]) -> tuple[int, ...]:
        return tuple(sorted(int(x) for x in prompt[-1]["content"][8:-1].split("+")))

    assert not {key(p) for p in train["prompt"]} & {key(p) for p in test["prompt"]}
    assert set(test["kind"]) == {"wrong_answer", "wrong_operand", "malformed", "truncated"}
    assert all(c != r for c, r in zip(test["chosen"], test["rejected"], strict=True))


def test_weighted_loss_is_trl_loss_with_unit_weights_and_scales_with_weights() -> None:
    from datasets import Dataset
    from trl import RewardConfig

    from align.embedded import embedded_model_path
    from align.models import load_sequence_classifier, load_tokenizer
    from align.recipe.schema import ModelSpec
    from align.stages.reward_model import _weighted_trainer

    spec = ModelSpec(name_or_path=str(embedded_model_path("align:tiny")))
    tokenizer = load_tokenizer(spec, padding_side="right")
    model = load_sequence_classifier(spec)
    data = Dataset.from_dict({"chosen": ["a good answer", "yes"], "rejected": ["bad", "no no"]})
    args = RewardConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to="none", max_length=32)
    trainer = _weighted_trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    with torch.no_grad():
        chosen, rejected = model(**batch).logits.squeeze(-1).chunk(2)
        losses = -torch.nn.functional.logsigmoid(chosen - rejected)
        plain = trainer.compute_loss(model, dict(batch))
        unit = trainer.compute_loss(model, {**batch, "weight": torch.ones(2)})
        skewed = trainer.compute_loss(model, {**batch, "weight": torch.tensor([2.0, 0.0])})
    assert float(plain) == pytest.approx(float(losses.mean()), rel=1e-5)
    assert float(unit) == pytest.approx(float(plain), rel=1e-6)
    assert float(skewed) == pytest.approx(float(losses[0]), rel=1e-5)  # (2·ℓ0 + 0·ℓ1) / 2


RECIPE = """\
name: rm-test
seed: 0
model: align:tiny
stages:
  - name: rm
    type: reward_model
    dataset: {path: "align:arithmetic-preferences", split: train, num_examples: 640, params: {kinds: "malformed,truncated"}}
    eval_dataset: {path: "align:arithmetic-preferences", split: test, num_examples: 96, params: {kinds: "malformed,truncated"}}
    learning_rate: 1.0e-3
    max_steps: 40
    per_device_train_batch_size: 16
    logging_steps: 10
    max_length: 96
"""


def train(tmp_path: Path, *overrides: str) -> tuple[dict[str, Any], Path]:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    manifest = run_recipe(load_recipe(path, list(overrides)), tmp_path / "run", report=lambda _: None)
    record = manifest.record("rm")
    assert record.status == "complete", record.error
    return record.metrics, tmp_path / "run" / record.artifacts["model"]


def test_reward_model_learns_synthetic_preferences_and_reloads(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.embedded.preferences import make_preference_dataset

    metrics, model_dir = train(tmp_path)
    assert metrics["eval_pairs"] == 96
    assert metrics["eval_accuracy"] >= 0.8  # chance is 0.5; format flaws are easy to see
    assert metrics["eval_margin"] > 0
    (held_out,) = read_metrics(model_dir.parent / "metrics.jsonl", "eval")
    assert held_out["eval_accuracy"] == metrics["eval_accuracy"] and held_out["step"] == metrics["steps"]

    # The artifact is a plain sequence-classification checkpoint that ranks held-out pairs the same way.
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    rows = make_preference_dataset("align:arithmetic-preferences", "test", 32, seed=0, kinds="malformed,truncated")
    right = 0
    for row in rows:
        scores = []
        for side in ("chosen", "rejected"):
            ids = tokenizer.apply_chat_template(row["prompt"] + row[side], return_dict=True, return_tensors="pt")
            with torch.no_grad():
                scores.append(float(model(**ids).logits[0, 0]))
        right += scores[0] > scores[1]
    assert right / len(rows) >= 0.8


def test_lora_reward_model_on_rankings(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    metrics, model_dir = train(
        tmp_path,
        "stages.rm.dataset={path: 'align:arithmetic-rankings', split: train, num_examples: 96}",
        "stages.rm.eval_dataset={path: 'align:arithmetic-rankings', split: test, num_examples: 16}",
        "stages.rm.lora={r: 8, lora_alpha: 16, merge: true}",
        "stages.rm.max_steps=12",
    )
    assert metrics["eval_pairs"] == 16 * 6  # every ranking of 4 became C(4,2) pairs
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and math.isfinite(metrics["eval_margin"])
    assert not (model_dir / "adapter_config.json").exists()  # merged: a full checkpoint
    assert AutoModelForSequenceClassification.from_pretrained(model_dir).config.num_labels == 1


BAD = """\
name: bad
model: align:tiny
stages:
  - name: rm
    type: reward_model
    dataset: DATA
"""


def test_data_without_pairs_or_rankings_is_rejected_at_its_key() -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe_text(BAD.replace("DATA", '{path: "align:arithmetic", split: train, num_examples: 8}'))
    problems = {".".join(map(str, p.path)): p.message for p in caught.value.problems}
    assert list(problems) == ["stages.0.dataset.path"]
    assert "chosen+rejected" in problems["stages.0.dataset.path"] and "prompt+ranking" in problems["stages.0.dataset.path"]


def test_unknown_and_mistyped_keys_are_rejected() -> None:
    text = BAD.replace("DATA", '{path: "align:arithmetic-preferences", num_examples: 8}')
    with pytest.raises(RecipeError) as caught:
        load_recipe_text(text + "    pair_weighting: per_group\n    center_rewards_coefficient: lots\n    marign: 1\n")
    problems = {".".join(map(str, p.path)): p.message for p in caught.value.problems}
    assert set(problems) == {"stages.0.pair_weighting", "stages.0.center_rewards_coefficient", "stages.0.marign"}
