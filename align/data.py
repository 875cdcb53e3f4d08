"""Datasets: embedded tasks, local files (JSONL/JSON/Parquet/CSV or a `save_to_disk` folder) and hub
names, behind one `load_dataset(spec)`; `probe_columns` reads only the first rows, for validation.

Every row a stage uses is checked here, once, before any trainer sees it (`Needs`: the columns a
stage reads and what each must hold: text, a prompt, chat messages, a gold answer, …). A bad row — a
null or empty field, a wrong type, a malformed JSON line, bytes that are not UTF-8, a prompt over
the stage's token limit — is an error naming the file, the line (or row) and the column, unless the
dataset says `on_bad_rows: skip`: then it is dropped, logged and counted (`RowLedger`). `align
validate` runs the same checks on the first rows.

Also the one preparation of preference pairs (`prepare_preference_pairs`) the pairwise stages share."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from align.paths import resolve_user_path
from align.preempt import Interrupted, signal_name, stop_agreed
from align.recipe.schema import DataSpec

logger = logging.getLogger("align")

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
#: Rows `align validate` reads of a dataset (and a text file's rows its columns are taken from).
PROBE_ROWS = 5
#: Bad rows one error message lists; the count says how many more there are.
SHOWN_PROBLEMS = 5


class DataError(ValueError):
    pass


# ------------------------------------------------------------------------------------------------
# What a stage needs of every row
# ------------------------------------------------------------------------------------------------

#: What a column must hold. `prompt` and `completion` are text or a chat-message list, the same
#: one throughout the column; `answer` is a gold answer (text or a number); `gold` is an answer or
#: null (a reward rule given None abstains: rows mixed in without a gold are fine); `any` is anything.
Kind = Literal["text", "prompt", "completion", "messages", "answer", "gold", "ranking", "label", "number", "any"]

EXPECTED: dict[str, str] = {
    "text": "non-empty text",
    "prompt": "non-empty text or a list of chat messages",
    "completion": "non-empty text or a list of chat messages",
    "messages": "a non-empty list of chat messages ({role, content})",
    "answer": "a gold answer (non-empty text or a number)",
    "gold": "a gold answer (non-empty text or a number) or null",
    "ranking": "a list of at least 2 responses (text or chat messages), best first",
    "label": "true or false",
    "number": "a finite number",
    "any": "any value",
}
#: Kinds whose value is either text or messages: one column must not mix the two.
SHAPED = frozenset({"prompt", "completion"})


@dataclass(frozen=True)
class Layout:
    """One way a dataset can hold what a stage needs: columns it must have, and columns checked
    where the data has them."""

    required: Mapping[str, Kind]
    optional: Mapping[str, Kind] = field(default_factory=dict)

    def fits(self, columns: Iterable[str]) -> bool:
        return set(self.required) <= set(columns)

    def columns(self) -> list[str]:
        return [*self.required, *(c for c in self.optional if c not in self.required)]

    def __str__(self) -> str:
        return "+".join(self.required)


@dataclass(frozen=True)
class TokenLimit:
    """`column` may hold at most `limit` tokens, as `count` measures it; `key` is the stage key that
    sets the limit (named in the error)."""

    column: str
    limit: int
    key: str
    count: Callable[[Any], int]


@dataclass(frozen=True)
class Needs:
    """What a stage needs of every row it uses: the first of `layouts` whose required columns the
    data has (a single layout is used in any case: rows that lack a column are bad rows), and
    optionally a token limit on one column."""

    layouts: tuple[Layout, ...]
    limit: TokenLimit | None = None

    @classmethod
    def of(cls, **required: Kind) -> Needs:
        return cls((Layout(required),))

    def plus(self, required: Mapping[str, Kind]) -> Needs:
        """Every layout also needs `required` (e.g. the columns the reward rules read)."""
        layouts = tuple(Layout({**layout.required, **{c: k for c, k in required.items() if c not in layout.required}},
                               layout.optional) for layout in self.layouts)  # fmt: skip
        return Needs(layouts, self.limit)

    def limited(self, limit: TokenLimit | None) -> Needs:
        return Needs(self.layouts, limit)

    def layout_for(self, columns: Iterable[str], source: str) -> Layout:
        columns = set(columns)
        for layout in self.layouts:
            if layout.fits(columns):
                return layout
        if len(self.layouts) == 1:
            return self.layouts[0]
        wanted = " or ".join(str(layout) for layout in self.layouts)
        raise DataError(f"{source} needs columns {wanted}; it has: {', '.join(sorted(columns)) or 'nothing'}")


#: The SFT layouts, in the order they are tried (align.training.SFT_LAYOUTS is read from these).
SFT_NEEDS = Needs((Layout({"messages": "messages"}), Layout({"prompt": "prompt", "completion": "completion"}),
                   Layout({"text": "text"})))  # fmt: skip
#: What the sampling stages read from every row: the prompt to generate from.
PROMPT_NEEDS = Needs.of(prompt="prompt")


def preference_needs(ranking_column: str = "ranking") -> Needs:
    """Pairs (chosen + rejected, an optional prompt and margin) or rankings (prompt + a best-first list)."""
    return Needs((Layout({"chosen": "completion", "rejected": "completion"}, {"prompt": "prompt", "margin": "number"}),
                  Layout({"prompt": "prompt", ranking_column: "ranking"}, {"margin": "number"})))  # fmt: skip


def column_kinds(columns: Iterable[str]) -> dict[str, Kind]:
    """Kinds of the dataset columns reward rules read: a gold `solution` is text, a number or null (the
    rule abstains on a row without a gold); any other column is the rule's own business."""
    return {column: "gold" if column == "solution" else "any" for column in columns}


