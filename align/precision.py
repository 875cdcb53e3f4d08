"""The precision policy, in one place.

- A model a stage trains keeps float32 weights (the optimiser's master copy); compute runs under
  bf16 or fp16 autocast when the device does it (TRL's `bf16` / `fp16` flags, Accelerate's
  `mixed_precision`). Pure bf16 weights with AdamW lose every update smaller than the weights'
  precision (field notes: 10 steps at lr 3e-6 changed 3.8 % of bf16 weights, 99.99 % of fp32 ones),
  so they are used only when a stage asks for it (`pure_bf16: true`, LLaMA-Factory's name).
  DeepSpeed and FSDP keep their own fp32 masters whatever the loaded dtype. Under LoRA only the
  adapter learns: the frozen base loads like a frozen model and PEFT keeps the adapter in float32.
- A frozen model (reward model, teacher, sampler) loads in the compute dtype: bf16 on a bf16 GPU,
  fp16 on an fp16-only GPU, float32 on the CPU — or in the `dtype` its spec names (`auto`: the
  checkpoint's own dtype, as Hugging Face means it). A KL or DPO reference is the exception: it
  loads as the policy does, so that under the same autocast the two agree exactly at the start.
- A trained model is saved in the dtype its spec names, else in the dtype of the checkpoint it
  started from (a bf16 hub model comes back bf16; the embedded fp32 models stay fp32).

By default bf16/fp16 are decided by the device: bf16 on a GPU that supports it, fp16 on one that
does not, off on the CPU (where bf16 autocast runs too, when a stage sets `bf16: true`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

MixedPrecision = Literal["bf16", "fp16", "no"]
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Device:
    """What the device can compute in (faked in tests)."""

    cuda: bool
    bf16: bool

    @classmethod
    def current(cls) -> Device:
        import torch

        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, bf16=bool(cuda and torch.cuda.is_bf16_supported()))


@dataclass(frozen=True)
class Precision:
    """How a stage computes, and in which dtypes it loads what it trains and what it only runs."""

    mixed: MixedPrecision
    pure_bf16: bool = False

    @property
    def trainable_dtype(self) -> str:
        return "bfloat16" if self.pure_bf16 else "float32"

    @property
    def frozen_dtype(self) -> str:
        return {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}[self.mixed]

    @property
    def trl_flags(self) -> dict[str, bool]:
        """TRL/transformers' `bf16` and `fp16` arguments."""
        return {"bf16": self.mixed == "bf16", "fp16": self.mixed == "fp16"}


class PrecisionError(ValueError):
    """A precision setting the device cannot run."""


def precision_policy(
    bf16: bool | None = None, fp16: bool | None = None, pure_bf16: bool = False, device: Device | None = None
) -> Precision:
    """The precision a stage runs with, from its `bf16` / `fp16` / `pure_bf16` keys and the device."""
    device = device or Device.current()
    if bf16 and fp16:
        raise PrecisionError("bf16 and fp16 are both on; choose one")
    if pure_bf16 and (bf16 is False or fp16):
        raise PrecisionError("pure_bf16 trains bf16 weights: it needs bf16 compute (leave bf16 unset or true, fp16 off)")
    if bf16 or pure_bf16:
        if device.cuda and not device.bf16:
            raise PrecisionError("this GPU does not compute in bf16; set fp16: true (or bf16: false)")
        return Precision("bf16", pure_bf16)
    if fp16:
        if not device.cuda:
            raise PrecisionError("fp16 mixed precision needs a GPU; on the CPU use bf16: true or leave both unset")
        return Precision("fp16")
    if bf16 is None and fp16 is None and device.cuda:
        return Precision("bf16" if device.bf16 else "fp16")
    return Precision("no")


def checkpoint_dtype(path: str) -> str | None:
    """The dtype a local checkpoint was saved in (its config.json, or its adapter's base), or None."""
    folder = Path(path)
    config = folder / "config.json"
    if not config.exists() and (folder / "adapter_config.json").exists():
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        return checkpoint_dtype(base) if base else None
    if not config.exists():
        return None
    raw = json.loads(config.read_text(encoding="utf-8"))
    value = raw.get("dtype") or raw.get("torch_dtype") or raw.get("text_config", {}).get("dtype")
    return value if value in DTYPE_NAMES else None
