"""Reward rules for a recipe: find them, read what they need, check their parameters, call them safely.

A rule is a plain function with TRL's reward signature (see ``reward_rules``):
``f(completions, <dataset columns>, *, <recipe parameters>, **kwargs) -> list[float | None]``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import math
import re
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.paths import RULE_FILE, resolve_user_path
from align.recipe.schema import RULE_FAILURE_MIN_SAMPLES

if TYPE_CHECKING:
    from align.data import Needs
    from align.precision import Precision
    from align.recipe.schema import ModelSpec, RewardSpec

__all__ = [
    "ENTRY_POINT_GROUP",
    "REQUIRED",
    "REWARD_MODEL",
    "TRL_KWARGS",
    "BoundRule",
    "RewardModelReward",
    "RewardTerm",
    "RuleFailureError",
    "RuleResolutionError",
    "RuleSignature",
    "RuleStats",
    "Scorer",
    "Scores",
    "bind_rule",
    "prompt_needs",
    "reward_columns",
    "check_rule_params",
    "rule_param_problems",
    "coerce_params",
    "describe_rules",
    "resolve_rule",
    "rule_signature",
    "score_with_reward_model",
    "try_rule",
    "weighted_total",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "align.reward_rules"
# What TRL itself passes to reward functions: never dataset columns or recipe parameters.
TRL_KWARGS = frozenset(
    {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}
)
REQUIRED: Any = inspect.Parameter.empty
"""Default recorded in ``RuleSignature.params`` for a keyword-only parameter without a default."""

RewardFunction = Callable[..., list[float | None]]


class RuleResolutionError(ValueError):
    """A rule named in a recipe cannot be found, imported or called."""


# --------------------------------------------------------------------------------------------
# Resolving
# --------------------------------------------------------------------------------------------

_file_modules: dict[tuple[str, int], Any] = {}
_file_lock = threading.Lock()


def _builtin_rules() -> dict[str, RewardFunction]:
    from reward_rules import RULES

    return RULES


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


#: Words that say what a rule scores, by kind (the kinds of `reward_rules.RULE_KINDS`).
KIND_WORDS: dict[str, frozenset[str]] = {
    "math": frozenset({"accuracy", "acc", "math", "answer", "correct", "correctness", "verify", "boxed", "equation"}),
    "format": frozenset({"format", "tag", "tags", "structure", "xml", "template"}),
    "code": frozenset({"code", "python", "program", "programming", "test", "tests", "unit", "exec", "sandbox"}),
    "length": frozenset({"length", "len", "overlong", "long", "short", "cosine", "tokens"}),
    "repetition": frozenset({"repetition", "repeat", "repeated", "ngram", "ngrams", "duplicate"}),
    "language": frozenset({"language", "lang", "script", "consistency", "multilingual"}),
    "reasoning": frozenset({"reasoning", "steps", "step", "thinking"}),
}


def name_kinds(name: str) -> frozenset[str]:
    """The kinds a rule name's words point at (`code_format` → code and format)."""
    words = set(re.split(r"[^a-z]+", name.lower()))
    return frozenset(kind for kind, vocabulary in KIND_WORDS.items() if words & vocabulary)


def rule_kinds(name: str) -> frozenset[str]:
    """What a known rule scores: a built-in's declared kinds, else what its name says."""
    from reward_rules import RULE_KINDS

    return RULE_KINDS.get(name) or name_kinds(name)


def _did_you_mean_rule(name: str, candidates: Sequence[str]) -> str:
    """A "did you mean" that only offers rules scoring the same things: a name that says what it
    scores (`code_format`: code and format) is only matched to rules that score all of that, never
    to a lookalike that scores something else (`format`). A name whose words say nothing (a typo,
    `acuracy`) is matched by spelling alone."""
    wanted = name_kinds(name)
    if not wanted:
        return _did_you_mean(name, candidates)
    # Kind already narrows the field, so spelling may be looser (`format_code` → `code_format`).
    return _did_you_mean(name, [c for c in candidates if wanted <= rule_kinds(c)], cutoff=0.5)


def _did_you_mean(name: str, candidates: Sequence[str], cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=cutoff)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def _get_attr_path(obj: Any, attr_path: str, where: str) -> Any:
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            raise RuleResolutionError(f"{where} has no attribute {part!r}.{_did_you_mean(part, public)}")
        obj = getattr(obj, part)
    return obj


