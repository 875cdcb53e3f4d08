"""distill: teach a smaller student what a teacher does — R1's last step ("distillation: empower small
models with reasoning capability": R1's 800k curated samples fine-tune Qwen/Llama students by SFT alone).

Traces (`traces`): `teacher` — the teacher samples `num_generations` completions for each prompt of
`dataset` (batched with the KV cache, or vLLM), written to `traces.jsonl`; `dataset` — the dataset's
own completions are the traces (e.g. `${stages.rs.dataset}`, which is what R1 did); `auto` — `dataset`
when the data has completions (messages or prompt/completion), else `teacher`. Under a multi-process
launcher every process samples all the traces (same seed, same traces) before training on its shard;
for big trace sets sample them in a rejection_sampling stage (vLLM, filtered) and use `traces: dataset`.

Methods (`method`):
- `sequence` (default, the R1 way): the student is fine-tuned on the traces with TRL's `SFTTrainer`,
  exactly as the sft stage trains (same data preparation, completion-only loss). Teacher and student
  may have different tokenizers and architectures.
- `logit`: the student matches the teacher's next-token distributions on the traces with TRL's
  `GKDTrainer` (generalised JSD: `beta` 0 = forward KL, 1 = reverse KL; `lmbda` = share of batches
  replaced by the student's own samples, i.e. on-policy; `seq_kd` = replaced by fresh teacher
  samples). It needs a shared vocabulary, checked at validation when both models are local or
  embedded (references are followed back to the model they were trained from).
  Why GKDTrainer and not TRL's stable `DistillationTrainer`: that one is on-policy only — every step
  the student generates and the teacher scores — which gives noise from a freshly initialised
  student and spends most of a CPU step in generation; GKD covers off-policy (lmbda 0, our
  default), mixed and on-policy (lmbda 1) with one config. On the embedded task both methods bring
  align:tiny-student to its teacher's accuracy (800 steps on 4000 greedy teacher traces: sequence
  94.5 %, logit 95.0 %, teacher 91.5 % held-out); a logit step costs ~1.3× a sequence step.

The student (`student`, default `align:tiny-student`: ≤ 1/4 of `align:tiny`'s parameters, same
tokenizer) may be any causal LM; `lora:` trains it as LoRA. The teacher is `teacher`, else the stage's
`model`. Every other `GKDConfig` / `SFTConfig` field may be set on the stage as-is (GKD-only ones only
with method: logit). Metrics add the parameter counts of both and their ratio, the number of traces,
and, when the teacher wrote them and the data has a `solution` column, the traces' accuracy.
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt

from align.artifacts import ChunkedJsonl, StageContext, read_committed
from align.console import StageProgress
from align.data import (
    PROMPT_NEEDS,
    SFT_NEEDS,
    Needs,
    RowLedger,
    chat_prompt,
    load_dataset,
    message_text,
    pending_chunks,
)
from align.generation import load_sampler
from align.models import (
    checkpoint_parameter_count,
    count_parameters,
    device,
    load_causal_lm,
    load_tokenizer,
    load_trainable,
    resolve_model_path,
    vocabulary_mismatch,
)
from align.recipe.checks import CheckContext
from align.recipe.schema import Data, LoraSpec, Model, ModelSpec, SamplingKnobs, TrlStageConfig
from align.training import (
    attach_console,
    final_train_metrics,
    fit,
    guard_callback,
    metrics_callback,
    prepare_sft_dataset,
    run_sft,
    save_trained_model,
    trl_config,
)

logger = logging.getLogger("align")
# GKD lives in trl.experimental, which warns on every import; align pins trl to one minor version
# (pyproject), so the API this stage uses cannot move under it.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

ARTIFACTS = {"model": "model", "traces": "traces.jsonl"}
#: GKDConfig fields SFTConfig lacks: meaningless for method: sequence.
GKD_ONLY_KEYS = ("lmbda", "beta", "seq_kd", "max_new_tokens", "disable_dropout")
#: Set from `teacher:`, never directly.
TEACHER_KEYS = ("teacher_model_name_or_path", "teacher_model_init_kwargs")


class Config(TrlStageConfig, SamplingKnobs):
    trl_config_class: ClassVar[str | None] = "trl.experimental.gkd:GKDConfig"

    type: Literal["distill"] = "distill"
    dataset: Data = Field(description="Prompts (teacher traces) or SFT data whose completions are the traces.")
    teacher: Model | None = Field(default=None, description="Default: the stage's `model`.")
    student: Model = Field(default_factory=lambda: ModelSpec(name_or_path="align:tiny-student"))
    method: Literal["sequence", "logit"] = "sequence"
    traces: Literal["auto", "teacher", "dataset"] = "auto"
    system_prompt: str | None = Field(default=None, description="Prepended to conversational prompts that lack one.")
    conversational: bool = Field(default=True, description="Plain-string prompts become a user message (chat template).")
    lora: LoraSpec | None = Field(default=None, description="Train the student as LoRA.")

    # teacher traces: the shared sampler's settings (and GKD's on-policy samples: `temperature` is GKDConfig's too)
    num_generations: PositiveInt = Field(default=1, description="Teacher traces per prompt.")
    temperature: float = Field(default=0.6, ge=0.0, description="Sampling temperature; 0 = greedy traces.")
    drop_truncated: bool = Field(default=True, description="Drop teacher traces that never emitted EOS.")
    chunk_size: PositiveInt = Field(
        default=4096, description="Prompts sampled and written per chunk: a resumed stage continues after the last."
    )

    # logit-level (GKDConfig's names; both defaults differ from TRL's 0.5: a fresh student's own
    # samples teach it nothing, and forward KL learnt far faster than JSD(0.5) on the embedded task —
    # 300 steps into align:tiny-student: 43.5 % vs 12 % held-out accuracy)
    lmbda: float = Field(default=0.0, ge=0.0, le=1.0, description="Share of on-policy (student-sampled) batches.")
    beta: float = Field(default=0.0, ge=0.0, le=1.0, description="Generalised JSD: 0 forward KL, 1 reverse KL.")
    seq_kd: bool = Field(default=False, description="Replace off-policy batches by fresh teacher samples.")

    learning_rate: float = Field(default=2e-5, gt=0)
    max_length: PositiveInt | None = 1024
    packing: bool = False


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------


def _has_traces(columns: set[str]) -> bool:
    return "messages" in columns or {"prompt", "completion"} <= columns


def needs(config: Config) -> Needs:
    """Every row: traces (messages, or prompt + completion) or a prompt for the teacher, as `traces` says."""
    traces = SFT_NEEDS.layouts[:2]
    return Needs({"dataset": traces, "teacher": PROMPT_NEEDS.layouts}.get(config.traces, (*traces, *PROMPT_NEEDS.layouts)))


def check(config: Config, ctx: CheckContext) -> None:
    ctx.check_rows(config.dataset, ("dataset",), needs(config))
    columns = ctx.dataset_columns(config.dataset, ("dataset",))
    if columns is not None:
        if config.traces == "dataset" and not _has_traces(columns):
            ctx.error(("dataset", "path"), f"traces: dataset needs columns messages or prompt+completion; "
                      f"'{config.dataset.path}' has: {', '.join(sorted(columns))}")
        elif config.traces != "dataset" and "prompt" not in columns and not _has_traces(columns):
            ctx.error(("dataset", "path"), f"dataset '{config.dataset.path}' needs a prompt column (teacher traces) "
                      f"or messages / prompt+completion; it has: {', '.join(sorted(columns))}")
    extra = config.model_extra or {}
    for key in TEACHER_KEYS:
        if key in extra:
            ctx.error((key,), f"'{key}' is set from `teacher:`; remove it")
    if config.method == "sequence":
        for key in GKD_ONLY_KEYS:
            if key in config.model_fields_set or key in extra:
                ctx.error((key,), f"'{key}' only applies to method: logit (GKD); method is sequence")
    else:
        if config.packing:
            ctx.error(("packing",), "method: logit (GKD) cannot pack sequences; set packing: false")
        if not config.conversational:
            ctx.error(("conversational",), "method: logit (GKD) needs conversational data (chat messages)")
        if config.temperature == 0.0 and (config.lmbda > 0 or config.seq_kd):
            ctx.error(("temperature",), "on-policy / seq_kd samples need temperature > 0")
    ctx.check_sampling(config, config.num_generations, "num_generations")
    ctx.check_lora(config.lora)
    ctx.check_model(config.teacher, ("teacher",))
    ctx.check_model(config.student, ("student",))
    ctx.check_context(config.teacher or ctx.model_spec(config), config, ("max_completion_length",))
    ctx.check_context(config.student, config, ("max_length",))
    teacher = config.teacher or ctx.model_spec(config)
    if ctx.check_models and config.method == "logit":
        problem = vocabulary_mismatch(ctx.origin_model(teacher), ctx.origin_model(config.student), ctx.base_dir,
                                      ("teacher", "student"))
        if problem:
            ctx.error(("student",), f"method: logit needs teacher and student to share a vocabulary: {problem}")


def output_columns(config: Config) -> set[str] | None:
    return None


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------


def trace_source(config: Config, columns: list[str]) -> Literal["teacher", "dataset"]:
    if config.traces == "auto":
        return "dataset" if _has_traces(set(columns)) else "teacher"
    return config.traces


def _teacher_traces(config: Config, teacher: ModelSpec, dataset: Any, ctx: StageContext) -> tuple[Any, dict[str, Any]]:
    """Sample the teacher's traces for every prompt; return them as a prompt/completion dataset (the
    prompt's other columns kept) and figures about them. Written to `traces.jsonl` a chunk at a time
    (by the first process: under accelerate each samples its share and all get every trace), so a resumed
    stage samples only the chunks not yet committed; each chunk has its own seed, so the traces are
    those of an uninterrupted run."""
    from datasets import Dataset

    name = ARTIFACTS["traces"]
    writer = ChunkedJsonl(ctx.out_dir, [name]) if os.environ.get("RANK", "0") == "0" else None
    if writer is not None:
        writer.open()  # cuts the file back to its last commit, which is what is read next
    chunks_done, state, traces = read_committed(ctx.out_dir, name)
    truncated = state.get("dropped_truncated", 0)
    chunks = range(0, len(dataset), config.chunk_size)
    if chunks_done:
        logger.info("distill: resuming trace sampling after %d of %d chunks (%d traces)", chunks_done, len(chunks), len(traces))
    try:
        sample = load_sampler(teacher, config, seed=ctx.seed) if chunks_done < len(chunks) else None
        total = len(dataset) * config.num_generations
        with StageProgress(ctx.out_dir, ctx.name, total, unit="sample", phase="traces") as bar:
            for chunk_no, start, rows in pending_chunks(dataset, config.chunk_size, chunks_done, "trace chunk"):
                prompts = [chat_prompt(row["prompt"], config.system_prompt, config.conversational) for row in rows]
                done = start * config.num_generations
                assert sample is not None
                samples = sample(prompts, num_samples=config.num_generations, seed=ctx.seed + chunk_no,
                                 progress=lambda n, done=done: bar.update(done + n))  # fmt: skip
                for row, prompt, row_samples in zip(rows, prompts, samples, strict=True):
                    extra = {k: v for k, v in row.items() if k not in ("prompt", "completion", "messages", "text")}
                    for s in row_samples:
                        if config.drop_truncated and not s.finished:
                            truncated += 1
                            continue
                        completion = [{"role": "assistant", "content": s.text}] if not isinstance(prompt, str) else s.text
                        trace = {"prompt": prompt, "completion": completion, **extra}
                        traces.append(trace)
                        if writer is not None:
                            writer.write(name, trace)
                if writer is not None:
                    writer.commit(chunk_no + 1, {"dropped_truncated": truncated})
    finally:
        if writer is not None:
            writer.close()
    figures: dict[str, Any] = {"num_traces": len(traces), "dropped_truncated": truncated}
    if traces and "solution" in traces[0]:
        from reward_rules import RULES

        correct = RULES["accuracy"]([message_text(t["completion"]) for t in traces], solution=[t["solution"] for t in traces])
        figures["trace_accuracy"] = round(sum(c or 0.0 for c in correct) / len(traces), 4)
    if not traces:
        raise RuntimeError("the teacher produced no usable trace (all truncated?); raise max_completion_length")
    return Dataset.from_list(traces), figures


def _as_messages(dataset: Any) -> Any:
    """GKD's collator reads whole conversations from `messages` (and a `prompt` column would be taken
    as an already-rendered prompt string), so prompt/completion rows become messages."""
    if "messages" in dataset.column_names:
        return dataset
    return dataset.map(lambda row: {"messages": row["prompt"] + row["completion"]}, remove_columns=["prompt", "completion"])


def _check_shared_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any, teacher: Any, student: Any) -> None:
    t_size, s_size = teacher.config.get_text_config().vocab_size, student.config.get_text_config().vocab_size
    if t_size != s_size or teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ValueError(f"method: logit needs a shared vocabulary; teacher vocab_size {t_size}, student {s_size}"
                         + ("" if t_size != s_size else ", and their tokenizers map tokens to ids differently"))


def run(config: Config, ctx: StageContext) -> dict[str, Any]:
    teacher = config.teacher or config.model
    assert teacher is not None
    ledger = RowLedger()  # rows dropped under on_bad_rows: skip
    dataset = load_dataset(config.dataset, ctx.base_dir, ctx.seed, need=needs(config), ledger=ledger)
    figures: dict[str, Any] = {}
    if trace_source(config, dataset.column_names) == "teacher":
        train, figures = _teacher_traces(config, teacher, dataset, ctx)
    else:
        train = dataset
        figures["num_traces"] = len(train)
        ctx.artifact(ARTIFACTS["traces"]).touch()  # the traces are the dataset's; nothing new to write
    if config.method == "sequence":
        trainer, metrics = run_sft(config, ctx, config.student, train, lora=config.lora,
                                   system_prompt=config.system_prompt)  # fmt: skip
        student_params = metrics.pop("num_params")
        teacher_params = checkpoint_parameter_count(resolve_model_path(teacher.name_or_path, ctx.base_dir))
    else:
        metrics, student_params, teacher_params = _train_logit(config, ctx, teacher, train)
    metrics = {**figures, **metrics, **ledger.metrics(), "student_params": student_params}
    if teacher_params:
        metrics["teacher_params"] = teacher_params
        metrics["student_teacher_param_ratio"] = round(student_params / teacher_params, 4)
    return metrics


def _train_logit(config: Config, ctx: StageContext, teacher: ModelSpec, train: Any) -> tuple[dict[str, Any], int, int]:
    """Logit-level KD on TRL's GKDTrainer: the student matches the teacher's next-token distributions."""
    from trl.experimental.gkd import GKDTrainer

    train = prepare_sft_dataset(train, config.system_prompt)
    tokenizer = load_tokenizer(config.student, padding_side="right")
    precision = config.precision()
    work_dir = ctx.artifact("trainer")
    args = trl_config(config, work_dir)  # first: ZeRO-3 partitions only models loaded after it
    trainable = load_trainable(config.student, config.lora, precision=precision)
    student_params = count_parameters(trainable.model)  # before LoRA adds its own
    teacher_model = load_causal_lm(teacher, precision=precision).to(device()).eval()
    _check_shared_vocabulary(load_tokenizer(teacher), tokenizer, teacher_model, trainable.model)
    trainer = GKDTrainer(model=trainable.model, teacher_model=teacher_model, args=args,
                         train_dataset=_as_messages(train), processing_class=tokenizer, peft_config=trainable.peft_config,
                         callbacks=[metrics_callback(ctx.metrics), guard_callback()])  # fmt: skip
    attach_console(trainer, ctx)
    logger.info("distill (logit): %d traces, student %s parameters", len(train), f"{student_params:,}")
    result = fit(trainer, ctx.metrics.path)
    metrics = final_train_metrics(trainer, result)
    save_trained_model(trainer, tokenizer, ctx.artifact(ARTIFACTS["model"]), config.lora, work_dir, config.student)
    return metrics, student_params, count_parameters(teacher_model)
