"""Embedded models: deterministic builds, reload through the Auto classes, atomic cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.embedded import (
    EMBEDDED_MODELS,
    EMBEDDED_PREFIX,
    _publish,
    default_cache_root,
    embedded_model_path,
    is_embedded,
    read_marker,
)
from align.embedded.model import MARKER_FILE, count_parameters, parameter_checksum


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny_dir(cache: Path) -> Path:
    return embedded_model_path("align:tiny", cache_dir=cache)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_names() -> None:
    assert EMBEDDED_PREFIX == "align:"
    assert {"align:tiny", "align:tiny-student"} <= set(EMBEDDED_MODELS)
    assert is_embedded("align:tiny") and is_embedded("align:whatever")
    assert not is_embedded("Qwen/Qwen2.5-0.5B") and not is_embedded("./align:tiny")


def test_unknown_name_lists_known(cache: Path) -> None:
    with pytest.raises(ValueError, match="align:tiny-student"):
        embedded_model_path("align:huge", cache_dir=cache)


def test_reload_with_auto_classes(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert parameter_checksum(model) == read_marker(tiny_dir)["parameter_checksum"]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= prompt["input_ids"].shape[1] + 4


def test_parameter_counts(tiny_dir: Path, cache: Path) -> None:
    student_dir = embedded_model_path("align:tiny-student", cache_dir=cache)
    tiny = count_parameters(AutoModelForCausalLM.from_pretrained(tiny_dir))
    student = count_parameters(AutoModelForCausalLM.from_pretrained(student_dir))
    assert 500_000 <= tiny <= 5_000_000
    assert student * 4 <= tiny
    # Distillation needs one vocabulary for teacher and student.
    assert _file_digest(student_dir / "tokenizer.json") == _file_digest(tiny_dir / "tokenizer.json")


def test_build_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = embedded_model_path("align:tiny", cache_dir=tmp_path)
    assert again != tiny_dir
    assert read_marker(again)["parameter_checksum"] == read_marker(tiny_dir)["parameter_checksum"]
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        assert _file_digest(again / name) == _file_digest(tiny_dir / name), name


def test_seed_changes_weights_not_tokenizer(tiny_dir: Path, cache: Path) -> None:
    other = embedded_model_path("align:tiny", seed=1, cache_dir=cache)
    assert read_marker(other)["parameter_checksum"] != read_marker(tiny_dir)["parameter_checksum"]
    assert _file_digest(other / "tokenizer.json") == _file_digest(tiny_dir / "tokenizer.json")


def test_build_leaves_caller_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    embedded_model_path("align:tiny-student", cache_dir=tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_cached_dir_is_reused(tiny_dir: Path, cache: Path) -> None:
    marker = tiny_dir / MARKER_FILE
    before = marker.stat().st_mtime_ns
    assert embedded_model_path("align:tiny", cache_dir=cache) == tiny_dir
    assert marker.stat().st_mtime_ns == before


def test_dir_name_and_env_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path / "embedded"
    path = embedded_model_path("align:tiny-student")
    spec_hash = EMBEDDED_MODELS["align:tiny-student"].spec_hash()
    assert path == tmp_path / "embedded" / f"align-tiny-student-0-{spec_hash}"


def test_leftover_temp_dir_is_not_used(tmp_path: Path) -> None:
    spec_hash = EMBEDDED_MODELS["align:tiny-student"].spec_hash()
    final = tmp_path / f"align-tiny-student-0-{spec_hash}"
    # What a build killed half-way leaves behind: a temp sibling with some files but no marker.
    leftover = tmp_path / f".{final.name}.tmp-crashed"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    path = embedded_model_path("align:tiny-student", cache_dir=tmp_path)
    assert path == final and (final / MARKER_FILE).is_file()
    assert AutoModelForCausalLM.from_pretrained(final) is not None
    assert sorted(os.listdir(leftover)) == ["config.json"]


def test_incomplete_final_dir_is_rebuilt(tmp_path: Path) -> None:
    spec_hash = EMBEDDED_MODELS["align:tiny-student"].spec_hash()
    final = tmp_path / f"align-tiny-student-0-{spec_hash}"
    final.mkdir()
    (final / "config.json").write_text("{}")
    path = embedded_model_path("align:tiny-student", cache_dir=tmp_path)
    assert (path / MARKER_FILE).is_file()
    assert AutoModelForCausalLM.from_pretrained(path).config.model_type == "llama"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_publish_loses_race_gracefully(tmp_path: Path) -> None:
    final = tmp_path / "model"
    final.mkdir()
    (final / MARKER_FILE).write_text("{}")
    (final / "winner").write_text("1")
    loser = tmp_path / ".model.tmp-2"
    loser.mkdir()
    (loser / MARKER_FILE).write_text("{}")
    _publish(loser, final)
    assert (final / "winner").is_file()


def test_publish_raises_if_target_is_incomplete(tmp_path: Path) -> None:
    final = tmp_path / "model"
    final.mkdir()
    (final / "junk").write_text("1")
    tmp = tmp_path / ".model.tmp-1"
    tmp.mkdir()
    (tmp / MARKER_FILE).write_text("{}")
    with pytest.raises(OSError):
        _publish(tmp, final)