def _load_file(path_text: str, base_dir: Path | None) -> Any:
    path = resolve_user_path(path_text, base_dir or Path.cwd()).resolve()
    if not path.is_file():
        raise RuleResolutionError(
            f"rule file {path_text!r} does not exist (a relative path is looked up from the current "
            "directory, then beside the recipe)"
        )
    key = (str(path), path.stat().st_mtime_ns)
    with _file_lock:
        if key in _file_modules:
            return _file_modules[key]
        # A unique, importable module name: dataclasses and pickling look the module up in sys.modules.
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
        stem = re.sub(r"\W", "_", path.stem)
        module_name = f"align_rule_file_{stem}_{digest}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise RuleResolutionError(f"cannot import {str(path)!r} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            sys.modules.pop(module_name, None)
            raise RuleResolutionError(f"importing rule file {str(path)!r} failed: {error!r}") from error
        _file_modules[key] = module
        return module


def _import_dotted(spec: str) -> Any:
    if ":" in spec:
        module_name, attr_path = spec.split(":", 1)
        candidates = [(module_name, attr_path)]
    else:
        parts = spec.split(".")
        # "pkg.mod.Class.method": try the longest importable module prefix first.
        candidates = [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)]
    last_error: Exception | None = None
    for module_name, attr_path in candidates:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            # Only "this prefix is not a module" moves on; a module that fails inside is an error.
            if error.name is not None and (
                module_name == error.name or module_name.startswith(error.name + ".")
            ):
                last_error = error
                continue
            raise RuleResolutionError(
                f"importing {module_name!r} for rule {spec!r} failed: {error!r}"
            ) from error
        except Exception as error:
            raise RuleResolutionError(
                f"importing {module_name!r} for rule {spec!r} failed: {error!r}"
            ) from error
        if not attr_path:
            raise RuleResolutionError(f"rule {spec!r} names a module, not a function (use 'module:function')")
        return _get_attr_path(module, attr_path, f"module {module_name!r}")
    raise RuleResolutionError(f"cannot import a module for rule {spec!r}: {last_error}")


def _check_callable(obj: Any, spec: str) -> RewardFunction:
    if inspect.isclass(obj) or not callable(obj):
        kind = "a class" if inspect.isclass(obj) else f"a {type(obj).__name__}"
        raise RuleResolutionError(
            f"rule {spec!r} is {kind}, not a reward function f(completions, **kwargs) -> list[float | None]"
        )
    try:
        parameters = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return obj  # builtins without a signature: trust them
    takes_completions = "completions" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )
    if not takes_completions:
        # TRL passes everything by keyword, completions=... included.
        raise RuleResolutionError(
            f"rule {spec!r} must take a parameter named 'completions' (TRL passes it by name)"
        )
    return obj


def resolve_rule(spec: str, base_dir: Path | None = None) -> RewardFunction:
    """Find the reward function a recipe names.

    ``spec`` is one of: a built-in rule name (``accuracy``); a dotted import path
    (``pkg.mod:func`` or ``pkg.mod.func``); a Python file and function (``rules/mine.py:func``,
    relative to ``base_dir``, the recipe's folder); or the name of an entry point in the
    ``align.reward_rules`` group of an installed package. Built-in names win over entry points.
    Raises ``RuleResolutionError`` (a ValueError) with a "did you mean" for near-miss names.
    """
    spec = spec.strip()
    if not spec:
        raise RuleResolutionError("empty reward rule name")
    builtin = _builtin_rules()
    if spec in builtin:
        return builtin[spec]

    file_match = RULE_FILE.match(spec)
    if file_match:
        if not file_match.group("attr"):
            raise RuleResolutionError(f"rule {spec!r}: name the function too, as 'path/to/file.py:function'")
        module = _load_file(file_match.group("path"), base_dir)
        obj = _get_attr_path(module, file_match.group("attr"), f"rule file {file_match.group('path')!r}")
        return _check_callable(obj, spec)

    if ":" in spec or "." in spec:
        return _check_callable(_import_dotted(spec), spec)

    entry_points = _entry_points()
    if spec in entry_points:
        try:
            obj = entry_points[spec].load()
        except Exception as error:
            raise RuleResolutionError(
                f"loading entry point {spec!r} ({entry_points[spec].value}) failed: {error!r}"
            ) from error
        return _check_callable(obj, spec)

    from align.recipe.aliases import UNSUPPORTED_RULES

    if spec in UNSUPPORTED_RULES:
        raise RuleResolutionError(
            f"{UNSUPPORTED_RULES[spec]}; align has no such rule. Give your own as 'path/to/file.py:function' "
            "(TRL's reward signature), or use 'code' for Python programs checked on stdin/stdout tests."
        )
    known = sorted(set(builtin) | set(entry_points))
    raise RuleResolutionError(
        f"unknown reward rule {spec!r}.{_did_you_mean_rule(spec, known)} Known rules: {', '.join(known)}; "
        "or give 'pkg.module:function' or 'path/to/file.py:function'."
    )


