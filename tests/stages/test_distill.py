"""The distill stage: recipe checks (vocabulary compatibility for logit KD, method-specific keys),
short real runs of sequence-level and logit-level distillation into the smaller embedded student, and
the R1 recipe validated with its models pointed at the tiny ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from align.recipe.errors import RecipeError
from align.recipe.validate import load_recipe
from align.runner import run_recipe
from tests.recipe_problems import recipe_problems

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

RECIPE = """\
name: distill-test
seed: 0
model: align:tiny
stages:
  - name: sft
    type: sft
    dataset: {path: "align:arithmetic", split: train, num_examples: 8}
    max_steps: 1
  - name: distill
    type: distill
    teacher: ${stages.sft.model}
    dataset: {path: "align:arithmetic", split: train, num_examples: 8}
    max_steps: 1
"""


def problems(tmp_path: Path, *overrides: str) -> dict[str, str]:
    return recipe_problems(tmp_path, RECIPE, *overrides)


def student_copy(tmp_path: Path, *, extra_vocab: int = 0, swap_tokens: bool = False) -> Path:
    """The embedded student with a different output size or a different token → id map."""
    from align.embedded import embedded_model_path

    target = tmp_path / f"student-{extra_vocab}-{swap_tokens}"
    shutil.copytree(embedded_model_path("align:tiny-student"), target)
    if extra_vocab:
        config = json.loads((target / "config.json").read_text())
        config["vocab_size"] += extra_vocab
        (target / "config.json").write_text(json.dumps(config))
    if swap_tokens:
        tokenizer = json.loads((target / "tokenizer.json").read_text())
        vocab = tokenizer["model"]["vocab"]
        vocab["!"], vocab['"'] = vocab['"'], vocab["!"]
        (target / "tokenizer.json").write_text(json.dumps(tokenizer))
    return target


@pytest.mark.parametrize(
    ("overrides", "path", "fragment"),
    [
        (["stages.distill.method=feature"], "stages[1].method", "'sequence'"),
        (["stages.distill.traces=teacher_only"], "stages[1].traces", "'teacher'"),
        (["stages.distill.lmbda=0.5"], "stages[1].lmbda", "only applies to method: logit"),
        (["stages.distill.max_new_tokens=64"], "stages[1].max_new_tokens", "only applies to method: logit"),
        (["stages.distill.teacher_model_name_or_path=x"], "stages[1].teacher_model_name_or_path", "set from `teacher:`"),
        (["stages.distill.method=logit", "stages.distill.packing=true"], "stages[1].packing", "cannot pack"),
        (["stages.distill.method=logit", "stages.distill.lmbda=1.0", "stages.distill.temperature=0"],
         "stages[1].temperature", "temperature > 0"),
        (["stages.distill.method=logit", "stages.distill.beta=1.5"], "stages[1].beta", "less than or equal to 1"),
        (["stages.distill.num_generations=4", "stages.distill.temperature=0"], "stages[1].num_generations", "greedy"),
        (["stages.distill.use_vllm=true"], "stages[1].use_vllm", "vLLM is not installed"),
        (["stages.distill.student=./no/such/student"], "stages[1].student.name_or_path", "not found"),
        (["stages.distill.student=align:huge"], "stages[1].student.name_or_path", "unknown embedded model"),
        (["stages.distill.lernig_rate=1e-3"], "stages[1].lernig_rate", "unknown key"),
    ],
)
def test_bad_config_is_rejected(tmp_path: Path, overrides: list[str], path: str, fragment: str) -> None:
    found = problems(tmp_path, *overrides)
    assert path in found, found
    assert fragment in found[path]


@pytest.mark.parametrize(("extra_vocab", "swap", "fragment"), [(16, False, "vocab_size 384 ≠ student vocab_size 400"),
                                                               (0, True, "map tokens to ids differently")])
def test_logit_kd_needs_a_shared_vocabulary(tmp_path: Path, extra_vocab: int, swap: bool, fragment: str) -> None:
    student = student_copy(tmp_path, extra_vocab=extra_vocab, swap_tokens=swap)
    # The teacher is `${stages.sft.model}`: the check follows it back to align:tiny.
    found = problems(tmp_path, "stages.distill.method=logit", f"stages.distill.student={student}")
    assert fragment in found["stages[1].student"]
    # Sequence-level distillation only needs text: any tokenizer will do.
    path = tmp_path / "recipe.yaml"
    assert load_recipe(path, [f"stages.distill.student={student}"]).stage("distill").method == "sequence"


def test_defaults_and_the_shared_vocabulary_of_the_embedded_pair(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    stage = load_recipe(path, ["stages.distill.method=logit"]).stage("distill")
    assert stage.student.name_or_path == "align:tiny-student"
    assert (stage.lmbda, stage.beta, stage.seq_kd, stage.traces) == (0.0, 0.0, False, "auto")


def test_traces_from_the_dataset_need_completions(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 1+1?"}\n')
    found = problems(tmp_path, f"stages.distill.dataset={prompts}", "stages.distill.traces=dataset")
    assert "needs columns messages or prompt+completion" in found["stages[1].dataset.path"]


# ------------------------------------------------------------------------------------------------
# short real runs
# ------------------------------------------------------------------------------------------------

RUN = """\
name: distill-run
seed: 0
model: align:tiny
stages:
  - name: sequence
    type: distill
    student: align:tiny-student
    dataset: {path: "align:arithmetic", split: train, num_examples: 640}
    learning_rate: 3.0e-3
    max_steps: 40
    per_device_train_batch_size: 16
    logging_steps: 5
    max_length: 96
  - name: teacher_traces
    type: distill
    teacher: align:tiny
    dataset: {path: "align:arithmetic", split: train, num_examples: 12}
    traces: teacher
    num_generations: 2
    temperature: 1.0
    max_completion_length: 8
    drop_truncated: false
    max_steps: 2
    per_device_train_batch_size: 4
  - name: logit
    type: distill
    method: logit
    teacher: align:tiny
    dataset: ${stages.sequence.traces}
    learning_rate: 3.0e-3
    max_steps: 25
    per_device_train_batch_size: 16
    logging_steps: 5
    max_length: 96
