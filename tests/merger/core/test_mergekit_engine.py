"""`merge run --engine mergekit`: our parser's findings as warnings, mergekit's rejections as
one-line errors before any work, mergekit's options forwarded (and refused natively where
they mean nothing), shard sizes in bytes, `--lora-merge-dtype`, multi-document recipes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from kruising.errors import KruisingError
from merger.core.engine import run_recipe_file
from merger.core.options import MergeOptions
from tests.helpers import load_tensors, run_mergekit
from tests.merger.core.test_adapter import lora_models  # noqa: F401 (a fixture)
from tests.merger.core.test_engine import assert_no_child, merge_cli, write_recipe

MK = dict(device="cpu", engine="mergekit")


@pytest.fixture(scope="session")
def parents(make_tiny_mistral):
    return {
        k: make_tiny_mistral(f"mk-{k}", seed=20 + i, dtype="bfloat16") for i, k in enumerate("ab")
    }


# keys mergekit drops (`foo`, `densty`), and a LoRA tokenizer_source we refuse natively
LENIENT = """\
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 1.0, densty: 0.3}}
  - model: {b}
    parameters: {{weight: 3.0}}
foo: bar
dtype: float32
out_dtype: bfloat16
"""


class Captured(Exception):
    """Raised by a stand-in for mergekit's run_merge: the options it was called with."""


@pytest.fixture
def capture_run_merge(monkeypatch):
    """mergekit's run_merge replaced by one that records its options and stops."""
    import mergekit.merge

    calls = []

    def fake(config, out_path, options, config_source=None):
        calls.append((config, out_path, options))
        raise Captured

    monkeypatch.setattr(mergekit.merge, "run_merge", fake)
    return calls


def test_unknown_keys_are_warnings_naming_file_and_line(parents, tmp_path, capsys):
    recipe = write_recipe(tmp_path, LENIENT, **parents)
    with pytest.raises(KruisingError, match=r"unknown key"):
        run_recipe_file(recipe, tmp_path / "native", MergeOptions(device="cpu"))
    code, err = merge_cli(
        [
            "run",
            str(recipe),
            "--out",
            str(tmp_path / "c"),
            "--engine",
            "mergekit",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {recipe}:4: models[0].parameters.densty: unknown key: linear takes normalize, "
        "weight (passed to mergekit as written)",
        f"warning: {recipe}:7: foo: unknown key (passed to mergekit as written)",
    ]
    child = tmp_path / "c"
    assert (child / "mergekit_config.yml").read_text() == recipe.read_text()
    provenance = json.loads((child / "kruising_provenance.json").read_text())
    assert provenance["engine"] == "mergekit" and provenance["merge_method"] == "linear"
    assert len(provenance["inputs"]) == 2
    a, b = load_tensors(parents["a"]), load_tensors(parents["b"])
    got = load_tensors(child)
    name = "model.layers.1.mlp.up_proj.weight"
    want = ((a[name].float() * 1.0 + b[name].float() * 3.0) / 4.0).to(torch.bfloat16)
    assert torch.equal(got[name], want)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            "merge_method: ties\nbase_model: {a}\nmodels:\n  - model: {b}\n",
            r"recipe\.yaml: mergekit rejects the recipe: RuntimeError: Missing required "
            r"parameter weight for .*",
        ),
        (
            "merge_method: frankenmerge\nmodels:\n  - model: {a}\n",
            r"mergekit rejects the recipe: RuntimeError: Unimplemented merge method frankenmerge",
        ),
        (
            "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
            "dtype: fp16\n",
            r"mergekit rejects the recipe: RuntimeError: Unimplemented dtype \"fp16\"",
        ),
        (
            "merge_method: linear\nmodels:\n  - model: {a}\nslices:\n  - sources:\n"
            "      - model: {a}\n        layer_range: [0, 2]\n",
            r"mergekit rejects the recipe: .*Exactly one of 'models', 'slices', or 'modules'",
        ),
        ("- just\n- a list\n", r"mergekit rejects the recipe: it is not a mapping of keys"),
        ("merge_method: [unclosed\n", r"mergekit rejects the recipe: (Parser|Scanner)Error"),
        (
            "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
            "  - model: /no/such/model\n    parameters: {{weight: 1}}\n",
            r"mergekit rejects the recipe: .*no/such/model",
        ),
    ],
)
def test_what_mergekit_rejects_is_one_error_line_before_any_work(
    text, pattern, parents, tmp_path, capsys, capture_run_merge
):
    recipe = write_recipe(tmp_path, text, **parents)
    out = tmp_path / "child"
    with pytest.raises(KruisingError, match=pattern) as info:
        run_recipe_file(recipe, out, MergeOptions(**MK))
    assert "\n" not in info.value.message and "nothing was written" in info.value.hint
    assert capture_run_merge == []  # refused before mergekit's merge was called
    assert_no_child(out)
    code, err = merge_cli(["run", str(recipe), "--out", str(out), "--engine", "mergekit"], capsys)
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0])


