"""``model+lora`` inputs: the PEFT adapter applied to its model first, as mergekit 0.1.5 does
(``merge_and_unload``), streamed or through ``--lora-merge-cache``; parity on bf16-stored
models, and bad adapters refused before any tensor is merged."""

from __future__ import annotations

import json

import pytest
import torch

from kruising.errors import KruisingError
from merger.core.engine import run_recipe
from merger.core.options import MergeOptions
from merger.core.recipe import parse_recipe
from tests.helpers import load_tensors, run_mergekit

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="session")
def lora_models(make_tiny_mistral, tmp_path_factory):
    """Two bf16 tiny Mistrals and three adapters: plain (attention + MLP), rsLoRA with rank
    and alpha patterns plus the embedding, and one for another shape."""
    from peft import LoraConfig, get_peft_model
    from transformers import MistralForCausalLM

    root = tmp_path_factory.mktemp("lora")
    a = make_tiny_mistral("lora-a", seed=0, dtype="bfloat16")
    b = make_tiny_mistral("lora-b", seed=1, dtype="bfloat16")
    narrow = make_tiny_mistral("lora-narrow", seed=2, dtype="bfloat16", intermediate_size=48)
    configs = {
        "plain": (
            a,
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        ),
        "patterns": (
            b,
            LoraConfig(
                r=4,
                lora_alpha=16,
                use_rslora=True,
                target_modules=["q_proj", "o_proj", "up_proj", "embed_tokens"],
                rank_pattern={"o_proj": 2},
                alpha_pattern={"up_proj": 3},
            ),
        ),
        "narrow": (narrow, LoraConfig(r=2, lora_alpha=4, target_modules=["down_proj"])),
    }
    out = {"a": a, "b": b}
    for seed, (name, (model_dir, config)) in enumerate(configs.items()):
        torch.manual_seed(10 + seed)
        config.init_lora_weights = False  # B is random too: the adapter changes the weights
        model = MistralForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        get_peft_model(model, config).save_pretrained(root / name)
        out[name] = root / name
    return out


RECIPES = {
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {a}
models:
  - model: {a}+{plain}
    parameters: {{weight: 1.0}}
  - model: {b}
    parameters: {{weight: 0.5}}
dtype: float32
out_dtype: bfloat16
""",
    # the dict form, as the base model, with an adapter on the embeddings
    "slerp_dict": """
merge_method: slerp
base_model: {{model: {b}, lora: {patterns}}}
models:
  - model: {{model: {b}, lora: {patterns}}}
  - model: {a}+{plain}
parameters:
  t: 0.3
dtype: float32
""",
}


@pytest.mark.parametrize("cache", [False, True], ids=["streamed", "cache"])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_lora_inputs_match_mergekit(name, cache, lora_models, tmp_path):
    text = RECIPES[name].format(**{k: str(v) for k, v in lora_models.items()})
    theirs_cache = tmp_path / "mergekit-cache"
    theirs = run_mergekit(text, tmp_path / "theirs", lora_merge_cache=str(theirs_cache))
    our_cache = tmp_path / "our-cache" if cache else None
    options = MergeOptions(device="cpu", lora_merge_cache=str(our_cache) if cache else None)
    ours = run_recipe(parse_recipe(text), tmp_path / "ours", options, recipe_text=text)
    mine, ref = load_tensors(ours), load_tensors(theirs)
    assert sorted(mine) == sorted(ref)
    for tensor_name, expected in ref.items():
        assert mine[tensor_name].dtype == expected.dtype, tensor_name
        torch.testing.assert_close(
            mine[tensor_name].float(), expected.float(), rtol=RTOL, atol=ATOL
        )
    for key in ("vocab_size", "num_hidden_layers", "dtype", "architectures"):
        our_config = json.loads((ours / "config.json").read_text())
        assert our_config.get(key) == json.loads((theirs / "config.json").read_text()).get(key)
    from transformers import AutoTokenizer

    sample = "Bassie en Adriaan reizen door Nederland."
    assert AutoTokenizer.from_pretrained(ours)(sample) == AutoTokenizer.from_pretrained(theirs)(
        sample
    )
    if cache:  # mergekit's folder names; the merged copies are the same tensors as mergekit's
        import yaml
        from mergekit.config import MergeConfiguration

        config = MergeConfiguration.model_validate(yaml.safe_load(text))
        names = {
            f"{m.model._unique_id()}_{m.lora._unique_id()}"
            for m in config.referenced_models()
            if m.lora
        }
        assert {p.name for p in our_cache.iterdir()} == names
        # (mergekit's loader cache outlives a run in-process: it may have merged one earlier)
        for folder in theirs_cache.iterdir() if theirs_cache.exists() else []:
            copy, theirs_copy = load_tensors(our_cache / folder.name), load_tensors(folder)
            assert sorted(copy) == sorted(theirs_copy)
            for key, value in theirs_copy.items():
                assert copy[key].dtype == value.dtype
                torch.testing.assert_close(copy[key].float(), value.float(), rtol=RTOL, atol=ATOL)


def test_the_cache_is_reused(lora_models, tmp_path, capsys):
    text = RECIPES["task_arithmetic"].format(**{k: str(v) for k, v in lora_models.items()})
    options = MergeOptions(device="cpu", lora_merge_cache=str(tmp_path / "cache"))
    first = run_recipe(parse_recipe(text), tmp_path / "one", options, recipe_text=text)
    assert "writing the merged model" in capsys.readouterr().err
    second = run_recipe(parse_recipe(text), tmp_path / "two", options, recipe_text=text)
    assert "reusing the merged copy" in capsys.readouterr().err
    one, two = load_tensors(first), load_tensors(second)
    assert all(torch.equal(one[k], two[k]) for k in one)
    # and the adapter did change the weights it targets, and only those
    base = load_tensors(lora_models["a"])
    copy = load_tensors(next((tmp_path / "cache").iterdir()))
    changed = {k for k in base if not torch.equal(base[k], copy[k])}
    assert changed and all(
        k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for k in changed
    )


def _adapter_with(folder, tmp_path, **changes):
    import shutil

    copy = tmp_path / "adapter"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config.update(changes)
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("wrong_model", r"B @ A of model\.layers\.0\.mlp\.down_proj is \(32, 48\)"),
        ("dora", r"adapter .* uses DoRA"),
        ("modules_to_save", r"uses modules_to_save"),
        ("missing", r"adapter folder not found: .*nowhere"),
    ],
)
def test_bad_adapters_stop_before_any_tensor(case, match, lora_models, tmp_path, monkeypatch):
    import merger.core.engine as engine

    merged = []
    monkeypatch.setattr(engine, "compute_task", lambda *a, **k: merged.append(1))
    adapter = {
        "wrong_model": lambda: lora_models["narrow"],
        "dora": lambda: _adapter_with(lora_models["plain"], tmp_path, use_dora=True),
        "modules_to_save": lambda: _adapter_with(
            lora_models["plain"], tmp_path, modules_to_save=["lm_head"]
        ),
        "missing": lambda: tmp_path / "nowhere",
    }[case]()
    text = f"merge_method: linear\nmodels:\n  - model: {lora_models['a']}+{adapter}\n    parameters: {{weight: 1}}\n"
    out = tmp_path / "child"
    with pytest.raises(KruisingError, match=match) as info:
        run_recipe(parse_recipe(text), out, MergeOptions(device="cpu"), recipe_text=text)
    assert info.value.hint and "\n" not in info.value.message
    assert merged == [] and not out.exists()
