"""The run report: built from what a run leaves (manifest, recipe.yaml, metrics.jsonl), for finished and
failed runs; its findings checked on hand-made metrics; its plots are real images; the HTML opens
offline."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml

from align import artifacts as art
from align.report import findings, load_views, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_real_png(path: Path) -> tuple[int, int]:
    """A PNG that decodes: its signature, a sane header, and pixels matplotlib can read back."""
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert 200 <= width <= 3000 and 150 <= height <= 3000, (path, width, height)
    pixels = imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.01  # not a blank canvas
    return width, height


def check_report(run_dir: Path, stage_names: list[str]) -> str:
    """Both documents exist, name every stage, and every plot they show is a real image, inline in
    the HTML; returns the markdown."""
    markdown = (run_dir / "report.md").read_text()
    page = (run_dir / "report.html").read_text()
    for name in stage_names:
        assert f"| {name} |" in markdown and f"<td>{name}</td>" in page, name
    linked = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", markdown)
    on_disk = sorted(p.name for p in run_dir.glob("report.*.png"))
    assert sorted(linked) == on_disk
    for name in on_disk:
        assert_real_png(run_dir / name)
    assert page.count('src="data:image/png;base64,') == len(on_disk)
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    return markdown


# ------------------------------------------------------------------------------------------------
# a hand-made run: every stage type's metrics, with known findings in them
# ------------------------------------------------------------------------------------------------

HELD_OUT = {"path": "align:arithmetic", "split": "test", "num_examples": 10}
RECIPE = {
    "name": "made",
    "model": "align:tiny",
    "stages": [
        {"name": "eval_base", "type": "eval", "dataset": HELD_OUT},
        {"name": "grpo", "type": "grpo", "dataset": HELD_OUT, "rewards": [{"rule": "accuracy"}, {"rule": "format"}]},
        {"name": "eval_grpo", "type": "eval", "model": "${stages.grpo.model}", "dataset": HELD_OUT},
        {"name": "rs", "type": "rejection_sampling", "model": "${stages.grpo.model}", "dataset": HELD_OUT},
        {"name": "distill", "type": "distill", "teacher": "${stages.grpo.model}", "dataset": HELD_OUT},
        {"name": "eval_distill", "type": "eval", "model": "${stages.distill.model}", "dataset": HELD_OUT},
        {"name": "ppo", "type": "ppo", "model": "${stages.distill.model}", "dataset": HELD_OUT},
    ],
}
EVAL = {"exact_match": 0.5, "format": 1.0, "pass@1": 0.5, "mean_length": 20.0, "num_prompts": 10}


def make_run(run_dir: Path) -> None:
    records = []

    def stage(name: str, kind: str, metrics: dict[str, Any], rows: list[dict[str, Any]], config: dict[str, Any] | None = None,
              status: str = art.COMPLETE) -> None:  # fmt: skip
        folder = run_dir / name
        folder.mkdir(parents=True)
        writer = art.MetricsWriter(folder / art.METRICS)
        for row in rows:
            writer.log(row.pop("kind"), row.pop("step"), **row)
        writer.log(art.SUMMARY, int(metrics.get("steps", 0)), **metrics)
        (folder / art.RESULT).write_text(json.dumps({"metrics": metrics}))
        (folder / art.STAGE_CONFIG).write_text(json.dumps({"config": config or {}}))
        records.append(art.StageRecord(name, kind, status, "f", {"x": f"{name}/x"}, metrics, duration_s=1.5, world_size=1,
                                       device="cpu"))  # fmt: skip

    stage("eval_base", "eval", {"accuracy": 0.5, **EVAL, "truncated": 0.3}, [])
    grpo_rows = [{"kind": art.TRAIN, "step": s, "loss": 0.01, "reward": r, "rewards/accuracy/mean": r / 2,
                  "rewards/format/mean": r / 2, "entropy": e, "completions/mean_length": 20.0 + s,
                  "completions/clipped_ratio": 0.05, "frac_reward_zero_std": 0.5, "clip_ratio/region_mean": 0.0}
                 for s, r, e in ((1, 0.2, 1.0), (2, 0.3, 0.8), (3, 0.5, 0.4), (4, 0.6, 0.1))]  # fmt: skip
    samples = [{"kind": art.SAMPLE, "step": s, "prompt": f"What is {s}+{s}?", "completion": "<answer>4</answer>",
                "rewards": {"accuracy": 1.0, "format": None}} for s in (1, 1, 1, 4, 4)]  # fmt: skip
    config = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "num_iterations": 1}
    stage("grpo", "grpo", {"steps": 4, "first_reward": 0.2, "last_reward": 0.6, "accuracy_failures": 4,
                           "format_failures": 0}, grpo_rows + samples, config)  # fmt: skip
    stage("eval_grpo", "eval", {"accuracy": 0.4, **EVAL, "truncated": 0.0}, [])
    stage("rs", "rejection_sampling", {"acceptance_rate": 0.25, "num_generated": 40, "num_rows": 10,
                                       "acceptance_rate/difficulty_0": 0.5, "acceptance_rate/difficulty_1": 0.0,
                                       "dropped/truncated": 10}, [])  # fmt: skip
    stage("distill", "distill", {"steps": 2, "teacher_params": 900_000, "student_params": 180_000,
                                 "student_teacher_param_ratio": 0.2},
          [{"kind": art.TRAIN, "step": 1, "loss": 2.0}, {"kind": art.TRAIN, "step": 2, "loss": 1.0}])  # fmt: skip
    stage("eval_distill", "eval", {"accuracy": 0.35, **EVAL, "truncated": 0.0, "maj@4": 0.45, "pass@4": 0.6}, [])
    ppo_rows = [{"kind": art.TRAIN, "step": s, "score": 0.1 * s, "score/format": 0.1 * s, "reward": 0.1 * s - 0.01,
                 "kl": 0.01 * s, "entropy": 2.0, "response_length": 10.0, "no_eos": 0.25, "policy_clip_fraction": 0.1,
                 "value_clip_fraction": 0.2, "value_loss": 1.0 / s, "explained_variance": 0.1 * s}
                for s in (1, 2, 3)]  # fmt: skip
    ppo_rows.append({"kind": art.EVAL, "step": 3, "score": 0.4, "kl": 0.02})
    stage("ppo", "ppo", {"steps": 3, "first_score": 0.1, "last_score": 0.3}, ppo_rows, status=art.FAILED)
    records[-1].error = "rank 0: RuntimeError: out of patience"
    art.Manifest("made", "made.yaml", records, {"command": "align run made.yaml", "started": 100.0, "ended": 190.0,
                                                "versions": {"align": "0.1.0"}}).write(run_dir)  # fmt: skip
    (run_dir / art.RESOLVED_RECIPE).write_text(yaml.safe_dump(RECIPE))


def test_findings_on_hand_made_metrics(tmp_path: Path) -> None:
    make_run(tmp_path)
    manifest = art.Manifest.read(tmp_path)
    assert manifest is not None
    found = findings(*load_views(tmp_path, manifest))
    assert found == [
        "eval_base: 30% of completions hit the length limit without ending; raise the length limit "
        "(max_completion_length / response_length) or check the stopping token",
        # first vs last third of 4 logged rewards: 0.2 vs 0.6; the eval of its input (the recipe's model,
        # eval_base) 0.500, of its output 0.400
        "grpo: reward rose (0.2 → 0.6, first vs last third of training) while held-out accuracy fell "
        "(eval_base 0.500 → eval_grpo 0.400); possible reward hacking",
        "grpo: entropy collapsed from 1 to 0.1 nats per token; the policy has stopped exploring",
        # 4 steps × 8 completions = 32 scored; 4 failures = 12 %
        "grpo: rule 'accuracy' failed (scored None) on 4 samples of 32 (12%); see its log.txt",
        "grpo: rule 'format' gave no score (None) on 5 of 5 logged samples: it abstains on them, or fails "
        "(see the stage's log.txt)",
        "rs: 25% of samples hit the length limit without ending; raise the length limit "
        "(max_completion_length / response_length) or check the stopping token",
        "ppo: 25% of rollouts hit the length limit without ending; raise the length limit "
        "(max_completion_length / response_length) or check the stopping token",
    ]


def test_report_of_a_hand_made_run_shows_every_stage_its_plots_and_samples(tmp_path: Path) -> None:
    make_run(tmp_path)
    (tmp_path / "report.old_stage.loss.png").write_bytes(b"stale")
    write_report(tmp_path)
    markdown = check_report(tmp_path, [s["name"] for s in RECIPE["stages"]])
    plots = {p.name for p in tmp_path.glob("report.*.png")}
    assert "report.old_stage.loss.png" not in plots  # a plot of an earlier report is gone
    assert {"report.pipeline.png", "report.pipeline_length.png", "report.grpo.reward.png", "report.grpo.entropy.png",
            "report.grpo.kl.png"} - plots == {"report.grpo.kl.png"}  # no KL logged (beta 0): no KL plot  # fmt: skip
    assert {"report.grpo.zero_std.png", "report.grpo.clip.png", "report.grpo.length.png", "report.rs.acceptance.png",
            "report.distill.teacher_student.png", "report.distill.loss.png", "report.ppo.score.png", "report.ppo.kl.png",
            "report.ppo.value_loss.png", "report.ppo.explained_variance.png", "report.ppo.clip.png"} <= plots  # fmt: skip
    # header, the failed stage with its error, key metrics, samples of the first and last step
    assert "- **command**: align run made.yaml" in markdown and "1m30s (this invocation)" in markdown
    assert "| ppo | ppo | failed: rank 0: RuntimeError: out of patience |" in markdown
    assert "accuracy 0.35, pass@1 0.5, pass@4 0.6, maj@4 0.45" in markdown
    assert markdown.count("scores: accuracy 1, format None") == 2 + 2  # SAMPLES_FIRST from step 1, all 2 of step 4


def test_a_failed_run_leaves_a_report_of_every_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from align.recipe.validate import load_recipe
    from align.runner import StageFailed, run_recipe
    from align.stages import STAGE_TYPES

    monkeypatch.setitem(STAGE_TYPES, "fake", "tests.fake_stage")
    (tmp_path / "recipe.yaml").write_text("""\
name: fake
model: align:tiny
stages:
  - {name: a, type: fake, value: 1}
  - {name: b, type: fake, value: 2, fail: true}
  - {name: c, type: fake, value: 3}
""")
    lines: list[str] = []
    with pytest.raises(StageFailed):
        run_recipe(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "run", report=lines.append)
    markdown = check_report(tmp_path / "run", ["a", "b", "c"])
    assert "| b | fake | failed: rank 0: RuntimeError: boom mid-write |" in markdown
    assert "| c | fake | pending |" in markdown
    assert f"[align] report: {tmp_path / 'run' / 'report.html'}" in lines
