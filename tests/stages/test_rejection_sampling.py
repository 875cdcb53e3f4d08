"""The rejection_sampling stage: the keep policies and filters on hand-made scores, recipe checks, and
a real run whose written dataset is re-scored independently with the rules."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from align.recipe.validate import load_recipe
from align.rewards import weighted_total
from align.runner import run_recipe
from align.stages.rejection_sampling import (
    KeepRules,
    Scored,
    judge,
    mix_count,
    passes_all,
    pick_pair,
    select_samples,
)
from tests.recipe_problems import recipe_problems

# ------------------------------------------------------------------------------------------------
# keep policies and filters, on fixed scores
# ------------------------------------------------------------------------------------------------


def scored(index: int, total: float, text: str | None = None, *, finished: bool = True, tokens: int = 10,
           language: float | None = None, **scores: float | None) -> Scored:  # fmt: skip
    return Scored(index, text if text is not None else f"sample {index}", tokens, finished, scores, total, language)


#  index:        0    1    2    3    4
#  accuracy:     1    1    0    1    None
#  format:       1    0    1    1    1
#  total:        1.5  1.0  0.5  1.5  0.5   (accuracy×1 + format×0.5)
SAMPLES = [
    scored(0, 1.5, accuracy=1.0, format=1.0),
    scored(1, 1.0, accuracy=1.0, format=0.0),
    scored(2, 0.5, accuracy=0.0, format=1.0),
    scored(3, 1.5, accuracy=1.0, format=1.0),
    scored(4, 0.5, accuracy=None, format=1.0),
]
BOTH = {"accuracy": 1.0, "format": 1.0}


@pytest.mark.parametrize(
    ("keep", "kwargs", "expected"),
    [
        ("all_pass", {"thresholds": BOTH}, [0, 3]),
        ("all_pass", {"thresholds": {"accuracy": 1.0}}, [0, 3, 1]),  # best first, ties by index
        ("all_pass", {"thresholds": {"format": 1.0}}, [0, 3, 2, 4]),
        ("all_pass", {"thresholds": {"accuracy": 0.0}}, [0, 3, 1, 2]),  # None never passes, even a 0 bar
        ("all_pass", {"thresholds": BOTH, "score_threshold": 2.0}, []),
        ("best_of_n", {}, [0]),
        ("best_of_n", {"score_threshold": 1.6}, []),
        ("top_k", {"keep_k": 3}, [0, 3, 1]),
        ("top_k", {"keep_k": 9}, [0, 3, 1, 2, 4]),
        ("top_k", {"keep_k": 3, "score_threshold": 1.2}, [0, 3]),
        ("threshold", {"score_threshold": 1.0}, [0, 3, 1]),
        ("threshold", {"score_threshold": 0.5}, [0, 3, 1, 2, 4]),
    ],
)
def test_keep_policies_on_fixed_scores(keep: Any, kwargs: dict[str, Any], expected: list[int]) -> None:
    assert select_samples(SAMPLES, keep, **kwargs) == expected


def test_unknown_policy_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown keep policy"):
        select_samples(SAMPLES, "majority")  # type: ignore[arg-type]


def test_passes_all_and_weighted_total() -> None:
    assert passes_all({"accuracy": 1.0, "format": 1.0}, BOTH)
    assert not passes_all({"accuracy": 1.0}, BOTH)  # a rule without a score fails
    assert not passes_all({"accuracy": 0.99, "format": 1.0}, BOTH)
    assert passes_all({"x": 0.3}, {})
    weights = {"accuracy": 1.0, "format": 0.5, "reward_model": 2.0}
    assert weighted_total({"accuracy": 1.0, "format": None, "reward_model": -0.25}, weights) == 0.5
    assert weighted_total({"unweighted": 5.0}, weights) == 0.0


def test_filters_run_before_the_policy_and_the_cap_after() -> None:
    samples = [
        scored(0, 1.5, "<think>a b</think>\n<answer>1</answer>", accuracy=1.0, format=1.0),
        scored(1, 1.5, "<think>a  b</think> \n <answer>1</answer> ", accuracy=1.0, format=1.0),  # same modulo spaces
        scored(2, 1.5, "truncated", finished=False, accuracy=1.0, format=1.0),
        scored(3, 1.5, "long", tokens=99, accuracy=1.0, format=1.0),
        scored(4, 1.5, "mixed", language=0.5, accuracy=1.0, format=1.0),
        scored(5, 1.5, "fine", language=None, accuracy=1.0, format=1.0),  # no letters: nothing to judge
        scored(6, 1.5, "also fine", language=0.97, accuracy=1.0, format=1.0),
        scored(7, 0.0, "wrong", accuracy=0.0, format=0.0),
    ]
    rules = KeepRules("all_pass", BOTH, max_tokens=50, min_language_share=0.95, max_per_prompt=2)
    kept, dropped = judge(samples, rules)
    assert kept == [0, 5]
    assert dropped == Counter({"duplicate": 1, "truncated": 1, "too_long": 1, "language": 1, "policy": 1, "cap": 1})
    everything = KeepRules("threshold", {}, score_threshold=-1.0, drop_truncated=False, dedupe=False)
    kept, dropped = judge(samples, everything)
    assert sorted(kept) == list(range(8)) and not dropped


def test_mix_count_hits_the_ratio() -> None:
    assert mix_count(600_000, 0.25) == 200_000  # R1's 600k reasoning + 200k non-reasoning
    assert mix_count(90, 0.1) == 10
    assert mix_count(10, 0.0) == 0
    assert mix_count(0, 0.5) == 0


def test_pairs_take_the_best_and_the_worst_when_far_enough_apart() -> None:
    rules = KeepRules(keep="all_pass", thresholds={})
    # SAMPLES totals 1.5, 1.0, 0.5, 1.5, 0.5: best 1.5 (index 0 before 3), worst 0.5 (index 4 after 2)
    assert pick_pair(SAMPLES, rules, margin=1.0) == ((0, 4), Counter({"unpaired": 3}))
    assert pick_pair(SAMPLES, rules, margin=1.01) == (None, Counter({"no_gap": 5}))
    # The filters run first: drop the truncated best and the duplicate of the worst.
    samples = [scored(0, 2.0, finished=False), scored(1, 1.5, "a"), scored(2, 0.0, "b"), scored(3, 0.5, " b "),
               scored(4, 1.0, "c")]
    pair, dropped = pick_pair(samples, rules, margin=1.5)
    assert pair == (1, 2) and dropped == Counter({"truncated": 1, "duplicate": 1, "unpaired": 1})
    # One sample left, or all tied: no pair.
    assert pick_pair(samples[:2], rules, margin=0.1) == (None, Counter({"truncated": 1, "no_gap": 1}))
    assert pick_pair([scored(0, 1.0, "x"), scored(1, 1.0, "y")], rules, margin=0.1)[0] is None


# ------------------------------------------------------------------------------------------------
# recipe checks
# ------------------------------------------------------------------------------------------------

RECIPE = """\
name: rs-test
seed: 0
model: align:tiny
stages:
  - name: rs
    type: rejection_sampling
    dataset: {path: "align:arithmetic", split: train, num_examples: 16}
    rewards:
      - {rule: accuracy}
      - {rule: format}
    num_generations: 2
    max_completion_length: 8
  - name: grpo
    type: grpo
    dataset: ${stages.rs.dataset}
    rewards: [{rule: accuracy}]
    num_generations: 2
    per_device_train_batch_size: 2
