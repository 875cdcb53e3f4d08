"""rejection_sampling: sample many completions per prompt from a model, score them, keep the good ones
as an SFT dataset — R1's stage 3 ("reasoning data": ~600k samples from the RL checkpoint, keeping only
correct, readable ones, then adding ~200k non-reasoning samples).

Per prompt, `num_generations` completions are sampled (batched across prompts with the KV cache, or
vLLM with `use_vllm: true`) and scored by rule rewards (`rewards`, the same specs GRPO takes) and/or a
sequence-classification reward model (`reward_model`). The weighted score is Σ weightᵢ·ruleᵢ (+
`reward_model_weight`·RM score); a rule that scores None adds nothing to it.

Each prompt's samples then go, in this order, through:
1. filters — `drop_truncated` (never emitted EOS), `max_tokens` (completion tokens, EOS included),
   `language` (the `language_consistency` rule: share of the chain of thought in that script ≥
   `min_language_share`; a chain of thought with no letters at all passes), `dedupe` (identical text
   after whitespace normalisation: the first is kept);
2. the keep policy (`select_samples`, a pure function):
   - `all_pass`: every rule (and the RM, if `thresholds` names `reward_model`) scores ≥ its threshold
     (`thresholds[name]`, default `pass_threshold` = 1.0) — e.g. accuracy = 1 and format = 1;
   - `best_of_n`: the single highest weighted score; `top_k`: the `keep_k` highest;
   - `threshold`: every sample whose weighted score ≥ `score_threshold`;
   `score_threshold`, when set, is also a floor for `all_pass`, `best_of_n` and `top_k`;
3. `max_per_prompt`: at most this many per prompt, best weighted score first.

The `dataset` artifact (JSONL) is in SFT's conversational prompt/completion layout, so an sft stage
trains on `${stages.NAME.dataset}` directly. Each row keeps the prompt's original columns (solution,
difficulty, …; a gold `completion` or `messages` column is dropped, the sample replaces it) plus
provenance: `source` ("rejection_sampling" or "mix"), `source_model`, `sample_index`, `score`
(weighted) and `scores` (per rule and `reward_model`). `mix_dataset` rows (SFT data: messages or
prompt/completion) are added so they make up `mix_ratio` of the final dataset (R1: 200k of 800k =
0.25); if the mix dataset is too small, all of it is used and the reached share is reported.

`output: pairs` writes preference pairs instead, for a following `dpo` (or `reward_model`) stage —
iterative, on-policy DPO from one recipe: after the same filters, a prompt's highest-scored sample
is `chosen` and its lowest-scored one `rejected` (ties: the earlier sample is chosen, the later
rejected), kept only when their weighted scores differ by at least `pair_margin`. Rows hold the
prompt, its original columns, `chosen`/`rejected` (assistant messages for conversational prompts)
and provenance: `chosen_score`/`rejected_score` (weighted), `chosen_scores`/`rejected_scores` (per
reward), `chosen_index`/`rejected_index`, `score_gap`. The keep policy and mixing do not apply.

Prompts with no accepted sample (no pair) go to `rejected_prompts.jsonl` with their best score and why their
samples were dropped. Metrics: acceptance rate (kept samples / generated samples) overall and per
`difficulty` value when the data has that column, prompts covered, zero-accepted prompts, drops per
filter, mean rule scores, samples/s of generation.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, PositiveInt, PrivateAttr, model_validator

from align.artifacts import ChunkedJsonl, StageContext
from align.console import StageProgress
from align.data import SFT_NEEDS, Needs, RowLedger, chat_prompt, load_dataset, pending_chunks
from align.generation import load_sampler
from align.models import resolve_model_path
from align.recipe.checks import CheckContext
from align.recipe.errors import did_you_mean
from align.recipe.schema import Data, Model, RewardSpec, RuleFailureKnobs, SamplingKnobs, StageConfig
from align.rewards import REWARD_MODEL, Scorer, bind_rule, prompt_needs, resolve_rule
from align.training import SFT_LAYOUTS, sft_layout

logger = logging.getLogger("align")

ARTIFACTS = {"dataset": "dataset.jsonl", "rejected_prompts": "rejected_prompts.jsonl"}
KeepPolicy = Literal["all_pass", "best_of_n", "top_k", "threshold"]
PROVENANCE_COLUMNS = frozenset({"source", "source_model", "sample_index", "score", "scores"})
#: What a pair row adds to the prompt's columns (output: pairs).
PAIR_COLUMNS = frozenset({"chosen", "rejected", "source", "source_model", "chosen_index", "rejected_index",
                          "chosen_score", "rejected_score", "chosen_scores", "rejected_scores", "score_gap"})
#: Keys of the keep policy and the mixing, meaningless when the stage writes pairs.
SFT_ONLY_KEYS = frozenset({"keep", "thresholds", "pass_threshold", "keep_k", "score_threshold", "max_per_prompt",
                           "mix_dataset", "mix_ratio"})
#: Input columns the sample replaces: left in, SFT would train on the gold instead of the sample.
REPLACED_COLUMNS = frozenset({"completion", "messages", "text"})
#: The mix dataset's rows: a conversation, or a prompt and its completion.
MIX_NEEDS = Needs(SFT_NEEDS.layouts[:2])


class Config(StageConfig, SamplingKnobs, RuleFailureKnobs):
    type: Literal["rejection_sampling"] = "rejection_sampling"
    dataset: Data = Field(description="Prompts (`prompt` column) plus the columns the rules read.")
    system_prompt: str | None = Field(default=None, description="Prepended to conversational prompts that lack one.")
    conversational: bool = Field(default=True, description="Plain-string prompts become a user message (chat template).")

    # sampling (the shared sampler's settings, TRL's names) and how many prompts at a time
    num_generations: PositiveInt = Field(default=8, description="Completions sampled per prompt.")
    chunk_size: PositiveInt = Field(default=1024, description="Prompts sampled, scored and written per chunk (bounds memory).")

    # scoring
    rewards: list[RewardSpec] = Field(default_factory=list, description="Rule rewards, as in grpo.")
    reward_model: Model | None = Field(default=None, description="Sequence-classification reward model.")
    reward_model_weight: float = 1.0
    reward_model_batch_size: PositiveInt = 32

    # what is written: SFT rows through the keep policy, or preference pairs (best vs worst) for dpo
    output: Literal["sft", "pairs"] = Field(
        default="sft", description="sft: kept samples as prompt/completion; pairs: best vs worst as chosen/rejected."
    )
    pair_margin: float = Field(
        default=0.5, gt=0, description="pairs: the chosen sample's weighted score must beat the rejected's by this much."
    )

    # keep policy (output: sft)
    keep: KeepPolicy = "all_pass"
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="all_pass: per-reward minimum by reward name (or 'reward_model')."
    )
    pass_threshold: float = Field(default=1.0, description="all_pass: minimum for rules not in `thresholds`.")
    keep_k: PositiveInt = Field(default=1, description="top_k: samples kept per prompt.")
    score_threshold: float | None = Field(
        default=None, description="threshold: minimum weighted score; other policies: an extra floor."
    )

    # filters
    drop_truncated: bool = Field(default=True, description="Drop samples that hit max_completion_length without EOS.")
    max_tokens: PositiveInt | None = Field(default=None, description="Drop samples longer than this many tokens.")
    language: str | None = Field(default=None, description="Drop samples whose chain of thought mixes scripts (e.g. 'en').")
    language_params: dict[str, Any] = Field(
        default_factory=dict, description="Other parameters of the language_consistency rule (think_tag)."
    )
    min_language_share: float = Field(default=0.95, ge=0.0, le=1.0)
    dedupe: bool = Field(default=True, description="Drop repeated completions of the same prompt.")
    max_per_prompt: PositiveInt | None = Field(default=None, description="Cap on samples kept per prompt.")

    # mixing (R1's non-reasoning data)
    mix_dataset: Data | None = Field(default=None, description="SFT data (messages or prompt/completion) to add.")
    mix_ratio: float = Field(default=0.0, ge=0.0, lt=1.0, description="Share of the final dataset taken from mix_dataset.")

    # the input columns, found while checking, so `output_columns` can tell later stages what is written
    _input_columns: set[str] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.keep == "threshold" and self.score_threshold is None:
            raise ValueError("keep: threshold needs score_threshold")
        if (self.mix_dataset is None) != (self.mix_ratio == 0.0):
            raise ValueError("mix_dataset and mix_ratio > 0 go together")
        if not self.rewards and self.reward_model is None:
            raise ValueError("nothing to score samples with: set rewards, reward_model, or both")
        return self


def reward_names(config: Config) -> list[str]:
    return [r.display_name for r in config.rewards]


def check(config: Config, ctx: CheckContext) -> None:
    from reward_rules.language import LANGUAGES

    ctx.require_columns(config.dataset, ("dataset",), {"prompt": "completions are sampled from it"})
    ctx.check_rewards(config.rewards, config.dataset)
    ctx.check_rows(config.dataset, ("dataset",), prompt_needs(config.rewards, ctx.base_dir))
    ctx.check_rows(config.mix_dataset, ("mix_dataset",), MIX_NEEDS)
    ctx.check_model(config.reward_model, ("reward_model",))
    ctx.check_sampling(config, config.num_generations, "num_generations")
    ctx.check_context(ctx.model_spec(config), config, ("max_completion_length",))
    config._input_columns = ctx.dataset_columns(config.dataset, ("dataset",))
    names = reward_names(config)
    scored = set(names) | ({REWARD_MODEL} if config.reward_model is not None else set())
    for key in config.thresholds:
        if key not in scored:
            ctx.error(("thresholds", key), f"'{key}' is not a reward of this stage{did_you_mean(key, sorted(scored))}; "
                      f"rewards: {', '.join(sorted(scored))}")
    if config.output == "pairs":
        for key in sorted(SFT_ONLY_KEYS & config.model_fields_set):
            ctx.error((key,), f"{key} only applies to output: sft (the keep policy and the mix); pairs keep the "
                      "best- and worst-scored sample of each prompt, at least pair_margin apart")
        if config.num_generations < 2:
            ctx.error(("num_generations",), "a pair needs at least 2 samples per prompt")
    elif "pair_margin" in config.model_fields_set:
        ctx.error(("pair_margin",), "pair_margin only applies to output: pairs")
    if config.output == "sft" and config.keep == "all_pass" and not config.rewards and REWARD_MODEL not in config.thresholds:
        ctx.error(("keep",), "all_pass with only a reward model needs thresholds: {reward_model: <minimum score>}")
    if config.keep != "all_pass" and config.thresholds:
        ctx.error(("thresholds",), f"thresholds only apply to keep: all_pass (keep is {config.keep}); "
                  "use score_threshold for a floor on the weighted score")
    if config.keep != "top_k" and "keep_k" in config.model_fields_set:
        ctx.error(("keep_k",), f"keep_k only applies to keep: top_k (keep is {config.keep})")
    if config.language is not None and config.language not in LANGUAGES:
        ctx.error(("language",), f"unknown language '{config.language}'{did_you_mean(config.language, list(LANGUAGES))}")
    if config.mix_dataset is not None:
        columns = ctx.dataset_columns(config.mix_dataset, ("mix_dataset",))
        if columns is not None and sft_layout(columns) not in SFT_LAYOUTS[:2]:
            ctx.error(("mix_dataset", "path"), f"mix dataset '{config.mix_dataset.path}' needs columns messages or "
                      f"prompt+completion; it has: {', '.join(sorted(columns))}")


def output_columns(config: Config) -> set[str] | None:
    """Columns of the written dataset: the input's (minus a gold completion) plus the sample and its
    provenance, or plus the pair and its provenance. None when the input's columns are unknown before
    running (hub data)."""
    if config._input_columns is None:
        return None
    kept = set(config._input_columns) - REPLACED_COLUMNS
    if config.output == "pairs":
        return (kept - {"chosen", "rejected"}) | {"prompt"} | PAIR_COLUMNS
    return kept | {"prompt", "completion"} | PROVENANCE_COLUMNS


# ------------------------------------------------------------------------------------------------
# filters and keep policy (pure)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """One sample of a prompt with everything the filters and the keep policy look at."""

    index: int  # among the prompt's samples
    text: str
    num_tokens: int
    finished: bool  # ended with EOS
    scores: Mapping[str, float | None]  # per reward name (and `reward_model`)
    total: float  # weighted score
    language_share: float | None = None  # language_consistency score; None = nothing to judge


@dataclass(frozen=True)
class KeepRules:
    """The stage's filter and policy settings, as plain values."""

    keep: KeepPolicy
    thresholds: Mapping[str, float]  # all_pass: minimum per reward
    keep_k: int = 1
    score_threshold: float | None = None
    drop_truncated: bool = True
    max_tokens: int | None = None
    min_language_share: float | None = None  # None: no language filter
    dedupe: bool = True
    max_per_prompt: int | None = None

    @classmethod
    def from_config(cls, config: Config) -> KeepRules:
        return cls(
            keep=config.keep, thresholds=resolved_thresholds(config), keep_k=config.keep_k,
            score_threshold=config.score_threshold, drop_truncated=config.drop_truncated,
            max_tokens=config.max_tokens,
            min_language_share=config.min_language_share if config.language is not None else None,
            dedupe=config.dedupe, max_per_prompt=config.max_per_prompt,
        )  # fmt: skip


