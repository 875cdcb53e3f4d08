"""Datasets: embedded tasks, local files (JSONL/JSON/Parquet/CSV or a `save_to_disk` folder) and hub
names, behind one `load_dataset(spec)`; `probe_columns` reads only the first rows, for validation.
Also the one preparation of preference pairs (`prepare_preference_pairs`) the pairwise stages share."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from align.paths import resolve_user_path
from align.recipe.schema import DataSpec

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
PROBE_ROWS = 5


class DataError(ValueError):
    pass


def _is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix.lower() in FILE_BUILDERS or Path(path).exists()


def _local_path(spec: DataSpec, base_dir: Path) -> Path:
    path = resolve_user_path(spec.path, base_dir)
    if not path.exists():
        raise DataError(f"dataset file not found: {spec.path}")
    if path.is_file() and path.suffix.lower() not in FILE_BUILDERS:
        raise DataError(f"unsupported dataset file type '{path.suffix}'; expected one of {', '.join(FILE_BUILDERS)}")
    return path


def _first_rows_columns(path: Path) -> set[str]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            columns: set[str] = set()
            with path.open(encoding="utf-8") as fh:
                for line_no, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{line_no}: each JSONL line must be an object")
                    columns |= set(row)
                    if line_no >= PROBE_ROWS:
                        break
            if not columns:
                raise DataError(f"dataset file is empty: {path}")
            return columns
        if suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(rows, dict):  # column-oriented {"col": [...]} or {"data": [...]}
                return set(rows)
            if not rows or not isinstance(rows[0], dict):
                raise DataError(f"{path}: expected a list of objects")
            return set().union(*(set(r) for r in rows[:PROBE_ROWS]))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return set(pq.read_schema(path).names)
        if suffix == ".csv":
            import csv

            with path.open(encoding="utf-8", newline="") as fh:
                return set(next(csv.reader(fh), []))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    raise DataError(f"unsupported dataset file type '{suffix}'")


def _embedded_maker(path: str) -> Callable[..., Any] | None:
    """The generator of an embedded dataset name (a task, or preferences over one), else None."""
    from align.embedded import preferences, tasks

    if tasks.is_embedded_task(path):
        return tasks.make_task_dataset
    if preferences.is_preference_task(path):
        return preferences.make_preference_dataset
    return None


def spec_problems(spec: DataSpec, base_dir: Path | None) -> list[tuple[tuple[str, ...], str]]:
    """What is wrong with a dataset spec itself, as (key path inside the spec, message): an embedded
    task has no natural size, and a single local file has only one split. `base_dir` None: the
    file system is not consulted."""
    problems: list[tuple[tuple[str, ...], str]] = []
    if _embedded_maker(spec.path) is not None:
        if spec.num_examples is None:
            problems.append((("num_examples",), f"embedded dataset '{spec.path}' is generated: say how many rows "
                             "with num_examples"))
    elif "split" in spec.model_fields_set and spec.split != "train" and base_dir is not None and _is_local(spec.path):
        path = resolve_user_path(spec.path, base_dir)
        if path.is_file():
            problems.append((("split",), f"'{spec.path}' is one file, so it has one split; point `path` at the "
                             f"file that holds the '{spec.split}' rows (split selects a split of hub datasets and "
                             "of save_to_disk folders with several splits)"))
    return problems


def probe_columns(spec: DataSpec, base_dir: Path) -> set[str] | None:
    """Column names of the dataset, or None for hub datasets (unknown before download)."""
    make = _embedded_maker(spec.path)
    if make is not None:
        try:
            return set(make(spec.path, spec.split, 2, seed=0, **spec.params).column_names)
        except (TypeError, ValueError) as err:
            raise DataError(f"embedded task '{spec.path}': {err}") from None
    if not _is_local(spec.path):
        return None
    path = _local_path(spec, base_dir)
    if path.is_dir():
        return set(_load_dir(path, spec.split).column_names)
    return _first_rows_columns(path)


def _load_dir(path: Path, split: str) -> Any:
    """A `save_to_disk` folder: one dataset, or the `split` of a DatasetDict."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path} is a folder but not a `save_to_disk` dataset") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path} has no split '{split}'; it has: {', '.join(loaded)}")
        return loaded[split]
    return loaded


