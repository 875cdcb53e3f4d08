"""Bad rows: every row a stage uses is checked once, in `load_dataset`, against what the stage needs
(`Needs`), and `align validate` runs the same check on the first rows. Each case shows what the user
sees: the file, the line (or row) and the column in the error, or a counted skip with
`on_bad_rows: skip`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from align.data import (
    PROMPT_NEEDS,
    SFT_NEEDS,
    DataError,
    Needs,
    RowLedger,
    TokenLimit,
    load_dataset,
    preference_needs,
    probe_columns,
)
from align.recipe.schema import DataSpec
from tests.recipe_problems import recipe_problems
from tests.test_data import RECIPE  # one eval stage reading DATA

NEEDS = Needs.of(prompt="prompt", solution="answer")
GOOD = [{"prompt": f"What is {i}+1?", "solution": str(i + 1)} for i in range(60)]
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def jsonl(tmp_path: Path, rows: list[Any], name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def load(path: Path, need: Needs | None = NEEDS, **spec: Any) -> tuple[Any, dict[str, int]]:
    ledger = RowLedger()
    dataset = load_dataset(DataSpec(path=str(path), **spec), path.parent, need=need, ledger=ledger)
    return dataset, ledger.metrics()


def error_of(path: Path, need: Needs | None = NEEDS, **spec: Any) -> str:
    with pytest.raises(DataError) as info:
        load(path, need, **spec)
    return str(info.value)


# ---------------------------------------------------------------- each bad row: error, and skip


ROW_CASES = [
    # (case, rows written as JSONL lines, where, what the message says)
    ("null prompt in row 0", [{"prompt": None, "solution": "1"}, *GOOD], ":1:",
     "column 'prompt' is missing or null; expected non-empty text or a list of chat messages"),
    ("empty prompt", [*GOOD[:3], {"prompt": "   ", "solution": "1"}], ":4:", "column 'prompt' is empty"),
    ("empty solution", [*GOOD[:3], {"prompt": "q", "solution": ""}], ":4:", "column 'solution' is empty"),
    ("prompt of the wrong type", [*GOOD[:3], {"prompt": 5, "solution": "1"}], ":4:", "column 'prompt' is a number (5)"),
    ("solution of the wrong type", [*GOOD[:3], {"prompt": "q", "solution": [1]}], ":4:", "column 'solution' is a list"),
    ("column missing from row 50 on", [*GOOD[:50], *[{"prompt": "q"}] * 10], ":51:",
     "column 'solution' is missing or null; expected a gold answer"),
    ("a list prompt among text prompts", [*GOOD[:50], {"prompt": MESSAGES, "solution": "1"}], ":51:",
     "column 'prompt' holds chat messages here but text at"),
    ("one malformed JSON line past the first rows", [*GOOD[:50], '{"prompt": "q", solution: 1}', *GOOD[:5]], ":51:",
     "is not valid JSON (Expecting property name enclosed in double quotes at column 17)"),
    ("a JSONL line that is not an object", [*GOOD[:50], "[1, 2]"], ":51:", "is a list, but each JSONL line must be an object"),
    ("NaN, which JSON does not have", [*GOOD[:3], '{"prompt": "q", "solution": "1", "score": NaN}'], ":4:",
     "is not valid JSON (NaN is not a JSON number)"),
    ("a message without content", [*GOOD[:3], {"prompt": [{"role": "user"}], "solution": "1"}], ":4:",
     "column 'prompt' has a message 0 (user) without content"),
]


@pytest.mark.parametrize(("case", "rows", "where", "fragment"), ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_a_bad_row_is_an_error_naming_file_line_and_column(tmp_path: Path, case: str, rows: list[Any], where: str,
                                                            fragment: str) -> None:  # fmt: skip
    path = jsonl(tmp_path, rows)
    message = error_of(path)
    assert f"{path}{where} {fragment}" in message, message
    assert "on_bad_rows: skip" in message  # the way out is named


@pytest.mark.parametrize(("case", "rows", "where", "fragment"), ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_skip_drops_the_bad_rows_and_counts_them(tmp_path: Path, case: str, rows: list[Any], where: str,
                                                 fragment: str, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    path = jsonl(tmp_path, rows)
    bad = 10 if case == "column missing from row 50 on" else 1
    dataset, skipped = load(path, on_bad_rows="skip")
    assert skipped == {"dataset_skipped_rows": bad}
    good_lines = len(rows) - bad
    assert len(dataset) == good_lines
    assert all(isinstance(p, str) and p.strip() for p in dataset["prompt"])
    assert f"skipped {bad} bad row(s)" in caplog.text and fragment in caplog.text


def test_non_utf8_bytes_past_the_first_8_kb(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    good = "".join(json.dumps({"prompt": "x" * 100, "solution": "1"}) + "\n" for _ in range(200))
    assert len(good) > 8192
    path.write_bytes(good.encode() + b'{"prompt": "\xff\xfe", "solution": "1"}\n')
    assert f"{path}:201: holds bytes that are not UTF-8 (b'\\xff\\xfe\",' at byte 12 of the line)" in error_of(path)
    assert load(path, on_bad_rows="skip")[1] == {"dataset_skipped_rows": 1}


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv"])
def test_a_byte_order_mark_is_not_a_bad_row(tmp_path: Path, name: str) -> None:
    body = {"d.jsonl": '{"prompt": "q", "solution": "1"}\n', "d.json": '[{"prompt": "q", "solution": "1"}]',
            "d.csv": "prompt,solution\nq,1\n"}[name]
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert load(tmp_path / name)[0]["prompt"] == ["q"]
    with (tmp_path / name).open("ab") as fh:  # a bad row too: the copy without it keeps the column names
        fh.write(b"\n" if name == "d.json" else b'{"prompt": null}\n' if name == "d.jsonl" else b",2\n")
    if name != "d.json":
        assert load(tmp_path / name, on_bad_rows="skip")[0].column_names == ["prompt", "solution"]


def test_broken_lines_are_found_without_needs_too(tmp_path: Path) -> None:
    """A malformed line would fail inside pyarrow, naming no file: every load reads the lines first."""
    path = jsonl(tmp_path, [*GOOD[:3], "{oops"])
    assert f"{path}:4: is not valid JSON" in error_of(path, need=None)


def test_a_broken_line_past_the_rows_the_stage_uses_is_not_its_problem(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [*GOOD[:50], "{oops", {"prompt": None}])
    dataset, skipped = load(path, num_examples=10)
    assert len(dataset) == 10 and dataset[9]["solution"] == "10" and skipped == {}


def test_skip_keeps_the_first_n_good_rows(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [{"prompt": None, "solution": "0"}, *GOOD])
    dataset, skipped = load(path, num_examples=5, on_bad_rows="skip")
    assert dataset["solution"] == ["1", "2", "3", "4", "5"] and skipped == {"dataset_skipped_rows": 1}


def test_many_bad_rows_are_counted_and_the_first_listed(tmp_path: Path) -> None:
    message = error_of(jsonl(tmp_path, [*GOOD[:2], *[{"prompt": "q", "solution": None}] * 12]))
    assert "12 bad rows among the 14 the stage reads" in message
    assert message.count("column 'solution' is missing or null") == 5 and "… and 7 more" in message


def test_every_row_bad_under_skip_is_still_an_error(tmp_path: Path) -> None:
    message = error_of(jsonl(tmp_path, ["{x", '{"prompt": null, "solution": "1"}']), on_bad_rows="skip")
    assert "every one of the 2 rows read is bad (on_bad_rows: skip left none)" in message


@pytest.mark.parametrize(("name", "content"), [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "prompt,solution\n")])
def test_an_empty_file_has_no_rows(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content)
    for mode in ("error", "skip"):
        assert f"{tmp_path / name} has no rows" in error_of(tmp_path / name, on_bad_rows=mode)


def test_an_empty_split_has_no_rows(tmp_path: Path) -> None:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(GOOD[:2]),
                          "test": datasets.Dataset.from_dict({"prompt": [], "solution": []})}).save_to_disk(str(tmp_path / "saved"))
    # datasets itself cannot read such a folder back; the error says why
    assert f"{tmp_path / 'saved' / 'test'} has no rows" in error_of(tmp_path / "saved", split="test")
    datasets.Dataset.from_dict({"prompt": [], "solution": []}).to_parquet(str(tmp_path / "empty.parquet"))
    assert f"{tmp_path / 'empty.parquet'} has no rows" in error_of(tmp_path / "empty.parquet")


def test_a_parquet_file_that_is_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_text("prompt,solution\nq,1\n")
    assert f"cannot load {path} as parquet: ArrowInvalid: Parquet magic bytes not found" in error_of(path)
    with pytest.raises(DataError, match="is not a readable Parquet file"):
        probe_columns(DataSpec(path=str(path)), tmp_path)


def test_csv_rows_with_too_many_fields_bad_bytes_and_empty_cells(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,solution\nq,1\nq,2,3\n,3\nq,\n\xff,5\nq,6\n")
    message = error_of(path)
    for line, fragment in ((3, "has 3 fields but the header names 2 columns"), (4, "column 'prompt' is missing or null"),
                           (5, "column 'solution' is missing or null"), (6, "holds bytes that are not UTF-8")):
        assert f"{path}:{line}: {fragment}" in message, message
    dataset, skipped = load(path, on_bad_rows="skip")
    assert skipped == {"dataset_skipped_rows": 4} and dataset["prompt"] == ["q", "q"]


def test_json_list_items_are_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD[0], None, {"prompt": None, "solution": "1"}, 5, GOOD[1]]))
    message = error_of(path)
    assert f"{path}, row 1: is null, not an object" in message
    assert f"{path}, row 2: column 'prompt' is missing or null" in message
    assert f"{path}, row 3: is a number (5), not an object" in message
    dataset, skipped = load(path, on_bad_rows="skip")
    assert skipped == {"dataset_skipped_rows": 3} and dataset["solution"] == ["1", "2"]


def test_a_json_file_that_is_not_json_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "q"},\n  {"prompt": }\n]')
    assert f"cannot read {path}:3: not valid JSON" in error_of(path)


def test_tables_are_checked_by_row_index(tmp_path: Path) -> None:
    """Parquet, save_to_disk folders, hub and embedded datasets: rows are named by their index."""
    import datasets

    rows = [*GOOD[:3], {"prompt": "q", "solution": None}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "d.parquet", tmp_path / "saved"):
        assert f"{path}, row 3: column 'solution' is missing or null" in error_of(path)
        assert load(path, on_bad_rows="skip")[1] == {"dataset_skipped_rows": 1}
    no_column = error_of(tmp_path / "saved", need=Needs.of(prompt="prompt", answer="answer"))
    assert "has no column 'answer' (the stage reads it); it has: prompt, solution" in no_column


def test_renamed_columns_are_checked_under_their_new_name(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [{"question": "q", "answer": "1"}, {"question": None, "answer": "2"}])
    message = error_of(path, columns={"question": "prompt", "answer": "solution"})
    assert f"{path}:2: column 'prompt' is missing or null" in message


def test_sft_layouts_rows_and_conversations(tmp_path: Path) -> None:
    rows = [{"messages": MESSAGES}] * 3 + [{"messages": []}, {"messages": [{"content": "x"}]},
                                           {"prompt": "q", "completion": "a"}]  # fmt: skip
    message = error_of(jsonl(tmp_path, rows), SFT_NEEDS)
    assert ":4: column 'messages' is an empty list" in message
    assert ":5: column 'messages' has a message 0 without a role" in message
    assert ":6: column 'messages' is missing or null" in message  # this file's layout is messages
    completion = error_of(jsonl(tmp_path, [{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": ""}], "p.jsonl"),
                          SFT_NEEDS)  # fmt: skip
    assert ":2: column 'completion' is empty" in completion


def test_preference_rows(tmp_path: Path) -> None:
    need = preference_needs()
    pairs = jsonl(tmp_path, [{"chosen": "a", "rejected": "b", "margin": 1.0}, {"chosen": "a", "rejected": None},
                             {"chosen": "a", "rejected": "b", "margin": "big"}])  # fmt: skip
    message = error_of(pairs, need)
    assert ":2: column 'rejected' is missing or null" in message
    assert ":3: column 'margin' is text; expected a finite number (or null)" in message
    ranked = jsonl(tmp_path, [{"prompt": "q", "ranking": ["a", "b"]}, {"prompt": "q", "ranking": ["a"]},
                              {"prompt": "q", "ranking": ["a", ""]}], "r.jsonl")  # fmt: skip
    message = error_of(ranked, need)
    assert ":2: column 'ranking' is a list of 1" in message and "at least 2 responses" in message
    assert ":3: column 'ranking' has a response 1 that is empty" in message


def test_a_label_must_be_true_or_false(tmp_path: Path) -> None:
    need = Needs.of(prompt="prompt", completion="completion", label="label")
    message = error_of(jsonl(tmp_path, [{"prompt": "q", "completion": "a", "label": True},
                                        {"prompt": "q", "completion": "a", "label": "yes"}]), need)  # fmt: skip
    assert ":2: column 'label' is text; expected true or false" in message
    (tmp_path / "l.csv").write_text("prompt,completion,label\nq,a,True\nq,a,false\n")
    assert load(tmp_path / "l.csv", need)[0]["label"] == [True, False]  # CSV spells booleans out


def test_prompts_over_the_token_limit(tmp_path: Path) -> None:
    limit = TokenLimit("prompt", 3, "max_prompt_length", lambda prompt: len(prompt.split()))
    path = jsonl(tmp_path, [{"prompt": "one two"}, {"prompt": "one two three four five"}, {"prompt": "a b c"}])
    message = error_of(path, PROMPT_NEEDS.limited(limit))
    assert f"{path}:2: column 'prompt' is 5 tokens long, more than max_prompt_length (3)" in message
    dataset, skipped = load(path, PROMPT_NEEDS.limited(limit), on_bad_rows="skip")
    assert dataset["prompt"] == ["one two", "a b c"] and skipped == {"dataset_skipped_rows": 1}

    def broken(prompt: Any) -> int:
        raise ValueError("template says no")

    assert "cannot be tokenised (ValueError: template says no)" in error_of(path, PROMPT_NEEDS.limited(
        TokenLimit("prompt", 3, "max_prompt_length", broken)))


def test_clean_files_load_as_before(tmp_path: Path) -> None:
    """The checks only read: a clean file comes back as its own loader makes it (types included)."""
    import datasets

    path = jsonl(tmp_path, [{**row, "extra": {"a": i}} for i, row in enumerate(GOOD)])
    dataset, skipped = load(path, num_examples=7, on_bad_rows="skip")
    plain = datasets.load_dataset("json", data_files=str(path), split="train").select(range(7))
    assert dataset.to_list() == plain.to_list() and dataset.features == plain.features
    assert skipped == {"dataset_skipped_rows": 0}


def test_rule_columns_may_be_null_but_not_of_the_wrong_type(tmp_path: Path) -> None:
    """Rows mixed in without a gold (rejection sampling's mix) are fine: the rule abstains on them."""
    from align.recipe.schema import RewardSpec
    from align.rewards import prompt_needs

    need = prompt_needs([RewardSpec(rule="accuracy"), RewardSpec(rule="format")], tmp_path)
    path = jsonl(tmp_path, [GOOD[0], {"prompt": "q", "solution": None}, {"prompt": "q", "solution": 7}])
    assert len(load(path, need)[0]) == 3
    wrong = jsonl(tmp_path, [GOOD[0], {"prompt": "q", "solution": {"a": 1}}], "w.jsonl")
    assert ":2: column 'solution' is a mapping; expected a gold answer (non-empty text or a number) or null" in error_of(wrong, need)


def test_embedded_tasks_pass_their_own_checks(tmp_path: Path) -> None:
    for need in (NEEDS, SFT_NEEDS, PROMPT_NEEDS):
        assert len(load_dataset(DataSpec(path="align:arithmetic", num_examples=20), tmp_path, need=need)) == 20
    pairs = load_dataset(DataSpec(path="align:arithmetic-preferences", num_examples=20), tmp_path, need=preference_needs())
    assert len(pairs) == 20


# ---------------------------------------------------------------- align validate reads the first rows


def test_validate_names_a_null_prompt_in_row_0(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [{"prompt": None, "solution": "1"}, *GOOD[:3]])
    found = recipe_problems(tmp_path, RECIPE.replace("DATA", str(path)))
    assert found["stages[0].dataset.path"] == (f"{path}:1: column 'prompt' is missing or null; expected non-empty text or "
                                               "a list of chat messages (or set on_bad_rows: skip to drop such rows)")


def test_validate_names_a_malformed_line_among_the_first_rows(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [GOOD[0], "{oops", *GOOD[1:3]])
    found = recipe_problems(tmp_path, RECIPE.replace("DATA", str(path)))
    assert f"{path}:2: is not valid JSON" in found["stages[0].dataset.path"]


@pytest.mark.parametrize(
    ("stage", "rows", "fragment"),
    [
        ("{name: s, type: sft, dataset: DATA}", [{"messages": MESSAGES}, {"messages": "hi"}],
         ":2: column 'messages' is text; expected a non-empty list of chat messages"),
        ("{name: g, type: grpo, dataset: DATA, rewards: [{rule: accuracy}]}", [GOOD[0], {"prompt": "q", "solution": [1]}],
         ":2: column 'solution' is a list; expected a gold answer (non-empty text or a number) or null"),
        ("{name: r, type: reward_model, dataset: DATA}", [{"chosen": "a", "rejected": 3}],
         ":1: column 'rejected' is a number (3)"),
        ("{name: k, type: kto, dataset: DATA}", [{"prompt": "q", "completion": "a", "label": "good"}],
         ":1: column 'label' is text; expected true or false"),
        ("{name: r, type: rejection_sampling, dataset: DATA, rewards: [{rule: format}]}", [{"prompt": ""}],
         ":1: column 'prompt' is empty"),
        ("{name: t, type: distill, dataset: DATA, traces: dataset}", [{"prompt": "q", "completion": None}],
         ":1: column 'completion' is missing or null"),
    ],
)
def test_validate_checks_the_first_rows_for_every_stage_type(tmp_path: Path, stage: str, rows: list[Any],
                                                             fragment: str) -> None:  # fmt: skip
    path = jsonl(tmp_path, rows)
    text = f"name: d\nmodel: align:tiny\nstages:\n  - {stage.replace('DATA', str(path))}\n"
    found = recipe_problems(tmp_path, text)
    assert fragment in found["stages[0].dataset.path"], found


def test_validate_under_skip_only_notes_bad_first_rows(tmp_path: Path) -> None:
    from align.recipe.validate import load_recipe

    path = jsonl(tmp_path, [{"prompt": None, "solution": "1"}, "{oops", *GOOD[:3]])
    (tmp_path / "recipe.yaml").write_text(RECIPE.replace("DATA", f"{{path: {path}, on_bad_rows: skip}}"))
    recipe = load_recipe(tmp_path / "recipe.yaml")
    assert f"{path}:1: column 'prompt' is missing or null; expected non-empty text or a list of chat messages " \
           "(on_bad_rows: skip: such rows are dropped and counted)" in recipe.notices
    assert any(f"{path}:2: is not valid JSON" in notice for notice in recipe.notices)


def test_validate_rejects_a_bad_on_bad_rows(tmp_path: Path) -> None:
    found = recipe_problems(tmp_path, RECIPE.replace("DATA", "{path: x.jsonl, on_bad_rows: ignore}"))
    assert "'error' or 'skip'" in found["stages[0].dataset.on_bad_rows"]


# ---------------------------------------------------------------- every stage counts what it skipped

EVERY_STAGE = """\
name: skips
seed: 0
model: align:tiny
stages:
  - {name: sft, type: sft, dataset: {path: PROMPTS, on_bad_rows: skip}, max_steps: 1, per_device_train_batch_size: 2}
  - {name: ev, type: eval, dataset: {path: PROMPTS, on_bad_rows: skip}, max_completion_length: 4}
  - {name: distill, type: distill, dataset: {path: QUESTIONS, on_bad_rows: skip}, traces: teacher, temperature: 0,
     max_completion_length: 4, drop_truncated: false, max_steps: 1, per_device_train_batch_size: 2}
  - {name: rs, type: rejection_sampling, dataset: {path: PROMPTS, on_bad_rows: skip}, rewards: [{rule: format}],
     keep: best_of_n, drop_truncated: false, num_generations: 2, max_completion_length: 4}
  - {name: ppo, type: ppo, dataset: {path: PROMPTS, on_bad_rows: skip}, rewards: [{rule: format}], max_steps: 1,
     per_device_train_batch_size: 2, num_ppo_epochs: 1, response_length: 4}
  - {name: rm, type: reward_model, dataset: {path: PAIRS, on_bad_rows: skip}, max_steps: 1, per_device_train_batch_size: 2}
  - {name: dpo, type: dpo, dataset: {path: PAIRS, on_bad_rows: skip}, max_steps: 1, per_device_train_batch_size: 2}
  - {name: kto, type: kto, dataset: {path: PAIRS, on_bad_rows: skip}, max_steps: 1, per_device_train_batch_size: 2}
"""


def test_every_stage_type_reports_the_rows_it_skipped(tmp_path: Path) -> None:
    from align.recipe.validate import load_recipe
    from align.runner import run_recipe

    rows = [{"prompt": f"What is {i}+1?", "completion": f"<answer>{i + 1}</answer>", "solution": str(i + 1)} for i in range(4)]
    prompts = jsonl(tmp_path, [*rows, {"prompt": None, "completion": "x", "solution": "1"}, "{broken"], "prompts.jsonl")
    questions = jsonl(tmp_path, [{"prompt": "What is 1+1?"}, {"prompt": ""}, {"prompt": "What is 2+2?"}], "questions.jsonl")
    pairs = jsonl(tmp_path, [*[{"prompt": "q", "chosen": "a", "rejected": "b"}] * 4, {"prompt": "q", "chosen": "a"}],
                  "pairs.jsonl")  # fmt: skip
    text = EVERY_STAGE.replace("PROMPTS", str(prompts)).replace("QUESTIONS", str(questions)).replace("PAIRS", str(pairs))
    (tmp_path / "recipe.yaml").write_text(text)
    manifest = run_recipe(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "run", report=lambda _: None)
    expected = {"sft": 2, "ev": 2, "distill": 1, "rs": 2, "ppo": 2, "rm": 1, "dpo": 1, "kto": 1}
    for name, skipped in expected.items():
        record = manifest.record(name)
        assert record.status == "complete", (name, record.error)
        assert record.metrics["dataset_skipped_rows"] == skipped, (name, record.metrics)
