"""align's PPO against the last TRL PPO (`trl==1.12.0`, `trl.experimental.ppo.PPOTrainer`), back to back.

    OMP_NUM_THREADS=1 python benchmarks/ppo_vs_trl.py [--steps 24] [--batch 8] [--response-length 32]

TRL 1.12 is installed by this script into its own throwaway virtualenv (default
/tmp/align-bench-trl112, `--system-site-packages` with torch pinned to the installed version, so no
other torch is pulled); align's PPO runs with the system's packages. Both get the same tiny policy
(= reference), the same value and reward models (one sequence-classification checkpoint built from
the policy, saved once), the same prompts, rollouts per step, response length, PPO epochs, mini-batch
layout, learning rate, temperature and KL settings, one torch thread each, and run one after the other
in fresh processes. Time is the training loop only (model loading and imports excluded) divided by
steps; memory is each process's peak RSS. The last two lines printed are

    time_ratio=<ours/theirs>
    memory_ratio=<ours/theirs>

Goals: time_ratio ≤ 0.6, memory_ratio ≤ 1.0. Not part of CI (it installs packages).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETUP = """
import os, sys, json, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_DISABLED"] = "true"
import torch
torch.set_num_threads(1)
cfg = json.loads(sys.argv[1])
def peak_rss_mb():
    # VmHWM, not ru_maxrss: the latter also counts the forking parent's footprint from before exec.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
"""

OURS = SETUP + """
sys.path.insert(0, cfg["root"])
from pathlib import Path
from align.artifacts import MetricsWriter, StageContext
from align.stages.ppo import Config, run

out = Path(cfg["work"]) / "ours"
out.mkdir(parents=True, exist_ok=True)
config = Config(
    name="ppo", model=cfg["policy"], reward_model=cfg["reward"], value_model=cfg["reward"],
    dataset={"path": cfg["prompts"]}, per_device_train_batch_size=cfg["batch"], gradient_accumulation_steps=1,
    num_mini_batches=1, num_ppo_epochs=cfg["epochs"], max_steps=cfg["steps"], response_length=cfg["length"],
    temperature=cfg["temperature"], learning_rate=cfg["lr"], kl_coef=0.05, lam=0.95, gamma=1.0,
    local_rollout_forward_batch_size=cfg["batch"], logging_steps=10**6, num_sample_rollouts=0,
)
ctx = StageContext(out, out, out, 0, MetricsWriter(out / "metrics.jsonl"))
metrics = run(config, ctx)
print("RESULT " + json.dumps({"train_s": metrics["train_runtime_s"], "steps": metrics["steps"],
                              "peak_rss_mb": peak_rss_mb()}))
"""

THEIRS = SETUP + """
import trl
assert trl.__version__ == "1.12.0", trl.__version__
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl.experimental.ppo import PPOConfig, PPOTrainer

tokenizer = AutoTokenizer.from_pretrained(cfg["policy"], padding_side="left")
from datasets import load_from_disk
prompts = load_from_disk(cfg["prompts"])["prompt"]
texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]  # exactly what align's rollouts use
dataset = Dataset.from_dict({"input_ids": ids})
args = PPOConfig(
    output_dir=os.path.join(cfg["work"], "theirs"), per_device_train_batch_size=cfg["batch"],
    gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=cfg["epochs"],
    total_episodes=cfg["batch"] * cfg["steps"], response_length=cfg["length"], temperature=cfg["temperature"],
    learning_rate=cfg["lr"], kl_coef=0.05, lam=0.95, gamma=1.0, stop_token="eos",
    local_rollout_forward_batch_size=cfg["batch"], num_sample_generations=0, logging_steps=10**6,
    save_strategy="no", report_to="none", bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
    seed=0, disable_tqdm=True,
)
policy = AutoModelForCausalLM.from_pretrained(cfg["policy"])
reference = AutoModelForCausalLM.from_pretrained(cfg["policy"])
value = AutoModelForSequenceClassification.from_pretrained(cfg["reward"], num_labels=1)
reward = AutoModelForSequenceClassification.from_pretrained(cfg["reward"], num_labels=1)
trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=reference, reward_model=reward,
                     value_model=value, train_dataset=dataset)
