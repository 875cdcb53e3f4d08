"""`align recipes import CONFIG.yaml`: an align recipe from an open-r1 or TRL GRPO config (the YAML
`trl grpo --config` and open-r1's `grpo.py --config` read: TRL's `ModelConfig`, `ScriptArguments`
and `GRPOConfig` keys side by side, plus open-r1's reward-function arguments).

What maps where:
- model arguments (`model_name_or_path`, `model_revision`, `torch_dtype`/`dtype`,
  `attn_implementation`, open-r1's `chat_template`) → the recipe's `model`; PEFT arguments
  (`use_peft`, `lora_r`, …) → the stage's `lora`;
- `dataset_name`/`dataset_config`/`dataset_train_split` → the stage's `dataset`, open-r1's
  `dataset_prompt_column` renamed to `prompt`; `system_prompt` → the stage's `system_prompt`;
- `reward_funcs` + `reward_weights` → `rewards`, each with the reward-function arguments of its
  open-r1 name (`cosine_max_len`, `repetition_n_grams`, `max_completion_len`, …), mapped to align's
  rules by the one alias table (`align.recipe.aliases`); TRL's `reward_model_name_or_path` →
  `reward_model`;
- every `GRPOConfig` key → the grpo stage as it is (TRL's names are align's), except the ones align
  sets itself (output_dir, …); `warmup_ratio` (gone from transformers 5) → `warmup_steps` as a share;
- `do_eval`/`eval_strategy` → an `eval` stage on `dataset_test_split` after the grpo stage (align's
  grpo stage trains only);
- the launcher: one process, unless the batch arithmetic (`per_device_train_batch_size` × processes ×
  steps per generation divisible by `num_generations`) needs more, as the config's own run had.
Everything else is listed, with why, in the comment the recipe starts with.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from align.recipe.aliases import RULE_ALIASES
from align.recipe.schema import NAME_PATTERN, RewardSpec, StageConfig
from align.recipe.trl_fields import trl_config_fields

MODEL_KEYS = {"model_name_or_path": "name_or_path", "model_revision": "revision", "torch_dtype": "dtype",
              "dtype": "dtype", "attn_implementation": "attn_implementation", "trust_remote_code": "trust_remote_code",
              "chat_template": "chat_template"}  # fmt: skip
LORA_KEYS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
             "lora_target_modules": "target_modules", "lora_modules_to_save": "modules_to_save",
             "use_rslora": "use_rslora", "use_dora": "use_dora", "load_in_4bit": "load_in_4bit"}  # fmt: skip
DATASET_KEYS = ("dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split", "dataset_prompt_column")
#: Keys whose meaning align covers another way, or that only matter to the script they came from.
SKIPPED = {
    "use_peft": "read as the presence of lora_* settings",
    "lora_task_type": "align sets it",
    "load_in_8bit": "align's QLoRA is 4-bit (lora.load_in_4bit)",
    "bnb_4bit_quant_type": "align's QLoRA uses nf4", "use_bnb_nested_quant": "align's QLoRA uses double quantisation",
    "bnb_4bit_quant_storage": "align's QLoRA default", "lora_target_parameters": "not in align's LoRA spec",
    "dataset_streaming": "align loads datasets whole", "ignore_bias_buffers": "DDP detail the trainer handles",
    "dataset_mixture": "dataset mixtures are not imported; build the mixture as a dataset file",
    "benchmarks": "open-r1's post-training benchmarks; add eval stages", "callbacks": "open-r1's own callbacks",
    "hub_model_revision": "open-r1's push option", "overwrite_hub_revision": "open-r1's push option",
    "push_to_hub_revision": "open-r1's push option", "num_completions_to_print": "open-r1's console option",
    "wandb_entity": "open-r1's wandb option", "wandb_project": "open-r1's wandb option",
    "wandb_run_group": "open-r1's wandb option", "wandb_log_unique_prompts": "open-r1's wandb option",
    "eval_steps": "align evaluates in an eval stage after training, not during it",
    "per_device_eval_batch_size": "for TRL's in-training eval, which an eval stage replaces",
    "code_eval_test_batch_size": "for ioi_code/cf_code, which align has no rule for",
    "code_eval_scoring_mode": "for cf_code, which align has no rule for",
    "ioi_provider": "for ioi_code, which align has no rule for",
}


def _stage_reserved() -> frozenset[str]:
    return StageConfig.reserved_trl_keys


def _sanitised_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_\-]+", "-", text).strip("-")
    name = name if re.match(NAME_PATTERN, name) else f"imported-{name}".strip("-")
    return name or "imported"


def _processes(batch: int, steps: int, generations: int, limit: int = 64) -> int:
    """The fewest processes for which batch × processes × steps is divisible by `generations`."""
    return next((n for n in range(1, limit + 1) if batch * n * steps % generations == 0), 1)


def import_grpo_config(config: dict[str, Any], source: str, num_processes: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """The align recipe (plain data) for an open-r1 / TRL GRPO config, and the notes on what did not
    map one to one (each a line: `key: why`)."""
    grpo_fields = trl_config_fields("trl:GRPOConfig")
    reward_params = {param for alias in RULE_ALIASES.values() for param in (*alias.params, *alias.dropped)}
    notes: list[str] = []
    used: set[str] = set()

    model: dict[str, Any] = {}
    for key, target in MODEL_KEYS.items():
        if config.get(key) is not None:
            model[target] = config[key]
            used.add(key)
    if "name_or_path" not in model:
        raise ValueError(f"{source}: no model_name_or_path; is this a GRPO training config?")
    if model.get("dtype") not in (None, "auto", "float32", "bfloat16", "float16"):
        notes.append(f"torch_dtype: {model.pop('dtype')!r} is not one of auto/float32/bfloat16/float16; left at auto")

    if not config.get("dataset_name"):
        raise ValueError(f"{source}: no dataset_name (dataset mixtures are not imported)")
    dataset: dict[str, Any] = {"path": config["dataset_name"], "split": config.get("dataset_train_split", "train")}
    if config.get("dataset_config"):
        dataset["name"] = config["dataset_config"]
    prompt_column = config.get("dataset_prompt_column", "prompt")
    if prompt_column != "prompt":
        dataset["columns"] = {prompt_column: "prompt"}
    used.update(DATASET_KEYS)

    names = list(config.get("reward_funcs") or [])
    weights = list(config.get("reward_weights") or [1.0] * len(names))
    if len(weights) != len(names):
        raise ValueError(f"{source}: {len(names)} reward_funcs but {len(weights)} reward_weights")
    rewards = []
    for name, weight in zip(names, weights, strict=True):
        alias = RULE_ALIASES.get(name)
        params = {k: config[k] for k in (*alias.params, *alias.dropped) if k in config} if alias else {}
        spec = RewardSpec(rule=name, weight=float(weight), params=params)
        entry: dict[str, Any] = {"rule": spec.rule, "weight": spec.weight}
        if spec.params:
            entry["params"] = dict(spec.params)
        rewards.append(entry)
    used.update({"reward_funcs", "reward_weights"} | (reward_params & set(config)))
    if any(r["rule"] == "code" for r in rewards):
        # open-r1's code rewards read the tests from `verification_info`; align's `code` reads
        # `test_cases` and understands that layout ({"language": …, "test_cases": [...]}).
        dataset.setdefault("columns", {})["verification_info"] = "test_cases"
        notes.append("dataset: column verification_info read as the code rule's test_cases")

    stage: dict[str, Any] = {"name": "grpo", "type": "grpo"}
    if config.get("reward_model_name_or_path"):
        stage["reward_model"] = config["reward_model_name_or_path"]
    used.add("reward_model_name_or_path")
    stage["dataset"] = dataset
    if config.get("system_prompt"):
        stage["system_prompt"] = config["system_prompt"]
    used.add("system_prompt")
    stage["rewards"] = rewards
    if config.get("use_peft") or any(k in config for k in LORA_KEYS if k != "load_in_4bit"):
        stage["lora"] = {target: config[key] for key, target in LORA_KEYS.items() if key in config}
        used.update(LORA_KEYS)

    evaluate = bool(config.get("do_eval")) or config.get("eval_strategy", "no") not in ("no", None)
    seed = config.get("seed")
    for key, value in config.items():
        if key in used or key in SKIPPED:
            continue
        if key in _stage_reserved() or key in ("eval_strategy", "seed"):
            if key not in ("seed", "eval_strategy", "do_eval"):
                notes.append(f"{key}: set by align (the run directory decides it)")
            continue
        if key == "warmup_ratio":
            stage["warmup_steps"] = value  # align reads a float below 1 as a share of all steps
        elif key == "max_prompt_length":
            stage[key] = value
            notes.append("max_prompt_length: align never cuts a prompt; a longer one is an error naming its row, "
                         "or, with on_bad_rows: skip on the dataset, dropped and counted in the metrics")
        elif key in grpo_fields:
            stage[key] = value
        else:
            notes.append(f"{key}: neither a GRPOConfig, model, dataset nor reward-function argument; not imported")
    notes += [f"{key}: {why}" for key, why in SKIPPED.items() if key in config]

    steps = stage.get("steps_per_generation") or stage.get("gradient_accumulation_steps", 1)
    batch = stage.get("per_device_train_batch_size", 8)
    generations = stage.get("num_generations", 8)
    processes = num_processes or _processes(batch, steps, generations)
    if processes > 1:
        stage["launcher"] = {"type": "accelerate", "num_processes": processes}
        if num_processes is None:
            notes.append(f"launcher: {processes} processes, the fewest for which per_device_train_batch_size "
                         f"({batch}) × processes × {steps} steps is divisible by num_generations ({generations})")

    stages = [stage]
    if evaluate:
        split = config.get("dataset_test_split", "test")
        eval_stage: dict[str, Any] = {"name": "eval_grpo", "type": "eval", "model": "${stages.grpo.model}",
                                      "dataset": {**dataset, "split": split}}  # fmt: skip
        if config.get("system_prompt"):
            eval_stage["system_prompt"] = config["system_prompt"]
        if "max_completion_length" in stage:
            eval_stage["max_completion_length"] = stage["max_completion_length"]
        stages.append(eval_stage)
    for key in ("do_eval", "eval_strategy"):
        if key in config:
            notes.append(f"{key}: " + (f"evaluated after training, by stage eval_grpo on split '{config.get('dataset_test_split', 'test')}' "
                                       "(greedy accuracy; align's grpo stage trains only)" if evaluate else
                                       "no eval stage (add one after grpo to measure held-out accuracy)"))

    name_source = config.get("hub_model_id") or Path(str(config.get("output_dir", ""))).name or Path(source).stem
    recipe: dict[str, Any] = {"name": _sanitised_name(str(name_source))}
    if seed is not None:
        recipe["seed"] = seed
    recipe["model"] = model
    recipe["stages"] = stages
    return recipe, notes


class _Dumper(yaml.SafeDumper):
    """Safe YAML with multi-line strings (system prompts) written as literal blocks, as people write them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(recipe: dict[str, Any], notes: list[str], source: str, destination: str | None = None) -> str:
    """The recipe as YAML, starting with how to run it and what did not map one to one."""
    run = destination or "RECIPE.yaml"
    head = [f"# Run: align run {run}", f"# Imported by `align recipes import` from {source}."]
    if notes:
        head.append("# Not imported as it was:")
        head += [f"#   {line}" for line in notes]
    body = yaml.dump(recipe, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=math.inf)
    return "\n".join(head) + "\n" + body


def import_file(path: Path, destination: Path | None = None, num_processes: int | None = None) -> str:
    """Read an open-r1 / TRL GRPO config file and return the align recipe text."""
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    recipe, notes = import_grpo_config(loaded, str(path), num_processes)
    return render(recipe, notes, str(path), str(destination) if destination else None)