# --------------------------------------------------------------------------------------------
# Signatures and parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleSignature:
    """What a rule needs: dataset columns, and the parameters a recipe may set.

    ``columns``: required dataset columns (positional-or-keyword parameters after ``completions``
    without defaults). ``optional_columns``: the same with defaults. ``params``: keyword-only
    parameters, name → (annotation, default), default ``REQUIRED`` when there is none.
    ``accepts_kwargs``: whether the rule takes ``**kwargs`` (TRL's extra keywords).
    """

    columns: tuple[str, ...]
    params: dict[str, tuple[Any, Any]]
    optional_columns: tuple[str, ...] = ()
    accepts_kwargs: bool = True


def _call_target(fn: Any) -> Any:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if isinstance(fn, BoundRule):
        return _call_target(fn.fn)
    if inspect.isfunction(fn) or inspect.ismethod(fn):
        return fn
    return type(fn).__call__


def _type_hints(fn: Any) -> dict[str, Any]:
    target = _call_target(fn)
    try:
        return typing.get_type_hints(target, include_extras=True)  # extras: the bounds a rule declares
    except Exception:
        pass
    # One unresolvable forward reference makes get_type_hints give up on all of them: resolve
    # annotation by annotation instead, leaving the ones that fail unchecked (Any).
    hints: dict[str, Any] = {}
    namespace = getattr(target, "__globals__", {})
    for name, annotation in getattr(target, "__annotations__", {}).items():
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, dict(namespace))  # noqa: S307 - the rule's own annotation
            except Exception:
                annotation = Any
        hints[name] = annotation
    return hints


def rule_signature(fn: Callable[..., Any]) -> RuleSignature:
    """Read a rule's dataset columns and recipe parameters from its Python signature."""
    target = fn.fn if isinstance(fn, BoundRule) else fn
    signature = inspect.signature(target)
    hints = _type_hints(target)
    columns: list[str] = []
    optional: list[str] = []
    params: dict[str, tuple[Any, Any]] = {}
    accepts_kwargs = False
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            accepts_kwargs = True
            continue
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL or name in TRL_KWARGS:
            continue
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
            annotation = hints.get(name, parameter.annotation)
            params[name] = (Any if annotation is inspect.Parameter.empty else annotation, parameter.default)
        elif parameter.default is inspect.Parameter.empty:
            columns.append(name)
        else:
            optional.append(name)
    return RuleSignature(tuple(columns), params, tuple(optional), accepts_kwargs)


_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))


