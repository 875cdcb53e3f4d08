"""The run report: `report.html` (self-contained: plots inline, opens offline) and `report.md` beside
its PNG files (`report.*.png`), written into the run directory at the end of every `align run` —
finished, failed or interrupted — and by `align report RUN_DIR`.

It reads only what a run leaves: `manifest.json`, the resolved `recipe.yaml` and each stage's
`metrics.jsonl` and `stage_config.json` (from the finished folder, or from the scratch folder of a
stage that failed or is still running). Contents:

- a header: recipe, command, library versions, device, total time;
- one row per stage: status, time, steps, processes, key metrics, artifacts;
- the pipeline chart: held-out accuracy (with format, pass@k, maj@k) after every eval stage in recipe
  order, and the mean completion length beside it;
- per training stage its loss; per RL stage total and per-rule reward, KL, entropy, response length,
  clip fractions, `frac_reward_zero_std` (GRPO), value loss and explained variance (PPO); reward
  model: pairwise accuracy; rejection sampling: acceptance overall and by difficulty; distill: teacher
  vs student accuracy and size;
- a few sample completions of each RL stage with their per-rule scores (first and last logged step);
- findings worth a look: reward rising while held-out accuracy falls, entropy collapse, a rule that
  scored None often, a high share of truncated completions.

Plots are drawn with matplotlib's object API (no pyplot state, no display needed)."""

from __future__ import annotations

import base64
import html
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from align import artifacts as art
from align.recipe.schema import REFERENCE

logger = logging.getLogger("align")

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
#: Plot files are `report.<what>.png`: a dot can never be in a stage's name, so they never collide
#: with a stage's folder.
PLOT_PREFIX = "report."

#: Libraries whose versions the header shows.
VERSIONED = ("align", "torch", "transformers", "trl", "accelerate", "peft", "datasets")

# Thresholds of the findings. They flag runs worth a look; none of them stops or changes a run.
#: Held-out accuracy counts as fallen when the eval after an RL stage is this much below the one before.
ACCURACY_DROP = 0.01
#: Entropy has collapsed when its last logged value is below this share of its first …
ENTROPY_COLLAPSE_RATIO = 0.2
#: … or below this many nats per token.
ENTROPY_FLOOR = 0.05
#: A rule "scored None often" past this share of the samples it scored.
NONE_SHARE = 0.1
#: Truncation is high past this share of completions that never ended (hit the length limit).
TRUNCATION_SHARE = 0.2
#: Sample completions shown per RL stage: from its first and its last logged step.
SAMPLES_FIRST, SAMPLES_LAST = 2, 3

RL_TYPES = frozenset({"grpo", "ppo"})

#: Per stage type, the metrics its row in the stage table shows (`pass@*`: every pass@k).
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "eval": ("accuracy", "pass@*", "maj@*", "format", "mean_length", "truncated"),
    "sft": ("first_loss", "last_loss", "eval_loss"),
    "grpo": ("first_reward", "last_reward"),
    "ppo": ("first_score", "last_score", "eval_score_before", "eval_score_after"),
    "reward_model": ("last_loss", "eval_accuracy", "eval_margin"),
    "rejection_sampling": ("acceptance_rate", "num_rows", "prompts_covered"),
    "distill": ("last_loss", "trace_accuracy", "student_teacher_param_ratio"),
}
#: Metrics never shown as "key" by the fallback (bookkeeping, not results).
BOOKKEEPING = frozenset({"steps", "train_runtime_s", "s_per_step", "num_params", "num_processes", "episodes"})


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a run depends on (without importing them)."""
    found: dict[str, str] = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def at_k_keys(metrics: Iterable[Mapping[str, Any]]) -> list[str]:
    """The `pass@k` then `maj@k` keys any of `metrics` has, each in increasing k."""
    found = {k for m in metrics for k in m if k.partition("@")[0] in ("pass", "maj") and k.partition("@")[2].isdigit()}
    return sorted(found, key=lambda k: (k.startswith("maj@"), int(k.partition("@")[2])))


# ------------------------------------------------------------------------------------------------
# what a run left behind
# ------------------------------------------------------------------------------------------------


@dataclass
class StageView:
    """One stage as the report sees it."""

    record: art.StageRecord
    raw: dict[str, Any]  # the stage as the recipe wrote it (references unresolved)
    folder: Path | None  # the finished folder, or the scratch folder of a failed / running stage
    rows: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # stage_config.json's resolved config

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def type(self) -> str:
        return self.record.type

    @property
    def metrics(self) -> dict[str, Any]:
        """The final metrics; for a stage that did not finish, its last summary row if any."""
        if self.record.metrics:
            return self.record.metrics
        summaries = [r for r in self.rows if r["kind"] == art.SUMMARY]
        return {k: v for k, v in summaries[-1].items() if k not in ("kind", "step")} if summaries else {}

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["kind"] == kind]


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a running stage's last line may be half-written, so bad lines are skipped."""
    try:
        return art.read_metrics(path)
    except ValueError:
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("kind") in art.KINDS and isinstance(row.get("step"), int):
                rows.append(row)
        return rows