def test_options_are_forwarded_to_mergekit(parents, tmp_path, capture_run_merge):
    recipe = write_recipe(tmp_path, LENIENT, **parents)
    options = MergeOptions(
        **MK,
        seed=7,
        out_shard_size="3MB",
        trust_remote_code=True,
        allow_crimes=True,
        copy_tokenizer=False,
        lora_merge_cache=str(tmp_path / "lora-cache"),
        lora_merge_dtype="float16",
        mergekit_options=(("clone_tensors", "true"), ("num_threads", "1")),
    )
    with pytest.raises(KruisingError, match=r"mergekit failed: Captured"):
        run_recipe_file(recipe, tmp_path / "c", options)
    [(_, _, got)] = capture_run_merge
    assert (got.device, got.cuda, got.random_seed) == ("cpu", False, 7)
    assert got.out_shard_size == 3_000_000  # bytes: mergekit's writer counts bytes
    assert got.trust_remote_code and got.allow_crimes and not got.copy_tokenizer
    assert got.lora_merge_cache == str(tmp_path / "lora-cache")
    assert got.lora_merge_dtype == "float16"
    assert got.clone_tensors is True and got.num_threads == 1
    assert_no_child(tmp_path / "c")


@pytest.mark.parametrize(
    ("pairs", "pattern"),
    [
        ((("clone_tensor", "1"),), r"mergekit's MergeOptions has no field 'clone_tensor'"),
        ((("num_threads", "many"),), r"--mergekit-option num_threads=many: .*integer"),
        ((("random_seed", "3"),), r"--mergekit-option random_seed: merge run has its own flag"),
        ((("cuda", "true"),), r"--mergekit-option cuda: merge run has its own flag"),
        ((("out_shard_size", "1000"),), r"--mergekit-option out_shard_size: merge run has its own"),
        ((("write_model_card", "true"),), r"--mergekit-option write_model_card: merge run has"),
    ],
)
def test_bad_mergekit_options_are_one_line_errors(pairs, pattern, parents, tmp_path):
    recipe = write_recipe(tmp_path, LENIENT, **parents)
    with pytest.raises(KruisingError, match=pattern) as info:
        run_recipe_file(recipe, tmp_path / "c", MergeOptions(**MK, mergekit_options=pairs))
    assert "\n" not in info.value.message
    assert_no_child(tmp_path / "c")


def test_the_cli_flags_reach_mergekit(parents, tmp_path, capsys, capture_run_merge):
    recipe = write_recipe(tmp_path, LENIENT, **parents)
    argv = ["run", str(recipe), "--out", str(tmp_path / "c"), "--engine", "mergekit"]
    argv += ["--device", "cpu", "--seed", "3", "--out-shard-size", "2MB", "--trust-remote-code"]
    argv += ["--allow-crimes", "--no-copy-tokenizer", "--lora-merge-dtype", "bfloat16"]
    argv += ["--lora-merge-cache", str(tmp_path / "cache")]
    argv += ["--mergekit-option", "clone_tensors=true", "--mergekit-option", "num-threads=1"]
    code, err = merge_cli(argv, capsys)
    assert code == 1 and "mergekit failed: Captured" in err
    [(_, _, got)] = capture_run_merge
    assert (got.random_seed, got.out_shard_size, got.lora_merge_dtype) == (3, 2_000_000, "bfloat16")
    assert got.trust_remote_code and got.allow_crimes and not got.copy_tokenizer
    assert got.lora_merge_cache == str(tmp_path / "cache")
    assert got.clone_tensors and got.num_threads == 1
    (tmp_path / "native").mkdir()
    plain = write_recipe(tmp_path / "native", NATIVE_OK, **parents)
    for flag in ("--trust-remote-code", "--allow-crimes"):
        code, err = merge_cli(["run", str(plain), "--out", str(tmp_path / "n"), flag], capsys)
        assert code == 1 and f"error: {flag}" in err
    assert_no_child(tmp_path / "n")