def type_name(annotation: Any) -> str:
    """Readable name of an annotation: ``float``, ``int | None``, ``Literal['en', 'zh']``, and for a
    constrained one its bounds: ``float ≤ 0``, ``int ≥ 1``, ``non-empty str``."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return "any"
    if typing.get_origin(annotation) is typing.Annotated:
        base, *metadata = typing.get_args(annotation)
        found = {key: getattr(m, key) for m in metadata for key, _ in _BOUNDS if getattr(m, key, None) is not None}
        name = type_name(base)
        low, high = [k for k in ("gt", "ge") if k in found], [k for k in ("lt", "le") if k in found]
        if low and high:  # an interval: float in [0.0, 1.0)
            return (f"{name} in {'[' if low[0] == 'ge' else '('}{found[low[0]]}, "
                    f"{found[high[0]]}{']' if high[0] == 'le' else ')'}")
        return " ".join([name, *(f"{sign} {found[key]}" for key, sign in _BOUNDS if key in found)])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in typing.get_args(annotation))
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _validate(annotation: Any, value: Any, name: str | None = None) -> str | None:
    """None when ``value`` fits ``annotation``: its type in pydantic strict mode ("3" is not an int,
    1 is not a bool, 3 is a fine float) and its bounds."""
    from reward_rules._params import value_problem

    return value_problem(annotation, value, name)


def rule_param_problems(fn: Callable[..., Any], params: Mapping[str, Any]) -> list[tuple[str | None, str]]:
    """Problems with the parameters a recipe gives a rule, as (parameter or None, sentence); empty
    when all is fine.

    Reports unknown names (with "did you mean"), dataset columns given as parameters, values that
    do not fit the annotation (type, in pydantic strict mode, and the bounds the rule declares in it:
    ``max_penalty ≤ 0``), missing parameters that have no default, and — once every value fits on
    its own — the relations between parameters the rule declares with ``@checks``
    (``overlong_buffer < max_completion_length``). These are the rule's own checks, the ones a call
    runs: what validates here does not fail on every sample in training.
    """
    from reward_rules._params import relation_problems

    signature = rule_signature(fn)
    problems: list[tuple[str | None, str]] = []
    for key, value in params.items():
        if key not in signature.params:
            if key in signature.columns or key in signature.optional_columns:
                problems.append((key, f"{key!r} is a dataset column this rule reads, not a parameter"))
                continue
            known = ", ".join(sorted(signature.params)) or "none"
            problems.append(
                (key, f"unknown parameter {key!r}.{_did_you_mean(key, list(signature.params))} Known parameters: {known}")
            )
            continue
        annotation, _ = signature.params[key]
        error = _validate(annotation, value, key)
        if error is not None:
            problems.append((key, f"parameter {key!r} must be {type_name(annotation)}, got {value!r}: {error}"))
    for key, (annotation, default) in signature.params.items():
        if default is REQUIRED and key not in params:
            problems.append((None, f"missing required parameter {key!r} ({type_name(annotation)})"))
    if not problems:
        target = fn.fn if isinstance(fn, BoundRule) else fn
        problems.extend(relation_problems(target, params))
    return problems


def check_rule_params(fn: Callable[..., Any], params: Mapping[str, Any]) -> list[str]:
    """The sentences of `rule_param_problems`."""
    return [message for _, message in rule_param_problems(fn, params)]


def coerce_params(fn: Callable[..., Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """Turn command-line strings into typed values where the annotation asks for it.

    A string value that does not fit its parameter's annotation is read as YAML ("0.5" → 0.5,
    "true" → True, "[1, 2]" → a list) and kept when that fits. Values that fit neither way are
    returned unchanged, for ``check_rule_params`` to report.
    """
    import yaml

    signature = rule_signature(fn)
    coerced: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, str) and key in signature.params:
            annotation = signature.params[key][0]
            if _validate(annotation, value) is not None:
                try:
                    parsed = yaml.safe_load(value)
                except yaml.YAMLError:
                    parsed = value
                if _validate(annotation, parsed) is None:
                    value = parsed
        coerced[key] = value
    return coerced


# --------------------------------------------------------------------------------------------
# Safe calling
# --------------------------------------------------------------------------------------------


@dataclass
class RuleStats:
    """What went wrong while calling a bound rule, for a stage to log."""

    calls: int = 0
    samples: int = 0
    batch_failures: int = 0  # calls whose whole-batch attempt raised (then retried sample by sample)
    sample_failures: int = 0  # samples that raised on their own, scored None
    invalid_outputs: int = 0  # outputs of the wrong length or type (treated as a raise)
    non_finite: int = 0  # samples scored NaN or ±inf, scored None instead
    timeouts: int = 0  # calls (or per-sample retries) cut off by the wall-clock timeout
    timed_out_samples: int = 0  # samples those cut off, scored None
    none_samples: int = 0  # all None rewards handed to TRL, whatever the reason
    last_error: str | None = None

    @property
    def failed_samples(self) -> int:
        """Samples scored None because the rule failed on them: raised, timed out, or not a finite number."""
        return self.sample_failures + self.non_finite + self.timed_out_samples

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failed_samples": self.failed_samples}


class RuleTimeout(TimeoutError):
    """A rule call ran past the bound wall-clock timeout."""


class RuleFailureError(RuntimeError):
    """A rule failed on more than its stage's `max_rule_failure_rate` share of the samples it scored."""


class _InvalidOutput(TypeError):
    pass


