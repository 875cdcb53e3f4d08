"""The embedded default: a tokenizer, tiny models and synthetic tasks that need no model hub.

Model names start with ``align:`` (``align:tiny``, the default policy / teacher, and
``align:tiny-student``, a quarter of its size or less with the same tokenizer, for distillation).
:func:`embedded_model_path` builds a name into a directory that ``AutoModelForCausalLM`` and
``AutoTokenizer`` load with ``from_pretrained``; reward and value models load sequence-classification
heads from the same directory.

This module imports no torch / transformers / datasets at import time, so recipe validation can call
:func:`is_embedded` cheaply.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from align.embedded.model import MARKER_FILE, ModelSpec
from align.embedded.tasks import EMBEDDED_TASKS, is_embedded_task, make_task_dataset

EMBEDDED_PREFIX = "align:"

EMBEDDED_MODELS: dict[str, ModelSpec] = {
    "align:tiny": ModelSpec(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        description="default policy / teacher (Llama, 902,272 parameters)",
    ),
    "align:tiny-student": ModelSpec(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        description="distillation student, same tokenizer (184,768 parameters, ~1/5 of align:tiny)",
    ),
}

__all__ = [
    "EMBEDDED_MODELS",
    "EMBEDDED_PREFIX",
    "EMBEDDED_TASKS",
    "ModelSpec",
    "default_cache_root",
    "embedded_model_path",
    "is_embedded",
    "is_embedded_task",
    "make_task_dataset",
    "read_marker",
]


def is_embedded(name: str) -> bool:
    """True for model names the embedded default serves (``align:...``), known or not."""
    return isinstance(name, str) and name.startswith(EMBEDDED_PREFIX)


def default_cache_root() -> Path:
    """``$ALIGN_CACHE/embedded`` if set, else ``~/.cache/align/embedded``."""
    base = os.environ.get("ALIGN_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "align") / "embedded"


def _is_complete(directory: Path) -> bool:
    return (directory / MARKER_FILE).is_file()


def _publish(tmp: Path, final: Path) -> None:
    """Rename a complete build into place; if another builder got there first, keep theirs."""
    # mkdtemp makes the folder owner-only; a shared cache should be readable like any other folder.
    os.chmod(tmp, 0o755)
    try:
        os.replace(tmp, final)
    except OSError:
        # A non-empty ``final`` cannot be replaced: another process renamed its build in first.
        if not _is_complete(final):
            raise


def embedded_model_path(name: str, seed: int = 0, cache_dir: Path | None = None) -> Path:
    """Directory holding the built model + tokenizer for ``name``; built on first use.

    ``cache_dir`` is the folder that holds the model directories (default :func:`default_cache_root`);
    each one is ``<name>-<seed>-<spec hash>`` with ``:`` replaced by ``-``. The build goes into a
    temporary sibling directory that is renamed into place only once complete, so a crashed build
    never passes for a finished one and concurrent builders do not clash (the first rename wins and
    the others discard their copy, which is identical anyway).
    """
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED_MODELS))}")
    spec = EMBEDDED_MODELS[name]
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    final = root / f"{name.replace(':', '-')}-{seed}-{spec.spec_hash()}"
    if _is_complete(final):
        return final

    root.mkdir(parents=True, exist_ok=True)
    if final.exists():
        # Not ours to trust (no marker): move it aside rather than build on top of it.
        stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale-", dir=root))
        with contextlib.suppress(OSError):
            os.replace(final, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)

    from align.embedded.model import write_model_dir
    from align.embedded.tokenizer import train_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        write_model_dir(tmp, name, spec, seed, train_tokenizer(spec.tokenizer))
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_marker(directory: Path) -> dict[str, object]:
    """The build record (name, seed, spec, parameter count and checksum) of a built directory."""
    return json.loads((Path(directory) / MARKER_FILE).read_text(encoding="utf-8"))
