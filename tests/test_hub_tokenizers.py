"""Every generation path stops at the end of the assistant turn, and pads on the right, with
tokenizers shaped like the hub's (tests/hub_fixtures.py): Qwen2.5-base (EOS ≠ end of turn, pad =
EOS), Llama-3-Instruct (several EOS ids, no pad), no pad token at all, and one that adds a BOS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from align.artifacts import read_metrics
from align.recipe.schema import ModelSpec
from align.recipe.validate import load_recipe
from align.runner import run_recipe
from tests.hub_fixtures import FIXTURES, SHAPES, end_of_turn_id, trained_fixture


@pytest.fixture(scope="module")
def fixture_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    return {name: trained_fixture(name, root) for name in FIXTURES}


def run_stage(tmp_path: Path, model: Path, stage: str) -> tuple[dict[str, Any], Path]:
    text = f"name: hub\nseed: 0\nmodel: {json.dumps(str(model))}\nstages:\n{stage}"
    (tmp_path / "recipe.yaml").write_text(text)
    manifest = run_recipe(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "run", report=lambda _: None)
    record = manifest.record(manifest.stages[0].name)
    assert record.status == "complete", record.error
    return record.metrics, tmp_path / "run" / record.name


PROMPTS = '{path: "align:arithmetic", split: test, num_examples: 12, params: {max_operand: 30}}'


def test_stop_ids_hold_the_end_of_turn_and_every_eos(fixture_models: dict[str, Path]) -> None:
    from align.models import end_of_turn_token, load_causal_lm, load_tokenizer, stop_token_ids

    for name, folder in fixture_models.items():
        spec = ModelSpec(name_or_path=str(folder))
        tokenizer = load_tokenizer(spec)
        assert end_of_turn_token(tokenizer) == SHAPES[name]["end_of_turn"], name
        ids = stop_token_ids(load_causal_lm(spec), tokenizer, ["<think>"])
        vocab = tokenizer.get_vocab()
        wanted = {vocab[t] for t in [*SHAPES[name]["generation_eos"], SHAPES[name]["end_of_turn"], "<think>"]}  # type: ignore[misc]
        assert wanted <= set(ids), name
        assert tokenizer.pad_token_id is not None  # no pad: EOS stands in


def test_bos_is_written_once(fixture_models: dict[str, Path]) -> None:
    from align.generation import encode_prompts
    from align.models import load_tokenizer

    tokenizer = load_tokenizer(ModelSpec(name_or_path=str(fixture_models["adds-bos"])))
    raw, chat = encode_prompts(tokenizer, ["What is 1+2?", [{"role": "user", "content": "What is 1+2?"}]])
    bos = tokenizer.convert_tokens_to_ids("<s>")
    assert raw[0] == bos and raw.count(bos) == 1  # raw text: the tokenizer's own BOS, as TRL's GRPO encodes it
    assert chat[0] == bos and chat.count(bos) == 1  # the template writes it; encoding adds no second one


@pytest.mark.parametrize("name", FIXTURES)
def test_rollouts_end_at_the_turn_and_pad_right(fixture_models: dict[str, Path], name: str) -> None:
    """PPO's tensors: real tokens up to and including the end of turn, then padding, masked out."""
    from align.data import chat_prompt
    from align.generation import encode_prompts, eos_and_pad_ids, generate_rollout
    from align.models import load_causal_lm, load_tokenizer, use_stop_tokens

    spec = ModelSpec(name_or_path=str(fixture_models[name]))
    tokenizer, model = load_tokenizer(spec), load_causal_lm(spec)
    use_stop_tokens(model, tokenizer, spec)
    eos_ids, pad_id = eos_and_pad_ids(model, tokenizer)
    # One- and two-digit sums: traces of different lengths, so some rows pad while others still generate.
    prompts = [chat_prompt(f"What is {a}+{b}?") for a, b in ((3, 4), (23, 19), (5, 2), (17, 26), (1, 1), (28, 14))]
    out = generate_rollout(model, encode_prompts(tokenizer, prompts), chunk_size=3, max_new_tokens=48,
                           eos_ids=eos_ids, pad_id=pad_id)  # fmt: skip
    end = end_of_turn_id(fixture_models[name])
    lengths = out.response_mask.sum(dim=1).tolist()
    assert bool(out.finished.all()) and len(set(lengths)) > 1  # all ended, at different lengths
    for row, mask, length in zip(out.response_ids.tolist(), out.response_mask.tolist(), lengths, strict=True):
        assert mask == [True] * length + [False] * (len(mask) - length)  # right padding, masked
        assert row[length - 1] == end and all(t == pad_id for t in row[length:])


