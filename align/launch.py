"""Starting a prepared stage: in this process, in a fresh Python, or under `accelerate launch`. The
stage's scratch folder already holds its resolved config (`align.execute.write_stage_config`); every
launcher runs the same `align.execute` on it. Never imports the runner."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from align import artifacts as art
from align.execute import execute_stage, rank_errors, read_stage_config
from align.launch_config import launch_config_problems, read_launch_config
from align.preempt import EXIT_INTERRUPTED, Interrupted
from align.recipe.errors import KeyPath
from align.recipe.schema import LauncherSpec, StageConfig, TrainingKnobs

logger = logging.getLogger("align")


class StageProcessError(RuntimeError):
    """A stage process (or one of its ranks) exited with an error; the message is the ranks' own."""


def launcher_problems(spec: LauncherSpec, base_dir: Path, stage: StageConfig | None = None) -> list[tuple[KeyPath, str]]:
    """What is wrong with a launcher (with a `stage`: also with that stage under it), key paths relative
    to the launcher; the accelerate config file is checked by `align.launch_config`."""
    problems: list[tuple[KeyPath, str]] = []
    if spec.type != "accelerate":
        for key in ("config_file", "num_processes", "main_process_port"):
            if getattr(spec, key) is not None:
                problems.append(((key,), f"'{key}' only applies to launcher type 'accelerate'"))
        return problems
    return launch_config_problems(spec, base_dir, stage)


#: The launch config align writes into a stage's scratch folder: the user's file with what this
#: launch overrides (process count, mixed precision, machine) and, on a machine without GPUs, what
#: makes it run on the CPU. `accelerate launch` reads this one.
LAUNCH_CONFIG = "accelerate_config.yaml"


@dataclass(frozen=True)
class Machines:
    """The machines one `align run` per node shares a run among (`--num-machines` …, or SLURM's and
    torchrun's environment): every node walks the same plan; machine 0 orchestrates, writes the
    manifest and publishes; each node launches its share of every multi-process stage."""

    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None

    @property
    def is_main(self) -> bool:
        return self.machine_rank == 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Machines:
        """SLURM (`SLURM_NNODES`, `SLURM_NODEID`) or torchrun-style (`NNODES`, `NODE_RANK`), with
        `MASTER_ADDR`/`MASTER_PORT` for the main node's address (SLURM has no variable for it: the
        sbatch script sets MASTER_ADDR, see examples/slurm)."""
        env = dict(os.environ) if env is None else env
        for count, rank in (("SLURM_NNODES", "SLURM_NODEID"), ("NNODES", "NODE_RANK")):
            if int(env.get(count, "1") or 1) > 1:
                port = env.get("MASTER_PORT")
                return cls(int(env[count]), int(env.get(rank, "0")), env.get("MASTER_ADDR"), int(port) if port else None)
        return cls()

    def problems(self) -> list[str]:
        found = []
        if self.num_machines < 1:
            found.append(f"--num-machines must be at least 1, not {self.num_machines}")
        elif not 0 <= self.machine_rank < self.num_machines:
            found.append(f"--machine-rank must be in 0..{self.num_machines - 1}, not {self.machine_rank}")
        if self.num_machines > 1 and not self.main_process_ip:
            found.append("several machines need --main-process-ip (or MASTER_ADDR): the address of machine 0")
        return found


ONE_MACHINE = Machines()


@dataclass
class Launch:
    """One `accelerate launch` as align starts it: the command, the environment it adds, and what align
    changed from the user's config (shown in the stage's log and on the console)."""

    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Variables of align's own environment the stage must not inherit.
    unset: list[str] = field(default_factory=list)