"""


def problems(tmp_path: Path, *overrides: str) -> dict[str, str]:
    return recipe_problems(tmp_path, RECIPE, *overrides)


@pytest.mark.parametrize(
    ("override", "path", "fragment"),
    [
        ("stages.rs.keep=majority", "stages[0].keep", "'all_pass'"),
        ("stages.rs.keep=threshold", "stages[0]", "needs score_threshold"),
        ("stages.rs.rewards=[]", "stages[0]", "nothing to score samples with"),
        ("stages.rs.thresholds={acuracy: 1.0}", "stages[0].thresholds.acuracy", "did you mean 'accuracy'?"),
        ("stages.rs.rewards=[{rule: accuracy}, {rule: accuracy}]", "stages[0].rewards", "distinct `name`"),
        ("stages.rs.keep_k=3", "stages[0].keep_k", "only applies to keep: top_k"),
        ("stages.rs.temperature=0", "stages[0].num_generations", "greedy"),
        ("stages.rs.language=klingon", "stages[0].language", "unknown language"),
        ("stages.rs.use_vllm=true", "stages[0].use_vllm", "vLLM is not installed"),
        ("stages.rs.mix_ratio=0.3", "stages[0]", "go together"),
        ("stages.rs.mix_ratio=1.0", "stages[0].mix_ratio", "less than 1"),
        ("stages.rs.rewards=[{rule: acuracy}]", "stages[0].rewards[0].rule", "Did you mean 'accuracy'?"),
        ("stages.rs.reward_model=./no/such/rm", "stages[0].reward_model.name_or_path", "not found"),
        ("stages.rs.num_generations=0", "stages[0].num_generations", "greater than 0"),
        ("stages.rs.pair_margin=1.0", "stages[0].pair_margin", "only applies to output: pairs"),
        (("stages.rs.output=pairs", "stages.rs.keep=best_of_n"), "stages[0].keep", "only applies to output: sft"),
        (("stages.rs.output=pairs", "stages.rs.num_generations=1"), "stages[0].num_generations", "at least 2 samples"),
        (("stages.rs.output=pairs", "stages.rs.pair_margin=0"), "stages[0].pair_margin", "greater than 0"),
        ("stages.rs.output=ranking", "stages[0].output", "'sft' or 'pairs'"),
    ],
)
def test_bad_config_is_rejected(tmp_path: Path, override: str | tuple[str, ...], path: str, fragment: str) -> None:
    found = problems(tmp_path, *((override,) if isinstance(override, str) else override))
    assert path in found, found
    assert fragment in found[path]


def test_mix_dataset_needs_sft_columns(tmp_path: Path) -> None:
    mix = tmp_path / "mix.jsonl"
    mix.write_text('{"question": "hi"}\n')
    found = problems(tmp_path, f"stages.rs.mix_dataset={mix}", "stages.rs.mix_ratio=0.2")
    assert "needs columns messages or prompt+completion" in found["stages[0].mix_dataset.path"]


def test_later_stages_see_the_written_columns(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    recipe = load_recipe(path)  # grpo's accuracy rule finds `solution` in rs's dataset
    from align.stages import stage_module

    columns = stage_module("rejection_sampling").output_columns(recipe.stage("rs"))
    assert columns == {"prompt", "completion", "solution", "difficulty", "source", "source_model", "sample_index",
                       "score", "scores"}
    pairs = stage_module("rejection_sampling").output_columns(load_recipe(path, ["stages.rs.output=pairs"]).stage("rs"))
    assert pairs == {"prompt", "chosen", "rejected", "solution", "difficulty", "source", "source_model", "chosen_index",
                     "rejected_index", "chosen_score", "rejected_score", "chosen_scores", "rejected_scores", "score_gap"}
    (tmp_path / "rules.py").write_text("def needs_tests(completions, test_cases, **kwargs):\n    return [0.0] * len(completions)\n")
    found = problems(tmp_path, f"stages.grpo.rewards=[{{rule: {tmp_path}/rules.py:needs_tests}}]")
    assert "no column 'test_cases'" in found["stages[1].dataset.path"]


def test_reward_model_only_needs_a_threshold_for_all_pass(tmp_path: Path) -> None:
    from align.embedded import embedded_model_path

    rm = embedded_model_path("align:tiny")
    found = problems(tmp_path, "stages.rs.rewards=[]", f"stages.rs.reward_model={rm}")
    assert "thresholds: {reward_model" in found["stages[0].keep"]
    path = tmp_path / "recipe.yaml"
    recipe = load_recipe(path, ["stages.rs.rewards=[]", f"stages.rs.reward_model={rm}", "stages.rs.keep=best_of_n"])
    assert recipe.stage("rs").reward_model is not None


# ------------------------------------------------------------------------------------------------
# a real run
# ------------------------------------------------------------------------------------------------

# One- and two-digit sums are learnt in a few dozen steps, so sampling at temperature 1 gives both
# right and wrong samples: a run where the policy has something to keep and something to reject.
RUN = """\
name: rs-run
seed: 0
model: align:tiny
stages:
  - name: sft
    type: sft
    dataset: {path: "align:arithmetic", split: train, num_examples: 2000, params: {max_operand: 19}}
    learning_rate: 3.0e-3
    lr_scheduler_type: constant
    max_steps: 60
    per_device_train_batch_size: 32
    logging_steps: 20
    max_length: 96
  - name: rs
    type: rejection_sampling
    model: ${stages.sft.model}
    dataset: {path: "align:arithmetic", split: train, num_examples: 64, params: {max_operand: 19}}
    rewards:
      - {rule: accuracy, weight: 1.0}
      - {rule: format, weight: 0.5}
    keep: all_pass
    num_generations: 4
    temperature: 1.0
    max_completion_length: 40
    generation_batch_size: 256
    mix_dataset: {path: "align:arithmetic", split: train, num_examples: 500, params: {trace: none}}
    mix_ratio: 0.25
  - name: sft_on_rs
    type: sft
    model: align:tiny-student
    dataset: ${stages.rs.dataset}
    max_steps: 2
    per_device_train_batch_size: 4
  # R1's RL for all scenarios runs on the curated set: mixed-in rows have no gold, accuracy abstains
  - name: grpo_on_rs
    type: grpo
    model: ${stages.sft.model}
    dataset: ${stages.rs.dataset}
    rewards: [{rule: accuracy}, {rule: format}]
    max_steps: 1
    per_device_train_batch_size: 4
    num_generations: 2
    max_completion_length: 8
