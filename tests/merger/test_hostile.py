"""Hostile input and faults (issue #15): what a stranger's recipe, card or checkpoint, a signal,
a full disk or a second run at once can do, each tried on tiny files.

Every test here reproduces an attack or a fault that once passed silently, hung, ran code or
lost data; together they run in seconds.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kruising.config import MAX_CHARS, MAX_NODES, compose_yaml
from kruising.errors import KruisingError
from merger.core.recipe import RecipeError, parse_recipe

# --------------------------------------------------------------------------------------------
# tiny checkpoints written directly (no transformers): config.json + one safetensors shard
# --------------------------------------------------------------------------------------------

LAYERS = 2


def tiny_tensors(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    names = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,)}
    for i in range(LAYERS):  # every tensor of mergekit's mistral.json layer
        names[f"model.layers.{i}.mlp.up_proj.weight"] = (12, 8)
        names[f"model.layers.{i}.input_layernorm.weight"] = (8,)
        for proj, shape in (("q", (8, 8)), ("k", (4, 8)), ("v", (4, 8)), ("o", (8, 8))):
            names[f"model.layers.{i}.self_attn.{proj}_proj.weight"] = shape
        names[f"model.layers.{i}.post_attention_layernorm.weight"] = (8,)
        names[f"model.layers.{i}.mlp.gate_proj.weight"] = (12, 8)
        names[f"model.layers.{i}.mlp.down_proj.weight"] = (8, 12)
    names["lm_head.weight"] = (16, 8)
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in names.items()}


def tiny_config() -> dict:
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": 8,
        "intermediate_size": 12,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 16,
    }


def tiny_model(folder, seed: int = 0, dtype: torch.dtype = torch.float32):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(tiny_config()))
    save_file(tiny_tensors(seed, dtype), str(folder / "model.safetensors"))
    return folder


def linear_recipe(*models, normalize: bool = True, weights=None) -> str:
    weights = weights or [0.5] * len(models)
    lines = ["merge_method: linear", "dtype: float32", "models:"]
    for model, weight in zip(models, weights, strict=True):
        lines += [f"  - model: {model}", f"    parameters: {{weight: {weight}}}"]
    if not normalize:
        lines += ["parameters: {normalize: false}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# (a) recipes and cards: alias bombs, size, tags
# --------------------------------------------------------------------------------------------


def alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        refs = ",".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "merge_method: linear\n" + "\n".join(lines) + "\nmodels: *a8\n"


def merge_key_bomb(levels: int = 12) -> str:
    lines = ["m0: &m0 {x: 1, y: 2}"]
    for i in range(1, levels):
        refs = ", ".join([f"*m{i - 1}"] * 9)
        lines.append(f"m{i}: &m{i} {{<<: [{refs}], k{i}: 1}}")
    return "merge_method: linear\n" + "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_with_file_and_line():
    with pytest.raises(RecipeError, match=rf"bomb\.yaml:\d+: .*more than {MAX_NODES} values"):
        parse_recipe(alias_bomb(), source="bomb.yaml")


BOMB_RUN = """
import atexit, sys
atexit.register(lambda: print("torch imported:", "torch" in sys.modules, file=sys.stderr))
sys.argv = ["merge", "run", sys.argv[1], "--out", sys.argv[2]]
from merger.cli import main
main()
"""


def test_merge_run_on_an_alias_bomb_fails_before_importing_torch(tmp_path):
    import subprocess
    import sys

    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(alias_bomb())
    result = subprocess.run(
        [sys.executable, "-c", BOMB_RUN, str(recipe), str(tmp_path / "child")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"error: {recipe}:2: refused: expands to more than")
    assert lines[-1] == "torch imported: False"
    assert not (tmp_path / "child").exists()


def test_a_merge_key_bomb_is_not_expanded():
    # PyYAML's flatten_mapping keeps every merged copy: 9**11 entries. Each key is kept once.
    data, _, problems = compose_yaml(merge_key_bomb(), "merge.yaml")
    assert problems == []
    assert data["m11"]["x"] == 1 and data["m11"]["k3"] == 1
    assert len(data["m11"]) == 13


def test_merge_keys_keep_yaml_precedence():
    text = "a: &a {x: 1, y: 1}\nb: &b {x: 2, z: 2}\nc: {<<: [*a, *b], y: 3}\n"
    data, _, problems = compose_yaml(text, "m.yaml")
    assert problems == []
    assert data["c"] == {"x": 1, "y": 3, "z": 2}  # written keys win, then the first merged


def test_a_recursive_alias_is_refused():
    data, _, problems = compose_yaml("a: &a [*a]\n", "r.yaml")
    assert data is None and "deeper than" in problems[0].message
    data, _, problems = compose_yaml("a: &a {<<: *a}\n", "r.yaml")
    assert data is None and "deeper than" in problems[0].message


def test_an_oversized_recipe_is_refused_before_parsing(tmp_path):
    from merger.core.recipe import load_recipe

    big = tmp_path / "big.yaml"
    big.write_text("merge_method: linear\n" + "# padding\n" * (MAX_CHARS // 10 + 1))
    with pytest.raises(RecipeError, match=r"big\.yaml:1: .*more than .* a config may have"):
        load_recipe(big)


def test_an_alias_bomb_in_a_card_is_refused_by_pull(tmp_path):
    from merger.share.hub import pull

    child = tmp_path / "child"
    child.mkdir()
    (child / "README.md").write_text("# card\n\n```yaml\n" + alias_bomb() + "```\n")
    with pytest.raises(RecipeError, match=r"README\.md:\d+: .*alias bomb"):
        pull(str(child), tmp_path / "recipe.yaml")
    assert not (tmp_path / "recipe.yaml").exists()


@pytest.mark.parametrize(
    "tagged",
    [
        "parameters: !!python/object:os.system {weight: 1}",
        "parameters: !!python/object/apply:os.system [echo hi]",
        "parameters: !!set {weight: null}",
        "parameters: !!python/name:os.system",
    ],
)
def test_a_python_tag_is_refused_not_dropped(tagged):
    text = f"merge_method: linear\nmodels:\n  - model: a\n    {tagged}\n  - model: b\n"
    with pytest.raises(RecipeError, match=r"t\.yaml:4: .*tag"):
        parse_recipe(text, source="t.yaml")


def test_a_key_that_is_a_huge_alias_is_refused_without_printing_it():
    text = alias_bomb(5).replace("models: *a8", "? *a4\n: 1")
    data, _, problems = compose_yaml(text, "k.yaml")
    assert any("a key must be a plain name, got a list" in p.message for p in problems)
    assert all(len(str(p)) < 200 for p in problems)


def test_an_alias_bomb_in_a_parents_card_front_matter_is_a_broken_card(tmp_path):
    from merger.share.card import parent_declarations

    parent = tiny_model(tmp_path / "parent")
    bomb = alias_bomb().replace("models: *a8", "tags: *a8").replace("merge_method: linear\n", "")
    (parent / "README.md").write_text(f"---\nlicense: mit\n{bomb}---\n\n# card\n")
    # safe_load built it (shared lists) and str() of each tag then walked 9**8 strings
    assert parent_declarations([str(parent)]) == ([], [])


# --------------------------------------------------------------------------------------------
# (b) damaged checkpoints: safetensors headers, config.json; weights found bad at planning
# --------------------------------------------------------------------------------------------


def write_raw_safetensors(path, header, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def two_tensors(**changes) -> dict:
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
    }
    for name, entry in changes.items():
        header[name] = entry
    return header


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        ([1, 2, 3], b"", r"header is a JSON list"),
        (
            two_tensors(b={"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}),
            bytes(32),
            r"tensor b overlaps a",
        ),
        (
            two_tensors(a={"dtype": "F32", "shape": [4], "data_offsets": [-8, 8]}),
            bytes(32),
            r"bad header entry for a",
        ),
        (
            two_tensors(b={"dtype": "F32", "shape": [4], "data_offsets": [20, 36]}),
            bytes(36),
            r"tensor b starts 4 bytes after the end of a",
        ),
        (two_tensors(), bytes(40), r"8 bytes after the last tensor \(b\)"),
        (
            two_tensors(a={"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 16]}),
            bytes(32),
            r"tensor a is F32 \[2, 4\] \(32 bytes\) but its data_offsets span 16",
        ),
        (
            two_tensors(a={"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}),
            bytes(32),
            r"bad header entry for a",
        ),
        (
            two_tensors(a={"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16]}),
            bytes(32),
            r"bad header entry for a",
        ),
        (two_tensors(a=[0, 16]), bytes(32), r"bad header entry for a"),
        ("deep", b"", r"RecursionError"),
    ],
    ids=[
        "list",
        "overlap",
        "negative",
        "gap",
        "trailing",
        "size",
        "neg-shape",
        "float",
        "entry",
        "deep",
    ],
)
def test_a_damaged_safetensors_header_is_one_error_naming_file_and_tensor(
    tmp_path, header, data, match
):
    from merger.core.io import read_safetensors_header

    shard = tmp_path / "model.safetensors"
    if header == "deep":  # nested deeper than the JSON parser recurses
        raw = b"[" * 100_000 + b"]" * 100_000
        shard.write_bytes(struct.pack("<Q", len(raw)) + raw)
    else:
        write_raw_safetensors(shard, header, data)
    with pytest.raises(KruisingError, match=match) as info:
        read_safetensors_header(shard)
    assert str(shard) in info.value.message and "\n" not in info.value.message


def test_the_header_check_accepts_what_safetensors_writes(tmp_path):
    from merger.core.io import read_safetensors_header

    tensors = {"z": torch.zeros(0), "a": torch.ones(3, dtype=torch.bfloat16), "b": torch.ones(2)}
    save_file(tensors, str(tmp_path / "ok.safetensors"))
    infos = read_safetensors_header(tmp_path / "ok.safetensors")
    assert {n: i.shape for n, i in infos.items()} == {"z": (0,), "a": (3,), "b": (2,)}


def test_a_bf16_tensor_relabelled_i16_is_refused_at_planning(tmp_path):
    from merger.core.engine import open_sources
    from merger.core.plan import build_plan

    a, b = (
        tiny_model(tmp_path / "a", 0, torch.bfloat16),
        tiny_model(tmp_path / "b", 1, torch.bfloat16),
    )
    shard = b / "model.safetensors"
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + n].decode()
    at = text.index('"model.layers.1.mlp.up_proj.weight"')
    dtype_at = text.index('"BF16"', at)
    text = text[:dtype_at] + '"I16" ' + text[dtype_at + 6 :]  # same size, other meaning
    shard.write_bytes(raw[:8] + text.encode() + raw[8 + n :])
    recipe = parse_recipe(linear_recipe(a, b))
    sources = open_sources(recipe)
    with pytest.raises(
        KruisingError,
        match=r"dtype mismatch in .*b/model\.safetensors: tensor "
        r"model\.layers\.1\.mlp\.up_proj\.weight is stored as int16",
    ):
        build_plan(recipe, sources)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\xff\xfe{}", r"config\.json: not UTF-8"),
        (b"[1, 2]", r"config\.json: a JSON list, not an object"),
        (b'{"num_hidden_layers": "four"}', r'num_hidden_layers must be a whole number, got "four"'),
        (b'{"vocab_size": true}', r"vocab_size must be a whole number, got true"),
    ],
    ids=["not-utf8", "list", "string-layers", "bool-vocab"],
)
def test_a_bad_config_json_is_one_error(tmp_path, content, match):
    from merger.core.io import open_model

    folder = tiny_model(tmp_path / "m")
    (folder / "config.json").write_bytes(content)
    with pytest.raises(KruisingError, match=match):
        open_model(str(folder))


def test_a_bad_safetensors_index_is_one_error(tmp_path):
    from merger.core.io import open_model

    folder = tiny_model(tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    with pytest.raises(KruisingError, match=r"not a safetensors index"):
        open_model(str(folder))


def test_linear_weights_summing_to_zero_are_found_at_planning(tmp_path):
    from merger.core.engine import open_sources
    from merger.core.plan import build_plan

    a, b = tiny_model(tmp_path / "a", 0), tiny_model(tmp_path / "b", 1)
    recipe = parse_recipe(linear_recipe(a, b, weights=[1.0, -1.0]))
    with pytest.raises(KruisingError, match=r"linear weights sum to 0") as info:
        build_plan(recipe, open_sources(recipe))
    assert "normalize: false" in info.value.hint
    build_plan(
        parse_recipe(linear_recipe(a, b, weights=[1.0, -1.0], normalize=False)),
        open_sources(recipe),
    )


# --------------------------------------------------------------------------------------------
# (c) the output folder: never an input, only our own replaced, atomic, no leftovers
# --------------------------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path):
    """Two tiny models under tmp_path/models and a linear recipe over them."""
    a = tiny_model(tmp_path / "models" / "a", 0)
    b = tiny_model(tmp_path / "models" / "b", 1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(linear_recipe(a, b))
    return a, b, recipe


def merge(recipe, out, **options):
    from merger.core.engine import run_recipe_file
    from merger.core.options import MergeOptions

    return run_recipe_file(recipe, out, MergeOptions(device="cpu", progress=False, **options))


def hidden(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("where", ["is", "contains", "inside"])
@pytest.mark.parametrize("overwrite", [True, False])
def test_out_that_is_holds_or_lies_in_an_input_is_refused(pair, where, overwrite):
    a, b, recipe = pair
    out = {"is": a, "contains": a.parent, "inside": a / "child"}[where]
    before = sorted(p.name for p in a.iterdir())
    word = {"is": "is", "contains": "contains", "inside": "lies inside"}[where]
    with pytest.raises(KruisingError, match=rf"--out .* {word} the input model folder"):
        merge(recipe, out, overwrite=overwrite)
    assert sorted(p.name for p in a.iterdir()) == before and (b / "model.safetensors").is_file()


def test_overwrite_replaces_only_a_kruising_child_or_an_empty_folder(pair, tmp_path):
    _, _, recipe = pair
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(KruisingError, match="--overwrite refuses to replace .*mine"):
        merge(recipe, mine, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "years of work"
    file = tmp_path / "notes.txt"
    file.write_text("keep")
    with pytest.raises(KruisingError, match="it is not a folder"):
        merge(recipe, file, overwrite=True)
    assert file.read_text() == "keep" and hidden(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    merge(recipe, empty, overwrite=True)
    merge(recipe, empty, overwrite=True)  # a kruising child is replaced
    assert (empty / "kruising_provenance.json").is_file() and hidden(tmp_path) == []


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "plain-rename"])
def test_a_child_that_appears_meanwhile_is_not_replaced(pair, tmp_path, monkeypatch, renameat2):
    from kruising import atomic
    from merger.core import engine

    _, _, recipe = pair
    out = tmp_path / "child"
    real = engine.write_provenance  # the last file written before the rename
    if not renameat2:
        monkeypatch.setattr(atomic, "_renameat2", lambda *args: False)

    def other_run_finishes_first(folder, *args, **kwargs):
        real(folder, *args, **kwargs)
        out.mkdir()  # the other run's complete child, renamed into place just now
        (out / "config.json").write_text('{"theirs": 1}')

    monkeypatch.setattr(engine, "write_provenance", other_run_finishes_first)
    with pytest.raises(KruisingError, match=r"appeared while this child was being written"):
        merge(recipe, out)
    assert json.loads((out / "config.json").read_text()) == {"theirs": 1}
    assert hidden(tmp_path) == []


def test_replace_folder_onto_a_file_leaves_nothing_aside(tmp_path, monkeypatch):
    from kruising import atomic

    for exchange in (True, False):
        if not exchange:
            monkeypatch.setattr(atomic, "_renameat2", lambda *args: False)
        final = tmp_path / f"final-{exchange}"
        final.write_text("old")
        tmp = atomic.temp_sibling(final)
        tmp.mkdir()
        (tmp / "new").write_text("new")
        atomic.replace_folder(tmp, final, old_tag="kruising-old")
        assert (final / "new").read_text() == "new"
    assert hidden(tmp_path) == []


def test_leftovers_of_dead_runs_are_removed_and_live_ones_reported(pair, tmp_path, capsys):
    from kruising.atomic import host_tag

    _, _, recipe = pair
    pid = dead_pid()
    stale = [
        tmp_path / f".child.kruising-tmp-{pid}",  # before the host was in the name
        tmp_path / f".child.{host_tag('kruising-tmp')}-{pid}",
        tmp_path / f".other.{host_tag('kruising-old')}-{pid}",
    ]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(bytes(300_000))
    import os

    live = tmp_path / f".child.{host_tag('kruising-tmp')}-{os.getppid()}"
    live.mkdir()
    (live / "model.safetensors").write_bytes(bytes(200_000))
    elsewhere = tmp_path / f".child.kruising-tmp-gpu_node_7-{pid}"
    elsewhere.mkdir()
    merge(recipe, tmp_path / "child")
    err = " ".join(capsys.readouterr().err.split())  # rich wraps at 80 columns
    assert hidden(tmp_path) == sorted([live.name, elsewhere.name])
    assert err.count("left by a stopped run") == 3 and "0.3 MB" in err
    assert f"belongs to another run (pid {os.getppid()})" in err
    assert f"(pid {pid} on gpu_node_7)" in err


def test_leftovers_of_live_runs_are_named_when_the_disk_is_short(pair, tmp_path, monkeypatch):
    import os
    import shutil
    from collections import namedtuple

    from kruising.atomic import host_tag

    _, _, recipe = pair
    live = tmp_path / f".child.{host_tag('kruising-tmp')}-{os.getppid()}"
    live.mkdir()
    (live / "model.safetensors").write_bytes(bytes(200_000))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(KruisingError, match=r"1 temporary folder of other runs hold 0\.2 MB"):
        merge(recipe, tmp_path / "child")


def test_a_full_disk_on_the_mapped_path_is_an_error_before_any_byte(pair, tmp_path, monkeypatch):
    import errno
    import os

    from merger.core import io

    _, _, recipe = pair
    written = []
    real_write = io.mmap.mmap

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setenv("KRUISING_DIRECT_IO", "0")
    monkeypatch.setattr(io.os, "posix_fallocate", no_space)
    monkeypatch.setattr(io.mmap, "mmap", lambda *a, **k: written.append(a) or real_write(*a, **k))
    with pytest.raises(KruisingError, match="No space left on device") as info:
        merge(recipe, tmp_path / "child")
    assert "nothing was kept" in info.value.hint
    assert not (tmp_path / "child").exists() and hidden(tmp_path) == []
    assert not [a for a in written if a[0] != -1]  # no output file was ever mapped


# --------------------------------------------------------------------------------------------
# (d) SIGTERM and SIGINT mid-merge: clean up like any failure, one line, 128 + signal
# --------------------------------------------------------------------------------------------

STOPPED_MID_MERGE = """
import sys, time
from pathlib import Path
from merger.core import engine

