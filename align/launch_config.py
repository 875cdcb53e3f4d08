"""An Accelerate launch config (the YAML `accelerate launch --config_file` reads), read once and checked
before any stage starts.

Each layer a run goes through lets some typos through, so validation chains them, in the order a run
meets them: Accelerate's own config classes (which top-level keys exist), Accelerate's launcher (which
`deepspeed_config:` / `fsdp_config:` keys it hands on: any other key is dropped without a word),
Accelerate's `DeepSpeedPlugin` (the DeepSpeed dict it builds from those keys), transformers'
`HfTrainerDeepSpeedConfig` (that dict against the stage's own batch, precision and optimiser
settings) and DeepSpeed's own `DeepSpeedConfig` (pydantic: ZeRO stage, offload devices, typos inside
`zero_optimization`, the batch arithmetic for the world size). None of this needs a GPU or a process
group: DeepSpeed is told the world size the launch will have.

Accelerate, transformers and DeepSpeed are imported only inside functions: this module is imported by
validation and by the launcher, and most recipes never name a config file."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import MethodType, SimpleNamespace
from typing import Any
from unittest import mock

from align.paths import resolve_user_path
from align.recipe.errors import KeyPath, did_you_mean
from align.recipe.schema import LauncherSpec, StageConfig

#: The compute precisions align's stages train with (Accelerate's `mixed_precision` names).
MIXED_PRECISIONS = ("no", "fp16", "bf16")
#: Keys Accelerate's config loader still accepts and converts (`BaseConfig.process_config`).
LEGACY_KEYS = frozenset({"fp16", "dynamo_backend"})
#: Where Accelerate's `DeepSpeedPlugin` puts each `deepspeed_config:` key in the DeepSpeed dict
#: (its `plugin_to_config_mapping`), read backwards to name the YAML key a DeepSpeed error is about.
DEEPSPEED_KEY_OF = {
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "gradient_clipping": "gradient_clipping",
    "zero_optimization.stage": "zero_stage",
    "zero_optimization.offload_optimizer.device": "offload_optimizer_device",
    "zero_optimization.offload_param.device": "offload_param_device",
    "zero_optimization.offload_optimizer.nvme_path": "offload_optimizer_nvme_path",
    "zero_optimization.offload_param.nvme_path": "offload_param_nvme_path",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": "zero3_save_16bit_model",
}
#: DeepSpeed's pydantic models → the section of the DeepSpeed dict each one validates.
DEEPSPEED_SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16", "DeepSpeedFP16Config": "fp16"}
#: Stand-ins for "auto" values nothing else fills during validation: any valid number does, the run
#: fills the real ones (from the trainer, the model's hidden size, the number of steps).
AUTO_STAND_INS: dict[str, Any] = {"betas": [0.9, 0.999], "enabled": False}
#: The hidden size `trainer_config_finalize` derives bucket sizes from; validation loads no model.
STAND_IN_HIDDEN_SIZE = 1024
#: The step count the scheduler's "auto" total is filled with when a stage runs by epochs.
STAND_IN_TRAINING_STEPS = 1000


class LaunchConfigError(ValueError):
    """A launch config that cannot be used; `key_path` is relative to the recipe's `launcher`."""

    def __init__(self, problems: list[tuple[KeyPath, str]]):
        self.problems = problems
        self.key_path, self.message = problems[0]
        super().__init__("; ".join(message for _, message in problems))


@dataclass(frozen=True)
class LaunchConfig:
    """What a stage's launch will be: the config file's settings with the recipe's overrides applied."""

    path: Path | None
    raw: dict[str, Any]
    distributed_type: str
    num_processes: int
    num_machines: int
    mixed_precision: str
    zero_stage: int | None
    deepspeed_config_file: Path | None


