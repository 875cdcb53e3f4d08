"""Starting a prepared stage: in this process, in a fresh Python, or under `accelerate launch`. The
stage's scratch folder already holds its resolved config (`align.execute.write_stage_config`); every
launcher runs the same `align.execute` on it. Never imports the runner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType

from align.execute import execute_stage, rank_errors
from align.launch_config import launch_config_problems
from align.paths import resolve_user_path
from align.preempt import EXIT_INTERRUPTED, Interrupted
from align.recipe.errors import KeyPath
from align.recipe.schema import LauncherSpec, StageConfig


class StageProcessError(RuntimeError):
    """A stage process (or one of its ranks) exited with an error; the message is the ranks' own."""


def launcher_problems(spec: LauncherSpec, base_dir: Path, stage: StageConfig | None = None) -> list[tuple[KeyPath, str]]:
    """What is wrong with a launcher (with a `stage`: also with that stage under it), key paths relative
    to the launcher; the accelerate config file is checked by `align.launch_config`."""
    problems: list[tuple[KeyPath, str]] = []
    if spec.type != "accelerate":
        for key in ("config_file", "num_processes", "main_process_port"):
            if getattr(spec, key) is not None:
                problems.append(((key,), f"'{key}' only applies to launcher type 'accelerate'"))
        return problems
    return launch_config_problems(spec, base_dir, stage)


def stage_command(spec: LauncherSpec, stage_dir: Path, base_dir: Path) -> list[str]:
    tail = ["-m", "align.execute", str(stage_dir.resolve())]
    if spec.type == "subprocess":
        return [sys.executable, *tail]
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if spec.config_file:
        command += ["--config_file", str(resolve_user_path(spec.config_file, base_dir).resolve())]
    if spec.num_processes:
        command += ["--num_processes", str(spec.num_processes)]
    if spec.main_process_port:
        command += ["--main_process_port", str(spec.main_process_port)]
    return [*command, *spec.extra_args, *tail]


def launch_stage(spec: LauncherSpec, stage_dir: Path, base_dir: Path) -> None:
    """Run the stage prepared in `stage_dir`; raise if it (or any of its ranks) failed, `Interrupted`
    if a signal stopped it after a checkpoint."""
    if spec.type == "inprocess":
        execute_stage(stage_dir)
        return
    env = dict(os.environ)
    # Several ranks on few cores oversubscribe OpenMP badly (10–20× slower); one thread each unless told.
    env.setdefault("OMP_NUM_THREADS", "1")
    # Its own process group, so a signal reaches the stage once — from here — not also from the terminal.
    process = subprocess.Popen(stage_command(spec, stage_dir, base_dir), env=env, start_new_session=True)
    with _forwarding_signals(process):
        returncode = process.wait()
    if returncode == 0:
        return
    reported = rank_errors(stage_dir)
    if returncode == EXIT_INTERRUPTED or (reported and all(": Interrupted: " in line for line in reported)):
        raise Interrupted(reported[0].split(": Interrupted: ", 1)[-1] if reported else "stopped by a signal")
    detail = "; ".join(reported) if reported else "it left no error message (see its log)"
    raise StageProcessError(f"stage process exited with status {returncode}: {detail}")


@contextmanager
def _forwarding_signals(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """SIGTERM and SIGINT sent to `align run` go on to the stage's process group (every rank), which
    checkpoints and stops; `align run` itself waits for it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, frame: FrameType | None) -> None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
