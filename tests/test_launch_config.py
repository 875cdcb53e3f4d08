"""Accelerate launch configs are checked in `align validate`, before anything starts: through
Accelerate's config keys and launcher arguments, Accelerate's DeepSpeedPlugin, transformers' trainer
check and DeepSpeed's own DeepSpeedConfig, and against the stages they launch. Every problem names
the config file and the key inside it; the batch checks use the process count the file gives."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from align.cli import main
from align.launch_config import LaunchConfigError, launch_config_problems, read_launch_config
from align.recipe.errors import RecipeError, format_path
from align.recipe.schema import LauncherSpec
from align.recipe.validate import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "accelerate_configs").glob("*.yaml"))

ZERO2 = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
  zero_stage: 2
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: bf16
"""

DDP = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: bf16
"""

#: A recipe whose launcher is the accelerate config `{config}`; its stages follow.
HEADER = """\
name: launch
seed: 1
model: align:tiny
launcher: {{type: accelerate, config_file: {config}}}
stages:
"""

SFT = HEADER + """\
  - name: sft
    type: sft
    dataset: {{path: "align:arithmetic", split: train, num_examples: 64}}
    max_steps: 2
{extra}"""

GRPO = HEADER + """\
  - name: grpo
    type: grpo
    dataset: {{path: "align:arithmetic", split: train, num_examples: 16}}
    rewards: [{{rule: accuracy}}]
    max_steps: 1
    per_device_train_batch_size: {batch}
    num_generations: {generations}
