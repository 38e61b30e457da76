"""Hostile input and faults in pretraining (issue #15): a tampered or truncated checkpoint on
a shared disk, a corpus of binary garbage, and what a run leaves in /tmp."""

from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path

import pytest

from pretrain.errors import PretrainError
from pretrain.train import run
from tests.pretrain.test_train import cfg, tiny


class _RunsCode:
    """A pickle that runs code when loaded with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4: (its folder, its config)."""
    root = tmp_path_factory.mktemp("pretrain-hostile")
    data = tiny(root, max_steps=4, checkpoint_every=2, keep_last=2)
    run(cfg(data))
    return root / "run", data


def _resume_config(data: dict, checkpoint: Path, output: Path) -> dict:
    resume = dict(data, resume=str(checkpoint), output_dir=str(output))
    del resume["model"]
    return resume


def _copy_checkpoint(checkpointed, tmp_path) -> tuple[Path, dict]:
    import shutil

    run_dir, data = checkpointed
    copy = tmp_path / "step-00000002"
    shutil.copytree(run_dir / "checkpoints" / "step-00000002", copy)
    return copy, data


def test_resume_never_unpickles_a_custom_checkpoint(checkpointed, tmp_path):
    checkpoint, data = _copy_checkpoint(checkpointed, tmp_path)
    assert not list(checkpoint.glob("custom_checkpoint_*.pkl"))  # we no longer write one
    marker = tmp_path / "code-ran"
    import torch

    torch.save(_RunsCode(marker), checkpoint / "custom_checkpoint_0.pkl")
    with pytest.raises(PretrainError, match=r"custom_checkpoint_0\.pkl, a pickle .* run any code"):
        run(cfg(_resume_config(data, checkpoint, tmp_path / "out")))
    assert not marker.exists()


def test_a_truncated_rng_state_is_an_error_not_ignored(checkpointed, tmp_path):
    checkpoint, data = _copy_checkpoint(checkpointed, tmp_path)
    rng = checkpoint / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:100])
    with pytest.raises(PretrainError, match=r"random_states_0\.pkl is damaged"):
        run(cfg(_resume_config(data, checkpoint, tmp_path / "out")))
    rng.write_bytes(pickle.dumps({"random_state": 1}))  # a pickle, but not weights-only data
    with pytest.raises(PretrainError, match=r"random_states_0\.pkl is damaged|lacks"):
        run(cfg(_resume_config(data, checkpoint, tmp_path / "out")))
    rng.unlink()
    with pytest.raises(PretrainError, match=r"random_states_0\.pkl is missing"):
        run(cfg(_resume_config(data, checkpoint, tmp_path / "out")))


def test_resume_restores_the_schedule_from_the_step(checkpointed, tmp_path):
    run_dir, data = checkpointed
    checkpoint = run_dir / "checkpoints" / "step-00000002"
    run(cfg(_resume_config(data, checkpoint, tmp_path / "out")))

    def lrs(folder: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["lr"] for r in rows if "lr" in r}

    reference, resumed = lrs(run_dir), lrs(tmp_path / "out")
    assert resumed and all(step > 2 for step in resumed)
    assert resumed == {step: reference[step] for step in resumed}


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_a_binary_garbage_corpus_is_one_error(tmp_path, suffix):
    import random

    corpus = tmp_path / f"corpus{suffix}"
    corpus.write_bytes(random.Random(0).randbytes(20_000))
    data = tiny(tmp_path, sources=[{"path": str(corpus)}])
    kind = {".txt": "UTF-8 text", ".jsonl": "JSON lines", ".parquet": "Parquet"}[suffix]
    with pytest.raises(PretrainError, match=rf"corpus{suffix}: cannot be read as {kind}") as info:
        run(cfg(data))
    assert "\n" not in info.value.message


def test_a_run_leaves_no_tokenizer_folder_in_tmp(tmp_path, monkeypatch):
    own_tmp = tmp_path / "tmp"  # not the shared /tmp, where other runs come and go
    own_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(own_tmp))
    run(cfg(tiny(tmp_path, max_steps=1)))
    assert list(own_tmp.glob("kruising-tok-*")) == []


def test_the_family_is_never_built_over_a_folder_of_someone_elses(tmp_path):
    from pretrain.family import build_family

    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(PretrainError, match="is not a family folder"):
        build_family(mine, size="test", progress=False)
    assert (mine / "thesis.tex").read_text() == "years of work"