def _stage_folder(run_dir: Path, record: art.StageRecord) -> Path | None:
    final, scratch = art.stage_dir(run_dir, record.name), art.scratch_dir(run_dir, record.name)
    if record.status == art.COMPLETE and final.is_dir():
        return final
    if scratch.is_dir():
        return scratch
    return final if final.is_dir() else None


def load_views(run_dir: Path, manifest: art.Manifest) -> tuple[list[StageView], dict[str, Any]]:
    """Every stage of the manifest with its rows and config, and the resolved recipe's data."""
    import yaml

    recipe_path = run_dir / art.RESOLVED_RECIPE
    recipe = (yaml.safe_load(recipe_path.read_text(encoding="utf-8")) or {}) if recipe_path.exists() else {}
    raw_stages = {s.get("name"): s for s in recipe.get("stages", []) if isinstance(s, dict)}
    views = []
    for record in manifest.stages:
        folder = _stage_folder(run_dir, record)
        view = StageView(record, raw_stages.get(record.name, {}), folder)
        if folder is not None:
            view.rows = _read_rows(folder / art.METRICS)
            config_path = folder / art.STAGE_CONFIG
            if config_path.exists():
                view.config = json.loads(config_path.read_text(encoding="utf-8")).get("config", {})
        views.append(view)
    return views, recipe


def model_source(raw: Mapping[str, Any], recipe: Mapping[str, Any], key: str = "model") -> str:
    """Which model a stage reads under `key`: `stage:NAME` for an earlier stage's artifact, else
    `model:<name_or_path>` (the recipe's model when the stage names none)."""
    value = raw.get(key)
    if value is None and key == "model":
        value = recipe.get("model")
    if isinstance(value, Mapping):
        value = value.get("name_or_path")
    if isinstance(value, str) and (match := REFERENCE.match(value)):
        return f"stage:{match.group(1)}"
    return f"model:{value}"


def eval_of(views: Sequence[StageView], recipe: Mapping[str, Any], source: str) -> StageView | None:
    """The first finished eval stage that evaluates `source` (see `model_source`)."""
    for view in views:
        if view.type == "eval" and "accuracy" in view.metrics and model_source(view.raw, recipe) == source:
            return view
    return None


