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

(figures are filled in below as calibration runs finish)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def rising_together(curve: list[dict[str, float]]) -> bool:
    """Both end above where they started, and neither ever moves while the other falls by more than
    noise: no stretch where the RM score climbs while accuracy drops (what hacking looks like)."""
    if len(curve) < 2:
        return False
    up = curve[-1]["rm"] > curve[0]["rm"] and curve[-1]["accuracy"] > curve[0]["accuracy"]
    diverging = any(b["rm"] > a["rm"] and b["accuracy"] < a["accuracy"] - 0.03 for a, b in zip(curve, curve[1:], strict=False))
    return up and not diverging


def rlhf_figures(run_dir: Path) -> dict[str, Any]:
    metrics = stage_metrics(run_dir)
    curve = ppo_curve(run_dir)
    return {
        "rm_pair_accuracy": metrics["reward_model"].get("eval_accuracy"),
        "accuracy_sft": metrics["eval_sft"]["accuracy"], "accuracy_ppo": metrics["eval_ppo"]["accuracy"],
        "gain_points": round(100 * (metrics["eval_ppo"]["accuracy"] - metrics["eval_sft"]["accuracy"]), 1),
        "kl_after": metrics["ppo"].get("eval_kl_after"), "curve": curve, "rising_together": rising_together(curve),
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
