"""Shared model loading: chat-template overrides, local folders, model checks without the network."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.models import load_tokenizer, model_spec_problem, resolve_model_path
from align.recipe.schema import ModelSpec

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


@pytest.mark.parametrize("as_file", [False, True])
def test_chat_template_override(tmp_path: Path, as_file: bool) -> None:
    value = TEMPLATE
    if as_file:
        (tmp_path / "t.jinja").write_text(TEMPLATE)
        value = str(tmp_path / "t.jinja")
    tokenizer = load_tokenizer(ModelSpec(name_or_path="align:tiny", chat_template=value))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "[user] hi\n"
    assert tokenizer.padding_side == "left"


def test_embedded_and_local_paths_resolve(tmp_path: Path) -> None:
    built = Path(resolve_model_path("align:tiny"))
    assert (built / "config.json").exists()
    assert resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert resolve_model_path(str(built)) == str(built.resolve())


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("align:tiny", None),
        ("Qwen/Qwen2.5-0.5B", None),
        ("align:nope", "unknown embedded model"),
        ("./no/such/dir", "model folder not found"),
        ("a/b/c", "model folder not found"),
        ("bad name!", "neither an existing folder nor a hub id"),
    ],
)
def test_model_spec_problem(tmp_path: Path, name: str, fragment: str | None) -> None:
    problem = model_spec_problem(ModelSpec(name_or_path=name), tmp_path)
    assert (problem is None) if fragment is None else (fragment in (problem or ""))


def test_folder_without_config_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in (model_spec_problem(ModelSpec(name_or_path=str(tmp_path / "empty")), tmp_path) or "")


# ---------------------------------------------------------------- QLoRA reaches every training stage


class _Quantised(Exception):
    """Raised by the stand-in `from_pretrained` when it is asked for a 4-bit model."""


@pytest.fixture
def record_quantised_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Loads with a `quantization_config` are recorded (class name) and stopped; others load for real."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    seen: list[str] = []
    for cls in (AutoModelForCausalLM, AutoModelForSequenceClassification):
        real = cls.from_pretrained

        def fake(*args, _real=real, _name=cls.__name__, **kwargs):  # type: ignore[no-untyped-def]
            quantization = kwargs.get("quantization_config")
            if quantization is not None:
                assert quantization.load_in_4bit
                seen.append(_name)
                raise _Quantised(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", fake)
    return seen


QLORA = {"r": 4, "load_in_4bit": True}
PROMPTS = {"path": "align:arithmetic", "num_examples": 8}
STAGES = {
    "sft": {"dataset": PROMPTS, "lora": QLORA},
    "reward_model": {"dataset": {"path": "align:arithmetic-preferences", "num_examples": 8}, "lora": QLORA},
    "grpo": {"dataset": PROMPTS, "rewards": [{"rule": "format"}], "lora": QLORA, "per_device_train_batch_size": 8},
    "ppo": {"dataset": PROMPTS, "rewards": [{"rule": "format"}], "lora": QLORA},
    "ppo-critic": {"dataset": PROMPTS, "rewards": [{"rule": "format"}], "value_lora": QLORA},
    "distill": {"dataset": {"path": "align:arithmetic", "num_examples": 4}, "lora": QLORA, "traces": "dataset"},
    "distill-logit": {"dataset": {"path": "align:arithmetic", "num_examples": 4}, "lora": QLORA, "traces": "dataset",
                      "method": "logit"},
}
EXPECTED = {"reward_model": "AutoModelForSequenceClassification", "ppo-critic": "AutoModelForSequenceClassification"}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_load_in_4bit_reaches_the_loader(tmp_path: Path, stage: str, record_quantised_loads: list[str]) -> None:
    from align.artifacts import MetricsWriter, StageContext
    from align.stages import stage_module

    stage_type = stage.split("-")[0]
    module = stage_module(stage_type)
    config = module.Config.model_validate({"name": "s", "type": stage_type, "model": "align:tiny", "seed": 0,
                                           **STAGES[stage]})
    ctx = StageContext(tmp_path, tmp_path, tmp_path, 0, MetricsWriter(tmp_path / "metrics.jsonl"))
    with pytest.raises(_Quantised):
        module.run(config, ctx)
    assert record_quantised_loads == [EXPECTED.get(stage, "AutoModelForCausalLM")]


def test_a_new_score_head_is_drawn_from_the_stage_seed() -> None:
    """Two fresh loads of a causal LM as a reward/value model get the same head for one seed (the
    run's reward model and critic follow from the recipe's seed), and the global RNG is untouched."""
    import torch

    from align.models import load_sequence_classifier, load_trainable

    spec = ModelSpec(name_or_path="align:tiny")
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    heads = [load_sequence_classifier(spec, seed=7).score.weight for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(heads[0], heads[1])
    assert not torch.equal(heads[0], load_sequence_classifier(spec, seed=8).score.weight)
    trainable = load_trainable(spec, task="sequence_classification", seed=7).model
    assert torch.equal(trainable.score.weight, heads[0])


def test_ppo_rejects_a_critic_with_another_vocabulary(tmp_path: Path) -> None:
    """The critic (value_model, else reward_model) reads the policy's token ids."""
    import json
    import shutil

    from align.embedded import embedded_model_path
    from tests.recipe_problems import recipe_problems

    other = tmp_path / "other-vocab"
    shutil.copytree(embedded_model_path("align:tiny"), other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] += 8
    (other / "config.json").write_text(json.dumps(config))
    text = f"""\
name: v
model: align:tiny
stages:
  - name: ppo
    type: ppo
    dataset: {{path: "align:arithmetic", num_examples: 8}}
    reward_model: {other}
"""
    problems = recipe_problems(tmp_path, text)
    assert "vocab_size 384 ≠ critic vocab_size 392" in problems["stages[0].reward_model"]
    assert "set value_model" in problems["stages[0].reward_model"]
    problems = recipe_problems(tmp_path, text.replace("reward_model:", "rewards: [{rule: format}]\n    value_model:"))
    assert "must share a vocabulary" in problems["stages[0].value_model"]
