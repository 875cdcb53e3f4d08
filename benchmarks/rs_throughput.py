"""Rejection-sampling throughput: align's batched generation vs a naive per-prompt `generate` loop.

Both sample `--num-generations` completions for each of `--prompts` held-out arithmetic prompts from
the same model, with the same settings (temperature, top-p, max new tokens, EOS), back to back in one
process; each side runs `--rounds` times alternately and the median wall time counts. The naive loop
is what a script written without thinking about throughput does: one `model.generate` call per prompt
with `num_return_sequences`. align's path (`align.generation.generate`) batches across prompts
(prompts of similar length together, left-padded, KV cache).

    OMP_NUM_THREADS=1 python benchmarks/rs_throughput.py                      # random-init align:tiny
    OMP_NUM_THREADS=1 python benchmarks/rs_throughput.py --model runs/quickstart/sft/model

A random-init model never emits EOS, so every sample runs to max tokens on both sides; a trained model
stops early, which favours the per-prompt loop (a batch waits for its longest sample). Prints one JSON
line: samples/s of each side and the ratio (goal ≥ 3×).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from align.embedded import make_task_dataset  # noqa: E402
from align.generation import generate, render_prompt  # noqa: E402
from align.models import load_causal_lm, load_tokenizer, stop_token_ids  # noqa: E402
from align.recipe.schema import ModelSpec  # noqa: E402


def naive(model: Any, tokenizer: Any, prompts: list[Any], n: int, max_new_tokens: int, temperature: float,
          top_p: float) -> int:  # fmt: skip
    """One `generate` call per prompt; returns the number of samples drawn."""
    eos = stop_token_ids(model, tokenizer)
    drawn = 0
    with torch.no_grad():
        for prompt in prompts:
            enc = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")
            out = model.generate(
                **enc, do_sample=True, temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=n,
                max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            drawn += out.shape[0]
    return drawn


def batched(model: Any, tokenizer: Any, prompts: list[Any], n: int, max_new_tokens: int, temperature: float,
            top_p: float, batch_size: int) -> int:  # fmt: skip
    samples = generate(model, tokenizer, prompts, num_samples=n, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, batch_size=batch_size, seed=0)  # fmt: skip
    return sum(len(row) for row in samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="align:tiny")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    spec = ModelSpec(name_or_path=args.model, dtype="float32")
    tokenizer = load_tokenizer(spec, padding_side="left")
    model = load_causal_lm(spec).eval()
    prompts = make_task_dataset("align:arithmetic", "test", args.prompts, seed=0)["prompt"]
    settings = (args.num_generations, args.max_new_tokens, args.temperature, args.top_p)
    batched(model, tokenizer, prompts[:4], *settings, args.batch_size)  # warm-up: first-call allocations
    times: dict[str, list[float]] = {"naive": [], "batched": []}
    drawn = {}
    for _ in range(args.rounds):
        for side in ("naive", "batched"):
            torch.manual_seed(0)
            began = time.perf_counter()
            if side == "naive":
                drawn[side] = naive(model, tokenizer, prompts, *settings)
            else:
                drawn[side] = batched(model, tokenizer, prompts, *settings, args.batch_size)
            times[side].append(time.perf_counter() - began)
    rate = {side: drawn[side] / statistics.median(times[side]) for side in times}
    print(json.dumps({
        "model": args.model, "prompts": args.prompts, "num_generations": args.num_generations,
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "naive_samples_per_s": round(rate["naive"], 1), "batched_samples_per_s": round(rate["batched"], 1),
        "ratio": round(rate["batched"] / rate["naive"], 2),
        "wall_s": {side: [round(t, 2) for t in ts] for side, ts in times.items()},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
