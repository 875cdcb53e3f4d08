"""dpo: the reference really is the starting model (full fine-tune from a model merged out of an
adapter, LoRA, precomputed log-probs), held-out implicit-reward metrics checked against a plain
forward pass, short real runs (full, LoRA on rankings, bf16 autocast, two DDP processes), every
TRL loss type, and the combinations validation rejects with their keys."""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any

import pytest
import torch

from align.artifacts import MetricsWriter, StageContext, read_metrics
from align.recipe.errors import RecipeError
from align.recipe.validate import load_recipe_text
from tests.stage_run import run_stage

RECIPE = """\
name: dpo-test
seed: 0
model: align:tiny
stages:
  - name: dpo
    type: dpo
    dataset: {path: "align:arithmetic-preferences", split: train, num_examples: 256, params: {kinds: "malformed,truncated"}}
    eval_dataset: {path: "align:arithmetic-preferences", split: test, num_examples: 24, params: {kinds: "malformed,truncated"}}
    learning_rate: 1.0e-3
    beta: 0.1
    max_steps: 8
    per_device_train_batch_size: 8
    per_device_eval_batch_size: 10
    logging_steps: 4
    max_length: 96
"""


def train(tmp_path: Path, *overrides: str) -> tuple[dict[str, Any], Path, list[dict[str, Any]]]:
    metrics, model_dir, stage_dir = run_stage(tmp_path, RECIPE, "dpo", *overrides)
    return metrics, model_dir, read_metrics(stage_dir / "metrics.jsonl")


def tiny() -> Any:
    from align.embedded import embedded_model_path
    from align.recipe.schema import ModelSpec

    return ModelSpec(name_or_path=str(embedded_model_path("align:tiny")))


