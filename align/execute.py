"""Inside a stage's process: read the config the orchestrator validated and resolved, run the stage
into its scratch folder, and write its result. The same code runs in-process, in a fresh Python
(`python -m align.execute SCRATCH_DIR`) and on every rank under `accelerate launch`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from align import artifacts as art
from align.console import quiet_libraries, setup_console
from align.preempt import EXIT_INTERRUPTED, Interrupted, stop_on_signals
from align.recipe.schema import StageConfig
from align.stages import stage_module
from align.tracking import tracking_env

logger = logging.getLogger("align")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def error_file(out_dir: Path, process_rank: int) -> Path:
    """Where a failed rank leaves its error line, for the orchestrator's manifest and console."""
    return out_dir / f"error.rank{process_rank}.txt"


def rank_errors(out_dir: Path) -> list[str]:
    """The error lines failed ranks left, as `rank N: Error: message`."""
    found = sorted(out_dir.glob("error.rank*.txt"), key=lambda p: int(p.stem.removeprefix("error.rank")))
    return [f"rank {p.stem.removeprefix('error.rank')}: {p.read_text(encoding='utf-8').strip()}" for p in found]


def write_stage_config(out_dir: Path, config: dict[str, Any], base_dir: Path, fingerprint: str) -> None:
    """What the orchestrator hands a stage: its config, validated, with references and paths resolved,
    and its fingerprint (kept in result.json, so finished stage folders describe themselves)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("error.rank*.txt"):  # a previous attempt's
        stale.unlink()
    art.write_json_atomic(out_dir / art.STAGE_CONFIG,
                          {"base_dir": str(base_dir.resolve()), "fingerprint": fingerprint, "config": config})


def read_stage_config(out_dir: Path) -> tuple[StageConfig, Path, str | None]:
    raw = json.loads((out_dir / art.STAGE_CONFIG).read_text(encoding="utf-8"))
    config = raw["config"]
    return stage_module(config["type"]).Config.model_validate(config), Path(raw["base_dir"]), raw.get("fingerprint")


def execute_stage(out_dir: Path) -> dict[str, Any]:
    """Run the stage whose config is in `out_dir` (its scratch folder) and write its result there.
    SIGTERM/SIGINT make it checkpoint and stop (`Interrupted`). On failure the whole traceback goes
    into the stage's log.txt and the error line into `error.rank<N>.txt`; the exception propagates."""
    config, base_dir, fingerprint = read_stage_config(out_dir)
    module = stage_module(config.type)
    log_path = out_dir / art.LOG
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    # Python warnings raised during the stage (deprecations, mostly) go to its log.txt, not the console.
    logging.captureWarnings(True)
    quiet_libraries()
    try:
        ctx = art.StageContext(out_dir.parent, out_dir, base_dir, config.seed or 0, art.MetricsWriter(out_dir / art.METRICS))
        with tracking_env(getattr(config, "report_to", None), out_dir), stop_on_signals():
            metrics = module.run(config, ctx) or {}
        if rank() == 0:
            ctx.metrics.log(art.SUMMARY, int(metrics.get("steps", 0)), **metrics)
            art.write_json_atomic(out_dir / art.RESULT, {"fingerprint": fingerprint, "metrics": metrics,
                                                         "artifacts": dict(module.ARTIFACTS),
                                                         **what_ran(), "device": device_name()})
        return metrics
    except Interrupted as err:
        root.removeHandler(handler)
        with log_path.open("a", encoding="utf-8") as log:
            log.write(f"stage '{config.name}' interrupted on rank {rank()}: {err}\n")
        error_file(out_dir, rank()).write_text(f"Interrupted: {err}\n", encoding="utf-8")
        raise
    except BaseException as err:
        root.removeHandler(handler)
        with log_path.open("a", encoding="utf-8") as log:
            log.write(f"stage '{config.name}' failed on rank {rank()}:\n{''.join(traceback.format_exception(err))}")
        error_file(out_dir, rank()).write_text(f"{type(err).__name__}: {err}\n", encoding="utf-8")
        raise
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        handler.close()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def what_ran() -> dict[str, Any]:
    """How the stage really ran, read back from torch.distributed and Accelerate's state after it
    finished (not from the launch config: several plausible command lines run one process, or plain
    DDP under a DeepSpeed config): world size, machines, distributed type, ZeRO stage, mixed precision."""
    ran: dict[str, Any] = {"world_size": world_size(), "num_machines": 1, "distributed_type": "NO"}
    if "torch" not in sys.modules:
        return ran
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        ran["world_size"] = dist.get_world_size()
        ran["distributed_type"] = "MULTI_GPU" if dist.get_backend() == "nccl" else "MULTI_CPU"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ran["world_size"]))
    ran["num_machines"] = max(1, ran["world_size"] // max(1, local))
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state:
            state = AcceleratorState()
            ran["distributed_type"] = state.distributed_type.value
            ran["mixed_precision"] = str(state.mixed_precision)
            plugin = state.deepspeed_plugin if state.distributed_type.value == "DEEPSPEED" else None
            if plugin is not None:
                ran["zero_stage"] = int(plugin.zero_stage)
    return ran


def device_name() -> str | None:
    """What the stage ran on (`cpu`, `cuda: <GPU name>`); None for a stage that never loaded torch."""
    if "torch" not in sys.modules:
        return None
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(torch.cuda.current_device())}"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def main(argv: list[str] | None = None) -> None:
    """Entry of a stage's own process: `python -m align.execute SCRATCH_DIR`."""
    parser = argparse.ArgumentParser(prog="align.execute", description="run one prepared stage")
    parser.add_argument("stage_dir", type=Path, help="the stage's scratch folder, holding stage_config.json")
    args = parser.parse_args(argv)
    setup_console()
    try:
        execute_stage(args.stage_dir)
    except Interrupted:
        sys.exit(EXIT_INTERRUPTED)  # checkpointed: `align run` again resumes
    except Exception:
        sys.exit(1)  # the traceback is in the stage's log.txt; the orchestrator shows its tail
    sys.exit(0)


if __name__ == "__main__":
    main()