def _as_reward(value: Any) -> float | None:
    """A rule's output for one sample as a float (NaN and ±inf kept: the caller counts them), None
    as None; anything else is an invalid output."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raise _InvalidOutput(f"reward {value!r:.60} is not a number or None")
    try:
        return float(value)  # also numpy and torch scalars
    except (TypeError, ValueError, OverflowError) as error:
        raise _InvalidOutput(f"reward {value!r:.60} is not a number or None") from error


class BoundRule:
    """A rule with its recipe parameters bound, callable exactly like a TRL reward function.

    ``__name__`` is the name TRL logs the reward under. A call that raises on the batch is retried
    sample by sample; a sample that still raises (or returns something that is not a number) scores
    None and is counted in ``stats``, and so does a sample scored NaN or ±inf: neither reaches a loss.
    With ``timeout_s`` each call runs in a worker thread and gives None for every sample when it
    runs over, each counted as failed (the thread cannot be killed and finishes in the background;
    the ``code`` rule has its own per-process timeout).

    With ``max_failure_rate``, a call after which more than that share of all the samples the rule
    has scored failed raises ``RuleFailureError`` (naming the rule and its last error), once at
    least ``min_samples`` were scored: a rule that is broken stops the stage instead of training on
    silently, and one unlucky first batch does not.
    """

    def __init__(
        self,
        fn: RewardFunction,
        params: Mapping[str, Any],
        name: str,
        *,
        timeout_s: float | None = None,
        max_failure_rate: float | None = None,
        min_samples: int = RULE_FAILURE_MIN_SAMPLES,
    ) -> None:
        self.fn = fn
        self.params = dict(params)
        self.__name__ = name
        self.__qualname__ = name
        self.__doc__ = getattr(fn, "__doc__", None)
        self.timeout_s = timeout_s
        self.max_failure_rate = max_failure_rate
        self.min_samples = min_samples
        self.stats = RuleStats()
        signature = rule_signature(fn)
        # A rule without **kwargs would crash on TRL's extra keywords: hand it only what it declares.
        self._accepted: frozenset[str] | None = (
            None if signature.accepts_kwargs else frozenset(inspect.signature(fn).parameters)
        )
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"BoundRule({self.__name__!r}, fn={getattr(self.fn, '__name__', self.fn)!r}, params={self.params!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def failures(self) -> int:
        """Samples that got None because the rule failed on them (not None the rule chose)."""
        return self.stats.failed_samples

    def _kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        merged = {**kwargs, **self.params}  # a recipe parameter wins over a same-named column
        if self._accepted is not None:
            merged = {k: v for k, v in merged.items() if k in self._accepted}
        return merged

    def _invoke(
        self, completions: Sequence[Any], kwargs: dict[str, Any], timeout: float | None
    ) -> list[float | None]:
        """The rule's rewards for `completions`, each a float (possibly not finite) or None; raises
        when the call raises, runs over `timeout` or returns something other than one number or None
        per completion."""
        if timeout is None:
            output = self.fn(completions, **kwargs)
        else:
            box: dict[str, Any] = {}

            def target() -> None:
                try:
                    box["output"] = self.fn(completions, **kwargs)
                except BaseException as error:  # handed back to the calling thread
                    box["error"] = error

            worker = threading.Thread(target=target, name=f"reward-{self.__name__}", daemon=True)
            worker.start()
            worker.join(max(timeout, 0.0))
            if worker.is_alive():
                raise RuleTimeout(f"reward rule {self.__name__!r} ran past {timeout:g} s")
            if "error" in box:
                raise box["error"]
            output = box["output"]
        try:
            count = len(output)
        except Exception:  # no length (a generator, a number) or one that fails
            count = None
        if isinstance(output, (str, bytes, Mapping)) or count != len(completions):
            raise _InvalidOutput(
                f"reward rule {self.__name__!r} returned {type(output).__name__} "
                f"of length {'?' if count is None else count}, expected {len(completions)} rewards"
            )
        return [_as_reward(v) for v in output]

    def _note(self, error: BaseException | str, what: str) -> None:
        with self._lock:
            self.stats.last_error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
            count = self.stats.batch_failures + self.stats.sample_failures + self.stats.timeouts + self.stats.non_finite
        if count <= 3 or count % 100 == 0:
            logger.warning(
                "reward rule %r %s: %s (failure %d)", self.__name__, what, self.stats.last_error, count
            )

    def _finite(self, rewards: list[float | None], offset: int = 0) -> tuple[list[float | None], int]:
        """NaN and ±inf become None, counted as failures: a loss must never see them."""
        bad = [i for i, r in enumerate(rewards) if r is not None and not math.isfinite(r)]
        if not bad:
            return rewards, 0
        with self._lock:
            self.stats.non_finite += len(bad)
        self._note(f"returned {rewards[bad[0]]} for sample {bad[0] + offset}", f"scored {len(bad)} sample(s) NaN or ±inf")
        return [None if i in bad else r for i, r in enumerate(rewards)], len(bad)

    def __call__(self, completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        n = len(completions)
        with self._lock:
            self.stats.calls += 1
            self.stats.samples += n
        call_kwargs = self._kwargs(kwargs)
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        failed = 0
        try:
            rewards, failed = self._finite(self._invoke(completions, call_kwargs, self.timeout_s))
        except RuleTimeout as error:
            with self._lock:
                self.stats.timeouts += 1
                self.stats.timed_out_samples += n  # every sample the cut-off call would have scored
            self._note(error, "timed out on the batch")
            rewards, failed = [None] * n, n
        except Exception as error:
            with self._lock:
                self.stats.batch_failures += 1
                self.stats.invalid_outputs += isinstance(error, _InvalidOutput)
            self._note(error, "raised on the batch; retrying sample by sample")
            rewards, failed = self._per_sample(completions, kwargs, deadline)
        with self._lock:
            self.stats.none_samples += sum(r is None for r in rewards)
        log_metric = kwargs.get("log_metric")
        if failed and callable(log_metric):
            # TRL averages these per logging step; logged only for calls that had failures.
            with contextlib.suppress(Exception):  # logging must never break training
                log_metric(f"reward_errors/{self.__name__}", failed / n)
        self._judge()
        return rewards

    def _judge(self) -> None:
        """Stop the stage when the rule fails on too many of its samples (see the class docstring)."""
        limit = self.max_failure_rate
        stats = self.stats
        if limit is None or stats.samples < self.min_samples or stats.failed_samples <= limit * stats.samples:
            return
        raise RuleFailureError(
            f"reward rule '{self.__name__}' failed on {stats.failed_samples} of the {stats.samples} samples it scored "
            f"({stats.failed_samples / stats.samples:.0%}, more than max_rule_failure_rate {limit:g}); last error: "
            f"{stats.last_error}. Fix the rule (it should return a number or None for every completion), or raise "
            "the stage's max_rule_failure_rate (1 never stops)"
        )

    def _per_sample(
        self, completions: Sequence[Any], kwargs: Mapping[str, Any], deadline: float | None
    ) -> tuple[list[float | None], int]:
        n = len(completions)
        rewards: list[float | None] = []
        failed = 0
        for i in range(n):
            # Dataset columns (and TRL's per-sample lists) are lists of length n; everything else is shared.
            sliced = {
                key: value[i : i + 1] if isinstance(value, (list, tuple)) and len(value) == n else value
                for key, value in kwargs.items()
            }
            remaining = None if deadline is None else deadline - time.monotonic()
            try:
                if remaining is not None and remaining <= 0:
                    raise RuleTimeout(f"reward rule {self.__name__!r} ran out of time retrying samples")
                reward, bad = self._finite(self._invoke([completions[i]], self._kwargs(sliced), remaining), offset=i)
                rewards.append(reward[0])
                failed += bad
            except RuleTimeout as error:
                with self._lock:
                    self.stats.timeouts += 1
                    self.stats.timed_out_samples += 1
                self._note(error, f"timed out on sample {i}")
                rewards.append(None)
                failed += 1
            except Exception as error:
                with self._lock:
                    self.stats.sample_failures += 1
                    self.stats.invalid_outputs += isinstance(error, _InvalidOutput)
                self._note(error, f"raised on sample {i}")
                rewards.append(None)
                failed += 1
        return rewards, failed


def bind_rule(fn: RewardFunction, params: Mapping[str, Any], name: str, **limits: Any) -> BoundRule:
    """Bind recipe ``params`` to ``fn`` and return a safe TRL reward function named ``name``.

    See ``BoundRule``: per-sample fallback when the batch call raises, None (and a count in
    ``.stats`` / ``.failures``) for samples that fail or score NaN/±inf; ``limits`` are its
    keywords: a wall-clock ``timeout_s`` per call, and a stop (``RuleFailureError``) past
    ``max_failure_rate`` once ``min_samples`` were scored. Parameters are not checked here; run
    ``check_rule_params`` first.
    """
    return BoundRule(fn, params, name, **limits)


# --------------------------------------------------------------------------------------------
# The scorer: rules and an optional reward model, weighted (grpo, ppo, rejection_sampling)
# --------------------------------------------------------------------------------------------

#: The name a reward model's score is logged, weighted and thresholded under.
REWARD_MODEL = "reward_model"


def score_with_reward_model(
    model: Any,
    tokenizer: Any,
    prompts: list[Any],
    completions: list[str],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
) -> list[float]:
    """Scalar scores of a sequence-classification reward model for prompt + completion texts.

    Conversational prompts are rendered with the reward model's chat template as
    `[*prompt, {"role": "assistant", "content": completion}]` — the way TRL's RewardTrainer tokenised
    its training pairs, so the scores mean what they meant in training; plain-string prompts are
    concatenated with the completion and EOS.
    """
    import torch

    if not prompts:
        return []
    if isinstance(prompts[0], str):
        eos = tokenizer.eos_token or ""
        rendered = [p + t + (eos if not t.endswith(eos) else "") for p, t in zip(prompts, completions, strict=True)]
        special = True
    else:
        rendered = [
            tokenizer.apply_chat_template([*p, {"role": "assistant", "content": t}], tokenize=False)
            for p, t in zip(prompts, completions, strict=True)
        ]
        special = False
    target = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        for start in range(0, len(rendered), batch_size):
            enc = tokenizer(
                rendered[start : start + batch_size], add_special_tokens=special, padding=True,
                truncation=max_length is not None, max_length=max_length, return_tensors="pt",
            ).to(target)
            with torch.no_grad():
                scores.extend(model(**enc, use_cache=False).logits[:, 0].float().cpu().tolist())
    finally:
        model.train(was_training)
    return scores


class RewardModelReward:
    """A frozen sequence-classification reward model as a reward function with TRL's signature:
    the scalar score of prompt + completion, rendered as the `reward_model` stage trained it."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 32, max_length: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.__name__ = REWARD_MODEL
        self.failures = 0  # samples the model scored NaN or ±inf (scored None instead)

    @classmethod
    def load(cls, spec: ModelSpec, *, batch_size: int = 32, precision: Precision | None = None,
             seed: int = 0) -> RewardModelReward:  # fmt: skip
        """Load onto this process's device, frozen (in the compute dtype), with a right-padding tokenizer."""
        from align.models import device, load_sequence_classifier, load_tokenizer

        model = load_sequence_classifier(spec, precision=precision, seed=seed).requires_grad_(False).eval().to(device())
        return cls(model, load_tokenizer(spec, padding_side="right"), batch_size=batch_size)

    def __call__(self, completions: Sequence[Any], *, prompts: Sequence[Any] | None = None,
                 **kwargs: Any) -> list[float | None]:  # fmt: skip
        from align.data import message_text

        if prompts is None:
            raise ValueError("a reward model scores prompt + completion, so it needs `prompts`")
        texts = [message_text(c) for c in completions]
        scores = score_with_reward_model(self.model, self.tokenizer, list(prompts), texts, batch_size=self.batch_size,
                                         max_length=self.max_length)  # fmt: skip
        finite: list[float | None] = [s if math.isfinite(s) else None for s in scores]
        if None in finite:  # a model with broken weights: its NaN/inf must not reach a loss either
            self.failures += finite.count(None)
            logger.warning("reward model scored %d of %d samples NaN or ±inf (scored None)", finite.count(None), len(scores))
        return finite


