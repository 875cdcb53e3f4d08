"""Dataset loading from local files of every supported kind, and first-rows column probing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.data import DataError, chat_prompt, load_dataset, probe_columns
from align.recipe.schema import DataSpec

ROWS = [{"prompt": f"What is {i}+1?", "solution": str(i + 1)} for i in range(5)]


def write_all_formats(tmp_path: Path) -> dict[str, Path]:
    import datasets

    table = datasets.Dataset.from_list(ROWS)
    paths = {
        "jsonl": tmp_path / "d.jsonl",
        "json": tmp_path / "d.json",
        "parquet": tmp_path / "d.parquet",
        "csv": tmp_path / "d.csv",
        "dir": tmp_path / "saved",
    }
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    paths["json"].write_text(json.dumps(ROWS))
    table.to_parquet(str(paths["parquet"]))
    table.to_csv(str(paths["csv"]), index=False)
    table.save_to_disk(str(paths["dir"]))
    return paths


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "dir"])
def test_local_formats_load_and_probe(tmp_path: Path, kind: str) -> None:
    path = write_all_formats(tmp_path)[kind]
    spec = DataSpec(path=str(path), num_examples=3, columns={"solution": "answer"})
    assert probe_columns(DataSpec(path=str(path)), tmp_path) == {"prompt", "solution"}
    dataset = load_dataset(spec, tmp_path)
    assert len(dataset) == 3
    assert dataset.column_names == ["prompt", "answer"]
    assert str(dataset[2]["answer"]) == "3"


def test_relative_paths_fall_back_to_the_recipe_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_all_formats(tmp_path)
    monkeypatch.chdir("/")
    assert probe_columns(DataSpec(path="d.jsonl"), tmp_path) == {"prompt", "solution"}


@pytest.mark.parametrize(
    ("content", "name", "fragment"),
    [
        (None, "missing.jsonl", "dataset file not found"),
        ("", "empty.jsonl", "dataset file is empty"),
        ("[1, 2]\n", "list.jsonl", "must be an object"),
        ("{not json", "broken.jsonl", "cannot read"),
        ("a,b\n", "data.txt", "unsupported dataset file type"),
    ],
)
def test_bad_local_files(tmp_path: Path, content: str | None, name: str, fragment: str) -> None:
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=fragment):
        probe_columns(DataSpec(path=str(tmp_path / name)), tmp_path)


def test_hub_names_are_not_probed_offline(tmp_path: Path) -> None:
    assert probe_columns(DataSpec(path="openai/gsm8k", name="main"), tmp_path) is None


def test_embedded_task_loads_requested_rows(tmp_path: Path) -> None:
    dataset = load_dataset(DataSpec(path="align:arithmetic", split="test", num_examples=7), tmp_path, seed=3)
    assert len(dataset) == 7
    assert {"prompt", "completion", "solution"} <= set(dataset.column_names)
    renamed = load_dataset(DataSpec(path="align:arithmetic", num_examples=2, columns={"solution": "answer"}), tmp_path)
    assert "answer" in renamed.column_names and "solution" not in renamed.column_names


def test_chat_prompt() -> None:
    assert chat_prompt("hi") == [{"role": "user", "content": "hi"}]
    assert chat_prompt("hi", conversational=False) == "hi"
    assert chat_prompt("hi", "be brief") == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    already = [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]
    assert chat_prompt(already, "be brief") == already


def test_a_dataset_dict_folder_loads_the_named_split(tmp_path: Path) -> None:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:2])}
                         ).save_to_disk(str(tmp_path / "both"))
    assert len(load_dataset(DataSpec(path=str(tmp_path / "both"), split="test"), tmp_path)) == 2
    assert probe_columns(DataSpec(path=str(tmp_path / "both"), split="train"), tmp_path) == {"prompt", "solution"}
    with pytest.raises(DataError, match="no split 'dev'; it has: train, test"):
        load_dataset(DataSpec(path=str(tmp_path / "both"), split="dev"), tmp_path)


RECIPE = """\
name: d
model: align:tiny
stages:
  - name: ev
    type: eval
    dataset: DATA
"""


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ('{path: "align:arithmetic", split: test}', "stages[0].dataset.num_examples", "say how many rows"),
        ("{path: FILE, split: test}", "stages[0].dataset.split", "is one file, so it has one split"),
    ],
)
def test_dataset_specs_that_would_mislead_are_rejected(tmp_path: Path, data: str, key: str, fragment: str) -> None:
    from tests.recipe_problems import recipe_problems

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    problems = recipe_problems(tmp_path, RECIPE.replace("DATA", data.replace("FILE", str(tmp_path / "d.jsonl"))))
    assert fragment in problems[key], problems


def test_a_local_file_without_a_split_or_with_train_is_fine(tmp_path: Path) -> None:
    from align.recipe.validate import load_recipe

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for data in (str(tmp_path / "d.jsonl"), f"{{path: {tmp_path / 'd.jsonl'}, split: train}}"):
        (tmp_path / "recipe.yaml").write_text(RECIPE.replace("DATA", data))
        assert load_recipe(tmp_path / "recipe.yaml").stages[0].dataset.path == str(tmp_path / "d.jsonl")


def test_an_embedded_task_without_a_size_does_not_load(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs num_examples"):
        load_dataset(DataSpec(path="align:arithmetic"), tmp_path)
