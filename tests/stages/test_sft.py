"""SFT on the tiny model: full and LoRA lower the loss, and the artifacts reload with plain
transformers / PEFT."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.artifacts import read_metrics
from align.recipe.validate import load_recipe
from align.runner import run_recipe

RECIPE = """\
name: sft-test
seed: 0
model: align:tiny
stages:
  - name: sft
    type: sft
    dataset: {path: "align:arithmetic", split: train, num_examples: 256}
    learning_rate: 2.0e-3
    max_steps: 24
    per_device_train_batch_size: 16
    logging_steps: 4
    max_length: 96
"""


def train(tmp_path: Path, *overrides: str) -> tuple[dict, Path]:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    manifest = run_recipe(load_recipe(path, list(overrides)), tmp_path / "run", report=lambda _: None)
    record = manifest.record("sft")
    assert record.status == "complete"
    return record.metrics, tmp_path / "run" / record.artifacts["model"]


def loss_on(model: object, tokenizer: object) -> float:
    import torch

    from align.embedded.tasks import make_task_dataset

    rows = make_task_dataset("align:arithmetic", "test", 16, seed=1)
    texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(rows["prompt"], rows["completion"], strict=True)]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return float(model(**batch, labels=labels).loss)


def test_full_finetune_lowers_loss_and_reloads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.embedded import embedded_model_path

    metrics, model_dir = train(tmp_path)
    assert metrics["steps"] == 24
    assert metrics["last_loss"] < 0.7 * metrics["first_loss"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trained = AutoModelForCausalLM.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(embedded_model_path("align:tiny"))
    assert loss_on(trained, tokenizer) < 0.8 * loss_on(base, tokenizer)
    rows = read_metrics(model_dir.parent / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train" and "loss" in r]
    assert len(train_rows) >= 4 and all("epoch" in r and r["step"] > 0 for r in train_rows)
    assert rows[-1]["kind"] == "summary" and rows[-1]["steps"] == rows[-1]["step"] == 24
    assert not (model_dir.parent / "trainer").exists()  # scratch checkpoints are not left behind


@pytest.mark.parametrize("merge", [False, True])
def test_lora_lowers_loss_and_reloads_with_peft(tmp_path: Path, merge: bool) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.embedded import embedded_model_path

    metrics, model_dir = train(tmp_path, "stages.sft.lora={r: 8, lora_alpha: 16}", f"stages.sft.lora.merge={str(merge).lower()}",
                               "stages.sft.learning_rate=1e-2")
    assert metrics["last_loss"] < 0.9 * metrics["first_loss"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base_dir = embedded_model_path("align:tiny")
    if merge:
        assert not (model_dir / "adapter_config.json").exists()
        trained = AutoModelForCausalLM.from_pretrained(model_dir)
    else:
        assert (model_dir / "adapter_config.json").exists()
        trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), model_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert loss_on(trained, tokenizer) < 0.92 * loss_on(base, tokenizer)
