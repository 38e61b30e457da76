"""`merge eval`: scorecard files, --json on stdout, the comparison table, errors and --lm-eval."""

from __future__ import annotations

import json
import sys
import types

import pytest

from merger import cli
from tests.helpers import write_mini_suite


def run_merge(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `merge ARGS` in-process as the console script does; (exit code, stdout, stderr)."""
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setattr(sys, "argv", ["merge", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def two_models(make_tiny_mistral):
    return make_tiny_mistral("cli-a", seed=1), make_tiny_mistral("cli-b", seed=2)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-suite")
    write_mini_suite(folder, "tekst_en", "The market opens at eight.")
    return folder


def test_json_goes_to_stdout_and_a_scorecard_file_is_written(
    monkeypatch, capsys, tmp_path, two_models, suite
):
    a, _ = two_models
    code, out, err = run_merge(
        monkeypatch,
        capsys,
        "eval",
        str(a),
        "--suite",
        str(suite),
        "--out",
        str(tmp_path),
        "--json",
        "--device",
        "cpu",
    )
    assert code == 0, err
    card = json.loads(out)
    assert card["model"] == str(a) and card["probes"]["kennis"]["n"] == 2
    on_disk = json.loads((tmp_path / a.name / "scorecard.json").read_text())
    assert on_disk == card
    assert "dutch_score" in err and "wrote" in err  # people's output on stderr


def test_without_out_nothing_is_written(monkeypatch, capsys, tmp_path, two_models, suite):
    """Files go only where --out says: not into the current folder by default."""
    a, _ = two_models
    monkeypatch.chdir(tmp_path)
    code, out, err = run_merge(
        monkeypatch, capsys, "eval", str(a), "--suite", str(suite), "--json", "--device", "cpu"
    )
    assert code == 0, err
    assert json.loads(out)["probes"]["kennis"]["n"] == 2 and "dutch_score" in err
    assert list(tmp_path.iterdir()) == [] and "wrote" not in err


def test_several_models_get_a_comparison_table(monkeypatch, capsys, tmp_path, two_models, suite):
    a, b = two_models
    code, out, err = run_merge(
        monkeypatch, capsys, "eval", str(a), str(b), "--suite", str(suite), "--out", str(tmp_path)
    )
    assert code == 0, err
    assert out == ""  # no --json: nothing on stdout
    assert a.name in err and b.name in err and "kennis" in err and "acc_norm" in err
    assert (tmp_path / a.name / "scorecard.json").is_file()
    assert (tmp_path / b.name / "scorecard.json").is_file()


def test_unknown_suite_is_error_and_hint(monkeypatch, capsys, two_models):
    a, _ = two_models
    code, out, err = run_merge(monkeypatch, capsys, "eval", str(a), "--suite", "frysk")
    assert code == 1 and out == ""
    assert "error: unknown suite 'frysk'" in err and "hint: " in err
    assert "Traceback" not in err


def test_malformed_probe_file_error_names_file_and_line(monkeypatch, capsys, tmp_path, two_models):
    a, _ = two_models
    (tmp_path / "kapot.jsonl").write_text('{"id": "1", "text": "goed"}\n{"id": "2", "text": }\n')
    code, _, err = run_merge(monkeypatch, capsys, "eval", str(a), "--suite", str(tmp_path))
    assert code == 1
    assert f"{tmp_path / 'kapot.jsonl'}:2: not valid JSON" in err


def test_lm_eval_without_the_extra_is_a_clear_error(monkeypatch, capsys, two_models, suite):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    a, _ = two_models
    code, _, err = run_merge(
        monkeypatch, capsys, "eval", str(a), "--suite", str(suite), "--lm-eval", "arc_nl"
    )
    assert code == 1
    assert "error: lm-evaluation-harness is not installed" in err
    assert "kruising[lm-eval]" in err


def _fake_lm_eval(monkeypatch, results=None, raises=None):
    calls = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["model"], calls["batch_size"] = pretrained, batch_size

    def simple_evaluate(model, tasks, limit=None):
        calls["tasks"], calls["limit"] = tasks, limit
        if raises is not None:
            raise raises
        return {"results": results}

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = simple_evaluate
    lm_eval.__version__ = "0.4.fake"
    models = types.ModuleType("lm_eval.models")
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", lm_eval)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", huggingface)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    return calls


def test_lm_eval_numbers_are_stored_in_the_scorecard(
    monkeypatch, capsys, tmp_path, two_models, suite
):
    results = {"arc_nl": {"acc,none": 0.25, "acc_stderr,none": 0.01, "alias": "arc_nl"}}
    calls = _fake_lm_eval(monkeypatch, results=results)
    a, _ = two_models
    code, out, err = run_merge(
        monkeypatch,
        capsys,
        "eval",
        str(a),
        "--suite",
        str(suite),
        "--out",
        str(tmp_path),
        "--json",
        "--lm-eval",
        "arc_nl",
        "--lm-eval-limit",
        "5",
    )
    assert code == 0, err
    card = json.loads(out)
    assert card["lm_eval"]["results"] == results
    assert card["lm_eval"]["tasks"] == ["arc_nl"] and card["lm_eval"]["limit"] == 5
    assert calls["tasks"] == ["arc_nl"] and calls["limit"] == 5
    assert "lm-eval arc_nl" in err  # in the table


def test_lm_eval_offline_is_a_clear_error(monkeypatch, capsys, two_models, suite):
    _fake_lm_eval(monkeypatch, raises=ConnectionError("huggingface.co unreachable"))
    a, _ = two_models
    code, _, err = run_merge(
        monkeypatch, capsys, "eval", str(a), "--suite", str(suite), "--lm-eval", "arc_nl"
    )
    assert code == 1
    assert "error: lm-eval tasks arc_nl need their datasets" in err


def test_eval_cli_module_imports_no_torch():
    """`merge --help` stays instant: the CLI module holding `merge eval` leaves torch and transformers unimported."""
    import subprocess

    code = "import sys, merger.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_documents_the_options(monkeypatch, capsys):
    code, out, _ = run_merge(monkeypatch, capsys, "eval", "--help")
    assert code == 0
    for option in ("--suite", "--out", "--json", "--lm-eval", "--device", "--batch-size"):
        assert option in out


def test_scoring_a_child_into_itself_refreshes_its_card(
    monkeypatch, capsys, tmp_path, two_models, suite
):
    a, b = two_models
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {b}\n    parameters: {{weight: 1.0}}\ndtype: float32\n"
    )
    child = tmp_path / "child"
    code, _, err = run_merge(
        monkeypatch, capsys, "run", str(recipe), "--out", str(child), "--device", "cpu"
    )
    assert code == 0, err
    before = (child / "README.md").read_text()
    args = ["eval", str(child), "--suite", str(suite), "--out", str(child), "--device", "cpu"]
    code, _, err = run_merge(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "refreshed the model card" in err
    after = (child / "README.md").read_text()
    assert after != before and "english_score" in after and "english_score" not in before
    assert "merge_method: linear" in after  # still the child's card, recipe included
    # the scorecard lies next to the weights, not in a folder inside the checkpoint
    assert json.loads((child / "scorecard.json").read_text())["model"] == str(child)
    assert not any(p.is_dir() for p in child.iterdir()), sorted(child.iterdir())
    # nobody else's scorecard is written into a checkpoint folder, before any scoring
    code, _, err = run_merge(monkeypatch, capsys, "eval", str(a), *args[2:])
    assert code == 1 and "is a checkpoint folder" in err and "hint:" in err
    assert sorted(p.name for p in child.iterdir() if p.is_dir()) == []
    # a folder scored elsewhere, or not merged here, keeps its card
    elsewhere = tmp_path / "cards"
    code, _, err = run_merge(monkeypatch, capsys, *args[:-4], "--out", str(elsewhere), *args[-2:])
    assert code == 0, err
    assert "refreshed" not in err
    assert (child / "README.md").read_text() == after