@dataclass
class RowLedger:
    """Bad rows a stage's datasets dropped under `on_bad_rows: skip`, by dataset key: the stage puts
    `metrics()` into its own metrics."""

    skipped: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, count: int) -> None:
        self.skipped[key] = self.skipped.get(key, 0) + count

    def metrics(self) -> dict[str, int]:
        return {f"{key}_skipped_rows": count for key, count in self.skipped.items()}


# ------------------------------------------------------------------------------------------------
# Judging a row
# ------------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, int | float):
        return f"a number ({value!r:.20})"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _messages_problem(value: Any) -> str | None:
    if not isinstance(value, list | tuple):
        return f"is {_describe(value)}"
    if not value:
        return "is an empty list"
    spoken = False
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            return f"has a message {j} that is {_describe(message)}, not a {{role, content}} mapping"
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            return f"has a message {j} without a role"
        if content is None and not message.get("tool_calls"):
            return f"has a message {j} ({role}) without content"
        if content is not None and not isinstance(content, str | list):
            return f"has a message {j} ({role}) whose content is {_describe(content)}"
        spoken = spoken or bool(message.get("tool_calls")) or bool(str(content or "").strip())
    return None if spoken else "holds only empty messages"


def _number(value: Any, textual: bool) -> float | None:
    if textual and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _value_problem(value: Any, kind: Kind, textual: bool = False) -> str | None:
    """Why `value` is not what `kind` asks for (None when it is). `textual`: the value was read from
    CSV text, so numbers and booleans arrive spelled out."""
    if kind == "any" or (value is None and kind == "gold"):
        return None
    if value is None:
        return "is missing or null"
    if kind == "label":
        if textual and isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return None
        return None if isinstance(value, bool) else f"is {_describe(value)}"
    if kind == "number" or (kind in ("answer", "gold") and not isinstance(value, str)):
        number = _number(value, textual)
        if number is None:
            return f"is {_describe(value)}"
        return None if math.isfinite(number) else f"is {number}"
    if kind == "messages" or (kind in SHAPED and isinstance(value, list | tuple)):
        return _messages_problem(value)
    if kind == "ranking":
        if not isinstance(value, list | tuple) or len(value) < 2:
            return f"is {_describe(value) if not isinstance(value, list | tuple) else f'a list of {len(value)}'}"
        for j, response in enumerate(value):
            problem = _value_problem(response, "completion")
            if problem is not None:
                return f"has a response {j} that {problem}"
        return None
    if not isinstance(value, str):
        return f"is {_describe(value)}"
    return None if value.strip() else "is empty"


