"""Checkpoint folders: only complete ones count, half-written ones go, disk stays bounded."""

from __future__ import annotations

from pathlib import Path

from align import checkpoints


def make(work_dir: Path, step: int, complete: bool = True) -> Path:
    folder = checkpoints.checkpoint_dir(work_dir, step)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    if complete:
        checkpoints.mark_complete(folder)
    return folder


def test_the_newest_complete_checkpoint_wins_and_a_half_written_one_is_removed(tmp_path: Path) -> None:
    make(tmp_path, 3)
    make(tmp_path, 10)  # numeric order, not the names' (checkpoint-10 < checkpoint-3 as strings)
    half = make(tmp_path, 12, complete=False)  # killed while writing
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint: left alone
    assert checkpoints.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert not half.exists()
    assert (tmp_path / "checkpoint-x").exists()


def test_no_checkpoint_yet(tmp_path: Path) -> None:
    assert checkpoints.latest_checkpoint(tmp_path / "missing") is None
    make(tmp_path, 1, complete=False)
    assert checkpoints.latest_checkpoint(tmp_path) is None


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        make(tmp_path, step)
    checkpoints.prune(tmp_path, 2)
    assert [checkpoints.step_of(p) for p in checkpoints.complete_checkpoints(tmp_path)] == [6, 8]
    checkpoints.prune(tmp_path, None)
    assert len(checkpoints.complete_checkpoints(tmp_path)) == 2
