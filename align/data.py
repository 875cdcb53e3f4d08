"""Datasets: embedded tasks, local files (JSONL/JSON/Parquet/CSV or a `save_to_disk` folder) and hub
names, behind one `load_dataset(spec)`; `probe_columns` reads only the first rows, for validation."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    from align.embedded import corpus, preferences, tasks

    if tasks.is_embedded_task(path):
        return tasks.make_task_dataset
    if preferences.is_preference_task(path):
        return preferences.make_preference_dataset
    if corpus.is_corpus_task(path):
        return corpus.make_corpus_dataset
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
