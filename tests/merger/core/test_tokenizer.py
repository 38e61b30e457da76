"""`tokenizer:` / `tokenizer_source` over models whose vocabularies differ: parity with
mergekit 0.1.5 (tensors, tokenizer files and ids, config), and every tokenizer check in the
plan, before any tensor is merged.

The inputs are bf16-stored tiny Mistrals with the Mistral tokenizer, two of them with added
tokens (so their embeddings have more rows). mergekit walks its models in the order of a Python
set (it changes per process, with ``PYTHONHASHSEED`` and the recipe's order): that order gives a
union's new tokens their ids and, without a base model, picks the base tokenizer. Ours is the
recipe's order (base first); mergekit runs here with that order pinned
(`tests.helpers.mergekit_models_in_recipe_order`), so every row is compared exactly.
"""

from __future__ import annotations

import json

import pytest
import torch

from kruising.errors import KruisingError
from merger.core.engine import run_recipe
from merger.core.options import MergeOptions
from merger.core.recipe import parse_recipe
from tests.conftest import tiny_mistral_config
from tests.helpers import load_tensors, mergekit_models_in_recipe_order, run_mergekit

RTOL, ATOL = 1e-5, 1e-6
SAMPLE = "<|im_start|>user Bassie en Adriaan<|im_end|> eten <kaas> en <nieuw>. The ACM</s>"

ADDED = {
    "a": [],
    "b": ["<|im_start|>", "<|im_end|>"],
    "c": ["<|im_end|>", "<kaas>", "<worst>"],
}


@pytest.fixture(scope="session")
def vocab_models(tmp_path_factory, mistral_tokenizer):
    """{"a": 32000 rows, "b": 32002 (chat tokens), "c": 32003 (other added tokens)}, bf16."""
    from transformers import AutoTokenizer, MistralForCausalLM

    root = tmp_path_factory.mktemp("vocab-models")
    base_dir = root / "tokenizer"
    mistral_tokenizer.save_pretrained(base_dir)
    out = {}
    for seed, (name, added) in enumerate(ADDED.items()):
        tok = AutoTokenizer.from_pretrained(base_dir)
        tok.add_tokens(added)
        torch.manual_seed(seed)
        model = MistralForCausalLM(tiny_mistral_config(vocab_size=len(tok)))
        model.to(torch.bfloat16)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def mergekit_run():
    def run(text, out, **options):
        with mergekit_models_in_recipe_order():
            return run_mergekit(text, out, **options)

    return run


