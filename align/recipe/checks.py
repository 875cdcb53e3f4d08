"""What a stage's own `check(config, ctx)` sees while a recipe is validated: its place in the recipe,
the stages before it, and the checks every stage type shares (dataset columns, rules, models, LoRA,
sampling), each turning a finding into a located `Problem`."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from align.recipe.errors import KeyPath, Problem
from align.recipe.loader import LocatedYAML
from align.recipe.schema import (
    REFERENCE,
    DataSpec,
    LoraSpec,
    ModelSpec,
    RecipeHeader,
    RewardSpec,
    SamplingKnobs,
    StageConfig,
)

if TYPE_CHECKING:
    from align.data import Needs


@dataclass
class CheckContext:
    """One stage's view of the recipe during validation. `earlier_columns` holds, for every stage
    before this one, the columns of the dataset it writes (None: not known before running)."""

    located: LocatedYAML
    base_dir: Path
    index: int
    header: RecipeHeader
    earlier: dict[str, StageConfig]
    earlier_columns: dict[str, set[str] | None] = field(default_factory=dict)
    check_files: bool = True
    check_models: bool = True
    problems: list[Problem] = field(default_factory=list)
    #: Things validation could not check (printed, not errors): e.g. a hub model's context offline.
    notices: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> KeyPath:
        return ("stages", self.index)

    def error(self, rel_path: KeyPath, message: str) -> None:
        path = (*self.prefix, *rel_path)
        self.problems.append(Problem(path, message, self.located.line_of(path)))

    def model_spec(self, stage: StageConfig) -> ModelSpec:
        return stage.model or self.header.model

    def origin_model(self, spec: ModelSpec | None) -> ModelSpec | None:
        """The model a spec really starts from: `${stages.X.model}` is followed to the model stage X
        trained from (its student for a distill stage); None when that is not known before running."""
        for _ in range(len(self.earlier) + 1):
            if spec is None:
                return None
            match = REFERENCE.match(spec.name_or_path)
            if not match:
                return spec
            producer = self.earlier.get(match.group(1))
            if producer is None or match.group(2) != "model":
                return None
            spec = getattr(producer, "student", None) if producer.type == "distill" else self.model_spec(producer)
        return None

    def processes(self, stage: StageConfig) -> int:
        """How many processes the stage's launcher starts: the recipe's `num_processes`, else its
        accelerate config file's, else 1 (a file that cannot be read is reported with the launcher)."""
        from align.launch_config import LaunchConfigError, read_launch_config

        launcher = stage.launcher or self.header.launcher
        if launcher.type != "accelerate":
            return 1
        try:
            return read_launch_config(launcher, self.base_dir, strict=False).num_processes
        except LaunchConfigError:
            return launcher.num_processes or 1

    # ---- data -------------------------------------------------------------------------------------

    def dataset_columns(self, spec: DataSpec, rel_path: KeyPath) -> set[str] | None:
        """Columns of a dataset, or None when they cannot be known before running (hub datasets)."""
        from align import data

        ref = REFERENCE.match(spec.path)
        if ref:
            columns = self.earlier_columns.get(ref.group(1))
            return _renamed(columns, spec.columns) if columns is not None else None
        for message in data.spec_problems(spec, self.base_dir if self.check_files else None):
            self.error((*rel_path, *message[0]), message[1])
        if not self.check_files:
            return None
        try:
            columns = data.probe_columns(spec, self.base_dir)
        except data.DataError as err:
            self.error((*rel_path, "path"), str(err))
            return None
        if columns is None:
            return None
        # Broken records among the first rows (not JSON, not UTF-8, …) whatever the stage reads.
        self._row_problems(spec, rel_path, data.first_row_problems(spec, self.base_dir))
        return _renamed(columns, spec.columns)

    def check_rows(self, spec: DataSpec | None, rel_path: KeyPath, need: Needs) -> None:
        """The first rows hold what the stage needs (`need`: the same check `load_dataset` runs on every
        row the stage uses): a null prompt in row 0 fails here, not in a trainer."""
        from align import data

        if spec is None or not self.check_files or REFERENCE.match(spec.path):
            return
        try:
            problems = data.first_row_problems(spec, self.base_dir, need)
        except data.DataError:
            return  # dataset_columns reports what keeps the file from being read
        self._row_problems(spec, rel_path, problems)

    def _row_problems(self, spec: DataSpec, rel_path: KeyPath, problems: list[str] | None) -> None:
        for problem in problems or ():
            if spec.on_bad_rows == "skip":
                self.notices.append(f"{problem} (on_bad_rows: skip: such rows are dropped and counted)")
            else:
                self.error((*rel_path, "path"), f"{problem} (or set on_bad_rows: skip to drop such rows)")

    def require_columns(self, spec: DataSpec, rel_path: KeyPath, needed: dict[str, str]) -> None:
        """`needed` maps column → why it is needed; reports the ones the data lacks."""
        columns = self.dataset_columns(spec, rel_path)
        if columns is None:
            return
        for column, why in needed.items():
            if column not in columns:
                self.error(
                    (*rel_path, "path"),
                    f"dataset '{spec.path}' has no column '{column}' ({why}); it has: {', '.join(sorted(columns))}",
                )

    def check_preference_data(self, spec: DataSpec | None, rel_path: KeyPath, ranking_column: str = "ranking") -> None:
        """The dataset holds preference pairs (chosen/rejected) or rankings (prompt + a best-first list),
        and its first rows are usable as such."""
        from align.data import preference_layout_problem, preference_needs

        if spec is None:
            return
        columns = self.dataset_columns(spec, rel_path)
        if columns is not None and (problem := preference_layout_problem(columns, spec.path, ranking_column)):
            self.error((*rel_path, "path"), problem)
        self.check_rows(spec, rel_path, preference_needs(ranking_column))

    # ---- rewards ----------------------------------------------------------------------------------

    def rule_columns(self, rewards: list[RewardSpec]) -> dict[str, str]:
        """Dataset columns the rules read, column → why (rules that do not resolve are left out)."""
        from align.rewards import reward_columns

        return reward_columns(rewards, self.base_dir)

    def check_rewards(self, rewards: list[RewardSpec], dataset: DataSpec | None, rel_path: KeyPath = ("rewards",)) -> None:
        """Each rule resolves, its parameters fit its signature, and the dataset has its columns."""
        from align.rewards import RuleResolutionError, resolve_rule, rule_param_problems

        for i, spec in enumerate(rewards):
            try:
                fn = resolve_rule(spec.rule, self.base_dir)
            except RuleResolutionError as err:
                self.error((*rel_path, i, "rule"), str(err))
                continue
            for _, message in rule_param_problems(fn, spec.params):  # the message names the parameter
                self.error((*rel_path, i, "params"), f"reward rule '{spec.rule}': {message}")
        names = [spec.display_name for spec in rewards]
        for name in sorted({n for n in names if names.count(n) > 1}):
            self.error(rel_path, f"reward name '{name}' is used {names.count(name)} times; give each a distinct `name`")
        needed = self.rule_columns(rewards)
        if dataset is not None and needed:
            self.require_columns(dataset, ("dataset",), needed)

    # ---- models -----------------------------------------------------------------------------------

    def check_model(self, spec: ModelSpec | None, rel_path: KeyPath) -> None:
        """A model field other than the stage's `model` (reward_model, teacher, …) can be loaded."""
        from align.models import model_spec_problem

        if spec is None or not self.check_models or REFERENCE.match(spec.name_or_path):
            return
        if problem := model_spec_problem(spec, self.base_dir):
            self.error((*rel_path, "name_or_path"), problem)

    def check_context(self, spec: ModelSpec | None, config: StageConfig, keys: tuple[str, ...]) -> None:
        """The token lengths the recipe sets at `keys` (prompt + completion, or a max_length), summed,
        must fit the context of the model `spec` starts from; reported at the last key. Defaults are
        left alone: they are TRL's generic truncation limits, not a length anyone asked for."""
        from align.models import context_length

        asked = {key: getattr(config, key) for key in keys if key in config.model_fields_set and getattr(config, key)}
        origin = self.origin_model(spec)
        if not asked or origin is None or not self.check_models:
            return
        limit = context_length(origin, self.base_dir)
        if limit is None:
            self.notices.append(f"{origin.name_or_path}: context length not checked (no config.json readable offline)")
            return
        total = sum(asked.values())
        if total > limit:
            spelled = " + ".join(f"{k} ({v})" for k, v in asked.items())
            self.error((list(asked)[-1],), f"{spelled} = {total} tokens exceeds the context of {origin.name_or_path}: "
                       f"max_position_embeddings is {limit}")

    def check_lora(self, lora: LoraSpec | None, rel_path: KeyPath = ("lora",)) -> None:
        if lora is not None and lora.load_in_4bit and self.check_models and importlib.util.find_spec("bitsandbytes") is None:
            self.error((*rel_path, "load_in_4bit"), "QLoRA needs the 'bitsandbytes' package (and a GPU)")

    def check_sampling(self, knobs: SamplingKnobs, samples_per_prompt: int, count_key: str) -> None:
        """The shared sampler settings: several samples need temperature > 0; vLLM must be installed."""
        if knobs.temperature == 0.0 and samples_per_prompt > 1:
            self.error((count_key,), "greedy decoding (temperature 0) gives one distinct sample; set temperature > 0")
        self.check_vllm(knobs.use_vllm)

    def check_vllm(self, use_vllm: bool) -> None:
        if use_vllm and self.check_models and importlib.util.find_spec("vllm") is None:
            self.error(("use_vllm",), "vLLM is not installed (pip install 'align[vllm]'); set use_vllm: false to use HF generate")


def _renamed(columns: set[str], renames: dict[str, str]) -> set[str]:
    return {renames.get(c, c) for c in columns}
