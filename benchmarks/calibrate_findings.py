"""Calibrate the recipes that reproduce three findings of the field on the embedded world.

    OMP_NUM_THREADS=1 python benchmarks/calibrate_findings.py r1_zero                 # seed 1, as shipped
    OMP_NUM_THREADS=1 python benchmarks/calibrate_findings.py rlhf_rm_only --seeds 1 2
    OMP_NUM_THREADS=1 python benchmarks/calibrate_findings.py distill_vs_rl stages.student_grpo.max_steps=60

Each run is the recipe itself, through `align run` in a fresh process (so every figure is the
recipe's, not a re-implementation's), one seed after the other; extra arguments are recipe overrides.
Prints each run's figures and whether it meets the finding's targets, then one ``SUMMARY {json}``
line. ``--keep DIR`` keeps the run directories. The slow tests (tests/test_findings.py) assert the
same figures, computed by the functions here.

Findings and targets (held-out greedy accuracy on 300 `align:arithmetic` test problems):

* ``r1_zero`` (recipes/r1_zero_tiny.yaml, DeepSeek-R1 §2.2): pretraining on the raw-text corpus →
  GRPO from the base with the R1-Zero template, accuracy + format rules. Targets: accuracy +30
  points during GRPO; format share ≤ 20 % before and ≥ 90 % after; mean completion length in the
  last tenth of GRPO steps ≥ 1.3× the first tenth's; the whole recipe ≤ 10 minutes.
* ``rlhf_rm_only`` (recipes/rlhf_rm_only_tiny.yaml, InstructGPT): SFT → reward model → PPO on the
  reward model alone (the accuracy rule rides along at weight 0: logged, never rewarded). Targets:
  accuracy +10 points; held-out RM score and rule accuracy rising together through PPO.
* ``distill_vs_rl`` (recipes/distill_vs_rl_tiny.yaml, R1 §4.1): the same student distilled from the
  quickstart's teacher vs cold start + GRPO on itself, comparable student compute. Target: the
  distilled student ≥ 5 points above the RL-only one.

Measured (2 shared cores, 1 thread each, transformers 5.24, TRL 1.16; walls drift ±40 % with the
load of the other processes on the machine): see the end of this docstring, newest first.

r1_zero (seed 1, one run each; "base" is eval_base's greedy reply form, gain in points of held-out
accuracy during GRPO; GRPO at 60 steps × 64 completions, 8 per prompt, max 48 tokens, unless said):

* run 9, as shipped: run 3's pretraining (the corpus of commit 9b5e8c3, which the branch keeps),
  mid-run checkpoints off (`save_strategy: "no"`: main made them a default that costs a short
  run time), GRPO at lr 1.5e-4 for 50 steps. Base replies worked (untagged) on 299 of 300 prompts,
  the same base as run 3: 0.537 → 0.843 (+30.7 points), format 0.003 → 1.0, length ×1.67 (20.66
  tokens in the first tenth), 525.4 s (pretrain 314.3, eval_base 11.4, GRPO 188.6, eval_grpo
  11.1; 546 s for the whole process). Every target met.
* run 8 (run 6's corpus variant): styles .02 / .50 / .38 / .10, 30,000 documents, 650 steps. Base
  greedy replies all direct (first token "The" 0.47 against "step" 0.39 and "<think>" 0.14), accuracy
  0.033, format 0. Through GRPO the sampled format share rose 0.14 → 0.92 by step 37 and the mean
  length 23.5 → 40 tokens, but sampled accuracy fell 0.22 → ~0.05: the tagged form (10 % of the
  documents) was the one the base did worst, and the format reward outweighed the accuracy one.
  Stopped at step 37 (a miss on the gain, visible by then); pretrain 7 min on a loaded machine.
* run 7: styles equation .10 / direct .55 / worked .20 / tagged .15, 30,000 documents (one epoch),
  600 pretraining steps, GRPO lr 1e-4, no checkpoints. Base greedy replies all direct ("The answer
  is N."), accuracy 0.047 → 0.040 (−0.7 points): GRPO learnt the format (0 → 1.0 greedy) and the
  length grew ×1.73 (23.7 tokens in the first tenth), but sampled accuracy never left ~0.03: with
  35 % worked/tagged documents the base's column work was too poor to be found and reinforced.
  591.7 s (pretrain 238.6, GRPO 336.3: the longer replies make its later steps slower).
* run 6 (a corpus variant, since reverted: worked replies opening with "step by step", tagged ones
  with "<think>" straight after "Assistant:", so each form has a first token of its own), styles
  .05 / .45 / .25 / .25, 80,000 documents, 600 steps: the base's first token was "<think>" on every held-out prompt (P ≈ 0.44 against "The"
  0.35 and "step" 0.20, far from the documents' shares), so format before = 1.0: stopped after
  eval_base, a miss on "format ≤ 20 % before".
* run 4 (the corpus of commit 9b5e8c3: every reply after "Assistant: ", worked ones opening with
  the first digit sum), styles .05 / .45 / .25 / .25, 80,000 documents, 600 steps, GRPO lr 1e-4:
  base replies all worked (untagged), 0.387 → 0.683 (+29.7), format 0.0 → 1.0, length ×1.33
  (21.96 first tenth), 650.8 s (pretrain 444.6, GRPO 192.1).
* run 3: as run 4 with styles .05 / .50 / .22 / .23 and 700 steps: 0.537 → 0.833 (+29.7), format
  0.003 → 1.0, length ×1.66 (20.65), 621.4 s (pretrain 364.5, GRPO 238.2).
* runs 1–2 (an earlier draft of the corpus, GRPO lr 5e-5): +16.7 (0.063 → 0.230, 546 s; 900 steps of
  8 × 256 wrapped packing) and +9.3 (0.003 → 0.097, 663 s); format 0 → ≥ 0.99, length ×1.7–1.8.

distill_vs_rl (seed 1):

* run 1, as shipped: teacher 0.707 (the quickstart's eval_grpo, as it should be), distilled student
  0.727 (the quickstart's eval_distill); RL-only student 0.117 after its cold start, 0.267 after 100
  GRPO steps: distilled − RL-only = +46.0 points (target ≥ 5). Student optimiser time: RL 74.0 s
  (cold start 12.1 + GRPO 61.9) against distillation 58.0 s, 1.27×. 412 s in all.

rlhf_rm_only (seed 1; the curve is PPO's held-out greedy eval every 10 steps on 300 prompts, as
(step, RM score, rule accuracy); "rising together" allows dips within `accuracy_noise`, 0.08 here):

* run 2, as shipped (temperature 0.7, 100 steps): RM pairwise accuracy 0.9475; accuracy 0.440 →
  0.603 (+16.3 points), KL 1.03 nats; curve (0, 2.72, .440) (20, 2.74, .517) (40, 3.03, .543)
  (60, 3.17, .620) (80, 3.25, .553) (100, 3.26, .603): rising together (the dip 0.593 → 0.553 at
  70 → 80 is within noise). 362 s (SFT 39, RM 131, PPO 189). The same PPO settings on run 1's SFT
  model and RM, run alone before, gave the same figures to the last digit.
* PPO alone on run 1's SFT model and RM, learning rate 5e-5 (temperature 1.0, 100 steps): 0.440 →
  0.607, but the RM score rose 2.71 → 2.89 while accuracy fell 0.397 → 0.263 (steps 20 → 30): a
  stretch of the RM being gamed, not rising together.
* run 1 (temperature 1.0, 60 steps): 0.440 → 0.500 (+6.0), RM 2.72 → 3.02, accuracy down to 0.330
  at step 30 while the RM score rose: miss on both.
* recipes/rlhf_tiny.yaml (RM + accuracy rule at weight 4, 500 held-out prompts), PPO alone on run
  1's SFT model and RM (the same configs as its own): 100 steps 0.452 → 0.702, RM 2.78 → 3.13, KL
  0.97 (PPO 210 s); its 60 steps had given 0.452 → 0.55 here, so it now runs 100.

Walls are the sum of the stages' durations on a machine whose other core ran other developers' test
suites; pretraining ran at 0.38–0.65 s a step (8 × 256 tokens) from one run to the next.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Runnable from a checkout without installing the package.
sys.path.insert(0, str(ROOT))

from align.artifacts import Manifest, read_metrics  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "WANDB_DISABLED": "true"}


# --------------------------------------------------------------------------------------------------
# figures, from a finished run directory
# --------------------------------------------------------------------------------------------------


def stage_metrics(run_dir: Path) -> dict[str, dict[str, Any]]:
    manifest = Manifest.read(run_dir)
    assert manifest is not None, f"no manifest in {run_dir}"
    return {s.name: {**s.metrics, "duration_s": s.duration_s} for s in manifest.stages}


def tenths_ratio(values: list[float]) -> float:
    """Mean of the last tenth of a per-step series over the mean of its first tenth (at least one
    value each)."""
    tenth = max(1, len(values) // 10)
    first, last = values[:tenth], values[-tenth:]
    return (sum(last) / len(last)) / (sum(first) / len(first))


def grpo_lengths(run_dir: Path, stage: str) -> list[float]:
    """Mean sampled completion length (tokens) at each logged GRPO step, in step order."""
    rows = read_metrics(run_dir / stage / "metrics.jsonl", "train")
    return [r["completions/mean_length"] for r in sorted(rows, key=lambda r: r["step"]) if "completions/mean_length" in r]


def r1_zero_figures(run_dir: Path) -> dict[str, Any]:
    metrics = stage_metrics(run_dir)
    base, after = metrics["eval_base"], metrics["eval_grpo"]
    lengths = grpo_lengths(run_dir, "grpo")
    return {
        "accuracy_base": base["accuracy"], "accuracy_grpo": after["accuracy"],
        "gain_points": round(100 * (after["accuracy"] - base["accuracy"]), 1),
        "format_base": base["format"], "format_grpo": after["format"],
        "length_first_tenth": round(sum(lengths[: max(1, len(lengths) // 10)]) / max(1, len(lengths) // 10), 2),
        "length_ratio": round(tenths_ratio(lengths), 3),
        "wall_s": round(sum(m["duration_s"] or 0.0 for m in metrics.values()), 1),
        "stage_s": {name: round(m["duration_s"] or 0.0, 1) for name, m in metrics.items()},
    }


def r1_zero_targets(f: dict[str, Any]) -> dict[str, bool]:
    return {"gain ≥ 30 points": f["gain_points"] >= 30, "format ≤ 20 % before": f["format_base"] <= 0.2,
            "format ≥ 90 % after": f["format_grpo"] >= 0.9, "length ratio ≥ 1.3": f["length_ratio"] >= 1.3,
            "≤ 10 minutes": f["wall_s"] <= 600}


def ppo_curve(run_dir: Path, stage: str = "ppo") -> list[dict[str, float]]:
    """Held-out (step, RM score, rule accuracy) through PPO, from its `eval` rows."""
    rows = read_metrics(run_dir / stage / "metrics.jsonl", "eval")
    return [{"step": r["step"], "rm": round(r["score/reward_model"], 4), "accuracy": round(r["score/accuracy"], 4)}
            for r in sorted(rows, key=lambda r: r["step"])]


def accuracy_noise(accuracy: float, n_problems: int) -> float:
    """Two standard errors of the difference between two held-out accuracies near ``accuracy`` on
    ``n_problems`` problems (independent binomials): what two evals of equally good policies can
    differ by. 0.08 at 0.5 on 300 problems."""
    return 2 * math.sqrt(2 * accuracy * (1 - accuracy) / n_problems)


def rising_together(curve: list[dict[str, float]], n_problems: int) -> bool:
    """Both end above where they started, and no stretch between two evals has the RM score climbing
    while the rule accuracy falls by more than noise (`accuracy_noise` over ``n_problems``): that
    stretch is what optimising a gamed RM looks like."""
    if len(curve) < 2:
        return False
    up = curve[-1]["rm"] > curve[0]["rm"] and curve[-1]["accuracy"] > curve[0]["accuracy"]
    mean = sum(c["accuracy"] for c in curve) / len(curve)
    noise = accuracy_noise(mean, n_problems)
    diverging = any(b["rm"] > a["rm"] and b["accuracy"] < a["accuracy"] - noise
                    for a, b in zip(curve, curve[1:], strict=False))  # fmt: skip
    return up and not diverging


def eval_size(run_dir: Path, stage: str) -> int:
    """How many held-out prompts `stage` evaluates on, from the run's recipe."""
    stages = {s["name"]: s for s in yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))["stages"]}
    return int(stages[stage]["eval_dataset"]["num_examples"])


