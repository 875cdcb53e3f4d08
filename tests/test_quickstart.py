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


def run_quickstart(run_dir: Path, overrides: list[str]) -> tuple[str, dict, str]:
    """stdout, the manifest's stages by name, and stderr (where the progress lines go)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(
        # overrides after --run-dir: users type them anywhere
        [sys.executable, "-m", "align.cli", "run", str(QUICKSTART), "--run-dir", str(run_dir), *overrides],
        capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return done.stdout, {s["name"]: s for s in manifest["stages"]}, done.stderr


def accuracy(stages: dict, name: str) -> float:
    return stages[name]["metrics"]["accuracy"]


def test_quickstart_reduced(tmp_path: Path) -> None:
    from align.artifacts import read_metrics
    from tests.test_report import check_report

    out, stages, err = run_quickstart(tmp_path / "run", ci_overrides())
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
    # Test-time scaling in the final table: maj@k beside pass@k. With k = all 8 samples, a right
    # majority needs a right sample, so maj@8 ≤ pass@8.
    table = out.split("Held-out accuracy")[1]
    assert "maj@4" in table and "maj@8" in table and "eval_distill_sampled" in table
    sampled = stages["eval_distill_sampled"]["metrics"]
    assert 0.0 <= sampled["maj@8"] <= sampled["pass@8"] <= 1.0
    # The report: both documents, every stage listed, every plot a real image.
    check_report(tmp_path / "run", list(stages))
    assert {"report.pipeline.png", "report.cold_start.loss.png", "report.grpo_reasoning.reward.png",
            "report.rejection_sampling.acceptance.png", "report.distill.teacher_student.png"} <= \
        {p.name for p in (tmp_path / "run").glob("report.*.png")}  # fmt: skip
    # The console: no raw metric dicts; one summary line per logging step of each training stage.
    assert "{'loss'" not in out + err and "'train_runtime'" not in out + err
    for name in ("cold_start", "grpo_reasoning", "sft", "distill"):
        logged = [r for r in read_metrics(tmp_path / "run" / name / "metrics.jsonl", "train") if "train_runtime" not in r]
        assert err.count(f"  {name} step ") == len(logged) > 0, name
    # A second run finds everything finished and trains nothing.
    again, _, _ = run_quickstart(tmp_path / "run", ci_overrides())
    assert again.count("[align] skip") == len(stages) and "[align] run " not in again


@pytest.mark.slow
def test_quickstart_full(tmp_path: Path) -> None:
    """The recipe as shipped (≈ 5–8 min on 2 cores): GRPO lifts the partly trained cold start by
    25+ points, and the distilled student (≤ 1/4 of the parameters) keeps ≥ 90 % of its teacher."""
    _, stages, _ = run_quickstart(tmp_path / "run", [])
    assert accuracy(stages, "eval_grpo_reasoning") - accuracy(stages, "eval_cold_start") >= 0.25, stages
    assert accuracy(stages, "eval_grpo") > accuracy(stages, "eval_sft")
    assert accuracy(stages, "eval_distill") >= 0.9 * accuracy(stages, "eval_grpo")
    assert stages["distill"]["metrics"]["student_teacher_param_ratio"] <= 0.25


@pytest.mark.slow
def test_quickstart_killed_at_random_moments_ends_with_the_uninterrupted_table(tmp_path: Path) -> None:
    """SIGKILL or SIGTERM at random moments (seeded), a restart after each: the held-out table at the
    end is the uninterrupted run's, to the digit."""
    import random
    import signal
    import time

    reference, _, _ = run_quickstart(tmp_path / "reference", ci_overrides())
    rng = random.Random(11)
    run_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    kills = []
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-m", "align.cli", "run", str(QUICKSTART), "--run-dir", str(run_dir),
                                 *ci_overrides()], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        delay, sig = rng.uniform(10, 50), rng.choice([signal.SIGKILL, signal.SIGTERM])
        try:
            proc.wait(timeout=delay)
            break  # it finished before this kill
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
            code = proc.wait(timeout=600)
            # SIGTERM: checkpoint, then "interrupted" (or killed outright while Python was still starting up)
            assert code in (-signal.SIGKILL, -signal.SIGTERM, 75, 0), (sig, code)
            kills.append((round(delay, 1), sig.name, code))
        time.sleep(0.5)
    print("kills (seconds after start, signal, exit status):", kills)
    assert len(kills) >= 3, kills
    final, stages, _ = run_quickstart(run_dir, ci_overrides())
    assert all(s["status"] == "complete" for s in stages.values())
    assert final.split("Held-out accuracy")[1] == reference.split("Held-out accuracy")[1], kills