"""


@pytest.fixture(scope="module")
def rs_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("rs")
    (root / "recipe.yaml").write_text(RUN)
    manifest = run_recipe(load_recipe(root / "recipe.yaml"), root / "run", report=lambda _: None)
    for name in ("sft", "rs", "sft_on_rs", "grpo_on_rs"):
        assert manifest.record(name).status == "complete", manifest.record(name).error
    return root / "run" / "rs", manifest.record("rs").metrics


def rows_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_written_samples_pass_when_rescored_independently(rs_run: tuple[Path, dict[str, Any]]) -> None:
    from reward_rules.accuracy import accuracy
    from reward_rules.format import format_reward

    stage_dir, metrics = rs_run
    sampled = [r for r in rows_of(stage_dir / "dataset.jsonl") if r["source"] == "rejection_sampling"]
    assert 0 < len(sampled) == metrics["num_accepted"] < metrics["num_generated"]
    texts = [r["completion"][0]["content"] for r in sampled]
    assert accuracy(texts, solution=[r["solution"] for r in sampled]) == [1.0] * len(sampled)
    assert format_reward(texts) == [1.0] * len(sampled)
    for row in sampled:
        assert row["prompt"][-1]["role"] == "user" and row["completion"][0]["role"] == "assistant"
        assert row["scores"] == {"accuracy": 1.0, "format": 1.0} and row["score"] == 1.5
        assert 0 <= row["sample_index"] < 4
        assert row["source_model"].endswith("sft/model")
        assert isinstance(row["difficulty"], int)
    # dedupe: no prompt carries the same completion twice
    pairs = [(r["prompt"][-1]["content"], texts[i]) for i, r in enumerate(sampled)]
    assert len(set(pairs)) == len(pairs)


def test_zero_accepted_prompts_are_listed(rs_run: tuple[Path, dict[str, Any]]) -> None:
    stage_dir, metrics = rs_run
    kept = {r["prompt"][-1]["content"] for r in rows_of(stage_dir / "dataset.jsonl") if r["source"] != "mix"}
    rejected = rows_of(stage_dir / "rejected_prompts.jsonl")
    listed = {r["prompt"][-1]["content"] for r in rejected}
    assert len(rejected) == metrics["zero_accepted_prompts"] > 0
    assert not kept & listed
    assert len(kept | listed) == metrics["num_prompts"] == 64
    assert all(r["num_samples"] == 4 and sum(r["dropped"].values()) == 4 for r in rejected)
    assert metrics["prompts_covered"] == round(len(kept) / 64, 4)


def test_mixing_ratio_and_per_difficulty_rates(rs_run: tuple[Path, dict[str, Any]]) -> None:
    stage_dir, metrics = rs_run
    rows = rows_of(stage_dir / "dataset.jsonl")
    mixed = [r for r in rows if r["source"] == "mix"]
    accepted = len(rows) - len(mixed)
    assert len(mixed) == metrics["num_mixed"] == mix_count(accepted, 0.25)
    assert abs(len(mixed) / len(rows) - 0.25) < 1 / len(rows) + 1e-9
    assert all(r["completion"][0]["content"].startswith("<think></think><answer>") for r in mixed)
    by_difficulty = Counter(r["difficulty"] for r in rows if r["source"] != "mix")
    rates = {k: v for k, v in metrics.items() if k.startswith("acceptance_rate/difficulty_")}
    assert rates and set(rates) >= {f"acceptance_rate/difficulty_{d}" for d in by_difficulty}
    assert metrics["acceptance_rate"] == round(accepted / metrics["num_generated"], 4)


# ------------------------------------------------------------------------------------------------
# scoring with a reward model
# ------------------------------------------------------------------------------------------------

RM_RUN = """\
name: rs-rm
seed: 0
model: align:tiny
stages:
  - name: rs
    type: rejection_sampling
    dataset: {path: "align:arithmetic", split: test, num_examples: 6}
    reward_model: REWARD_MODEL
    reward_model_weight: 2.0
    rewards: [{rule: format, weight: 0.0}]
    keep: best_of_n
    num_generations: 3
    max_completion_length: 8
    drop_truncated: false        # an untrained model never stops by itself