"""


def write_config(tmp_path: Path, text: str, name: str = "launch.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def validate(tmp_path: Path, recipe: str) -> list[tuple[str, str]]:
    """(key path, message) of every problem `align validate` reports for `recipe`; [] when it passes."""
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe, encoding="utf-8")
    try:
        load_recipe(path)
    except RecipeError as err:
        return [(format_path(p.path), p.message) for p in err.problems]
    return []


def sft_problems(tmp_path: Path, config_text: str, extra: str = "") -> list[str]:
    write_config(tmp_path, config_text)
    found = validate(tmp_path, SFT.format(config="launch.yaml", extra=extra))
    assert all(path == "launcher.config_file" for path, _ in found), found
    return [message for _, message in found]


@pytest.mark.parametrize("config", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_passes(tmp_path: Path, config: Path) -> None:
    assert launch_config_problems(LauncherSpec(type="accelerate", config_file=str(config)), tmp_path) == []
    # …and under an sft and a grpo stage that leave their precision to the device.
    assert validate(tmp_path, SFT.format(config=config, extra="")) == []
    assert validate(tmp_path, GRPO.format(config=config, batch=8, generations=8)) == []


def test_read_launch_config_takes_the_recipe_count_over_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, ZERO2)
    from_file = read_launch_config(LauncherSpec(type="accelerate", config_file=str(path)), tmp_path)
    assert (from_file.distributed_type, from_file.num_processes, from_file.num_machines) == ("DEEPSPEED", 2, 1)
    assert (from_file.mixed_precision, from_file.zero_stage, from_file.deepspeed_config_file) == ("bf16", 2, None)
    assert from_file.path == path.resolve() and from_file.raw["deepspeed_config"]["zero_stage"] == 2
    assert read_launch_config(LauncherSpec(type="accelerate", config_file=str(path), num_processes=4), tmp_path).num_processes == 4
    bare = read_launch_config(LauncherSpec(type="accelerate", num_processes=3), tmp_path)
    assert (bare.path, bare.distributed_type, bare.num_processes, bare.mixed_precision) == (None, "NO", 3, "no")
    legacy = write_config(tmp_path, DDP.replace("mixed_precision: bf16\n", "fp16: true\n"), "legacy.yaml")
    assert read_launch_config(LauncherSpec(type="accelerate", config_file=str(legacy)), tmp_path).mixed_precision == "fp16"


def test_read_launch_config_raises_with_the_key_path(tmp_path: Path) -> None:
    path = write_config(tmp_path, ZERO2.replace("zero_stage: 2", "zero_stage: 4"))
    with pytest.raises(LaunchConfigError) as info:
        read_launch_config(LauncherSpec(type="accelerate", config_file=str(path)), tmp_path)
    assert info.value.key_path == ("config_file",)
    assert f"{path}: deepspeed_config.zero_stage: " in info.value.message


def test_zero_stage_4_is_rejected_by_deepspeed(tmp_path: Path) -> None:
    [message] = sft_problems(tmp_path, ZERO2.replace("zero_stage: 2", "zero_stage: 4"))
    assert message.startswith("launch.yaml: deepspeed_config.zero_stage: Input should be 0, 1, 2, 3"), message
    assert "got 4" in message


def test_offload_to_gpu_is_rejected_by_deepspeed(tmp_path: Path) -> None:
    [message] = sft_problems(tmp_path, ZERO2.replace("offload_optimizer_device: none", "offload_optimizer_device: gpu"))
    assert message.startswith("launch.yaml: deepspeed_config.offload_optimizer_device: Input should be 'none', 'cpu' or 'nvme'")
    assert "got 'gpu'" in message


def test_misspelt_deepspeed_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    [message] = sft_problems(tmp_path, ZERO2.replace("zero_stage: 2", "zero_stag: 2"))
    assert message == "launch.yaml: deepspeed_config.zero_stag: unknown key (did you mean 'zero_stage'?); accelerate ignores it"


def test_unknown_top_level_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    [message] = sft_problems(tmp_path, DDP.replace("mixed_precision:", "mixed_precison:"))
    assert message == ("launch.yaml: mixed_precison: unknown key (did you mean 'mixed_precision'?) "
                       "(accelerate would refuse the file)")


def test_misspelt_fsdp_key_is_named(tmp_path: Path) -> None:
    fsdp = DDP.replace("MULTI_GPU", "FSDP") + "fsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n  fsdp_state_dict_typ: FULL_STATE_DICT\n"
    [message] = sft_problems(tmp_path, fsdp)
    assert message.startswith("launch.yaml: fsdp_config.fsdp_state_dict_typ: unknown key (did you mean 'fsdp_state_dict_type'?)")


def test_fp16_config_under_a_bf16_stage_is_a_mismatch(tmp_path: Path) -> None:
    [message] = sft_problems(tmp_path, ZERO2.replace("mixed_precision: bf16", "mixed_precision: fp16"), "    bf16: true\n")
    assert message == ("launch.yaml: mixed_precision: the launch computes in 'fp16' but stage 'sft' sets bf16: true; "
                       "make them agree (or leave the stage's bf16/fp16 unset to follow the launch)")


def test_bf16_ddp_config_under_a_stage_that_turns_bf16_off_is_a_mismatch(tmp_path: Path) -> None:
    # Under DDP the rank would silently compute in bf16 autocast (TrainingArguments takes the launch's).
    [message] = sft_problems(tmp_path, DDP, "    bf16: false\n")
    assert "mixed_precision: the launch computes in 'bf16' but stage 'sft' sets bf16/fp16: false" in message


def test_a_stage_precision_against_an_unstated_one_is_fine(tmp_path: Path) -> None:
    assert sft_problems(tmp_path, DDP.replace("mixed_precision: bf16\n", ""), "    bf16: true\n") == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("num_processes: 2", "num_processes: 0", "launch.yaml: num_processes: must be ≥ 1 (got 0)"),
        ("num_machines: 1", "num_machines: 0", "launch.yaml: num_machines: must be ≥ 1 (got 0)"),
        ("machine_rank: 0", "machine_rank: 1", "launch.yaml: machine_rank: must be in 0..0 for num_machines 1 (got 1)"),
        ("num_machines: 1", "num_machines: 4", "launch.yaml: num_processes: 2 processes (the total over all machines) "
         "do not divide over num_machines 4"),
        ("mixed_precision: bf16", "mixed_precision: fp32", "launch.yaml: mixed_precision: unknown value ('fp32'); "
         "expected one of: no, fp16, bf16"),
        ("mixed_precision: bf16", "mixed_precision: fp8", "launch.yaml: mixed_precision: align's stages train with bf16 "
         "or fp16 autocast ('fp8')"),
        ("num_processes: 2\n", "", "launch.yaml: num_processes: not set here nor in the recipe's launcher"),
    ],
)
def test_bad_counts_and_values_are_named(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in DDP
    [message] = sft_problems(tmp_path, DDP.replace(old, new))
    assert message.startswith(expected), message


def test_unknown_distributed_type_is_named(tmp_path: Path) -> None:
    [message] = sft_problems(tmp_path, DDP.replace("MULTI_GPU", "MULTI_GUP"))
    assert message.startswith("launch.yaml: distributed_type: unknown value 'MULTI_GUP' (did you mean 'MULTI_GPU'?)")


def test_deepspeed_settings_under_ddp_are_named(tmp_path: Path) -> None:
    [message] = sft_problems(tmp_path, ZERO2.replace("DEEPSPEED", "MULTI_GPU"))
    assert message.startswith("launch.yaml: deepspeed_config: accelerate ignores it with distributed_type MULTI_GPU")


def test_deepspeed_without_the_package_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    assert sft_problems(tmp_path, ZERO2) == [
        "launch.yaml: distributed_type: DEEPSPEED needs the 'deepspeed' package (pip install 'align[deepspeed]')"
    ]


def test_missing_config_file(tmp_path: Path) -> None:
    found = validate(tmp_path, SFT.format(config="nowhere.yaml", extra=""))
    assert found == [("launcher.config_file", "accelerate config not found: nowhere.yaml")]


@pytest.mark.parametrize("text", ["- just\n- a list\n", "name: a recipe\nstages: []\n"], ids=["list", "recipe"])
def test_not_an_accelerate_config(tmp_path: Path, text: str) -> None:
    assert sft_problems(tmp_path, text) == ["launch.yaml lacks 'distributed_type'; is it an accelerate config?"]


def test_not_yaml(tmp_path: Path) -> None:
    [message] = sft_problems(tmp_path, "distributed_type: [MULTI_GPU\n")
    assert message.startswith("accelerate config launch.yaml is not valid YAML:")


def with_json(tmp_path: Path, ds_json: str) -> str:
    (tmp_path / "ds.json").write_text(ds_json, encoding="utf-8")
    return ZERO2.replace("  offload_optimizer_device: none\n  offload_param_device: none\n", "").replace(
        "zero_stage: 2", "deepspeed_config_file: ds.json"
    )


def test_bad_json_in_the_deepspeed_file(tmp_path: Path) -> None:
    [message] = sft_problems(tmp_path, with_json(tmp_path, '{"zero_optimization": {"stage": 2},}'))
    assert message.startswith("launch.yaml: deepspeed_config.deepspeed_config_file: ds.json is not valid JSON (")


def test_missing_deepspeed_file(tmp_path: Path) -> None:
    text = with_json(tmp_path, "{}").replace("ds.json", "nope.json")
    assert sft_problems(tmp_path, text) == [
        "launch.yaml: deepspeed_config.deepspeed_config_file: DeepSpeed config not found: nope.json"
    ]


DS_JSON = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "zero_optimization": {"stage": 2, "overlap_comm": True},
    "bf16": {"enabled": "auto"},
}


def test_a_good_deepspeed_file_passes(tmp_path: Path) -> None:
    assert sft_problems(tmp_path, with_json(tmp_path, json.dumps(DS_JSON))) == []
    config = read_launch_config(LauncherSpec(type="accelerate", config_file="launch.yaml"), tmp_path)
    assert config.deepspeed_config_file == (tmp_path / "ds.json").resolve()


def test_a_typo_inside_zero_optimization_of_the_file_is_named(tmp_path: Path) -> None:
    ds = {**DS_JSON, "zero_optimization": {"stage": 2, "overlap_comms": True}}
    [message] = sft_problems(tmp_path, with_json(tmp_path, json.dumps(ds)))
    assert message.startswith("launch.yaml: ds.json: zero_optimization.overlap_comms: Extra inputs are not permitted")


def test_the_file_batch_against_the_stage_batch(tmp_path: Path) -> None:
    # sft's per_device_train_batch_size is 8 (align's default); the file fixes it at 4.
    ds = {**DS_JSON, "train_micro_batch_size_per_gpu": 4}
    [message] = sft_problems(tmp_path, with_json(tmp_path, json.dumps(ds)))
    assert message == ("launch.yaml: ds.json: train_micro_batch_size_per_gpu: 4, but the stage's per_device_train_batch_size "
                       "is 8; transformers requires them equal (or 'auto' in the DeepSpeed config) (stage 'sft')")
    assert sft_problems(tmp_path, with_json(tmp_path, json.dumps(ds)), "    per_device_train_batch_size: 4\n") == []


def test_a_fixed_global_batch_is_checked_for_the_process_count(tmp_path: Path) -> None:
    # 4 per rank × 1 step × 2 processes is 8, not 4: DeepSpeed's own arithmetic, for the file's count.
    ds = {**DS_JSON, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4}
    assert sft_problems(tmp_path, with_json(tmp_path, json.dumps(ds)), "    per_device_train_batch_size: 4\n") == [
        "launch.yaml: ds.json: DeepSpeed rejects it for 2 process(es): Check batch related parameters. train_batch_size "
        "is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 4 != 4 * 1 * 2"
    ]
    assert sft_problems(tmp_path, with_json(tmp_path, json.dumps({**ds, "train_batch_size": 8})),
                        "    per_device_train_batch_size: 4\n") == []


def test_gradient_accumulation_in_the_yaml_against_the_stage(tmp_path: Path) -> None:
    text = ZERO2.replace("zero_stage: 2", "zero_stage: 2\n  gradient_accumulation_steps: 4")
    [message] = sft_problems(tmp_path, text)
    assert message.startswith("launch.yaml: deepspeed_config.gradient_accumulation_steps: 4, but the stage's "
                              "gradient_accumulation_steps is 1")
    assert sft_problems(tmp_path, text, "    gradient_accumulation_steps: 4\n") == []


@pytest.mark.parametrize(("processes", "ok"), [(3, True), (2, False)])
def test_grpo_batch_divisibility_uses_the_count_in_the_file(tmp_path: Path, processes: int, ok: bool) -> None:
    # 2 completions per rank, 3 generations per prompt: valid across 3 processes (6), not across 2 (4).
    write_config(tmp_path, DDP.replace("num_processes: 2", f"num_processes: {processes}"))
    found = validate(tmp_path, GRPO.format(config="launch.yaml", batch=2, generations=3))
    if ok:
        assert found == []
    else:
        assert found == [("stages[0].per_device_train_batch_size",
                          "per_device_train_batch_size × processes × steps_per_generation = 4 completions per "
                          "generation round must be divisible by num_generations (3)")]


def test_rejection_sampling_with_several_processes_from_the_file_is_accepted(tmp_path: Path) -> None:
    write_config(tmp_path, DDP)
    recipe = """\
name: rs
seed: 1
model: align:tiny
stages:
  - name: rs
    type: rejection_sampling
    launcher: {type: accelerate, config_file: launch.yaml}
    dataset: {path: "align:arithmetic", split: train, num_examples: 8}
    rewards: [{rule: accuracy}]
"""
    assert validate(tmp_path, recipe) == []  # data parallel: each rank samples a share, one writes


def test_align_validate_shows_each_problem_with_file_key_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(tmp_path, ZERO2.replace("zero_stage: 2", "zero_stag: 2").replace("mixed_precision:", "mixed_precison:"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(SFT.format(config="launch.yaml", extra=""), encoding="utf-8")
    assert main(["validate", str(recipe)]) == 2
    out = capsys.readouterr()
    shown = out.out + out.err
    assert f"{recipe}: 2 problems found" in shown
    assert (f"{recipe}:4: launcher.config_file: launch.yaml: deepspeed_config.zero_stag: unknown key "
            "(did you mean 'zero_stage'?); accelerate ignores it") in shown
    assert f"{recipe}:4: launcher.config_file: launch.yaml: mixed_precison: unknown key (did you mean 'mixed_precision'?)" in shown