def passes_all(scores: Mapping[str, float | None], thresholds: Mapping[str, float]) -> bool:
    """Every named score is present and at least its threshold (None — the rule could not judge — fails)."""
    for name, minimum in thresholds.items():
        value = scores.get(name)
        if value is None or value < minimum:
            return False
    return True


def select_samples(
    candidates: Sequence[Scored],
    keep: KeepPolicy,
    *,
    thresholds: Mapping[str, float] | None = None,
    keep_k: int = 1,
    score_threshold: float | None = None,
) -> list[int]:
    """The keep policy: indices of the kept candidates, best weighted score first (ties: lower index
    first). `thresholds` is the per-reward minimum for `all_pass`; `score_threshold` is the cut for
    `threshold` and an extra floor for the other policies."""
    ranked = sorted(candidates, key=lambda c: (-c.total, c.index))
    if score_threshold is not None:
        ranked = [c for c in ranked if c.total >= score_threshold]
    if keep == "all_pass":
        ranked = [c for c in ranked if passes_all(c.scores, thresholds or {})]
    elif keep == "best_of_n":
        ranked = ranked[:1]
    elif keep == "top_k":
        ranked = ranked[:keep_k]
    elif keep != "threshold":
        raise ValueError(f"unknown keep policy {keep!r}")
    return [c.index for c in ranked]