def sequence_logp(model: Any, tokenizer: Any, prompt: list[dict[str, str]], completion: list[dict[str, str]]) -> float:
    """log π(completion | prompt) from full logits, as the DPO paper writes it: the completion's
    tokens are those after the rendered prompt (with its generation prompt)."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    ids = torch.tensor([full_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    token_logps = logps.gather(1, targets[:, None])[:, 0]
    return float(token_logps[len(prompt_ids) - 1 :].sum())


def test_pair_metrics_by_hand() -> None:
    from align.stages.dpo import pair_metrics

    # rows: [log π(c), log π(r), log π_ref(c), log π_ref(r)]
    rows = torch.tensor([
        [-1.0, -5.0, -2.0, -4.0],  # margin β((−1+2) − (−5+4)) = 0.5·2 = 1.0 > 0; π prefers c
        [-3.0, -1.0, -3.0, -1.0],  # margin 0: a tie counts ½; π prefers r
        [-2.0, -2.5, -1.0, -3.0],  # margin 0.5·((−1) − (0.5)) = −0.75; π prefers c
    ])  # fmt: skip
    metrics = pair_metrics(rows, beta=0.5)
    assert metrics["eval_reward_accuracy"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-4)
    assert metrics["eval_reward_margin"] == pytest.approx((1.0 + 0.0 - 0.75) / 3, abs=1e-4)
    assert metrics["eval_logp_accuracy"] == pytest.approx(2 / 3, abs=1e-4)


def test_every_loss_type_trl_ships_is_accepted() -> None:
    import dataclasses
    import re

    from trl import DPOConfig

    from align.stages.dpo import DpoLoss

    (field,) = [f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type"]
    shipped = re.findall(r"`'(\w+)'`", field.metadata["help"].split("If multiple")[0])
    assert shipped and set(typing.get_args(DpoLoss)) == set(shipped)
    stages = "".join(f"  - {{name: {loss}, type: dpo, dataset: {PAIRS}, loss_type: {loss}"
                     + (", label_smoothing: 0.001" if loss == "exo_pair" else "") + "}\n" for loss in shipped)
    recipe = load_recipe_text(BAD.split("  - name")[0] + stages)
    assert [stage.loss_type for stage in recipe.stages] == [[loss] for loss in shipped]
    mixed = load_recipe_text(BAD.replace("DATA", PAIRS) + "    loss_type: [sigmoid, bco_pair, sft]\n"
                             "    loss_weights: [0.8, 0.2, 1.0]\n")  # MPO
    assert mixed.stages[0].loss_type == ["sigmoid", "bco_pair", "sft"]


def test_reference_is_the_starting_model_merged_from_an_adapter(tmp_path: Path) -> None:
    """A starting model that is an adapter folder is merged in memory, and its config still names the
    adapter's base: TRL's own fallback would train against that base. The stage's reference must
    give the starting model's logits, not the base's."""
    from align.stages.dpo import Config, build_trainer

    start_spec = adapter_starting_model(tmp_path)
    config = Config(name="dpo", model=start_spec, seed=0, max_length=64,
                    dataset={"path": "align:arithmetic-preferences", "num_examples": 8})  # fmt: skip
    trainer = build_trainer(config, stage_context(tmp_path))
    assert_reference_is(trainer, start_spec)


def adapter_starting_model(tmp_path: Path) -> Any:
    """A LoRA adapter folder on align:tiny with random (non-zero) weights: a starting model whose
    config, once merged in memory, still names the base."""
    from peft import LoraConfig, get_peft_model

    from align.models import load_causal_lm, load_tokenizer
    from align.recipe.schema import ModelSpec

    torch.manual_seed(0)
    base_spec = tiny()
    adapter = get_peft_model(load_causal_lm(base_spec), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                    init_lora_weights=False, task_type="CAUSAL_LM"))
    adapter.save_pretrained(tmp_path / "adapter")
    load_tokenizer(base_spec).save_pretrained(tmp_path / "adapter")
    return ModelSpec(name_or_path=str(tmp_path / "adapter"))


def stage_context(tmp_path: Path) -> StageContext:
    (tmp_path / "out").mkdir(exist_ok=True)
    return StageContext(tmp_path, tmp_path / "out", tmp_path, 0, MetricsWriter(tmp_path / "metrics.jsonl"))


def assert_reference_is(trainer: Any, start_spec: Any) -> None:
    """The trainer's reference gives the starting model's logits, not those of the adapter's base,
    which is what TRL would have rebuilt from `_name_or_path`."""
    from trl.trainer.utils import create_model_from_path, get_config_model_id

    from align.models import load_causal_lm

    base_spec = tiny()
    ids = torch.tensor([[5, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        reference = trainer.ref_model(input_ids=ids).logits
        start = load_causal_lm(start_spec)(input_ids=ids).logits
        base = load_causal_lm(base_spec)(input_ids=ids).logits
        trl_fallback = create_model_from_path(get_config_model_id(trainer.model.config))(input_ids=ids).logits
    assert not torch.allclose(start, base, atol=1e-3)  # the adapter changes the model
    torch.testing.assert_close(trl_fallback, base)  # what TRL alone would have used: the base
    torch.testing.assert_close(reference, start)  # what the stage uses: the starting model
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())


def test_lora_reference_is_the_disabled_adapter_without_a_copy(tmp_path: Path) -> None:
    from accelerate.utils import is_peft_model

    from align.models import load_causal_lm
    from align.stages.dpo import Config, _reference_logps, build_trainer, completion_logps

    config = Config(name="dpo", model=tiny(), seed=0, max_length=64, lora={"r": 4, "lora_alpha": 8},
                    dataset={"path": "align:arithmetic-preferences", "num_examples": 8})  # fmt: skip
    trainer = build_trainer(config, stage_context(tmp_path))
    assert trainer.ref_model is None and is_peft_model(trainer.model)
    # Move the adapter away from zero, so that "disabled" and "enabled" differ.
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    plain = load_causal_lm(tiny())
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(plain)
    with torch.no_grad():
        reference = _reference_logps(trainer, batch)
        policy = completion_logps(trainer.model, batch)
        start = completion_logps(plain, batch)
    torch.testing.assert_close(reference, start)
    assert not torch.allclose(policy, start, atol=1e-3)


def test_short_run_metrics_match_a_plain_forward_pass(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.embedded import embedded_model_path
    from align.embedded.preferences import make_preference_dataset

    metrics, model_dir, rows = train(tmp_path)
    assert metrics["steps"] == 8 and metrics["num_processes"] == 1 and metrics["mixed_precision"] == "no"
    assert metrics["eval_pairs"] == 24
    # Before the first step the policy is the reference: every implicit-reward margin is 0.
    assert metrics["eval_reward_accuracy_before"] == 0.5 and metrics["eval_reward_margin_before"] == 0.0
    assert metrics["reference_logp_max_diff"] == 0.0
    assert metrics["eval_reward_accuracy_after"] > 0.5 and metrics["eval_reward_margin_after"] > 0.0
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 8]
    assert evals[1]["eval_reward_accuracy"] == metrics["eval_reward_accuracy_after"]
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen"} <= set(next(r for r in rows if r["kind"] == "train"))

    # The same figures from the saved artifact and the starting model, scored independently.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(embedded_model_path("align:tiny")).eval()
    pairs = make_preference_dataset("align:arithmetic-preferences", "test", 24, seed=0, kinds="malformed,truncated")
    margins, prefers_chosen = [], []
    for row in pairs:
        pol = [sequence_logp(policy, tokenizer, row["prompt"], row[side]) for side in ("chosen", "rejected")]
        ref = [sequence_logp(reference, tokenizer, row["prompt"], row[side]) for side in ("chosen", "rejected")]
        margins.append(0.1 * ((pol[0] - ref[0]) - (pol[1] - ref[1])))
        prefers_chosen.append(pol[0] > pol[1])
    accuracy = sum((m > 0) + 0.5 * (m == 0) for m in margins) / len(margins)
    assert metrics["eval_reward_accuracy_after"] == pytest.approx(accuracy, abs=1e-4)
    assert metrics["eval_reward_margin_after"] == pytest.approx(sum(margins) / len(margins), abs=2e-3)
    assert metrics["eval_logp_accuracy_after"] == pytest.approx(sum(prefers_chosen) / len(margins), abs=1e-4)


def test_lora_on_rankings_and_precomputed_reference(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    metrics, model_dir, _ = train(
        tmp_path,
        "stages.dpo.dataset={path: 'align:arithmetic-rankings', split: train, num_examples: 48}",
        "stages.dpo.eval_dataset={path: 'align:arithmetic-rankings', split: test, num_examples: 4}",
        "stages.dpo.lora={r: 8, lora_alpha: 16, merge: true}",
        "stages.dpo.precompute_ref_log_probs=true",
        "stages.dpo.max_steps=4",
    )
    assert metrics["eval_pairs"] == 4 * 6  # every ranking of 4 became C(4,2) pairs
    assert metrics["reference_logp_max_diff"] == 0.0 and metrics["eval_reward_accuracy_before"] == 0.5
    assert math.isfinite(metrics["eval_reward_margin_after"]) and metrics["eval_reward_margin_after"] != 0.0
    assert not (model_dir / "adapter_config.json").exists()  # merged: a full checkpoint
    merged = AutoModelForCausalLM.from_pretrained(model_dir)
    assert merged.config.vocab_size == AutoModelForCausalLM.from_pretrained(tiny().name_or_path).config.vocab_size


def test_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    # Mixed precision as on a GPU: fp32 master weights, bf16 autocast (torch runs it on CPU).
    metrics, model_dir, rows = train(tmp_path, "stages.dpo.bf16=true", "stages.dpo.max_steps=4")
    assert metrics["mixed_precision"] == "bf16"
    losses = [r["loss"] for r in rows if r["kind"] == "train" and "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    assert metrics["reference_logp_max_diff"] == 0.0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(model_dir).dtype == torch.float32


def test_two_process_ddp_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Real DDP over gloo (field notes: ACCELERATE_USE_CPU + --multi_gpu; plain --cpu starts one process).
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    metrics, model_dir, rows = train(
        tmp_path, "stages.dpo.launcher={type: accelerate, num_processes: 2, extra_args: [--multi_gpu]}",
        "stages.dpo.max_steps=4")
    assert metrics["num_processes"] == 2  # the world size the trainer's accelerator ran with
    assert metrics["eval_pairs"] == 24  # the held-out pairs split between the ranks, gathered back once each
    assert metrics["reference_logp_max_diff"] == 0.0
    losses = [r["loss"] for r in rows if r["kind"] == "train" and "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    assert (model_dir / "config.json").exists()


PAIRS = '{path: "align:arithmetic-preferences", num_examples: 8}'
BAD = """\
name: bad
model: align:tiny
stages:
  - name: dpo
    type: dpo
    dataset: DATA
