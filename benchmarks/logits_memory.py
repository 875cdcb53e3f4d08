"""Peak memory of PPO's no-grad log-prob + entropy pass at a Qwen-sized vocabulary, by chunk size.

PPO scores every rollout token under the policy (log-prob and entropy) and the reference (log-prob)
without gradients. Over a full vocabulary one float32 log-softmax of a [B, T, V] batch is
B·T·V·4 bytes (32 × 256 × 151,936 tokens ≈ 5 GB), and the entropy needs a few such temporaries.
`align.rl.functional` takes them over `chunk_size` positions at a time (PPO's `logits_chunk_size`),
so the temporaries are bounded by the chunk, not the batch.

Each line is one fresh process: random bf16 logits of [batch, length, 151936] (what the model
returns under bf16 autocast), then `logprobs_from_logits` + `entropy_from_logits` at temperature 0.7;
peak RSS above the logits themselves is reported (VmHWM − RSS after allocating them).

    OMP_NUM_THREADS=1 python benchmarks/logits_memory.py
    OMP_NUM_THREADS=1 python benchmarks/logits_memory.py --batch 8 --length 256 --chunks 0,512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 151_936  # Qwen2.5's

CHILD = """
import json, sys
sys.path.insert(0, {root!r})
import torch
from align.rl.functional import entropy_from_logits, logprobs_from_logits

def rss_mb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024

torch.manual_seed(0)
logits = torch.randn({batch}, {length}, {vocab}, dtype=torch.bfloat16)
labels = torch.randint(0, {vocab}, ({batch}, {length}))
base = rss_mb("VmRSS:")
chunk = {chunk} or None
with torch.no_grad():
    logp = logprobs_from_logits(logits, labels, chunk, temperature=0.7)
    entropy = entropy_from_logits(logits, chunk, temperature=0.7)
print("RESULT " + json.dumps({{"extra_peak_mb": round(rss_mb("VmHWM:") - base, 1),
                               "logits_mb": round(logits.numel() * 2 / 2**20, 1),
                               "mean_entropy": round(float(entropy.mean()), 4)}}))
"""


def run(batch: int, length: int, chunk: int) -> dict[str, float]:
    code = CHILD.format(root=str(ROOT), batch=batch, length=length, vocab=VOCAB, chunk=chunk)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--chunks", default="0,1024,256", help="positions per chunk; 0 = the whole batch at once")
    args = parser.parse_args()
    for chunk in (int(c) for c in args.chunks.split(",")):
        result = run(args.batch, args.length, chunk)
        positions = args.batch * args.length
        chunk_mb = min(chunk or positions, positions) * VOCAB * 4 / 2**20
        print(json.dumps({"batch": args.batch, "length": args.length, "vocab": VOCAB, "chunk_positions": chunk or "all",
                          "float32_copy_per_chunk_mb": round(chunk_mb, 1), **result}))


if __name__ == "__main__":
    main()
