"""Plan and run a recipe: fingerprint each stage, skip what is complete and unchanged, launch the rest
one after another, and keep the manifest true at every moment."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from align import artifacts as art
from align.recipe.schema import REFERENCE, StageConfig
from align.recipe.validate import Recipe, resolve_user_path

logger = logging.getLogger("align")

#: Keys whose string values may name local files or folders; their contents go into the fingerprint.
_PATH_KEYS = {"path", "name_or_path", "tokenizer", "rule"}


@dataclass
class StageContext:
    """What a stage's `run()` gets: where to write, where to read, and how to log."""

    run_dir: Path
    out_dir: Path
    base_dir: Path
    seed: int
    metrics: art.MetricsWriter

    def artifact(self, relative: str) -> Path:
        return self.out_dir / relative


@dataclass
class PlannedStage:
    config: StageConfig
    fingerprint: str
    run: bool
    reason: str


def effective_config(recipe: Recipe, stage: StageConfig) -> StageConfig:
    """The stage with recipe-level defaults (model, seed, launcher) filled in."""
    updates: dict[str, Any] = {}
    if stage.model is None:
        updates["model"] = recipe.header.model
    if stage.seed is None:
        updates["seed"] = recipe.header.seed
    if stage.launcher is None:
        updates["launcher"] = recipe.header.launcher
    return stage.model_copy(update=updates)


def _digest_path(path: Path, digest: Any) -> None:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        stat = file.stat()
        digest.update(str(file.relative_to(path.parent)).encode())
        if stat.st_size <= 64 * 2**20:
            digest.update(file.read_bytes())
        else:  # huge weights: size and mtime are a fair proxy and keep planning instant
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())


def _local_inputs(value: Any, base_dir: Path, key: str = "") -> list[Path]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _local_inputs(v, base_dir, k)]
    if isinstance(value, list):
        return [p for v in value for p in _local_inputs(v, base_dir, key)]
    if isinstance(value, str) and key in _PATH_KEYS and not REFERENCE.match(value):
        if key == "rule" and ".py:" in value:  # `path/to/rules.py:func`
            value = value.rsplit(":", 1)[0]
        path = resolve_user_path(value, base_dir)
        return [path] if path.exists() else []
    return []


def fingerprint(config: StageConfig, previous: str | None, base_dir: Path) -> str:
    """Hash of the stage's effective config, the local files it reads, and the stage before it —
    so a change anywhere re-runs that stage and everything after it."""
    dumped = config.model_dump(mode="json", exclude={"launcher"})
    digest = hashlib.sha256(json.dumps(dumped, sort_keys=True).encode())
    digest.update((previous or "").encode())
    for path in _local_inputs(dumped, base_dir):
        _digest_path(path, digest)
    return digest.hexdigest()[:16]


def plan(recipe: Recipe, run_dir: Path) -> list[PlannedStage]:
    manifest = art.Manifest.read(run_dir)
    records = {s.name: s for s in manifest.stages} if manifest else {}
    planned: list[PlannedStage] = []
    previous: str | None = None
    rerun_from: str | None = None
    for stage in recipe.stages:
        config = effective_config(recipe, stage)
        fp = fingerprint(config, previous, recipe.base_dir)
        record = records.get(stage.name)
        if record is None or record.fingerprint is None:
            run, reason = True, "not run yet"
        elif rerun_from is not None:
            run, reason = True, f"an earlier stage ('{rerun_from}') runs again"
        elif record.fingerprint != fp:
            run, reason = True, "its config or inputs changed"
        elif not art.is_complete(run_dir, record):
            run, reason = True, f"previous attempt did not finish (status: {record.status})"
        else:
            run, reason = False, "complete, unchanged"
        if run and rerun_from is None:
            rerun_from = stage.name
        planned.append(PlannedStage(config, fp, run, reason))
        previous = fp
    return planned