"""


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sequence-classification checkpoint saved once, so every load gives the same (random) head."""
    from align.embedded import embedded_model_path
    from align.models import load_sequence_classifier, load_tokenizer
    from align.recipe.schema import ModelSpec

    spec = ModelSpec(name_or_path=str(embedded_model_path("align:tiny")))
    target = tmp_path_factory.mktemp("rm") / "rm"
    load_sequence_classifier(spec).save_pretrained(target)
    load_tokenizer(spec).save_pretrained(target)
    return target


def test_reward_model_scores_pick_the_best_of_n(tmp_path: Path, reward_model_dir: Path) -> None:
    from align.models import load_sequence_classifier, load_tokenizer
    from align.recipe.schema import ModelSpec
    from align.rewards import RewardModelReward, score_with_reward_model

    (tmp_path / "recipe.yaml").write_text(RM_RUN.replace("REWARD_MODEL", str(reward_model_dir)))
    manifest = run_recipe(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "run", report=lambda _: None)
    record = manifest.record("rs")
    assert record.status == "complete", record.error
    rows = rows_of(tmp_path / "run" / "rs" / "dataset.jsonl")
    assert len(rows) == 6 == record.metrics["num_accepted"]  # exactly one per prompt
    spec = ModelSpec(name_or_path=str(reward_model_dir))
    model, tokenizer = load_sequence_classifier(spec), load_tokenizer(spec, padding_side="right")
    prompts = [r["prompt"] for r in rows]
    texts = [r["completion"][0]["content"] for r in rows]
    rescored = score_with_reward_model(model, tokenizer, prompts, texts)
    for row, score in zip(rows, rescored, strict=True):
        assert row["scores"]["reward_model"] == pytest.approx(score, abs=1e-4)
        assert row["score"] == pytest.approx(2.0 * score, abs=1e-4)  # format has weight 0
    # the same reward model as a TRL reward function (what GRPO gets from the scorer), loaded by path
    as_reward = RewardModelReward.load(spec)([r["completion"] for r in rows], prompts=prompts)
    assert as_reward == pytest.approx(rescored, abs=1e-4)


