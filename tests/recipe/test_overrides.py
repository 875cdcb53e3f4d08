from __future__ import annotations

import pytest

from align.recipe.overrides import OverrideError, apply_override, apply_overrides, parse_override


def recipe() -> dict:
    return {"seed": 0, "model": "align:tiny", "stages": [{"name": "sft", "lora": {"r": 8}}, {"name": "eval"}]}


def test_parse_values_like_yaml() -> None:
    assert parse_override("a.b=1e-4") == (["a", "b"], 1e-4)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert parse_override("flag=true") == (["flag"], True)
    assert parse_override("name=Qwen/Qwen2.5-0.5B") == (["name"], "Qwen/Qwen2.5-0.5B")
    assert parse_override("empty=") == (["empty"], "")


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1", ".a=1"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(OverrideError):
        parse_override(bad)


def test_stage_by_name_and_index() -> None:
    data = recipe()
    assert apply_override(data, ["stages", "sft", "lora", "r"], 16) == ("stages", 0, "lora", "r")
    assert apply_override(data, ["stages", "1", "temperature"], 0.7) == ("stages", 1, "temperature")
    assert apply_override(data, ["stages", "-1", "num_samples"], 4) == ("stages", 1, "num_samples")
    assert data["stages"][0]["lora"]["r"] == 16
    assert data["stages"][1] == {"name": "eval", "temperature": 0.7, "num_samples": 4}


def test_creates_missing_mappings() -> None:
    data = recipe()
    apply_override(data, ["stages", "eval", "dataset", "path"], "x.jsonl")
    assert data["stages"][1]["dataset"] == {"path": "x.jsonl"}


def test_errors_are_collected() -> None:
    data = recipe()
    problems = apply_overrides(data, ["stages.sfft.lora.r=1", "stages.9.x=1", "seed.x=1"])
    messages = [p.message for p in problems]
    assert "did you mean 'sft'" in messages[0]
    assert "index 9 out of range" in messages[1]
    assert "is a int" in messages[2]


def test_yes_and_no_are_strings_as_in_yaml_1_2() -> None:
    """YAML 1.1 reads `save_strategy: no` as False, which TRL rejects; recipes use YAML 1.2's booleans."""
    from align.recipe.loader import parse_scalar, parse_yaml

    assert [parse_scalar(v) for v in ("no", "yes", "on", "off", "true", "False")] == ["no", "yes", "on", "off", True, False]
    assert parse_yaml("save_strategy: no\nbf16: true\n", "r.yaml").data == {"save_strategy": "no", "bf16": True}