def accelerate_launch(spec: LauncherSpec, stage_dir: Path, base_dir: Path, mixed_precision: str,
                      cuda: bool | None = None, machines: Machines = ONE_MACHINE) -> Launch:  # fmt: skip
    """The `accelerate launch` of a stage. The shipped configs are GPU configs (8 processes, bf16); the
    same file runs here with the recipe's process count and the stage's own mixed precision, and on a
    machine without CUDA align makes it a CPU run: DDP becomes gloo DDP (`ACCELERATE_USE_CPU`, which
    must NOT be set for DeepSpeed: it would silently turn a ZeRO run into plain DDP — the TRL configs
    get `use_cpu` and DeepSpeed picks its CPU accelerator and gloo itself), one OpenMP thread per rank."""
    import yaml

    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    config = read_launch_config(spec, base_dir, strict=False)  # validated before the run started
    settings = dict(config.raw)
    if config.deepspeed_config_file is not None:  # Accelerate would resolve it from each rank's cwd
        settings["deepspeed_config"] = {**settings["deepspeed_config"], "deepspeed_config_file": str(config.deepspeed_config_file)}
    notes: list[str] = []
    processes = config.num_processes
    distributed = config.distributed_type.upper()
    if distributed == "NO" and processes > 1:
        distributed = "MULTI_GPU"  # `accelerate launch --num_processes 2` alone would start ONE process
    if distributed == "MULTI_CPU":
        distributed = "MULTI_GPU"  # accelerate's own CPU mode launches one process; gloo DDP is MULTI_GPU + use_cpu
    env: dict[str, str] = {}
    unset: list[str] = []
    if distributed == "DEEPSPEED" and os.environ.get("ACCELERATE_USE_CPU"):
        unset.append("ACCELERATE_USE_CPU")  # with it Accelerate silently runs plain DDP, not DeepSpeed
        notes.append("ACCELERATE_USE_CPU left out of the stage's environment: with it, DeepSpeed would become plain DDP")
    if not cuda:
        if distributed == "FSDP":
            raise StageProcessError(f"{spec.config_file}: FSDP needs GPUs (Accelerate never enables it on the CPU); "
                                    "on this machine use a DeepSpeed ZeRO-3 config (accelerate_configs/zero3.yaml)")
        if distributed == "MULTI_GPU":
            env["ACCELERATE_USE_CPU"] = "1"
            notes.append("no GPU here: DDP on the CPU over gloo (ACCELERATE_USE_CPU=1)")
        elif distributed == "DEEPSPEED":
            notes.append("no GPU here: DeepSpeed on its CPU accelerator over gloo (the trainer gets use_cpu)")
    if spec.config_file and settings.get("mixed_precision", "no") != mixed_precision:
        notes.append(f"mixed_precision {mixed_precision} (the stage's precision; the config file said "
                     f"{settings.get('mixed_precision', 'nothing')})")
    effective = {**settings, "distributed_type": distributed, "num_processes": processes,
                 "mixed_precision": mixed_precision, "use_cpu": False}  # fmt: skip
    effective.setdefault("compute_environment", "LOCAL_MACHINE")
    effective.setdefault("num_machines", 1)
    effective.setdefault("machine_rank", 0)
    if machines.num_machines > 1:
        if processes % machines.num_machines:
            raise StageProcessError(f"num_processes ({processes}) is the count over all machines: it must divide "
                                    f"evenly among {machines.num_machines} machines")
        effective.update(num_machines=machines.num_machines, machine_rank=machines.machine_rank,
                         main_process_ip=machines.main_process_ip, same_network=True,
                         rdzv_backend=effective.get("rdzv_backend") or "static")  # fmt: skip
        if machines.main_process_port:
            effective["main_process_port"] = machines.main_process_port
    # Every machine writes its own (the scratch folder is shared): they differ in machine_rank.
    path = stage_dir / (LAUNCH_CONFIG if machines.is_main else f"accelerate_config.machine{machines.machine_rank}.yaml")
    path.write_text(yaml.safe_dump(effective, sort_keys=True), encoding="utf-8")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path.resolve())]
    if spec.main_process_port:
        command += ["--main_process_port", str(spec.main_process_port)]
    return Launch(command + list(spec.extra_args), env, notes, unset)


