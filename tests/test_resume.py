"""Kill and resume, for real: `align run` in a subprocess is killed by a real signal at several
moments — SIGKILL mid-step, SIGKILL while a checkpoint is being written (every file on disk, its
marker not), SIGTERM (checkpoint at the next step, exit "interrupted") — then run again each time,
and must end with the metrics and weights of one uninterrupted run."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from align import artifacts as art
from align import checkpoints
from align.preempt import EXIT_INTERRUPTED
from align.recipe.validate import load_recipe
from align.runner import run_recipe
from tests import kill_run

#: Run-to-run noise: same seeds, same threads, same CPU — resumed runs match to the last bit here,
#: but a tolerance keeps the tests honest on CPUs whose kernels reorder sums.
TOLERANCE = 1e-5

SFT = """\
name: resume-sft
seed: 0
model: align:tiny
stages:
  - name: sft
    type: sft
    dataset: {path: "align:arithmetic", split: train, num_examples: 256}
    learning_rate: 2.0e-3
    max_steps: 24
    per_device_train_batch_size: 8
    logging_steps: 1
    max_length: 96
"""

GRPO = """\
name: resume-grpo
seed: 0
model: align:tiny
stages:
  - name: grpo
    type: grpo
    dataset: {path: "align:arithmetic", split: train, num_examples: 64}
    rewards:
      - {rule: accuracy, weight: 1.0}
      - {rule: format, weight: 0.5}
    learning_rate: 1.0e-4
    max_steps: 12
    per_device_train_batch_size: 8
    num_generations: 4
    max_completion_length: 16
    logging_steps: 1
"""

PPO = """\
name: resume-ppo
seed: 0
model: align:tiny
stages:
  - name: ppo
    type: ppo
    reward_model: align:tiny
    rewards: [{rule: format, weight: 0.5}]
    dataset: {path: "align:arithmetic", split: train, num_examples: 64}
    learning_rate: 1.0e-4
    per_device_train_batch_size: 4
    gradient_accumulation_steps: 2
    num_ppo_epochs: 2
    max_steps: 12
    response_length: 12
    temperature: 1.0
    missing_eos_penalty: 1.0
    logging_steps: 1
    num_sample_rollouts: 0
"""

REJECTION_SAMPLING = """\
name: resume-rs
seed: 0
model: align:tiny
stages:
  - name: rs
    type: rejection_sampling
    dataset: {path: "align:arithmetic", split: train, num_examples: 96}
    rewards: [{rule: format}]
    keep: threshold
    score_threshold: 0.0
    num_generations: 4
    temperature: 1.0
    max_completion_length: 16
    chunk_size: 8
    drop_truncated: false
    mix_dataset: {path: "align:arithmetic", split: train, num_examples: 64, params: {trace: none}}
    mix_ratio: 0.2
"""


DISTILL = """\
name: resume-distill
seed: 0
model: align:tiny
stages:
  - name: distill
    type: distill
    teacher: align:tiny
    student: align:tiny-student
    dataset: {path: "align:arithmetic", split: train, num_examples: 96}
    traces: teacher
    temperature: 1.0
    num_generations: 2
    max_completion_length: 16
    drop_truncated: false
    chunk_size: 8
    learning_rate: 3.0e-3
    max_steps: 6
    per_device_train_batch_size: 8
    logging_steps: 1
    max_length: 64
