"""`merge demo` end to end on the test-size tiny family."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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


def test_verdict_is_one_sentence_that_answers_the_question():
    rows = [
        _row("nl", "parent", 0.5, 0.40),
        _row("instruct", "parent", 0.3, 0.35),
        _row("slerp", "child", 0.6, 0.45),
        _row("linear", "child", 0.4, 0.60),
    ]
    verdict = chat_vector_verdict(rows, "answer_prob")
    assert verdict["best_child"] == "slerp" and verdict["beats_both_parents"] is True
    assert verdict["answer"] is True and verdict["beats_both_parents_acc_norm"] is True
    text = verdict["text"]
    assert text.startswith("Yes: the best child by dutch_score, slerp, beats both parents")
    assert text.count(". ") == 0 and text.endswith(").")  # one sentence, numbers in brackets
    assert "nl 0.4 and instruct 0.35, 20 questions" in text
    # the rest are details, each naming what it is about
    assert any("one question is 0.050" in d and "acc_norm" in d for d in verdict["details"])
    assert verdict["top_chat_child"] == "linear"
    assert any(d.startswith("The child with the highest Dutch-chat") for d in verdict["details"])
    rows[2]["demo_nl_chat"] = 0.40  # a tie with nl is not a win
    verdict = chat_vector_verdict(rows, "answer_prob")
    assert verdict["beats_both_parents"] is False and verdict["answer"] is False
    assert verdict["text"].startswith("No: the best child by dutch_score, slerp, does not beat")
    assert "beats both" not in verdict["text"]


@pytest.fixture(scope="module")
def demo(tiny_family, tmp_path_factory):
    """`merge demo` run once on the test family from a folder, into a folder with a space."""
    from typer.testing import CliRunner

    from merger.cli import app

    cwd = tmp_path_factory.mktemp("demo-cwd")
    out = cwd / "my report"
    family = tiny_family["nl"].parent
    args = ["demo", "--out", "my report", "--family", str(family), "--size", "test"]
    args += ["--trials", "3", "--device", "cpu", "--json"]
    here = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        os.chdir(here)
    assert result.exit_code == 0, result.output
    return {"cwd": cwd, "out": out, "family": family, "output": result.output}


def _chat_items(right: list[int], logprob: list[float]) -> dict:
    ids = [f"q{i}" for i in range(len(right))]
    items = {"ids": ids, "acc": right, "acc_norm": right, "answer_logprob": logprob}
    return {"demo_nl_chat": items}


def test_verdict_gives_the_p_value_of_beating_both_parents():
    rows = [
        _row("nl", "parent", 0.5, 0.40),
        _row("instruct", "parent", 0.3, 0.35),
        _row("chat_vector", "child", 0.6, 0.45),
    ]
    n = 200
    parent = [i % 2 for i in range(n)]  # half right
    strong = [1 if i % 4 else 0 for i in range(n)]  # three quarters right: a real gain
    per_item = {
        "nl": _chat_items(parent, [-3.0] * n),
        "instruct": _chat_items(parent, [-3.1] * n),
        "chat_vector": _chat_items(strong, [-2.0] * n),
    }
    verdict = chat_vector_verdict(rows, "answer_prob", per_item=per_item)
    assert verdict["p_value"] < 0.001 and verdict["p_value_acc_norm"] < 0.001
    assert verdict["text"].startswith("Yes:") and "significant at 5%" in verdict["text"]
    assert "over the 200 questions" in " ".join(verdict["details"])
    # the same answers as nl on all but 3 questions: a gain that is noise
    noisy = list(parent)
    for i in (0, 2, 4):
        noisy[i] = 1
    per_item["chat_vector"] = _chat_items(noisy, [-3.0 + (0.01 if i < 3 else 0) for i in range(n)])
    verdict = chat_vector_verdict(rows, "answer_prob", per_item=per_item)
    assert verdict["p_value_acc_norm"] > 0.05
    details = " ".join(verdict["details"])
    assert "acc_norm: p = " in details and "NOT significant at 5%" in details
    # the larger p of the two parents decides
    tests = verdict["tests"]["acc_norm"]
    assert tests["p"] == max(t["p"] for t in tests["against"].values())


@pytest.mark.slow
def test_merge_demo_end_to_end_on_the_test_family(demo):
    from typer.testing import CliRunner

    from merger.cli import app
    from merger.core.recipe import load_recipe

    out, family = demo["out"], demo["family"]
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
    assert verdict["text"] in demo["output"]
    assert 0 < verdict["p_value"] <= 1
    assert "one-sided paired sign-flip test" in " ".join(verdict["details"])
    assert verdict["tests"]["answer_prob"]["items"] == best["items"]["demo_nl_chat"] >= 200
    assert (out / "plots" / "demo-slerp" / "pareto.png").is_file()
    assert (out / "plots" / "dutch_chat.png").is_file()
    best_recipe = load_recipe(out / "best-recipe.yaml")  # the winner, runnable as is
    assert all(ref.startswith(str(family.resolve())) for ref in best_recipe.referenced_models())
    assert load_recipe(out / "sweeps" / "demo-slerp-best.yaml").merge_method == "slerp"
    rerun = CliRunner().invoke(
        app, ["demo", "--out", str(out), "--family", str(family), "--size", "test"]
    )
    assert rerun.exit_code != 0 and "already exists" in rerun.exception.message


@pytest.mark.slow
def test_the_demo_says_how_long_and_where_its_studies_are(demo):
    import yaml

    output, out = demo["output"], demo["out"]
    first = output.lstrip().splitlines()[0]
    assert first.startswith("expected: about") and "--size test" not in first  # test size
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    assert f"studies in {storage}" in output.replace("\n", "")
    specs = sorted((out / "sweeps").glob("demo-*.yaml"))
    specs = [p for p in specs if not p.name.endswith("-best.yaml")]
    assert len(specs) == 2
    for spec in specs:  # `merge sweep SPEC` continues the demo's study, not a new one elsewhere
        assert yaml.safe_load(spec.read_text())["storage"] == storage


@pytest.mark.slow
def test_the_printed_next_commands_work_as_printed(demo):
    """Copy the `next (copy and paste):` lines and run them, in the folder the demo ran in."""
    import shlex
    from concurrent.futures import ThreadPoolExecutor

    import optuna

    output, cwd, out = demo["output"], demo["cwd"], demo["out"]
    block = output[output.index("next (copy and paste):") :].splitlines()[1:]
    lines = [line.strip() for line in block if line.startswith("  merge ")]
    assert [line.split()[1] for line in lines] == ["rank", "export", "sweep"] * 2
    assert "'my report/" in lines[1]  # the folder with a space is quoted
    merge = Path(sys.executable).with_name("merge")

    def run_in_order(study_lines: list[str]) -> list[tuple[str, subprocess.CompletedProcess]]:
        runs = []
        for line in study_lines:
            argv = shlex.split(line, comments=True)
            assert argv[0] == "merge"
            done = subprocess.run(
                [str(merge), *argv[1:]]
                if merge.is_file()
                else [sys.executable, "-m", "merger.cli", *argv[1:]],
                cwd=cwd,
                capture_output=True,
                text=True,
                env={**os.environ, "NO_COLOR": "1"},
            )
            runs.append((line, done))
        return runs

    # each study's three lines in their order; the two studies side by side, as two users
    # (or two terminals) would: one SQLite file, two studies (half the wall time on 2 cores)
    with ThreadPoolExecutor(2) as pool:
        runs = [run for done in pool.map(run_in_order, [lines[:3], lines[3:]]) for run in done]
    assert [line for line, _ in runs] == lines
    for line, done in runs:
        assert done.returncode == 0, (line, done.stderr)
        assert "error:" not in done.stderr
    for name in ("demo-chat-vector", "demo-slerp"):
        exported = out / f"{name}-rank1.yaml"
        assert exported.read_text().startswith(f"# study {name}, rank 1")
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        assert len(complete) == 3 + 5  # the sweep line continued the same study
    assert not (cwd / "kruising-studies.db").exists()


@pytest.mark.slow
def test_the_report_explains_itself(demo):
    out = demo["out"]
    text = (out / "leaderboard.md").read_text()
    verdict = json.loads((out / "summary.json").read_text())["chat_vector"]
    assert text.count(verdict["text"]) == 1
    assert "**Verdict.** " + verdict["text"] in text
    for term in ("**Dutch**", "**English**", "**answer_prob**", "**acc_norm**", "Pareto"):
        assert term in text, term
    assert "Chance level: a model that spreads its probability evenly" in text
    assert "Chance level 0.25" in text
    # every plot is linked, and exists
    links = re.findall(r"\]\((plots/[^)]+\.png)\)", text)
    assert set(links) == {str(p.relative_to(out)) for p in (out / "plots").rglob("*.png")}
    assert len(set(links)) == 1 + 2 * 3  # the Dutch-chat plot, per sweep 2 parameters + Pareto
    # model names, not indices, in the column heads
    heads = [line for line in text.splitlines() if line.startswith("| rank |")]
    assert any("weight of nl" in h and "weight of instruct" in h for h in heads), heads
    assert not any("models[" in h for h in heads)
    # the SLERP sweep's catch-all t is not searched: the report says so
    assert "parameters.t[default] stays 0.5 in every variant" in text
    assert "model.embed_tokens.weight" in text
    html = (out / "report.html").read_text()
    assert html.count(verdict["text"].replace("'", "&#x27;")) == 1
    for link in links:
        assert f'src="{link}"' in html, link


def _content_height(png: Path) -> int:
    """The lowest pixel row that is not page background: how tall the rendered page is."""
    from PIL import Image, ImageOps

    ink = ImageOps.invert(Image.open(png).convert("L")).point(lambda v: 255 if v > 12 else 0)
    box = ink.getbbox()
    return 0 if box is None else box[3]


def _colours(png: Path) -> int:
    from PIL import Image

    return len(Image.open(png).convert("RGB").getcolors(maxcolors=1 << 24))


HEIGHT = 7000  # taller than the test report: the whole page in one screenshot


@pytest.mark.slow
def test_report_html_renders_with_its_plots_in_a_real_browser(demo, tmp_path):
    """Open report.html in headless Chromium: the page renders, and its plots with it."""
    import shutil

    from tests.browser import Unavailable, screenshot

    out = demo["out"]
    try:
        shot = screenshot(out / "report.html", tmp_path / "report.png", height=HEIGHT)
    except Unavailable as exc:
        if os.environ.get("KRUISING_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"Chromium required but not startable: {exc}")
        pytest.skip(f"Chromium unavailable: {exc}")
    # the same page without its plots folder: what the page looks like when no image loads
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(out / "report.html", bare / "report.html")
    broken = screenshot(bare / "report.html", tmp_path / "bare.png", height=HEIGHT)
    from PIL import Image

    assert Image.open(shot).size == (1280, HEIGHT)
    # the plots take room and bring colour: 7 figures, each a few hundred pixels tall
    tall, short = _content_height(shot), _content_height(broken)
    assert tall > short + 7 * 150, (tall, short)
    assert tall < HEIGHT - 10  # the whole page is in the screenshot
    assert _colours(shot) > 2 * _colours(broken) > 500, (_colours(shot), _colours(broken))
    keep = os.environ.get("KRUISING_SCREENSHOTS")
    if keep:  # a place to look at it
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "report-test-family.png")


def test_the_expected_duration_names_the_build_the_rest_and_the_fast_way():
    """What `merge demo` prints first: the family build when it is not cached (and the last
    build's time when one was recorded), the rest, and `--size test` for the default size."""
    from merger.demo import EXPECTED_SECONDS, _span, expected_duration

    cold = expected_duration("default", cached=False, last_build=None)
    assert cold.startswith("expected: the default family is built first, once")
    assert _span(*EXPECTED_SECONDS["default"]["family"]) in cold
    assert f"then about {_span(*EXPECTED_SECONDS['default']['rest'])}" in cold
    assert "`--size test` runs the whole chain" in cold and "its last build" not in cold
    assert "its last build here took 19 min" in expected_duration("default", False, 1140.0)
    warm = expected_duration("default", cached=True, last_build=1140.0)
    assert "family is cached" in warm and "built first" not in warm and "--size test" in warm
    test = expected_duration("test", cached=True, last_build=None)
    assert (
        test
        == f"expected: about {_span(*EXPECTED_SECONDS['test']['rest'])} on a 2-core CPU (the test family is cached; longer when the machine is busy)."
    )


def test_the_readme_names_what_the_demo_writes(demo):
    """The README's report table and its `out/demo/...` examples name files the demo writes,
    and every top-level entry of the report folder is in that table."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    out = demo["out"]
    table = readme[readme.index("| in `DIR/` | what |") :].split("\n\n")[0]
    listed = set()
    for line in table.splitlines()[2:]:
        first_cell = line.split("|")[1]
        listed |= {name.rstrip("/") for name in re.findall(r"`([^`]+)`", first_cell)}
    for name in listed:
        assert (out / name).exists(), name
    # every entry the demo writes is listed (not its hidden marker, not the study's lock)
    # (`*-rank1.yaml` come from the `merge export` lines another test runs in the same folder)
    written = {
        p.name
        for p in out.iterdir()
        if not p.name.startswith((".", "study.db.")) and not p.name.endswith("-rank1.yaml")
    }
    assert written <= listed, sorted(written - listed)
    for path in set(re.findall(r"out/demo/([A-Za-z0-9_./-]+)", readme)):
        path = path.rstrip(".")
        if "rank1" in path:  # written by the `merge export` line, not by the demo
            continue
        assert (out / path).exists(), path