def test_model_lora_with_the_mergekit_engine(lora_models, tmp_path):  # noqa: F811
    text = (
        "merge_method: linear\nmodels:\n  - model: {a}+{plain}\n    parameters: {{weight: 1.0}}\n"
        "  - model: {b}\n    parameters: {{weight: 1.0}}\ndtype: float32\n"
    ).format(**{k: str(v) for k, v in lora_models.items()})
    recipe = tmp_path / "r.yml"
    recipe.write_text(text)
    with pytest.raises(
        KruisingError, match=r"mergekit rejects the recipe: RuntimeError: Need to specify cache dir"
    ) as info:
        run_recipe_file(recipe, tmp_path / "no-cache", MergeOptions(**MK))
    assert "--lora-merge-cache" in info.value.hint
    assert_no_child(tmp_path / "no-cache")
    cache = str(tmp_path / "cache")
    theirs = load_tensors(
        run_recipe_file(recipe, tmp_path / "mk", MergeOptions(**MK, lora_merge_cache=cache))
    )
    ours = load_tensors(run_recipe_file(recipe, tmp_path / "ours", MergeOptions(device="cpu")))
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


def test_option_that_is_not_key_value(parents, tmp_path, capsys):
    recipe = write_recipe(tmp_path, LENIENT, **parents)
    code, err = merge_cli(
        ["run", str(recipe), "--out", str(tmp_path / "c"), "--engine", "mergekit"]
        + ["--mergekit-option", "clone_tensors"],
        capsys,
    )
    assert code == 1 and "--mergekit-option 'clone_tensors' is not KEY=VALUE" in err


NATIVE_OK = """\
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 1.0}}
  - model: {b}
    parameters: {{weight: 3.0}}
"""


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        (
            dict(mergekit_options=(("clone_tensors", "true"),)),
            r"--mergekit-option clone_tensors: mergekit's options are for --engine mergekit",
        ),
        (dict(trust_remote_code=True), r"--trust-remote-code means nothing to the native engine"),
        (dict(allow_crimes=True), r"--allow-crimes: the native engine merges models of one arch"),
        (dict(lora_merge_dtype="fp8"), r"--lora-merge-dtype 'fp8' is not a dtype mergekit knows"),
        (
            dict(engine="mergekit", compute_dtype="float32"),
            r"--compute-dtype float32 is a native-engine choice",
        ),
    ],
)
def test_options_that_mean_nothing_natively_are_errors(options, pattern, parents, tmp_path):
    recipe = write_recipe(tmp_path, NATIVE_OK, **parents)
    with pytest.raises(KruisingError, match=pattern):
        run_recipe_file(recipe, tmp_path / "c", MergeOptions(**{"device": "cpu", **options}))
    assert_no_child(tmp_path / "c")


def test_no_copy_tokenizer_natively(parents, tmp_path):
    recipe = write_recipe(tmp_path, NATIVE_OK, **parents)
    kept = run_recipe_file(recipe, tmp_path / "kept", MergeOptions(device="cpu"))
    bare = run_recipe_file(
        recipe, tmp_path / "bare", MergeOptions(device="cpu", copy_tokenizer=False)
    )
    assert (kept / "tokenizer.json").is_file()
    assert not list(bare.glob("tokenizer*")) and not (bare / "special_tokens_map.json").exists()
    assert (bare / "config.json").is_file()


