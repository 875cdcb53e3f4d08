"""THE sampler, shared by eval, rejection sampling, distillation traces and PPO rollouts: prompts are
rendered with the chat template, left-padded, and generated many at a time with the KV cache (HF
`generate`), or handed to vLLM. `load_sampler` builds one from a model spec and the shared sampling
settings (`SamplingKnobs`); PPO, which samples from the policy it trains, calls `generate_rollout`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from align.models import (
    device,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
    stop_token_ids,
    use_stop_tokens,
)
from align.precision import precision_policy
from align.recipe.schema import ModelSpec, SamplingKnobs

if TYPE_CHECKING:
    from torch import Tensor

Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class Sample:
    text: str
    token_ids: list[int]
    finished: bool  # ended with EOS rather than hitting max_new_tokens


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class Rollout:
    """Token tensors of one generated batch, on the model's device (what PPO trains on)."""

    query_ids: Tensor  # [B, Lq] left-padded prompts
    query_mask: Tensor  # [B, Lq] 1 = real prompt token
    response_ids: Tensor  # [B, Lr] generated tokens; `pad_id` after the first EOS
    response_mask: Tensor  # [B, Lr] bool: real response tokens, the first EOS included
    finished: Tensor  # [B] bool: the response ended with EOS rather than at max_new_tokens


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt: a conversation rendered with the chat template (which writes any BOS
    itself), raw text with the tokenizer's own special tokens (its BOS), as TRL's GRPO encodes both."""
    return [tokenizer(render_prompt(tokenizer, p), add_special_tokens=isinstance(p, str))["input_ids"] for p in prompts]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-padded `[B, L]` ids and attention mask: generation appends on the right."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention[i, width - len(ids) :] = 1
    return input_ids, attention


def generate_tensors(
    model: Any,
    query_ids: Tensor,
    query_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
) -> Rollout:
    """Generate one left-padded batch with the KV cache and return the tokens as tensors.

    Sampling is from the model's own distribution at `temperature` (nucleus/top-k only if asked):
    repetition penalties or top-k a hub `generation_config.json` sets are switched off, because PPO's
    log-probs assume the tokens were drawn from softmax(logits / temperature) and nothing else."""
    import torch

    device = next(model.parameters()).device
    sampling: dict[str, Any] = {"do_sample": temperature > 0, "repetition_penalty": 1.0}
    if temperature > 0:
        sampling.update(temperature=temperature, top_p=top_p, top_k=top_k or 0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=query_ids.to(device),
                attention_mask=query_mask.to(device),
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_ids,
                pad_token_id=pad_id,
                **sampling,
            )
    finally:
        model.train(was_training)
    response = out[:, query_ids.shape[1] :]
    is_eos = torch.isin(response, torch.tensor(eos_ids, device=response.device))
    # A token is real up to and including the first EOS: cumsum counts EOS seen *before* it.
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    response_mask = before == 0
    response = torch.where(response_mask, response, torch.full_like(response, pad_id))
    return Rollout(query_ids.to(device), query_mask.to(device), response, response_mask, is_eos.any(dim=1))


def generate_rollout(
    model: Any,
    queries: Sequence[Sequence[int]],
    *,
    chunk_size: int,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    temperature: float = 0.0,
) -> Rollout:
    """`generate_tensors` over prompt token lists in chunks of `chunk_size`, in order, as one batch:
    queries left-padded and responses right-padded to common widths."""
    import torch
    from torch.nn.functional import pad

    chunks = []
    for start in range(0, len(queries), chunk_size):
        ids, attention = left_pad(queries[start : start + chunk_size], pad_id)
        chunks.append(generate_tensors(model, ids, attention, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                       pad_id=pad_id, temperature=temperature))  # fmt: skip
    query_width = max(c.query_ids.shape[1] for c in chunks)
    response_width = max(c.response_ids.shape[1] for c in chunks)
    return Rollout(
        torch.cat([pad(c.query_ids, (query_width - c.query_ids.shape[1], 0), value=pad_id) for c in chunks]),
        torch.cat([pad(c.query_mask, (query_width - c.query_mask.shape[1], 0)) for c in chunks]),
        torch.cat([pad(c.response_ids, (0, response_width - c.response_ids.shape[1]), value=pad_id) for c in chunks]),
        torch.cat([pad(c.response_mask, (0, response_width - c.response_mask.shape[1])) for c in chunks]),
        torch.cat([c.finished for c in chunks]),
    )


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    batch_size: int = 64,
    seed: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[list[Sample]]:
    """`num_samples` completions for each prompt (greedy when temperature is 0). Prompts of similar
    length are batched together so little compute goes to padding; results keep the input order.
    `progress(n)` is called after each batch with the number of completions done so far."""
    import torch

    _check_sampling(temperature, num_samples)
    if seed is not None:
        torch.manual_seed(seed)
    encoded = encode_prompts(tokenizer, prompts)
    jobs = sorted(((i, s) for i in range(len(prompts)) for s in range(num_samples)), key=lambda j: len(encoded[j[0]]))
    results: list[list[Sample | None]] = [[None] * num_samples for _ in prompts]
    eos_ids, pad_id = eos_and_pad_ids(model, tokenizer)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        input_ids, attention = left_pad([encoded[i] for i, _ in batch], pad_id)
        out = generate_tensors(
            model, input_ids, attention, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
            temperature=temperature, top_p=top_p, top_k=top_k,
        )
        for row, (i, s) in enumerate(batch):
            results[i][s] = _to_sample(out.response_ids[row].tolist(), eos_ids, pad_id, tokenizer)
        if progress is not None:
            progress(start + len(batch))
    return [[s for s in row if s is not None] for row in results]


def eos_and_pad_ids(model: Any, tokenizer: Any) -> tuple[list[int], int]:
    """The ids that end a response (`models.stop_token_ids`), and the one to pad with (the first of
    them when the tokenizer has no pad)."""
    eos_ids = stop_token_ids(model, tokenizer)
    return eos_ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def _check_sampling(temperature: float, num_samples: int) -> None:
    if temperature == 0.0 and num_samples > 1:
        raise ValueError("greedy decoding (temperature 0) gives identical samples; set temperature > 0")


def _to_sample(ids: list[int], eos_ids: list[int], pad_id: int, tokenizer: Any) -> Sample:
    finished = False
    for cut, token in enumerate(ids):
        if token in eos_ids:
            ids, finished = ids[: cut + 1], True
            break
    else:
        while ids and ids[-1] == pad_id and pad_id not in eos_ids:
            ids = ids[:-1]
    return Sample(tokenizer.decode(ids, skip_special_tokens=True), ids, finished)


# ------------------------------------------------------------------------------------------------
# vLLM (optional): the same `list[list[Sample]]` contract as `generate`, for stages that sample a lot
# (eval, rejection sampling, distillation traces) on GPUs. Kept separate so the HF path never imports it.
# ------------------------------------------------------------------------------------------------


def load_vllm(
    model_path: str,
    *,
    tokenizer_path: str | None = None,
    seed: int = 0,
    dtype: str = "auto",
    gpu_memory_utilization: float = 0.9,
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """A vLLM engine for a full checkpoint folder or hub id (vLLM cannot load an unmerged PEFT adapter)."""
    from pathlib import Path

    if Path(model_path, "adapter_config.json").exists():
        raise ValueError(f"{model_path} is a PEFT adapter; vLLM needs full weights (set lora.merge: true when training it)")
    from vllm import LLM

    return LLM(
        model=model_path,
        tokenizer=tokenizer_path or model_path,
        seed=seed,
        dtype=dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size,
        max_model_len=max_model_len,
        trust_remote_code=trust_remote_code,
    )


def generate_vllm(
    llm: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    stop_token_ids: list[int] | None = None,
) -> list[list[Sample]]:
    """`generate` on a vLLM engine. Prompts go in as token ids encoded exactly as the HF path encodes
    them, so a chat template that already writes BOS does not get a second one from vLLM; a response
    ends at any of `stop_token_ids` (the same ids the HF path stops at)."""
    from vllm import SamplingParams

    _check_sampling(temperature, num_samples)
    params = SamplingParams(
        n=num_samples,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k or -1,
        max_tokens=max_new_tokens,
        seed=seed,
        skip_special_tokens=True,
        stop_token_ids=stop_token_ids or None,
    )
    requests = [{"prompt_token_ids": ids} for ids in encode_prompts(tokenizer, prompts)]
    outputs = llm.generate(requests, params, use_tqdm=False)
    return [
        [Sample(c.text, list(c.token_ids), c.finish_reason == "stop") for c in out.outputs] for out in outputs
    ]


class Sampler:
    """One loaded model (HF or vLLM) and the stage's sampling settings:
    `sampler(prompts, num_samples=n, seed=s)` → `num_samples` samples per prompt, in order."""

    def __init__(self, tokenizer: Any, knobs: SamplingKnobs, stop_ids: list[int], *, model: Any = None,
                 llm: Any = None) -> None:  # fmt: skip
        assert (model is None) != (llm is None), "a sampler runs on an HF model or a vLLM engine"
        self.tokenizer = tokenizer
        self.knobs = knobs
        self.stop_ids = stop_ids
        self.model = model
        self.llm = llm

    def __call__(self, prompts: Sequence[Prompt], *, num_samples: int = 1, seed: int | None = None,
                 progress: Callable[[int], None] | None = None) -> list[list[Sample]]:  # fmt: skip
        """`progress(n)`: called with the number of completions done so far (vLLM: once, at the end).
        Data parallel when the stage runs in several processes: each rank samples every world-th
        prompt (with its own seed) and every rank gets all the samples back, in prompt order."""
        rank, world = data_parallel_world()
        if world == 1:
            return self._sample(prompts, num_samples, seed, progress)
        import torch.distributed as dist

        mine = self._sample(list(prompts[rank::world]), num_samples, None if seed is None else seed + rank, progress)
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, mine)
        out: list[Any] = [None] * len(prompts)
        for part_rank, part in enumerate(parts):
            out[part_rank::world] = part
        return out

    def _sample(self, prompts: Sequence[Prompt], num_samples: int, seed: int | None,
                progress: Callable[[int], None] | None) -> list[list[Sample]]:  # fmt: skip
        knobs = self.knobs
        if self.llm is not None:
            out = generate_vllm(self.llm, self.tokenizer, prompts, num_samples=num_samples,
                                max_new_tokens=knobs.max_completion_length, temperature=knobs.temperature,
                                top_p=knobs.top_p, top_k=knobs.top_k, seed=seed, stop_token_ids=self.stop_ids)  # fmt: skip
            if progress is not None:
                progress(len(prompts) * num_samples)
            return out
        return generate(self.model, self.tokenizer, prompts, num_samples=num_samples,
                        max_new_tokens=knobs.max_completion_length, temperature=knobs.temperature, top_p=knobs.top_p,
                        top_k=knobs.top_k, batch_size=knobs.generation_batch_size, seed=seed,
                        progress=progress)  # fmt: skip


def data_parallel_world() -> tuple[int, int]:
    """(rank, world size) of the stage's processes. Under a multi-process launch the process group is
    started here if no trainer did (Accelerate's PartialState: gloo on the CPU, NCCL on GPUs)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
    return dist.get_rank(), dist.get_world_size()


def load_sampler(spec: ModelSpec, knobs: SamplingKnobs, *, seed: int = 0) -> Sampler:
    """A sampler over the model `spec` names: vLLM when `knobs.use_vllm`, else HF on this process's
    device, in the compute dtype. Responses end at EOS, the chat template's end of turn, and the
    spec's `stop_tokens`."""
    tokenizer = load_tokenizer(spec, padding_side="left")
    if knobs.use_vllm:
        llm = load_vllm(
            resolve_model_path(spec.name_or_path), tokenizer_path=spec.tokenizer, seed=seed,
            dtype=spec.dtype or precision_policy().frozen_dtype,
            gpu_memory_utilization=knobs.vllm_gpu_memory_utilization, tensor_parallel_size=knobs.vllm_tensor_parallel_size,
            max_model_len=knobs.vllm_max_model_length, trust_remote_code=spec.trust_remote_code,
        )  # fmt: skip
        return Sampler(tokenizer, knobs, stop_token_ids(_generation_defaults(spec), tokenizer, spec.stop_tokens), llm=llm)
    model = load_causal_lm(spec).to(device())
    return Sampler(tokenizer, knobs, use_stop_tokens(model, tokenizer, spec), model=model)


def _generation_defaults(spec: ModelSpec) -> Any:
    """The checkpoint's generation config (its EOS ids), read without loading weights; None if it has none."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(resolve_model_path(spec.name_or_path), revision=spec.revision)
    except (OSError, ValueError):
        return None
    return SimpleNamespace(generation_config=config)