def apply_filters(samples: Sequence[Scored], rules: KeepRules) -> tuple[list[Scored], Counter[str]]:
    """The filters, in order (truncated, too long, language, duplicate): the samples left, and how
    many each filter dropped."""
    dropped: Counter[str] = Counter()
    candidates: list[Scored] = []
    seen: set[str] = set()
    for s in samples:
        key = normalize_text(s.text)
        if rules.drop_truncated and not s.finished:
            dropped["truncated"] += 1
        elif rules.max_tokens is not None and s.num_tokens > rules.max_tokens:
            dropped["too_long"] += 1
        elif (rules.min_language_share is not None and s.language_share is not None
              and s.language_share < rules.min_language_share):  # fmt: skip
            dropped["language"] += 1
        elif rules.dedupe and key in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(key)
            candidates.append(s)
    return candidates, dropped


def judge(samples: Sequence[Scored], rules: KeepRules) -> tuple[list[int], Counter[str]]:
    """One prompt's samples through the filters, the keep policy and the cap, in that order.
    Returns the kept indices (best first) and how many samples each step dropped."""
    candidates, dropped = apply_filters(samples, rules)
    kept = select_samples(candidates, rules.keep, thresholds=rules.thresholds, keep_k=rules.keep_k,
                          score_threshold=rules.score_threshold)  # fmt: skip
    dropped["policy"] += len(candidates) - len(kept)
    if rules.max_per_prompt is not None and len(kept) > rules.max_per_prompt:
        dropped["cap"] += len(kept) - rules.max_per_prompt
        kept = kept[: rules.max_per_prompt]  # best first, so the cap keeps the best
    return kept, +dropped


