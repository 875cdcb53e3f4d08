"""Stages under DDP, DeepSpeed ZeRO-2 and ZeRO-3, two gloo processes on the CPU, launched from recipes
that name the SHIPPED accelerate configs (GPU configs: 8 processes, bf16) with only the process count
overridden — align adapts them to the CPU. Each test asserts what really ran (world size, distributed
type, ZeRO stage, read back by the stage's processes) and that the sharded runs end with the DDP run's
weights: same seed, data and global batch, so the math says they match."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from align import artifacts as art
from align.launch import LAUNCH_CONFIG, accelerate_launch
from align.recipe.schema import LauncherSpec
from align.recipe.validate import load_recipe
from align.runner import run_recipe

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
ENGINES = {"ddp": ("MULTI_CPU", None), "zero2": ("DEEPSPEED", 2), "zero3": ("DEEPSPEED", 3)}

pytest.importorskip("deepspeed")


def stages_under(engines: list[str], body: str) -> str:
    """One stage per engine, each the same `body`, launched with that engine's shipped config."""
    return "".join(f"  - name: {engine}\n{body}    launcher: {{type: accelerate, config_file: {CONFIGS / engine}.yaml, "
                   "num_processes: 2}\n" for engine in engines)  # fmt: skip


def run(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> art.Manifest:
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)  # align sets what the CPU needs itself
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    manifest = run_recipe(load_recipe(path), tmp_path / "run", report=lambda _: None)
    assert all(s.status == art.COMPLETE for s in manifest.stages), [s.error for s in manifest.stages]
    return manifest


def assert_ran_as_configured(manifest: art.Manifest, engines: list[str]) -> None:
    for engine in engines:
        record = manifest.record(engine)
        distributed, zero = ENGINES[engine]
        assert (record.world_size, record.num_machines, record.distributed_type, record.zero_stage) == (2, 1, distributed, zero)
        assert record.mixed_precision == "no"  # the stage's fp32, not the file's bf16


def weights(model_dir: Path, cls: Any) -> dict[str, torch.Tensor]:
    model = cls.from_pretrained(model_dir)  # a checkpoint that loads, every tensor whole
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def run_under_engines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, engines: list[str], cls: Any,
                      atol: float = 1e-5) -> art.Manifest:  # fmt: skip
    """Run `body` once per engine (same seed, data and global batch); check what ran, and that every
    engine ends with the first one's weights."""
    manifest = run(tmp_path, "name: engines\nseed: 0\nmodel: align:tiny\nstages:\n" + stages_under(engines, body), monkeypatch)
    assert_ran_as_configured(manifest, engines)
    assert_same_weights(tmp_path / "run", engines, cls, atol)
    return manifest


def assert_same_weights(run_dir: Path, engines: list[str], cls: Any, atol: float = 1e-5) -> None:
    """Every engine's weights equal the first one's within `atol`, bar a few elements: ZeRO reduces
    gradients in another order, and where an element's gradient is ~0 that float noise can flip the
    sign of its Adam step (Adam normalises it to ~lr). So at most 1 in 1,000 elements may differ by
    more, and none by more than two steps' worth (2 · 1e-3 here)."""
    reference = weights(run_dir / engines[0] / "model", cls)
    total = sum(v.numel() for v in reference.values())
    assert total > 100_000
    for engine in engines[1:]:
        other = weights(run_dir / engine / "model", cls)
        assert other.keys() == reference.keys()
        gaps = [(other[k] - reference[k]).abs() for k in reference]
        worst = max(float(g.max()) for g in gaps)
        beyond = sum(int((g > atol).sum()) for g in gaps)
        assert beyond <= total // 1000 and worst < 2e-3, f"{engine}: {beyond} of {total} elements beyond {atol:g}, worst {worst:.3g}"


SFT = """\
    type: sft
    dataset: {path: "align:arithmetic", split: train, num_examples: 32}
    learning_rate: 1.0e-3
    max_steps: 3
    per_device_train_batch_size: 4
    logging_steps: 1
    max_length: 96
    save_strategy: "no"
"""


def test_sft_under_ddp_zero2_and_zero3_from_the_shipped_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    run_under_engines(tmp_path, monkeypatch, SFT, ["ddp", "zero2", "zero3"], AutoModelForCausalLM)
    # What align changed for the CPU is in each stage's log, with every rank's own output after it.
    log = (tmp_path / "run" / "zero3" / art.LOG).read_text(encoding="utf-8")
    assert "launcher: no GPU here: DeepSpeed on its CPU accelerator" in log and "\n| " in log


PPO = """\
    type: ppo
    reward_model: align:tiny
    rewards: [{rule: format, weight: 0.5}]
    dataset: {path: "align:arithmetic", split: train, num_examples: 64}
    eval_dataset: {path: "align:arithmetic", split: test, num_examples: 1}
    learning_rate: 1.0e-4
    lr_scheduler_type: linear
    per_device_train_batch_size: 2
    gradient_accumulation_steps: 2
    num_ppo_epochs: 1
    max_steps: 3
    response_length: 8
    logging_steps: 1
    save_strategy: "no"
"""