# ------------------------------------------------------------------------------------------------
# series and findings
# ------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def series(rows: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over rows, one value per step (the last row of a step wins)."""
    by_step: dict[int, float] = {}
    for row in rows:
        if _is_number(row.get(key)):
            by_step[int(row["step"])] = float(row[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _family(rows: Sequence[Mapping[str, Any]], prefix: str, suffix: str = "") -> list[str]:
    """Keys like `rewards/<rule>/mean` present in rows, in first-seen order."""
    keys: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key.startswith(prefix) and key.endswith(suffix) and key != prefix:
                keys[key] = None
    return list(keys)


def _third_means(values: Sequence[float]) -> tuple[float, float] | None:
    """Mean of the first and of the last third of a series (None with fewer than two values)."""
    if len(values) < 2:
        return None
    third = max(1, len(values) // 3)
    return sum(values[:third]) / third, sum(values[-third:]) / third


def _reward_key(view: StageView) -> str:
    return "score" if view.type == "ppo" else "reward"


def findings(views: Sequence[StageView], recipe: Mapping[str, Any]) -> list[str]:
    """Warnings worth a look, each one sentence naming its stage."""
    found: list[str] = []
    for view in views:
        train = view.of_kind(art.TRAIN)
        if view.type in RL_TYPES:
            found += _reward_hacking(view, views, recipe, train)
            _, entropy = series(train, "entropy")
            if len(entropy) >= 2 and (entropy[-1] < ENTROPY_COLLAPSE_RATIO * entropy[0] or entropy[-1] < ENTROPY_FLOOR):
                found.append(f"{view.name}: entropy collapsed from {entropy[0]:.3g} to {entropy[-1]:.3g} nats per token; "
                             "the policy has stopped exploring")  # fmt: skip
        found += _none_often(view)
        found += _truncation(view, train)
    return found


def _reward_hacking(view: StageView, views: Sequence[StageView], recipe: Mapping[str, Any],
                    train: list[dict[str, Any]]) -> list[str]:  # fmt: skip
    _, rewards = series(train, _reward_key(view))
    ends = _third_means(rewards)
    before = eval_of(views, recipe, model_source(view.raw, recipe))
    after = eval_of(views, recipe, f"stage:{view.name}")
    if ends is None or before is None or after is None or ends[1] <= ends[0]:
        return []
    drop = before.metrics["accuracy"] - after.metrics["accuracy"]
    if drop < ACCURACY_DROP:
        return []
    return [f"{view.name}: reward rose ({ends[0]:.3g} → {ends[1]:.3g}, first vs last third of training) while held-out "
            f"accuracy fell ({before.name} {before.metrics['accuracy']:.3f} → {after.name} {after.metrics['accuracy']:.3f}); "
            "possible reward hacking"]  # fmt: skip


def _scored_samples(view: StageView) -> int | None:
    """How many samples the stage's rules scored, when it can be known."""
    metrics, config = view.metrics, view.config
    if "num_generated" in metrics:
        return int(metrics["num_generated"])
    if view.type == "grpo" and "steps" in metrics and config:
        # Each optimizer step trains on per_device_train_batch_size × gradient_accumulation_steps
        # completions per process; each completion is scored once and reused num_iterations times.
        per_step = int(config.get("per_device_train_batch_size", 0)) * int(config.get("gradient_accumulation_steps", 1))
        world = view.record.world_size or 1
        return int(metrics["steps"]) * per_step * world // max(1, int(config.get("num_iterations", 1)))
    return None


def _none_often(view: StageView) -> list[str]:
    found = []
    scored = _scored_samples(view)
    for key, value in view.metrics.items():
        if not key.endswith("_failures") or not _is_number(value) or value <= 0:
            continue
        rule = key.removesuffix("_failures")
        share = f" of {scored} ({value / scored:.0%})" if scored else ""
        if scored is None or value / scored >= NONE_SHARE:
            found.append(f"{view.name}: rule '{rule}' failed (scored None) on {int(value)} samples{share}; see its log.txt")
    samples = view.of_kind(art.SAMPLE)
    if samples:
        names = {name for s in samples for name in (s.get("rewards") or {})}
        for name in sorted(names):
            nones = sum(1 for s in samples if (s.get("rewards") or {}).get(name, 0) is None)
            if nones / len(samples) >= 0.5:
                found.append(f"{view.name}: rule '{name}' gave no score (None) on {nones} of {len(samples)} logged "
                             "samples: it abstains on them, or fails (see the stage's log.txt)")  # fmt: skip
    return found


def _truncation(view: StageView, train: list[dict[str, Any]]) -> list[str]:
    metrics = view.metrics
    share: float | None = None
    what = "completions"
    if view.type == "eval" and _is_number(metrics.get("truncated")):
        share = float(metrics["truncated"])
    elif view.type == "grpo":
        values = series(train, "completions/clipped_ratio")[1]
        share = values[-1] if values else None
    elif view.type == "ppo":
        values = series(train, "no_eos")[1]
        share, what = (values[-1] if values else None), "rollouts"
    elif view.type == "rejection_sampling" and metrics.get("num_generated"):
        share = metrics.get("dropped/truncated", 0) / metrics["num_generated"]
        what = "samples"
    if share is None or share < TRUNCATION_SHARE:
        return []
    return [f"{view.name}: {share:.0%} of {what} hit the length limit without ending; raise the length limit "
            "(max_completion_length / response_length) or check the stopping token"]


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------


@dataclass
class Plot:
    file: str  # file name inside the run dir
    title: str
    caption: str


#: One line per (label, kind, key); `key` may hold a `*` for a family (`rewards/*/mean`).
Curve = tuple[str, str, str]

#: y limits of a quantity that cannot be negative: from zero, so a small drift does not look like a cliff.
FROM_ZERO = (0.0, None)

#: Per stage type, the curves of each of its plots: (plot id, title, y label, y limits, curves, caption).
CURVES: dict[str, list[tuple[str, str, str, tuple[float, float | None] | None, list[Curve], str]]] = {
    "grpo": [
        ("reward", "reward: total and per rule", "mean reward per completion", None,
         [("total (weighted sum)", art.TRAIN, "reward"), ("*", art.TRAIN, "rewards/*/mean")],
         "The weighted total reward TRL optimises, and each rule's mean score, per logging step."),
        ("kl", "KL to the reference", "mean per-token KL (k3)", None, [("KL", art.TRAIN, "kl")],
         "How far the policy moved from the reference model (logged only when beta > 0)."),
        ("entropy", "policy entropy", "nats per token", FROM_ZERO, [("entropy", art.TRAIN, "entropy")],
         "Mean token entropy of the sampled completions; a fall to near zero means the policy stopped exploring."),
        ("length", "completion length", "tokens", FROM_ZERO,
         [("mean", art.TRAIN, "completions/mean_length"), ("min", art.TRAIN, "completions/min_length"),
          ("max", art.TRAIN, "completions/max_length")],
         "Length of the sampled completions (mean, shortest, longest)."),
        ("clip", "clipped share of tokens", "share of tokens", FROM_ZERO,
         [("clipped (region)", art.TRAIN, "clip_ratio/region_mean"), ("low", art.TRAIN, "clip_ratio/low_mean"),
          ("high", art.TRAIN, "clip_ratio/high_mean")],
         "Share of tokens whose probability ratio the PPO-style clip cut off (0 while num_iterations is 1)."),
        ("zero_std", "groups with no learning signal", "share of groups", (0.0, 1.05),
         [("frac_reward_zero_std", art.TRAIN, "frac_reward_zero_std")],
         "Share of prompt groups whose completions all got the same reward: their advantages are 0."),
    ],
    "ppo": [
        ("score", "score: total and per part", "mean score per rollout", None,
         [("score (rollouts)", art.TRAIN, "score"), ("*", art.TRAIN, "score/*"),
          ("held-out (greedy)", art.EVAL, "score")],
         "The reward (model and rules, weighted) of the sampled rollouts, each part, and held-out greedy responses."),
        ("kl", "KL to the reference", "KL per sequence (k1, nats)", None,
         [("rollouts", art.TRAIN, "kl"), ("held-out", art.EVAL, "kl")],
         "Summed per-token KL of the policy to the frozen reference, the leash the kl_coef penalty holds."),
        ("entropy", "policy entropy", "nats per token", FROM_ZERO, [("entropy", art.TRAIN, "entropy")],
         "Mean token entropy of the rollouts."),
        ("length", "response length", "tokens", FROM_ZERO, [("mean", art.TRAIN, "response_length")],
         "Mean rollout length, EOS included."),
        ("clip", "clip fractions", "share of tokens", FROM_ZERO,
         [("policy", art.TRAIN, "policy_clip_fraction"), ("value", art.TRAIN, "value_clip_fraction")],
         "Share of tokens where the clipped policy and value objectives were active."),
        ("value_loss", "critic: value loss", "value loss", FROM_ZERO, [("value loss", art.TRAIN, "value_loss")],
         "The critic's clipped squared error against the GAE returns."),
        ("explained_variance", "critic: explained variance", "explained variance", None,
         [("explained variance", art.TRAIN, "explained_variance")],
         "1 − Var(returns − values) / Var(returns): 1 is a perfect critic, 0 no better than a constant."),
    ],
    "reward_model": [
        ("pairwise_accuracy", "pairwise accuracy", "share of pairs ranked right", (0.0, 1.05),
         [("train", art.TRAIN, "accuracy"), ("held-out", art.EVAL, "eval_accuracy")],
         "Share of pairs where the chosen response scored above the rejected one."),
    ],
}
LOSS_PLOT = ("loss", "training loss", "loss", None,
             [("train", art.TRAIN, "loss"), ("held-out", art.EVAL, "eval_loss")],
             "The trainer's loss per logging step (and on held-out data when there is some). For GRPO it is the "
             "clipped surrogate objective, which hovers near 0: judge RL by its reward, not by this.")  # fmt: skip


def _figure() -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=110, layout="constrained")
    return fig, fig.subplots()


def _finish(fig: Any, ax: Any, path: Path, title: str, xlabel: str, ylabel: str, legend: bool) -> None:
    ax.set_axisbelow(True)  # grid lines behind bars and lines
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:  # outside the axes, so it never hides a line
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.savefig(path)


def _curve_plot(view: StageView, run_dir: Path, spec: tuple[Any, ...]) -> Plot | None:
    plot_id, title, ylabel, ylim, curves, caption = spec
    lines: list[tuple[str, list[int], list[float]]] = []
    for label, kind, key in curves:
        rows = view.of_kind(kind)
        prefix, star, suffix = key.partition("*")
        # A family (`rewards/*/mean`) gives one line per member, named by what the star stands for.
        members = [(k.removeprefix(prefix).removesuffix(suffix), k) for k in _family(rows, prefix, suffix)] if star else [(label, key)]
        for name, k in members:
            xs, ys = series(rows, k)
            if xs:
                lines.append((name, xs, ys))
    if not lines:
        return None
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure()
    for name, xs, ys in lines:
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3.5, linewidth=1.6, label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    if ylim is not None:
        ax.set_ylim(*ylim)
    file = f"{PLOT_PREFIX}{view.name}.{plot_id}.png"
    _finish(fig, ax, run_dir / file, f"{view.name}: {title}", "optimizer step", ylabel, legend=len(lines) > 1)
    return Plot(file, f"{view.name}: {title}", caption)


def _bar_plot(path: Path, title: str, ylabel: str, labels: list[str], values: list[float], *,
              notes: list[str] | None = None, ylim: tuple[float, float] | None = (0.0, 1.05),
              colors: list[str] | None = None, xlabel: str = "") -> None:  # fmt: skip
    fig, ax = _figure()
    bars = ax.bar(range(len(values)), values, color=colors or "C0", width=0.6)
    rotate = len(labels) > 4
    ax.set_xticks(range(len(values)), labels, fontsize=8 if rotate else 9, rotation=25 if rotate else 0,
                  ha="right" if rotate else "center")  # fmt: skip
    for i, bar in enumerate(bars):
        text = f"{values[i]:.3g}" + (f"\n{notes[i]}" if notes and notes[i] else "")
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")  # fmt: skip
    if ylim is not None:
        ax.set_ylim(*ylim)
    else:
        ax.set_ylim(0, max(values) * 1.25 if values and max(values) > 0 else 1)
    _finish(fig, ax, path, title, xlabel, ylabel, legend=False)


def _acceptance_plot(view: StageView, run_dir: Path) -> Plot | None:
    metrics = view.metrics
    if "acceptance_rate" not in metrics:
        return None
    prefix = "acceptance_rate/difficulty_"
    levels = sorted((k for k in metrics if k.startswith(prefix)), key=lambda k: _sort_key(k.removeprefix(prefix)))
    labels = ["all", *(f"difficulty {k.removeprefix(prefix)}" for k in levels)]
    values = [float(metrics["acceptance_rate"]), *(float(metrics[k]) for k in levels)]
    file = f"{PLOT_PREFIX}{view.name}.acceptance.png"
    title = f"{view.name}: samples kept"
    _bar_plot(run_dir / file, title, "share of samples kept", labels, values, colors=["C1"] + ["C0"] * len(levels))
    return Plot(file, title, "Share of sampled completions the keep policy accepted, overall and per difficulty.")


def _sort_key(text: str) -> tuple[int, float, str]:
    try:
        return 0, float(text), ""
    except ValueError:
        return 1, 0.0, text


def _params(count: Any) -> str:
    if not _is_number(count):
        return ""
    return f"{count / 1e6:.2f} M params" if count >= 1e5 else f"{int(count):,} params"


def _distill_plot(view: StageView, views: Sequence[StageView], recipe: Mapping[str, Any], run_dir: Path) -> Plot | None:
    teacher_key = "teacher" if view.raw.get("teacher") is not None else "model"
    teacher_eval = eval_of(views, recipe, model_source(view.raw, recipe, teacher_key))
    student_eval = eval_of(views, recipe, f"stage:{view.name}")
    if teacher_eval is None or student_eval is None:
        return None
    metrics = view.metrics
    labels = [f"teacher\n({teacher_eval.name})", f"student\n({student_eval.name})"]
    values = [float(teacher_eval.metrics["accuracy"]), float(student_eval.metrics["accuracy"])]
    notes = [_params(metrics.get("teacher_params")), _params(metrics.get("student_params"))]
    file = f"{PLOT_PREFIX}{view.name}.teacher_student.png"
    title = f"{view.name}: teacher vs student"
    _bar_plot(run_dir / file, title, "held-out accuracy", labels, values, notes=notes, colors=["C0", "C1"])
    return Plot(file, title, "Held-out accuracy of the teacher and of the distilled student, with their sizes.")


#: Colours of the pass@k / maj@k markers: all but accuracy's (C0) and format's (C7).
AT_K_COLOURS = ("C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")


def pipeline_plots(views: Sequence[StageView], run_dir: Path) -> list[Plot]:
    """The line a pipeline run is judged by: held-out accuracy after every eval stage, in recipe
    order (with format, and pass@k / maj@k where an eval sampled several answers), and the mean
    completion length."""
    evals = [v for v in views if v.type == "eval" and "accuracy" in v.metrics]
    if not evals:
        return []
    names = [v.name for v in evals]
    positions = list(range(len(evals)))
    fig, ax = _figure()
    ax.plot(positions, [v.metrics["accuracy"] for v in evals], marker="o", linewidth=2.2, label="accuracy", color="C0",
            zorder=3)  # fmt: skip
    for i, v in enumerate(evals):
        ax.annotate(f"{v.metrics['accuracy']:.3f}", (i, v.metrics["accuracy"]), xytext=(0, 7),
                    textcoords="offset points", ha="center", fontsize=8, color="C0", zorder=4)  # fmt: skip
    if any("format" in v.metrics for v in evals):
        ax.plot(positions, [v.metrics.get("format", float("nan")) for v in evals], marker="s", markersize=4,
                linestyle="--", linewidth=1.0, label="format", color="C7", zorder=2)  # fmt: skip
    # pass@1 is left out: it is the accuracy for greedy evals and the mean sampled accuracy otherwise.
    extra = [key for key in at_k_keys(v.metrics for v in evals) if key != "pass@1"]
    for number, key in enumerate(extra):
        xs = [i for i, v in enumerate(evals) if key in v.metrics]
        ax.plot(xs, [evals[i].metrics[key] for i in xs], marker="^v<>Dph*"[number % 8], linestyle="none", markersize=7,
                label=key, color=AT_K_COLOURS[number % len(AT_K_COLOURS)])  # fmt: skip
    ax.set_xticks(positions, names, rotation=25, ha="right", fontsize=8)
    ax.set_ylim(-0.03, 1.1)
    file = f"{PLOT_PREFIX}pipeline.png"
    title = "held-out accuracy after each stage"
    _finish(fig, ax, run_dir / file, title, "eval stage (recipe order)", "share of held-out prompts", legend=True)
    plots = [Plot(file, title, "Accuracy (math-verify) on the held-out set after every eval stage, in recipe order; "
                               "format is the share in the strict R1 format; pass@k and maj@k where an eval sampled k answers.")]  # fmt: skip
    lengths = [float(v.metrics["mean_length"]) for v in evals if _is_number(v.metrics.get("mean_length"))]
    if len(lengths) == len(evals):
        length_file = f"{PLOT_PREFIX}pipeline_length.png"
        truncated = [v.metrics.get("truncated") for v in evals]
        notes = [f"{t:.0%} cut" if _is_number(t) and t > 0 else "" for t in truncated]
        _bar_plot(run_dir / length_file, "mean completion length after each stage", "tokens", names, lengths,
                  notes=notes, ylim=None, xlabel="eval stage (recipe order)")  # fmt: skip
        fig_note = "Mean completion length on the held-out set after every eval stage (share cut at the limit above the bar)."
        plots.append(Plot(length_file, "mean completion length after each stage", fig_note))
    return plots


def stage_plots(view: StageView, views: Sequence[StageView], recipe: Mapping[str, Any], run_dir: Path) -> list[Plot]:
    plots: list[Plot] = []
    if view.of_kind(art.TRAIN):
        loss = _curve_plot(view, run_dir, LOSS_PLOT)
        if loss is not None:
            plots.append(loss)
    for spec in CURVES.get(view.type, []):
        plot = _curve_plot(view, run_dir, spec)
        if plot is not None:
            plots.append(plot)
    if view.type == "rejection_sampling":
        plots += [p for p in [_acceptance_plot(view, run_dir)] if p is not None]
    if view.type == "distill":
        plots += [p for p in [_distill_plot(view, views, recipe, run_dir)] if p is not None]
    return plots


# ------------------------------------------------------------------------------------------------
# the documents
# ------------------------------------------------------------------------------------------------


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def key_metrics(view: StageView) -> list[tuple[str, Any]]:
    metrics = view.metrics
    wanted = KEY_METRICS.get(view.type)
    if wanted is None:
        return [(k, v) for k, v in metrics.items() if k not in BOOKKEEPING and _is_number(v)][:4]
    out: list[tuple[str, Any]] = []
    for key in wanted:
        if key.endswith("@*"):
            out += [(k, metrics[k]) for k in at_k_keys([metrics]) if k.startswith(key[:-1])]
        elif key in metrics:
            out.append((key, metrics[key]))
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _processes(view: StageView) -> str:
    if view.record.world_size is not None:
        return str(view.record.world_size)
    launcher = view.config.get("launcher") or {}
    return str(launcher.get("num_processes") or "-")


def _stage_rows(views: Sequence[StageView]) -> list[list[str]]:
    rows = []
    for v in views:
        steps = v.metrics.get("steps")
        status = v.record.status + (f": {v.record.error}" if v.record.error else "")
        rows.append([v.name, v.type, status, _duration(v.record.duration_s), str(steps) if steps is not None else "-",
                     _processes(v), ", ".join(f"{k} {_value(x)}" for k, x in key_metrics(v)) or "-",
                     ", ".join(v.record.artifacts.values()) or "-"])  # fmt: skip
    return rows


STAGE_COLUMNS = ["stage", "type", "status", "time", "steps", "processes", "key metrics", "artifacts"]


def _header(manifest: art.Manifest, views: Sequence[StageView]) -> list[tuple[str, str]]:
    run = manifest.run or {}
    versions = run.get("versions") or library_versions()
    devices = sorted({v.record.device for v in views if v.record.device})
    started, ended = run.get("started"), run.get("ended")
    stage_time = sum(v.record.duration_s or 0.0 for v in views)
    wall = f"{_duration(ended - started)} (this invocation)" if started and ended else "still running"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "-"
    return [
        ("recipe", f"{manifest.recipe} ({manifest.source})"),
        ("command", run.get("command") or "-"),
        ("started", when),
        ("total time", f"{wall}; {_duration(stage_time)} in stages, all runs"),
        ("device", ", ".join(devices) or "-"),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items())),
    ]


