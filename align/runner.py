"""Plan and run a recipe: fingerprint each stage over the graph of references, skip what is complete
and unchanged, prepare and launch the rest one after another, and keep the manifest true at every
moment. The orchestrator never holds a model."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import align
from align import artifacts as art
from align.console import describe_progress, read_progress
from align.execute import rank_errors, write_stage_config
from align.launch import ONE_MACHINE, Machines, launch_stage, spans_machines
from align.paths import absolute_if_local, absolute_rule, resolve_user_path
from align.preempt import Interrupted, signal_name, stop_on_signals, stop_requested
from align.recipe.schema import (
    REFERENCE,
    REFERENCE_ANYWHERE,
    DataSpec,
    LauncherSpec,
    ModelSpec,
    StageConfig,
    walk_specs,
)
from align.recipe.validate import Recipe
from align.report import at_k_keys, library_versions, write_report

logger = logging.getLogger("align")

#: Lines of a failed stage's log shown on the console.
LOG_TAIL_LINES = 12


class StageFailed(RuntimeError):
    """A stage failed; the manifest, its log and the console say why."""


@dataclass
class PlannedStage:
    config: StageConfig
    fingerprint: str
    run: bool
    reason: str
    depends_on: tuple[str, ...]


def effective_config(recipe: Recipe, stage: StageConfig) -> StageConfig:
    """The stage with recipe-level defaults (model, seed, launcher, and `report_to` for stages that
    train) filled in."""
    updates: dict[str, Any] = {}
    if stage.model is None:
        updates["model"] = recipe.header.model
    if stage.seed is None:
        updates["seed"] = recipe.header.seed
    if stage.launcher is None:
        updates["launcher"] = recipe.header.launcher
    if "report_to" in type(stage).model_fields and getattr(stage, "report_to", None) is None:
        updates["report_to"] = recipe.header.report_to
    return stage.model_copy(update=updates)


# ------------------------------------------------------------------------------------------------
# fingerprints
# ------------------------------------------------------------------------------------------------


def referenced_stages(config: StageConfig) -> tuple[str, ...]:
    """Names of the stages whose artifacts this stage reads (`${stages.NAME.ARTIFACT}` anywhere)."""
    found = REFERENCE_ANYWHERE.findall(json.dumps(config.model_dump(mode="json")))
    names = {match.group(1) for text in found if (match := REFERENCE.match(text))}
    return tuple(sorted(names))


def local_inputs(config: StageConfig, base_dir: Path) -> list[Path]:
    """Files and folders on disk that the stage reads: datasets, model and tokenizer folders, chat
    template files, rule files (embedded names, hub ids and references are not on disk)."""
    candidates: list[str] = []
    for _, spec in walk_specs(config):
        if isinstance(spec, ModelSpec):
            candidates += [spec.name_or_path, spec.tokenizer or ""]
            if spec.chat_template and "{" not in spec.chat_template:
                candidates.append(spec.chat_template)
        elif isinstance(spec, DataSpec):
            candidates.append(spec.path)
        else:
            candidates.append(absolute_rule(spec.rule, base_dir).rsplit(":", 1)[0])
    paths = []
    for value in candidates:
        if value and not REFERENCE.match(value):
            path = resolve_user_path(value, base_dir)
            if path.exists():
                paths.append(path)
    return paths


def _digest_path(path: Path, digest: Any) -> None:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        stat = file.stat()
        digest.update(str(file.relative_to(path.parent)).encode())
        if stat.st_size <= 64 * 2**20:
            digest.update(file.read_bytes())
        else:  # huge weights: size and mtime are a fair proxy and keep planning instant
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())


def fingerprint(config: StageConfig, inputs: dict[str, str], base_dir: Path) -> str:
    """Hash of what decides a stage's result: its effective config (the launcher and the trackers
    aside: neither changes what is trained), the fingerprints of the stages it reads from (`inputs`:
    name → fingerprint), the local files it reads, and align's version. A stage no one reads from
    can change without re-running others."""
    dumped = config.model_dump(mode="json", exclude={"launcher", "report_to"})
    digest = hashlib.sha256(json.dumps(dumped, sort_keys=True).encode())
    digest.update(json.dumps(sorted(inputs.items())).encode())
    digest.update(align.__version__.encode())
    for path in local_inputs(config, base_dir):
        _digest_path(path, digest)
    return digest.hexdigest()[:16]


_READ = object()


def plan(recipe: Recipe, run_dir: Path, manifest: Any = _READ) -> list[PlannedStage]:
    """What runs and why: a stage runs when it never finished, when its fingerprint changed, or when
    a stage it reads from runs again. `manifest`: the run dir's, read here unless given."""
    if manifest is _READ:
        manifest = art.Manifest.read(run_dir)
    records = {s.name: s for s in manifest.stages} if manifest else {}
    planned: dict[str, PlannedStage] = {}
    for stage in recipe.stages:
        config = effective_config(recipe, stage)
        depends_on = referenced_stages(config)
        fp = fingerprint(config, {name: planned[name].fingerprint for name in depends_on}, recipe.base_dir)
        record = records.get(stage.name)
        rerun_inputs = [name for name in depends_on if planned[name].run]
        if record is None or record.fingerprint is None:
            run, reason = True, "not run yet"
        elif rerun_inputs:
            run, reason = True, f"stage '{rerun_inputs[0]}' it reads from runs again"
        elif record.fingerprint != fp:
            run, reason = True, "its config or inputs changed"
        elif record.status == art.COMPLETE and not art.is_complete(run_dir, record):
            run, reason = True, "its stage folder is gone"
        elif not art.is_complete(run_dir, record):
            run, reason = True, f"previous attempt did not finish (status: {record.status})"
        else:
            run, reason = False, "complete, unchanged"
        planned[stage.name] = PlannedStage(config, fp, run, reason, depends_on)
    return list(planned.values())


