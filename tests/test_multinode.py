"""Several machines: `align run` started once per machine on a shared run dir. Two "machines" on
localhost (one process each, gloo) run a two-stage recipe end to end; a machine that finds no run,
or another recipe, stops with a message that says so."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align import artifacts as art
from align.launch import Machines
from align.recipe.validate import load_recipe
from align.runner import CLUSTER, StageFailed, follow_run, plan

ROOT = Path(__file__).resolve().parents[1]

STAGE = """\
  - name: {name}
    type: sft
    model: {model}
    dataset: {{path: "align:arithmetic", split: train, num_examples: 16}}
    learning_rate: 1.0e-3
    max_steps: 2
    per_device_train_batch_size: 4
    max_length: 96
    save_strategy: "no"
    launcher: {{type: accelerate, config_file: {configs}/ddp.yaml, num_processes: 2}}
"""
RECIPE = ("name: two-machines\nseed: 0\nmodel: align:tiny\nstages:\n"
          + STAGE.format(name="first", model="align:tiny", configs=ROOT / "accelerate_configs")
          + STAGE.format(name="second", model="${stages.first.model}", configs=ROOT / "accelerate_configs"))  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def align_run(recipe: Path, run_dir: Path, rank: int, port: int, **env: str) -> subprocess.Popen[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    environment.pop("ACCELERATE_USE_CPU", None)
    return subprocess.Popen([sys.executable, "-m", "align.cli", "run", str(recipe), "--run-dir", str(run_dir),
                             "--num-machines", "2", "--machine-rank", str(rank), "--main-process-ip", "127.0.0.1",
                             "--main-process-port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)  # fmt: skip


@pytest.mark.slow  # ~110 s on 2 cores: 4 launches of 1 process, two at a time
def test_two_machines_run_a_two_stage_recipe_on_a_shared_run_dir(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    run_dir, port = tmp_path / "run", free_port()
    follower = align_run(recipe, run_dir, 1, port)  # the other machine may well start first
    time.sleep(1)
    main = align_run(recipe, run_dir, 0, port)
    main_out, _ = main.communicate(timeout=600)
    follower_out, _ = follower.communicate(timeout=120)
    assert main.returncode == 0, main_out[-3000:]
    assert follower.returncode == 0, follower_out[-3000:]
    manifest = art.Manifest.read(run_dir)
    assert manifest is not None
    for name in ("first", "second"):
        record = manifest.record(name)
        assert record.status == art.COMPLETE
        # read back by the stage's own processes: 2 ranks on 2 machines, really distributed
        assert (record.world_size, record.num_machines, record.distributed_type) == (2, 2, "MULTI_CPU")
        assert f"machine 1: done  {name}" in follower_out
    assert (run_dir / "second" / "model" / "config.json").exists()
    assert json.loads((run_dir / CLUSTER).read_text())["state"] == "ended"


def test_a_machine_whose_machine_0_never_starts_stops_with_the_reason(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    alone = align_run(recipe, tmp_path / "run", 1, free_port(), ALIGN_MACHINE_WAIT_S="1")
    out, _ = alone.communicate(timeout=120)
    assert alone.returncode == 1
    assert "machine 0 started no run in" in out and "shared filesystem" in out


def write_plan(run_dir: Path, stages: list[dict[str, object]], state: str = "running", started: float | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CLUSTER).write_text(json.dumps({"recipe": "two-machines", "state": state, "num_machines": 2,
                                               "started": time.time() if started is None else started,
                                               "stages": stages}))  # fmt: skip


def test_a_machine_given_another_recipe_stops_naming_the_stage(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    loaded = load_recipe(recipe)
    stages = [{"name": p.config.name, "fingerprint": p.fingerprint, "run": True} for p in plan(loaded, tmp_path, None)]
    stages[1]["fingerprint"] = "another"  # machine 0 runs `second` with other settings
    write_plan(tmp_path / "run", stages)
    with pytest.raises(StageFailed, match=r"recipe differs from machine 0's \(second\)"):
        follow_run(loaded, tmp_path / "run", lambda _: None, Machines(2, 1, "127.0.0.1"))


def test_an_earlier_runs_plan_is_not_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    loaded = load_recipe(recipe)
    stages = [{"name": p.config.name, "fingerprint": p.fingerprint, "run": True} for p in plan(loaded, tmp_path, None)]
    write_plan(tmp_path / "run", stages, state="ended")
    monkeypatch.setenv("ALIGN_MACHINE_WAIT_S", "1")
    with pytest.raises(StageFailed, match="machine 0 started no run"):
        follow_run(loaded, tmp_path / "run", lambda _: None, Machines(2, 1, "127.0.0.1"))


def test_machines_come_from_slurm_and_torchrun_environments() -> None:
    assert Machines.from_env({"SLURM_NNODES": "4", "SLURM_NODEID": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "29501"}) \
        == Machines(4, 2, "n1", 29501)  # fmt: skip
    assert Machines.from_env({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}) == Machines(2, 1, "10.0.0.1")
    assert Machines.from_env({"SLURM_NNODES": "1", "SLURM_NODEID": "0"}) == Machines()
    assert Machines(2, 2, "n1").problems() == ["--machine-rank must be in 0..1, not 2"]
    assert "--main-process-ip" in Machines(2, 1).problems()[0]


def test_align_run_refuses_a_machine_rank_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from align.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    assert main(["run", str(recipe), "--num-machines", "2", "--machine-rank", "3", "--main-process-ip", "h"]) == 2
    assert "--machine-rank must be in 0..1, not 3" in capsys.readouterr().err


@pytest.mark.slow
def test_the_slurm_example_runs_a_recipe_on_two_nodes(tmp_path: Path) -> None:
    """examples/slurm/align.sbatch under stand-ins for `srun` (one task per "node", each with its
    SLURM_NODEID) and `scontrol` (the job's first host), as SLURM would start it with --nodes 2."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\necho 127.0.0.2\n")
    (bin_dir / "srun").write_text("#!/bin/bash\nshift  # --kill-on-bad-exit=1\n"
                                  "SLURM_NODEID=1 \"$@\" > node1.log 2>&1 & follower=$!\n"
                                  "SLURM_NODEID=0 \"$@\"; main=$?\nwait $follower; exit $(( main || $? ))\n")  # fmt: skip
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: slurm\nseed: 0\nmodel: align:tiny\nstages:\n"
                      + STAGE.format(name="sft", model="align:tiny", configs=ROOT / "accelerate_configs"))  # fmt: skip
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[1-2]", "MASTER_PORT": str(free_port()),
           "RUN_DIR": str(tmp_path / "run"), "ALIGN": sys.executable}  # fmt: skip
    env.pop("ACCELERATE_USE_CPU", None)
    # `align` of this checkout (not necessarily installed): python -m align.cli
    script = (ROOT / "examples" / "slurm" / "align.sbatch").read_text().replace('"$ALIGN" run', '"$ALIGN" -m align.cli run')
    (tmp_path / "job.sbatch").write_text(script)
    done = subprocess.run(["bash", str(tmp_path / "job.sbatch"), str(recipe)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:] + (tmp_path / "node1.log").read_text()[-2000:]
    record = art.Manifest.read(tmp_path / "run").record("sft")  # type: ignore[union-attr]
    assert (record.status, record.world_size, record.num_machines) == (art.COMPLETE, 2, 2)