@dataclass(frozen=True)
class RewardTerm:
    """One weighted part of a score: a bound rule or a reward model."""

    name: str
    weight: float
    fn: Any  # BoundRule | RewardModelReward: TRL's reward-function signature, with `__name__` = name


@dataclass(frozen=True)
class Scores:
    """Scores of a batch: the weighted total per sample, and each term's own score (None: no score)."""

    total: list[float]
    parts: dict[str, list[float | None]]


class Scorer:
    """Rule rewards and an optional reward model summed with weights: Σ weightᵢ·scoreᵢ, where a term
    that scores None for a sample adds nothing to it (as in TRL's GRPO). Used as is by ppo and
    rejection_sampling; grpo hands `functions` and `weights` to TRL, which sums the same way."""

    def __init__(self, terms: Sequence[RewardTerm]) -> None:
        self.terms = list(terms)

    @classmethod
    def build(
        cls,
        rewards: Sequence[RewardSpec],
        reward_model: ModelSpec | None = None,
        reward_model_weight: float = 1.0,
        *,
        base_dir: Path | None = None,
        reward_model_batch_size: int = 32,
        precision: Precision | None = None,
        seed: int = 0,
        max_rule_failure_rate: float | None = None,
        rule_failure_min_samples: int = RULE_FAILURE_MIN_SAMPLES,
    ) -> Scorer:
        """The terms of a stage: its rules (each stopping the stage past `max_rule_failure_rate`, see
        `BoundRule`) and its reward model."""
        terms = [
            RewardTerm(spec.display_name, spec.weight,
                       bind_rule(resolve_rule(spec.rule, base_dir), spec.params, spec.display_name, timeout_s=spec.timeout_s,
                                 max_failure_rate=max_rule_failure_rate, min_samples=rule_failure_min_samples))
            for spec in rewards
        ]  # fmt: skip
        if reward_model is not None:
            model = RewardModelReward.load(reward_model, batch_size=reward_model_batch_size, precision=precision, seed=seed)
            terms.append(RewardTerm(REWARD_MODEL, reward_model_weight, model))
        return cls(terms)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    @property
    def weights(self) -> dict[str, float]:
        return {t.name: t.weight for t in self.terms}

    @property
    def functions(self) -> list[Any]:
        """The terms as TRL reward functions, in order (weights: `[t.weight for t in terms]`)."""
        return [t.fn for t in self.terms]

    def __call__(self, prompts: Sequence[Any], texts: Sequence[str], *, completion_ids: Sequence[Sequence[int]],
                 columns: Mapping[str, Sequence[Any]]) -> Scores:  # fmt: skip
        """Score generated `texts` for `prompts` (one call per term for the whole batch: rules and
        reward models are far cheaper on big batches). Conversational prompts get their completions
        as assistant messages, as TRL passes them."""
        conversational = bool(prompts) and not isinstance(prompts[0], str)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else list(texts)
        parts = {
            t.name: list(t.fn(completions, prompts=list(prompts), completion_ids=list(completion_ids), **columns))
            for t in self.terms
        }
        return Scores([weighted_total({n: v[i] for n, v in parts.items()}, self.weights) for i in range(len(texts))], parts)

    def failures(self) -> dict[str, int]:
        """Samples each rule scored None because it failed on them (raised, timed out, bad output)."""
        return {t.name: t.fn.failures for t in self.terms}

    def last_errors(self) -> dict[str, str]:
        return {t.name: t.fn.stats.last_error for t in self.terms if isinstance(t.fn, BoundRule) and t.fn.stats.last_error}

    def failure_metrics(self, stage: str, earlier: Mapping[str, int] | None = None) -> dict[str, int]:
        """`<name>_failures` for every term, for the stage's metrics (plus `earlier`: the counts of the
        attempts a resumed stage continues); a warning names each term that failed and its last error."""
        last_errors = self.last_errors()
        metrics: dict[str, int] = {}
        for name, failures in self.failures().items():
            failures += (earlier or {}).get(name, 0)
            metrics[f"{name}_failures"] = failures
            if failures:
                logger.warning("%s: %s scored None on %d samples because it failed (%s)", stage, name, failures,
                               last_errors.get(name, "NaN or ±inf scores"))  # fmt: skip
        return metrics