def _shard_bytes(child: Path) -> list[list[int]]:
    from safetensors import safe_open

    shards = []
    for shard in sorted(child.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            shards.append([f.get_tensor(k).nbytes for k in f.keys()])
    return shards


def test_shards_hold_at_most_out_shard_size_bytes(parents, tmp_path):
    """mergekit 0.1.5's out_shard_size counts bytes (TensorWriter: numel * element_size,
    whatever its help says about parameters), so `--out-shard-size` goes to it as bytes: no
    shard of several tensors exceeds it, and they are filled to more than half of it (bytes
    divided by 4 for this float32 child would give shards of at most a quarter)."""
    limit = 100_000
    recipe = write_recipe(tmp_path, NATIVE_OK + "dtype: float32\n", **parents)
    for engine in ("mergekit", "native"):
        options = MergeOptions(device="cpu", engine=engine, out_shard_size=str(limit))
        shards = _shard_bytes(run_recipe_file(recipe, tmp_path / engine, options))
        several = [sum(s) for s in shards if len(s) > 1]
        assert several and max(several) <= limit, (engine, several)
        assert max(several) > limit / 2, (engine, several)
        assert all(len(s) == 1 for s in shards if sum(s) > limit)  # one big tensor alone


def test_lora_merge_dtype_natively_as_mergekit(lora_models, tmp_path):  # noqa: F811
    """--lora-merge-dtype float32 on a bf16 model: mergekit loads the model in float32, adds
    the adapter in float32 and merges that; natively the same, streamed and cached."""
    text = (
        "merge_method: task_arithmetic\nbase_model: {a}\nmodels:\n"
        "  - model: {a}+{plain}\n    parameters: {{weight: 1.0}}\n"
        "  - model: {b}\n    parameters: {{weight: 0.5}}\ndtype: float32\n"
    ).format(**{k: str(v) for k, v in lora_models.items()})
    theirs = load_tensors(
        run_mergekit(
            text,
            tmp_path / "theirs",
            lora_merge_cache=str(tmp_path / "mk-cache"),
            lora_merge_dtype="float32",
        )
    )
    recipe = tmp_path / "r.yml"
    recipe.write_text(text)
    ours = load_tensors(
        run_recipe_file(
            recipe, tmp_path / "ours", MergeOptions(device="cpu", lora_merge_dtype="float32")
        )
    )
    name = "model.layers.0.self_attn.q_proj.weight"  # adapted
    assert theirs[name].dtype == torch.float32
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    default = load_tensors(
        run_recipe_file(recipe, tmp_path / "default", MergeOptions(device="cpu"))
    )
    assert not torch.equal(default[name], ours[name])  # W + BA rounded to bf16 there
    cache = tmp_path / "ours-cache"
    cached = run_recipe_file(
        recipe,
        tmp_path / "cached",
        MergeOptions(device="cpu", lora_merge_dtype="float32", lora_merge_cache=str(cache)),
    )
    assert torch.equal(load_tensors(cached)[name], ours[name])
    with pytest.raises(
        KruisingError,
        match=r"the merged copy of .* is torch.float32, not --lora-merge-dtype bfloat16",
    ):
        run_recipe_file(
            recipe,
            tmp_path / "stale",
            MergeOptions(device="cpu", lora_merge_dtype="bfloat16", lora_merge_cache=str(cache)),
        )
    assert_no_child(tmp_path / "stale")


STAGES = """\
name: mix
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.6}}
  - model: {b}
    parameters: {{weight: 0.4}}
colour: blue
dtype: float32
---
merge_method: slerp
base_model: mix
models:
  - model: mix
  - model: {b}
parameters:
  t: 0.5
dtype: float32
"""


def test_multi_document_recipe_runs_every_stage_through_mergekit(
    parents, tmp_path, capsys, monkeypatch
):
    import merger.core.multidoc as multidoc
    import merger.core.plan as plan

    def no_native(*args, **kwargs):
        raise AssertionError("native planning ran")

    monkeypatch.setattr(multidoc, "plan_stages", no_native)
    monkeypatch.setattr(plan, "build_plan", no_native)
    recipe = write_recipe(tmp_path, STAGES, **parents)
    out, stages = tmp_path / "final", tmp_path / "stages"
    argv = ["run", str(recipe), "--out", str(out), "--engine", "mergekit", "-I", str(stages)]
    code, err = merge_cli(argv, capsys)
    assert code == 0, err
    assert f"warning: {recipe}:8: colour: unknown key (passed to mergekit as written)" in err
    assert "stage 1/2 mix" in err and "stage 2/2 final merge" in err
    for child in (stages / "mix", out):
        provenance = json.loads((child / "kruising_provenance.json").read_text())
        assert provenance["engine"] == "mergekit"
    a, b = load_tensors(parents["a"]), load_tensors(parents["b"])
    name = "model.norm.weight"
    mix = load_tensors(stages / "mix")[name]
    torch.testing.assert_close(mix, (0.6 * a[name].float() + 0.4 * b[name].float()).to(mix.dtype))
    assert str(stages / "mix") in (out / "mergekit_config.yml").read_text()
    code, err = merge_cli([*argv, "--overwrite"], capsys)
    assert code == 0 and "stage 1/2 mix: reusing" in err, err


def test_multi_document_rejections_come_before_the_first_stage(parents, tmp_path):
    bad = STAGES.replace("  t: 0.5\n", "  t: 0.5\nmodules: {{default: {{models: []}}}}\n")
    recipe = write_recipe(tmp_path, bad, **parents)
    out, stages = tmp_path / "final", tmp_path / "stages"
    with pytest.raises(
        KruisingError,
        match=rf"{re.escape(str(recipe))}:11: mergekit rejects the recipe: RuntimeError: Must specify",
    ):
        run_recipe_file(recipe, out, MergeOptions(**MK), intermediate_dir=stages)
    assert not stages.exists()
    assert_no_child(out)
    dup = STAGES.replace("merge_method: slerp", "name: mix\nmerge_method: slerp")
    recipe = write_recipe(tmp_path, dup, **parents)
    with pytest.raises(
        KruisingError, match=r":11: mergekit rejects the recipe: name 'mix' \(the first at line 1\)"
    ):
        run_recipe_file(recipe, out, MergeOptions(**MK), intermediate_dir=stages)
    assert not stages.exists()
