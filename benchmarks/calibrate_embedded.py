"""Calibrate the embedded default: SFT → held-out eval → GRPO → held-out eval, with plain TRL.

Goal: SFT lands at a *partial* held-out greedy accuracy in about a minute on a 2-core CPU, and GRPO
started from that checkpoint raises it by 25 points or more in a few minutes.

    OMP_NUM_THREADS=1 python benchmarks/calibrate_embedded.py            # the calibrated defaults
    OMP_NUM_THREADS=1 python benchmarks/calibrate_embedded.py --seed 2 --eval-every-grpo 20 --control-steps 60

Prints one ``SUMMARY {json}`` line at the end (accuracies, curves, wall times, parameter count).
``--sft-dir`` starts GRPO from a saved SFT checkpoint (``--out DIR`` keeps them) to tune GRPO alone;
``--control-steps`` adds a reference: more SFT on gold traces at the GRPO lr from the same checkpoint.
Eval is greedy, batched, left-padded, on ``--eval-n`` distinct held-out (``test`` split) problems.

Defaults (calibrated): ``align:tiny`` (Llama, hidden 128, 4 layers, 4 heads, MLP 384, vocab 384,
902,272 parameters); task ``align:arithmetic`` a+b, a,b ∈ 0..99, column trace
(``<think>7+8=15 4+3+1=8</think><answer>85</answer>``, ~22 completion tokens); SFT 225 steps,
batch 32, lr 1e-3 **constant**; GRPO 60 steps, 16 prompts × 8 generations, lr 3e-5 constant,
temperature 1.0, β 0, max 32 completion tokens, rewards accuracy + strict format (weights 1, 1).

Measured (2 shared cores, 1 thread, transformers 5.24, TRL 1.16; walls drift ±40 % with the load;
300 held-out problems; a seed gives the same SFT checkpoint run after run):

    seed  SFT 225 steps        GRPO                            gain    control SFT (same lr, 5 s)
    0     65.7 %  (35 s)       96.3 %  (60 steps, 91 s)        +30.7   99.7 %
    1     35.7 %  (63 s*)      85.0 %  (40 steps, 56 s)        +49.3   91.3 % (40 steps)
    2     46.0 %  (41 s)       86.0 %  (60 steps, 116 s)       +40.0   90.3 %
    0     8.3 % (200 steps)    32.3 %  (60 steps, 96 s)        +24.0   -
    1     38.3 % (200 steps)   73.3 %  (60 steps, 98 s)        +35.0   -
    * with held-out evals every 25 steps inside the timing
    baseline (field notes): a,b ≤ 30, trace ``a+b=c``: 41.5 % → 50.0 % (+8.5) in 300 GRPO steps

Findings that shaped the defaults:

* Learning the column trace is a phase transition (near 0 % until ~150 steps, 50–80 % by ~250); where it
  happens moves by ±25 steps with the seed and the data order, so a fixed step count lands anywhere
  from ~10 % to ~65 % (200 steps: 8 / 38 / 10 / 51 % for seeds 0–3; 225 steps: 66 / 36 / 46 %).
* SFT must end with a **constant** lr: a cosine-decayed run (250 steps) reached 42 % greedy but only
  3 % accuracy when sampled at temperature 1.0, and GRPO from it collapsed to 9 %. The constant-lr
  checkpoints sample at 20–30 % accuracy, enough group variance for GRPO to learn from.
* GRPO lr: 3e-5 and 1e-4 both work (38 → 72–73 % in 40–60 steps); 5e-4 collapsed to 0 % within ten
  steps. 16 prompts per step (128 completions, ~1.3–1.9 s/step) rather than 4 keeps the signal usable.
* The control column is the honest caveat: the gain is largely the consolidation of a checkpoint
  caught mid-transition, and a few seconds of low-lr SFT on gold traces does it as well or better.
  GRPO earns it from rewards alone, which is what the demo needs to show.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import sys  # noqa: E402

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
)

from align.embedded import EMBEDDED_MODELS, make_task_dataset  # noqa: E402
from align.embedded import tasks as embedded_tasks  # noqa: E402
from align.embedded.model import ModelSpec, count_parameters, write_model_dir  # noqa: E402
from align.embedded.tokenizer import train_tokenizer  # noqa: E402

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
STRICT_FORMAT_RE = re.compile(r"<think>[^<>]*</think><answer>[^<>]*</answer>")


def _text(completion: Any) -> str:
    return completion[0]["content"] if isinstance(completion, list) else str(completion)


def answer_of(text: str) -> str | None:
    match = ANSWER_RE.search(text)
    return match.group(1).strip() if match else None


def accuracy_reward(completions: list[Any], solution: list[str], **_: Any) -> list[float]:
    return [float(answer_of(_text(c)) == s) for c, s in zip(completions, solution, strict=True)]


def format_reward(completions: list[Any], **_: Any) -> list[float]:
    return [float(STRICT_FORMAT_RE.fullmatch(_text(c).strip()) is not None) for c in completions]


@torch.no_grad()
def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Any,
    max_new_tokens: int,
    batch_size: int = 128,
) -> dict[str, Any]:
    """Greedy held-out accuracy, overall and by difficulty."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    correct: list[bool] = []
    samples: list[str] = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        texts = [
            tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in rows["prompt"]
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        decoded = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += [answer_of(d) == s for d, s in zip(decoded, rows["solution"], strict=True)]
        samples += decoded
    if was_training:
        model.train()
    by_diff: dict[int, list[bool]] = {}
    for ok, diff in zip(correct, dataset["difficulty"], strict=True):
        by_diff.setdefault(diff, []).append(ok)
    return {
        "accuracy": sum(correct) / max(len(correct), 1),
        "by_difficulty": {d: round(sum(v) / len(v), 3) for d, v in sorted(by_diff.items())},
        "samples": samples[:3],
    }


class EvalCallback(TrainerCallback):
    """Held-out greedy accuracy every ``every`` steps, to see the learning curve in one run."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, dataset: Any, every: int, max_new_tokens: int, tag: str
    ):
        self.tokenizer, self.dataset, self.every = tokenizer, dataset, every
        self.max_new_tokens, self.tag = max_new_tokens, tag
        self.curve: list[tuple[int, float]] = []

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: PreTrainedModel | None = None, **kw: Any
    ) -> None:
        if self.every and model is not None and state.global_step % self.every == 0:
            acc = evaluate(model, self.tokenizer, self.dataset, self.max_new_tokens)["accuracy"]
            self.curve.append((state.global_step, round(acc, 3)))
            print(f"[{self.tag}] step {state.global_step}: held-out accuracy {acc:.3f}", flush=True)


def build_model_dir(args: argparse.Namespace, workdir: Path) -> Path:
    base = EMBEDDED_MODELS[args.model]
    spec = ModelSpec(
        hidden_size=args.hidden or base.hidden_size,
        intermediate_size=args.intermediate or base.intermediate_size,
        num_hidden_layers=args.layers or base.num_hidden_layers,
        num_attention_heads=args.heads or base.num_attention_heads,
        num_key_value_heads=args.heads or base.num_key_value_heads,
        max_position_embeddings=base.max_position_embeddings,
        tokenizer=base.tokenizer,
    )
    path = workdir / "init"
    path.mkdir()
    write_model_dir(path, args.model, spec, args.seed, train_tokenizer(spec.tokenizer))
    return path


def task_params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "min_operand": args.min_operand,
        "max_operand": args.max_operand,
        "num_operands": args.num_operands,
        "ops": args.ops,
        "trace": args.trace,
    }


def cpu_trainer_args(args: argparse.Namespace) -> dict[str, Any]:
    """What SFTConfig and GRPOConfig share here: one seeded CPU process, no decay, saves or reporting."""
    return {"weight_decay": 0.0, "save_strategy": "no", "report_to": [], "bf16": False,
            "gradient_checkpointing": False, "use_cpu": True, "seed": args.seed, "dataloader_num_workers": 0,
            "disable_tqdm": True}


def run_sft(
    args: argparse.Namespace,
    init_dir: Path,
    out_dir: Path,
    test: Any,
    *,
    steps: int,
    batch: int,
    lr: float,
    scheduler: str,
    warmup: int = 0,
    data_seed: int = 0,
    tag: str = "sft",
) -> dict[str, Any]:
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    model = AutoModelForCausalLM.from_pretrained(init_dir)
    train = make_task_dataset("align:arithmetic", "train", steps * batch, seed=data_seed, **task_params(args))
    config = SFTConfig(
        output_dir=str(out_dir / f"{tag}-run"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type=scheduler,
        warmup_steps=warmup,
        logging_steps=max(steps // 10, 1),
        **cpu_trainer_args(args),
    )
    every = args.eval_every_sft if tag == "sft" else 0
    callback = EvalCallback(tokenizer, test, every, args.max_completion_length, tag)
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=train, processing_class=tokenizer, callbacks=[callback]
    )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    result: dict[str, Any] = {"wall_s": round(wall, 1), "curve": callback.curve}
    if tag == "sft":
        sft_dir = out_dir / "sft"
        trainer.save_model(str(sft_dir))
        tokenizer.save_pretrained(str(sft_dir))
        result["dir"] = str(sft_dir)
    else:
        result["accuracy"] = evaluate(trainer.model, tokenizer, test, args.max_completion_length)["accuracy"]
    return result


def run_grpo(args: argparse.Namespace, sft_dir: Path, out_dir: Path, test: Any) -> dict[str, Any]:
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    model = AutoModelForCausalLM.from_pretrained(sft_dir)
    prompts_per_step = args.grpo_prompts
    train = make_task_dataset(
        "align:arithmetic",
        "train",
        args.grpo_steps * prompts_per_step,
        seed=args.seed + 1,
        **task_params(args),
    ).remove_columns(["completion"])
    config = GRPOConfig(
        output_dir=str(out_dir / "grpo-run"),
        max_steps=args.grpo_steps,
        per_device_train_batch_size=prompts_per_step * args.num_generations,
        num_generations=args.num_generations,
        learning_rate=args.grpo_lr,
        lr_scheduler_type=args.grpo_scheduler,
        warmup_steps=0,
        beta=0.0,
        temperature=args.temperature,
        max_completion_length=args.max_completion_length,
        num_iterations=args.num_iterations,
        loss_type=args.loss_type,
        scale_rewards=args.scale_rewards,
        logging_steps=max(args.grpo_steps // 10, 1),
        **cpu_trainer_args(args),
    )
    callback = EvalCallback(tokenizer, test, args.eval_every_grpo, args.max_completion_length, "grpo")
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[accuracy_reward, format_reward],
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    rewards = [
        h["rewards/accuracy_reward/mean"]
        for h in trainer.state.log_history
        if "rewards/accuracy_reward/mean" in h
    ]
    return {
        "wall_s": round(wall, 1),
        "curve": callback.curve,
        "sampled_accuracy": [round(r, 3) for r in rewards],
        "model": trainer.model,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="align:tiny", choices=sorted(EMBEDDED_MODELS))
    p.add_argument("--hidden", type=int, default=0, help="override hidden size (0: the embedded spec's)")
    p.add_argument("--intermediate", type=int, default=0)
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--heads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    # Task
    p.add_argument("--min-operand", type=int, default=embedded_tasks.DEFAULT_MIN_OPERAND)
    p.add_argument("--max-operand", type=int, default=embedded_tasks.DEFAULT_MAX_OPERAND)
    p.add_argument("--num-operands", type=int, default=embedded_tasks.DEFAULT_NUM_OPERANDS)
    p.add_argument("--ops", default=embedded_tasks.DEFAULT_OPS)
    p.add_argument("--trace", default=embedded_tasks.DEFAULT_TRACE, choices=embedded_tasks.TRACE_STYLES)
    # SFT
    p.add_argument("--sft-steps", type=int, default=225)
    p.add_argument("--sft-batch", type=int, default=32)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--sft-scheduler", default="constant")
    p.add_argument("--sft-warmup", type=int, default=0)
    p.add_argument("--sft-dir", default="", help="skip SFT, start GRPO from this checkpoint")
    # GRPO
    p.add_argument("--grpo-steps", type=int, default=60)
    p.add_argument("--grpo-prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--grpo-lr", type=float, default=3e-5)
    p.add_argument("--grpo-scheduler", default="constant")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--num-iterations", type=int, default=1)
    p.add_argument("--loss-type", default="dapo")
    p.add_argument("--scale-rewards", default="group")
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument(
        "--control-steps",
        type=int,
        default=0,
        help="also continue SFT from the checkpoint for this many steps at the GRPO lr (a reference)",
    )
    # Eval
    p.add_argument("--eval-n", type=int, default=300)
    p.add_argument("--eval-every-sft", type=int, default=0)
    p.add_argument("--eval-every-grpo", type=int, default=0)
    p.add_argument("--out", default="", help="keep checkpoints here (default: a temp dir, deleted)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    workdir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="align-calib-"))
    workdir.mkdir(parents=True, exist_ok=True)
    test = make_task_dataset("align:arithmetic", "test", args.eval_n, seed=args.seed, **task_params(args))
    summary: dict[str, Any] = {"args": vars(args)}
    try:
        if args.sft_dir:
            sft_dir = Path(args.sft_dir)
        else:
            init_dir = build_model_dir(args, workdir)
            model = AutoModelForCausalLM.from_pretrained(init_dir)
            summary["num_parameters"] = count_parameters(model)
            sft = run_sft(
                args,
                init_dir,
                workdir,
                test,
                steps=args.sft_steps,
                batch=args.sft_batch,
                lr=args.sft_lr,
                scheduler=args.sft_scheduler,
                warmup=args.sft_warmup,
                data_seed=args.seed,
            )
            sft_dir = Path(sft.pop("dir"))
            summary["sft"] = sft
        tokenizer = AutoTokenizer.from_pretrained(sft_dir)
        model = AutoModelForCausalLM.from_pretrained(sft_dir)
        start = time.perf_counter()
        before = evaluate(model, tokenizer, test, args.max_completion_length)
        summary["eval_wall_s"] = round(time.perf_counter() - start, 1)
        summary["before"] = before
        print(
            f"after SFT: held-out greedy accuracy {before['accuracy']:.3f} {before['by_difficulty']}",
            flush=True,
        )
        if args.control_steps > 0:
            # Reference for the GRPO gain: the same checkpoint, more SFT on gold traces at the GRPO lr.
            summary["control_sft"] = run_sft(
                args,
                sft_dir,
                workdir,
                test,
                steps=args.control_steps,
                batch=args.grpo_prompts,
                lr=args.grpo_lr,
                scheduler=args.grpo_scheduler,
                data_seed=args.seed + 1,
                tag="control",
            )
            print(
                f"control SFT: held-out greedy accuracy {summary['control_sft']['accuracy']:.3f}", flush=True
            )
        if args.grpo_steps > 0:
            grpo = run_grpo(args, sft_dir, workdir, test)
            after = evaluate(grpo.pop("model"), tokenizer, test, args.max_completion_length)
            summary["grpo"] = grpo
            summary["after"] = after
            summary["gain_points"] = round(100 * (after["accuracy"] - before["accuracy"]), 1)
            print(
                f"after GRPO: held-out greedy accuracy {after['accuracy']:.3f} {after['by_difficulty']}",
                flush=True,
            )
    finally:
        if not args.out:
            shutil.rmtree(workdir, ignore_errors=True)
    print("SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
