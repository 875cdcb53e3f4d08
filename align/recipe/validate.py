"""Load a recipe, apply overrides and validate it whole — types, values, references, data, rules,
models and launchers — before anything is trained. All problems are reported together."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from align.launch import launcher_problems
from align.models import model_spec_problem
from align.recipe.checks import CheckContext
from align.recipe.errors import KeyPath, Problem, RecipeError, did_you_mean
from align.recipe.loader import LocatedYAML, load_yaml_file, parse_yaml
from align.recipe.overrides import apply_overrides
from align.recipe.schema import REFERENCE, REFERENCE_ANYWHERE, ModelSpec, RecipeHeader, StageConfig
from align.recipe.trl_fields import field_adapter, trl_config_fields
from align.stages import STAGE_TYPES, stage_module
from align.tracking import report_to_problems


@dataclass
class Recipe:
    """A validated recipe: the header, typed stage configs, and the resolved plain data."""

    source: str
    header: RecipeHeader
    stages: list[StageConfig]
    data: dict[str, Any]
    base_dir: Path
    #: What validation could not check, for the user to know (one line each).
    notices: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.header.name

    def stage(self, name: str) -> StageConfig:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def default_run_dir(self) -> Path:
        return Path(self.header.run_dir) if self.header.run_dir else Path("runs") / self.header.name


def _pydantic_problems(err: ValidationError, prefix: KeyPath, model: type[BaseModel] | None) -> Iterator[tuple[KeyPath, str]]:
    for item in err.errors(include_url=False):
        loc = tuple(part for part in item["loc"] if not (isinstance(part, str) and part.startswith("function-")))
        path = (*prefix, *loc)
        kind = item["type"]
        if kind == "extra_forbidden":
            key = str(loc[-1])
            fields = _fields_at(model, loc[:-1]) if model else []
            yield path, f"unknown key '{key}'{did_you_mean(key, fields)}"
        elif kind == "missing":
            yield path, "required key is missing"
        else:
            got = item.get("input")
            shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
            yield path, f"{item['msg']} (got {shown})"


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the nested model at `loc`, for "did you mean" hints."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        info = current.model_fields.get(part)
        if info is None:
            return []
        current = _model_in(info.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _split_trl_keys(
    config_cls: type[StageConfig], raw: dict[str, Any], prefix: KeyPath
) -> tuple[dict[str, Any], dict[str, Any], list[tuple[KeyPath, str]]]:
    """Separate a stage's own keys from keys passed through to its TRL config, checking the latter."""
    own_fields = set(config_cls.model_fields)
    if config_cls.trl_config_class is None:
        return raw, {}, []
    trl_fields = trl_config_fields(config_cls.trl_config_class)
    own: dict[str, Any] = {}
    passthrough: dict[str, Any] = {}
    problems: list[tuple[KeyPath, str]] = []
    for key, value in raw.items():
        if key in own_fields:
            own[key] = value
        elif key in config_cls.reserved_trl_keys:
            problems.append(((*prefix, key), f"'{key}' is set by align from the run directory; remove it"))
        elif key in trl_fields:
            adapter = field_adapter(trl_fields[key])
            if adapter is not None:
                try:
                    value = adapter.validate_python(value)
                except ValidationError as err:
                    msg = err.errors(include_url=False)[0]["msg"]
                    problems.append(((*prefix, key), f"{msg} (got {value!r}; {config_cls.trl_config_class} expects {trl_fields[key]})"))
                    continue
            passthrough[key] = value
        else:
            hint = did_you_mean(key, own_fields | set(trl_fields))
            problems.append(((*prefix, key), f"unknown key '{key}'{hint}"))
    return own, passthrough, problems