# ------------------------------------------------------------------------------------------------
# the vLLM path, against a stand-in engine (vLLM itself needs a GPU)
# ------------------------------------------------------------------------------------------------


def test_vllm_generation_keeps_the_sample_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types
    from dataclasses import dataclass as dc

    from align.embedded import embedded_model_path
    from align.generation import encode_prompts, load_sampler
    from align.models import load_tokenizer
    from align.recipe.schema import ModelSpec, SamplingKnobs

    @dc
    class Output:
        text: str
        token_ids: list[int]
        finish_reason: str

    seen: dict[str, Any] = {}

    class LLM:
        def __init__(self, **kwargs: Any) -> None:
            seen["init"] = kwargs

        def generate(self, requests: list[dict[str, Any]], params: Any, use_tqdm: bool = True) -> list[Any]:
            seen["requests"], seen["params"] = requests, params
            return [types.SimpleNamespace(outputs=[Output(f"r{i}s{j}", [7, 8], "stop" if j else "length")
                                                   for j in range(params.n)]) for i in range(len(requests))]

    class SamplingParams:
        def __init__(self, **kwargs: Any) -> None:
            self.__dict__.update(kwargs)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    path = str(embedded_model_path("align:tiny"))
    tokenizer = load_tokenizer(ModelSpec(name_or_path=path))
    knobs = SamplingKnobs(use_vllm=True, vllm_tensor_parallel_size=2, max_completion_length=5, temperature=0.7, top_p=0.9)
    sample = load_sampler(ModelSpec(name_or_path=path), knobs, seed=3)
    assert sample.model is None  # no HF copy of the model next to the engine
    prompts = [[{"role": "user", "content": "What is 1+2?"}], [{"role": "user", "content": "What is 10+20?"}]]
    out = sample(prompts, num_samples=2, seed=3)
    assert [[s.text for s in row] for row in out] == [["r0s0", "r0s1"], ["r1s0", "r1s1"]]
    assert [[s.finished for s in row] for row in out] == [[False, True], [False, True]]
    # prompts go in as the same token ids the HF path uses; sampling settings map to vLLM's names
    assert [r["prompt_token_ids"] for r in seen["requests"]] == encode_prompts(tokenizer, prompts)
    params = seen["params"]
    assert (params.n, params.max_tokens, params.temperature, params.top_p, params.top_k) == (2, 5, 0.7, 0.9, -1)
    assert seen["init"]["tensor_parallel_size"] == 2 and seen["init"]["model"] == path