def pick_pair(samples: Sequence[Scored], rules: KeepRules, margin: float) -> tuple[tuple[int, int] | None, Counter[str]]:
    """A preference pair from one prompt's samples, after the same filters: (chosen, rejected) = the
    highest and the lowest weighted score (ties: the lower index as chosen, the higher as rejected),
    kept only when chosen − rejected ≥ `margin`. Returns the pair's indices (or None) and the drops:
    the filters', `no_gap` (no two samples that far apart) and `unpaired` (the samples in between)."""
    candidates, dropped = apply_filters(samples, rules)
    if candidates:
        best = min(candidates, key=lambda c: (-c.total, c.index))
        worst = min(candidates, key=lambda c: (c.total, -c.index))
        if best.total - worst.total >= margin:
            dropped["unpaired"] += len(candidates) - 2
            return (best.index, worst.index), +dropped
        dropped["no_gap"] += len(candidates)
    return None, +dropped


def resolved_thresholds(config: Config) -> dict[str, float]:
    """all_pass minimum per reward: every rule (its own threshold or pass_threshold), plus the RM if named."""
    out = {name: config.thresholds.get(name, config.pass_threshold) for name in reward_names(config)}
    if REWARD_MODEL in config.thresholds:
        out[REWARD_MODEL] = config.thresholds[REWARD_MODEL]
    return out