def _shape(value: Any) -> str:
    return "chat messages" if isinstance(value, list | tuple) else "text"


@dataclass
class _Record:
    """One record of a dataset as read: where it is, the row (None when the record itself is broken:
    not JSON, not UTF-8, …, then `problem` says why), and what to copy it back out as."""

    line: int | None  # 1-based line of a JSONL/CSV file
    index: int  # 0-based row index of a JSON list or a table
    row: dict[str, Any] | None
    problem: str | None = None
    raw: Any = None
    textual: bool = False  # values read from CSV text


def _where(source: str, record: _Record) -> str:
    return f"{source}:{record.line}" if record.line is not None else f"{source}, row {record.index}"


class _Judge:
    """Checks rows against one layout (and the token limit), remembering the shape (text or chat
    messages) each prompt-like column took first."""

    def __init__(self, layout: Layout, limit: TokenLimit | None, source: str) -> None:
        self.layout = layout
        self.limit = limit
        self.source = source
        self.shapes: dict[str, tuple[str, str]] = {}

    def problem(self, record: _Record) -> str | None:
        row = record.row or {}
        for column, kind in self.layout.required.items():
            if (problem := _value_problem(row.get(column), kind, record.textual)) is not None:
                return f"column '{column}' {problem}; expected {EXPECTED[kind]}"
        for column, kind in self.layout.optional.items():
            if row.get(column) is not None and (problem := _value_problem(row[column], kind, record.textual)):
                return f"column '{column}' {problem}; expected {EXPECTED[kind]} (or null)"
        shaped = {c: _shape(row[c]) for c, k in {**self.layout.optional, **self.layout.required}.items()
                  if k in SHAPED and row.get(c) is not None}  # fmt: skip
        for column, shape in shaped.items():
            first = self.shapes.get(column)
            if first is not None and first[0] != shape:
                return (f"column '{column}' holds {shape} here but {first[0]} at {first[1]}; one column holds "
                        "text or chat messages, not both")
        if self.limit is not None and row.get(self.limit.column) is not None:
            try:
                tokens = self.limit.count(row[self.limit.column])
            except Exception as error:  # a chat template that cannot render this prompt
                return f"column '{self.limit.column}' cannot be tokenised ({type(error).__name__}: {error})"
            if tokens > self.limit.limit:
                return (f"column '{self.limit.column}' is {tokens} tokens long, more than {self.limit.key} "
                        f"({self.limit.limit})")
        for column, shape in shaped.items():
            self.shapes.setdefault(column, (shape, _where(self.source, record)))
        return None


@dataclass
class _Scan:
    """What reading a dataset's records found."""

    kept: list[int] = field(default_factory=list)  # record numbers of the rows the stage gets
    seen: int = 0  # records judged
    bad: int = 0
    problems: list[str] = field(default_factory=list)  # the first SHOWN_PROBLEMS, located
    tail_bad: bool = False  # a broken record past the rows the stage uses (it would break the file's loader)
    columns: set[str] = field(default_factory=set)

    def reject(self, message: str) -> None:
        self.bad += 1
        if len(self.problems) < SHOWN_PROBLEMS:
            self.problems.append(message)


def _scan(records: Iterable[_Record], need: Needs | None, source: str, *, wanted: int | None,
          renames: Mapping[str, str] | None = None, tail: bool = False) -> _Scan:  # fmt: skip
    """Judge records until `wanted` rows are good (all of them when None). With `tail`, the records
    after those are still read for breakage alone (a text file's loader reads the whole file). The
    layout is picked from the columns of the first PROBE_ROWS readable rows, as `align validate`
    sees them."""
    scan = _Scan()
    stream = iter(records)
    head: list[_Record] = []
    for record in stream:
        if renames and record.row is not None:
            record.row = {renames.get(k, k): v for k, v in record.row.items()}
        head.append(record)
        if record.row is not None:
            scan.columns |= set(record.row)
            if sum(r.row is not None for r in head) >= PROBE_ROWS:
                break
    judge = _Judge(need.layout_for(scan.columns, source), need.limit, source) if need is not None else None
    for number, record in enumerate(itertools.chain(head, stream)):
        if number >= len(head) and renames and record.row is not None:
            record.row = {renames.get(k, k): v for k, v in record.row.items()}
        if wanted is not None and len(scan.kept) >= wanted:
            if not tail:
                break
            scan.tail_bad = scan.tail_bad or record.problem is not None
            continue
        scan.seen += 1
        problem = record.problem or (judge.problem(record) if judge is not None else None)
        if problem is None:
            scan.kept.append(number)
        else:
            scan.reject(f"{_where(source, record)}: {problem}")
    return scan