ready, go = Path(sys.argv[3]), Path(sys.argv[4])
real = engine.compute_task

def slow(*args, **kwargs):  # a tensor that takes long: the signal comes while it is merged
    ready.touch()
    for _ in range(600):
        if go.exists():
            break
        time.sleep(0.05)
    return real(*args, **kwargs)

engine.compute_task = slow
sys.argv = ["merge", "run", sys.argv[1], "--out", sys.argv[2], "--device", "cpu"]
from merger.cli import main
main()
"""


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_merge_cleans_up_and_says_so_in_one_line(pair, tmp_path, signame):
    import os
    import signal
    import subprocess
    import sys
    import time

    _, _, recipe = pair
    out, ready, go = tmp_path / "child", tmp_path / "ready", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-c", STOPPED_MID_MERGE, str(recipe), str(out), str(ready), str(go)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    for _ in range(1200):  # until the merge is under way (or the process died)
        if ready.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert ready.exists(), proc.communicate()[1]
    proc.send_signal(getattr(signal, signame))
    go.touch()
    _, err = proc.communicate(timeout=120)
    number = getattr(signal, signame).value
    assert proc.returncode == 128 + number, err
    assert err.strip().splitlines()[-1] == (
        f"error: stopped by {signame}; nothing half-written was kept"
    )
    assert "Traceback" not in err and "Aborted" not in err
    assert not out.exists() and hidden(tmp_path) == []


# --------------------------------------------------------------------------------------------
# (e) the kernel cache: a planted, loosened or swapped library is never loaded
# --------------------------------------------------------------------------------------------

EVIL_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *mark = getenv("KRUISING_TEST_PLANTED");
    if (mark) { FILE *f = fopen(mark, "w"); if (f) fclose(f); }
}
int kr_unrelated(void) { return 1; }
"""


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch, prebuilt_kernels):
    """A fresh kernel cache holding our build: (the .so path, a planted library's path).

    "Compiling" copies the prebuilt library (the real compiler runs in test_kernels.py), so
    every rebuild here is cheap; the trust checks and the loading are the real ones.
    """
    import shutil
    import subprocess

    from merger.core import kernels

    ours, compiler = prebuilt_kernels

    def copy_instead(command):
        shutil.copyfile(ours, command[command.index("-o") + 1])
        return None

    monkeypatch.setattr(kernels, "_run_compiler", copy_instead)
    monkeypatch.setenv("KRUISING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KRUISING_TEST_PLANTED", str(tmp_path / "planted-ran"))
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    assert kernels.available(), kernels.why_not()
    (built,) = (tmp_path / "cache" / "kernels").glob("*.so")
    (tmp_path / "evil.c").write_text(EVIL_C)
    evil = tmp_path / "evil.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", str(tmp_path / "evil.c"), "-o", str(evil)], check=True
    )
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    return built, evil


