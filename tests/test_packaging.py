"""What the wheel holds: every package, and the recipes and Accelerate configs as package data mapped
from their top-level folders, so `align recipes copy` works from a wheel install."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def setuptools_config() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_pyproject_lists_every_package_and_maps_the_data_folders() -> None:
    config = setuptools_config()
    found = {".".join(init.parent.relative_to(ROOT).parts) for top in ("align", "reward_rules")
             for init in (ROOT / top).rglob("__init__.py")}  # fmt: skip
    mapped = config["package-dir"]
    assert set(config["packages"]) == found | set(mapped), "add the new package to [tool.setuptools] packages"
    assert mapped == {"align._recipes": "recipes", "align._accelerate_configs": "accelerate_configs"}
    for package, folder in mapped.items():
        assert config["package-data"][package] == ["*.yaml"]
        assert list((ROOT / folder).glob("*.yaml")), folder


@pytest.mark.slow
def test_recipes_copy_from_a_built_wheel_in_a_fresh_venv(tmp_path: Path) -> None:
    """Build the wheel, install it into a fresh venv (without align's heavy dependencies: listing
    and copying recipes needs only pyyaml) and copy a recipe from the installed package data."""
    source = tmp_path / "src"
    for name in ("align", "reward_rules", "recipes", "accelerate_configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, timeout=600)  # fmt: skip
    wheel = next((tmp_path / "dist").glob("align-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=300)
    bin_dir = tmp_path / "venv" / "bin"
    subprocess.run([str(bin_dir / "pip"), "install", "-q", "--no-deps", str(wheel), "pyyaml"], check=True, timeout=600)
    work = tmp_path / "work"
    work.mkdir()

    def align(*args: str) -> str:
        done = subprocess.run([str(bin_dir / "align"), *args], cwd=work, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    listing = align("recipes")
    assert all(any(line.startswith(p.stem + " ") for line in listing.splitlines()) for p in (ROOT / "recipes").glob("*.yaml"))
    assert str(tmp_path / "venv") in listing  # read from the installed package, not this checkout
    align("recipes", "copy", "quickstart")
    align("recipes", "copy", "r1", "edit/")
    assert (work / "quickstart.yaml").read_bytes() == (ROOT / "recipes" / "quickstart.yaml").read_bytes()
    assert (work / "edit" / "accelerate_configs" / "zero3.yaml").read_bytes() == \
        (ROOT / "accelerate_configs" / "zero3.yaml").read_bytes()  # fmt: skip