def stage_command(spec: LauncherSpec, stage_dir: Path, base_dir: Path, mixed_precision: str = "no",
                  machines: Machines = ONE_MACHINE) -> Launch:  # fmt: skip
    tail = ["-m", "align.execute", str(stage_dir.resolve())]
    if spec.type == "subprocess":
        return Launch([sys.executable, *tail])
    launch = accelerate_launch(spec, stage_dir, base_dir, mixed_precision, machines=machines)
    launch.command += tail
    return launch


def stage_mixed_precision(stage_dir: Path) -> str:
    """The mixed precision the stage computes in ("no", "bf16", "fp16"), from its prepared config."""
    config, _, _ = read_stage_config(stage_dir)
    return config.precision().mixed if isinstance(config, TrainingKnobs) else "no"


def spans_machines(spec: LauncherSpec, machines: Machines) -> bool:
    """Whether every machine takes part in the stage (its `accelerate` launch); other stages run on
    machine 0 alone while the others wait."""
    return machines.num_machines > 1 and spec.type == "accelerate"


def launch_stage(spec: LauncherSpec, stage_dir: Path, base_dir: Path, machines: Machines = ONE_MACHINE) -> None:
    """Run the stage prepared in `stage_dir` (this machine's share of it); raise if it (or any of its
    ranks) failed, `Interrupted` if a signal stopped it after a checkpoint."""
    if spec.type == "inprocess":
        execute_stage(stage_dir)
        return
    mixed = stage_mixed_precision(stage_dir) if spec.type == "accelerate" else "no"
    launch = stage_command(spec, stage_dir, base_dir, mixed, machines if spans_machines(spec, machines) else ONE_MACHINE)
    env = {k: v for k, v in {**os.environ, **launch.env}.items() if k not in launch.unset}
    # Several ranks on few cores oversubscribe OpenMP badly (10–20× slower); one thread each unless told.
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = "1"
        if spec.type == "accelerate":
            launch.notes.append("OMP_NUM_THREADS=1 per rank (set OMP_NUM_THREADS to choose)")
    for note in launch.notes:
        logger.info("launcher: %s", note)
    with (stage_dir / art.LOG).open("a", encoding="utf-8") as log:
        log.write("".join(f"launcher: {note}\n" for note in launch.notes))
    # Its own process group, so a signal reaches the stage once — from here — not also from the terminal.
    process = subprocess.Popen(launch.command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)  # fmt: skip
    copier = threading.Thread(target=_tee, args=(process, stage_dir / art.LOG), daemon=True)
    copier.start()
    with _forwarding_signals(process):
        returncode = process.wait()
    copier.join(timeout=30)
    if returncode == 0:
        return
    reported = rank_errors(stage_dir)
    if returncode == EXIT_INTERRUPTED or (reported and all(": Interrupted: " in line for line in reported)):
        raise Interrupted(reported[0].split(": Interrupted: ", 1)[-1] if reported else "stopped by a signal")
    detail = "; ".join(reported) if reported else "it left no error message (see its log)"
    raise StageProcessError(f"stage process exited with status {returncode}: {detail}")


def _tee(process: subprocess.Popen[bytes], log_path: Path) -> None:
    """Every rank's own output (and the launcher's: a rank that died before align's logging started,
    torch.distributed's failure report) goes to the console as before and into the stage's log.txt,
    each line marked `| `, so a failed stage's log holds what its processes printed."""
    assert process.stdout is not None
    console = sys.stderr
    with log_path.open("a", encoding="utf-8") as log:
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            console.write(line)
            console.flush()
            log.write("| " + line if line.endswith("\n") else "| " + line + "\n")
            log.flush()


@contextmanager
def _forwarding_signals(process: subprocess.Popen[bytes]) -> Iterator[None]:
    """SIGTERM and SIGINT sent to `align run` go on to the stage's process group (every rank), which
    checkpoints and stops; `align run` itself waits for it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, frame: FrameType | None) -> None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