def plant(library, at) -> None:
    """Put ``library`` at ``at`` as a new file (overwriting the loaded one in place would
    change this process's mapped code under it)."""
    import os
    import shutil

    shutil.copyfile(library, at.with_name("planting"))
    os.replace(at.with_name("planting"), at)


def reload_kernels(capsys) -> str:
    from merger.core import kernels

    assert kernels.available(), kernels.why_not()
    return " ".join(capsys.readouterr().err.split())


def test_a_planted_kernel_library_is_not_run(kernel_cache, tmp_path, capsys):
    import hashlib

    built, evil = kernel_cache
    plant(evil, built)  # our name, our owner, mode 0644: only the content differs
    err = reload_kernels(capsys)
    assert not (tmp_path / "planted-ran").exists()
    assert "not loading the cached kernel library" in err and "SHA-256" in err
    digest = built.with_name(built.name + ".sha256").read_text().strip()
    assert hashlib.sha256(built.read_bytes()).hexdigest() == digest  # ours again


def test_a_kernel_library_others_can_write_is_rebuilt(kernel_cache, capsys):
    import stat

    built, _ = kernel_cache
    built.chmod(0o666)
    err = reload_kernels(capsys)
    assert "others can write it" in err
    assert stat.S_IMODE(built.stat().st_mode) & 0o022 == 0


