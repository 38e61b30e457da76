"""`merge moe`: mergekit-moe's YAML to a MixtralForCausalLM, the same child as mergekit-moe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kruising.errors import KruisingError
from merger.core.moe import build_moe, parse_moe_recipe
from tests.helpers import load_tensors

PROMPTS = {
    "nl": ["Bassie en Adriaan reizen door Nederland", "De ACM houdt toezicht op de markt"],
    "instruct": ["[INST] Answer the question [/INST]", "Explain step by step"],
    "code": ["def main():", "import torch"],
}


@pytest.fixture(scope="module")
def experts(make_tiny_mistral):
    """A bf16 base and three fine-tunes of it (MLPs and the rest differ)."""
    return {
        "base": make_tiny_mistral("moe-base", seed=30, dtype="bfloat16"),
        "nl": make_tiny_mistral("moe-nl", seed=31, dtype="bfloat16"),
        "instruct": make_tiny_mistral("moe-instruct", seed=32, dtype="bfloat16"),
        "code": make_tiny_mistral("moe-code", seed=33, dtype="bfloat16"),
    }


def _recipe(experts, gate_mode: str, **extra) -> str:
    lines = [f"base_model: {experts['base']}", f"gate_mode: {gate_mode}", "experts:"]
    for name in ("nl", "instruct", "code"):
        lines.append(f"  - source_model: {experts[name]}")
        lines.append("    positive_prompts:")
        lines += [f'      - "{p}"' for p in PROMPTS[name]]
    if name := extra.pop("negative", None):
        lines += ["    negative_prompts:", f'      - "{PROMPTS[name][0]}"']
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def _mergekit_moe(text: str, out: Path, seed: int | None = None) -> Path:
    import yaml
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    if seed is not None:
        torch.manual_seed(seed)
    config = MoEMergeConfig.model_validate(yaml.safe_load(text))
    build(config, str(out), MergeOptions(device="cpu", quiet=True), device="cpu")
    return out


def _compare(ours: Path, theirs: Path) -> None:
    mine, ref = load_tensors(ours), load_tensors(theirs)
    assert sorted(mine) == sorted(ref)
    for name, expected in ref.items():
        assert mine[name].dtype == expected.dtype, name
        assert torch.equal(mine[name], expected), name
    a = json.loads((ours / "config.json").read_text())
    b = json.loads((theirs / "config.json").read_text())
    for key in (
        "architectures",
        "model_type",
        "num_local_experts",
        "num_experts_per_tok",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "sliding_window",
        "dtype",
    ):
        assert a.get(key) == b.get(key), key


@pytest.mark.parametrize(
    ("gate_mode", "extra"),
    [
        ("cheap_embed", {}),
        ("cheap_embed", {"negative": "code", "dtype": "float32", "experts_per_token": 1}),
        ("random", {}),
        ("hidden", {}),
    ],
)
def test_the_child_is_mergekit_moes(gate_mode, extra, experts, tmp_path):
    text = _recipe(experts, gate_mode, **extra)
    ours = build_moe(
        parse_moe_recipe(text), tmp_path / "ours", recipe_text=text, device="cpu", seed=5
    )
    theirs = _mergekit_moe(text, tmp_path / "theirs", seed=5)
    _compare(ours, theirs)
    assert (ours / "mergekit_moe_config.yml").read_text() == text


def test_noise_and_residual_scale_draw_like_mergekit(experts, tmp_path):
    text = _recipe(experts, "random").replace(
        f"  - source_model: {experts['instruct']}\n",
        f"  - source_model: {experts['instruct']}\n    noise_scale: 0.01\n    residual_scale: 0.5\n",
    )
    ours = build_moe(
        parse_moe_recipe(text), tmp_path / "ours", recipe_text=text, device="cpu", seed=2
    )
    theirs = _mergekit_moe(text, tmp_path / "theirs", seed=2)
    _compare(ours, theirs)


def test_the_child_loads_as_mixtral_and_scores(experts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.api import score_path
    from tests.helpers import write_mini_suite

    text = _recipe(experts, "cheap_embed")
    child = build_moe(parse_moe_recipe(text), tmp_path / "moe", recipe_text=text, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(child)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 3
    tensors = load_tensors(child)
    for name, param in model.state_dict().items():
        assert torch.equal(param, tensors[name].to(param.dtype)), name
    tokenizer = AutoTokenizer.from_pretrained(child)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == tokenizer.bos_token
    suite = write_mini_suite(tmp_path / "suite", "ppl_nl", "Bassie en Adriaan reizen samen.")
    card = score_path(str(child), str(suite), device="cpu")
    assert card["probes"]["kennis"]["n"] == 2


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda t: t.replace("gate_mode: cheap_embed", "gate_mode: cheep_embed"), "gate_mode"),
        (lambda t: t + "experts_per_token: 4\n", "3 experts for experts_per_token 4"),
        (lambda t: t.replace("positive_prompts:", "positive_promts:", 1), "unknown key"),
        (lambda t: t + "shared_experts:\n  - source_model: x\n", "no shared experts"),
        (lambda t: t + "architecture: qwen\n", "only Mixtral is supported"),
    ],
)
def test_a_bad_recipe_names_the_line_and_field(change, match, experts):
    with pytest.raises(KruisingError, match=match) as info:
        parse_moe_recipe(change(_recipe(experts, "cheap_embed")), "moe.yaml")
    assert "moe.yaml:" in str(info.value)


def test_prompts_are_needed_unless_random_and_experts_must_differ(experts, tmp_path):
    bare = f"base_model: {experts['base']}\nexperts:\n  - source_model: {experts['nl']}\n"
    bare += f"  - source_model: {experts['code']}\n"
    with pytest.raises(KruisingError, match=r"experts\[0\]: no positive_prompts"):
        parse_moe_recipe(bare + "gate_mode: hidden\n", "moe.yaml")
    same = bare.replace(experts["code"].name, experts["nl"].name) + "gate_mode: random\n"
    with pytest.raises(KruisingError, match="every expert is the same model"):
        build_moe(parse_moe_recipe(same), tmp_path / "same", device="cpu")
    assert not (tmp_path / "same").exists()


def test_the_example_recipe_parses_like_mergekit_moe():
    import yaml
    from mergekit.moe.config import MoEMergeConfig

    from tests.merger.core.test_recipe import REPO

    path = REPO / "recipes" / "moe" / "dutch-instruct-code.yml"
    text = path.read_text()
    ours = parse_moe_recipe(text, str(path))
    theirs = MoEMergeConfig.model_validate(yaml.safe_load(text))
    assert ours.gate_mode == theirs.gate_mode and len(ours.experts) == len(theirs.experts) == 3
    assert ours.experts[2].negative_prompts == theirs.experts[2].negative_prompts


def test_merge_moe_then_merge_eval_from_the_command_line(experts, tmp_path):
    """`merge moe RECIPE --out DIR` writes the child; `merge eval DIR` scores it."""
    import os
    import subprocess
    import sys

    from tests.helpers import write_mini_suite

    recipe = tmp_path / "moe.yaml"
    recipe.write_text(_recipe(experts, "random"))
    env = {**os.environ, "NO_COLOR": "1"}
    run = [sys.executable, "-m", "merger.cli"]
    done = subprocess.run(
        [*run, "moe", str(recipe), "--out", str(tmp_path / "moe"), "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    suite = write_mini_suite(tmp_path / "suite", "ppl_nl", "Bassie en Adriaan reizen samen.")
    done = subprocess.run(
        [*run, "eval", str(tmp_path / "moe"), "--suite", str(suite), "--device", "cpu", "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["probes"]["kennis"]["n"] == 2  # one model: one scorecard
    again = subprocess.run(
        [*run, "moe", str(recipe), "--out", str(tmp_path / "moe"), "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert again.returncode != 0
    assert "error: output folder" in again.stderr and "hint:" in again.stderr