def test_a_run_that_keeps_nothing_fails_clearly(tmp_path: Path) -> None:
    # An untrained model never emits EOS: with drop_truncated every sample goes, and nothing is mixed in.
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    recipe = load_recipe(tmp_path / "recipe.yaml")
    with pytest.raises(RuntimeError, match=r"none of 32 samples passed \(dropped: \{'truncated': 32\}\)"):
        run_recipe(recipe, tmp_path / "run", report=lambda _: None)
    from align.artifacts import Manifest

    manifest = Manifest.read(tmp_path / "run")
    assert manifest is not None and manifest.record("rs").status == "failed"


# The pairs output, from the same SFT model: the recipe's dpo stage trains on what it wrote.
PAIRS_RUN = """\
name: rs-pairs
seed: 0
model: MODEL
stages:
  - name: rs
    type: rejection_sampling
    dataset: {path: "align:arithmetic", split: train, num_examples: 48, params: {max_operand: 19}}
    rewards:
      - {rule: accuracy, weight: 1.0}
      - {rule: format, weight: 0.5}
    output: pairs
    pair_margin: 1.0
    num_generations: 4
    temperature: 1.0
    max_completion_length: 40
    generation_batch_size: 256
  - name: dpo
    type: dpo
    dataset: ${stages.rs.dataset}
    max_steps: 2
    per_device_train_batch_size: 4
    max_length: 96
"""