def test_a_kernel_library_owned_by_someone_else_is_rebuilt(kernel_cache, capsys):
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("planting a file owned by another user needs root")
    built, _ = kernel_cache
    os.chown(built, 12345, -1)
    err = reload_kernels(capsys)
    assert f"owned by uid 12345, not {os.getuid()}" in err
    assert built.stat().st_uid == os.getuid()


def test_a_kernel_cache_others_can_write_into_is_not_used(kernel_cache, tmp_path, capsys):
    import tempfile

    built, evil = kernel_cache
    built.parent.chmod(0o777)
    plant(evil, built)
    before = set(Path(tempfile.gettempdir()).glob("kruising-kernels-*"))
    err = reload_kernels(capsys)
    assert "is writable by others or not yours; building the kernels for this run only" in err
    assert not (tmp_path / "planted-ran").exists()
    assert set(Path(tempfile.gettempdir()).glob("kruising-kernels-*")) == before  # removed


def test_a_kernel_library_without_the_functions_is_rebuilt_without_a_traceback(
    kernel_cache, tmp_path, capsys
):
    import hashlib

    built, evil = kernel_cache
    plant(evil, built)
    built.with_name(built.name + ".sha256").write_text(
        hashlib.sha256(evil.read_bytes()).hexdigest()
    )
    err = reload_kernels(capsys)  # trusted by its hash, but not our library: rebuilt
    assert "lacks kr_" in err and "Traceback" not in err
    assert (
        tmp_path / "planted-ran"
    ).exists()  # it was ours to run (our hash): loaded, then refused


