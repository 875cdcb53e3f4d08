"""align's grpo stage against a plain TRL `GRPOTrainer` script: same model, data, rules, settings.

    OMP_NUM_THREADS=1 python benchmarks/grpo_overhead.py [--steps 30] [--rounds 2]

Runs the two back to back in alternating order (plain, align, plain, align, …), each in its own
process so neither inherits the other's warm caches, and compares TRL's own per-step `step_time`
(generation + rewards + update) and the whole `trainer.train()` wall time per step. Prints the
medians and, last, `step_time_ratio=<align/plain>` (goal ≤ 1.05).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "learning_rate": 3e-5,
    "per_device_train_batch_size": 64,
    "num_generations": 8,
    "max_completion_length": 32,
    "temperature": 1.0,
    "logging_steps": 1,
    "lr_scheduler_type": "constant",
}
WARMUP_STEPS = 2

PLAIN = """
import json, sys, time
import torch
torch.set_num_threads(1)
from trl import GRPOConfig, GRPOTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer
from align.embedded import embedded_model_path
from align.embedded.tasks import make_task_dataset
from reward_rules import RULES

settings, steps, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
path = embedded_model_path("align:tiny")
tokenizer = AutoTokenizer.from_pretrained(path)
tokenizer.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(path)
data = make_task_dataset("align:arithmetic", "train", 2048, seed=0)
args = GRPOConfig(output_dir=out, max_steps=steps, bf16=False, gradient_checkpointing=False, use_cpu=True,
                  report_to="none", save_strategy="no", seed=0, reward_weights=[1.0, 0.5], **settings)
trainer = GRPOTrainer(model=model, reward_funcs=[RULES["accuracy"], RULES["format"]], args=args,
                      train_dataset=data, processing_class=tokenizer)
start = time.perf_counter()
trainer.train()
wall = time.perf_counter() - start
step_times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
print("RESULT " + json.dumps({"step_times": step_times, "wall": wall}))
"""

RECIPE = """\
name: grpo-overhead
model: align:tiny
stages:
  - name: grpo
    type: grpo
    dataset: {{path: "align:arithmetic", split: train, num_examples: 2048}}
    rewards: [{{rule: accuracy, weight: 1.0}}, {{rule: format, weight: 0.5}}]
    max_steps: {steps}
{settings}
"""

ALIGNED = """
import json, sys, time
import torch
torch.set_num_threads(1)
from pathlib import Path
from align.recipe.validate import load_recipe
from align.runner import run_recipe

recipe_path, run_dir = sys.argv[1], Path(sys.argv[2])
recipe = load_recipe(recipe_path)
manifest = run_recipe(recipe, run_dir, report=lambda _: None)
rows = [json.loads(line) for line in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
step_times = [r["step_time"] for r in rows if "step_time" in r]
print("RESULT " + json.dumps({"step_times": step_times, "wall": manifest.record("grpo").metrics["train_runtime_s"]}))
"""


def _run(code: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark run failed:\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"plain": [], "align": []}
    walls: dict[str, list[float]] = {"plain": [], "align": []}
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        body = textwrap.indent("\n".join(f"{k}: {v}" for k, v in SETTINGS.items()), "    ")
        recipe.write_text(RECIPE.format(steps=args.steps, settings=body))
        for round_ in range(args.rounds):
            for kind in ("plain", "align") if round_ % 2 == 0 else ("align", "plain"):
                if kind == "plain":
                    result = _run(PLAIN, json.dumps(SETTINGS), str(args.steps), f"{tmp}/plain{round_}")
                else:
                    result = _run(ALIGNED, str(recipe), f"{tmp}/run{round_}")
                times[kind] += result["step_times"][WARMUP_STEPS:]
                walls[kind].append(result["wall"] / args.steps)
                print(f"round {round_} {kind:5s}: median step {statistics.median(result['step_times'][WARMUP_STEPS:]):.4f}s, "
                      f"train() {result['wall']:.1f}s", flush=True)
    plain, ours = statistics.median(times["plain"]), statistics.median(times["align"])
    print(f"plain TRL GRPOTrainer: median step_time {plain:.4f}s, train() per step {statistics.median(walls['plain']):.4f}s")
    print(f"align grpo stage:      median step_time {ours:.4f}s, train() per step {statistics.median(walls['align']):.4f}s")
    print(f"wall_per_step_ratio={statistics.median(walls['align']) / statistics.median(walls['plain']):.3f}")
    print(f"step_time_ratio={ours / plain:.3f}")


if __name__ == "__main__":
    main()
