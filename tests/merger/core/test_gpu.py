"""The engine on CUDA gives what it gives on the CPU (skipped, visibly, without a GPU)."""

from __future__ import annotations

import pytest
import torch

from merger.core.engine import ResidentInputs, merge_in_memory, run_recipe
from merger.core.options import MergeOptions
from merger.core.recipe import parse_recipe
from tests.helpers import load_tensors

pytestmark = pytest.mark.gpu

RECIPES = {
    "linear": """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: 0.7}}
""",
    "slerp": """
merge_method: slerp
base_model: {a}
models:
  - model: {a}
  - model: {b}
parameters:
  t: [0.1, 0.9]
""",
    "ties": """
merge_method: ties
base_model: {a}
models:
  - model: {b}
    parameters: {{density: 0.4, weight: 0.8}}
  - model: {c}
    parameters: {{density: 0.6, weight: 0.5}}
""",
}


@pytest.fixture(scope="module")
def parents(make_tiny_mistral):
    return {k: str(make_tiny_mistral(f"gpu-{k}", seed=20 + i)) for i, k in enumerate("abc")}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_cuda_matches_cpu(name, parents, tmp_path):
    text = RECIPES[name].format(**parents)
    recipe = parse_recipe(text)
    cpu = load_tensors(
        run_recipe(recipe, tmp_path / "cpu", MergeOptions(device="cpu"), recipe_text=text)
    )
    gpu = load_tensors(
        run_recipe(recipe, tmp_path / "gpu", MergeOptions(device="cuda"), recipe_text=text)
    )
    for tensor_name, expected in cpu.items():
        torch.testing.assert_close(gpu[tensor_name], expected, rtol=1e-5, atol=1e-6)


def test_in_memory_merge_on_cuda(parents):
    recipe = parse_recipe(RECIPES["slerp"].format(**parents))
    inputs = ResidentInputs.load(recipe, device="cuda")
    merged = merge_in_memory(recipe, inputs)
    assert all(t.device.type == "cuda" for t in merged.values())
