"""The console: one-line summaries, what reaches the console and what only log.txt, and a running
stage's progress and ETA as `align status` shows it."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from align import artifacts as art
from align.console import (
    PROGRESS,
    ConsoleFilter,
    StageProgress,
    describe_progress,
    eta_seconds,
    format_duration,
    read_progress,
    summary_fields,
)


def test_summary_fields_pick_what_fits_the_stage() -> None:
    grpo = {"loss": 0.0012, "reward": 1.125, "rewards/accuracy/mean": 0.25, "rewards/format/mean": 0.875,
            "kl": 0.01, "entropy": 0.5, "completions/mean_length": 21.4, "learning_rate": 3e-5, "grad_norm": 0.8,
            "clip_ratio/low_mean": 0.0}  # fmt: skip
    assert summary_fields(grpo) == ["loss 0.0012", "reward 1.125 (accuracy 0.25, format 0.875)", "kl 0.01",
                                    "entropy 0.5", "len 21.4", "lr 3e-05"]  # fmt: skip
    ppo = {"score": -0.5, "score/reward_model": 0.25, "score/format": None, "kl": 0.3, "value_loss": 0.09}
    assert summary_fields(ppo) == ["score -0.5 (reward_model 0.25)", "kl 0.3", "value loss 0.09"]
    assert summary_fields({"eval_loss": 1.5, "eval_accuracy": 0.75, "epoch": 2.0}) == ["eval loss 1.5", "eval acc 0.75"]
    assert summary_fields({"grad_norm": 1.0}) == []


def test_durations_and_eta() -> None:
    assert [format_duration(s) for s in (0, 42.4, 725, 3723)] == ["0:00", "0:42", "12:05", "1:02:03"]
    assert eta_seconds(20, 100, 10.0) == pytest.approx(40.0)  # 0.5 s a step, 80 steps to go
    assert eta_seconds(0, 100, 10.0) is None and eta_seconds(100, 100, 10.0) == 0.0


def test_the_console_shows_align_and_library_warnings_but_not_details_or_python_warnings() -> None:
    keep = ConsoleFilter().filter

    def record(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "m", None, None)

    assert keep(record("align", logging.INFO)) and keep(record("align.stages", logging.INFO))
    assert keep(record("transformers.trainer", logging.WARNING))
    assert not keep(record("transformers.trainer", logging.INFO))
    assert not keep(record("align.detail", logging.INFO))  # full metric rows: log.txt only
    assert not keep(record("py.warnings", logging.WARNING))  # deprecation notices during a stage: log.txt only


def test_progress_file_and_eta(tmp_path: Path) -> None:
    with StageProgress(tmp_path, "sft", 100, main_process=True) as progress:
        progress.update(100)  # the last step is always written
        written = json.loads((tmp_path / PROGRESS).read_text())
    assert {k: written[k] for k in ("stage", "phase", "unit", "step", "total")} == \
        {"stage": "sft", "phase": "train", "unit": "step", "step": 100, "total": 100}  # fmt: skip
    now = time.time()
    (tmp_path / PROGRESS).write_text(json.dumps({"stage": "sft", "phase": "train", "unit": "step", "step": 20,
                                                 "total": 100, "started": now - 10, "updated": now}))  # fmt: skip
    progress = read_progress(tmp_path)
    assert progress is not None and progress["eta_s"] == pytest.approx(40.0)
    assert describe_progress(progress) == "train: step 20 of 100, ETA 0:40 (updated 0:00 ago)"
    assert not StageProgress(tmp_path / "other", "x", 5, main_process=False).main  # other ranks write nothing
    assert not (tmp_path / "other").exists()


def test_status_shows_a_running_stages_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from align.cli import main

    records = [art.StageRecord("sft", "sft", art.COMPLETE, "f", duration_s=3.0),
               art.StageRecord("grpo", "grpo", art.RUNNING, "g", started=time.time()),
               art.StageRecord("rm", "reward_model", art.RUNNING, "h", started=time.time())]  # fmt: skip
    art.Manifest("r", "r.yaml", records).write(tmp_path)
    scratch = art.scratch_dir(tmp_path, "grpo")
    scratch.mkdir()
    now = time.time()
    (scratch / PROGRESS).write_text(json.dumps({"stage": "grpo", "phase": "train", "unit": "step", "step": 30,
                                                "total": 60, "started": now - 60, "updated": now}))  # fmt: skip
    # a stage that logged metrics but no progress file (an older align, or one that died early)
    rm_scratch = art.scratch_dir(tmp_path, "rm")
    rm_scratch.mkdir()
    art.MetricsWriter(rm_scratch / art.METRICS).log(art.TRAIN, 7, loss=0.5)
    with art.RunLock(tmp_path):  # progress is shown only for a live run: one holding the run dir's lock
        assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "grpo: train: step 30 of 60, ETA 1:00 (updated 0:00 ago)" in out
    assert "rm: step 7 logged" in out
