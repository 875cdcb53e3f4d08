"""What a person sees while align runs. On the console: align's own lines, one progress bar per stage
(steps, ETA) and a one-line summary every logging step; library warnings stay visible. Everything else
— library messages and Python warnings raised during a stage, full metric rows — goes to the stage's
`log.txt` only. Each stage's scratch folder also gets `progress.json` (step, total, start and last
update), which `align status` reads to show a running stage's progress and ETA.

Nothing here imports a heavy library: the orchestrator and `align validate` use it too."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from align.artifacts import write_json_atomic

logger = logging.getLogger("align")

#: Records of this logger (and its children) go to the stage's log.txt, never to the console.
DETAIL = "align.detail"
detail = logging.getLogger(DETAIL)

#: Written into a running stage's scratch folder; `align status` reads it.
PROGRESS = "progress.json"
#: progress.json is rewritten at most this often (seconds), and always at the last step.
PROGRESS_WRITE_INTERVAL_S = 1.0


# ------------------------------------------------------------------------------------------------
# logging: console and log.txt
# ------------------------------------------------------------------------------------------------


def _is_align(name: str) -> bool:
    return name == "align" or name.startswith("align.")


class ConsoleFilter(logging.Filter):
    """The console shows align's own records and other libraries' warnings and errors; not the
    detail records (full metric rows) and not Python warnings (deprecation notices), which go to the
    stage's log.txt."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == DETAIL or record.name.startswith(DETAIL + "."):
            return False
        if _is_align(record.name):
            return True
        return record.levelno >= logging.WARNING and record.name != "py.warnings"


class ConsoleHandler(logging.Handler):
    """Writes to the current `sys.stderr` through tqdm, so a line never tears a progress bar (and a
    replaced stderr, as under pytest, is honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_console(level: str | None = None) -> None:
    """Install the console handler on the root logger, once per process."""
    root = logging.getLogger()
    root.setLevel(level or os.environ.get("ALIGN_LOG_LEVEL", "INFO"))
    if any(isinstance(h, ConsoleHandler) for h in root.handlers):
        return
    handler = ConsoleHandler()
    if int(os.environ.get("RANK", "0")) != 0:
        handler.setLevel(logging.WARNING)  # the main process tells the story; other ranks only their problems
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(ConsoleFilter())
    root.addHandler(handler)


def quiet_libraries() -> None:
    """Inside a stage: no progress bars of datasets (map, tokenize), huggingface_hub or transformers
    (loading and writing weights) — the stage's own bar is the one that counts — and transformers'
    log records go through the root logger (so into log.txt) instead of its own stderr handler.
    Environment variables cover libraries not imported yet; imported ones are switched directly. A
    user's own setting of those variables is kept."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
        from datasets.utils import disable_progress_bars

        disable_progress_bars()
    if "huggingface_hub" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        from huggingface_hub.utils import disable_progress_bars as hub_disable

        hub_disable()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            hf_logging.disable_progress_bar()
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()


# ------------------------------------------------------------------------------------------------
# one-line summaries
# ------------------------------------------------------------------------------------------------

#: What a summary line shows, in this order, when the row has it: (key, label). TRL's names for TRL
#: stages, the ppo stage's own names for PPO; `rewards/<rule>/mean` and `score/<part>` are added
#: after the total reward / score they make up.
SUMMARY_KEYS: tuple[tuple[str, str], ...] = (
    ("loss", "loss"),
    ("eval_loss", "eval loss"),
    ("reward", "reward"),
    ("score", "score"),
    ("eval_score", "eval score"),
    ("kl", "kl"),
    ("entropy", "entropy"),
    ("accuracy", "acc"),
    ("eval_accuracy", "eval acc"),
    ("mean_token_accuracy", "token acc"),
    ("value_loss", "value loss"),
    ("completions/mean_length", "len"),
    ("response_length", "len"),
    ("learning_rate", "lr"),
)
#: The parts a total is made of: GRPO's per-rule means (`rewards/<rule>/mean`), PPO's `score/<part>`.
PARTS: dict[str, tuple[str, str]] = {"reward": ("rewards/", "/mean"), "score": ("score/", "")}


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return f"{value:.4g}"