def _settle(scan: _Scan, spec: DataSpec, source: str, ledger: RowLedger | None, key: str) -> None:
    """Raise for bad rows (on_bad_rows: error) or an empty result; log and count skipped ones."""
    if scan.seen == 0:
        raise DataError(f"{source} has no rows")
    more = f"\n  … and {scan.bad - len(scan.problems)} more" if scan.bad > len(scan.problems) else ""
    listed = "\n  ".join(scan.problems) + more
    if scan.bad and spec.on_bad_rows == "error":
        raise DataError(f"{source}: {scan.bad} bad row{'s' if scan.bad != 1 else ''} among the {scan.seen} the stage "
                        f"reads:\n  {listed}\nFix them, or set `on_bad_rows: skip` on this dataset to drop bad rows "
                        "(their count goes into the stage's metrics)")
    if not scan.kept:
        raise DataError(f"{source}: every one of the {scan.seen} rows read is bad (on_bad_rows: skip left none):\n  "
                        f"{listed}")
    if spec.on_bad_rows == "skip":
        if scan.bad:
            logger.warning("%s: skipped %d bad row(s) of %d (on_bad_rows: skip):\n  %s", source, scan.bad, scan.seen,
                           listed)  # fmt: skip
        if ledger is not None:
            ledger.add(key, scan.bad)


# ------------------------------------------------------------------------------------------------
# Reading records
# ------------------------------------------------------------------------------------------------


def _not_utf8(raw: bytes, error: UnicodeDecodeError) -> str:
    return f"holds bytes that are not UTF-8 ({raw[error.start:error.start + 4]!r} at byte {error.start} of the line)"


def _encoding(line_no: int) -> str:
    # A byte-order mark may open a UTF-8 file (the loaders accept one); it is not part of the first row.
    return "utf-8-sig" if line_no == 1 else "utf-8"


def _not_json_number(name: str) -> Any:
    # Python's json reads NaN and Infinity; JSON (and the JSONL loader, pyarrow) does not.
    raise ValueError(f"{name} is not a JSON number")


def _jsonl_records(path: Path) -> Iterator[_Record]:
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            index = line_no - 1
            try:
                row = json.loads(raw.decode(_encoding(line_no)), parse_constant=_not_json_number)
            except UnicodeDecodeError as error:
                yield _Record(line_no, index, None, _not_utf8(raw, error), raw)
                continue
            except json.JSONDecodeError as error:
                yield _Record(line_no, index, None, f"is not valid JSON ({error.msg} at column {error.colno})", raw)
                continue
            except ValueError as error:
                yield _Record(line_no, index, None, f"is not valid JSON ({error})", raw)
                continue
            if not isinstance(row, dict):
                yield _Record(line_no, index, None, f"is {_describe(row)}, but each JSONL line must be an object", raw)
                continue
            yield _Record(line_no, index, row, None, raw)


def _json_records(path: Path) -> Iterator[_Record]:
    data = path.read_bytes()
    try:
        rows = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"cannot read {path}:{line}: bytes that are not UTF-8 ({data[error.start:error.start + 4]!r})") from None
    except json.JSONDecodeError as error:
        raise DataError(f"cannot read {path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})") from None
    if isinstance(rows, dict):  # the JSON loader reads one mapping as one row
        yield _Record(None, 0, rows, None, rows)
        return
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a list of objects, got {_describe(rows)}")
    for index, row in enumerate(rows):
        if isinstance(row, dict):
            yield _Record(None, index, row, None, row)
        else:
            yield _Record(None, index, None, f"is {_describe(row)}, not an object", row)


