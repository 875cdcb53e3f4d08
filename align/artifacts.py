"""Run-directory layout and the manifest. Everything here is written aside and renamed into place,
so an interrupted write never leaves a file or stage folder that looks finished."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
RESOLVED_RECIPE = "recipe.yaml"
RESULT = "result.json"
METRICS = "metrics.jsonl"
LOG = "log.txt"

PENDING, RUNNING, COMPLETE, FAILED = "pending", "running", "complete", "failed"


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def stage_dir(run_dir: Path, stage_name: str) -> Path:
    return run_dir / stage_name


def scratch_dir(run_dir: Path, stage_name: str) -> Path:
    return run_dir / f".{stage_name}.partial"


@dataclass
class StageRecord:
    name: str
    type: str
    status: str = PENDING
    fingerprint: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    started: float | None = None
    ended: float | None = None
    duration_s: float | None = None
    error: str | None = None


@dataclass
class Manifest:
    recipe: str
    source: str
    stages: list[StageRecord]

    @classmethod
    def read(cls, run_dir: Path) -> Manifest | None:
        path = run_dir / MANIFEST
        if not path.exists():
            return None
        raw = json.loads(path.read_text(encoding="utf-8"))
        return cls(raw["recipe"], raw["source"], [StageRecord(**s) for s in raw["stages"]])

    def write(self, run_dir: Path) -> None:
        write_json_atomic(run_dir / MANIFEST, {"recipe": self.recipe, "source": self.source,
                                               "stages": [asdict(s) for s in self.stages]})

    def record(self, name: str) -> StageRecord:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


def is_complete(run_dir: Path, record: StageRecord | None) -> bool:
    """Complete means: the manifest says so AND the finished folder with its result file exists."""
    if record is None or record.status != COMPLETE:
        return False
    return (stage_dir(run_dir, record.name) / RESULT).exists()


def publish(run_dir: Path, stage_name: str) -> Path:
    """Move a finished scratch folder into place, replacing any stale one."""
    scratch = scratch_dir(run_dir, stage_name)
    if not (scratch / RESULT).exists():
        raise RuntimeError(f"stage '{stage_name}' finished without writing {RESULT}")
    final = stage_dir(run_dir, stage_name)
    if final.exists():
        stale = run_dir / f".{stage_name}.stale-{time.time_ns()}"
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(scratch, final)
    return final


class MetricsWriter:
    """Append-only metrics.jsonl: one JSON object per logging event."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