def weighted_total(scores: Mapping[str, float | None], weights: Mapping[str, float]) -> float:
    """Σ weight·score over the terms that scored (None, and anything not finite, adds nothing, as in
    GRPO's weighted sum)."""
    return sum(weights.get(name, 0.0) * value for name, value in scores.items()
               if value is not None and math.isfinite(value))  # fmt: skip


def reward_columns(rewards: Sequence[RewardSpec], base_dir: Path | None) -> dict[str, str]:
    """Dataset columns the rules read, column → why (rules that do not resolve are left out)."""
    needed: dict[str, str] = {}
    for spec in rewards:
        try:
            fn = resolve_rule(spec.rule, base_dir)
        except RuleResolutionError:
            continue
        for column in rule_signature(fn).columns:
            needed.setdefault(column, f"reward rule '{spec.rule}' reads it")
    return needed


def prompt_needs(rewards: Sequence[RewardSpec], base_dir: Path | None) -> Needs:
    """What a stage that samples from prompts and scores with `rewards` needs of every row: the
    prompt, and each column a rule reads (see `align.data.Needs`)."""
    from align.data import PROMPT_NEEDS, column_kinds

    return PROMPT_NEEDS.plus(column_kinds(reward_columns(rewards, base_dir)))


# --------------------------------------------------------------------------------------------
# CLI support: `align rewards list` and `align rewards try`
# --------------------------------------------------------------------------------------------