def resolve_references(config: StageConfig, manifest: art.Manifest, run_dir: Path) -> StageConfig:
    """Replace `${stages.NAME.ARTIFACT}` with the absolute path of that finished artifact."""

    def swap(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        if isinstance(value, str) and (match := REFERENCE.match(value)):
            target, artifact = match.groups()
            record = manifest.record(target)
            if not art.is_complete(run_dir, record):
                raise RuntimeError(f"stage '{target}' must be complete before its {artifact} is used")
            return str((run_dir / record.artifacts[artifact]).resolve())
        return value

    return type(config).model_validate(swap(config.model_dump(exclude_unset=False)))


def execute_stage(config: StageConfig, run_dir: Path, base_dir: Path) -> dict[str, Any]:
    """Run one stage into its scratch folder (in this process). Used in-process and by the stage
    process that `align.stage_main` starts under python or accelerate."""
    from align.stages import stage_module

    module = stage_module(config.type)
    manifest = art.Manifest.read(run_dir)
    assert manifest is not None, "the orchestrator writes the manifest before launching a stage"
    config = resolve_references(config, manifest, run_dir)
    out_dir = art.scratch_dir(run_dir, config.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out_dir / art.LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        ctx = StageContext(run_dir, out_dir, base_dir, config.seed or 0, art.MetricsWriter(out_dir / art.METRICS))
        metrics = module.run(config, ctx) or {}
        if _is_main_process():
            art.write_json_atomic(out_dir / art.RESULT, {"metrics": metrics, "artifacts": dict(module.ARTIFACTS)})
        return metrics
    finally:
        root.removeHandler(handler)
        handler.close()


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


Reporter = Callable[[str], None]


def run_recipe(recipe: Recipe, run_dir: Path, report: Reporter = print) -> art.Manifest:
    """Run every stage that needs it, in order. Stops at the first failure (the manifest says which)."""
    from align.launch import launch_stage

    run_dir.mkdir(parents=True, exist_ok=True)
    planned = plan(recipe, run_dir)
    art.write_text_atomic(run_dir / art.RESOLVED_RECIPE, yaml.safe_dump(recipe.data, sort_keys=False))
    old = art.Manifest.read(run_dir)
    old_records = {s.name: s for s in old.stages} if old else {}
    manifest = art.Manifest(recipe.name, recipe.source, [])
    for item in planned:
        kept = old_records.get(item.config.name)
        manifest.stages.append(kept if (kept and not item.run) else art.StageRecord(item.config.name, item.config.type))
    manifest.write(run_dir)

    for item in planned:
        name = item.config.name
        record = manifest.record(name)
        if not item.run:
            report(f"[align] skip  {name} ({item.config.type}): {item.reason}")
            continue
        report(f"[align] run   {name} ({item.config.type}): {item.reason}")
        shutil.rmtree(art.scratch_dir(run_dir, name), ignore_errors=True)
        record.status, record.fingerprint, record.started = art.RUNNING, item.fingerprint, time.time()
        record.ended = record.duration_s = record.error = None
        record.metrics, record.artifacts = {}, {}
        manifest.write(run_dir)
        try:
            launch_stage(item.config, run_dir, recipe.base_dir)
            final = art.publish(run_dir, name)
        except BaseException as err:
            record.status, record.ended = art.FAILED, time.time()
            record.duration_s = round(record.ended - (record.started or record.ended), 2)
            record.error = f"{type(err).__name__}: {err}"
            manifest.write(run_dir)
            if not isinstance(err, KeyboardInterrupt | SystemExit):
                logger.debug("stage failed", exc_info=True)
                report(f"[align] FAILED {name}: {record.error}")
                report("".join(traceback.format_exception(err)[-3:]).rstrip())
            raise
        result = json.loads((final / art.RESULT).read_text(encoding="utf-8"))
        record.status, record.ended = art.COMPLETE, time.time()
        record.duration_s = round(record.ended - (record.started or record.ended), 2)
        record.metrics = result.get("metrics", {})
        record.artifacts = {k: f"{name}/{v}" for k, v in result.get("artifacts", {}).items()}
        manifest.write(run_dir)
        report(f"[align] done  {name} in {record.duration_s:.1f}s {_short_metrics(record.metrics)}")
    return manifest


def _short_metrics(metrics: dict[str, Any]) -> str:
    shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(metrics.items())[:6]]
    return " ".join(shown)


def summary_table(manifest: art.Manifest) -> str:
    rows = [("stage", "type", "status", "time", "metrics")]
    for s in manifest.stages:
        seconds = f"{s.duration_s:.1f}s" if s.duration_s is not None else "-"
        rows.append((s.name, s.type, s.status, seconds, _short_metrics(s.metrics)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def accuracy_table(manifest: art.Manifest) -> str:
    """Held-out accuracy after each evaluated stage — the line a pipeline run is judged by."""
    rows = [(s.name, s.metrics) for s in manifest.stages if "accuracy" in s.metrics]
    if not rows:
        return ""
    keys = ["accuracy", "exact_match", *sorted({k for _, m in rows for k in m if k.startswith("pass@")}), "format", "mean_length"]
    header = ["eval stage", *keys]
    table = [header] + [[name, *(f"{m[k]:.3f}" if isinstance(m.get(k), float) else str(m.get(k, "-")) for k in keys)]
                        for name, m in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)) for r in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def render_report(manifest: art.Manifest) -> str:
    """The end-of-run screen: every stage's status and metrics, then held-out accuracy by stage."""
    table = accuracy_table(manifest)
    return summary_table(manifest) + (f"\n\nHeld-out accuracy\n{table}" if table else "")


def main_stage_process(argv: list[str] | None = None) -> None:
    """Entry of a stage's own process (`python -m align.stage_main`)."""
    import argparse

    from align.recipe.validate import load_recipe

    parser = argparse.ArgumentParser(prog="align.stage_main")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--stage", required=True)
    parser.add_argument("--base-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    recipe = load_recipe(args.run_dir / art.RESOLVED_RECIPE, check_files=False, check_models=False)
    recipe.base_dir = args.base_dir
    config = effective_config(recipe, recipe.stage(args.stage))
    execute_stage(config, args.run_dir, args.base_dir)
    sys.exit(0)
