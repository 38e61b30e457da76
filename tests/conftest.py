"""Session fixtures: tiny random Mistral checkpoints and the tiny family, built on disk once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mistral_tokenizer(tmp_path_factory):
    from pretrain.tokenizer import load_mistral_tokenizer

    return load_mistral_tokenizer(tmp_path_factory.mktemp("mistral-tokenizer"))


def tiny_mistral_config(**overrides):
    """A MistralConfig small enough to build, save and merge in well under a second."""
    from transformers import MistralConfig

    settings = dict(
        vocab_size=32000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return MistralConfig(**settings)


@pytest.fixture(scope="session")
def make_tiny_mistral(tmp_path_factory, mistral_tokenizer):
    """Factory: save a random tiny MistralForCausalLM (+ the real tokenizer) and return its folder.

    ``make_tiny_mistral("a", seed=1, dtype="float32", num_hidden_layers=4)``; same name and
    arguments return the cached folder.
    """
    import torch
    from transformers import MistralForCausalLM

    root = tmp_path_factory.mktemp("tiny-mistral")
    made: dict[tuple, Path] = {}

    def make(name: str, seed: int = 0, dtype: str = "float32", **overrides) -> Path:
        key = (name, seed, dtype, tuple(sorted(overrides.items())))
        if key in made:
            return made[key]
        torch.manual_seed(seed)
        model = MistralForCausalLM(tiny_mistral_config(**overrides))
        model.to(getattr(torch, dtype))
        out = root / name
        model.save_pretrained(out)
        mistral_tokenizer.save_pretrained(out)
        made[key] = out
        return out

    return make


@pytest.fixture(scope="session")
def tiny_family():
    """The tiny Mistral family at its smallest size: {"base": Path, "nl": Path, "instruct": Path, ...}.

    Cached under .cache/ in the repo; `build_family` rebuilds when its inputs changed.
    """
    from pretrain.family import build_family

    return build_family(REPO / ".cache" / "tiny-family-test", size="test", seed=0)


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throwaway PostgreSQL cluster for the session (tests/pg.py); skipped, visibly, without one.

    ``KRUISING_REQUIRE_POSTGRES=1`` (set by .ci/run once it has the server) turns the skip into
    a failure, so CI never passes by skipping the database tests.
    """
    from tests.pg import Cluster, Unavailable

    try:
        cluster = Cluster()
    except Unavailable as exc:
        if os.environ.get("KRUISING_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL required but not startable: {exc}")
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster, request):
    """A fresh, empty database on the session's cluster, named after the test; its URL."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    return postgres_cluster.database(name)


@pytest.fixture(scope="session")
def prebuilt_kernels(tmp_path_factory):
    """Our kernel library, built once (or taken from this machine's cache): (path, compiler).

    Tests that rebuild the kernels into a fresh cache copy it instead of compiling again
    (test_kernels.py's test_built_once_into_the_cache runs the real compiler)."""
    import shutil

    from merger.core import kernels

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler: the kernels are not built here")
    copy = tmp_path_factory.mktemp("kernels") / "ours.so"
    cached = kernels._cache_dir() / kernels._library_name(compiler)
    trusted = False
    if cached.is_file():
        fd = os.open(cached, os.O_RDONLY)
        trusted = kernels._distrust(cached, fd) is None
        os.close(fd)
    if trusted:
        shutil.copyfile(cached, copy)
    else:
        kernels._compile(compiler, copy)
    return copy, compiler
