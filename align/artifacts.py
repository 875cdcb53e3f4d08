"""Run-directory layout, the manifest, what a stage writes into (its context) and the schema of
`metrics.jsonl`. Files here are written aside and renamed into place, so an interrupted write never
leaves a file or stage folder that looks finished."""

from __future__ import annotations

import json
import math
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
#: The stage's config as the orchestrator validated and resolved it (references and paths absolute).
STAGE_CONFIG = "stage_config.json"

PENDING, RUNNING, COMPLETE, FAILED = "pending", "running", "complete", "failed"


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=2, sort_keys=False, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def stage_dir(run_dir: Path, stage_name: str) -> Path:
    return run_dir / stage_name


def scratch_dir(run_dir: Path, stage_name: str) -> Path:
    return run_dir / f".{stage_name}.partial"


def stage_name_of(folder: Path) -> str:
    """The stage a folder belongs to: `NAME` for its scratch folder `.NAME.partial` or for `NAME`."""
    name = folder.name
    if name.startswith(".") and name.endswith(".partial"):
        return name[1 : -len(".partial")]
    return name


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
    #: Processes the stage ran in, and the device of its main process (None: not known, or no torch).
    world_size: int | None = None
    device: str | None = None


@dataclass
class Manifest:
    recipe: str
    source: str
    stages: list[StageRecord]
    #: The latest `align run` on this directory: command, started, ended, library versions.
    run: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, run_dir: Path) -> Manifest | None:
        path = run_dir / MANIFEST
        if not path.exists():
            return None
        raw = json.loads(path.read_text(encoding="utf-8"))
        return cls(raw["recipe"], raw["source"], [StageRecord(**s) for s in raw["stages"]], raw.get("run", {}))

    def write(self, run_dir: Path) -> None:
        write_json_atomic(run_dir / MANIFEST, {"recipe": self.recipe, "source": self.source, "run": self.run,
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


# ------------------------------------------------------------------------------------------------
# metrics.jsonl: one JSON object per line, each with `kind` and `step`
# ------------------------------------------------------------------------------------------------

#: A training-time scalar row: loss, reward, KL, learning rate, … at one logging step.
TRAIN = "train"
#: A held-out scalar row: eval loss, pairwise accuracy, PPO's held-out score, an eval stage's metrics.
EVAL = "eval"
#: One generated completion with its scores (`prompt`, `completion`, `rewards`: name → score).
SAMPLE = "sample"
#: The stage's final metrics, as the manifest holds them; the last row of every finished stage.
SUMMARY = "summary"
KINDS = (TRAIN, EVAL, SAMPLE, SUMMARY)


def metric_kind(values: dict[str, Any], default: str = TRAIN) -> str:
    """`eval` for a row of held-out figures (TRL prefixes them `eval_`), else `default`."""
    return EVAL if any(key.startswith("eval_") for key in values) else default


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class MetricsWriter:
    """The one writer of a stage's metrics.jsonl: appends `{"kind": …, "step": …, **values}` rows."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, kind: str, step: int, **values: Any) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown metrics kind {kind!r}; one of {', '.join(KINDS)}")
        row = {"kind": kind, "step": int(step), **_finite(values)}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=float, allow_nan=False, ensure_ascii=False) + "\n")


def read_metrics(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (of one `kind` if given), each checked against the schema."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or row.get("kind") not in KINDS or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{line_no}: not a metrics row (needs 'kind' in {KINDS} and an integer 'step')")
        if kind is None or row["kind"] == kind:
            rows.append(row)
    return rows


@dataclass
class StageContext:
    """What a stage's `run(config, ctx)` gets: where to write (its scratch folder), the recipe's
    folder, its seed, and its metrics writer. Stages write nothing outside `out_dir`."""

    run_dir: Path
    out_dir: Path
    base_dir: Path
    seed: int
    metrics: MetricsWriter

    @property
    def name(self) -> str:
        """The stage's name."""
        return stage_name_of(self.out_dir)

    def artifact(self, relative: str) -> Path:
        return self.out_dir / relative