def _samples(view: StageView) -> list[dict[str, Any]]:
    rows = view.of_kind(art.SAMPLE)
    if not rows:
        return []
    first, last = rows[0]["step"], rows[-1]["step"]
    picked = [r for r in rows if r["step"] == first][:SAMPLES_FIRST]
    if last != first:
        picked += [r for r in rows if r["step"] == last][:SAMPLES_LAST]
    return picked


def _scores_text(rewards: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k} {'None' if v is None else _value(v)}" for k, v in (rewards or {}).items()) or "-"


@dataclass
class Report:
    header: list[tuple[str, str]]
    stages: list[list[str]]
    findings: list[str]
    pipeline: list[Plot]
    sections: list[tuple[StageView, list[Plot], list[dict[str, Any]]]]


def build(run_dir: Path) -> Report:
    """Read the run and draw its plots into `run_dir` (stale plots of an earlier report removed)."""
    manifest = art.Manifest.read(run_dir)
    if manifest is None:
        raise FileNotFoundError(f"{run_dir}: no {art.MANIFEST} (not a run directory)")
    for stale in run_dir.glob(f"{PLOT_PREFIX}*.png"):
        stale.unlink()
    views, recipe = load_views(run_dir, manifest)
    sections = []
    for view in views:
        plots = stage_plots(view, views, recipe, run_dir)
        samples = _samples(view) if view.type in RL_TYPES else []
        if plots or samples:
            sections.append((view, plots, samples))
    return Report(_header(manifest, views), _stage_rows(views), findings(views, recipe),
                  pipeline_plots(views, run_dir), sections)  # fmt: skip


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]