def _first_line(fn: Any) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _describe(name: str, fn: Any, source: str) -> dict[str, Any]:
    signature = rule_signature(fn)
    return {
        "name": name,
        "description": _first_line(fn),
        "columns": list(signature.columns),
        "params": {
            key: {"type": type_name(annotation), "default": None if default is REQUIRED else default,
                  "required": default is REQUIRED}
            for key, (annotation, default) in signature.params.items()
        },
        "source": source,
    }  # fmt: skip


def describe_rules(include_entry_points: bool = True) -> list[dict[str, Any]]:
    """One dict per available rule: name, description (docstring's first line), columns, params, source.

    ``params`` maps each parameter to ``{"type", "default", "required"}``. ``source`` is
    "builtin" or "entry point <value>"; an entry point that fails to load is listed with its error
    as the description rather than breaking the listing.
    """
    rules = [_describe(name, fn, "builtin") for name, fn in _builtin_rules().items()]
    if include_entry_points:
        builtin = set(_builtin_rules())
        for name, entry_point in sorted(_entry_points().items()):
            if name in builtin:
                continue
            source = f"entry point {entry_point.value}"
            try:
                rules.append(_describe(name, entry_point.load(), source))
            except Exception as error:
                rules.append({"name": name, "description": f"(cannot load: {error!r})", "columns": [],
                              "params": {}, "source": source})  # fmt: skip
    return rules


def try_rule(
    name: str,
    completion: str,
    solution: str | None = None,
    params: Mapping[str, Any] | None = None,
    *,
    base_dir: Path | None = None,
) -> float | None:
    """Score one completion with one rule, for ``align rewards try``.

    ``name`` is any spec ``resolve_rule`` accepts. ``solution`` fills the rule's one required
    dataset column (``solution`` for math rules, ``test_cases`` for ``code``). String ``params``
    are converted as ``coerce_params`` does. Lengths are in characters (no token ids here).
    Unlike a bound rule, errors propagate, so the command shows what went wrong.
    """
    fn = resolve_rule(name, base_dir)
    signature = rule_signature(fn)
    typed = coerce_params(fn, params or {})
    problems = check_rule_params(fn, typed)
    if problems:
        raise ValueError(f"rule {name!r}: " + "; ".join(problems))
    columns: dict[str, Any] = {}
    if len(signature.columns) > 1:
        raise ValueError(
            f"rule {name!r} needs several dataset columns ({', '.join(signature.columns)}); "
            "only one can be given on the command line"
        )
    if signature.columns:
        if solution is None:
            raise ValueError(
                f"rule {name!r} needs the dataset column {signature.columns[0]!r}: pass --solution"
            )
        columns[signature.columns[0]] = [solution]
    output = fn([completion], **columns, **typed)
    if len(output) != 1:
        raise ValueError(f"rule {name!r} returned {len(output)} rewards for one completion")
    return _as_reward(output[0])
