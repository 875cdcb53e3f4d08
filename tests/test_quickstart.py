"""The quickstart — the whole R1 chain on the embedded model — end to end through the real
`align run` command: the pipeline CI keeps honest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def ci_overrides() -> list[str]:
    """CI-sized: the first SFT and GRPO keep enough steps to learn for real; the later stages keep
    their wiring but do a fraction of the work."""
    overrides = []
    for stage in yaml.safe_load(QUICKSTART.read_text())["stages"]:
        name, kind = stage["name"], stage["type"]
        if kind == "eval":
            overrides.append(f"stages.{name}.dataset.num_examples=100")
        elif name == "grpo_reasoning":
            overrides.append(f"stages.{name}.max_steps=25")
        elif kind in ("sft", "grpo", "distill") and name != "cold_start":
            overrides.append(f"stages.{name}.max_steps={60 if kind != 'grpo' else 4}")
        if kind in ("rejection_sampling", "distill"):
            overrides.append(f"stages.{name}.dataset.num_examples=200")
    return overrides


def run_quickstart(run_dir: Path, overrides: list[str]) -> tuple[str, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "align.cli", "run", str(QUICKSTART), *overrides, "--run-dir", str(run_dir)],
        capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return done.stdout, {s["name"]: s for s in manifest["stages"]}


def accuracy(stages: dict, name: str) -> float:
    return stages[name]["metrics"]["accuracy"]


def test_quickstart_reduced(tmp_path: Path) -> None:
    out, stages = run_quickstart(tmp_path / "run", ci_overrides())
    assert all(s["status"] == "complete" for s in stages.values())
    assert accuracy(stages, "eval_base") < 0.05
    assert accuracy(stages, "eval_cold_start") > accuracy(stages, "eval_base") + 0.2
    assert accuracy(stages, "eval_grpo_reasoning") > accuracy(stages, "eval_cold_start")
    # Rejection sampling kept only correct, well-formed samples, and the chain reached the student.
    kept = [json.loads(line) for line in (tmp_path / "run" / "rejection_sampling" / "dataset.jsonl").read_text().splitlines()]
    reasoning = [row for row in kept if row["source"] != "mix"]
    assert reasoning and all(row["scores"]["accuracy"] == 1.0 and row["scores"]["format"] == 1.0 for row in reasoning)
    assert stages["distill"]["metrics"]["student_teacher_param_ratio"] <= 0.25
    assert "Held-out accuracy" in out and "eval_distill" in out.split("Held-out accuracy")[1]
    # A second run finds everything finished and trains nothing.
    again, _ = run_quickstart(tmp_path / "run", ci_overrides())
    assert again.count("[align] skip") == len(stages) and "[align] run " not in again


@pytest.mark.slow
def test_quickstart_full(tmp_path: Path) -> None:
    """The recipe as shipped (≈ 5–8 min on 2 cores): GRPO lifts the partly trained cold start by
    25+ points, and the distilled student (≤ 1/4 of the parameters) keeps ≥ 90 % of its teacher."""
    _, stages = run_quickstart(tmp_path / "run", [])
    assert accuracy(stages, "eval_grpo_reasoning") - accuracy(stages, "eval_cold_start") >= 0.25, stages
    assert accuracy(stages, "eval_grpo") > accuracy(stages, "eval_sft")
    assert accuracy(stages, "eval_distill") >= 0.9 * accuracy(stages, "eval_grpo")
    assert stages["distill"]["metrics"]["student_teacher_param_ratio"] <= 0.25