"""


def problems_of(text: str) -> dict[str, str]:
    with pytest.raises(RecipeError) as caught:
        load_recipe_text(text)
    return {".".join(map(str, p.path)): p.message for p in caught.value.problems}


def test_data_without_pairs_or_rankings_is_rejected_at_its_key() -> None:
    problems = problems_of(BAD.replace("DATA", '{path: "align:arithmetic", num_examples: 8}'))
    assert list(problems) == ["stages.0.dataset.path"]
    assert "chosen+rejected" in problems["stages.0.dataset.path"]


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ("    loss_type: exo_pair\n", "stages.0.label_smoothing", "exo_pair needs label_smoothing > 0"),
        ("    loss_type: [sigmoid, sft]\n    loss_weights: [1.0]\n", "stages.0.loss_weights", "1 weights for 2"),
        ("    loss_type: bco_pair\n    f_divergence_type: js_divergence\n", "stages.0.f_divergence_type", "bco_pair"),
        ("    lora: {r: 4}\n    sync_ref_model: true\n", "stages.0.sync_ref_model", "disabled adapter"),
        ("    lora: {r: 4, target_modules: [q_proj, lm_head]}\n", "stages.0.lora.target_modules", "lm_head"),
        ("    loss_type: dpo\n", "stages.0.loss_type.0", "Input should be 'sigmoid', 'hinge'"),
        ("    label_smoothing: 0.5\n", "stages.0.label_smoothing", "less than 0.5"),
        ("    ld_alpha: 2.0\n", "stages.0.ld_alpha", "[0, 1]"),
        ("    betta: 0.2\n", "stages.0.betta", "did you mean 'beta'"),
        ("    precompute_ref_batch_size: lots\n", "stages.0.precompute_ref_batch_size", "trl:DPOConfig"),
    ],
)
def test_bad_settings_are_rejected_with_their_key(extra: str, key: str, words: str) -> None:
    problems = problems_of(BAD.replace("DATA", PAIRS) + extra)
    assert key in problems, problems
    assert words in problems[key]
