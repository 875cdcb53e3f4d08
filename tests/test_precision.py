"""The precision policy: float32 master weights for what trains, compute-dtype frozen models, saved
in the dtype asked for; bf16 autocast really used on the CPU in SFT and PPO."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from align.precision import Device, PrecisionError, precision_policy
from align.recipe.schema import ModelSpec

CPU, BF16_GPU, FP16_GPU = Device(cuda=False, bf16=False), Device(cuda=True, bf16=True), Device(cuda=True, bf16=False)


@pytest.mark.parametrize(
    ("device", "keys", "mixed", "trainable", "frozen"),
    [
        (CPU, {}, "no", "float32", "float32"),
        (CPU, {"bf16": True}, "bf16", "float32", "bfloat16"),  # torch runs bf16 autocast on the CPU
        (BF16_GPU, {}, "bf16", "float32", "bfloat16"),  # the default on an A100/H100: mixed, not pure bf16
        (BF16_GPU, {"bf16": False}, "no", "float32", "float32"),
        (BF16_GPU, {"pure_bf16": True}, "bf16", "bfloat16", "bfloat16"),
        (FP16_GPU, {}, "fp16", "float32", "float16"),  # a V100/T4: fp16 autocast (TRL scales the loss)
        (FP16_GPU, {"fp16": True}, "fp16", "float32", "float16"),
    ],
)
def test_policy_per_device(device: Device, keys: dict[str, bool], mixed: str, trainable: str, frozen: str) -> None:
    precision = precision_policy(**keys, device=device)
    assert (precision.mixed, precision.trainable_dtype, precision.frozen_dtype) == (mixed, trainable, frozen)
    assert precision.trl_flags == {"bf16": mixed == "bf16", "fp16": mixed == "fp16"}


@pytest.mark.parametrize(
    ("device", "keys", "fragment"),
    [
        (FP16_GPU, {"bf16": True}, "does not compute in bf16"),
        (CPU, {"fp16": True}, "needs a GPU"),
        (CPU, {"bf16": True, "fp16": True}, "both on"),
    ],
)
def test_settings_the_device_cannot_run_are_errors(device: Device, keys: dict[str, bool], fragment: str) -> None:
    with pytest.raises(PrecisionError, match=fragment):
        precision_policy(**keys, device=device)


def test_trainable_loads_float32_and_frozen_the_compute_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a (faked) bf16 GPU a model to train is float32 even when its spec says bfloat16; a frozen
    one takes the compute dtype, or the spec's."""
    from align import precision
    from align.models import load_causal_lm, load_sequence_classifier, load_trainable

    monkeypatch.setattr(precision.Device, "current", classmethod(lambda cls: BF16_GPU))
    spec = ModelSpec(name_or_path="align:tiny", dtype="bfloat16")
    assert next(load_trainable(spec).model.parameters()).dtype == torch.float32
    assert next(load_trainable(spec, task="sequence_classification").model.parameters()).dtype == torch.float32
    assert next(load_causal_lm(ModelSpec(name_or_path="align:tiny")).parameters()).dtype == torch.bfloat16
    assert next(load_sequence_classifier(ModelSpec(name_or_path="align:tiny", dtype="float32")).parameters()).dtype == torch.float32
    assert next(load_causal_lm(ModelSpec(name_or_path="align:tiny", dtype="auto")).parameters()).dtype == torch.float32  # checkpoint's


def test_sft_in_bf16_keeps_float32_masters_that_all_move(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """20 steps at lr 1e-5 with bf16 autocast on a model whose spec says bfloat16: pure bf16 weights
    would round most updates away; float32 masters move ≥ 90 % of the weights. Saved as asked: bf16."""
    from transformers import AutoModelForCausalLM

    from align import models, training
    from align.embedded import embedded_model_path
    from align.recipe.validate import load_recipe
    from align.runner import run_recipe

    seen: dict[str, Any] = {}
    real_save = models.save_model

    def save_and_look(model: Any, *args: Any, **kwargs: Any) -> None:
        seen["dtypes"] = {p.dtype for p in model.parameters()}
        seen["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        real_save(model, *args, **kwargs)

    monkeypatch.setattr(training, "save_model", save_and_look)
    (tmp_path / "r.yaml").write_text("""\
name: bf16
model: {name_or_path: "align:tiny", dtype: bfloat16}
stages:
  - name: sft
    type: sft
    dataset: {path: "align:arithmetic", num_examples: 320}
    bf16: true
    learning_rate: 1.0e-5
    max_steps: 20
    per_device_train_batch_size: 16
""")
    manifest = run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "run", report=lambda _: None)
    assert manifest.record("sft").status == "complete"
    assert seen["dtypes"] == {torch.float32}
    start = AutoModelForCausalLM.from_pretrained(embedded_model_path("align:tiny")).state_dict()
    changed = sum(int((seen["weights"][k] != v).sum()) for k, v in start.items())
    total = sum(v.numel() for v in start.values())
    assert changed / total >= 0.9, changed / total
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "sft" / "model", dtype="auto")
    assert next(saved.parameters()).dtype == torch.bfloat16


def test_ppo_in_bf16_starts_on_policy(tmp_path: Path) -> None:
    """Rollout log-probs and the training forward run under the same bf16 autocast: ratio = 1 at the
    first update, and the stage says what it ran with. (Rollouts outside the autocast measured ratio
    1.000029 and approx_kl 1e-6 on this tiny model; the gap grows with depth and vocabulary.)"""
    from tests.stages.test_ppo import run_ppo, step_rows

    metrics, _, rows = run_ppo(tmp_path, "stages.ppo.max_steps=1", "stages.ppo.num_ppo_epochs=1",
                               "stages.ppo.gradient_accumulation_steps=1", "stages.ppo.eval_dataset=null",
                               "stages.ppo.bf16=true")
    (row,) = step_rows(rows)
    assert row["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert row["approx_kl"] == pytest.approx(0.0, abs=5e-7)  # logged rounded to 6 decimals
    assert row["policy_clip_fraction"] == 0.0
    assert metrics["mixed_precision"] == "bf16"


def test_a_lora_base_loads_in_the_compute_dtype_and_its_adapter_trains_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    from align import precision
    from align.models import load_trainable
    from align.recipe.schema import LoraSpec

    monkeypatch.setattr(precision.Device, "current", classmethod(lambda cls: BF16_GPU))
    model = load_trainable(ModelSpec(name_or_path="align:tiny"), LoraSpec(r=4), wrap_lora=True).model
    dtypes = {("lora_" in name, p.dtype) for name, p in model.named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