"""


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("distill")
    # `logit` reads the sequence stage's traces: gold rows when the traces came from the dataset, so
    # it gets its own copy of them.
    text = RUN.replace("${stages.sequence.traces}", str(root / "gold.jsonl"))
    from align.embedded import make_task_dataset

    make_task_dataset("align:arithmetic", "train", 400, seed=1).to_json(root / "gold.jsonl")
    (root / "recipe.yaml").write_text(text)
    manifest = run_recipe(load_recipe(root / "recipe.yaml"), root / "run", report=lambda _: None)
    metrics = {}
    for name in ("sequence", "teacher_traces", "logit"):
        record = manifest.record(name)
        assert record.status == "complete", record.error
        metrics[name] = record.metrics
    return root / "run", metrics


@pytest.mark.parametrize("stage", ["sequence", "logit"])
def test_student_is_smaller_learns_and_reloads(distill_run: tuple[Path, dict[str, dict[str, Any]]], stage: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from align.embedded import embedded_model_path

    run_dir, metrics = distill_run
    m = metrics[stage]
    assert m["student_params"] * 4 <= m["teacher_params"]
    assert m["student_teacher_param_ratio"] <= 0.25
    assert m["last_loss"] < 0.6 * m["first_loss"], m
    student = AutoModelForCausalLM.from_pretrained(run_dir / stage / "model")
    assert sum(p.numel() for p in student.parameters()) == m["student_params"]
    teacher_config = AutoConfig.from_pretrained(embedded_model_path("align:tiny"))
    assert student.config.hidden_size < teacher_config.hidden_size
    assert not (run_dir / stage / "trainer").exists()


def test_teacher_size_read_from_the_checkpoint_matches_the_loaded_model(
    distill_run: tuple[Path, dict[str, dict[str, Any]]],
) -> None:
    _, metrics = distill_run
    # sequence-level never loads the teacher (safetensors headers only); logit-level counts the loaded one
    assert metrics["sequence"]["teacher_params"] == metrics["logit"]["teacher_params"] > 0


def test_teacher_writes_the_traces(distill_run: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    from reward_rules.accuracy import accuracy

    run_dir, metrics = distill_run
    traces = [json.loads(line) for line in (run_dir / "teacher_traces" / "traces.jsonl").read_text().splitlines()]
    assert len(traces) == metrics["teacher_traces"]["num_traces"] == 12 * 2
    assert all(t["completion"][0]["role"] == "assistant" and t["prompt"][-1]["role"] == "user" for t in traces)
    assert {"solution", "difficulty"} <= set(traces[0])
    texts = [t["completion"][0]["content"] for t in traces]
    share = sum(v or 0.0 for v in accuracy(texts, solution=[t["solution"] for t in traces])) / len(traces)
    assert metrics["teacher_traces"]["trace_accuracy"] == round(share, 4)
    # When the traces are the dataset's own, nothing new is written.
    assert (run_dir / "sequence" / "traces.jsonl").read_text() == ""


# ------------------------------------------------------------------------------------------------
# recipes/r1.yaml
# ------------------------------------------------------------------------------------------------


def tiny_overrides(root: Path) -> list[str]:
    """Every model of recipes/r1.yaml pointed at a local tiny model with Qwen2.5-Math's context (4096
    positions, so the recipe's lengths are checked against the real model's); vLLM off (not
    installed here); the tiny tokenizer has no <|im_end|>, so no eos_token."""
    import yaml

    from tests.hub_fixtures import with_context

    tiny, student = with_context("align:tiny", root, 4096), with_context("align:tiny-student", root, 4096)
    data = yaml.safe_load((RECIPES / "r1.yaml").read_text())
    overrides = [f"model.name_or_path={tiny}", "model.dtype=float32", "model.eos_token=null"]
    for stage in data["stages"]:
        name = stage["name"]
        if stage.get("use_vllm"):
            overrides.append(f"stages.{name}.use_vllm=false")
        model = stage.get("model")
        if model is not None and "${" not in str(model):  # a hub model named on the stage itself
            overrides.append(f"stages.{name}.model={{name_or_path: {tiny}, dtype: float32}}")
        if stage["type"] == "distill":
            overrides.append(f"stages.{name}.student={{name_or_path: {student}, dtype: float32}}")
    return overrides


def test_r1_recipe_validates_with_tiny_models(tmp_path: Path) -> None:
    recipe = load_recipe(RECIPES / "r1.yaml", tiny_overrides(tmp_path))
    types = [s.type for s in recipe.stages]
    # the R1 chain, in order
    order = ["sft", "grpo", "rejection_sampling", "sft", "reward_model", "grpo", "distill", "distill"]
    trained = [t for t in types if t != "eval"]
    assert trained == order, trained
    assert types.count("eval") >= 4
    distills = [s for s in recipe.stages if s.type == "distill"]
    assert all(s.method == "sequence" for s in distills)
    assert all(s.dataset.path == "${stages.rejection_sampling.dataset}" for s in distills)
    rs = recipe.stage("rejection_sampling")
    assert rs.keep == "all_pass" and rs.mix_ratio == 0.25 and {r.rule for r in rs.rewards} >= {"accuracy", "format"}
    for stage in recipe.stages:
        if stage.type in ("sft", "grpo", "distill", "reward_model"):
            assert stage.launcher is not None and stage.launcher.type == "accelerate", stage.name


def test_r1_recipe_rejects_logit_distillation_into_a_mismatched_student(tmp_path: Path) -> None:
    student = student_copy(tmp_path, extra_vocab=8)
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("stages.distill_qwen_1p5b.student")]
    with pytest.raises(RecipeError) as info:
        load_recipe(RECIPES / "r1.yaml", [*overrides, "stages.distill_qwen_1p5b.method=logit",
                                          f"stages.distill_qwen_1p5b.student={student}"])
    assert any("share a vocabulary" in p.message for p in info.value.problems)