def _walk_strings(value: Any, path: KeyPath) -> Iterator[tuple[KeyPath, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk_strings(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk_strings(item, (*path, i))


def _check_references(raw_stages: list[Any], typed: dict[str, StageConfig], located: LocatedYAML) -> list[Problem]:
    problems: list[Problem] = []
    order = {stage["name"]: i for i, stage in enumerate(raw_stages) if isinstance(stage, dict) and isinstance(stage.get("name"), str)}
    for i, stage in enumerate(raw_stages):
        if not isinstance(stage, dict):
            continue
        for path, text in _walk_strings(stage, ("stages", i)):
            if not REFERENCE_ANYWHERE.search(text):
                continue
            line = located.line_of(path)
            match = REFERENCE.match(text)
            if not match:
                problems.append(Problem(path, f"bad reference '{text}': write the whole value as ${{stages.NAME.ARTIFACT}}", line))
                continue
            target, artifact = match.groups()
            if target not in order:
                hint = did_you_mean(target, [n for n in order if isinstance(n, str)])
                problems.append(Problem(path, f"reference to unknown stage '{target}'{hint}", line))
            elif order[target] >= i:
                problems.append(Problem(path, f"stage '{target}' does not run before this stage; only earlier stages can be referenced", line))
            elif target in typed:
                produced = stage_module(typed[target].type).ARTIFACTS
                if artifact not in produced:
                    choices = ", ".join(sorted(produced)) or "nothing"
                    problems.append(Problem(path, f"stage '{target}' ({typed[target].type}) has no artifact '{artifact}'; it writes: {choices}", line))
    return problems


def validate_data(
    located: LocatedYAML, base_dir: Path, *, check_files: bool = True, check_models: bool = True
) -> Recipe:
    """Validate already-loaded recipe data; raise RecipeError with every problem found."""
    source = located.source
    data = located.data
    problems: list[Problem] = []

    def add(path: KeyPath, message: str) -> None:
        problems.append(Problem(path, message, located.line_of(path)))

    header: RecipeHeader | None = None
    try:
        header = RecipeHeader.model_validate(data)
    except ValidationError as err:
        for path, message in _pydantic_problems(err, (), RecipeHeader):
            add(path, message)

    raw_stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    typed: dict[str, StageConfig] = {}
    notices: list[str] = []
    written_columns: dict[str, set[str] | None] = {}
    seen: set[str] = set()
    for i, raw in enumerate(raw_stages):
        prefix: KeyPath = ("stages", i)
        if not isinstance(raw, dict):
            add(prefix, f"a stage must be a mapping with 'name' and 'type', got {type(raw).__name__}")
            continue
        name = raw.get("name")
        if isinstance(name, str) and name in seen:
            add((*prefix, "name"), f"duplicate stage name '{name}'")
        if isinstance(name, str):
            seen.add(name)
        stage_type = raw.get("type")
        if not isinstance(stage_type, str) or stage_type not in STAGE_TYPES:
            hint = did_you_mean(str(stage_type), STAGE_TYPES)
            expected = ", ".join(STAGE_TYPES)
            add((*prefix, "type"), f"unknown stage type {stage_type!r}{hint}; expected one of: {expected}")
            continue
        config_cls = stage_module(stage_type).Config
        own, passthrough, trl_problems = _split_trl_keys(config_cls, raw, prefix)
        for path, message in trl_problems:
            add(path, message)
        try:
            stage_cfg = config_cls.model_validate({**own, **passthrough})
        except ValidationError as err:
            for path, message in _pydantic_problems(err, prefix, config_cls):
                add(path, message)
            continue
        if header is not None and not trl_problems:
            ctx = CheckContext(located, base_dir, i, header, dict(typed), dict(written_columns), check_files, check_models)
            ctx.check_model(stage_cfg.model, ("model",))
            stage_module(stage_type).check(stage_cfg, ctx)
            problems.extend(ctx.problems)
            notices.extend(ctx.notices)
        for message in report_to_problems(getattr(stage_cfg, "report_to", None)):
            add((*prefix, "report_to"), message)
        if isinstance(name, str):
            typed[name] = stage_cfg
            written_columns[name] = stage_module(stage_type).output_columns(stage_cfg)

    problems.extend(_check_references(raw_stages, typed, located))
    if header is not None:
        for message in report_to_problems(header.report_to):
            add(("report_to",), message)
        problems.extend(_check_launcher(header.launcher, ("launcher",), base_dir, located))
        for i, stage in enumerate(typed.values()):
            # Each stage against the launch it gets (precision, DeepSpeed batch); the config file's own
            # problems come out identical for every stage that shares it and are listed once.
            own = stage.launcher is not None
            path: KeyPath = ("stages", i, "launcher") if own else ("launcher",)
            problems.extend(_check_launcher(stage.launcher or header.launcher, path, base_dir, located, stage))
        if check_models:
            problems.extend(_model_problems(header.model, ("model",), base_dir, located))

    if problems:
        unique = list(dict.fromkeys(problems))
        raise RecipeError(source, sorted(unique, key=lambda p: (p.line or 0)))
    assert header is not None
    return Recipe(source, header, list(typed.values()), data, base_dir, list(dict.fromkeys(notices)))


def _model_problems(spec: ModelSpec, path: KeyPath, base_dir: Path, located: LocatedYAML) -> list[Problem]:
    message = model_spec_problem(spec, base_dir)
    return [Problem((*path, "name_or_path"), message, located.line_of(path))] if message else []


def _check_launcher(spec: Any, path: KeyPath, base_dir: Path, located: LocatedYAML, stage: StageConfig | None = None) -> list[Problem]:
    return [Problem((*path, *rel), msg, located.line_of((*path, *rel))) for rel, msg in launcher_problems(spec, base_dir, stage)]


def load_recipe(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    check_files: bool = True,
    check_models: bool = True,
) -> Recipe:
    """Read, override and validate a recipe file. Raises RecipeError listing every problem."""
    located = load_yaml_file(path)
    problems = apply_overrides(located.data, list(overrides))
    if problems:
        raise RecipeError(located.source, problems)
    return validate_data(located, Path(path).resolve().parent, check_files=check_files, check_models=check_models)


def load_recipe_text(text: str, source: str = "<recipe>", base_dir: Path | None = None, **kwargs: Any) -> Recipe:
    """Validate recipe text that is not in a file (`base_dir`: where its relative paths start; default the cwd)."""
    located = parse_yaml(text, source)
    return validate_data(located, base_dir or Path.cwd(), **kwargs)
