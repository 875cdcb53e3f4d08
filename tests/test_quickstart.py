"""The quickstart end to end, through the real `align run` command: the pipeline CI keeps honest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
# CI-sized: fewer held-out problems and GRPO steps; the stage chain and settings are the recipe's.
CI_OVERRIDES = [
    "stages.eval_base.dataset.num_examples=100",
    "stages.eval_cold_start.dataset.num_examples=100",
    "stages.eval_grpo.dataset.num_examples=100",
    "stages.grpo.max_steps=25",
]


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
    out, stages = run_quickstart(tmp_path / "run", CI_OVERRIDES)
    assert all(s["status"] == "complete" for s in stages.values())
    assert accuracy(stages, "eval_base") < 0.05
    assert accuracy(stages, "eval_cold_start") > accuracy(stages, "eval_base") + 0.2
    assert accuracy(stages, "eval_grpo") > accuracy(stages, "eval_cold_start")
    assert "Held-out accuracy" in out
    # A second run finds everything finished and trains nothing.
    again, _ = run_quickstart(tmp_path / "run", CI_OVERRIDES)
    assert again.count("[align] skip") == len(stages) and "[align] run " not in again


@pytest.mark.slow
def test_quickstart_full_grpo_gain(tmp_path: Path) -> None:
    _, stages = run_quickstart(tmp_path / "run", [])
    gain = accuracy(stages, "eval_grpo") - accuracy(stages, "eval_cold_start")
    assert gain >= 0.25, stages