@pytest.fixture(scope="module")
def pairs_run(rs_run: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("rs_pairs")
    sft_model = rs_run[0].parent / "sft" / "model"
    (root / "recipe.yaml").write_text(PAIRS_RUN.replace("MODEL", str(sft_model)))
    manifest = run_recipe(load_recipe(root / "recipe.yaml"), root / "run", report=lambda _: None)
    for name in ("rs", "dpo"):
        assert manifest.record(name).status == "complete", manifest.record(name).error
    assert manifest.record("dpo").metrics["steps"] == 2
    return root / "run" / "rs", manifest.record("rs").metrics


def test_written_pairs_hold_when_rescored_independently(pairs_run: tuple[Path, dict[str, Any]]) -> None:
    from reward_rules.accuracy import accuracy
    from reward_rules.format import format_reward

    stage_dir, metrics = pairs_run
    pairs = rows_of(stage_dir / "dataset.jsonl")
    assert 0 < len(pairs) == metrics["num_pairs"] == metrics["num_rows"] <= 48
    assert metrics["num_accepted"] == 2 * len(pairs) and metrics["num_generated"] == 48 * 4

    def rescored(side: str) -> tuple[list[float | None], list[float]]:
        texts = [p[side][0]["content"] for p in pairs]
        return accuracy(texts, solution=[p["solution"] for p in pairs]), format_reward(texts)

    (acc_c, fmt_c), (acc_r, fmt_r) = rescored("chosen"), rescored("rejected")
    gaps = []
    for i, pair in enumerate(pairs):
        chosen = 1.0 * (acc_c[i] or 0.0) + 0.5 * fmt_c[i]
        rejected = 1.0 * (acc_r[i] or 0.0) + 0.5 * fmt_r[i]
        assert chosen - rejected >= 1.0  # the margin, from scores computed here, not read back
        assert pair["chosen_score"] == pytest.approx(chosen) and pair["rejected_score"] == pytest.approx(rejected)
        assert pair["chosen_scores"] == {"accuracy": acc_c[i], "format": fmt_c[i]}
        assert pair["score_gap"] == pytest.approx(chosen - rejected)
        assert pair["chosen"] != pair["rejected"] and pair["chosen_index"] != pair["rejected_index"]
        assert pair["prompt"][-1]["role"] == "user" and pair["chosen"][0]["role"] == "assistant"
        gaps.append(chosen - rejected)
    assert metrics["mean_score_gap"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-4)
    # Prompts without a pair are listed once each, with why.
    rejected = rows_of(stage_dir / "rejected_prompts.jsonl")
    assert len(rejected) == 48 - len(pairs) == metrics["zero_accepted_prompts"]
    paired = {p["prompt"][-1]["content"] for p in pairs}
    assert not paired & {r["prompt"][-1]["content"] for r in rejected}


def test_a_rule_that_scores_inf_stops_the_stage_naming_it(tmp_path: Path) -> None:
    (tmp_path / "rules.py").write_text("def infinite(completions, **kwargs):\n    return [float('inf')] * len(completions)\n")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    recipe = load_recipe(tmp_path / "recipe.yaml", [f"stages.rs.rewards=[{{rule: {tmp_path}/rules.py:infinite}}]",
                                                    "stages.rs.rule_failure_min_samples=8"])
    with pytest.raises(RuntimeError, match=r"reward rule 'infinite' failed on 32 of the 32 samples it scored \(100%, "
                                           r"more than max_rule_failure_rate 0.1\); last error: returned inf for sample 0"):
        run_recipe(recipe, tmp_path / "run", report=lambda _: None)