# ------------------------------------------------------------------------------------------------
# preparing a stage: references and paths resolved, once, here
# ------------------------------------------------------------------------------------------------


def _swap_references(value: Any, manifest: art.Manifest, run_dir: Path) -> Any:
    if isinstance(value, dict):
        return {k: _swap_references(v, manifest, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_swap_references(v, manifest, run_dir) for v in value]
    if isinstance(value, str) and (match := REFERENCE.match(value)):
        target, artifact = match.groups()
        record = manifest.record(target)
        if not art.is_complete(run_dir, record):
            raise RuntimeError(f"stage '{target}' must be complete before its {artifact} is used")
        return str((run_dir / record.artifacts[artifact]).resolve())
    return value


def _absolute_paths(config: StageConfig, dumped: dict[str, Any], base_dir: Path) -> None:
    """Make every local path the config names absolute (in `dumped`, in place), by the one rule of
    `align.paths`, so the stage reads the same files under every launcher and from any cwd."""
    for key_path, spec in walk_specs(config):
        node: Any = dumped
        for key in key_path:
            node = node[key]
        if isinstance(spec, ModelSpec):
            node["name_or_path"] = absolute_if_local(node["name_or_path"], base_dir)
            if node.get("tokenizer"):
                node["tokenizer"] = absolute_if_local(node["tokenizer"], base_dir)
            if node.get("chat_template") and "{" not in node["chat_template"]:
                node["chat_template"] = absolute_if_local(node["chat_template"], base_dir)
        elif isinstance(spec, DataSpec):
            node["path"] = absolute_if_local(node["path"], base_dir)
        else:
            node["rule"] = absolute_rule(node["rule"], base_dir)


def prepared_config(config: StageConfig, manifest: art.Manifest, run_dir: Path, base_dir: Path) -> dict[str, Any]:
    """The config a stage process runs: references replaced by artifact paths, local paths absolute."""
    dumped = config.model_dump(mode="json")
    _absolute_paths(config, dumped, base_dir)
    return _swap_references(dumped, manifest, run_dir)


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------

Reporter = Callable[[str], None]


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()[-lines:])


def load_manifest(recipe: Recipe, run_dir: Path, report: Reporter = print) -> art.Manifest | None:
    """The run dir's manifest; a corrupted one is moved aside and rebuilt from the finished stage
    folders (each result.json describes its stage), and the user is told."""
    try:
        return art.Manifest.read(run_dir)
    except art.ManifestError as err:
        aside = run_dir / f"{art.MANIFEST}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(run_dir / art.MANIFEST, aside)
        manifest = art.rebuild_manifest(run_dir, recipe.name, recipe.source, [(s.name, s.type) for s in recipe.stages])
        manifest.write(run_dir)
        kept = sum(s.status == art.COMPLETE for s in manifest.stages)
        report(f"[align] {err}: moved it to {aside.name} and rebuilt it from the finished stage folders "
               f"({kept} of {len(manifest.stages)} stages complete)")
        return manifest