def load_dataset(spec: DataSpec, base_dir: Path, seed: int = 0) -> Any:
    """Load the dataset a spec names as a `datasets.Dataset` (columns renamed, first N rows kept)."""
    import datasets

    make = _embedded_maker(spec.path)
    if make is not None:
        if spec.num_examples is None:
            raise DataError(f"embedded dataset '{spec.path}' needs num_examples (how many rows to generate)")
        dataset = make(spec.path, spec.split, spec.num_examples, seed=seed, **spec.params)
    elif _is_local(spec.path):
        path = _local_path(spec, base_dir)
        if path.is_dir():
            dataset = _load_dir(path, spec.split)
        else:
            builder = FILE_BUILDERS[path.suffix.lower()]
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    else:
        dataset = datasets.load_dataset(spec.path, spec.name, split=spec.split)
    if spec.columns:
        missing = [c for c in spec.columns if c not in dataset.column_names]
        if missing:
            raise DataError(f"cannot rename missing column(s) {missing} of {spec.path}")
        dataset = dataset.rename_columns(spec.columns)
    if spec.num_examples is not None and len(dataset) > spec.num_examples:
        dataset = dataset.select(range(spec.num_examples))
    return dataset


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def message_text(value: Any) -> str:
    """Plain text of a completion that is either a string or a chat-message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(m.get("content", "") for m in value if isinstance(m, dict))
    return str(value)


def with_system_prompt(prompt: Any, system_prompt: str | None) -> Any:
    """Prepend a system message to a conversational prompt that has none."""
    if system_prompt is None or isinstance(prompt, str):
        return prompt
    if prompt and prompt[0].get("role") == "system":
        return prompt
    return [{"role": "system", "content": system_prompt}, *prompt]


def chat_prompt(prompt: Any, system_prompt: str | None = None, conversational: bool = True) -> Any:
    """A dataset prompt as the model should see it: plain strings become a user message when
    `conversational` (so the chat template applies), and the system prompt is prepended if missing."""
    if isinstance(prompt, str) and conversational:
        prompt = [{"role": "user", "content": prompt}]
    return with_system_prompt(prompt, system_prompt)


# ------------------------------------------------------------------------------------------------
# Preference pairs: the one preparation the reward_model and dpo stages share
# ------------------------------------------------------------------------------------------------

#: How pairs expanded from a ranking are weighted (see `expand_rankings`).
PairWeighting = Literal["per_prompt", "per_pair"]


def preference_layout(columns: Any, ranking_column: str = "ranking") -> str | None:
    """`pairs` (chosen + rejected), `rankings` (prompt + a best-first list column), or None."""
    columns = set(columns)
    if {"chosen", "rejected"} <= columns:
        return "pairs"
    if {"prompt", ranking_column} <= columns:
        return "rankings"
    return None


def preference_layout_problem(columns: Any, path: str, ranking_column: str = "ranking") -> str | None:
    """Why a dataset cannot be read as preference data (None when it can), for validation."""
    if preference_layout(columns, ranking_column) is not None:
        return None
    return (f"dataset '{path}' needs columns chosen+rejected (pairs) or prompt+{ranking_column} (rankings, best "
            f"first); it has: {', '.join(sorted(columns)) or 'nothing'}")


def expand_rankings(
    rows: dict[str, list[Any]], ranking_column: str = "ranking", weighting: PairWeighting | None = "per_prompt"
) -> dict[str, list[Any]]:
    """Rankings (k responses per prompt, best first) → every pair (better, worse), C(k, 2) per prompt.

    Returns columns `prompt`, `chosen`, `rejected` (plus `margin` copied per prompt if the input has
    one) and, unless `weighting` is None, `weight`: with `per_prompt` a prompt's pairs share weight
    1/C(k, 2), then all weights are scaled so their mean is 1; `per_pair` gives every pair weight 1.
    Rows with fewer than two responses give no pair.
    """
    out: dict[str, list[Any]] = {"prompt": [], "chosen": [], "rejected": [], "weight": []}
    has_margin = "margin" in rows
    if has_margin:
        out["margin"] = []
    for index, (prompt, ranking) in enumerate(zip(rows["prompt"], rows[ranking_column], strict=True)):
        k = len(ranking)
        if k < 2:
            continue
        weight = 1.0 / math.comb(k, 2) if weighting == "per_prompt" else 1.0
        for better in range(k):
            for worse in range(better + 1, k):
                out["prompt"].append(prompt)
                out["chosen"].append(ranking[better])
                out["rejected"].append(ranking[worse])
                out["weight"].append(weight)
                if has_margin:
                    out["margin"].append(rows["margin"][index])
    if weighting is None:
        del out["weight"]
    elif out["weight"]:
        mean = sum(out["weight"]) / len(out["weight"])
        out["weight"] = [w / mean for w in out["weight"]]
    return out


def prepare_preference_pairs(
    dataset: Any,
    *,
    ranking_column: str = "ranking",
    weighting: PairWeighting | None = "per_prompt",
    keep: tuple[str, ...] = (),
    system_prompt: str | None = None,
) -> Any:
    """Preference data as TRL's pairwise trainers read it: `prompt` (when explicit), `chosen`,
    `rejected`, plus the optional columns in `keep` (e.g. `margin`) the data has.

    Rankings are expanded into all their pairs (`expand_rankings`; a `weight` column unless
    `weighting` is None). A text `prompt` next to conversational `chosen`/`rejected` is dropped: such
    conversations (UltraFeedback-style) already hold the prompt, and TRL takes it from their shared
    start. `system_prompt` is added to conversational prompts that have none.
    """
    from datasets import Dataset

    if preference_layout(dataset.column_names, ranking_column) == "rankings":
        columns = [c for c in ("prompt", ranking_column, *keep) if c in dataset.column_names]
        expanded = expand_rankings(dataset.select_columns(columns).to_dict(), ranking_column, weighting)
        dataset = Dataset.from_dict({k: v for k, v in expanded.items() if k in ("prompt", "chosen", "rejected",
                                                                                 "weight", *keep)})
    else:
        columns = [c for c in ("prompt", "chosen", "rejected", *keep) if c in dataset.column_names]
        if "prompt" in columns and isinstance(dataset[0]["prompt"], str) and isinstance(dataset[0]["chosen"], list):
            columns.remove("prompt")
        dataset = dataset.select_columns(columns)
    if system_prompt:
        targets = ["prompt"] if "prompt" in dataset.column_names else ["chosen", "rejected"]
        if isinstance(dataset[0][targets[0]], list):
            dataset = dataset.map(lambda row: {c: with_system_prompt(row[c], system_prompt) for c in targets})
    return dataset