# --------------------------------------------------------------------------------------------
# (g) a sweep on a study it cannot write
# --------------------------------------------------------------------------------------------


@pytest.fixture
def read_only(tmp_path):
    """Make a folder and its files read-only, for root too (chattr +i); undone after."""
    import subprocess

    made: list[Path] = []

    def freeze(folder: Path) -> None:
        paths = [*folder.iterdir(), folder]
        if os.geteuid() == 0:
            result = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True)
            if result.returncode != 0:
                pytest.skip("root without chattr +i cannot make a folder read-only")
        else:
            for path in paths:
                path.chmod(0o444 if path.is_file() else 0o555)
        made.extend(paths)

    yield freeze
    for path in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        else:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_a_sweep_on_a_study_in_a_read_only_folder_is_one_error(tmp_path, read_only):
    from merger.study.spec import parse_spec
    from merger.study.sweep import run_sweep
    from tests.merger.study.test_sweep import FakeEvaluator, _recipe, _spec

    folder = tmp_path / "shared"
    folder.mkdir()
    storage = f"sqlite:///{folder}/studies.db"
    grid = "{parameters.t[default]: {type: float, low: 0.0, high: 1.0, step: 0.25}}"
    spec = parse_spec(_spec(grid, sampler="grid", trials=1), "s.yaml")
    run_sweep(spec, _recipe(), storage=storage, evaluator=FakeEvaluator(), progress=False)
    read_only(folder)
    with pytest.raises(
        KruisingError, match=r"storage sqlite:///.*studies\.db is read-only here"
    ) as info:
        run_sweep(
            spec, _recipe(), storage=storage, trials=2, evaluator=FakeEvaluator(), progress=False
        )
    assert "merge rank reads a read-only study" in info.value.hint
    from merger.study.rank import leaderboard, load_study

    board = leaderboard(load_study("test-sweep", storage))  # as the hint says
    assert len(board["rows"]) == 1


