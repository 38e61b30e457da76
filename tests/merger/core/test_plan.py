"""The planner's parameter resolution (the one resolver): scopes, gradients, filters, defaults.

The inputs are shard headers only, so these plans are built from `ModelSource`s that name
tensors without any file behind them.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from kruising.errors import KruisingError
from merger.core.io import ModelSource, TensorInfo
from merger.core.plan import build_plan
from merger.core.recipe import load_recipe, parse_recipe

HERE = Path(__file__).resolve().parent
LAYER_TENSORS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
MISTRAL = {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}


def fake_source(ref: str, layers: int) -> ModelSource:
    """A Mistral with (2, 2) float32 tensors: embeddings, ``layers`` layers, norm, head."""
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{i}.{suffix}" for i in range(layers) for suffix in LAYER_TENSORS]
    names += ["model.norm.weight", "lm_head.weight"]
    tensors = {name: TensorInfo(Path("/none"), torch.float32, (2, 2), 0, 16) for name in names}
    return ModelSource(ref, Path("/none"), {**MISTRAL, "num_hidden_layers": layers}, tensors)


def plan_of(recipe, layers: int):
    sources = {ref: fake_source(ref, layers) for ref in recipe.referenced_models()}
    return build_plan(recipe, sources)


def parse(text: str):
    return parse_recipe(textwrap.dedent(text), "recipe.yaml")


def tasks(plan) -> dict:
    return {task.name: task for task in plan.tasks}


def per_model(task, ref: str) -> dict:
    return task.per_model[[r for r, _ in task.inputs].index(ref)]


def test_a_gradient_runs_over_the_layers_of_a_slice_like_mergekit():
    """Layer i of n is at t = i / (n - 1); a one-layer slice is at t = 1."""
    recipe = parse(
        """
        merge_method: slerp
        base_model: org/a
        models: [{model: org/a}, {model: org/b}]
        parameters: {t: [0, 1]}
        """
    )
    by_name = tasks(plan_of(recipe, layers=5))
    ts = [by_name[f"model.layers.{i}.mlp.up_proj.weight"].params["t"] for i in range(5)]
    assert ts == [0, 0.25, 0.5, 0.75, 1]
    one_layer = parse(
        """
        merge_method: slerp
        base_model: org/a
        slices:
          - sources:
              - {model: org/a, layer_range: [0, 1]}
              - {model: org/b, layer_range: [0, 1]}
        parameters: {t: [0, 1]}
        """
    )
    assert tasks(plan_of(one_layer, layers=1))["model.layers.0.mlp.up_proj.weight"].params["t"] == 1


def test_gradient_slerp_example_resolves_per_layer():
    recipe = load_recipe(HERE / "recipes" / "mergekit-gradient-slerp.yml")
    by_name = tasks(plan_of(recipe, layers=40))
    ts = [by_name[f"model.layers.{i}.self_attn.o_proj.weight"].params["t"] for i in range(40)]
    assert ts[0] == 0 and ts[-1] == 1
    scaled = 4 * 10 / 39  # layer 10 of 40 along a 5-point gradient
    assert ts[10] == pytest.approx(0.5 + (scaled - 1) * (0.3 - 0.5))
    # outside the layers: t = 0, and the filters miss: the fallback value
    assert by_name["model.norm.weight"].params["t"] == 0.5
    assert by_name["model.embed_tokens.weight"].params["t"] == 0.5
    assert by_name["model.layers.0.mlp.up_proj.weight"].params["t"] == 1


def test_precedence_slice_source_over_slice_over_global():
    recipe = parse(
        """
        merge_method: ties
        base_model: org/base
        slices:
          - sources:
              - model: org/base
                layer_range: [0, 4]
              - model: org/a
                layer_range: [0, 4]
                parameters: {weight: 0.9}
              - model: org/b
                layer_range: [0, 4]
            parameters: {weight: 0.4, density: 0.7}
          - sources:
              - model: org/base
                layer_range: [4, 8]
              - model: org/a
                layer_range: [4, 8]
              - model: org/b
                layer_range: [4, 8]
        parameters: {weight: 0.1, density: 0.5}
        """
    )
    by_name = tasks(plan_of(recipe, layers=8))
    first = by_name["model.layers.0.mlp.up_proj.weight"]  # slice 0
    second = by_name["model.layers.5.mlp.up_proj.weight"]  # slice 1
    assert per_model(first, "org/a") == {"weight": 0.9, "density": 0.7}
    assert per_model(first, "org/b") == {"weight": 0.4, "density": 0.7}
    assert per_model(second, "org/a") == {"weight": 0.1, "density": 0.5}
    assert per_model(second, "org/b") == {"weight": 0.1, "density": 0.5}
    assert per_model(first, "org/base") == {}  # weight and density are not the base's
    # embeddings belong to the first slice, the final norm and head to the last
    assert per_model(by_name["model.embed_tokens.weight"], "org/b")["weight"] == 0.4
    assert per_model(by_name["lm_head.weight"], "org/b")["weight"] == 0.1


def test_models_form_uses_model_parameters_first():
    recipe = load_recipe(HERE / "recipes" / "mergekit-ties.yml")
    by_name = tasks(plan_of(recipe, layers=3))
    wizard = "WizardLM/WizardMath-13B-V1.0"
    platypus = "garage-bAInd/Platypus2-13B"
    orca = "psmathur/orca_mini_v3_13b"
    assert per_model(by_name["model.layers.0.mlp.up_proj.weight"], wizard)["weight"] == 0.5
    assert per_model(by_name["model.layers.0.self_attn.o_proj.weight"], wizard)["weight"] == 0
    middle = by_name["model.layers.1.mlp.up_proj.weight"]  # t = 0.5
    assert per_model(middle, platypus)["weight"] == pytest.approx(0.5)
    assert per_model(middle, orca)["density"] == pytest.approx(0.7)
    assert middle.params["normalize"] is True and middle.params["int8_mask"] is True
    assert middle.params["rescale"] is False and middle.params["lambda"] == 1.0  # defaults


def test_a_scope_whose_filters_miss_falls_through():
    recipe = parse(
        """
        merge_method: linear
        models:
          - model: org/a
            parameters:
              weight: [{filter: mlp, value: 2.0}]
          - model: org/b
        parameters: {weight: 1.0}
        """
    )
    by_name = tasks(plan_of(recipe, layers=2))
    assert per_model(by_name["model.layers.0.mlp.up_proj.weight"], "org/a")["weight"] == 2.0
    assert per_model(by_name["model.layers.0.self_attn.o_proj.weight"], "org/a")["weight"] == 1.0


def test_per_model_filters_see_the_models_own_layer_shared_ones_the_output_layer():
    recipe = parse(
        """
        merge_method: ties
        base_model: org/base
        slices:
          - sources:
              - {model: org/base, layer_range: [2, 3]}
              - model: org/a
                layer_range: [2, 3]
                parameters:
                  weight: [{filter: layers.2., value: 0.3}, {value: 0.9}]
        parameters:
          weight: 1.0
          lambda: [{filter: layers.0., value: 2.0}, {value: 1.0}]
        """
    )
    task = tasks(plan_of(recipe, layers=4))["model.layers.0.mlp.up_proj.weight"]
    assert task.inputs[1] == ("org/a", "model.layers.2.mlp.up_proj.weight")
    assert per_model(task, "org/a")["weight"] == 0.3  # matched on the source's layers.2.
    assert task.params["lambda"] == 2.0  # matched on the output's layers.0.


def test_numeric_strings_count_as_numbers_like_mergekit():
    # PyYAML reads 1e-3 as a string; mergekit's float validation accepts it, so do we.
    recipe = parse(
        "merge_method: task_arithmetic\nbase_model: b\nmodels:\n  - model: a\n"
        "    parameters: {weight: 1e-3}\n"
    )
    task = plan_of(recipe, layers=1).tasks[0]
    assert per_model(task, "a") == {"weight": 0.001}  # density: declared, no effect, unresolved


def test_missing_required_parameter_and_default():
    recipe = parse("merge_method: linear\nmodels: [{model: org/a}]\n")
    with pytest.raises(
        KruisingError,
        match=r"missing required parameter weight for org/a: model\.embed_tokens\.weight",
    ):
        plan_of(recipe, layers=1)
    recipe = parse("merge_method: linear\nmodels: [{model: org/a, parameters: {weight: 1}}]\n")
    assert plan_of(recipe, layers=1).tasks[0].params == {"normalize": True}


EXAMPLES = sorted((HERE.parent.parent.parent / "recipes" / "examples").glob("*.yml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_recipe_plans_natively(path: Path, monkeypatch):
    # the fake sources have no tokenizer files: the tokenizer plan is test_tokenizer.py's
    monkeypatch.setattr("merger.core.tokenizer.plan_tokenizer", lambda *args, **kwargs: None)
    recipe = load_recipe(path)
    plan = plan_of(recipe, layers=32)
    assert plan.method.name == recipe.merge_method
    if recipe.merge_method == "passthrough":  # 24 + 24 layers from two overlapping slices
        assert plan.num_layers == 48
        scales = [t.per_model[0]["scale"] for t in plan.tasks if "o_proj" in t.name]
        assert scales[24] == 0.5 and scales[-1] == 1.0