def render_markdown(report: Report) -> str:
    lines = [f"# align run report: {report.header[0][1]}", ""]
    lines += [f"- **{k}**: {_md_cell(v)}" for k, v in report.header[1:]] + [""]
    lines += ["## Findings", ""] + ([f"- {f}" for f in report.findings] or ["- none"]) + [""]
    lines += ["## Stages", "", *_md_table(STAGE_COLUMNS, report.stages), ""]
    if report.pipeline:
        lines += ["## Pipeline", ""]
        for plot in report.pipeline:
            lines += [f"![{plot.title}]({plot.file})", "", f"*{plot.caption}*", ""]
    for view, plots, samples in report.sections:
        lines += [f"## {view.name} ({view.type})", ""]
        for plot in plots:
            lines += [f"![{plot.title}]({plot.file})", "", f"*{plot.caption}*", ""]
        if samples:
            lines += ["Sample completions:", ""]
            for s in samples:
                lines += [f"- step {s['step']}, scores: {_md_cell(_scores_text(s.get('rewards')))}", "",
                          "  ```text", *[f"  {line}" for line in f"{s.get('prompt', '')}\n→ {s.get('completion', '')}".splitlines()],
                          "  ```", ""]  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
.status-failed { color: #b00020; font-weight: bold; } .status-complete { color: #1b5e20; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; max-width: 48%; vertical-align: top; }
figure img { max-width: 100%; } figcaption { font-size: 0.8em; color: #555; }
pre { background: #f7f7f7; padding: 0.5em; white-space: pre-wrap; font-size: 0.8em; }
.finding { color: #8a4b00; }
"""


def _img(run_dir: Path, plot: Plot) -> str:
    data = base64.b64encode((run_dir / plot.file).read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(plot.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(plot.caption)}</figcaption></figure>")  # fmt: skip


def render_html(report: Report, run_dir: Path) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>align report: {esc(report.header[0][1])}</title><style>{CSS}</style></head><body>",
             f"<h1>align run report: {esc(report.header[0][1])}</h1>", "<table>"]  # fmt: skip
    parts += [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in report.header[1:]] + ["</table>"]
    parts += ["<h2>Findings</h2><ul>"]
    parts += [f'<li class="finding">{esc(f)}</li>' for f in report.findings] or ["<li>none</li>"]
    parts += ["</ul>", "<h2>Stages</h2><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in STAGE_COLUMNS) + "</tr>"]
    for row in report.stages:
        status_class = "status-" + row[2].split(":")[0]
        cells = [f'<td class="{status_class}">{esc(c)}</td>' if i == 2 else f"<td>{esc(c)}</td>" for i, c in enumerate(row)]
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    if report.pipeline:
        parts += ["<h2>Pipeline</h2>", *(_img(run_dir, p) for p in report.pipeline)]
    for view, plots, samples in report.sections:
        parts += [f"<h2>{esc(view.name)} ({esc(view.type)})</h2>", *(_img(run_dir, p) for p in plots)]
        if samples:
            parts.append("<h3>Sample completions</h3>")
            for s in samples:
                parts.append(f"<p>step {s['step']}, scores: {esc(_scores_text(s.get('rewards')))}</p>"
                             f"<pre>{esc(str(s.get('prompt', '')))}\n→ {esc(str(s.get('completion', '')))}</pre>")  # fmt: skip
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write report.html and report.md (and the plots) into `run_dir`; returns their paths."""
    report = build(run_dir)
    html_path, md_path = run_dir / REPORT_HTML, run_dir / REPORT_MD
    art.write_text_atomic(md_path, render_markdown(report))
    art.write_text_atomic(html_path, render_html(report, run_dir))
    return html_path, md_path
