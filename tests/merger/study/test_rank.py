"""Commands that only read a study (`merge rank`, `merge export`) never create a database,
and a study that is not where they look is found where it is."""

from __future__ import annotations

import os
import sqlite3

import pytest
from typer.testing import CliRunner

from kruising.errors import KruisingError
from merger.cli import app
from merger.study.notes import describe, fixed_values, labels
from tests.merger.study.test_sweep import FakeEvaluator, _run

SEARCH = "{parameters.t[default]: {type: float, low: 0.0, high: 1.0, step: 0.5}}"


@pytest.fixture(scope="module")
def swept_study(tmp_path_factory):
    """work/out/demo/studies.db holding a study `test-sweep`, swept once for the module."""
    work = tmp_path_factory.mktemp("swept") / "work"
    folder = work / "out" / "demo"
    folder.mkdir(parents=True)
    _run(folder, SEARCH, FakeEvaluator(), sampler="grid", trials=3)
    return work


@pytest.fixture
def study_elsewhere(swept_study, tmp_path, monkeypatch):
    """A study `test-sweep` in work/out/demo/studies.db (a copy of the module's); the current
    folder is work/."""
    import shutil

    shutil.copytree(swept_study, tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    return f"sqlite:///{tmp_path / 'work' / 'out' / 'demo'}/studies.db"


def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("command", ["rank", "export"])
def test_read_only_commands_create_no_database_and_say_where_the_study_is(
    command, study_elsewhere, tmp_path
):
    before = _files(tmp_path)
    args = [command, "test-sweep"] + (["--out", "best.yaml"] if command == "export" else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    exc = result.exception
    assert isinstance(exc, KruisingError)
    assert "no study database at sqlite:///kruising-studies.db" in exc.message
    assert "nothing was created" in exc.message
    # the hint names the database that holds the study, as a --storage to paste
    assert f"add --storage {study_elsewhere}" in exc.hint
    assert _files(tmp_path) == before  # no kruising-studies.db, no best.yaml
    again = CliRunner().invoke(app, [*args, "--storage", study_elsewhere])
    assert again.exit_code == 0, again.output


def test_a_missing_study_lists_the_studies_there(study_elsewhere):
    result = CliRunner().invoke(app, ["rank", "other", "--storage", study_elsewhere])
    exc = result.exception
    assert isinstance(exc, KruisingError)
    assert f"no study 'other' in {study_elsewhere} (it holds test-sweep)" == exc.message
    assert "--storage" in exc.hint


def test_a_file_that_is_not_a_study_database_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    notes = tmp_path / "notes.db"
    con = sqlite3.connect(notes)
    con.execute("CREATE TABLE notes (x TEXT)")
    con.commit()
    con.close()
    size, mtime = notes.stat().st_size, os.stat(notes).st_mtime_ns
    result = CliRunner().invoke(app, ["rank", "s", "--storage", f"sqlite:///{notes}"])
    assert "is not an optuna study database" in result.exception.message
    assert (notes.stat().st_size, os.stat(notes).st_mtime_ns) == (size, mtime)
    tables = sqlite3.connect(notes).execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [("notes",)]  # optuna created no tables in it


@pytest.mark.postgres
def test_an_empty_postgresql_database_gets_no_tables(postgres_url):
    import sqlalchemy

    result = CliRunner().invoke(app, ["rank", "s", "--storage", postgres_url])
    assert isinstance(result.exception, KruisingError)
    assert "no optuna studies at" in result.exception.message
    engine = sqlalchemy.create_engine(postgres_url)
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


# --- the names and notes a leaderboard shows --------------------------------------------------

SLERP = {
    "merge_method": "slerp",
    "base_model": "/f/nl",
    "models": [{"model": "/f/nl"}, {"model": "/f/instruct"}],
    "parameters": {
        "t": [
            {"filter": "self_attn", "value": 0.5},
            {"filter": "mlp", "value": 0.5},
            {"value": 0.5},
        ]
    },
}
TENSORS = [
    "lm_head.weight",
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.input_layernorm.weight",
    "model.norm.weight",
]


def test_labels_name_the_models_instead_of_their_index():
    recipe = {
        "merge_method": "task_arithmetic",
        "models": [{"model": "/f/nl"}, {"model": "org/instruct@main"}, {"model": "/g/nl"}],
    }
    search = ["models[0].parameters.weight", "models[1].parameters.weight", "parameters.t[mlp]"]
    assert labels(search + ["models[2].parameters.weight"], recipe) == {
        "models[0].parameters.weight": "weight of nl (models[0])",  # two folders called nl
        "models[1].parameters.weight": "weight of instruct",
        "parameters.t[mlp]": "t[mlp]",
        "models[2].parameters.weight": "weight of nl (models[2])",
    }


def test_a_catch_all_the_search_leaves_fixed_is_noted_with_its_tensors():
    search = ["parameters.t[self_attn]", "parameters.t[mlp]"]
    (note,) = fixed_values(search, SLERP, TENSORS)
    assert note["path"] == "parameters.t[default]" and note["value"] == 0.5
    assert note["tensors"] == [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.input_layernorm.weight",
        "model.norm.weight",
    ]
    text = describe(note)
    assert "parameters.t[default] stays 0.5 in every variant" in text
    assert "model.layers.*.input_layernorm.weight" in text and "5 tensors" in text
    assert "add parameters.t[default] to search:" in text
    # searching every entry leaves nothing fixed; without tensor names the note is generic
    assert fixed_values([*search, "parameters.t[default]"], SLERP, TENSORS) == []
    (generic,) = fixed_values(search, SLERP)
    assert "contains none of mlp, self_attn" in describe(generic)
    # an entry an earlier filter shadows completely sets nothing: no note
    shadowed = {**SLERP, "parameters": {"t": [{"value": 0.2}, {"filter": "mlp", "value": 0.5}]}}
    assert fixed_values(["parameters.t[default]"], shadowed, TENSORS) == []