def read_launch_config(spec: LauncherSpec, base_dir: Path, strict: bool = True) -> LaunchConfig:
    """The launch `spec` describes. Raises `LaunchConfigError` on any problem `launch_config_problems`
    finds; with `strict=False` only when the numbers cannot be read at all (a missing file, not YAML,
    no `distributed_type`), so validation can still size batches while it reports the rest."""
    config, problems = _read(spec, base_dir)
    if config is None or (strict and problems):
        raise LaunchConfigError(problems)
    return config


def launch_config_problems(spec: LauncherSpec, base_dir: Path, stage: StageConfig | None = None) -> list[tuple[KeyPath, str]]:
    """Everything wrong with the launch `spec` describes, each problem naming the config file and the
    key inside it. With a `stage`, also whether that stage fits the launch: its precision, and under
    DeepSpeed its batch, gradient clipping and optimiser settings (a message names the stage)."""
    config, problems = _read(spec, base_dir)
    if config is None or problems:
        return problems
    if stage is not None:
        name = spec.config_file or "the accelerate launch"
        problems += [(("config_file",), f"{name}: {message}") for message in _stage_problems(config, spec, stage)]
    return problems


# ---- reading --------------------------------------------------------------------------------------


def _read(spec: LauncherSpec, base_dir: Path) -> tuple[LaunchConfig | None, list[tuple[KeyPath, str]]]:
    override = getattr(spec, "mixed_precision", None)  # LauncherSpec's override, where the schema has it
    if spec.config_file is None:
        processes = spec.num_processes or 1
        return LaunchConfig(None, {}, "NO", processes, 1, override or "no", None, None), []
    path = resolve_user_path(spec.config_file, base_dir)
    if not path.is_file():
        return None, [(("config_file",), f"accelerate config not found: {spec.config_file}")]
    stat = path.stat()
    raw = _load_yaml(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    name = spec.config_file
    if isinstance(raw, str):
        return None, [(("config_file",), f"accelerate config {name} is not valid YAML: {raw}")]
    if not isinstance(raw, dict) or "distributed_type" not in raw:
        return None, [(("config_file",), f"{name} lacks 'distributed_type'; is it an accelerate config?")]
    problems: list[str] = []
    _check_top_level(raw, problems)
    distributed_type = str(raw["distributed_type"])
    file_processes = _int_key(raw, "num_processes", None, problems)
    num_machines = _int_key(raw, "num_machines", 1, problems)
    machine_rank = _int_key(raw, "machine_rank", 0, problems)
    if file_processes is not None and file_processes < 1 and file_processes != -1:  # -1: accelerate's "unset"
        problems.append(f"num_processes: must be ≥ 1 (got {file_processes})")
    if num_machines is not None and num_machines < 1:
        problems.append(f"num_machines: must be ≥ 1 (got {num_machines})")
    elif num_machines is not None and machine_rank is not None and not 0 <= machine_rank < num_machines:
        problems.append(f"machine_rank: must be in 0..{num_machines - 1} for num_machines {num_machines} (got {machine_rank})")
    processes = spec.num_processes or (file_processes if file_processes and file_processes > 0 else None)
    if processes is None and distributed_type != "NO" and file_processes != 0:
        # accelerate launch: "You need to manually pass in `--num_processes` using this config yaml."
        problems.append("num_processes: not set here nor in the recipe's launcher (num_processes: N)")
    if processes and num_machines and num_machines > 0 and processes % num_machines:
        problems.append(f"num_processes: {processes} processes (the total over all machines) do not divide "
                        f"over num_machines {num_machines}")
    mixed_precision = _mixed_precision(raw, override, problems)
    deepspeed = raw.get("deepspeed_config") or {}
    zero_stage: int | None = None
    ds_file: Path | None = None
    if not isinstance(deepspeed, dict):
        problems.append(f"deepspeed_config: expected a mapping of DeepSpeed settings, got {type(deepspeed).__name__}")
        deepspeed = {}
    elif deepspeed and distributed_type != "DEEPSPEED":
        problems.append(f"deepspeed_config: accelerate ignores it with distributed_type {distributed_type}; "
                        "set distributed_type: DEEPSPEED to run DeepSpeed")
    if distributed_type == "DEEPSPEED":
        ds_file = _deepspeed_file(deepspeed, path, base_dir, problems)
        stage_value = deepspeed.get("zero_stage")
        zero_stage = stage_value if isinstance(stage_value, int) and not isinstance(stage_value, bool) else None
    fsdp = raw.get("fsdp_config") or {}
    if isinstance(fsdp, dict):
        _check_section_keys(fsdp, "fsdp_config", _launcher_keys("FSDP Arguments"), problems, prefix="fsdp_")
    else:
        problems.append(f"fsdp_config: expected a mapping of FSDP settings, got {type(fsdp).__name__}")
    config = LaunchConfig(path.resolve(), raw, distributed_type, processes or 1, num_machines or 1, mixed_precision, zero_stage, ds_file)
    if not problems and distributed_type == "DEEPSPEED":
        # Built only from a config that passed the checks above: DeepSpeed's messages come on top of ours.
        problems += _deepspeed_problems(config, deepspeed, None)
    return config, [(("config_file",), f"{name}: {message}") for message in problems]


@cache
def _load_yaml(path: str, mtime_ns: int, size: int) -> Any:
    """The file's YAML, or the parser's message (a str) when it is not YAML; cached per file version,
    since every stage's batch check reads the same file."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        return str(err)


def _check_top_level(raw: dict[str, Any], problems: list[str]) -> None:
    from accelerate.commands.config.config_args import ClusterConfig, ComputeEnvironment
    from accelerate.utils import DistributedType

    known = {f.name for f in dataclasses.fields(ClusterConfig)} | LEGACY_KEYS
    for key in raw:
        if key not in known:
            problems.append(f"{key}: unknown key{did_you_mean(str(key), known)} (accelerate would refuse the file)")
    types = [t.value for t in DistributedType]
    if str(raw["distributed_type"]) not in types:
        problems.append(f"distributed_type: unknown value {raw['distributed_type']!r}"
                        f"{did_you_mean(str(raw['distributed_type']), types)}; expected one of: {', '.join(types)}")
    environment = raw.get("compute_environment", ComputeEnvironment.LOCAL_MACHINE.value)
    if environment != ComputeEnvironment.LOCAL_MACHINE.value:
        problems.append(f"compute_environment: align launches each stage on the machines it runs on "
                        f"(LOCAL_MACHINE), not {environment!r}")


def _int_key(raw: dict[str, Any], key: str, default: int | None, problems: list[str]) -> int | None:
    value = raw.get(key, default)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    problems.append(f"{key}: expected a whole number, got {value!r}")
    return None


def _mixed_precision(raw: dict[str, Any], override: str | None, problems: list[str]) -> str:
    value = raw.get("mixed_precision")
    if value is None:  # accelerate: unset means "no", or "fp16" from the legacy `fp16: true`
        value = "fp16" if raw.get("fp16") else "no"
    value = str(value)
    if value not in MIXED_PRECISIONS:
        why = "align's stages train with bf16 or fp16 autocast" if value == "fp8" else "unknown value"
        problems.append(f"mixed_precision: {why} ({value!r}); expected one of: {', '.join(MIXED_PRECISIONS)}")
        value = "no"
    return override or value


def _deepspeed_file(deepspeed: dict[str, Any], config_path: Path, base_dir: Path, problems: list[str]) -> Path | None:
    _check_section_keys(deepspeed, "deepspeed_config", _launcher_keys("DeepSpeed Arguments"), problems)
    for key in ("zero_stage", "gradient_accumulation_steps"):
        if key in deepspeed and not (isinstance(deepspeed[key], int) and not isinstance(deepspeed[key], bool)):
            problems.append(f"deepspeed_config.{key}: expected a whole number, got {deepspeed[key]!r}")
    if "gradient_clipping" in deepspeed and not isinstance(deepspeed["gradient_clipping"], int | float):
        problems.append(f"deepspeed_config.gradient_clipping: expected a number, got {deepspeed['gradient_clipping']!r}")
    for key in ("zero3_init_flag", "zero3_save_16bit_model"):
        if key in deepspeed and str(deepspeed[key]).lower() not in ("true", "false"):
            problems.append(f"deepspeed_config.{key}: expected true or false, got {deepspeed[key]!r}")
    value = deepspeed.get("deepspeed_config_file")
    if value in (None, "none"):
        return None
    file = resolve_user_path(str(value), base_dir)
    if not file.is_file() and (config_path.parent / str(value)).is_file():
        file = config_path.parent / str(value)  # beside the accelerate config, where people keep it
    if not file.is_file():
        problems.append(f"deepspeed_config.deepspeed_config_file: DeepSpeed config not found: {value}")
        return None
    try:
        loaded = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problems.append(f"deepspeed_config.deepspeed_config_file: {value} is not valid JSON ({err})")
        return None
    if not isinstance(loaded, dict):
        problems.append(f"deepspeed_config.deepspeed_config_file: {value} holds {type(loaded).__name__}, not a JSON object")
        return None
    return file.resolve()


def _check_section_keys(section: dict[str, Any], name: str, known: frozenset[str], problems: list[str], prefix: str = "") -> None:
    """Keys of a `deepspeed_config:`/`fsdp_config:` section that accelerate's launcher would drop: it
    copies each key onto its own argument of that name (`prefix` added where missing) and nothing
    reads the rest, so a misspelt `zero_stag` silently runs the default ZeRO stage."""
    for key in section:
        if (key if str(key).startswith(prefix) else prefix + str(key)) not in known:
            spelled = known | {k.removeprefix(prefix) for k in known}
            problems.append(f"{name}.{key}: unknown key{did_you_mean(str(key), spelled)}; accelerate ignores it")


@cache
def _launcher_keys(group: str) -> frozenset[str]:
    """The arguments of one group of `accelerate launch` (e.g. "DeepSpeed Arguments"): the keys its
    config file's section of that name may hold."""
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    for action_group in parser._action_groups:  # argparse keeps groups only here
        if action_group.title == group:
            return frozenset(action.dest for action in action_group._group_actions)
    raise LookupError(f"accelerate launch has no argument group {group!r}")


# ---- DeepSpeed ------------------------------------------------------------------------------------


def _launcher_env(config: LaunchConfig, deepspeed: dict[str, Any]) -> dict[str, str]:
    """The environment `accelerate launch` gives each rank for this config (`prepare_deepspeed_cmd_env`),
    from which the rank's `DeepSpeedPlugin()` builds its DeepSpeed dict."""
    names = {
        "zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
        "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
        "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING",
        "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
        "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
        "offload_optimizer_nvme_path": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_NVME_PATH",
        "offload_param_nvme_path": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_NVME_PATH",
        "zero3_init_flag": "ACCELERATE_DEEPSPEED_ZERO3_INIT",
        "zero3_save_16bit_model": "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
    }
    env = {var: str(deepspeed[key]).lower() for key, var in names.items() if key in deepspeed}
    if config.deepspeed_config_file is not None:
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(config.deepspeed_config_file)
    env["ACCELERATE_MIXED_PRECISION"] = config.mixed_precision
    return env


@contextmanager
def _only_env(env: dict[str, str]) -> Iterator[None]:
    """`os.environ` as a launched rank would see it: this launch's variables, none of the caller's
    ACCELERATE_* (validation may itself run under a launcher)."""
    stale = {k: None for k in os.environ if k.startswith("ACCELERATE_")}
    with mock.patch.dict(os.environ, env):
        for key in stale:
            if key not in env:
                del os.environ[key]
        yield


def _deepspeed_problems(config: LaunchConfig, deepspeed: dict[str, Any], stage: StageConfig | None) -> list[str]:
    """The DeepSpeed dict this launch builds, through Accelerate's plugin, transformers' trainer check
    (with a stage) and DeepSpeed's own config; each problem names the key it is about."""
    if importlib.util.find_spec("deepspeed") is None:
        return ["distributed_type: DEEPSPEED needs the 'deepspeed' package (pip install 'align[deepspeed]')"]
    from accelerate.utils import DeepSpeedPlugin

    mixed = _trainer_mixed_precision(config, stage)
    try:
        with _only_env(_launcher_env(config, deepspeed)):
            plugin = DeepSpeedPlugin()
            plugin.set_mixed_precision(mixed)
    except (ValueError, KeyError) as err:
        return [f"deepspeed_config: accelerate's DeepSpeedPlugin rejects it: {err}"]
    ds = plugin.deepspeed_config
    own = _json_keys(config.deepspeed_config_file)
    if stage is not None and stage.trl_config_class is not None:
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

        hf = HfTrainerDeepSpeedConfig(ds)  # what `propagate_args_to_deepspeed` does with the plugin's dict
        args = _trainer_args(stage, config.num_processes, mixed)
        try:
            hf.trainer_config_process(args)
            steps = stage.max_steps if getattr(stage, "max_steps", -1) > 0 else STAND_IN_TRAINING_STEPS
            hf.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=STAND_IN_HIDDEN_SIZE)), steps)
        except ValueError as err:
            found = [re.match(r"- ds ([^=\s]+)=(.*) vs hf (.+)=(.*)$", line) for line in hf.mismatches]
            return [f"{_where(config, own, m.group(1))}: {m.group(2)}, but the stage's {m.group(3)} is {m.group(4)}; "
                    "transformers requires them equal (or 'auto' in the DeepSpeed config)" for m in found if m] \
                or [f"deepspeed_config: {err}"]
        ds = hf.config
    return _deepspeed_config_problems(_stand_in_autos(ds, config.num_processes), config, own)