def rlhf_figures(run_dir: Path) -> dict[str, Any]:
    metrics = stage_metrics(run_dir)
    curve = ppo_curve(run_dir)
    return {
        "rm_pair_accuracy": metrics["reward_model"].get("eval_accuracy"),
        "accuracy_sft": metrics["eval_sft"]["accuracy"], "accuracy_ppo": metrics["eval_ppo"]["accuracy"],
        "gain_points": round(100 * (metrics["eval_ppo"]["accuracy"] - metrics["eval_sft"]["accuracy"]), 1),
        "kl_after": metrics["ppo"].get("eval_kl_after"), "curve": curve,
        "rising_together": rising_together(curve, eval_size(run_dir, "ppo")),
        "wall_s": round(sum(m["duration_s"] or 0.0 for m in metrics.values()), 1),
    }


def rlhf_targets(f: dict[str, Any]) -> dict[str, bool]:
    return {"gain ≥ 10 points": f["gain_points"] >= 10, "RM score and accuracy rise together": f["rising_together"]}


def distill_vs_rl_figures(run_dir: Path) -> dict[str, Any]:
    metrics = stage_metrics(run_dir)
    rl_train_s = metrics["student_cold_start"]["train_runtime_s"] + metrics["student_grpo"]["train_runtime_s"]
    return {
        "accuracy_teacher": metrics["eval_teacher"]["accuracy"],
        "accuracy_distilled": metrics["eval_distill"]["accuracy"],
        "accuracy_student_cold_start": metrics["eval_student_cold_start"]["accuracy"],
        "accuracy_rl_only": metrics["eval_student_grpo"]["accuracy"],
        "gap_points": round(100 * (metrics["eval_distill"]["accuracy"] - metrics["eval_student_grpo"]["accuracy"]), 1),
        # Student compute: its optimiser time in each branch (the teacher's traces are the teacher's cost).
        "distill_train_s": metrics["distill"]["train_runtime_s"], "rl_train_s": round(rl_train_s, 1),
        "compute_ratio_rl_over_distill": round(rl_train_s / metrics["distill"]["train_runtime_s"], 2),
        "wall_s": round(sum(m["duration_s"] or 0.0 for m in metrics.values()), 1),
    }


