"""`merge demo` end to end on the test-size tiny family."""

from __future__ import annotations

import json

import pytest

from merger.demo import DEMO_RECIPES, PLACEHOLDER, chat_vector_verdict, resolve_family


def test_demo_recipes_parse_once_the_family_is_filled_in(tmp_path):
    from merger.core.recipe import parse_recipe

    names = sorted(p.stem for p in DEMO_RECIPES.glob("*.yaml"))
    assert {"slerp", "ties", "linear"} <= set(names)
    for path in DEMO_RECIPES.glob("*.yaml"):
        text = path.read_text()
        assert PLACEHOLDER in text
        recipe = parse_recipe(resolve_family(text, tmp_path), str(path))
        refs = recipe.referenced_models()
        assert all(r.startswith(str(tmp_path.resolve())) for r in refs), refs
        assert any(r.endswith("/nl") for r in refs) and any(r.endswith("/instruct") for r in refs)


def _row(name, kind, dutch, chat):
    return {
        "model": name,
        "kind": kind,
        "method": "-",
        "dutch_score": dutch,
        "demo_nl_chat": chat,
        "demo_nl_chat_acc_norm": round(chat * 20) / 20,
        "items": {"demo_nl_chat": 20},
    }


def test_verdict_compares_the_best_child_with_both_parents():
    rows = [
        _row("nl", "parent", 0.5, 0.40),
        _row("instruct", "parent", 0.3, 0.35),
        _row("slerp", "child", 0.6, 0.45),
        _row("linear", "child", 0.4, 0.60),
    ]
    verdict = chat_vector_verdict(rows, "answer_prob")
    assert verdict["best_child"] == "slerp" and verdict["beats_both_parents"] is True
    assert verdict["beats_both_parents_acc_norm"] is True
    assert "one item is 0.050" in verdict["text"]
    assert verdict["top_chat_child"] == "linear"
    rows[2]["demo_nl_chat"] = 0.40  # a tie with nl is not a win
    assert chat_vector_verdict(rows, "answer_prob")["beats_both_parents"] is False
    assert "does NOT beat" in chat_vector_verdict(rows, "answer_prob")["text"]


@pytest.mark.slow
def test_merge_demo_end_to_end_on_the_test_family(tiny_family, tmp_path):
    from typer.testing import CliRunner

    from merger.cli import app
    from merger.core.recipe import load_recipe

    out = tmp_path / "report"
    family = tiny_family["nl"].parent
    result = CliRunner().invoke(
        app,
        [
            "demo",
            "--out",
            str(out),
            "--family",
            str(family),
            "--size",
            "test",
            "--trials",
            "3",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    kinds = {r["model"]: r["kind"] for r in summary["models"]}
    assert kinds["nl"] == kinds["instruct"] == "parent"
    for name in ("slerp", "ties", "linear"):
        assert kinds[name] == "child"
        card = json.loads((out / "scorecards" / f"{name}.json").read_text())
        assert card["suite"] == "demo" and "demo_nl_chat" in card["probes"]
        assert (out / "children" / name / "config.json").is_file()
    assert [s["trials"] for s in summary["sweeps"]] == [3, 3]
    assert {s["study"] for s in summary["sweeps"]} == {"demo-slerp", "demo-chat-vector"}
    verdict = summary["chat_vector"]
    rows = {r["model"]: r for r in summary["models"]}
    best = rows[verdict["best_child"]]
    assert best["demo_nl_chat"] == verdict["best_child_chat"]
    expected = all(best["demo_nl_chat"] > rows[p]["demo_nl_chat"] for p in ("nl", "instruct"))
    assert verdict["beats_both_parents"] is expected
    assert verdict["text"] in (out / "leaderboard.md").read_text()
    assert (out / "plots" / "demo-slerp" / "pareto.png").is_file()
    assert (out / "plots" / "dutch_chat.png").is_file()
    best_recipe = load_recipe(out / "best-recipe.yaml")  # the winner, runnable as is
    assert all(ref.startswith(str(family.resolve())) for ref in best_recipe.referenced_models())
    assert load_recipe(out / "sweeps" / "demo-slerp-best.yaml").merge_method == "slerp"
    rerun = CliRunner().invoke(
        app, ["demo", "--out", str(out), "--family", str(family), "--size", "test"]
    )
    assert rerun.exit_code != 0 and "already exists" in rerun.exception.message
