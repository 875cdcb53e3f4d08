"""Every launcher runs the config the orchestrator validated, with every path the recipe names
resolved the same way: a recipe in one folder, naming files beside it, run from another cwd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """\
name: paths
seed: 0
model: {{name_or_path: "align:tiny", chat_template: template.jinja}}
launcher: {launcher}
stages:
  - name: rs
    type: rejection_sampling
    dataset: prompts.jsonl
    rewards: [{{rule: "my_rules.py:one"}}]
    keep: best_of_n
    num_generations: 1
    temperature: 0.0
    max_completion_length: 4
    drop_truncated: false
"""

TEMPLATE = "{% for m in messages %}<|user|>hello {{ m['content'] }}<|end|>{% endfor %}<|assistant|>"
RULE = '''\
def one(completions, **kwargs):
    """1.0 for every sample: what matters is that the file beside the recipe was found and imported."""
    return [1.0 for _ in completions]
'''


@pytest.mark.parametrize("launcher", ["{type: inprocess}", "{type: subprocess}", "{type: accelerate, num_processes: 1}"])
def test_paths_beside_the_recipe_resolve_under_every_launcher(tmp_path: Path, launcher: str) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "recipe.yaml").write_text(RECIPE.format(launcher=launcher))
    (project / "template.jinja").write_text(TEMPLATE)
    (project / "my_rules.py").write_text(RULE)
    (project / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i}+1?"}) + "\n" for i in range(3)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "align.cli", "run", str(project / "recipe.yaml"), "--run-dir", "run"],
                          cwd=elsewhere, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (elsewhere / "run" / "rs" / "dataset.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["scores"]["one"] == 1.0 for r in rows)
    config = json.loads((elsewhere / "run" / "rs" / "stage_config.json").read_text())["config"]
    assert config["dataset"]["path"] == str((project / "prompts.jsonl").resolve())
    assert config["rewards"][0]["rule"] == f"{(project / 'my_rules.py').resolve()}:one"
    assert config["model"]["chat_template"] == str((project / "template.jinja").resolve())
    assert "rejection_sampling: kept 3 of 3 samples" in (elsewhere / "run" / "rs" / "log.txt").read_text()
