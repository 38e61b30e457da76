"""Small helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


def load_tensors(folder: Path) -> dict:
    """Every tensor of a checkpoint folder, from all its safetensors shards."""
    from safetensors.torch import load_file

    tensors: dict = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


MINI_CLOZE = [
    {
        "id": "1",
        "context": "De hoofdstad van Nederland is",
        "choices": ["Amsterdam", "Utrecht"],
        "answer": 0,
    },
    {
        "id": "2",
        "context": "De ACM is de",
        "choices": ["Autoriteit Consument en Markt", "Algemene Commissie Media"],
        "answer": 0,
    },
]


def write_mini_suite(folder: Path, text_probe: str, text: str) -> Path:
    """A two-item Dutch cloze probe (`kennis.jsonl`) plus one perplexity text probe."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kennis.jsonl").write_text("\n".join(json.dumps(i) for i in MINI_CLOZE) + "\n")
    (folder / f"{text_probe}.jsonl").write_text(json.dumps({"id": "1", "text": text}) + "\n")
    return folder


@contextmanager
def mergekit_sorts_stable():
    """torch.argsort/torch.sort made stable inside a mergekit run, so index order is its tie
    rule too (ours: entries tied at a threshold are ranked in index order)."""
    import pytest
    import torch

    def stable(function):
        def call(*args, **kwargs):
            return function(*args, **{**kwargs, "stable": True})

        return call

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "argsort", stable(torch.argsort))
        patch.setattr(torch, "sort", stable(torch.sort))
        yield


@contextmanager
def mergekit_models_in_recipe_order():
    """mergekit's ``MergeConfiguration.referenced_models`` in our order: the base model first,
    then every model in order of appearance (mergekit returns ``list(set(...))``, whose order
    changes per process with ``PYTHONHASHSEED`` and with the order models were added). That
    order decides a union tokenizer's ids for new tokens and the base when there is none."""
    import pytest
    from mergekit.config import MergeConfiguration

    real = MergeConfiguration.referenced_models

    def in_order(config):
        found = []
        if config.base_model:
            found.append(config.base_model)
        for model_in in config.models or []:
            found.append(model_in.model)
        for s in config.slices or []:
            found.extend(src.model for src in s.sources)
        for module in (config.modules or {}).values():
            for model_in in module.models or []:
                found.append(model_in.model)
            for s in module.slices or []:
                found.extend(src.model for src in s.sources)
        ordered = list(dict.fromkeys(found))
        assert set(ordered) == set(real(config))  # the same models, only ordered
        return ordered

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MergeConfiguration, "referenced_models", in_order)
        yield


def run_mergekit(text: str, out: Path, **options) -> Path:
    """Merge recipe YAML with mergekit 0.1.5's Python API (in-process, CPU) into ``out``."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from merger.core.mergekit_engine import forget_loaders

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    forget_loaders()  # mergekit's loader cache outlives a run: no loader of an earlier test
    run_merge(config, str(out), options=MergeOptions(device="cpu", quiet=True, **options))
    return out


#: tiny configs of architectures mergekit defines, one per naming family: GPT-2
#: (`transformer.h.N`, tied head, `n_layer`), GPT-NeoX (`gpt_neox.layers.N`), Phi-2 (biases,
#: lm_head bias, `final_layernorm`), Qwen2 (q/k/v biases, tied head), Gemma2 (four norms per
#: layer, `layer_types`), Falcon (`transformer.h.N`, fused query_key_value)
TINY_ARCHITECTURES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=4, n_head=4, n_positions=64)),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64),
    ),
    "phi": (
        "PhiConfig",
        "PhiForCausalLM",
        dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64),
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            tie_word_embeddings=True,
        ),
    ),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=64,
        ),
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            tie_word_embeddings=False,  # falcon.json's lm_head has no tied name
        ),
    ),
}


def save_tiny_model(folder: Path, kind: str, seed: int, dtype: str = "bfloat16") -> Path:
    """A random tiny checkpoint of a `TINY_ARCHITECTURES` kind (vocabulary 128, no tokenizer)."""
    import torch
    import transformers

    config_class, model_class, settings = TINY_ARCHITECTURES[kind]
    config = getattr(transformers, config_class)(vocab_size=128, **settings)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    return folder