RECIPES = {
    # union over three vocabularies; linear weights so every averaged row differs by model
    "union_task_arithmetic": """
merge_method: task_arithmetic
base_model: {a}
models:
  - model: {b}
    parameters: {{weight: 0.7}}
  - model: {c}
    parameters: {{weight: 0.4}}
tokenizer_source: union
dtype: float32
out_dtype: bfloat16
""",
    # no base model: the first model's tokenizer is the base (c, the largest), then b, then a
    "union_no_base": """
merge_method: linear
models:
  - model: {c}
    parameters: {{weight: 0.2}}
  - model: {b}
    parameters: {{weight: 0.5}}
  - model: {a}
    parameters: {{weight: 0.3}}
tokenizer_source: union
dtype: float32
""",
    # the block: sources per token, zero, model_token by token and by id, force, padding
    "block": """
merge_method: slerp
base_model: {b}
models:
  - model: {b}
  - model: {c}
parameters:
  t: 0.4
tokenizer:
  source: union
  pad_to_multiple_of: 64
  tokens:
    <|im_start|>:
      source: {b}
    <kaas>:
      source: {{kind: zero}}
      force: true
    <|im_end|>:
      source: {{kind: model_token, model: {c}, token: "</s>"}}
      force: true
    <nieuw>:
      source: {{kind: model_token, model: {b}, token_id: 7}}
    <worst>:
      source: {c}
dtype: float32
""",
    # the base vocabulary: the others' added tokens are dropped
    "base": """
merge_method: linear
base_model: {a}
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.3}}
  - model: {c}
    parameters: {{weight: 0.2}}
tokenizer_source: base
dtype: float32
""",
    # another model's tokenizer, with averaging of a token two models have
    "model": """
merge_method: linear
base_model: {a}
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
  - model: {c}
    parameters: {{weight: 1.0}}
tokenizer_source: {c}
dtype: bfloat16
""",
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_tokenizer_recipes_match_mergekit(name, vocab_models, mergekit_run, tmp_path):
    from transformers import AutoTokenizer

    text = RECIPES[name].format(**{k: str(v) for k, v in vocab_models.items()})
    ours = run_recipe(
        parse_recipe(text), tmp_path / "ours", MergeOptions(device="cpu"), recipe_text=text
    )
    theirs = mergekit_run(text, tmp_path / "theirs")
    mine, ref = load_tensors(ours), load_tensors(theirs)
    assert sorted(mine) == sorted(ref)
    for tensor_name, expected in ref.items():
        got = mine[tensor_name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, tensor_name
        torch.testing.assert_close(got.float(), expected.float(), rtol=RTOL, atol=ATOL)
    our_config = json.loads((ours / "config.json").read_text())
    their_config = json.loads((theirs / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "dtype", "architectures"):
        assert our_config.get(key) == their_config.get(key), key
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((ours / file).read_text()) == json.loads((theirs / file).read_text())
    tok_ours, tok_theirs = (
        AutoTokenizer.from_pretrained(ours),
        AutoTokenizer.from_pretrained(theirs),
    )
    assert tok_ours.get_vocab() == tok_theirs.get_vocab()
    assert tok_ours(SAMPLE)["input_ids"] == tok_theirs(SAMPLE)["input_ids"]


def test_block_rows_follow_their_sources(vocab_models, tmp_path):
    """Exact rows, independent of mergekit: zero, a model_token row, padding by the mean."""
    from transformers import AutoTokenizer

    text = RECIPES["block"].format(**{k: str(v) for k, v in vocab_models.items()})
    # linear: every row of the child is the same mix of the inputs' rows (slerp mixes tensors)
    text = text.replace("merge_method: slerp", "merge_method: linear").replace(
        "  t: 0.4", "  weight: 0.5"
    )
    child = run_recipe(
        parse_recipe(text), tmp_path / "child", MergeOptions(device="cpu"), recipe_text=text
    )
    tok = AutoTokenizer.from_pretrained(child)
    vocab = tok.get_vocab()
    embed = load_tensors(child)["model.embed_tokens.weight"]
    b_embed = load_tensors(vocab_models["b"])["model.embed_tokens.weight"]
    n = len(vocab)
    assert embed.shape[0] == -(-n // 64) * 64 > n
    assert torch.all(embed[vocab["<kaas>"]] == 0)
    # <nieuw> is in neither model: both inputs take b's row 7
    torch.testing.assert_close(embed[vocab["<nieuw>"]].float(), b_embed[7].float())
    torch.testing.assert_close(
        embed[n:].float(),
        embed[:n].float().mean(0).expand(embed.shape[0] - n, -1),
        atol=2e-2,
        rtol=0,
    )


def _count_merges(monkeypatch) -> list[str]:
    merged: list[str] = []
    import merger.core.engine as engine

    real = engine.compute_task

    def counting(plan, task, *args, **kwargs):
        merged.append(task.name)
        return real(plan, task, *args, **kwargs)

    monkeypatch.setattr(engine, "compute_task", counting)
    return merged


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ("tokenizer_source: {tmp}/nowhere", r"tokenizer_source .*nowhere"),
        (
            "tokenizer: {{source: union, tokens: {{<x>: {{source: {{kind: model_token, "
            "model: {a}, token: nope}}}}}}}}",
            r"tokenizer.tokens\['<x>'\]: token 'nope' is not in",
        ),
        (
            "tokenizer: {{source: union, tokens: {{<x>: {{force: true}}}}}}",
            r"tokenizer.tokens\['<x>'\]: the token is forced and has no source",
        ),
        (
            "tokenizer: {{source: union, tokens: {{<x>: {{source: {c}}}}}}}",
            r"tokenizer.tokens\['<x>'\]: .*c is not an input of model.embed_tokens.weight",
        ),
    ],
)
def test_tokenizer_problems_stop_before_any_tensor(
    patch, match, vocab_models, tmp_path, monkeypatch
):
    merged = _count_merges(monkeypatch)
    paths = {k: str(v) for k, v in vocab_models.items()}
    text = (
        f"merge_method: slerp\nbase_model: {paths['a']}\nmodels:\n  - model: {paths['a']}\n"
        f"  - model: {paths['b']}\nparameters: {{t: 0.5}}\n"
        + patch.format(tmp=tmp_path, **paths)
        + "\n"
    )
    out = tmp_path / "child"
    with pytest.raises(KruisingError, match=match) as info:
        run_recipe(parse_recipe(text), out, MergeOptions(device="cpu"), recipe_text=text)
    assert "\n" not in info.value.message and info.value.hint
    assert merged == []
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_differing_vocabularies_without_tokenizer_source(vocab_models, tmp_path):
    paths = {k: str(v) for k, v in vocab_models.items()}
    text = (
        f"merge_method: linear\nmodels:\n  - model: {paths['a']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {paths['b']}\n    parameters: {{weight: 1}}\n"
    )
    with pytest.raises(KruisingError, match="vocabulary sizes differ") as info:
        run_recipe(parse_recipe(text), tmp_path / "child", MergeOptions(device="cpu"))
    assert "tokenizer_source: union" in info.value.hint
