"""The grpo stage: recipe checks before training, and a short real run on the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from align.artifacts import read_metrics
from align.recipe.validate import load_recipe
from align.runner import StageFailed, run_recipe
from tests.recipe_problems import recipe_problems

RECIPE = """\
name: grpo-test
seed: 0
model: align:tiny
stages:
  - name: grpo
    type: grpo
    dataset: {path: "align:arithmetic", split: train, num_examples: 32}
    rewards:
      - {rule: accuracy, weight: 1.0}
      - {rule: format, weight: 0.5}
    learning_rate: 1.0e-4
    max_steps: 3
    per_device_train_batch_size: 8
    num_generations: 4
    max_completion_length: 16
    logging_steps: 1
"""


def problems(tmp_path: Path, *overrides: str, text: str = RECIPE) -> dict[str, str]:
    return recipe_problems(tmp_path, text, *overrides)


@pytest.mark.parametrize(
    ("override", "path", "fragment"),
    [
        ("stages.grpo.rewards=[{rule: acuracy}]", "stages[0].rewards[0].rule", "Did you mean 'accuracy'?"),
        ("stages.grpo.rewards=[{rule: format, params: {think_tagg: t}}]", "stages[0].rewards[0].params", "think_tag"),
        ("stages.grpo.rewards=[{rule: format, params: {prefilled_think: maybe}}]", "stages[0].rewards[0].params", "prefilled_think"),
        ("stages.grpo.rewards=[]", "stages[0]", "GRPO needs a reward"),
        ("stages.grpo.num_generations=3", "stages[0].per_device_train_batch_size", "divisible by num_generations (3)"),
        ("stages.grpo.num_generations=1", "stages[0].num_generations", "greater than or equal to 2"),
        ("stages.grpo.loss_type=ppo", "stages[0].loss_type", "'dapo'"),
        ("stages.grpo.epsilon_high=0.1", "stages[0].epsilon_high", "must be ≥ epsilon"),
        ("stages.grpo.use_vllm=true", "stages[0].use_vllm", "vLLM is not installed"),
        ("stages.grpo.rewards=[{rule: nowhere.py:fn}]", "stages[0].rewards[0].rule", "nowhere.py"),
    ],
)
def test_bad_grpo_config_is_rejected(tmp_path: Path, override: str, path: str, fragment: str) -> None:
    found = problems(tmp_path, override)
    assert path in found, found
    assert fragment in found[path]


def test_dataset_must_have_the_columns_rules_read(tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "What is 1+1?"}\n')
    found = problems(tmp_path, f"stages.grpo.dataset.path={data}")
    assert "has no column 'solution' (reward rule 'accuracy' reads it)" in found["stages[0].dataset.path"]


def test_custom_rule_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "my_rules.py").write_text(
        "def short(completions, *, limit: int = 10, **kwargs):\n"
        "    '''1.0 when the completion is at most `limit` characters.'''\n"
        "    return [float(len(str(c)) <= limit) for c in completions]\n"
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    recipe = load_recipe(path, [f"stages.grpo.rewards=[{{rule: {tmp_path}/my_rules.py:short, params: {{limit: 5}}}}]"])
    assert recipe.stage("grpo").rewards[0].params == {"limit": 5}
    found = problems(tmp_path, f"stages.grpo.rewards=[{{rule: {tmp_path}/my_rules.py:short, params: {{limit: five}}}}]")
    assert "limit" in found["stages[0].rewards[0].params"]


def test_short_grpo_run_logs_rewards_and_saves_a_loadable_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    manifest = run_recipe(load_recipe(path), tmp_path / "run", report=lambda _: None)
    record = manifest.record("grpo")
    assert record.status == "complete"
    assert record.metrics["steps"] == 3
    assert record.metrics["accuracy_failures"] == 0 and record.metrics["format_failures"] == 0
    stage_dir = tmp_path / "run" / "grpo"
    steps = [row for row in read_metrics(stage_dir / "metrics.jsonl", "train") if "reward" in row]
    assert [row["step"] for row in steps] == [1, 2, 3]
    for key in ("rewards/accuracy/mean", "rewards/format/mean", "reward_std", "frac_reward_zero_std", "entropy",
                "completions/mean_length", "clip_ratio/region_mean"):
        assert key in steps[0], key
    samples = read_metrics(stage_dir / "metrics.jsonl", "sample")
    assert samples and set(samples[0]["rewards"]) == {"accuracy", "format"}
    assert samples[0]["prompt"].startswith("What is")
    AutoModelForCausalLM.from_pretrained(stage_dir / "model")


def test_logged_samples_carry_the_scores_of_their_own_completions(tmp_path: Path) -> None:
    """logging_steps 3 spans three generation rounds: each logged completion must come with the score
    its own text got, not the score of a completion from another round."""
    (tmp_path / "rules.py").write_text(
        "def length_score(completions, **kwargs):\n"
        "    '''The completion's length in characters, so a score names its completion.'''\n"
        "    return [float(len(c[0]['content'] if isinstance(c, list) else c)) for c in completions]\n"
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    recipe = load_recipe(path, [f"stages.grpo.rewards=[{{rule: {tmp_path}/rules.py:length_score}}]",
                                "stages.grpo.logging_steps=3", "stages.grpo.temperature=1.5",
                                "stages.grpo.save_strategy=no"])  # a checkpoint would log too
    run_recipe(recipe, tmp_path / "run", report=lambda _: None)
    samples = read_metrics(tmp_path / "run" / "grpo" / "metrics.jsonl", "sample")
    assert samples and {s["step"] for s in samples} == {3}
    assert all(s["rewards"]["length_score"] == len(s["completion"]) for s in samples), samples


def test_the_kl_reference_after_an_unmerged_lora_sft_is_the_sft_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GRPO with beta > 0 from an adapter artifact: TRL rebuilds its reference from the policy's
    `config._name_or_path`; it must hold the SFT model (base + adapter), not the base alone."""
    import torch
    from trl import GRPOTrainer

    from align.models import load_causal_lm
    from align.recipe.schema import ModelSpec

    references: list[torch.nn.Module] = []
    real_init = GRPOTrainer.__init__

    def keep_reference(self: GRPOTrainer, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)
        references.append(self.ref_model)

    monkeypatch.setattr(GRPOTrainer, "__init__", keep_reference)
    text = """\
name: kl
seed: 0
model: align:tiny
stages:
  - name: sft
    type: sft
    dataset: {path: "align:arithmetic", num_examples: 64}
    lora: {r: 8, lora_alpha: 16, lora_dropout: 0.0}
    learning_rate: 5.0e-3
    max_steps: 8
    per_device_train_batch_size: 8
  - name: grpo
    type: grpo
    model: ${stages.sft.model}
    dataset: {path: "align:arithmetic", num_examples: 16}
    rewards: [{rule: format}]
    beta: 0.04
    max_steps: 1
    per_device_train_batch_size: 4
    num_generations: 2
    max_completion_length: 8
"""
    (tmp_path / "recipe.yaml").write_text(text)
    manifest = run_recipe(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "run", report=lambda _: None)
    assert manifest.record("grpo").status == "complete"
    sft_dir = tmp_path / "run" / "sft" / "model"
    assert (sft_dir / "adapter_config.json").exists()  # unmerged
    (reference,) = references
    ids = torch.tensor([[5, 17, 30, 44, 12, 9]])
    sft_model, base = load_causal_lm(ModelSpec(name_or_path=str(sft_dir))), load_causal_lm(ModelSpec(name_or_path="align:tiny"))
    with torch.no_grad():
        ref_logits = reference(input_ids=ids).logits
        assert torch.allclose(ref_logits, sft_model(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(ref_logits, base(input_ids=ids).logits, atol=1e-3)  # the adapter did move it
    assert not (tmp_path / "run" / "grpo" / "trainer").exists()  # the merged copy went with the scratch files


# ---------------------------------------------------------------- misbehaving rules and bad rows at run time

MISBEHAVING_RULES = '''
def nothing(completions, **kwargs):
    """Scores no sample (None everywhere): TRL then logs the step's reward as None."""
    return [None] * len(completions)


def boom(completions, **kwargs):
    """Raises on every call."""
    raise RuntimeError("boom")
'''


def test_an_all_none_rule_and_a_skipped_long_prompt_still_give_a_model(tmp_path: Path) -> None:
    (tmp_path / "rules.py").write_text(MISBEHAVING_RULES)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+1?"}) + "\n" for i in range(7))
                    + json.dumps({"prompt": "What is " + "1+" * 60 + "1?"}) + "\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    recipe = load_recipe(path, [f"stages.grpo.rewards=[{{rule: {tmp_path}/rules.py:nothing}}]", "stages.grpo.max_steps=2",
                                f"stages.grpo.dataset={{path: {data}, on_bad_rows: skip}}", "stages.grpo.max_prompt_length=40"])
    manifest = run_recipe(recipe, tmp_path / "run", report=lambda _: None)
    record = manifest.record("grpo")
    assert record.status == "complete", record.error
    assert record.metrics["steps"] == 2 and record.metrics["nothing_failures"] == 0
    assert "first_reward" not in record.metrics  # every logged reward was None: nothing to report, nothing lost
    assert record.metrics["dataset_skipped_rows"] == 1  # the long prompt
    rows = read_metrics(tmp_path / "run" / "grpo" / "metrics.jsonl", "train")
    assert [row["reward"] for row in rows if "reward" in row] == [None, None]
    assert (tmp_path / "run" / "grpo" / "model" / "config.json").exists()


