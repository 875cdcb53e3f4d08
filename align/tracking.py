"""Experiment tracking (`report_to`): TensorBoard and Weights & Biases, for TRL's trainers and for the
ppo stage's own loop (Accelerate's trackers).

Every tracker writes into the stage's own folder, `<stage>/tracking/`: TensorBoard event files under
`tracking/tensorboard/`, wandb's run folder under `tracking/wandb/`. TRL's default location is the
trainer's scratch work dir, which align deletes once the model is saved, so align points the trackers
elsewhere: through the environment variables transformers' and wandb's integrations read
(`TENSORBOARD_LOGGING_DIR`, `WANDB_DIR`, `WANDB_PROJECT`), set for the stage's lifetime only. The wandb
project is the recipe's name (unless `WANDB_PROJECT` is set), the run name the stage's. wandb works
without a network with `WANDB_MODE=offline` (sync later with `wandb sync`)."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from align.artifacts import Manifest, stage_name_of

logger = logging.getLogger("align")

#: The trackers align wires up, and the package each one needs.
TRACKERS: dict[str, str] = {"tensorboard": "tensorboard", "wandb": "wandb"}
TRACKING_DIR = "tracking"


def trackers(report_to: Sequence[str] | None) -> list[str]:
    """The trackers asked for (`none` and an unset value mean none)."""
    return [name for name in (report_to or []) if name != "none"]


def report_to_problems(report_to: Sequence[str] | None) -> list[str]:
    """Why the asked-for trackers cannot run here (their package is missing); checked at validation."""
    return [f"report_to '{name}' needs the {package} package: pip install {package} (or pip install 'align[tracking]')"
            for name in trackers(report_to) if importlib.util.find_spec(package := TRACKERS[name]) is None]  # fmt: skip


def tracking_dir(out_dir: Path) -> Path:
    return out_dir / TRACKING_DIR


def project_name(run_dir: Path) -> str:
    """What trackers group a run's stages under: `WANDB_PROJECT` if set, else the recipe's name
    (from the run's manifest), else the run folder's name."""
    if os.environ.get("WANDB_PROJECT"):
        return os.environ["WANDB_PROJECT"]
    manifest = Manifest.read(run_dir)
    return manifest.recipe if manifest is not None else run_dir.name


@contextmanager
def tracking_env(report_to: Sequence[str] | None, out_dir: Path) -> Iterator[None]:
    """For the stage's lifetime (`out_dir`: its scratch folder in the run dir), point transformers'
    TensorBoard and wandb integrations at the stage's own folder; afterwards restore the environment
    and finish an open wandb run (the next stage in this process would otherwise log into it)."""
    names = trackers(report_to)
    if not names:
        yield
        return
    folder = tracking_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {}
    if "tensorboard" in names:
        env["TENSORBOARD_LOGGING_DIR"] = str(folder / "tensorboard")
    if "wandb" in names:
        env["WANDB_DIR"] = str(folder)
        env["WANDB_PROJECT"] = project_name(out_dir.parent)
        # wandb's own banner and run summary would flood the console; align says where the run is.
        env["WANDB_SILENT"] = os.environ.get("WANDB_SILENT", "true")
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        if "wandb" in sys.modules:
            _finish_wandb(out_dir)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _finish_wandb(out_dir: Path) -> None:
    """Close the stage's wandb run and wandb's process-wide setup: wandb reads WANDB_DIR once per
    setup, so the next stage in this process would otherwise write into this stage's folder."""
    import wandb

    if wandb.run is not None:
        where = Path(wandb.run.dir).parent  # the run's folder (wandb.run.dir is its files/)
        offline = wandb.run.settings.mode in ("offline", "dryrun")
        wandb.finish()
        # Say where it will be once the scratch folder is published as the stage's folder.
        scratch, final = tracking_dir(out_dir), tracking_dir(out_dir.parent / stage_name_of(out_dir))
        shown = final / where.relative_to(scratch) if where.is_relative_to(scratch) else where
        logger.info("  wandb run: %s%s", shown, f" (offline; upload with: wandb sync {shown})" if offline else "")
    wandb.teardown()


def accelerate_trackers(report_to: Sequence[str] | None, out_dir: Path, run_name: str) -> list[Any]:
    """Accelerate tracker objects for a loop of align's own (`Accelerator(log_with=...)`), writing into
    the same places as the TRL stages' trackers."""
    names = trackers(report_to)
    if not names:
        return []
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    folder = tracking_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    found: list[Any] = []
    if "tensorboard" in names:
        found.append(TensorBoardTracker("tensorboard", folder))
    if "wandb" in names:
        found.append(WandBTracker(project_name(out_dir.parent), name=run_name, dir=str(folder)))
    return found


def flat_config(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config as the flat scalar mapping trackers store as hyper-parameters (nested keys dotted,
    lists and None as text)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