def _csv_records(path: Path) -> Iterator[_Record]:
    """CSV rows as the `csv` module reads them (values are text; an empty cell is null), each at the
    line it starts on. A line that is not UTF-8 is a broken record of its own."""
    broken: list[_Record] = []
    fed: list[int] = []  # line numbers handed to the csv reader, in order

    def lines() -> Iterator[str]:
        with path.open("rb") as fh:
            for line_no, raw in enumerate(fh, 1):
                try:
                    text = raw.decode(_encoding(line_no))
                except UnicodeDecodeError as error:
                    broken.append(_Record(line_no, line_no - 1, None, _not_utf8(raw, error)))
                    continue
                fed.append(line_no)
                yield text

    reader = csv.reader(lines())
    header: list[str] | None = None
    while True:
        start = len(fed)
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            raise DataError(f"cannot read {path}:{fed[-1] if fed else 1}: {error}") from None
        yield from broken
        broken.clear()
        if not fields:
            continue  # a blank line; the CSV loader skips it too
        line = fed[start] if start < len(fed) else (fed[-1] if fed else 1)
        if header is None:
            header = fields
            continue
        if len(fields) > len(header):
            yield _Record(line, line - 1, None, f"has {len(fields)} fields but the header names {len(header)} columns")
            continue
        row = {name: (value if value != "" else None) for name, value in itertools.zip_longest(header, fields)}
        yield _Record(line, line - 1, row, None, fields, textual=True)
    yield from broken


def _text_records(path: Path) -> Iterator[_Record]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_records(path)
    if suffix == ".json":
        return _json_records(path)
    return _csv_records(path)


def _copy_records(path: Path, keep: set[int], out_dir: Path) -> Path:
    """A copy of a text dataset file that holds only the records numbered `keep` (its loader then
    reads only what the stage uses)."""
    suffix = path.suffix.lower()
    copy = out_dir / (path.stem + (".csv" if suffix == ".csv" else ".jsonl"))
    records = (r for n, r in enumerate(_text_records(path)) if n in keep)
    if suffix == ".csv":
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as fh:
            header = next(csv.reader(fh), [])
        with copy.open("w", encoding="utf-8", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(header)
            writer.writerows(r.raw for r in records)
    else:
        with copy.open("wb") as out:
            for record in records:
                out.write(record.raw if isinstance(record.raw, bytes) else json.dumps(record.raw).encode() + b"\n")
    return copy


def _table_records(dataset: Any, columns: list[str]) -> Iterator[_Record]:
    """Rows of a loaded `datasets.Dataset`, only `columns` of them (all when empty)."""
    table = dataset.select_columns([c for c in columns if c in dataset.column_names]) if columns else dataset
    index = 0
    for batch in table.iter(batch_size=1000):
        names = list(batch)
        for values in zip(*(batch[n] for n in names), strict=True):
            yield _Record(None, index, dict(zip(names, values, strict=True)))
            index += 1


# ------------------------------------------------------------------------------------------------
# Finding and loading
# ------------------------------------------------------------------------------------------------


def _is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix.lower() in FILE_BUILDERS or Path(path).exists()


def _local_path(spec: DataSpec, base_dir: Path) -> Path:
    path = resolve_user_path(spec.path, base_dir)
    if not path.exists():
        raise DataError(f"dataset file not found: {spec.path}")
    if path.is_file() and path.suffix.lower() not in FILE_BUILDERS:
        raise DataError(f"unsupported dataset file type '{path.suffix}'; expected one of {', '.join(FILE_BUILDERS)}")
    return path


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


@dataclass
class _Probe:
    source: str
    columns: set[str]
    records: list[_Record]


def _probe(spec: DataSpec, base_dir: Path) -> _Probe | None:
    """The first rows of a dataset and its columns, cheaply; None for hub datasets (unknown before
    download). Raises DataError for what no row can mend (a missing or unreadable file)."""
    make = _embedded_maker(spec.path)
    if make is not None:
        try:
            dataset = make(spec.path, spec.split, 2, seed=0, **spec.params)
        except (TypeError, ValueError) as err:
            raise DataError(f"embedded task '{spec.path}': {err}") from None
        return _Probe(f"embedded dataset '{spec.path}'", set(dataset.column_names), list(_table_records(dataset, [])))
    if not _is_local(spec.path):
        return None
    path = _local_path(spec, base_dir)
    if path.is_dir():
        dataset = _load_dir(path, spec.split)
        first = dataset.select(range(min(PROBE_ROWS, len(dataset))))
        return _Probe(str(path), set(dataset.column_names), list(_table_records(first, [])))
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
            batch = next(parquet.iter_batches(batch_size=PROBE_ROWS), None)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path} is not a readable Parquet file ({err})") from None
        rows = batch.to_pylist() if batch is not None else []
        return _Probe(str(path), set(parquet.schema_arrow.names), [_Record(None, i, r) for i, r in enumerate(rows)])
    try:
        records = list(itertools.islice(_text_records(path), PROBE_ROWS))
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from None
    if not records:
        raise DataError(f"dataset file is empty: {path}")
    columns = set().union(*(r.row for r in records if r.row is not None))
    if not columns:  # not one readable row among the first: the file is not what its name says
        raise DataError(f"cannot read {path}: {_where(str(path), records[0])}: {records[0].problem}")
    return _Probe(str(path), columns, records)