def test_sigterm_mid_sweep_queues_the_variant_in_flight_again(tmp_path, capsys):
    import signal

    from optuna.trial import TrialState

    from kruising import console as console_module
    from merger.study.spec import parse_spec
    from merger.study.sweep import run_sweep
    from tests.merger.study.test_sweep import FakeEvaluator, _recipe, _spec

    class Terminated(FakeEvaluator):
        def __call__(self, variant):
            if self.calls == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # Slurm's time limit, mid-variant
            return super().__call__(variant)

    grid = "{parameters.t[default]: {type: float, low: 0.0, high: 1.0, step: 0.25}}"
    spec = parse_spec(_spec(grid, sampler="grid", trials=5), "s.yaml")
    storage = f"sqlite:///{tmp_path}/studies.db"
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    console_module._received.clear()
    try:
        with pytest.raises(SystemExit) as info:
            console_module.run_cli(
                lambda: run_sweep(
                    spec, _recipe(), storage=storage, evaluator=Terminated(), progress=False
                ),
                lambda: False,
            )
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        console_module._received.clear()
    assert info.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    study = run_sweep(spec, _recipe(), storage=storage, evaluator=FakeEvaluator(), progress=False)
    stopped = [t for t in study.trials if t.user_attrs.get("fail_reason") == "interrupted"]
    assert len(stopped) == 1 and stopped[0].state == TrialState.FAIL
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == stopped[0].number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE


