"""Parity with mergekit 0.1.5 in the recipe's compute dtype, on bf16-stored checkpoints.

mergekit computes in the recipe's ``dtype`` (the inputs are loaded in it; every torch op
rounds to it); so do we by default, on both CPU paths (fused kernels where they reproduce that
rounding, else the torch reference). mergekit's TIES and Breadcrumbs sort the magnitudes with
an unstable sort, so entries tied at the trim threshold — many, with bf16 task vectors — are
kept in an arbitrary order; ours keeps them in index order. Here mergekit runs with its sorts
made stable (index order is then its tie rule too), so every element must match exactly;
slerp's angle is float64 here and float32 in mergekit, so it may differ by one ulp of the
compute dtype on a few elements.
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
from tests.helpers import load_tensors, mergekit_sorts_stable

DTYPES = ("bfloat16", "float16", "float32")

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
""",
    "slerp": """
merge_method: slerp
base_model: {a}
models:
  - model: {a}
  - model: {b}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.3, 1]
    - value: 0.6
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {a}
models:
  - model: {b}
    parameters: {{weight: 0.7}}
  - model: {c}
    parameters: {{weight: [0.2, 0.6]}}
parameters:
  lambda: 0.9
""",
    "ties": """
merge_method: ties
base_model: {a}
models:
  - model: {b}
    parameters: {{density: 0.5, weight: 0.6}}
  - model: {c}
    parameters: {{density: 0.3, weight: 0.5}}
""",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: {a}
models:
  - model: {b}
    parameters: {{density: 0.8, gamma: 0.05, weight: 0.5}}
  - model: {c}
    parameters: {{density: 0.6, gamma: 0.02, weight: 0.5}}
""",
}

#: the methods a fused kernel merges, per compute dtype (the others run the torch reference)
FUSED = {
    "float32": {"linear", "slerp", "task_arithmetic", "ties"},
    "bfloat16": {"linear", "slerp", "task_arithmetic", "ties"},
    "float16": {"linear", "slerp", "task_arithmetic", "ties"},
}


def _text(method: str, dtype: str, parents: dict[str, Path], **extra: str) -> str:
    text = RECIPES[method].format(**{k: str(v) for k, v in parents.items()})
    text += f"dtype: {dtype}\n"
    for key, value in extra.items():
        text += f"{key}: {value}\n"
    return text


@pytest.fixture(scope="module")
def parents(make_tiny_mistral):
    """Three bf16-stored tiny checkpoints (every real checkpoint is bf16)."""
    shape = {"dtype": "bfloat16", "num_hidden_layers": 2}
    return {
        "a": make_tiny_mistral("bf16-a", seed=10, **shape),
        "b": make_tiny_mistral("bf16-b", seed=11, **shape),
        "c": make_tiny_mistral("bf16-c", seed=12, **shape),
    }


@pytest.fixture(scope="module")
def stable_mergekit(tmp_path_factory):
    """mergekit's child of a recipe text, with torch.argsort/sort stable inside its run."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions as MergekitOptions

    done: dict[str, Path] = {}

    def run(text: str) -> Path:
        if text not in done:
            out = tmp_path_factory.mktemp("mergekit-stable") / "child"
            config = MergeConfiguration.model_validate(yaml.safe_load(text))
            with mergekit_sorts_stable():
                run_merge(config, str(out), options=MergekitOptions(device="cpu", quiet=True))
            done[text] = out
        return done[text]

    return run


def _ours(text: str, out: Path, path: str, monkeypatch, **options) -> tuple[Path, int]:
    if path == "torch":
        monkeypatch.setattr("merger.core.engine.fused_merge", lambda *args, **kwargs: None)
    elif not kernels.available():
        pytest.skip(f"no fused kernels here: {kernels.why_not()}")
    before = kernels.merged_tensors()
    child = run_recipe(
        parse_recipe(text), out, MergeOptions(device="cpu", progress=False, **options),
        recipe_text=text,
    )  # fmt: skip
    return child, kernels.merged_tensors() - before


