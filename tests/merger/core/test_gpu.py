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
# the methods of issue #12 that draw nothing (DELLA at density 1), on float32 parents
_BASE_PLUS_TWO = "base_model: {a}\nmodels:\n  - model: {b}\n  - model: {c}\n"
_WEIGHTED = (
    "base_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.6}}\n"
    "  - model: {c}\n    parameters: {{weight: 0.4}}\n"
)
RECIPES |= {
    "passthrough": "merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n"
    "        layer_range: [0, 2]\n  - sources:\n      - model: {b}\n        layer_range: [1, 4]\n"
    "        parameters: {{scale: 0.5}}\n",
    "model_stock": "merge_method: model_stock\n" + _BASE_PLUS_TWO,
    "sce": "merge_method: sce\n" + _BASE_PLUS_TWO,
    "ram": "merge_method: ram\n" + _BASE_PLUS_TWO,
    "ramplus_tl": "merge_method: ramplus_tl\n" + _BASE_PLUS_TWO,
    "karcher": "merge_method: karcher\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n",
    "nuslerp": "merge_method: nuslerp\n" + _WEIGHTED,
    "multislerp": "merge_method: multislerp\n" + _WEIGHTED,
    "della": "merge_method: della\n"
    + _WEIGHTED.replace("weight: 0.6", "weight: 0.6, density: 1.0"),
    "nearswap": "merge_method: nearswap\nbase_model: {a}\nmodels:\n  - model: {a}\n"
    "  - model: {b}\nparameters:\n  t: 0.01\n",
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
