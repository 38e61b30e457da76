"""Parity with mergekit 0.1.5: the same recipe gives the same tensors, config and tokenizer.

mergekit runs in-process (its import takes seconds, so once per session). TIES: our trim
keeps entries equal to the k-th largest magnitude in index order where mergekit's argsort
picks arbitrarily; with random float32 task vectors such ties do not occur, so every element
must match here, and `test_methods.py` pins the tie rule itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merger.core import kernels
from merger.core.engine import run_recipe
from merger.core.options import MergeOptions
from merger.core.recipe import parse_recipe
from tests.helpers import load_tensors

RTOL, ATOL = 1e-5, 1e-6

SLERP_T = """
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
"""

RECIPES = {
    "linear": """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: 0.5}}
  - model: {c}
    parameters: {{weight: 0.2}}
dtype: float32
""",
    "linear_unnormalized": """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.6}}
  - model: {b}
    parameters: {{weight: 0.6}}
parameters:
  normalize: false
dtype: float32
""",
    "slerp_gradient": """
merge_method: slerp
base_model: {a}
models:
  - model: {a}
  - model: {b}
parameters:
"""
    + SLERP_T
    + "dtype: float32\n",
    "slerp_slices": """
merge_method: slerp
base_model: {a}
slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
      - model: {b}
        layer_range: [0, 4]
parameters:
"""
    + SLERP_T
    + "dtype: float32\n",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {a}
models:
  - model: {b}
    parameters: {{weight: 0.7}}
  - model: {c}
    parameters: {{weight: [0.2, 0.6]}}
dtype: float32
""",
    "ties_half": """
merge_method: ties
base_model: {a}
models:
  - model: {b}
    parameters: {{density: 0.5, weight: 1.0}}
  - model: {c}
    parameters: {{density: 0.5, weight: 1.0}}
dtype: float32
""",
    "ties_mixed": """
merge_method: ties
base_model: {a}
models:
  - model: {b}
    parameters:
      density: [0.2, 0.8]
      weight: 0.6
  - model: {c}
    parameters:
      density: 0.7
      weight:
        - filter: mlp
          value: 0.9
        - value: 0.3
parameters:
  normalize: false
  lambda: 0.8
dtype: float32
""",
    "ties_bf16_out": """
merge_method: ties
base_model: {a}
models:
  - model: {b}
    parameters: {{density: 0.3, weight: 0.5}}
  - model: {c}
    parameters: {{density: 0.9, weight: 0.5}}
dtype: float32
out_dtype: bfloat16
""",
}


@pytest.fixture(scope="session")
def mergekit_run():
    """Run a recipe with mergekit's Python API (in-process, CPU)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    def run(text: str, out: Path) -> Path:
        config = MergeConfiguration.model_validate(yaml.safe_load(text))
        run_merge(config, str(out), options=MergeOptions(device="cpu", quiet=True))
        return out

    return run


@pytest.fixture(scope="session")
def parents(make_tiny_mistral):
    return {
        "a": make_tiny_mistral("parent-a", seed=0),
        "b": make_tiny_mistral("parent-b", seed=1),
        "c": make_tiny_mistral("parent-c", seed=2),
    }


@pytest.fixture(scope="session")
def mergekit_children(parents, mergekit_run, tmp_path_factory):
    """mergekit's child per recipe name, merged once for both of our code paths."""
    done: dict[str, Path] = {}

    def child(name: str) -> Path:
        if name not in done:
            text = RECIPES[name].format(**{k: str(v) for k, v in parents.items()})
            done[name] = mergekit_run(text, tmp_path_factory.mktemp("mergekit") / name)
        return done[name]

    return child


@pytest.mark.parametrize("path", ["fused", "torch"])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_tensors_match_mergekit(name, path, parents, mergekit_children, tmp_path, monkeypatch):
    """Both CPU code paths: the fused kernels and the torch reference (GPU, other dtypes)."""
    if path == "torch":
        monkeypatch.setattr("merger.core.engine.fused_merge", lambda *args, **kwargs: None)
    elif not kernels.available():
        pytest.skip(f"no fused kernels here: {kernels.why_not()}")
    text = RECIPES[name].format(**{k: str(v) for k, v in parents.items()})
    recipe = parse_recipe(text)
    fused_before = kernels.merged_tensors()
    ours = run_recipe(recipe, tmp_path / "ours", MergeOptions(device="cpu"), recipe_text=text)
    theirs = mergekit_children(name)
    mine, ref = load_tensors(ours), load_tensors(theirs)
    assert sorted(mine) == sorted(ref)
    # the fused case ran the fused kernels for every tensor, the torch case for none
    fused = kernels.merged_tensors() - fused_before
    assert fused == (len(ref) if path == "fused" else 0)
    for tensor_name, expected in ref.items():
        got = mine[tensor_name]
        assert got.dtype == expected.dtype, tensor_name
        torch.testing.assert_close(
            got.float(),
            expected.float(),
            rtol=RTOL,
            atol=ATOL,
            msg=lambda m, n=tensor_name: f"{n}: {m}",
        )
    our_config = json.loads((ours / "config.json").read_text())
    their_config = json.loads((theirs / "config.json").read_text())
    for key in ("architectures", "hidden_size", "num_hidden_layers", "vocab_size", "dtype"):
        assert our_config.get(key) == their_config.get(key), key


def test_tokenizer_matches_mergekit(parents, mergekit_run, tmp_path):
    from transformers import AutoTokenizer

    text = RECIPES["slerp_gradient"].format(**{k: str(v) for k, v in parents.items()})
    ours = run_recipe(
        parse_recipe(text), tmp_path / "ours", MergeOptions(device="cpu"), recipe_text=text
    )
    theirs = mergekit_run(text, tmp_path / "theirs")
    sample = "Bassie en Adriaan reizen door Nederland. The ACM watches markets."
    tok_ours = AutoTokenizer.from_pretrained(ours)
    tok_theirs = AutoTokenizer.from_pretrained(theirs)
    assert len(tok_ours) == len(tok_theirs) == 32000
    assert tok_ours(sample)["input_ids"] == tok_theirs(sample)["input_ids"]


def test_child_loads_in_transformers(parents, tmp_path):
    from transformers import AutoModelForCausalLM

    text = RECIPES["ties_half"].format(**{k: str(v) for k, v in parents.items()})
    child = run_recipe(
        parse_recipe(text), tmp_path / "child", MergeOptions(device="cpu"), recipe_text=text
    )
    model = AutoModelForCausalLM.from_pretrained(child)
    merged = load_tensors(child)
    for name, param in model.state_dict().items():
        assert torch.equal(param, merged[name]), name
    assert (child / "mergekit_config.yml").read_text() == text
    assert (child / "README.md").is_file()
    provenance = json.loads((child / "kruising_provenance.json").read_text())
    assert provenance["merge_method"] == "ties"
    assert len(provenance["inputs"]) == 3