@pytest.mark.parametrize("name", FIXTURES)
def test_eval_stops_at_the_turn(tmp_path: Path, fixture_models: dict[str, Path], name: str) -> None:
    metrics, folder = run_stage(tmp_path, fixture_models[name],
                                f"  - {{name: ev, type: eval, dataset: {PROMPTS}, max_completion_length: 48}}\n")
    assert metrics["truncated"] == 0.0
    predictions = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    texts = [s["text"] for p in predictions for s in p["samples"]]
    assert all(t.endswith("</answer>") for t in texts if "</answer>" in t)
    assert not any(str(SHAPES[name]["end_of_turn"]) in t for t in texts)  # the stop token is not in the text


@pytest.mark.parametrize("name", FIXTURES)
def test_rejection_sampling_keeps_finished_samples(tmp_path: Path, fixture_models: dict[str, Path], name: str) -> None:
    metrics, folder = run_stage(tmp_path, fixture_models[name], f"""\
  - name: rs
    type: rejection_sampling
    dataset: {PROMPTS}
    rewards: [{{rule: format}}]
    keep: best_of_n
    num_generations: 1
    temperature: 0.0
    max_completion_length: 48
""")
    assert metrics.get("dropped/truncated", 0) == 0 and metrics["num_accepted"] == 12


@pytest.mark.parametrize("name", FIXTURES)
def test_distill_traces_end_at_the_turn(tmp_path: Path, fixture_models: dict[str, Path], name: str) -> None:
    metrics, _ = run_stage(tmp_path, fixture_models[name], f"""\
  - name: distill
    type: distill
    dataset: {PROMPTS}
    traces: teacher
    temperature: 0.0
    max_completion_length: 48
    max_steps: 1
    per_device_train_batch_size: 4
""")
    assert metrics["dropped_truncated"] == 0 and metrics["num_traces"] == 12


@pytest.mark.parametrize("name", FIXTURES)
def test_ppo_rollouts_end_at_the_turn(tmp_path: Path, fixture_models: dict[str, Path], name: str) -> None:
    _, folder = run_stage(tmp_path, fixture_models[name], f"""\
  - name: ppo
    type: ppo
    dataset: {PROMPTS}
    rewards: [{{rule: format}}]
    max_steps: 2
    per_device_train_batch_size: 6
    num_ppo_epochs: 1
    response_length: 48
    temperature: 0.05
    logging_steps: 1
""")
    rows = read_metrics(folder / "metrics.jsonl", "train")
    assert [r["no_eos"] for r in rows] == [0.0, 0.0]
    assert all(r["response_length"] < 48 for r in rows)


@pytest.mark.parametrize("name", FIXTURES)
def test_grpo_completions_end_at_the_turn(tmp_path: Path, fixture_models: dict[str, Path], name: str) -> None:
    _, folder = run_stage(tmp_path, fixture_models[name], f"""\
  - name: grpo
    type: grpo
    dataset: {PROMPTS}
    rewards: [{{rule: format}}]
    max_steps: 1
    per_device_train_batch_size: 4
    num_generations: 2
    temperature: 0.05
    max_completion_length: 48
    logging_steps: 1
""")
    (row,) = [r for r in read_metrics(folder / "metrics.jsonl", "train") if "reward" in r]
    assert row["completions/clipped_ratio"] == 0.0  # TRL: the share of completions cut at the length limit
    samples = read_metrics(folder / "metrics.jsonl", "sample")
    assert samples and not any(str(SHAPES[name]["end_of_turn"]) in s["completion"] for s in samples)