start = time.perf_counter()
trainer.train()
train_s = time.perf_counter() - start
print("RESULT " + json.dumps({"train_s": train_s, "steps": cfg["steps"], "peak_rss_mb": peak_rss_mb()}))
"""


def ensure_venv(path: Path) -> Path:
    """A virtualenv that sees the system's packages but has trl==1.12.0 of its own."""
    python = path / "bin" / "python"
    probe = [str(python), "-c", "import trl; assert trl.__version__ == '1.12.0'"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    import torch

    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(path)], check=True)
    torch_pin = f"torch=={torch.__version__}"  # keeps pip from pulling a CUDA build of torch
    subprocess.run([str(python), "-m", "pip", "install", "-q", "trl==1.12.0", torch_pin], check=True)
    subprocess.run(probe, check=True)
    return python


def build_models(work: Path) -> tuple[str, str]:
    """The embedded tiny policy, and one sequence-classification copy of it as value and reward model."""
    sys.path.insert(0, str(ROOT))
    from align.embedded import embedded_model_path
    from align.models import load_sequence_classifier, load_tokenizer
    from align.recipe.schema import ModelSpec

    policy = str(embedded_model_path("align:tiny"))
    spec = ModelSpec(name_or_path=policy)
    reward_dir = work / "reward"
    model = load_sequence_classifier(spec)
    model.save_pretrained(reward_dir)
    load_tokenizer(spec).save_pretrained(reward_dir)
    return policy, str(reward_dir)


def write_prompts(work: Path, count: int) -> str:
    """The prompts as a `save_to_disk` folder, which both sides load the same way (memory-mapped)."""
    from align.embedded.tasks import make_task_dataset

    path = work / "prompts"
    make_task_dataset("align:arithmetic", "train", count, seed=0).select_columns(["prompt"]).save_to_disk(str(path))
    return str(path)


def run_side(python: str, script: str, cfg: dict[str, object], name: str) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([python, "-c", script, json.dumps(cfg)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"{name} failed (exit {done.returncode})")
    line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8, help="rollouts per step")
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4, help="PPO epochs per step")
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "align-bench-trl112")
    args = parser.parse_args()

    python_trl = ensure_venv(args.venv)
    with tempfile.TemporaryDirectory(prefix="align-ppo-bench-") as tmp:
        work = Path(tmp)
        policy, reward = build_models(work)
        cfg = {"root": str(ROOT), "work": str(work), "policy": policy, "reward": reward,
               "prompts": write_prompts(work, args.batch * args.steps), "batch": args.batch, "steps": args.steps,
               "length": args.response_length, "epochs": args.epochs, "temperature": 0.7, "lr": 3e-6}
        theirs = run_side(str(python_trl), THEIRS, cfg, "trl 1.12 PPO")
        ours = run_side(sys.executable, OURS, cfg, "align PPO")

    per_step = {name: side["train_s"] / side["steps"] for name, side in (("ours", ours), ("theirs", theirs))}
    print(textwrap.dedent(f"""\
        setup: {args.steps} steps × {args.batch} rollouts × {args.response_length} tokens, {args.epochs} PPO epochs,
               tiny Llama policy/reference/value/reward (align:tiny), 1 torch thread each
        align PPO      : {per_step['ours']:.3f} s/step, peak RSS {ours['peak_rss_mb']:.0f} MB
        trl 1.12 PPO   : {per_step['theirs']:.3f} s/step, peak RSS {theirs['peak_rss_mb']:.0f} MB"""))
    print(f"time_ratio={per_step['ours'] / per_step['theirs']:.3f}")
    print(f"memory_ratio={ours['peak_rss_mb'] / theirs['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    main()
