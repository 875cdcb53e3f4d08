"""Shared model loading: chat-template overrides, local folders, model checks without the network."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.models import load_tokenizer, model_spec_problem, resolve_model_path
from align.recipe.schema import ModelSpec

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


@pytest.mark.parametrize("as_file", [False, True])
def test_chat_template_override(tmp_path: Path, as_file: bool) -> None:
    value = TEMPLATE
    if as_file:
        (tmp_path / "t.jinja").write_text(TEMPLATE)
        value = str(tmp_path / "t.jinja")
    tokenizer = load_tokenizer(ModelSpec(name_or_path="align:tiny", chat_template=value))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "[user] hi\n"
    assert tokenizer.padding_side == "left"


def test_embedded_and_local_paths_resolve(tmp_path: Path) -> None:
    built = Path(resolve_model_path("align:tiny"))
    assert (built / "config.json").exists()
    assert resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert resolve_model_path(str(built)) == str(built.resolve())


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("align:tiny", None),
        ("Qwen/Qwen2.5-0.5B", None),
        ("align:nope", "unknown embedded model"),
        ("./no/such/dir", "model folder not found"),
        ("a/b/c", "model folder not found"),
        ("bad name!", "neither an existing folder nor a hub id"),
    ],
)
def test_model_spec_problem(tmp_path: Path, name: str, fragment: str | None) -> None:
    problem = model_spec_problem(ModelSpec(name_or_path=name), tmp_path)
    assert (problem is None) if fragment is None else (fragment in (problem or ""))


def test_folder_without_config_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in (model_spec_problem(ModelSpec(name_or_path=str(tmp_path / "empty")), tmp_path) or "")
