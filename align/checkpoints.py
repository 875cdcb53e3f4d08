"""Checkpoints a stage writes into its scratch folder while it trains, so an interrupted stage resumes.

A checkpoint is a folder `checkpoint-<step>` (TRL's Trainer writes them; PPO writes the same with
Accelerate's `save_state`). It counts only once complete: the marker file is written last, after
every rank has finished writing, so a checkpoint cut off half-way (a kill mid-write) is seen as
incomplete, removed, and the one before it is used.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger("align")

PREFIX = "checkpoint-"
COMPLETE_MARKER = "align-complete"
_STEP = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_dir(work_dir: Path, step: int) -> Path:
    return work_dir / f"{PREFIX}{step}"


def step_of(checkpoint: Path) -> int:
    match = _STEP.match(checkpoint.name)
    if not match:
        raise ValueError(f"{checkpoint} is not a checkpoint folder")
    return int(match.group(1))


def mark_complete(checkpoint: Path) -> None:
    """Write the marker that makes `checkpoint` count (call once everything in it is written)."""
    marker = checkpoint / COMPLETE_MARKER
    with marker.open("w", encoding="utf-8") as fh:
        fh.write("complete\n")
        fh.flush()
        os.fsync(fh.fileno())


def _all(work_dir: Path) -> list[Path]:
    if not work_dir.is_dir():
        return []
    found = [p for p in work_dir.iterdir() if p.is_dir() and _STEP.match(p.name)]
    return sorted(found, key=step_of)


def complete_checkpoints(work_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [p for p in _all(work_dir) if (p / COMPLETE_MARKER).exists()]


def latest_checkpoint(work_dir: Path) -> Path | None:
    """The newest complete checkpoint; half-written ones are removed (they would confuse a trainer
    that resumes from the newest folder it sees)."""
    for folder in _all(work_dir):
        if not (folder / COMPLETE_MARKER).exists():
            logger.warning("checkpoint %s was not finished (killed while writing?); removing it", folder)
            shutil.rmtree(folder, ignore_errors=True)
    complete = complete_checkpoints(work_dir)
    return complete[-1] if complete else None


def prune(work_dir: Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints (all with None): disk stays bounded."""
    if keep is None:
        return
    for folder in complete_checkpoints(work_dir)[: -keep or None]:
        shutil.rmtree(folder, ignore_errors=True)