def test_a_config_claiming_more_layers_than_the_shards_hold_is_refused(tmp_path):
    from merger.core.engine import open_sources
    from merger.core.plan import build_plan

    a, b = tiny_model(tmp_path / "a", 0), tiny_model(tmp_path / "b", 1)
    config = tiny_config() | {"num_hidden_layers": 10**9}  # the plan would loop for hours
    (b / "config.json").write_text(json.dumps(config))
    recipe = parse_recipe(linear_recipe(a, b))
    with pytest.raises(KruisingError, match=r"num_hidden_layers is 1000000000, but the shards"):
        build_plan(recipe, open_sources(recipe))


def test_a_variant_another_sweep_is_merging_is_not_evaluated_again():
    """Two TPE sweeps on one study propose the same variant: the one that comes second finds
    the first one's RUNNING trial (landed with #17's workers, 252e76a; the full two-process
    case is tests/merger/study/test_workers.py)."""
    import optuna
    from optuna.distributions import FloatDistribution

    from merger.study.sweep import _twin

    study = optuna.create_study(storage="sqlite:///:memory:")
    space = {"parameters.t": FloatDistribution(0.0, 1.0)}
    study.enqueue_trial({"parameters.t": 0.5})
    first = study.ask(space)  # the first sweep merges t=0.5 (RUNNING)
    second = study.ask(space)
    assert study.trials[first.number].state == optuna.trial.TrialState.RUNNING
    assert _twin(study, second.number, {"parameters.t": 0.5}) == first.number
    assert _twin(study, second.number, {"parameters.t": 0.25}) is None


def test_demo_overwrite_replaces_only_a_demo_report(tmp_path):
    from merger.demo import _prepare

    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    family = tmp_path / "cache" / "family"
    with pytest.raises(KruisingError, match="--overwrite refuses to replace .*not a report"):
        _prepare(home, True, family)
    assert (home / "thesis.tex").is_file()
    with pytest.raises(KruisingError, match="holds the family folder"):
        _prepare(tmp_path, True, family)
    report = _prepare(tmp_path / "report", False, family)
    (report / "summary.json").write_text("{}")
    assert _prepare(report, True, family) == report and not (report / "summary.json").exists()


def test_run_cli_gives_a_caller_in_the_same_process_its_signal_handlers_back():
    import signal

    from kruising.console import run_cli

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(SystemExit):
        run_cli(lambda: sys_exit_2(), lambda: False)
    assert {s: signal.getsignal(s) for s in before} == before


def sys_exit_2():
    import sys

    sys.exit(2)