def mix_count(accepted: int, ratio: float) -> int:
    """Mixed-in rows so they are `ratio` of accepted + mixed: n = accepted·ratio / (1 − ratio)."""
    if ratio <= 0.0:
        return 0
    return round(accepted * ratio / (1.0 - ratio))


def normalize_text(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------


def _completion_value(text: str, conversational: bool) -> Any:
    return [{"role": "assistant", "content": text}] if conversational else text


def _sft_pairs(dataset: Any) -> list[tuple[Any, Any]]:
    """(prompt, completion) pairs of an SFT dataset in messages or prompt/completion layout; a
    conversation's last assistant turn is the completion, everything before it the prompt."""
    if "messages" not in dataset.column_names:
        return list(zip(dataset["prompt"], dataset["completion"], strict=True))
    pairs = []
    for messages in dataset["messages"]:
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is not None:
            pairs.append((messages[:last], [messages[last]]))
    return pairs


def score_samples(scorer: Scorer, language_rule: Any, prompts: list[Any], rows: list[dict[str, Any]],
                  samples: list[list[Any]]) -> list[list[Scored]]:  # fmt: skip
    """Every sample of a chunk scored at once (rules and reward models are far cheaper on big
    batches), plus its language share when the language filter is on; grouped back by prompt."""
    flat = [(i, s) for i, row_samples in enumerate(samples) for s in row_samples]
    flat_prompts = [prompts[i] for i, _ in flat]
    columns = {c: [rows[i][c] for i, _ in flat] for c in rows[0] if c != "prompt"} if rows else {}
    scores = scorer(flat_prompts, [s.text for _, s in flat], completion_ids=[s.token_ids for _, s in flat], columns=columns)
    if language_rule is not None:
        conversational = bool(prompts) and not isinstance(prompts[0], str)
        language = language_rule([_completion_value(s.text, conversational) for _, s in flat])
    else:
        language = [None] * len(flat)
    scored: list[list[Scored]] = [[] for _ in samples]
    for k, (i, s) in enumerate(flat):
        parts = {name: values[k] for name, values in scores.parts.items()}
        scored[i].append(Scored(len(scored[i]), s.text, len(s.token_ids), s.finished, parts, scores.total[k], language[k]))
    return scored


@dataclass
class _Tally:
    """Running counts for the stage's metrics."""

    generated: int = 0
    accepted: int = 0
    covered: int = 0
    zero: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    by_difficulty: dict[Any, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    score_sums: Counter[str] = field(default_factory=Counter)
    score_counts: Counter[str] = field(default_factory=Counter)
    gap_sum: float = 0.0  # output: pairs, Σ chosen − rejected weighted score

    def add(self, samples: list[Scored], kept: list[int], dropped: Counter[str], difficulty: Any) -> None:
        self.generated += len(samples)
        self.accepted += len(kept)
        self.covered += bool(kept)
        self.zero += not kept
        self.dropped.update(dropped)
        for s in samples:
            for name, value in s.scores.items():
                if value is not None:
                    self.score_sums[name] += value
                    self.score_counts[name] += 1
        if difficulty is not None:
            self.by_difficulty[difficulty][0] += len(samples)
            self.by_difficulty[difficulty][1] += len(kept)

    def state_dict(self) -> dict[str, Any]:
        """The counts as JSON, for the chunk commits a resumed stage continues from."""
        return {
            "generated": self.generated, "accepted": self.accepted, "covered": self.covered, "zero": self.zero,
            "dropped": dict(self.dropped), "score_sums": dict(self.score_sums), "score_counts": dict(self.score_counts),
            "gap_sum": self.gap_sum,
            # a list, not a dict: difficulty values need not be strings, and JSON keys are
            "by_difficulty": [[d, g, a] for d, (g, a) in self.by_difficulty.items()],
        }  # fmt: skip

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _Tally:
        tally = cls(generated=state["generated"], accepted=state["accepted"], covered=state["covered"],
                    zero=state["zero"], dropped=Counter(state["dropped"]), score_sums=Counter(state["score_sums"]),
                    score_counts=Counter(state["score_counts"]), gap_sum=state["gap_sum"])  # fmt: skip
        for d, g, a in state["by_difficulty"]:
            tally.by_difficulty[d] = [g, a]
        return tally

    def metrics(self, num_prompts: int, mixed: int, generation_s: float) -> dict[str, Any]:
        return {
            "num_prompts": num_prompts,
            "num_generated": self.generated,
            "num_accepted": self.accepted,
            "acceptance_rate": round(self.accepted / max(self.generated, 1), 4),
            "prompts_covered": round(self.covered / max(num_prompts, 1), 4),
            "zero_accepted_prompts": self.zero,
            "num_mixed": mixed,
            "mix_share": round(mixed / max(self.accepted + mixed, 1), 4),
            "num_rows": self.accepted + mixed,
            "samples_per_s": round(self.generated / generation_s, 2) if generation_s > 0 else None,
            **{f"dropped/{reason}": n for reason, n in sorted(self.dropped.items())},
            **{f"mean_score/{name}": round(self.score_sums[name] / self.score_counts[name], 4)
               for name in sorted(self.score_counts)},
            **{f"acceptance_rate/difficulty_{d}": round(a / max(g, 1), 4)
               for d, (g, a) in sorted(self.by_difficulty.items())},
        }  # fmt: skip

    def pair_metrics(self, num_prompts: int, generation_s: float) -> dict[str, Any]:
        """output: pairs — a pair's two samples count as accepted; mixing does not apply."""
        metrics = self.metrics(num_prompts, 0, generation_s)
        for key in ("num_mixed", "mix_share"):
            del metrics[key]
        pairs = self.accepted // 2
        metrics.update(num_rows=pairs, num_pairs=pairs, mean_score_gap=round(self.gap_sum / pairs, 4) if pairs else None)
        return metrics


def run(config: Config, ctx: StageContext) -> dict[str, Any]:
    import os
    import random

    assert config.model is not None
    model_spec = config.model
    ledger = RowLedger()  # rows dropped under on_bad_rows: skip
    dataset = load_dataset(config.dataset, ctx.base_dir, ctx.seed, need=prompt_needs(config.rewards, ctx.base_dir),
                           ledger=ledger)  # fmt: skip
    rules = KeepRules.from_config(config)
    scorer = Scorer.build(config.rewards, config.reward_model, config.reward_model_weight, base_dir=ctx.base_dir,
                          reward_model_batch_size=config.reward_model_batch_size, seed=ctx.seed,
                          max_rule_failure_rate=config.max_rule_failure_rate,
                          rule_failure_min_samples=config.rule_failure_min_samples)  # fmt: skip
    language_rule = None
    if config.language is not None:
        language_rule = bind_rule(resolve_rule("language_consistency"), {"language": config.language,
                                                                           **config.language_params}, "language")
    source_model = resolve_model_path(model_spec.name_or_path, ctx.base_dir)
    sample = load_sampler(model_spec, config, seed=ctx.seed)
    written = PROVENANCE_COLUMNS if config.output == "sft" else PAIR_COLUMNS
    columns = [c for c in dataset.column_names if c != "prompt" and c not in REPLACED_COLUMNS | written]
    chunks = range(0, len(dataset), config.chunk_size)
    bar = StageProgress(ctx.out_dir, ctx.name, len(dataset) * config.num_generations, unit="sample", phase="sampling")
    # Data parallel under a multi-process launch: each rank samples its share of a chunk (the sampler
    # gathers them), every rank scores and tallies the whole chunk alike, the first one writes.
    writer = os.environ.get("RANK", "0") == "0"
    with ChunkedJsonl(ctx.out_dir, [ARTIFACTS["dataset"], ARTIFACTS["rejected_prompts"]], writer=writer) as files, bar:
        # A resumed stage continues after its last committed chunk, with the counts as they were then;
        # each chunk's sampling seed is its own, so the rows are those of an uninterrupted run.
        chunks_done, state = files.open()
        tally = _Tally.from_state(state["tally"]) if state else _Tally()
        generation_s = state.get("generation_s", 0.0)
        earlier_failures: Counter[str] = Counter(state.get("rule_failures", {}))
        if chunks_done:
            bar.update(min(chunks_done * config.chunk_size, len(dataset)) * config.num_generations)
            logger.info("rejection_sampling: resuming after %d of %d chunks (%d samples kept so far)", chunks_done,
                        len(chunks), tally.accepted)  # fmt: skip
        for chunk_no, start, rows in pending_chunks(dataset, config.chunk_size, chunks_done):
            prompts = [chat_prompt(row["prompt"], config.system_prompt, config.conversational) for row in rows]
            conversational = not isinstance(prompts[0], str)
            began = time.perf_counter()
            done = start * config.num_generations
            samples = sample(prompts, num_samples=config.num_generations, seed=ctx.seed + chunk_no,
                             progress=lambda n, done=done: bar.update(done + n))  # fmt: skip
            generation_s += time.perf_counter() - began
            chunk = score_samples(scorer, language_rule, prompts, rows, samples)
            for prompt, row, scored in zip(prompts, rows, chunk, strict=True):
                original = {c: row[c] for c in columns}
                if config.output == "pairs":
                    pair, dropped = pick_pair(scored, rules, config.pair_margin)
                    kept = list(pair or ())
                    if pair is not None:
                        chosen, worse = scored[pair[0]], scored[pair[1]]
                        tally.gap_sum += chosen.total - worse.total
                        files.write(ARTIFACTS["dataset"], {
                            "prompt": prompt, **original,
                            "chosen": _completion_value(chosen.text, conversational),
                            "rejected": _completion_value(worse.text, conversational),
                            "source": "rejection_sampling", "source_model": source_model,
                            "chosen_index": chosen.index, "rejected_index": worse.index,
                            "chosen_score": chosen.total, "rejected_score": worse.total,
                            "chosen_scores": dict(chosen.scores), "rejected_scores": dict(worse.scores),
                            "score_gap": chosen.total - worse.total,
                        })  # fmt: skip
                else:
                    kept, dropped = judge(scored, rules)
                    for j in kept:
                        files.write(ARTIFACTS["dataset"], {
                            "prompt": prompt, "completion": _completion_value(scored[j].text, conversational),
                            **original, "source": "rejection_sampling", "source_model": source_model,
                            "sample_index": j, "score": scored[j].total, "scores": dict(scored[j].scores),
                        })  # fmt: skip
                tally.add(scored, kept, dropped, row.get("difficulty"))
                if not kept:
                    best = max((s.total for s in scored), default=None)
                    files.write(ARTIFACTS["rejected_prompts"], {"prompt": prompt, **original, "num_samples": len(scored),
                                                                "best_score": best, "dropped": dict(dropped)})  # fmt: skip
            files.commit(chunk_no + 1, {"tally": tally.state_dict(), "generation_s": generation_s,
                                        "rule_failures": dict(earlier_failures + Counter(scorer.failures()))})  # fmt: skip
            logger.info("rejection_sampling: %d/%d prompts done, %d of %d samples kept",
                        min(start + config.chunk_size, len(dataset)), len(dataset), tally.accepted, tally.generated)

        # The mix comes after the last commit: a stage killed while mixing redoes only the mix.
        mixed = 0
        if config.mix_dataset is not None:
            pairs = _sft_pairs(load_dataset(config.mix_dataset, ctx.base_dir, ctx.seed, need=MIX_NEEDS, ledger=ledger,
                                            key="mix_dataset"))  # fmt: skip
            wanted = mix_count(tally.accepted, config.mix_ratio)
            if wanted > len(pairs):
                logger.warning("rejection_sampling: mix dataset has %d rows, %d wanted for mix_ratio %.3g; using all",
                               len(pairs), wanted, config.mix_ratio)  # fmt: skip
            random.Random(ctx.seed).shuffle(pairs)
            empty = dict.fromkeys(columns)
            for prompt, completion in pairs[:wanted]:
                files.write(ARTIFACTS["dataset"], {
                    "prompt": chat_prompt(prompt, config.system_prompt, config.conversational), "completion": completion,
                    **empty, "source": "mix", "source_model": None, "sample_index": None, "score": None, "scores": None,
                })  # fmt: skip
                mixed += 1
        files.commit(len(chunks), {"tally": tally.state_dict(), "generation_s": generation_s,
                                   "rule_failures": dict(earlier_failures + Counter(scorer.failures()))})  # fmt: skip

    if config.output == "pairs":
        metrics = tally.pair_metrics(len(dataset), generation_s)
    else:
        metrics = tally.metrics(len(dataset), mixed, generation_s)
    metrics.update(scorer.failure_metrics("rejection_sampling", earlier_failures), **ledger.metrics())
    if config.output == "pairs" and tally.accepted == 0:
        raise RuntimeError(f"no prompt gave two samples whose weighted scores differ by ≥ pair_margin "
                           f"({config.pair_margin:g}) (dropped: {dict(tally.dropped)}); "
                           f"{ARTIFACTS['rejected_prompts']} has each prompt's best score and drop reasons")
    if tally.accepted + mixed == 0:
        # An empty dataset would only fail later, inside the next stage's data loading.
        raise RuntimeError(f"none of {tally.generated} samples passed (dropped: {dict(tally.dropped)}); "
                           f"{ARTIFACTS['rejected_prompts']} has each prompt's best score and drop reasons")
    if tally.accepted == 0:
        logger.warning("rejection_sampling: no sample passed; the dataset holds only mixed-in rows")
    logger.info("rejection_sampling: kept %d of %d samples (%.1f %%), %d prompts with none, %d rows mixed in",
                tally.accepted, tally.generated, 100 * metrics["acceptance_rate"], tally.zero, mixed)  # fmt: skip
    return metrics