def distill_vs_rl_targets(f: dict[str, Any]) -> dict[str, bool]:
    return {"distilled ≥ RL-only + 5 points": f["gap_points"] >= 5,
            "comparable compute (RL 0.8–1.5× distill)": 0.8 <= f["compute_ratio_rl_over_distill"] <= 1.5}


Figures = Callable[[Path], dict[str, Any]]
Targets = Callable[[dict[str, Any]], dict[str, bool]]
FINDINGS: dict[str, tuple[str, Figures, Targets]] = {
    "r1_zero": ("r1_zero_tiny.yaml", r1_zero_figures, r1_zero_targets),
    "rlhf_rm_only": ("rlhf_rm_only_tiny.yaml", rlhf_figures, rlhf_targets),
    "distill_vs_rl": ("distill_vs_rl_tiny.yaml", distill_vs_rl_figures, distill_vs_rl_targets),
}


# --------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------


def run_recipe(recipe: str, run_dir: Path, overrides: list[str]) -> float:
    """`align run` in a fresh process; returns its wall time."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "align.cli", "run", str(ROOT / "recipes" / recipe), *overrides,
                           "--run-dir", str(run_dir)], cwd=ROOT, env={**os.environ, **ENV},
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{recipe} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("finding", choices=sorted(FINDINGS))
    p.add_argument("overrides", nargs="*", help="recipe overrides, key.path=value")
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--keep", default="", help="keep the run directories under this folder")
    args = p.parse_args()
    recipe, figures_of, targets_of = FINDINGS[args.finding]
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="align-findings-"))
    runs = []
    try:
        for seed in args.seeds:
            run_dir = workdir / f"{args.finding}-seed{seed}"
            wall = run_recipe(recipe, run_dir, [f"seed={seed}", *args.overrides])
            figures = {"seed": seed, "process_wall_s": round(wall, 1), **figures_of(run_dir)}
            figures["targets"] = targets_of(figures)
            runs.append(figures)
            print(json.dumps(figures), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print("SUMMARY " + json.dumps({"finding": args.finding, "overrides": args.overrides, "runs": runs}), flush=True)


if __name__ == "__main__":
    main()
