"""Architectures from mergekit's definitions: the same tensors and config as mergekit 0.1.5
for one architecture per naming family, and one-line refusals for layouts that fit none.

The checkpoints are tiny, random and stored in bfloat16 (as real ones are); mergekit runs
in-process, once per recipe and architecture.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from kruising.errors import KruisingError
from merger.core.arch import architecture_for, definitions
from merger.core.engine import run_recipe
from merger.core.options import MergeOptions
from merger.core.recipe import parse_recipe
from tests.helpers import load_tensors, save_tiny_model

PARITY_KINDS = ("gpt2", "phi", "qwen2", "gemma2", "falcon")
LAYER_TYPES = ("qwen2", "gemma2")  # configs with a per-layer `layer_types` list

RECIPES = {
    # a gradient over the layers of each model's own layer count; float32 compute, bf16 out
    "linear_gradient": """
        merge_method: linear
        models:
          - model: {a}
            parameters: {{weight: [1, 0.5, 0]}}
          - model: {b}
            parameters: {{weight: [0, 0.5, 1]}}
        dtype: float32
        out_dtype: bfloat16
        """,
    "slerp_gradient": """
        merge_method: slerp
        base_model: {a}
        models: [{{model: {a}}}, {{model: {b}}}]
        parameters:
          t:
            - filter: attn
              value: [0, 0.3, 1]
            - value: 0.6
        dtype: float32
        out_dtype: bfloat16
        """,
    # six layers from two four-layer models: the config's layer-count key must say 6
    "passthrough_slices": """
        merge_method: passthrough
        slices:
          - sources: [{{model: {a}, layer_range: [0, 3]}}]
          - sources: [{{model: {b}, layer_range: [1, 4]}}]
        dtype: bfloat16
        """,
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    return {
        kind: {
            "a": save_tiny_model(root / f"{kind}-a", kind, seed=0),
            "b": save_tiny_model(root / f"{kind}-b", kind, seed=1),
        }
        for kind in (*PARITY_KINDS, "gpt_neox")
    }


@pytest.fixture(scope="module")
def mergekit_run():
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions as MergekitOptions

    def run(text: str, out: Path) -> Path:
        config = MergeConfiguration.model_validate(yaml.safe_load(text))
        run_merge(config, str(out), options=MergekitOptions(device="cpu", quiet=True))
        return out

    return run


def _text(name: str, models: dict[str, Path]) -> str:
    return textwrap.dedent(RECIPES[name]).format(**{k: str(v) for k, v in models.items()})


def _config(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    for key in ("transformers_version", "_name_or_path"):
        config.pop(key, None)
    return config


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("kind", PARITY_KINDS)
def test_tensors_and_config_match_mergekit(kind, name, checkpoints, mergekit_run, tmp_path):
    text = _text(name, checkpoints[kind])
    options = MergeOptions(device="cpu", progress=False)
    ours = run_recipe(parse_recipe(text), tmp_path / "ours", options, recipe_text=text)
    if name == "passthrough_slices" and kind in LAYER_TYPES:
        # mergekit sets the layer count but keeps the 4 layer_types: transformers refuses
        # that config and mergekit stops. Ours has each layer's own type and loads.
        with pytest.raises(Exception, match=r"must be equal to the number of `layer_types`"):
            mergekit_run(text, tmp_path / "theirs")
        a, b = (_config(checkpoints[kind][m])["layer_types"] for m in "ab")
        assert _config(ours)["layer_types"] == a[0:3] + b[1:4]
        _loads_in_transformers(ours)
        return
    theirs = mergekit_run(text, tmp_path / "theirs")
    mine, ref = load_tensors(ours), load_tensors(theirs)
    assert sorted(mine) == sorted(ref)
    flipped = 0
    for tensor, expected in ref.items():
        assert mine[tensor].dtype == expected.dtype, tensor
        # float noise: the float32 results may differ in the last bit, which now and then
        # rounds to the neighbouring bfloat16 (one ulp); nothing more
        got, want = mine[tensor].float(), expected.float()
        torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-6, msg=tensor)
        flipped += int((got != want).sum())
    assert flipped <= sum(t.numel() for t in ref.values()) // 100
    assert _config(ours) == _config(theirs)


def _loads_in_transformers(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    stored = load_tensors(folder)
    for name, param in model.state_dict().items():
        if name in stored:
            assert torch.equal(param, stored[name]), name


def test_the_definition_is_picked_as_mergekit_picks_it():
    """One definition per name; PhiForCausalLM has two, told apart by model_type."""
    assert architecture_for("m", {"architectures": ["GPT2LMHeadModel"]}).num_layers_key == "n_layer"
    assert len(definitions()["PhiForCausalLM"]) == 2
    phi = {"architectures": ["PhiForCausalLM"], "model_type": "phi"}
    assert architecture_for("m", phi).file == "phi2.json"
    assert architecture_for("m", phi | {"model_type": "phi-msft"}).file == "phi2-old.json"
    with pytest.raises(KruisingError, match=r"no architecture definition for PhiForCausalLM"):
        architecture_for("m", phi | {"model_type": "phi9"})


def _write(folder: Path, text: str) -> Path:
    recipe = folder / "recipe.yaml"
    recipe.write_text(textwrap.dedent(text))
    return recipe


def _refused(text: str, tmp_path: Path, match: str) -> None:
    out = tmp_path / "child"
    with pytest.raises(KruisingError, match=match):
        run_recipe(parse_recipe(textwrap.dedent(text)), out, MergeOptions(device="cpu"))
    assert not out.exists()
    assert not list(tmp_path.glob("*kruising-tmp*"))


def test_a_config_that_claims_more_layers_than_the_weights_hold_is_refused(checkpoints, tmp_path):
    """The Falcon case of issue #11: config 6 layers, weights 4 -> refused, nothing written."""
    import shutil

    short = tmp_path / "falcon-short"
    shutil.copytree(checkpoints["falcon"]["a"], short)
    config = json.loads((short / "config.json").read_text())
    config["num_hidden_layers"] = 6
    (short / "config.json").write_text(json.dumps(config))
    recipe = f"""
        merge_method: linear
        models: [{{model: {short}, parameters: {{weight: 1}}}}]
        """
    _refused(recipe, tmp_path, r"num_hidden_layers is 6, but the shards of .* hold 4 layers")