def run_recipe(recipe: Recipe, run_dir: Path, report: Reporter = print, command: str | None = None,
               machines: Machines = ONE_MACHINE) -> art.Manifest:  # fmt: skip
    """Run every stage that needs it, in order, holding the run dir's lock (a second `align run` on it
    is refused). Stops at the first failure (`StageFailed`, after the failure was reported) or when
    a signal interrupts a stage (`Interrupted`: it checkpointed; running again resumes it). However
    it ends, the run report (report.html, report.md and its plots) is written into `run_dir`.
    On several machines this runs on machine 0; the others `follow` it (see `follow_run`)."""
    if not machines.is_main:
        with stop_on_signals():
            return follow_run(recipe, run_dir, report, machines)
    run_dir.mkdir(parents=True, exist_ok=True)
    with art.RunLock(run_dir), stop_on_signals():
        return _run(recipe, run_dir, report, command, machines)


def _run(recipe: Recipe, run_dir: Path, report: Reporter, command: str | None, machines: Machines) -> art.Manifest:
    old = load_manifest(recipe, run_dir, report)
    planned = plan(recipe, run_dir, old)
    art.write_text_atomic(run_dir / art.RESOLVED_RECIPE, yaml.safe_dump(recipe.data, sort_keys=False))
    old_records = {s.name: s for s in old.stages} if old else {}
    manifest = art.Manifest(recipe.name, recipe.source, [])
    manifest.run = {"command": command, "started": time.time(), "ended": None, "versions": library_versions()}
    for item in planned:
        kept = old_records.get(item.config.name)
        manifest.stages.append(kept if (kept and not item.run) else art.StageRecord(item.config.name, item.config.type))
    manifest.write(run_dir)
    if machines.num_machines > 1:
        _write_cluster(run_dir, recipe, planned, machines, "running")
    try:
        for item in planned:
            name = item.config.name
            if not item.run:
                report(f"[align] skip  {name} ({item.config.type}): {item.reason}")
                continue
            if stop_requested():
                raise Interrupted(f"stopped by {signal_name()} before stage '{name}' started")
            _run_stage(item, manifest, old_records.get(name), recipe, run_dir, report, machines)
    finally:
        manifest.run["ended"] = time.time()
        manifest.write(run_dir)
        if machines.num_machines > 1:
            _write_cluster(run_dir, recipe, planned, machines, "ended")
        try:
            html, _ = write_report(run_dir)
            report(f"[align] report: {html}")
        except Exception as err:  # a report that cannot be drawn must not hide how the run itself ended
            logger.warning("align: could not write the run report: %s: %s", type(err).__name__, err)
    return manifest


def _run_stage(item: PlannedStage, manifest: art.Manifest, previous: art.StageRecord | None, recipe: Recipe,
               run_dir: Path, report: Reporter, machines: Machines = ONE_MACHINE) -> None:  # fmt: skip
    name = item.config.name
    scratch = art.scratch_dir(run_dir, name)
    # An unfinished attempt (running when killed, failed, interrupted) is resumed from its scratch
    # folder when it ran this very config; the folder's own stage_config.json says which it ran.
    attempted = art.scratch_fingerprint(scratch) if scratch.exists() else None
    resuming = attempted == item.fingerprint and (previous is None or previous.status != art.COMPLETE)
    if resuming:
        report(f"[align] run   {name} ({item.config.type}): {item.reason}; resuming its unfinished attempt")
    else:
        report(f"[align] run   {name} ({item.config.type}): {item.reason}")
        if scratch.exists():
            if attempted is not None:
                report(f"[align]       its unfinished attempt ran another config: discarding {scratch.name}")
            shutil.rmtree(scratch, ignore_errors=True)
    record = manifest.record(name)
    record.status, record.fingerprint, record.started = art.RUNNING, item.fingerprint, time.time()
    record.ended = record.duration_s = record.error = None
    record.metrics, record.artifacts = {}, {}
    for key in RAN_KEYS:
        setattr(record, key, None)
    manifest.write(run_dir)
    try:
        write_stage_config(scratch, prepared_config(item.config, manifest, run_dir, recipe.base_dir), recipe.base_dir,
                           item.fingerprint)
        launch_stage(item.config.launcher or LauncherSpec(), scratch, recipe.base_dir, machines)
        final = art.publish(run_dir, name)
    except BaseException as err:
        record.ended = time.time()
        record.duration_s = round(record.ended - (record.started or record.ended), 2)
        if isinstance(err, Interrupted):
            record.status, record.error = art.INTERRUPTED, str(err)
            manifest.write(run_dir)
            report(f"[align] interrupted {name}: {err}; run the same command again to resume it")
            raise
        record.status = art.FAILED
        record.error = "; ".join(rank_errors(scratch)) or f"{type(err).__name__}: {err}"
        manifest.write(run_dir)
        if isinstance(err, KeyboardInterrupt | SystemExit):
            raise
        report(f"[align] FAILED {name}: {record.error}")
        if tail := _log_tail(scratch / art.LOG):
            report(tail)
        report(f"[align] full log: {scratch / art.LOG}")
        raise StageFailed(f"stage '{name}' failed: {record.error}") from err
    result = json.loads((final / art.RESULT).read_text(encoding="utf-8"))
    record.status, record.ended = art.COMPLETE, time.time()
    record.duration_s = round(record.ended - (record.started or record.ended), 2)
    record.metrics = result.get("metrics", {})
    record.artifacts = {k: f"{name}/{v}" for k, v in result.get("artifacts", {}).items()}
    for key in RAN_KEYS:
        setattr(record, key, result.get(key))
    manifest.write(run_dir)
    report(f"[align] done  {name} in {record.duration_s:.1f}s {_short_metrics(record.metrics)}")