"""


def uninterrupted(tmp_path: Path, text: str) -> art.Manifest:
    path = tmp_path / "reference.yaml"
    path.write_text(text)
    return run_recipe(load_recipe(path), tmp_path / "reference", report=lambda _: None)


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics that say what a stage computed (not how long it took)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not k.endswith(("_s", "runtime", "per_s", "per_second", "s_per_step"))}  # fmt: skip


def assert_same_result(reference: Path, resumed: Path, stage: str, resumed_training: bool = True) -> None:
    want = art.Manifest.read(reference).record(stage)  # type: ignore[union-attr]
    got = art.Manifest.read(resumed).record(stage)  # type: ignore[union-attr]
    assert got.status == art.COMPLETE, got.error
    expected, actual = numbers(want.metrics), numbers(got.metrics)
    if resumed_training and "steps" in expected:  # a training stage says where it resumed from
        assert 0 < actual.pop("resumed_from_step") < expected["steps"]
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE), key
    if "model" in want.artifacts:
        assert kill_run.same_weights(reference / want.artifacts["model"], resumed / got.artifacts["model"], atol=TOLERANCE)
    want_rows = [r for r in art.read_metrics(reference / stage / art.METRICS) if r["kind"] == art.TRAIN]
    got_rows = [r for r in art.read_metrics(resumed / stage / art.METRICS) if r["kind"] == art.TRAIN]
    assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows]  # each step logged once


def kill_three_ways(tmp_path: Path, text: str, stage: str, progress: Callable[[Path], int]) -> Path:
    """Kill the run (1) by SIGKILL once it has progressed past its first checkpoint, mid-step;
    (2) by SIGKILL from inside while its next checkpoint is written, before the marker; (3) by
    SIGTERM once it has checkpointed again, after which it must checkpoint and exit 75
    ("interrupted"). Then run it to the end. `progress` is how far the checkpoints got."""
    recipe, run_dir = tmp_path / "recipe.yaml", tmp_path / "killed"
    recipe.write_text(text)

    proc = kill_run.start(recipe, run_dir)
    kill_run.wait_until(proc, lambda: progress(run_dir) > 0, "the first checkpoint")
    assert kill_run.kill(proc, signal.SIGKILL) == -signal.SIGKILL
    assert kill_run.stage_status(run_dir, stage) == art.RUNNING  # killed: nobody could say otherwise

    before = progress(run_dir)
    proc = kill_run.start(recipe, run_dir, prelude=kill_run.KILL_WHILE_CHECKPOINTING.format(n=1))
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert progress(run_dir) == before  # the checkpoint cut off before its marker does not count

    proc = kill_run.start(recipe, run_dir)
    kill_run.wait_until(proc, lambda: progress(run_dir) > before, "a later checkpoint")
    assert kill_run.kill(proc, signal.SIGTERM) == EXIT_INTERRUPTED
    record = art.Manifest.read(run_dir).record(stage)  # type: ignore[union-attr]
    assert record.status == art.INTERRUPTED and "SIGTERM" in (record.error or "")

    messages: list[str] = []
    run_recipe(load_recipe(recipe), run_dir, report=messages.append)
    assert any("resuming its unfinished attempt" in m for m in messages), messages
    return run_dir


def trainer_checkpoints(stage: str) -> Callable[[Path], int]:
    """The step of the newest complete checkpoint (0: none yet)."""

    def step(run_dir: Path) -> int:
        found = checkpoints.complete_checkpoints(art.scratch_dir(run_dir, stage) / "trainer")
        return checkpoints.step_of(found[-1]) if found else 0

    return step


def test_sft_killed_three_ways_ends_as_an_uninterrupted_run(tmp_path: Path) -> None:
    uninterrupted(tmp_path, SFT)
    run_dir = kill_three_ways(tmp_path, SFT, "sft", trainer_checkpoints("sft"))
    assert_same_result(tmp_path / "reference", run_dir, "sft")


def test_grpo_killed_three_ways_ends_as_an_uninterrupted_run(tmp_path: Path) -> None:
    uninterrupted(tmp_path, GRPO)
    run_dir = kill_three_ways(tmp_path, GRPO, "grpo", trainer_checkpoints("grpo"))
    assert_same_result(tmp_path / "reference", run_dir, "grpo")


def test_ppo_killed_three_ways_ends_as_an_uninterrupted_run(tmp_path: Path) -> None:
    uninterrupted(tmp_path, PPO)
    run_dir = kill_three_ways(tmp_path, PPO, "ppo", trainer_checkpoints("ppo"))
    assert_same_result(tmp_path / "reference", run_dir, "ppo")


def chunks_committed(stage: str) -> Callable[[Path, int], bool]:
    def done(run_dir: Path, n: int) -> bool:
        path = art.scratch_dir(run_dir, stage) / art.CHUNKS
        try:
            return json.loads(path.read_text())["chunks_done"] >= 3 * n
        except (OSError, ValueError):
            return False

    return done


def test_rejection_sampling_killed_mid_chunk_and_by_sigterm_ends_as_an_uninterrupted_run(tmp_path: Path) -> None:
    reference = uninterrupted(tmp_path, REJECTION_SAMPLING).record("rs")
    recipe, run_dir = tmp_path / "recipe.yaml", tmp_path / "killed"
    recipe.write_text(REJECTION_SAMPLING)
    proc = kill_run.start(recipe, run_dir)
    kill_run.wait_until(proc, lambda: chunks_committed("rs")(run_dir, 1), "three chunks")
    assert kill_run.kill(proc, signal.SIGKILL) == -signal.SIGKILL
    proc = kill_run.start(recipe, run_dir)
    kill_run.wait_until(proc, lambda: chunks_committed("rs")(run_dir, 2), "six chunks")
    assert kill_run.kill(proc, signal.SIGTERM) == EXIT_INTERRUPTED
    assert kill_run.stage_status(run_dir, "rs") == art.INTERRUPTED
    run_recipe(load_recipe(recipe), run_dir, report=lambda _: None)
    assert_same_result(tmp_path / "reference", run_dir, "rs")
    for name in ("dataset.jsonl", "rejected_prompts.jsonl"):  # no row lost or written twice
        assert (run_dir / "rs" / name).read_bytes() == (tmp_path / "reference" / "rs" / name).read_bytes()
    assert reference.metrics["num_mixed"] > 0


def test_distill_killed_while_sampling_traces_resumes_after_the_last_chunk(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    uninterrupted(tmp_path, DISTILL)
    recipe, run_dir = tmp_path / "recipe.yaml", tmp_path / "killed"
    recipe.write_text(DISTILL)
    proc = kill_run.start(recipe, run_dir)
    kill_run.wait_until(proc, lambda: chunks_committed("distill")(run_dir, 1), "three trace chunks")
    assert kill_run.kill(proc, signal.SIGKILL) == -signal.SIGKILL
    done = json.loads((art.scratch_dir(run_dir, "distill") / art.CHUNKS).read_text())["chunks_done"]
    assert done < 12, "the traces were all sampled before the kill: nothing to resume"
    messages: list[str] = []
    caplog.set_level(logging.INFO, logger="align")
    run_recipe(load_recipe(recipe), run_dir, report=messages.append)
    assert any("resuming its unfinished attempt" in m for m in messages)
    assert f"distill: resuming trace sampling after {done} of 12 chunks" in caplog.text
    traces = "traces.jsonl"
    assert (run_dir / "distill" / traces).read_bytes() == (tmp_path / "reference" / "distill" / traces).read_bytes()
    assert_same_result(tmp_path / "reference", run_dir, "distill", resumed_training=False)


def test_two_process_sft_stops_on_sigterm_at_one_step_on_every_rank_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real DDP over gloo: the orchestrator passes SIGTERM to both ranks, which agree on the step to
    checkpoint and stop at (a rank that stopped alone would hang the other in its next all-reduce)."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    text = SFT.replace("    max_length: 96\n", "    max_length: 96\n    launcher: {type: accelerate, num_processes: 2, "
                       "extra_args: [--multi_gpu]}\n")  # fmt: skip
    reference = uninterrupted(tmp_path, text).record("sft")
    assert reference.world_size == 2
    recipe, run_dir = tmp_path / "recipe.yaml", tmp_path / "killed"
    recipe.write_text(text)
    step = trainer_checkpoints("sft")
    proc = kill_run.start(recipe, run_dir)
    kill_run.wait_until(proc, lambda: step(run_dir) > 0, "the first checkpoint")
    assert kill_run.kill(proc, signal.SIGTERM) == EXIT_INTERRUPTED
    assert kill_run.stage_status(run_dir, "sft") == art.INTERRUPTED
    stopped_at = step(run_dir)
    assert 0 < stopped_at < 24
    errors = sorted(p.read_text() for p in art.scratch_dir(run_dir, "sft").glob("error.rank*.txt"))
    assert len(errors) == 2 and all(e.startswith("Interrupted: ") for e in errors), errors
    run_recipe(load_recipe(recipe), run_dir, report=lambda _: None)
    assert_same_result(tmp_path / "reference", run_dir, "sft")
