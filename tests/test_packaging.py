"""The wheel holds what a `pip install kruising` needs at run time, without a checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(REPO)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {done.stderr.strip()[-300:]}")
    (built,) = out.glob("kruising-*.whl")
    return built


def test_the_wheel_has_every_room_and_its_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("kruising", "merger", "merger/core", "merger/study", "merger/share"):
        assert f"{package}/__init__.py" in names, package
    assert "eval/__init__.py" in names and "pretrain/__init__.py" in names
    assert "merger/core/kernels.c" in names  # built at first use
    demo = sorted(n for n in names if n.startswith("merger/demo_recipes/"))
    assert "merger/demo_recipes/slerp.yaml" in demo
    assert "merger/demo_recipes/sweeps/demo-slerp.yaml" in demo
    assert "merger/demo_recipes/sweeps/demo-slerp.recipe.yaml" in demo
    assert any(n.startswith("eval/probes/nl/") and n.endswith(".jsonl") for n in names)
    assert not any(n.startswith(("tests/", "recipes/", "bench/")) for n in names)


def test_the_demo_finds_its_recipes_in_an_installed_wheel(wheel, tmp_path):
    """`merge demo` reads its recipes from the installed package, not from a checkout."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from merger import demo\n"
        "from merger.study.spec import load_spec, spec_recipe\n"
        "assert demo.DEMO_RECIPES.is_relative_to(sys.argv[1]), demo.DEMO_RECIPES\n"
        "print(sorted(p.name for p in demo.DEMO_RECIPES.glob('*.yaml')))\n"
        "for name in ('demo-slerp', 'demo-chat-vector'):\n"
        "    spec, root = load_spec(demo.DEMO_SWEEPS / f'{name}.yaml')\n"
        "    print(spec.name, spec_recipe(spec, root).merge_method)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(target)],
        cwd=tmp_path,  # no checkout around
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "['chat_vector.yaml', 'linear.yaml', 'slerp.yaml', 'ties.yaml']"
    assert lines[1:] == ["demo-slerp slerp", "demo-chat-vector task_arithmetic"]
