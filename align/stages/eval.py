"""eval: generate on a held-out set and score it.

Metrics (written to the manifest and `metrics.jsonl`):
- `accuracy`: share of samples whose answer math-verify finds equivalent to the gold (`accuracy` rule);
  with greedy decoding that is greedy accuracy, with sampling it is the pass@1 estimate;
- `exact_match`: share of samples whose extracted answer equals the gold string exactly;
- `pass@k` for each k in `pass_k` (unbiased estimator of Chen et al. 2021 from `num_samples` samples);
- `maj@k` for each k in `maj_k` (test-time scaling by self-consistency, R1's cons@64): share of prompts
  whose majority answer over their first k samples is right. Answers are grouped by math-verify
  equivalence (`reward_rules.accuracy.majority_vote`); samples without an answer do not vote; a tie
  goes to the group whose first answer came first;
- `format`: share of samples in the strict `<think>…</think><answer>…</answer>` format;
- `mean_length`: mean completion length in tokens; `truncated`: share that never emitted EOS.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, PositiveInt

from align.artifacts import StageContext
from align.console import StageProgress
from align.data import Needs, RowLedger, chat_prompt, load_dataset, write_jsonl
from align.generation import load_sampler
from align.recipe.checks import CheckContext
from align.recipe.schema import Data, SamplingKnobs, StageConfig

logger = logging.getLogger("align")

ARTIFACTS = {"predictions": "predictions.jsonl"}
#: Every row: a prompt to generate from and its gold answer.
NEEDS = Needs.of(prompt="prompt", solution="answer")


class Config(StageConfig, SamplingKnobs):
    type: Literal["eval"] = "eval"
    dataset: Data
    num_samples: PositiveInt = Field(default=1, description="Samples per prompt (k for pass@k).")
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy.")
    max_completion_length: PositiveInt = 256
    pass_k: list[PositiveInt] | None = Field(default=None, description="Default: [1, num_samples].")
    maj_k: list[PositiveInt] | None = Field(
        default=None, description="maj@k (majority vote over the first k samples); default: [num_samples] when it is > 1."
    )
    system_prompt: str | None = None
    conversational: bool = Field(default=True, description="Plain-string prompts become a user message (chat template).")


def check(config: Config, ctx: CheckContext) -> None:
    ctx.check_sampling(config, config.num_samples, "num_samples")
    ctx.check_context(ctx.model_spec(config), config, ("max_completion_length",))
    for key, metric in (("pass_k", "pass"), ("maj_k", "maj")):
        for i, k in enumerate(getattr(config, key) or []):
            if k > config.num_samples:
                ctx.error((key, i), f"{metric}@{k} needs at least {k} samples per prompt (num_samples is {config.num_samples})")
    ctx.require_columns(config.dataset, ("dataset",), {"prompt": "the question to generate from", "solution": "the gold answer"})
    ctx.check_rows(config.dataset, ("dataset",), NEEDS)


def output_columns(config: Config) -> set[str] | None:
    return None


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which `correct` are right: 1 − C(n−c, k) / C(n, k)."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def score(
    prompts: list[Any], solutions: list[str], samples: list[list[Any]], pass_k: list[int], maj_k: Sequence[int] = ()
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Score generated samples; returns the metrics and one record per prompt."""
    from reward_rules import RULES
    from reward_rules.accuracy import extract_answer, majority_vote  # math-verify: only when scoring

    accuracy_rule, format_rule = RULES["accuracy"], RULES["format"]
    flat_texts = [s.text for row in samples for s in row]
    flat_solutions = [sol for sol, row in zip(solutions, samples, strict=True) for _ in row]
    correct = accuracy_rule(flat_texts, solution=flat_solutions)
    formatted = format_rule(flat_texts)
    records: list[dict[str, Any]] = []
    totals = {"accuracy": 0.0, "exact_match": 0.0, "format": 0.0, "length": 0.0, "truncated": 0.0}
    pass_sums = dict.fromkeys(pass_k, 0.0)
    maj_sums = dict.fromkeys(maj_k, 0.0)
    position = 0
    for prompt, solution, row in zip(prompts, solutions, samples, strict=True):
        scored = []
        for sample in row:
            ok = bool(correct[position]) if correct[position] is not None else False
            exact = (extract_answer(sample.text) or "").strip() == solution.strip()
            scored.append({"text": sample.text, "correct": ok, "exact": exact, "format": float(formatted[position] or 0.0),
                           "length": len(sample.token_ids), "finished": sample.finished})
            position += 1
        n_correct = sum(s["correct"] for s in scored)
        for k in pass_k:
            pass_sums[k] += pass_at_k(len(scored), n_correct, k)
        majority: dict[str, bool] = {}
        for k in maj_k:
            winner = majority_vote([s["text"] for s in scored[:k]])
            majority[f"maj@{k}"] = winner is not None and scored[winner]["correct"]
            maj_sums[k] += majority[f"maj@{k}"]
        totals["accuracy"] += sum(s["correct"] for s in scored)
        totals["exact_match"] += sum(s["exact"] for s in scored)
        totals["format"] += sum(s["format"] for s in scored)
        totals["length"] += sum(s["length"] for s in scored)
        totals["truncated"] += sum(not s["finished"] for s in scored)
        records.append({"prompt": prompt, "solution": solution, "samples": scored, **({"majority": majority} if maj_k else {})})
    count = max(1, len(flat_texts))
    metrics = {
        "accuracy": totals["accuracy"] / count,
        "exact_match": totals["exact_match"] / count,
        **{f"pass@{k}": pass_sums[k] / max(1, len(prompts)) for k in pass_k},
        **{f"maj@{k}": maj_sums[k] / max(1, len(prompts)) for k in maj_k},
        "format": totals["format"] / count,
        "mean_length": totals["length"] / count,
        "truncated": totals["truncated"] / count,
        "num_prompts": len(prompts),
    }
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, records


def run(config: Config, ctx: StageContext) -> dict[str, Any]:
    assert config.model is not None
    ledger = RowLedger()
    dataset = load_dataset(config.dataset, ctx.base_dir, ctx.seed, need=NEEDS, ledger=ledger)
    prompts = [chat_prompt(p, config.system_prompt, config.conversational) for p in dataset["prompt"]]
    solutions = [str(s) for s in dataset["solution"]]
    sampler = load_sampler(config.model, config, seed=ctx.seed)
    logger.info("eval: %d prompts × %d samples", len(prompts), config.num_samples)
    with StageProgress(ctx.out_dir, ctx.name, len(prompts) * config.num_samples, unit="sample", phase="sampling") as bar:
        samples = sampler(prompts, num_samples=config.num_samples, seed=ctx.seed, progress=bar.update)
    pass_k = sorted(set(config.pass_k or [1, config.num_samples]))
    maj_k = sorted(set(config.maj_k if config.maj_k is not None else ([config.num_samples] if config.num_samples > 1 else [])))
    metrics, records = score(prompts, solutions, samples, pass_k, maj_k)
    if os.environ.get("RANK", "0") == "0":  # data parallel: every rank has every sample, one writes
        write_jsonl(records, ctx.artifact(ARTIFACTS["predictions"]))
    return {**metrics, **ledger.metrics()}