def test_weights_beyond_the_config_layer_count_are_refused(checkpoints, tmp_path):
    import shutil

    long = tmp_path / "gpt2-long"
    shutil.copytree(checkpoints["gpt2"]["a"], long)
    config = json.loads((long / "config.json").read_text())
    config["n_layer"] = 3
    (long / "config.json").write_text(json.dumps(config))
    recipe = f"""
        merge_method: linear
        models: [{{model: {long}, parameters: {{weight: 1}}}}]
        """
    _refused(
        recipe,
        tmp_path,
        r"tensor transformer\.h\.3\.\S+ of .* fits no weight of mergekit's gpt2\.json",
    )


def test_a_definition_whose_tensors_the_checkpoint_lacks_is_refused(checkpoints, tmp_path):
    """mergekit's gpt-neox.json requires attention.bias buffers that transformers 5 no
    longer saves: mergekit fails mid-merge; we refuse before a tensor is written."""
    a, b = checkpoints["gpt_neox"]["a"], checkpoints["gpt_neox"]["b"]
    recipe = f"""
        merge_method: linear
        models: [{{model: {a}, parameters: {{weight: 1}}}}, {{model: {b}, parameters: {{weight: 1}}}}]
        """
    _refused(recipe, tmp_path, r"tensor gpt_neox\.layers\.0\.attention\.bias is missing")


def test_mixed_architectures_are_refused(checkpoints, tmp_path):
    a, b = checkpoints["qwen2"]["a"], checkpoints["gemma2"]["a"]
    recipe = f"""
        merge_method: linear
        models: [{{model: {a}, parameters: {{weight: 1}}}}, {{model: {b}, parameters: {{weight: 1}}}}]
        """
    _refused(recipe, tmp_path, r"Qwen2ForCausalLM .* Gemma2ForCausalLM .*--allow-crimes")


def test_an_unknown_architecture_is_refused(checkpoints, tmp_path):
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(checkpoints["qwen2"]["a"], odd)
    config = json.loads((odd / "config.json").read_text())
    config["architectures"] = ["OddForCausalLM"]
    (odd / "config.json").write_text(json.dumps(config))
    recipe = f"""
        merge_method: linear
        models: [{{model: {odd}, parameters: {{weight: 1}}}}]
        """
    _refused(recipe, tmp_path, r"no architecture definition for OddForCausalLM")
