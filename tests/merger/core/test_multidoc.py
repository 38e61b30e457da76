"""Multi-document recipes (mergekit-multimerge): every stage planned before the first is
merged, intermediates reused when complete, and the same children as mergekit 0.1.5's
multimerge on bf16-stored models."""

from __future__ import annotations

import json

import pytest
import torch

from kruising.errors import KruisingError
from merger.core.engine import run_recipe_file
from merger.core.options import MergeOptions
from tests.helpers import load_tensors

RTOL, ATOL = 1e-5, 1e-6

STAGES = """\
name: nl_mix
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.6}}
  - model: {b}
    parameters: {{weight: 0.4}}
dtype: float32
---
name: chat
merge_method: slerp
base_model: nl_mix
models:
  - model: nl_mix
  - model: {c}
parameters:
  t: [0, 0.5, 1]
dtype: float32
---
merge_method: task_arithmetic
base_model: {a}
models:
  - model: nl_mix
    parameters: {{weight: 0.5}}
  - model: chat
    parameters: {{weight: 0.7}}
dtype: float32
"""


@pytest.fixture(scope="session")
def bf16_parents(make_tiny_mistral):
    return {
        k: make_tiny_mistral(f"multi-{k}", seed=i, dtype="bfloat16") for i, k in enumerate("abc")
    }


def write(tmp_path, text, parents):
    path = tmp_path / "stages.yml"
    path.write_text(text.format(**{k: str(v) for k, v in parents.items()}))
    return path


def assert_same(ours, theirs):
    mine, ref = load_tensors(ours), load_tensors(theirs)
    assert sorted(mine) == sorted(ref)
    for name, expected in ref.items():
        assert mine[name].dtype == expected.dtype, name
        torch.testing.assert_close(mine[name].float(), expected.float(), rtol=RTOL, atol=ATOL)
    for key in ("vocab_size", "num_hidden_layers", "dtype", "architectures"):
        our = json.loads((ours / "config.json").read_text())
        assert our.get(key) == json.loads((theirs / "config.json").read_text()).get(key), key


def test_stages_match_mergekit_multimerge(bf16_parents, tmp_path, capsys):
    from click.testing import CliRunner
    from mergekit.scripts.multimerge import main

    recipe = write(tmp_path, STAGES, bf16_parents)
    result = CliRunner().invoke(
        main, [str(recipe), "--out-path", str(tmp_path / "theirs"), "-I", str(tmp_path / "mk")]
    )
    assert result.exit_code == 0, result.output
    out = run_recipe_file(
        recipe, tmp_path / "ours", MergeOptions(device="cpu"), intermediate_dir=tmp_path / "I"
    )
    for stage in ("nl_mix", "chat"):
        assert_same(tmp_path / "I" / stage, tmp_path / "mk" / stage)
    assert_same(out, tmp_path / "theirs")
    # the stages read the intermediates: the final child is not the recipe over a, b, c
    assert "intermediates in" in capsys.readouterr().err

    # again, into another child: both stages are reused, the child is the same
    again = run_recipe_file(
        recipe, tmp_path / "again", MergeOptions(device="cpu"), intermediate_dir=tmp_path / "I"
    )
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "nl_mix: reusing" in err and "chat: reusing" in err
    one, two = load_tensors(out), load_tensors(again)
    assert all(torch.equal(one[k], two[k]) for k in one)

    # an edited first stage is merged again, and so is the stage that reads it
    recipe.write_text(recipe.read_text().replace("weight: 0.6", "weight: 0.9"))
    run_recipe_file(
        recipe, tmp_path / "edited", MergeOptions(device="cpu"), intermediate_dir=tmp_path / "I"
    )
    err = " ".join(capsys.readouterr().err.split())
    assert "holds another recipe: merged again" in err and "reusing" not in err


def test_default_intermediate_dir_is_next_to_out(bf16_parents, tmp_path):
    recipe = write(tmp_path, STAGES, bf16_parents)
    run_recipe_file(recipe, tmp_path / "child", MergeOptions(device="cpu", progress=False))
    assert sorted(p.name for p in (tmp_path / "child.stages").iterdir()) == ["chat", "nl_mix"]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            ("{{weight: 0.5}}", "{{weight: 0.5, t: 2}}"),
            r"stages\.yml:2\d: models\[0\]\.parameters\.t: unknown key",
        ),
        (
            (
                "base_model: {a}\nmodels:\n  - model: nl_mix",
                "base_model: {a}\ntokenizer_source: {a}/nope\nmodels:\n  - model: nl_mix",
            ),
            r"stage final merge: tokenizer_source .*nope",
        ),
        (
            ("  - model: {c}\n", "  - model: {c}\n  - model: {a}\n"),
            r"stage chat: slerp merges exactly 2",
        ),
        (("name: chat", "name: nl_mix"), r"stages\.yml:10: name 'nl_mix' \(the first at line 1\)"),
        (
            (
                "base_model: nl_mix\nmodels:\n  - model: nl_mix",
                "base_model: chat\nmodels:\n  - model: chat",
            ),
            r"circle: chat -> chat",
        ),
    ],
)
def test_every_stage_is_checked_before_the_first_is_merged(
    edit, match, bf16_parents, tmp_path, monkeypatch
):
    import merger.core.engine as engine

    merged = []
    monkeypatch.setattr(engine, "compute_task", lambda *a, **k: merged.append(1))
    recipe = write(tmp_path, STAGES.replace(*edit), bf16_parents)
    with pytest.raises(KruisingError, match=match) as info:
        run_recipe_file(recipe, tmp_path / "child", MergeOptions(device="cpu"))
    assert info.value.hint
    assert merged == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.yml"]
