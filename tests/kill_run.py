"""Shared by the kill/resume tests: `align run` in a real subprocess, killed by a real signal at a
chosen moment, then run again to the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch

from align import artifacts as art

REPO = Path(__file__).resolve().parents[1]

#: Subprocess code that kills its own process (SIGKILL) right before the marker of its `n`-th
#: checkpoint is written: every file of that checkpoint is on disk, but it is not complete.
KILL_WHILE_CHECKPOINTING = """
import os, signal
import align.checkpoints
_real, _count = align.checkpoints.mark_complete, [0]
def _mark(folder):
    _count[0] += 1
    if _count[0] == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    _real(folder)
import align.training, align.stages.ppo
align.training.mark_complete = align.stages.ppo.mark_complete = _mark
"""


#: Subprocess code that registers the model-free fake stage type of tests/fake_stage.py.
FAKE_STAGE = """
from align.stages import STAGE_TYPES
STAGE_TYPES["fake"] = "tests.fake_stage"
"""


class Run(subprocess.Popen[bytes]):
    """A process running an `align` command, its output in `log` (not a pipe: nobody reads it live)."""

    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def start(recipe: Path, run_dir: Path, *overrides: str, prelude: str = "", argv: list[str] | None = None) -> Run:
    """`align run recipe --run-dir run_dir overrides…` (or `align <argv>`) in a new process, after
    running `prelude` in it; its output goes to a log file beside the run dir."""
    argv = argv or ["run", str(recipe), "--run-dir", str(run_dir), *overrides]
    code = prelude + textwrap.dedent(f"""
        import sys
        from align.cli import main
        sys.exit(main({argv!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    log = run_dir.parent / f"{run_dir.name}.{time.time_ns()}.log"
    with log.open("wb") as out:
        proc = Run([sys.executable, "-c", code], env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def wait_until(proc: Run, condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n{proc.output()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def logged_steps(run_dir: Path, stage: str) -> int:
    path = art.scratch_dir(run_dir, stage) / art.METRICS
    if not path.exists():
        return 0
    try:
        return max((row["step"] for row in art.read_metrics(path) if row["kind"] == art.TRAIN), default=0)
    except ValueError:  # a line half-written right now
        return 0


def kill(proc: Run, sig: signal.Signals, timeout: float = 120) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=timeout)


def stage_status(run_dir: Path, stage: str) -> str:
    manifest = art.Manifest.read(run_dir)
    assert manifest is not None
    return manifest.record(stage).status


def same_weights(a: Path, b: Path, atol: float = 1e-6) -> bool:
    """Two saved models hold the same weights (within `atol`)."""
    from safetensors.torch import load_file

    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return left.keys() == right.keys() and all(torch.allclose(left[k], right[k], atol=atol) for k in left)
