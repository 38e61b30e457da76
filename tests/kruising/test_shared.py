"""The helpers every room shares: one of each, tested here once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from kruising import atomic, env, hub
from kruising.config import Problem, Strict, compose_yaml, format_loc, line_of
from kruising.device import resolve_device
from kruising.errors import KruisingError


class RoomError(KruisingError):
    """A room's own subclass, as pretrain and eval have."""


# --- hub references and offline -----------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("org/name", True),
        ("org/name@v1.0", True),
        ("Rijgersberg/GEITje-7B", True),
        ("./org/name", False),
        ("/abs/path", False),
        ("~/models/x", False),
        ("name", False),
        ("a/b/c", False),
        ("-org/name", False),
    ],
)
def test_hub_ids(ref, expected):
    assert hub.is_hub_id(ref) is expected


def test_split_and_strip_revision():
    assert hub.split_ref("org/name@main") == ("org/name", "main")
    assert hub.split_ref("org/name") == ("org/name", None)
    assert hub.strip_revision("org/name@abc123") == "org/name"
    assert hub.strip_revision("./models/x@2") == "./models/x@2"  # a path keeps its @


@pytest.mark.parametrize("value", ["1", "ON", "yes", "True", " true "])
def test_offline_reads_hf_hub_offline_as_huggingface_hub_does(monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub.offline()


def test_offline_datasets_and_not_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert not hub.offline()
    assert hub.offline(datasets=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub.offline()


def test_resolve_model_local_folder_file_and_neither(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    assert hub.resolve_model(str(folder)) == folder
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(RoomError, match="is a file, not a checkpoint folder"):
        hub.resolve_model(str(file), error=RoomError)
    assert hub.resolve_model(str(tmp_path / "missing")) is None  # the caller words it


def test_an_offline_snapshot_fails_at_once_naming_the_model(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(RoomError, match=r"Hub model org/absent@v2 is not in the local cache"):
        hub.snapshot("org/absent@v2", error=RoomError)


# --- atomic writes -------------------------------------------------------------------------


def test_write_text_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "card.md"
    target.write_text("old")
    atomic.write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["card.md"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "card.md"
    target.write_text("old")

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["card.md"]


def test_replace_folder_swaps_the_whole_folder(tmp_path):
    final = tmp_path / "child"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp = atomic.temp_sibling(final)
    assert tmp.name == f".child.tmp-{os.getpid()}"
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    atomic.replace_folder(tmp, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["child"]  # nothing aside is left


# --- device ----------------------------------------------------------------------------------


def test_device_names():
    import torch

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device(" CPU ").type == "cpu"
    with pytest.raises(RoomError, match="unknown device 'gpu0'"):
        resolve_device("gpu0", error=RoomError)
    with pytest.raises(KruisingError, match="meta is not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(RoomError, match="no CUDA GPU is available"):
            resolve_device("cuda:1", error=RoomError)
        assert resolve_device("auto").type == "cpu"


# --- env --------------------------------------------------------------------------------------


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("KRUISING_CACHE", str(tmp_path / "k"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert env.cache_dir() == tmp_path / "k"
    monkeypatch.delenv("KRUISING_CACHE")
    assert env.cache_dir() == tmp_path / "xdg" / "kruising"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert env.cache_dir() == Path.home() / ".cache" / "kruising"


def test_switched_off(monkeypatch):
    monkeypatch.delenv("KRUISING_X", raising=False)
    assert not env.switched_off("KRUISING_X")
    for value in ("0", "off", "No", "false"):
        monkeypatch.setenv("KRUISING_X", value)
        assert env.switched_off("KRUISING_X")
    monkeypatch.setenv("KRUISING_X", "torch")
    assert not env.switched_off("KRUISING_X") and env.switched_off("KRUISING_X", "torch")


# --- config -----------------------------------------------------------------------------------


def test_compose_yaml_lines_duplicates_and_errors():
    data, lines, problems = compose_yaml("a: 1\nb:\n  - x: 2\n  - y: 3\na: 4\n", "f.yaml")
    assert data == {"a": 4, "b": [{"x": 2}, {"y": 3}]}
    assert lines[("b", 1)] == 4 and lines[("b", 1, "y")] == 4
    assert [str(p) for p in problems] == ["f.yaml:5: a: duplicate key (first on line 1)"]
    data, _, problems = compose_yaml("a: [1,\n", "f.yaml")
    assert data is None and problems[0].message.startswith("invalid YAML: ")
    assert line_of(("b", 0, "missing"), lines) == 3 and line_of(("zzz",), lines) == 1


def test_format_loc_and_problem():
    assert format_loc(("models", 1, "parameters", "t")) == "models[1].parameters.t"
    assert format_loc(("tokens", "<s>")) == "tokens['<s>']"
    assert str(Problem(source="r.yaml", line=None, path="", message="empty")) == "r.yaml: empty"


def test_strict_refuses_unknown_keys():
    from pydantic import ValidationError

    class Config(Strict):
        lr: float

    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Config.model_validate({"lr": 1.0, "lrr": 2.0})