def _assert_same(mine: dict, ref: dict, method: str) -> None:
    assert sorted(mine) == sorted(ref)
    for name, expected in ref.items():
        got = mine[name]
        assert got.dtype == expected.dtype, name
        if method != "slerp":
            differ = int((got.view(torch.int16 if got.element_size() == 2 else torch.int32)
                          != expected.view(torch.int16 if got.element_size() == 2 else torch.int32)).sum())  # fmt: skip
            assert differ == 0, f"{name}: {differ} of {got.numel()} elements differ from mergekit"
            continue
        # slerp: the angle in float64 (ours) or float32 (mergekit), so the coefficients differ
        # in their last float32 bits: float noise in float32, one ulp of a half on a few elements
        if got.dtype == torch.float32:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
            continue
        size = expected.float().abs()
        ulp = torch.finfo(got.dtype).eps * size.clamp(min=float(size.mean()))
        assert bool(((got.float() - expected.float()).abs() <= ulp * 2).all()), name
        assert int((got != expected).sum()) <= max(2, got.numel() // 100), name


@pytest.mark.parametrize("path", ["fused", "torch"])
@pytest.mark.parametrize("method", sorted(RECIPES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_compute_dtype_matches_mergekit(
    dtype, method, path, parents, stable_mergekit, tmp_path, monkeypatch
):
    text = _text(method, dtype, parents)
    theirs = stable_mergekit(text)
    ours, fused = _ours(text, tmp_path / "ours", path, monkeypatch)
    ref = load_tensors(theirs)
    _assert_same(load_tensors(ours), ref, method)
    expected_fused = path == "fused" and method in FUSED[dtype]
    assert fused == (len(ref) if expected_fused else 0)
    provenance = json.loads((ours / "kruising_provenance.json").read_text())
    assert provenance["compute_dtype"]["choice"] == "mergekit"
    assert provenance["compute_dtype"]["dtypes"] == [dtype]
    if method == "ties":
        ties = provenance["tie_rule"]
        # bf16 task vectors tie at the trim threshold; the rule decided some of them
        assert ties["tied_entries"] > ties["kept_by_index"] >= 0
        assert ties["task_vectors"] > 0
    our_config = json.loads((ours / "config.json").read_text())
    their_config = json.loads((theirs / "config.json").read_text())
    assert our_config.get("dtype") == their_config.get("dtype")


@pytest.mark.parametrize("path", ["fused", "torch"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_float32_compute_is_a_recorded_choice(
    method, path, parents, stable_mergekit, tmp_path, monkeypatch
):
    """``--compute-dtype float32`` on a bf16 recipe: mergekit's float32 compute, stored in
    bf16 (mergekit's ``dtype: float32, out_dtype: bfloat16``), not its bf16 child; said so in
    the provenance and the card."""
    text = _text(method, "bfloat16", parents)
    ours, fused = _ours(text, tmp_path / "ours", path, monkeypatch, compute_dtype="float32")
    as_float32 = stable_mergekit(_text(method, "float32", parents, out_dtype="bfloat16"))
    in_bf16 = stable_mergekit(text)
    mine = load_tensors(ours)
    _assert_same(mine, load_tensors(as_float32), method)
    assert fused == (len(mine) if path == "fused" else 0)
    bf16 = load_tensors(in_bf16)
    assert any(not torch.equal(mine[name], bf16[name]) for name in bf16)
    provenance = json.loads((ours / "kruising_provenance.json").read_text())
    assert provenance["compute_dtype"] == {
        "choice": "float32",
        "dtypes": ["float32"],
        "flag": "--compute-dtype float32",
    }
    card = (ours / "README.md").read_text()
    assert "--compute-dtype float32" in card
    assert "differ from mergekit" in card


def test_unknown_compute_dtype_is_refused_before_any_work(parents, tmp_path):
    from kruising.errors import KruisingError

    text = _text("linear", "bfloat16", parents)
    with pytest.raises(KruisingError) as caught:
        run_recipe(
            parse_recipe(text), tmp_path / "child", MergeOptions(compute_dtype="int8"),
            recipe_text=text,
        )  # fmt: skip
    assert "--compute-dtype" in str(caught.value)
    assert "float32" in caught.value.hint
    assert not (tmp_path / "child").exists()