def test_ppo_under_ddp_zero2_and_zero3_steps_its_schedule_once_per_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PPO's own loop on Accelerate: DeepSpeed really runs (Accelerator(cpu=True) would silently drop the
    plugin), the linear schedule takes one step per PPO step on every engine (Accelerate's wrapper would
    step it once per process: with 2 processes it would reach 0 after half the steps), ZeRO-3 generates
    from gathered shards, its frozen reference and reward model are whole, and an eval set smaller
    than the world (1 row, 2 ranks: the second rank's padded copy is left out) still scores."""
    from transformers import AutoModelForCausalLM

    engines = ["ddp", "zero2", "zero3"]
    manifest = run_under_engines(tmp_path, monkeypatch, PPO, engines, AutoModelForCausalLM)
    for engine in engines:
        rows = art.read_metrics(tmp_path / "run" / engine / art.METRICS, art.TRAIN)
        assert [r["learning_rate"] for r in rows] == pytest.approx([1e-4, 1e-4 * 2 / 3, 1e-4 / 3], rel=0.02)  # as logged
        metrics = manifest.record(engine).metrics
        assert metrics["episodes"] == 3 * 2 * 2 * 2  # steps × processes × micro-batch × accumulation
        assert all(isinstance(metrics[k], float) for k in ("eval_score_before", "eval_score_after"))


GRPO = """\
    type: grpo
    dataset: {path: "align:arithmetic", split: train, num_examples: 32}
    rewards: [{rule: format}, {rule: accuracy}]
    learning_rate: 1.0e-3
    max_steps: 2
    per_device_train_batch_size: 4
    num_generations: 4
    max_completion_length: 8
    temperature: 1.0
    logging_steps: 1
    save_strategy: "no"
"""

REWARD_MODEL = SFT.replace("type: sft", "type: reward_model").replace('"align:arithmetic"', '"align:arithmetic-preferences"')


# ---- how the shipped configs become a CPU launch (no process started) --------------------------------


def launch_settings(tmp_path: Path, spec: LauncherSpec, cuda: bool, mixed: str = "no") -> tuple[dict[str, Any], Any]:
    import yaml

    launch = accelerate_launch(spec, tmp_path, ROOT, mixed, cuda=cuda)
    return yaml.safe_load((tmp_path / LAUNCH_CONFIG).read_text()), launch


def test_ddp_config_on_a_cpu_box_becomes_gloo_ddp_with_the_stages_precision(tmp_path: Path) -> None:
    spec = LauncherSpec(type="accelerate", config_file="accelerate_configs/ddp.yaml", num_processes=2)
    settings, launch = launch_settings(tmp_path, spec, cuda=False)
    assert (settings["distributed_type"], settings["num_processes"], settings["mixed_precision"]) == ("MULTI_GPU", 2, "no")
    assert settings["use_cpu"] is False  # use_cpu: true would make `accelerate launch` start ONE process
    assert launch.env == {"ACCELERATE_USE_CPU": "1"}
    assert any("gloo" in n for n in launch.notes) and any("the config file said bf16" in n for n in launch.notes)
    assert launch.command[launch.command.index("--config_file") + 1] == str((tmp_path / LAUNCH_CONFIG).resolve())


def test_deepspeed_config_on_a_cpu_box_is_not_turned_into_ddp(tmp_path: Path) -> None:
    spec = LauncherSpec(type="accelerate", config_file="accelerate_configs/zero3.yaml", num_processes=2)
    settings, launch = launch_settings(tmp_path, spec, cuda=False)
    assert settings["distributed_type"] == "DEEPSPEED" and settings["deepspeed_config"]["zero_stage"] == 3
    assert "ACCELERATE_USE_CPU" not in launch.env  # with it, Accelerate silently runs plain DDP


def test_on_gpus_the_file_is_kept_but_for_the_stages_precision(tmp_path: Path) -> None:
    spec = LauncherSpec(type="accelerate", config_file="accelerate_configs/zero2.yaml")
    settings, launch = launch_settings(tmp_path, spec, cuda=True, mixed="bf16")
    assert (settings["num_processes"], settings["mixed_precision"]) == (8, "bf16") and launch.env == {}
    assert launch.notes == []


def test_a_process_count_without_a_config_file_starts_that_many_processes(tmp_path: Path) -> None:
    settings, launch = launch_settings(tmp_path, LauncherSpec(type="accelerate", num_processes=2), cuda=False)
    # `accelerate launch --num_processes 2` alone runs one process; as DDP it runs two.
    assert (settings["distributed_type"], settings["num_processes"]) == ("MULTI_GPU", 2)
    assert launch.env == {"ACCELERATE_USE_CPU": "1"}


def test_fsdp_on_a_cpu_box_fails_naming_the_file(tmp_path: Path) -> None:
    from align.launch import StageProcessError

    spec = LauncherSpec(type="accelerate", config_file="accelerate_configs/fsdp.yaml", num_processes=2)
    with pytest.raises(StageProcessError, match=r"accelerate_configs/fsdp.yaml: FSDP needs GPUs"):
        launch_settings(tmp_path, spec, cuda=False)


def test_result_json_records_what_ran_for_a_one_process_stage(tmp_path: Path) -> None:
    """In one process nothing is distributed: the record says so instead of echoing a config."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: one\nseed: 0\nmodel: align:tiny\nstages:\n  - name: sft\n" + SFT)
    run_recipe(load_recipe(recipe), tmp_path / "run", report=lambda _: None)
    result = json.loads((tmp_path / "run" / "sft" / art.RESULT).read_text())
    assert (result["world_size"], result["num_machines"], result["distributed_type"]) == (1, 1, "NO")
    assert "zero_stage" not in result


SAMPLING = """\
name: data-parallel
seed: 0
model: align:tiny
stages:
  - name: rs_one
    type: rejection_sampling
{rs}
  - name: rs_two
    type: rejection_sampling
{rs}
    launcher: {{type: accelerate, config_file: {configs}/ddp.yaml, num_processes: 2}}
  - name: eval_one
    type: eval
{ev}
  - name: eval_two
    type: eval
{ev}
    launcher: {{type: accelerate, config_file: {configs}/zero3.yaml, num_processes: 2}}
"""
RS = """\
    dataset: {path: "align:arithmetic", split: train, num_examples: 7}
    rewards: [{rule: format}]
    keep: best_of_n
    num_generations: 1
    temperature: 0.0
    max_completion_length: 8
    drop_truncated: false
    chunk_size: 4"""
EVAL = """\
    dataset: {path: "align:arithmetic", split: test, num_examples: 5}
    max_completion_length: 8"""


def test_rejection_sampling_and_eval_are_data_parallel_with_one_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy sampling, so one process and two must agree exactly: each rank samples its share (7 and
    5 prompts: uneven shares), every rank gets all samples back in prompt order, one rank writes."""
    manifest = run(tmp_path, SAMPLING.format(rs=RS, ev=EVAL, configs=CONFIGS), monkeypatch)
    run_dir = tmp_path / "run"
    for one, two, artifact in (("rs_one", "rs_two", "dataset.jsonl"), ("eval_one", "eval_two", "predictions.jsonl")):
        assert manifest.record(two).world_size == 2 and manifest.record(one).world_size == 1
        written = (run_dir / two / artifact).read_text().splitlines()
        assert written == (run_dir / one / artifact).read_text().splitlines()
        assert len(written) == (7 if one == "rs_one" else 5)  # once each: not once per rank
    assert manifest.record("eval_two").metrics["accuracy"] == manifest.record("eval_one").metrics["accuracy"]


def test_accelerate_use_cpu_in_the_environment_does_not_turn_deepspeed_into_ddp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    spec = LauncherSpec(type="accelerate", config_file="accelerate_configs/zero2.yaml", num_processes=2)
    _, launch = launch_settings(tmp_path, spec, cuda=False)
    assert launch.unset == ["ACCELERATE_USE_CPU"] and "ACCELERATE_USE_CPU" not in launch.env
    assert any("would become plain DDP" in n for n in launch.notes)


DPO = """\
    type: dpo
    dataset: {path: "align:arithmetic-preferences", split: train, num_examples: 32}
    learning_rate: 1.0e-3
    beta: 0.1
    max_steps: 2
    per_device_train_batch_size: 4
    logging_steps: 1
    max_length: 96
    save_strategy: "no"
"""

LOGIT_DISTILL = """\
    type: distill
    method: logit
    teacher: align:tiny
    student: align:tiny-student
    dataset: {path: "align:arithmetic", split: train, num_examples: 32}
    learning_rate: 1.0e-3
    max_steps: 2
    per_device_train_batch_size: 4
    logging_steps: 1
    max_length: 96
    save_strategy: "no"
"""

SEQUENCE_DISTILL = """\
    type: distill
    teacher: align:tiny
    student: align:tiny-student
    dataset: {path: "align:arithmetic", split: train, num_examples: 16}
    traces: teacher
    num_generations: 1
    temperature: 0.0
    max_completion_length: 8
    drop_truncated: false
    learning_rate: 1.0e-3
    max_steps: 2
    per_device_train_batch_size: 4
    max_length: 96
    save_strategy: "no"
"""


@pytest.mark.slow
@pytest.mark.parametrize(("body", "engines", "task", "atol"), [
    (GRPO, ["ddp", "zero2", "zero3"], "causal_lm", 1e-4),
    (REWARD_MODEL, ["ddp", "zero2", "zero3"], "sequence_classification", 1e-5),
    (DPO, ["ddp", "zero2", "zero3"], "causal_lm", 1e-5),  # its frozen reference is TRL's to place under each engine
    (LOGIT_DISTILL, ["ddp", "zero3"], "causal_lm", 1e-5),  # the teacher too
    (SEQUENCE_DISTILL, ["ddp", "zero3"], "causal_lm", 1e-5),  # greedy traces, sampled data parallel
], ids=["grpo", "reward_model", "dpo", "logit_distill", "sequence_distill"])  # fmt: skip
def test_more_stages_under_the_engines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, engines: list[str],
                                       task: str, atol: float) -> None:  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    run_under_engines(tmp_path, monkeypatch, body, engines, cls, atol)