def probe_columns(spec: DataSpec, base_dir: Path) -> set[str] | None:
    """Column names of the dataset, from its first rows; None for hub datasets (unknown before download)."""
    probe = _probe(spec, base_dir)
    return probe.columns if probe is not None else None


def first_row_problems(spec: DataSpec, base_dir: Path, need: Needs | None = None) -> list[str] | None:
    """The bad rows among the first PROBE_ROWS of a dataset (located, as `load_dataset` would name
    them), judged by `need` (None: only records that are broken in themselves); None when the rows
    cannot be read before running (hub datasets)."""
    probe = _probe(spec, base_dir)
    if probe is None:
        return None
    columns = {spec.columns.get(c, c) for c in probe.columns}
    if need is not None and not any(layout.fits(columns) for layout in need.layouts):
        return []  # columns missing altogether: the stage's own column check names them
    return _scan(probe.records, need, probe.source, wanted=None, renames=spec.columns).problems


def _load_dir(path: Path, split: str) -> Any:
    """A `save_to_disk` folder: one dataset, or the `split` of a DatasetDict."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path} is a folder but not a `save_to_disk` dataset") from None
    except Exception as err:
        # datasets cannot read back a split it saved with no rows: that split's state lists no data files.
        empty = [state.parent for state in sorted(path.glob("**/state.json")) if _no_data_files(state)]
        if empty:
            raise DataError(f"{empty[0]} has no rows (and datasets cannot load a save_to_disk folder with an "
                            "empty split)") from err
        raise DataError(f"cannot load the save_to_disk folder {path}: {type(err).__name__}: {err}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path} has no split '{split}'; it has: {', '.join(loaded)}")
        return loaded[split]
    return loaded


def _no_data_files(state: Path) -> bool:
    try:
        return not json.loads(state.read_text(encoding="utf-8")).get("_data_files", [None])
    except (OSError, ValueError, AttributeError):
        return False


def _build(builder: str, path: Path, source: str, **kwargs: Any) -> Any:
    """`datasets.load_dataset` of one local file; its errors (pyarrow's, pandas') name the file."""
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as err:
        cause = err.__cause__ or err.__context__ or err
        if "corresponds to no data" in str(err):
            raise DataError(f"{source} has no rows") from err
        raise DataError(f"cannot load {source} as {builder}: {type(cause).__name__}: {cause}") from err


def _renamed(dataset: Any, spec: DataSpec) -> Any:
    if spec.columns:
        missing = [c for c in spec.columns if c not in dataset.column_names]
        if missing:
            raise DataError(f"cannot rename missing column(s) {missing} of {spec.path}")
        dataset = dataset.rename_columns(spec.columns)
    return dataset


def _first(dataset: Any, count: int | None) -> Any:
    return dataset.select(range(count)) if count is not None and len(dataset) > count else dataset


def _load_text_file(path: Path, spec: DataSpec, need: Needs | None, ledger: RowLedger | None, key: str) -> Any:
    """A JSONL/JSON/CSV file, read record by record before its loader sees it: a broken line would
    otherwise fail inside pyarrow or pandas, naming neither file nor line."""
    source = str(path)
    scan = _scan(_text_records(path), need, source, wanted=spec.num_examples, renames=spec.columns, tail=True)
    _settle(scan, spec, source, ledger, key)
    builder = FILE_BUILDERS[path.suffix.lower()]
    if scan.bad == 0 and not scan.tail_bad:
        return _first(_renamed(_build(builder, path, source), spec), spec.num_examples)
    with tempfile.TemporaryDirectory(prefix="align-rows-") as tmp:
        copy = _copy_records(path, set(scan.kept), Path(tmp))
        # In memory, cached inside the temporary folder: nothing refers to the copy once it is gone.
        dataset = _build(FILE_BUILDERS[copy.suffix], copy, source, cache_dir=str(Path(tmp) / "cache"), keep_in_memory=True)
    return _renamed(dataset, spec)


def load_dataset(spec: DataSpec, base_dir: Path, seed: int = 0, *, need: Needs | None = None,
                 ledger: RowLedger | None = None, key: str = "dataset") -> Any:  # fmt: skip
    """Load the dataset a spec names as a `datasets.Dataset` (columns renamed, first N rows kept).

    With `need`, every row kept is checked against it first (see the module docstring): bad rows
    raise a DataError naming the file, line or row and column, or, with the spec's `on_bad_rows:
    skip`, are dropped (the first N *good* rows are kept) and counted in `ledger` under `key` (the
    stage's key of this dataset). A text file's broken records (not JSON, not UTF-8) are found with
    or without `need`."""
    import datasets

    make = _embedded_maker(spec.path)
    if make is not None:
        if spec.num_examples is None:
            raise DataError(f"embedded dataset '{spec.path}' needs num_examples (how many rows to generate)")
        dataset = make(spec.path, spec.split, spec.num_examples, seed=seed, **spec.params)
        source = f"embedded dataset '{spec.path}'"
    elif _is_local(spec.path):
        path = _local_path(spec, base_dir)
        source = str(path)
        if path.is_file() and path.suffix.lower() != ".parquet":
            return _load_text_file(path, spec, need, ledger, key)
        dataset = _load_dir(path, spec.split) if path.is_dir() else _build("parquet", path, source)
    else:
        source = f"hub dataset '{spec.path}'"
        try:
            dataset = datasets.load_dataset(spec.path, spec.name, split=spec.split)
        except Exception as err:
            raise DataError(f"cannot load {source} (name {spec.name!r}, split {spec.split!r}): "
                            f"{type(err).__name__}: {err}") from err
    dataset = _renamed(dataset, spec)
    if need is None:
        if len(dataset) == 0:
            raise DataError(f"{source} has no rows")
        return _first(dataset, spec.num_examples)
    layout = need.layout_for(dataset.column_names, source)
    missing = [c for c in layout.required if c not in dataset.column_names]
    if missing:
        raise DataError(f"{source} has no column {', '.join(map(repr, missing))} (the stage reads it); it has: "
                        f"{', '.join(dataset.column_names) or 'nothing'}")
    scan = _scan(_table_records(dataset, layout.columns()), need, source, wanted=spec.num_examples)
    _settle(scan, spec, source, ledger, key)
    return _first(dataset, spec.num_examples) if scan.bad == 0 else dataset.select(scan.kept)


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


def pending_chunks(dataset: Any, chunk_size: int, chunks_done: int, what: str = "chunk") -> Iterator[tuple[int, int, list[dict[str, Any]]]]:
    """(chunk number, first row, rows) of each chunk of `dataset` after the `chunks_done` a resumed
    stage already committed. Before each, the ranks agree on whether a signal asked to stop (the next
    chunk's gather would hang a rank that stopped alone) and stop together (`Interrupted`)."""
    chunks = range(0, len(dataset), chunk_size)
    for chunk_no, start in enumerate(chunks):
        if chunk_no < chunks_done:
            continue
        if stop_agreed():
            raise Interrupted(f"stopped by {signal_name()} after {what} {chunk_no} of {len(chunks)}")
        yield chunk_no, start, dataset.select(range(start, min(start + chunk_size, len(dataset)))).to_list()