def _deepspeed_config_problems(ds: dict[str, Any], config: LaunchConfig, own: set[str]) -> list[str]:
    import deepspeed.runtime.config as ds_config
    from pydantic import ValidationError

    # DeepSpeedConfig asks torch.distributed for the world size (1 when no group exists, which would
    # misjudge every batch): it is told the size this launch will have instead.
    with mock.patch.object(ds_config.dist, "get_world_size", return_value=config.num_processes), \
            mock.patch.object(ds_config.dist, "get_rank", return_value=0):
        try:
            ds_config.DeepSpeedConfig(ds)
        except ValidationError as err:
            section = DEEPSPEED_SECTIONS.get(err.title)
            out = []
            for item in err.errors(include_url=False):
                key = ".".join(str(part) for part in (section, *item["loc"]) if part is not None)
                out.append(f"{_where(config, own, key)}: {item['msg']} (got {item['input']!r}), by DeepSpeed's own check")
            return out
        except (AssertionError, ValueError, TypeError, KeyError) as err:
            where = config.deepspeed_config_file.name if config.deepspeed_config_file else "deepspeed_config"
            return [f"{where}: DeepSpeed rejects it for {config.num_processes} process(es): {err}"]
    return []


def _where(config: LaunchConfig, own: set[str], ds_key: str) -> str:
    """Where a DeepSpeed key came from: the DeepSpeed JSON file when it sets it, else the accelerate
    config's `deepspeed_config:` key that fills it."""
    if config.deepspeed_config_file is not None and ds_key in own:
        return f"{config.deepspeed_config_file.name}: {ds_key}"
    if ds_key in DEEPSPEED_KEY_OF:
        return f"deepspeed_config.{DEEPSPEED_KEY_OF[ds_key]}"
    return f"deepspeed_config (DeepSpeed's {ds_key})"