def test_a_prompt_over_max_prompt_length_fails_before_training(tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "What is 1+1?", "solution": "2"}) + "\n"
                    + json.dumps({"prompt": "What is " + "1+" * 60 + "1?", "solution": "61"}) + "\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    recipe = load_recipe(path, [f"stages.grpo.dataset={data}", "stages.grpo.max_prompt_length=40"])
    with pytest.raises(StageFailed) as info:
        run_recipe(recipe, tmp_path / "run", report=lambda _: None)
    assert re.search(rf"{re.escape(str(data))}:2: column 'prompt' is \d+ tokens long, more than max_prompt_length \(40\)",
                     str(info.value)), info.value
    assert read_metrics(tmp_path / "run" / ".grpo.partial" / "metrics.jsonl", "train") == []


def test_a_rule_that_keeps_failing_stops_the_stage_naming_it(tmp_path: Path) -> None:
    (tmp_path / "rules.py").write_text(MISBEHAVING_RULES)
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    recipe = load_recipe(path, [f"stages.grpo.rewards=[{{rule: {tmp_path}/rules.py:boom}}, {{rule: format}}]",
                                "stages.grpo.rule_failure_min_samples=8"])
    with pytest.raises(StageFailed) as info:
        run_recipe(recipe, tmp_path / "run", report=lambda _: None)
    assert re.search(r"RuleFailureError: reward rule 'boom' failed on (\d+) of the \1 samples it scored \(100%, more "
                     r"than max_rule_failure_rate 0.1\); last error: RuntimeError: boom", str(info.value)), info.value
