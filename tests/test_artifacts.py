"""Run-dir mechanics: resumable chunked JSONL, the run-dir lock, manifests that cannot be read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align import artifacts as art


def test_chunked_jsonl_resumes_after_the_last_commit(tmp_path: Path) -> None:
    files = art.ChunkedJsonl(tmp_path, ["a.jsonl", "b.jsonl"])
    assert files.open() == (0, {})
    files.write("a.jsonl", {"i": 0, "score": float("inf")})  # JSON has no infinity: written as null
    files.write("b.jsonl", {"i": 0})
    files.commit(1, {"kept": 1})
    files.write("a.jsonl", {"i": 1})  # a chunk the process was killed in
    files.close()

    assert art.read_committed(tmp_path, "a.jsonl") == (1, {"kept": 1}, [{"i": 0, "score": None}])
    again = art.ChunkedJsonl(tmp_path, ["a.jsonl", "b.jsonl"])
    assert again.open() == (1, {"kept": 1})
    again.write("a.jsonl", {"i": 2})
    again.commit(2, {"kept": 2})
    again.close()
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert [json.loads(line)["i"] for line in lines] == [0, 2]  # the uncommitted row is gone, nothing twice
    assert (tmp_path / "b.jsonl").read_text() == '{"i": 0}\n'


def test_nothing_committed_reads_as_nothing(tmp_path: Path) -> None:
    assert art.read_committed(tmp_path, "a.jsonl") == (0, {}, [])


def test_a_run_dir_is_locked_by_one_run(tmp_path: Path) -> None:
    lock = art.RunLock(tmp_path).acquire()
    try:
        assert art.lock_holder(tmp_path) is not None
        with pytest.raises(art.RunDirInUse, match=r"is in use by pid \d+ on .* since"):
            art.RunLock(tmp_path).acquire()
    finally:
        lock.release()
    assert art.lock_holder(tmp_path) is None
    with art.RunLock(tmp_path):  # a lock file without a holder is stale, not in use
        pass


@pytest.mark.parametrize("content", ['{"recipe": "x", "stag', "[]", '{"recipe": "x"}', "\x00\x00"])
def test_an_unreadable_manifest_is_a_manifest_error(tmp_path: Path, content: str) -> None:
    (tmp_path / art.MANIFEST).write_text(content)
    with pytest.raises(art.ManifestError, match=f"{tmp_path / art.MANIFEST} cannot be read"):
        art.Manifest.read(tmp_path)


def test_the_manifest_is_rebuilt_from_finished_stage_folders(tmp_path: Path) -> None:
    stage = tmp_path / "a"
    stage.mkdir()
    (stage / "out.txt").write_text("x")
    (stage / art.RESULT).write_text(json.dumps({"fingerprint": "f1", "metrics": {"m": 1}, "artifacts": {"model": "out.txt"}}))
    (tmp_path / "b").mkdir()  # no result.json: never finished
    manifest = art.rebuild_manifest(tmp_path, "r", "r.yaml", [("a", "sft"), ("b", "grpo")])
    a, b = manifest.stages
    assert (a.status, a.fingerprint, a.metrics, a.artifacts) == (art.COMPLETE, "f1", {"m": 1}, {"model": "a/out.txt"})
    assert b.status == art.PENDING and art.is_complete(tmp_path, a)


def test_scratch_fingerprint(tmp_path: Path) -> None:
    assert art.scratch_fingerprint(tmp_path) is None
    (tmp_path / art.STAGE_CONFIG).write_text('{"fingerprint": "abc", "config": {}}')
    assert art.scratch_fingerprint(tmp_path) == "abc"
    (tmp_path / art.STAGE_CONFIG).write_text('{"finger')
    assert art.scratch_fingerprint(tmp_path) is None
