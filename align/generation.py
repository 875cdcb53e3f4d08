"""Batched sampling shared by eval, rejection sampling, distillation and PPO rollouts: prompts are
rendered with the chat template, left-padded, and generated many at a time with the KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class Sample:
    text: str
    token_ids: list[int]
    finished: bool  # ended with EOS rather than hitting max_new_tokens


def with_system_prompt(prompt: Prompt, system_prompt: str | None) -> Prompt:
    """Prepend a system message to a conversational prompt that has none."""
    if system_prompt is None or isinstance(prompt, str):
        return prompt
    if prompt and prompt[0].get("role") == "system":
        return prompt
    return [{"role": "system", "content": system_prompt}, *prompt]


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


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
) -> list[list[Sample]]:
    """`num_samples` completions for each prompt (greedy when temperature is 0). Prompts of similar
    length are batched together so little compute goes to padding; results keep the input order."""
    import torch

    if temperature == 0.0 and num_samples > 1:
        raise ValueError("greedy decoding (temperature 0) gives identical samples; set temperature > 0")
    if seed is not None:
        torch.manual_seed(seed)
    texts = [render_prompt(tokenizer, p) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    jobs = sorted(((i, s) for i in range(len(prompts)) for s in range(num_samples)), key=lambda j: len(encoded[j[0]]))
    results: list[list[Sample | None]] = [[None] * num_samples for _ in prompts]
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            width = max(len(encoded[i]) for i, _ in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (i, _) in enumerate(batch):
                ids = encoded[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention[row, width - len(ids) :] = 1
            sampling: dict[str, Any] = {"do_sample": temperature > 0}
            if temperature > 0:
                sampling.update(temperature=temperature, top_p=top_p, top_k=top_k or 0)
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos_ids,
                    pad_token_id=pad_id,
                    **sampling,
                )
            for row, (i, s) in enumerate(batch):
                results[i][s] = _to_sample(out[row, width:].tolist(), eos_ids, pad_id, tokenizer)
    finally:
        model.train(was_training)
    return [[s for s in row if s is not None] for row in results]


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    found = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in found:
        found.append(tokenizer.eos_token_id)
    return found


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