def format_duration(seconds: float) -> str:
    """`0:42`, `12:05`, `1:02:03`."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def summary_fields(values: Mapping[str, Any]) -> list[str]:
    """The `label value` pieces of a summary line for one metrics row."""
    parts: list[str] = []
    for key, label in SUMMARY_KEYS:
        if key not in values or values[key] is None:
            continue
        text = f"{label} {_number(values[key])}"
        prefix, suffix = PARTS.get(key, ("", ""))
        terms = [f"{k.removeprefix(prefix).removesuffix(suffix)} {_number(v)}" for k, v in values.items()
                 if prefix and k.startswith(prefix) and k.endswith(suffix) and v is not None]  # fmt: skip
        if terms:
            text += f" ({', '.join(terms)})"
        parts.append(text)
    return parts


def eta_seconds(step: int, total: int, elapsed: float) -> float | None:
    """Time left at the pace so far; None before the first step or without a total."""
    if step <= 0 or total <= 0 or step >= total:
        return None if step < total else 0.0
    return elapsed / step * (total - step)


# ------------------------------------------------------------------------------------------------
# the progress of one stage
# ------------------------------------------------------------------------------------------------


def _bar_enabled() -> bool:
    # tqdm's own TQDM_DISABLE applies only to arguments left at their default; we decide explicitly.
    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        return False
    return sys.stderr.isatty()


class StageProgress:
    """One stage's progress: a bar on the console (main process, a terminal, TQDM_DISABLE unset), a
    summary line per logged row (also without a terminal, so CI logs show progress too), and
    `progress.json` in `out_dir`. `phase` names what is counted ("train", "sampling", …)."""

    def __init__(self, out_dir: Path, name: str, total: int, *, unit: str = "step", phase: str = "train",
                 main_process: bool | None = None) -> None:  # fmt: skip
        self.out_dir, self.name, self.total, self.unit, self.phase = out_dir, name, max(0, int(total)), unit, phase
        # Under a multi-process launcher only rank 0 draws and writes (default: judged from RANK).
        self.main = os.environ.get("RANK", "0") == "0" if main_process is None else main_process
        self.step = 0
        self.started = time.time()
        self._written = 0.0
        self.bar: Any = None
        if self.main and _bar_enabled():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=f"{name} ({phase})", unit=unit, leave=False, dynamic_ncols=True,
                            file=sys.stderr)  # fmt: skip
        self._write(force=True)

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, step: int) -> None:
        """Set the count done so far (not an increment)."""
        step = int(step)
        if self.bar is not None and step > self.step:
            self.bar.update(step - self.step)
        self.step = step
        self._write(force=step >= self.total)

    def advance(self, count: int = 1) -> None:
        self.update(self.step + count)

    def eta(self) -> float | None:
        return eta_seconds(self.step, self.total, time.time() - self.started)

    def summary(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """One console line for a metrics row (`step` defaults to the current count); the whole row
        goes to log.txt."""
        if not self.main:
            return
        step = self.step if step is None else int(step)
        detail.info("%s %s %d: %s", self.name, self.unit, step, dict(values))
        fields = summary_fields(values)
        if not fields:
            return
        eta = eta_seconds(step, self.total, time.time() - self.started)
        tail = f" · eta {format_duration(eta)}" if eta else ""
        logger.info("  %s %s %d/%d · %s%s", self.name, self.unit, step, self.total, " · ".join(fields), tail)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _write(self, force: bool = False) -> None:
        now = time.time()
        if not self.main or (not force and now - self._written < PROGRESS_WRITE_INTERVAL_S):
            return
        self._written = now
        # OSError: the folder went away (the stage was published or cleaned up): nothing left to report.
        with contextlib.suppress(OSError):
            write_json_atomic(self.out_dir / PROGRESS, {"stage": self.name, "phase": self.phase, "unit": self.unit,
                                                         "step": self.step, "total": self.total,
                                                         "started": self.started, "updated": now})  # fmt: skip


def read_progress(folder: Path) -> dict[str, Any] | None:
    """A running stage's progress.json with `eta_s` and `age_s` (seconds since its last update) added."""
    import json

    path = folder / PROGRESS
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    elapsed = float(progress["updated"]) - float(progress["started"])
    progress["eta_s"] = eta_seconds(int(progress["step"]), int(progress["total"]), elapsed)
    progress["age_s"] = max(0.0, time.time() - float(progress["updated"]))
    return progress


def describe_progress(progress: Mapping[str, Any]) -> str:
    """`train: step 120 of 225, ETA 0:13 (updated 2s ago)`."""
    text = f"{progress['phase']}: {progress['unit']} {progress['step']} of {progress['total']}"
    if progress.get("eta_s") is not None and progress["step"] < progress["total"]:
        text += f", ETA {format_duration(progress['eta_s'])}"
    return text + f" (updated {format_duration(progress.get('age_s', 0.0))} ago)"