def _json_keys(path: Path | None) -> set[str]:
    """Every dotted key a DeepSpeed JSON file sets (`zero_optimization.stage`, …)."""
    if path is None:
        return set()

    def walk(node: dict[str, Any], prefix: str) -> Iterator[str]:
        for key, value in node.items():
            yield prefix + key
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")

    return set(walk(json.loads(path.read_text(encoding="utf-8")), ""))


def _stand_in_autos(ds: dict[str, Any], world_size: int) -> dict[str, Any]:
    """A copy of the DeepSpeed dict with every "auto" left (the trainer or the model fills them at run
    time) replaced by a valid stand-in, and the batch triple made consistent for `world_size`."""

    def fill(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            return {k: fill(v, k) for k, v in node.items()}
        return AUTO_STAND_INS.get(key, 1) if node == "auto" else node

    out = fill(ds)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        out[key] = 1 if ds.get(key, "auto") == "auto" else out[key]
    if ds.get("train_batch_size", "auto") == "auto":
        out["train_batch_size"] = out["train_micro_batch_size_per_gpu"] * out["gradient_accumulation_steps"] * world_size
    return out


# ---- the stage against the launch -----------------------------------------------------------------


def stage_precision(stage: StageConfig) -> str | None:
    """The compute precision a stage asks for itself ("bf16", "fp16", "no"), or None when it leaves it
    to the device (bf16/fp16 unset): then any launch precision fits."""
    bf16, fp16 = getattr(stage, "bf16", None), getattr(stage, "fp16", None)
    if bf16 or getattr(stage, "pure_bf16", False):
        return "bf16"
    if fp16:
        return "fp16"
    return "no" if bf16 is False or fp16 is False else None


def _trainer_mixed_precision(config: LaunchConfig, stage: StageConfig | None) -> str:
    """The precision a rank's TrainingArguments settle on: bf16/fp16 where the stage turns one on, else
    the launcher's ACCELERATE_MIXED_PRECISION (transformers' `TrainingArguments.__post_init__`)."""
    asked = stage_precision(stage) if stage is not None else None
    return asked if asked in ("bf16", "fp16") else config.mixed_precision


def _trainer_args(stage: StageConfig, world_size: int, mixed: str) -> SimpleNamespace:
    """The TrainingArguments fields `HfTrainerDeepSpeedConfig` reads: the stage's values, else its TRL
    config class's defaults."""
    from transformers import TrainingArguments

    from align.recipe.trl_fields import config_class

    assert stage.trl_config_class is not None
    defaults = {f.name: f.default for f in dataclasses.fields(config_class(stage.trl_config_class))}
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm", "learning_rate",
            "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "warmup_steps", "save_on_each_node")
    args = SimpleNamespace(**{key: getattr(stage, key, defaults.get(key)) for key in keys})
    args.world_size = world_size
    args.bf16, args.fp16 = mixed == "bf16", mixed == "fp16"
    args.bf16_full_eval = args.fp16_full_eval = False
    args.get_warmup_steps = MethodType(TrainingArguments.get_warmup_steps, args)
    return args


def _stage_problems(config: LaunchConfig, spec: LauncherSpec, stage: StageConfig) -> list[str]:
    problems: list[str] = []
    asked = stage_precision(stage)
    # Only a precision the launch states (the file's key, or the launcher's override) can disagree: an
    # unset one is accelerate's "no", which a stage's own bf16/fp16 overrides.
    override = getattr(spec, "mixed_precision", None)
    stated = override is not None or "mixed_precision" in config.raw or "fp16" in config.raw
    if stated and asked is not None and asked != config.mixed_precision:
        key = "the recipe's launcher.mixed_precision" if override is not None else "mixed_precision"
        flags = {"bf16": "bf16: true", "fp16": "fp16: true", "no": "bf16/fp16: false"}
        problems.append(f"{key}: the launch computes in {config.mixed_precision!r} but stage '{stage.name}' sets "
                        f"{flags[asked]}; make them agree (or leave the stage's bf16/fp16 unset to follow the launch)")
    if config.distributed_type == "DEEPSPEED":
        deepspeed = config.raw.get("deepspeed_config") or {}
        problems += [f"{p} (stage '{stage.name}')" for p in _deepspeed_problems(config, deepspeed, stage)]
    return problems