# ------------------------------------------------------------------------------------------------
# several machines: machine 0 runs the recipe as above; every other machine follows it
# ------------------------------------------------------------------------------------------------

#: Machine 0's plan for the other machines, in the (shared) run dir.
CLUSTER = "machines.json"
#: How long another machine waits for machine 0 to start the run (ALIGN_MACHINE_WAIT_S).
MACHINE_WAIT_S = 600.0
#: A plan machine 0 wrote longer ago than this before a machine started is an earlier run's.
CLOCK_SLACK_S = 600.0


def _write_cluster(run_dir: Path, recipe: Recipe, planned: list[PlannedStage], machines: Machines, state: str) -> None:
    art.write_json_atomic(run_dir / CLUSTER, {
        "recipe": recipe.name, "state": state, "started": time.time(), "num_machines": machines.num_machines,
        "stages": [{"name": p.config.name, "fingerprint": p.fingerprint, "run": p.run} for p in planned],
    })  # fmt: skip


def _wait(what: str, ready: Callable[[], Any], timeout_s: float | None, poll_s: float = 0.5) -> Any:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while (found := ready()) is None:
        if stop_requested():
            raise Interrupted(f"stopped by {signal_name()} while waiting for {what}")
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(poll_s)
    return found


def follow_run(recipe: Recipe, run_dir: Path, report: Reporter, machines: Machines) -> art.Manifest:
    """Machine `machine_rank` > 0 of a multi-machine run: wait for machine 0's plan in the shared run
    dir, check that this machine's recipe is the same, then for each stage machine 0 runs, launch this
    machine's share of it (the stages that span machines: `accelerate` launchers) and wait until
    machine 0 records it complete. Machine 0 writes the manifest and publishes; this one only reads."""
    who = f"machine {machines.machine_rank}"
    started = time.time()
    timeout = float(os.environ.get("ALIGN_MACHINE_WAIT_S", MACHINE_WAIT_S))

    def cluster_plan() -> dict[str, Any] | None:
        try:
            found = json.loads((run_dir / CLUSTER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        fresh = found.get("state") == "running" and found.get("started", 0) >= started - CLOCK_SLACK_S
        return found if fresh else None

    report(f"[align] {who} of {machines.num_machines}: waiting for machine 0 to start the run in {run_dir}")
    cluster = _wait("machine 0's plan", cluster_plan, timeout)
    if cluster is None:
        raise StageFailed(f"{who}: machine 0 started no run in {run_dir} within {timeout:.0f} s. Every machine needs "
                          "the SAME run dir on a shared filesystem (and the same recipe); is machine 0 running?")
    if cluster["num_machines"] != machines.num_machines:
        raise StageFailed(f"{who}: machine 0 runs on {cluster['num_machines']} machines, this one was told "
                          f"{machines.num_machines}")
    ours = {p.config.name: p for p in plan(recipe, run_dir, None)}
    theirs = [(s["name"], s["fingerprint"]) for s in cluster["stages"]]
    if [(n, p.fingerprint) for n, p in ours.items()] != theirs:
        differing = next((n for n, fp in theirs if n not in ours or ours[n].fingerprint != fp), None) or "the stage list"
        raise StageFailed(f"{who}: this machine's recipe differs from machine 0's ({differing}); every machine must run "
                          "the same recipe, overrides and input files")
    for entry in cluster["stages"]:
        if entry["run"]:
            _follow_stage(ours[entry["name"]], recipe, run_dir, report, machines)
    return art.Manifest.read(run_dir) or art.Manifest(recipe.name, recipe.source, [])


def _follow_stage(item: PlannedStage, recipe: Recipe, run_dir: Path, report: Reporter, machines: Machines) -> None:
    who, name = f"machine {machines.machine_rank}", item.config.name
    spec = item.config.launcher or LauncherSpec()
    scratch = art.scratch_dir(run_dir, name)
    if spans_machines(spec, machines):
        prepared = _wait(f"stage '{name}' to be prepared", lambda: (
            "launch" if art.scratch_fingerprint(scratch) == item.fingerprint else _finished(run_dir, item)), None)
        if prepared == "launch":
            report(f"[align] {who}: run   {name} ({item.config.type}), this machine's share")
            try:
                launch_stage(spec, scratch, recipe.base_dir, machines)
            except Interrupted:
                raise
            except Exception as err:
                report(f"[align] {who}: FAILED {name}: {err}")
                raise StageFailed(f"stage '{name}' failed on {who}: {err}") from err
    record = _wait(f"stage '{name}' on machine 0", lambda: _finished(run_dir, item), None)
    if record.status != art.COMPLETE:
        raise StageFailed(f"stage '{name}' {record.status} on machine 0: {record.error}")
    report(f"[align] {who}: done  {name}")


def _finished(run_dir: Path, item: PlannedStage) -> art.StageRecord | None:
    """Machine 0's record of the stage once it ended (complete, failed or interrupted), else None.
    A machine 0 that is gone (no process holds the run dir's lock) counts as the stage failing."""
    try:
        manifest = art.Manifest.read(run_dir)
    except art.ManifestError:
        return None  # being replaced: read again
    record = next((s for s in manifest.stages if s.name == item.config.name), None) if manifest else None
    if record is not None and record.fingerprint == item.fingerprint and record.status in (art.COMPLETE, art.FAILED,
                                                                                            art.INTERRUPTED):
        return record
    if art.lock_holder(run_dir) is None and (run_dir / art.LOCK).exists():
        gone = art.StageRecord(item.config.name, item.config.type, art.FAILED)
        gone.error = "machine 0 is no longer running the recipe (it holds the run dir's lock while it does)"
        return gone
    return None


#: What a stage's result.json says really ran, copied onto its manifest record.
RAN_KEYS = ("world_size", "device", "num_machines", "distributed_type", "zero_stage", "mixed_precision")


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
    keys = ["accuracy", "exact_match", *at_k_keys(m for _, m in rows), "format", "mean_length"]
    header = ["eval stage", *keys]
    table = [header] + [[name, *(f"{m[k]:.3f}" if isinstance(m.get(k), float) else str(m.get(k, "-")) for k in keys)]
                        for name, m in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)) for r in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def progress_lines(run_dir: Path, manifest: art.Manifest) -> list[str]:
    """One line per running stage: its progress and ETA from its scratch folder's progress.json, or
    the last step its metrics.jsonl reached when it has written no progress yet."""
    lines = []
    for record in manifest.stages:
        if record.status != art.RUNNING:
            continue
        scratch = art.scratch_dir(run_dir, record.name)
        progress = read_progress(scratch)
        if progress is not None:
            lines.append(f"{record.name}: {describe_progress(progress)}")
            continue
        try:
            steps = [row["step"] for row in art.read_metrics(scratch / art.METRICS)]
        except ValueError:  # a line being written right now
            steps = []
        lines.append(f"{record.name}: " + (f"step {max(steps)} logged" if steps else "started, no progress logged yet"))
    return lines


def render_report(manifest: art.Manifest) -> str:
    """The end-of-run screen: every stage's status and metrics, then held-out accuracy by stage."""
    table = accuracy_table(manifest)
    return summary_table(manifest) + (f"\n\nHeld-out accuracy\n{table}" if table else "")
