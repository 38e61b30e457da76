"""`merge run` end to end: exact values through the engine, and every expected failure."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kruising.errors import KruisingError
from merger.core.engine import run_recipe, run_recipe_file
from merger.core.options import MergeOptions
from tests.helpers import load_tensors


@pytest.fixture(scope="session")
def models(make_tiny_mistral):
    return {
        "a": make_tiny_mistral("engine-a", seed=10),
        "b": make_tiny_mistral("engine-b", seed=11),
        "c": make_tiny_mistral("engine-c", seed=12),
    }


def merge_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run the `merge` console script in-process; return (exit code, stderr)."""
    from merger import cli

    capsys.readouterr()  # drop what fixtures printed
    old = sys.argv
    sys.argv = ["merge", *argv]
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def write_recipe(tmp_path: Path, text: str, **refs: Path) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text.format(**{k: str(v) for k, v in refs.items()}))
    return recipe


def assert_no_child(out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []


SLERP = """
merge_method: slerp
base_model: {a}
models:
  - model: {a}
  - model: {b}
parameters:
  t: {t}
"""


# --- exact values through the engine -------------------------------------------------------


@pytest.mark.parametrize(("t", "expected"), [(0, "a"), (1, "b")])
def test_slerp_endpoints_give_the_parents(t, expected, models, tmp_path):
    recipe = write_recipe(tmp_path, SLERP.replace("{t}", str(t)), **models)
    child = run_recipe_file(recipe, tmp_path / "child", MergeOptions(device="cpu", progress=False))
    got, want = load_tensors(child), load_tensors(models[expected])
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_linear_one_hot_weights_give_that_model(models, tmp_path):
    text = """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.0}}
  - model: {b}
    parameters: {{weight: 2.0}}
"""
    child = run_recipe_file(
        write_recipe(tmp_path, text, **models), tmp_path / "c", MergeOptions(device="cpu")
    )
    got, want = load_tensors(child), load_tensors(models["b"])
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_ties_keeps_exactly_k_values_per_tensor(models, tmp_path):
    text = """
merge_method: ties
base_model: {a}
models:
  - model: {b}
    parameters: {{density: 0.3, weight: 1.0}}
"""
    child = run_recipe_file(
        write_recipe(tmp_path, text, **models), tmp_path / "c", MergeOptions(device="cpu")
    )
    got, base, other = load_tensors(child), load_tensors(models["a"]), load_tensors(models["b"])
    checked = 0
    for name, tensor in got.items():
        if not bool((other[name] != base[name]).all()):
            continue  # norms start at 1.0 in both: no task vector to trim
        kept = int((tensor != base[name]).sum())
        assert kept == max(1, int(0.3 * tensor.numel())), name
        checked += 1
    assert checked >= 30


def test_gradient_is_interpolated_over_layer_depth(models, tmp_path):
    recipe = write_recipe(tmp_path, SLERP.replace("{t}", "[0.0, 0.9]"), **models)
    child = run_recipe_file(recipe, tmp_path / "c", MergeOptions(device="cpu"))
    groups = json.loads((child / "kruising_provenance.json").read_text())["groups"]
    for layer in range(4):
        (entry,) = groups[f"slice 0, layer {layer}"]
        assert entry["params"]["t"] == pytest.approx(0.9 * layer / 3)
    (embed,) = groups["embeddings"]
    assert embed["params"]["t"] == 0.0  # outside the layers: the start of the gradient


def test_dare_is_reproducible_for_a_seed(models, tmp_path):
    text = """
merge_method: dare_ties
base_model: {a}
models:
  - model: {b}
    parameters: {{density: 0.5, weight: 1.0}}
"""
    recipe = write_recipe(tmp_path, text, **models)
    one = load_tensors(
        run_recipe_file(recipe, tmp_path / "one", MergeOptions(device="cpu", seed=3))
    )
    two = load_tensors(
        run_recipe_file(recipe, tmp_path / "two", MergeOptions(device="cpu", seed=3))
    )
    other = load_tensors(
        run_recipe_file(recipe, tmp_path / "other", MergeOptions(device="cpu", seed=4))
    )
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(one[name], two[name])
    assert not torch.equal(one[name], other[name])


def test_shards_are_split_and_indexed(models, tmp_path):
    recipe = write_recipe(tmp_path, SLERP.replace("{t}", "0.5"), **models)
    child = run_recipe_file(
        recipe, tmp_path / "c", MergeOptions(device="cpu", out_shard_size="1MB")
    )
    shards = sorted(p.name for p in child.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    index = json.loads((child / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load_tensors(child))


def test_cli_prints_the_plan_first_and_writes_a_loadable_child(models, tmp_path, capsys):
    recipe = write_recipe(tmp_path, SLERP.replace("{t}", "0.25"), **models)
    code, err = merge_cli(
        ["run", str(recipe), "--out", str(tmp_path / "c"), "--device", "cpu"], capsys
    )
    assert code == 0, err
    assert "slerp: 2 models, 39 tensors, 4 layers" in err
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"]


def test_mergekit_engine_runs_the_recipe(models, tmp_path):
    recipe = write_recipe(tmp_path, SLERP.replace("{t}", "0.4"), **models)
    ours = load_tensors(run_recipe_file(recipe, tmp_path / "ours", MergeOptions(device="cpu")))
    theirs_dir = run_recipe_file(
        recipe, tmp_path / "theirs", MergeOptions(device="cpu", engine="mergekit")
    )
    theirs = load_tensors(theirs_dir)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)
    assert (theirs_dir / "README.md").is_file()
    assert (theirs_dir / "mergekit_config.yml").read_text() == recipe.read_text()


def test_pickle_checkpoints_need_allow_pickle(models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    AutoModelForCausalLM.from_pretrained(models["b"]).save_pretrained(
        pickled, safe_serialization=False
    )
    if not list(pickled.glob("*.bin")):
        # transformers 5 may always write safetensors; build the pickle by hand then
        for f in pickled.glob("*.safetensors"):
            f.unlink()
        torch.save(load_file(models["b"] / "model.safetensors"), pickled / "pytorch_model.bin")
    recipe = write_recipe(tmp_path, SLERP.replace("{t}", "1"), a=models["a"], b=pickled)
    out = tmp_path / "child"
    code, err = merge_cli(["run", str(recipe), "--out", str(out), "--device", "cpu"], capsys)
    assert code == 1 and "only pickle checkpoints" in err and "--allow-pickle" in err
    assert_no_child(out)
    child = run_recipe_file(recipe, out, MergeOptions(device="cpu", allow_pickle=True))
    got, want = load_tensors(child), load_tensors(models["b"])
    assert torch.equal(got["lm_head.weight"], want["lm_head.weight"])


# --- expected failures: one line + hint, exit 1, no child ---------------------------------


def _corrupt_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst / "model.safetensors")
    return dst


def _drop_tensor(shard: Path) -> None:
    tensors = load_file(shard)
    del tensors["model.layers.2.mlp.down_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})


def _nan_tensor(shard: Path) -> None:
    tensors = load_file(shard)
    tensors["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})


def _truncate(shard: Path) -> None:
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def _garbage(shard: Path) -> None:
    shard.write_bytes(b"\xff" * 64)


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        (
            "unknown_method",
            r"merge_method 'frankenmerge' has no native implementation.*--engine mergekit",
        ),
        ("missing_folder", r"model folder not found: .*does-not-exist"),
        ("missing_tensor", r"tensor model\.layers\.2\.mlp\.down_proj\.weight is missing in model"),
        (
            "shape_mismatch",
            r"shape mismatch in model\.layers\.0\.mlp\.gate_proj\.weight: .* \(64, 32\), .* \(48, 32\)",
        ),
        (
            "vocab_mismatch",
            r"vocabulary sizes differ in model\.embed_tokens\.weight.*tokenizer_source: union",
        ),
        (
            "density_range",
            r"recipe\.yaml:6: models\[0\]\.parameters\.density: density must be in \[0, 1\], got 1\.5",
        ),
        ("t_range", r"t must be in \[0, 1\], got 1\.2"),
        ("nan", r"merged tensor model\.layers\.1\.self_attn\.q_proj\.weight has 1 NaN/Inf values"),
        ("truncated", r"truncated or corrupt safetensors shard .*model\.safetensors"),
        ("corrupt", r"corrupt safetensors shard .*model\.safetensors"),
        (
            "unknown_param",
            r"recipe\.yaml:6: models\[0\]\.parameters\.t: unknown key: ties takes density",
        ),
        ("offline_hub", r"Hub model some-org/some-model is not in the local cache"),
    ],
)
def test_expected_failures(case, pattern, models, make_tiny_mistral, tmp_path, capsys, monkeypatch):
    a, b = models["a"], models["b"]
    text = SLERP.replace("{t}", "0.5")
    if case == "unknown_method":
        text = text.replace("slerp", "frankenmerge")
    elif case == "missing_folder":
        b = tmp_path / "does-not-exist"
    elif case == "missing_tensor":
        b = _corrupt_copy(models["b"], tmp_path / "m", _drop_tensor)
    elif case == "shape_mismatch":
        b = make_tiny_mistral("narrow", seed=3, intermediate_size=48)
    elif case == "vocab_mismatch":
        b = make_tiny_mistral("bigvocab", seed=3, vocab_size=32002)
    elif case == "density_range":
        text = """
merge_method: ties
base_model: {a}
models:
  - model: {b}
    parameters: {{density: 1.5, weight: 1.0}}
"""
    elif case == "t_range":
        text = SLERP.replace("{t}", "[0.0, 1.2]")
    elif case == "nan":
        b = _corrupt_copy(models["b"], tmp_path / "m", _nan_tensor)
    elif case == "truncated":
        b = _corrupt_copy(models["b"], tmp_path / "m", _truncate)
    elif case == "corrupt":
        b = _corrupt_copy(models["b"], tmp_path / "m", _garbage)
    elif case == "unknown_param":
        text = """
merge_method: ties
base_model: {a}
models:
  - model: {b}
    parameters: {{t: 0.5, weight: 1.0}}
"""
    elif case == "offline_hub":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        b = "some-org/some-model"
    recipe = write_recipe(tmp_path, text, a=a, b=b)
    out = tmp_path / "child"
    code, err = merge_cli(["run", str(recipe), "--out", str(out), "--device", "cpu"], capsys)
    assert code == 1
    assert "error: " in err
    err = err[err.index("error: ") :]  # the plan line may come first
    assert "\nhint: " in err
    assert "Traceback" not in err
    import re

    assert re.search(pattern, " ".join(err.split())), err
    assert_no_child(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_a_gpu_is_an_error(models, tmp_path, capsys):
    recipe = write_recipe(tmp_path, SLERP.replace("{t}", "0.5"), **models)
    out = tmp_path / "child"
    code, err = merge_cli(["run", str(recipe), "--out", str(out), "--device", "cuda"], capsys)
    assert code == 1 and "no CUDA GPU is available" in err and "hint: " in err
    assert_no_child(out)


def test_not_enough_disk_is_an_error(models, tmp_path, capsys, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    recipe = write_recipe(tmp_path, SLERP.replace("{t}", "0.5"), **models)
    out = tmp_path / "child"
    code, err = merge_cli(["run", str(recipe), "--out", str(out), "--device", "cpu"], capsys)
    assert code == 1 and "not enough disk for the child" in err
    assert_no_child(out)


def test_disk_full_while_writing_is_an_error(models, tmp_path, capsys, monkeypatch):
    from merger.core import io

    real_pwrite = io.os.pwrite

    def full(fd, data, offset):
        if offset > 0:  # the open-time probe (offset 0) passes; the tensors do not
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(io.os, "pwrite", full)
    monkeypatch.setattr(io, "SEGMENT_BYTES", 64 << 10)
    recipe = write_recipe(tmp_path, SLERP.replace("{t}", "0.5"), **models)
    out = tmp_path / "child"
    code, err = merge_cli(["run", str(recipe), "--out", str(out), "--device", "cpu"], capsys)
    assert code == 1 and "No space left on device" in err and "hint: " in err
    assert "Traceback" not in err
    assert_no_child(out)


def test_existing_output_is_kept_unless_overwrite(models, tmp_path, capsys):
    recipe = write_recipe(tmp_path, SLERP.replace("{t}", "0.5"), **models)
    out = tmp_path / "child"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = merge_cli(["run", str(recipe), "--out", str(out), "--device", "cpu"], capsys)
    assert code == 1 and "already exists" in err and (out / "keep.txt").is_file()
    with pytest.raises(KruisingError, match="--overwrite refuses to replace"):  # not a child
        run_recipe_file(recipe, out, MergeOptions(device="cpu", overwrite=True))
    assert (out / "keep.txt").is_file()
    (out / "keep.txt").unlink()  # an empty folder, then a child: both are replaced
    run_recipe_file(recipe, out, MergeOptions(device="cpu", overwrite=True))
    (out / "extra.txt").write_text("child's")
    run_recipe_file(recipe, out, MergeOptions(device="cpu", overwrite=True))
    assert not (out / "extra.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_failure_mid_merge_leaves_no_child(models, tmp_path, monkeypatch):
    from kruising.errors import KruisingError
    from merger.core import engine
    from merger.core.recipe import load_recipe

    calls = {"n": 0}
    real = engine.compute_task

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KruisingError("simulated failure", "none")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "compute_task", flaky)
    recipe = write_recipe(tmp_path, SLERP.replace("{t}", "0.5"), **models)
    with pytest.raises(KruisingError, match="simulated failure"):
        run_recipe(load_recipe(recipe), tmp_path / "child", MergeOptions(device="cpu"))
    assert_no_child(tmp_path / "child")


def test_chat_template_by_name_and_tokenizer_source(models, tmp_path):
    from transformers import AutoTokenizer

    text = SLERP.replace("{t}", "0.5") + "tokenizer_source: {b}\nchat_template: chatml\n"
    child = run_recipe_file(
        write_recipe(tmp_path, text, **models), tmp_path / "c", MergeOptions(device="cpu")
    )
    tokenizer = AutoTokenizer.from_pretrained(child)
    assert "<|im_start|>" in tokenizer.chat_template
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Wie is Bassie?"}], tokenize=False
    )
    assert rendered.startswith("<|im_start|>user\nWie is Bassie?")


def test_unknown_chat_template_name_is_an_error(models, tmp_path):
    from kruising.errors import KruisingError

    text = SLERP.replace("{t}", "0.5") + "chat_template: klingon\n"
    with pytest.raises(KruisingError, match="chat_template 'klingon' is neither"):
        run_recipe_file(
            write_recipe(tmp_path, text, **models), tmp_path / "c", MergeOptions(device="cpu")
        )
    assert_no_child(tmp_path / "c")
