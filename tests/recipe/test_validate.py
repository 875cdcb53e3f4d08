"""Malformed recipes are rejected whole and up front, each problem naming file, key path and line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from align.recipe.errors import RecipeError, format_path
from align.recipe.validate import load_recipe

GOOD = """\
name: demo
seed: 1
model: align:tiny
stages:
  - name: sft
    type: sft
    dataset: {path: "align:arithmetic", split: train, num_examples: 64}
    learning_rate: 1.0e-3
    max_steps: 2
  - name: eval_sft
    type: eval
    model: ${stages.sft.model}
    dataset: {path: "align:arithmetic", split: test, num_examples: 8}
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(path: Path, overrides: tuple[str, ...] = ()) -> list[tuple[str, str, int | None]]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    assert info.value.source == str(path)
    return [(format_path(p.path), p.message, p.line) for p in info.value.problems]


def test_good_recipe_validates(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, GOOD))
    assert [s.name for s in recipe.stages] == ["sft", "eval_sft"]
    assert recipe.stages[0].learning_rate == pytest.approx(1e-3)
    assert recipe.header.model.name_or_path == "align:tiny"


def test_scientific_notation_without_dot_is_a_float(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, GOOD.replace("1.0e-3", "1e-3")))
    assert recipe.stages[0].learning_rate == pytest.approx(1e-3)


JSONL_BAD_COLUMNS = '{"foo": 1}\n{"foo": 2}\n'

# (case id, text replacement (old, new) applied to GOOD or full text, expected path, message fragment)
CASES: list[tuple[str, tuple[str, str], str, str]] = [
    ("unknown top-level key", ("seed: 1", "sedd: 1"), "sedd", "did you mean 'seed'"),
    ("unknown stage key", ("learning_rate: 1.0e-3", "learning_rat: 1.0e-3"), "stages[0].learning_rat", "did you mean 'learning_rate'"),
    ("wrong type", ("learning_rate: 1.0e-3", "learning_rate: fast"), "stages[0].learning_rate", "valid number"),
    ("negative learning rate", ("learning_rate: 1.0e-3", "learning_rate: -0.1"), "stages[0].learning_rate", "greater than 0"),
    ("lora r = 0", ("max_steps: 2", "max_steps: 2\n    lora: {r: 0}"), "stages[0].lora.r", "greater than 0"),
    ("lora dropout out of range", ("max_steps: 2", "max_steps: 2\n    lora: {lora_dropout: 1.5}"), "stages[0].lora.lora_dropout", "less than 1"),
    ("lora unknown key", ("max_steps: 2", "max_steps: 2\n    lora: {rank: 8}"), "stages[0].lora.rank", "unknown key 'rank'"),
    ("unknown stage type", ("type: sft", "type: sftt"), "stages[0].type", "did you mean 'sft'"),
    ("duplicate stage names", ("name: eval_sft", "name: sft"), "stages[1].name", "duplicate stage name 'sft'"),
    ("invalid stage name", ("name: eval_sft", "name: eval sft"), "stages[1].name", "should match pattern"),
    ("missing dataset", ('    dataset: {path: "align:arithmetic", split: train, num_examples: 64}\n', ""), "stages[0].dataset", "required key is missing"),
    ("reference to unknown stage", ("${stages.sft.model}", "${stages.sfft.model}"), "stages[1].model", "unknown stage 'sfft' (did you mean 'sft'?)"),
    ("reference to an artifact the stage lacks", ("${stages.sft.model}", "${stages.sft.dataset}"), "stages[1].model", "has no artifact 'dataset'"),
    ("malformed reference", ("${stages.sft.model}", "\"models/${stages.sft.model}\""), "stages[1].model", "bad reference"),
    ("missing dataset file", ('{path: "align:arithmetic", split: test, num_examples: 8}', "{path: data/missing.jsonl}"), "stages[1].dataset.path", "dataset file not found"),
    ("eval: sampling several with greedy", ("num_examples: 8}", "num_examples: 8}\n    num_samples: 4"), "stages[1].num_samples", "temperature > 0"),
    ("eval: pass@k beyond samples", ("num_examples: 8}", "num_examples: 8}\n    pass_k: [1, 8]"), "stages[1].pass_k[1]", "at least 8 samples"),
    ("reserved TRL key", ("max_steps: 2", "max_steps: 2\n    output_dir: /tmp/x"), "stages[0].output_dir", "set by align"),
    ("TRL passthrough key of wrong type", ("max_steps: 2", "max_steps: 2\n    neftune_noise_alpha: lots"), "stages[0].neftune_noise_alpha", "SFTConfig expects"),
    ("max_steps below -1", ("max_steps: 2", "max_steps: -5"), "stages[0].max_steps", "greater than or equal to -1"),
    ("unknown embedded model", ("model: align:tiny", "model: align:huge"), "model.name_or_path", "unknown embedded model"),
    ("missing local model folder", ("model: align:tiny", "model: ./models/nowhere"), "model.name_or_path", "model folder not found"),
    ("accelerate config missing", ("seed: 1", "seed: 1\nlauncher: {type: accelerate, config_file: nope.yaml}"), "launcher.config_file", "accelerate config not found"),
    ("launcher option for the wrong launcher", ("seed: 1", "seed: 1\nlauncher: {type: subprocess, num_processes: 2}"), "launcher.num_processes", "only applies"),
    ("bad embedded task parameter", ("num_examples: 64}", "num_examples: 64, params: {bogus_param: 3}}"), "stages[0].dataset.path", "embedded task"),
    ("dtype not allowed", ("model: align:tiny", "model: {name_or_path: align:tiny, dtype: float8}"), "model.dtype", "float32"),
]


