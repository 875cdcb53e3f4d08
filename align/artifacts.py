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

PENDING, RUNNING, COMPLETE, FAILED, INTERRUPTED = "pending", "running", "complete", "failed", "interrupted"
LOCK = ".lock"


class ManifestError(ValueError):
    """manifest.json cannot be read (truncated, hand-edited, not align's)."""


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
    #: What really ran, as the stage's processes read it back at the end (None: not known, or no torch):
    #: processes, machines, Accelerate's distributed type, the ZeRO stage where DeepSpeed ran, the mixed
    #: precision, and the device of its main process.
    world_size: int | None = None
    device: str | None = None
    num_machines: int | None = None
    distributed_type: str | None = None
    zero_stage: int | None = None
    mixed_precision: str | None = None


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
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(raw["recipe"], raw["source"], [StageRecord(**s) for s in raw["stages"]], raw.get("run", {}))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ManifestError(f"{path} cannot be read ({type(err).__name__}: {err})") from None

    def write(self, run_dir: Path) -> None:
        write_json_atomic(run_dir / MANIFEST, {"recipe": self.recipe, "source": self.source, "run": self.run,
                                               "stages": [asdict(s) for s in self.stages]})

    def record(self, name: str) -> StageRecord:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


def is_complete(run_dir: Path, record: StageRecord | None) -> bool:
    """Complete means: the manifest says so AND the finished folder holds its result file and every
    artifact it lists (a folder or file deleted by hand makes the stage incomplete again)."""
    if record is None or record.status != COMPLETE:
        return False
    if not (stage_dir(run_dir, record.name) / RESULT).exists():
        return False
    return all((run_dir / relative).exists() for relative in record.artifacts.values())


def scratch_fingerprint(scratch: Path) -> str | None:
    """The fingerprint of the config an unfinished attempt in `scratch` ran (its stage_config.json),
    or None: what decides whether the attempt can be resumed, whatever the manifest says."""
    try:
        return json.loads((scratch / STAGE_CONFIG).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def rebuild_manifest(run_dir: Path, recipe: str, source: str, stages: list[tuple[str, str]]) -> Manifest:
    """A manifest made again from the finished stage folders (each `result.json` holds the stage's
    fingerprint, metrics and artifacts), for a run dir whose manifest.json was lost or corrupted:
    `stages` are the recipe's (name, type) in order; a stage without a finished folder is pending."""
    records = []
    for name, stage_type in stages:
        result_file = stage_dir(run_dir, name) / RESULT
        record = StageRecord(name, stage_type)
        try:
            result = json.loads(result_file.read_text(encoding="utf-8")) if result_file.exists() else None
        except (OSError, json.JSONDecodeError):
            result = None
        if result and result.get("fingerprint"):
            record.status, record.fingerprint = COMPLETE, result["fingerprint"]
            record.metrics = result.get("metrics", {})
            record.artifacts = {k: f"{name}/{v}" for k, v in result.get("artifacts", {}).items()}
        records.append(record)
    return Manifest(recipe, source, records)


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
# JSONL outputs written chunk by chunk, resumable
# ------------------------------------------------------------------------------------------------

CHUNKS = "chunks.json"


class ChunkedJsonl:
    """JSONL files a generation stage writes a chunk of prompts at a time. After each chunk,
    `commit` makes the lines durable and records how far every file got (and the stage's own
    counters); a stage killed mid-chunk resumes after the last committed chunk, its files cut back
    to what that commit recorded, so no line is lost or written twice."""

    def __init__(self, out_dir: Path, names: list[str], *, writer: bool = True) -> None:
        self.out_dir = out_dir
        self.paths = {name: out_dir / name for name in names}
        self.progress_path = out_dir / CHUNKS
        self._files: dict[str, Any] = {}
        #: Only one process of a data-parallel stage writes; the others only read where it got to.
        self.writer = writer

    def open(self) -> tuple[int, dict[str, Any]]:
        """Open the files for appending; returns (chunks already done, the state saved with them)."""
        done, state, sizes = 0, {}, {}
        if self.progress_path.exists():
            progress = json.loads(self.progress_path.read_text(encoding="utf-8"))
            done, state, sizes = progress["chunks_done"], progress["state"], progress["sizes"]
        if not self.writer:
            return done, state
        for name, path in self.paths.items():
            fh = path.open("ab")
            fh.truncate(sizes.get(name, 0))  # lines of a chunk that was not committed go
            fh.seek(0, os.SEEK_END)
            self._files[name] = fh
        return done, state

    def write(self, name: str, row: dict[str, Any]) -> None:
        if not self.writer:
            return
        self._files[name].write((json.dumps(_finite(row), ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))

    def commit(self, chunks_done: int, state: dict[str, Any]) -> None:
        if not self.writer:
            return
        for fh in self._files.values():
            fh.flush()
            os.fsync(fh.fileno())
        write_json_atomic(self.progress_path, {"chunks_done": chunks_done, "state": state,
                                               "sizes": {name: fh.tell() for name, fh in self._files.items()}})

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files = {}

    def __enter__(self) -> ChunkedJsonl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_committed(out_dir: Path, name: str) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """What a ChunkedJsonl in `out_dir` has committed of `name`: (chunks done, the state saved with
    them, the rows) — nothing before the first commit. For a process that resumes without writing."""
    progress_path = out_dir / CHUNKS
    if not progress_path.exists():
        return 0, {}, []
    progress = json.loads(progress_path.read_text(encoding="utf-8"))
    with (out_dir / name).open("rb") as fh:
        data = fh.read(progress["sizes"].get(name, 0))
    return progress["chunks_done"], progress["state"], [json.loads(line) for line in data.decode("utf-8").splitlines()]


# ------------------------------------------------------------------------------------------------
# one run per run dir
# ------------------------------------------------------------------------------------------------


class RunDirInUse(RuntimeError):
    """Another `align run` holds the run dir."""


class RunLock:
    """An exclusive lock on a run dir for the life of one `align run` (`fcntl.flock` on `.lock`: the
    kernel releases it when the process dies, however it dies, so a lock left by a dead process is
    never mistaken for a live one). The file says who holds it, for the message a second run gets."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self._fh: Any = None

    def acquire(self) -> RunLock:
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunDirInUse(f"{self.path.parent} is in use by {holder}; wait for it, or use another --run-dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor releases the flock
            self._fh = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(run_dir: Path) -> str | None:
    """Who holds the run dir's lock now (a live run), or None (no run is using it)."""
    import fcntl

    path = run_dir / LOCK
    if not path.exists():
        return None
    with path.open("a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            return fh.read().strip() or "another process"
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


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


def drop_metrics_after(path: Path, step: int) -> None:
    """Remove the rows past `step` (written after the checkpoint a stage resumes from; they will be
    written again), keeping everything else — including rows this schema does not know — as it was."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if not (isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step):
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


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