@pytest.mark.parametrize(("old_new", "path", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_recipe_is_rejected(tmp_path: Path, old_new: tuple[str, str], path: str, fragment: str) -> None:
    old, new = old_new
    assert old in GOOD, old
    found = problems_of(write(tmp_path, GOOD.replace(old, new, 1)))
    matching = [p for p in found if p[0] == path]
    assert matching, f"no problem at {path}; got {found}"
    assert any(fragment in message for _, message, _ in matching), matching
    assert all(line is not None for _, _, line in matching)


def test_dataset_without_needed_columns(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text(JSONL_BAD_COLUMNS)
    text = GOOD.replace('{path: "align:arithmetic", split: test, num_examples: 8}', f"{{path: {tmp_path / 'bad.jsonl'}}}")
    text = text.replace('{path: "align:arithmetic", split: train, num_examples: 64}', f"{{path: {tmp_path / 'bad.jsonl'}}}")
    found = problems_of(write(tmp_path, text))
    paths = {p[0]: p[1] for p in found}
    assert "needs columns messages or prompt+completion or text" in paths["stages[0].dataset.path"]
    assert "has no column 'solution'" in paths["stages[1].dataset.path"]


def test_reference_to_later_stage(tmp_path: Path) -> None:
    text = GOOD.replace("    model: ${stages.sft.model}\n", "").replace(
        "    learning_rate: 1.0e-3", "    model: ${stages.eval_sft.model}\n    learning_rate: 1.0e-3"
    )
    found = problems_of(write(tmp_path, text))
    assert ("stages[0].model", "stage 'eval_sft' does not run before this stage; only earlier stages can be referenced", 8) in found


def test_invalid_yaml_reports_line(tmp_path: Path) -> None:
    found = problems_of(write(tmp_path, "name: x\nstages: [\n  {name: a\n"))
    assert len(found) == 1 and found[0][1].startswith("invalid YAML") and found[0][2] is not None


def test_empty_stage_list_and_missing_model(tmp_path: Path) -> None:
    found = problems_of(write(tmp_path, "name: x\nstages: []\n"))
    assert {p[0] for p in found} == {"stages", "model"}


def test_several_problems_reported_together_with_lines(tmp_path: Path) -> None:
    text = GOOD.replace("seed: 1", "sedd: 1").replace("learning_rate: 1.0e-3", "learning_rate: -1").replace("type: sft", "type: nope")
    found = problems_of(write(tmp_path, text))
    assert len(found) >= 2
    by_path = {p[0]: p[2] for p in found}
    assert by_path["sedd"] == 2
    assert by_path["stages[0].type"] == 6


def test_override_problems(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    found = problems_of(path, ("stages.nosuch.learning_rate=1",))
    assert "no item named 'nosuch'" in found[0][1]
    found = problems_of(path, ("stages.sft.lora.r=0",))
    assert found[0][0] == "stages[0].lora.r"


def test_cli_reports_errors_without_traceback_and_trains_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("learning_rate: 1.0e-3", "learning_rate: -1").replace("seed: 1", "sedd: 1"))
    run_dir = tmp_path / "run"
    for command in (["run", str(path), "--run-dir", str(run_dir)], ["validate", str(path)]):
        done = subprocess.run([sys.executable, "-m", "align.cli", *command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert f"{path}:" in done.stderr and "stages[0].learning_rate" in done.stderr and "sedd" in done.stderr
    assert not run_dir.exists()


def test_print_config_shows_resolved_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    done = subprocess.run(
        [sys.executable, "-m", "align.cli", "run", str(path), "stages.sft.max_steps=7", "--print-config"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    import yaml

    resolved = yaml.safe_load(done.stdout)
    sft = resolved["stages"][0]
    assert sft["max_steps"] == 7
    assert sft["seed"] == 1  # filled from the recipe
    assert sft["model"]["name_or_path"] == "align:tiny"
    assert sft["per_device_train_batch_size"] == 8  # schema default shown
    json.dumps(resolved)  # plain data only


def test_warmup_ratio_is_not_silently_dropped(tmp_path: Path) -> None:
    # transformers 5 folded warmup_ratio into warmup_steps (a float < 1 is a share of all steps).
    found = problems_of(write(tmp_path, GOOD.replace("max_steps: 2", "max_steps: 2\n    warmup_ratio: 0.1")))
    assert any(path == "stages[0].warmup_ratio" and "did you mean 'warmup_steps'" in message for path, message, _ in found)
    recipe = load_recipe(write(tmp_path, GOOD.replace("max_steps: 2", "max_steps: 2\n    warmup_steps: 0.1")))
    assert recipe.stages[0].warmup_steps == pytest.approx(0.1)
