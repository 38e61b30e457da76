"""`merge demo`: the whole chain on the embedded tiny Mistral family, on a laptop CPU.

1. build (or reuse) the tiny family: ``base``, ``nl`` (Dutch, like GEITje), ``instruct`` (chat);
2. score the parents on the ``demo`` suite (the family's facts asked in held-out phrasings, in
   plain and in chat form, in Dutch and in English);
3. run every demo recipe (``merger/demo_recipes/``, package data) with the engine
   (``merge run``) and score each child;
4. run the small in-memory sweeps ``demo_recipes/sweeps/demo-*.yaml`` (slerp t per attention/MLP;
   the Chat Vector's two task-vector weights) and rank them;
5. write a report folder and state, in numbers, whether the best child beats both parents on
   Dutch questions asked in chat form (the Chat Vector result at toy scale).

The demo recipes name the family's members as ``${family}/nl``, ``${family}/instruct``,
``${family}/base``; the demo fills in the family folder and writes the resolved recipes (and a
resolved sweep spec) into the report, so every step can be rerun by hand with ``merge run`` /
``merge sweep``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from kruising.console import console, fmt, print_table
from kruising.env import cache_dir
from kruising.errors import KruisingError

#: The demo's recipes and sweep specs: package data, there in a wheel install as in a checkout.
DEMO_RECIPES = Path(__file__).resolve().with_name("demo_recipes")
DEMO_SWEEPS = DEMO_RECIPES / "sweeps"
PLACEHOLDER = "${family}"
PARENTS = ("nl", "instruct")
CHAT_PROBE = "demo_nl_chat"
CHAT_VECTOR = "chat_vector"  # the demo recipe nl + (instruct - base)
PROBE_COLUMNS = ("demo_nl_chat", "demo_nl_plain", "demo_en_chat", "demo_en_plain")


def default_family_dir(size: str) -> Path:
    """``family`` (``family-test`` for the test size) in kruising's cache (`kruising.env`)."""
    return cache_dir() / ("family" if size == "default" else f"family-{size}")


def resolve_family(text: str, family: Path) -> str:
    """Fill the ``${family}`` placeholder of a demo recipe with the family folder."""
    return text.replace(PLACEHOLDER, str(Path(family).resolve()))


def primary_metric() -> str:
    """The metric eval ranks the demo probes by (``answer_prob``; ``acc_norm`` before it)."""
    try:
        from eval.suites import DEMO_PRIMARY
    except ImportError:
        return "acc_norm"
    return DEMO_PRIMARY


def _metric(card: dict[str, Any], probe: str, metric: str) -> float | None:
    metrics = card.get("probes", {}).get(probe)
    return None if metrics is None else metrics.get(metric)


def _row(name: str, kind: str, method: str, card: dict[str, Any]) -> dict:
    return {
        "model": name,
        "kind": kind,
        "method": method,
        "dutch_score": card.get("dutch_score"),
        "dutch_score_se": card.get("dutch_score_se"),
        "english_score": card.get("english_score"),
        "english_score_se": card.get("english_score_se"),
        **{probe: _metric(card, probe, primary_metric()) for probe in PROBE_COLUMNS},
        f"{CHAT_PROBE}_se": _metric(card, CHAT_PROBE, f"{primary_metric()}_se"),
        f"{CHAT_PROBE}_acc_norm": _metric(card, CHAT_PROBE, "acc_norm"),
        "items": {p: card.get("probes", {}).get(p, {}).get("n") for p in PROBE_COLUMNS},
        "seconds": card.get("seconds"),
    }


#: what marks a folder as a demo report, so that --overwrite deletes nothing else
DEMO_MARKER = ".kruising-demo"


def _prepare(out: Path, overwrite: bool, family_dir: Path) -> Path:
    out = Path(out).expanduser()
    if family_dir.expanduser().resolve().is_relative_to(out.resolve()):
        raise KruisingError(
            f"the report folder {out} holds the family folder {family_dir}",
            "write the report to a folder of its own (--out), or keep the family elsewhere",
        )
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise KruisingError(
                f"report folder {out} already exists and is not empty",
                "pass --overwrite to replace it, or choose another --out",
            )
        if not (out / DEMO_MARKER).is_file() and not (out / "summary.json").is_file():
            raise KruisingError(
                f"--overwrite refuses to replace {out}: it is not a report `merge demo` wrote",
                "choose another --out (an empty or new folder), or remove it yourself",
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `merge demo`; --overwrite may replace this folder\n")
    return out


# Wall seconds measured for `merge demo` on the shared 2-core development machine (README,
# "Sweeps and the demo"): the family build (once; cached after) and the rest, from the quietest
# run measured to the busiest. Default: family 281 s at a load average of 2-4, 1,102 s at 6-10;
# rest 76 s at 3, 240 s at 12. Test: family 66 s at 3, 186 s at 8-10; rest 82-98 s at 3.
EXPECTED_SECONDS = {
    "default": {"family": (280, 1100), "rest": (75, 240)},
    "test": {"family": (65, 190), "rest": (80, 100)},
}


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _span(lo: float, hi: float) -> str:
    a, b = _minutes(lo), _minutes(hi)
    if a.endswith(" min") and b.endswith(" min"):
        return f"{a.removesuffix(' min')}–{b}"
    if a.endswith(" s") and b.endswith(" s"):
        return f"{a.removesuffix(' s')}–{b}"
    return f"{a} – {b}"


def family_state(folder: Path, size: str, seed: int) -> tuple[bool, float | None]:
    """(is the family in ``folder`` current, seconds its last build here took, if recorded)."""
    from pretrain.family import MARKER, fingerprint

    try:
        info = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return False, None
    seconds = (info.get("seconds") or {}).get("total")
    same_size = info.get("size") == size
    return info.get("fingerprint") == fingerprint(size, seed), seconds if same_size else None


def expected_duration(size: str, cached: bool, last_build: float | None) -> str:
    """The line `merge demo` prints before it starts: how long, and the fast way."""
    spans = EXPECTED_SECONDS.get(size, EXPECTED_SECONDS["default"])
    rest = _span(*spans["rest"])
    if cached:
        text = (
            f"expected: about {rest} on a 2-core CPU (the {size} family is cached; longer when "
            "the machine is busy)"
        )
    else:
        build = _span(*spans["family"])
        text = (
            f"expected: the {size} family is built first, once (about {build} on a 2-core CPU, "
            f"longer when the machine is busy"
            + (f"; its last build here took {_minutes(last_build)}" if last_build else "")
            + f"), then about {rest}"
        )
    if size != "test":
        text += (
            "; `--size test` runs the whole chain in about "
            f"{_span(*EXPECTED_SECONDS['test']['rest'])} once its family is built "
            "(too small to show the merge effect)"
        )
    return text + "."


def shell_path(path: Path, relative: bool = True) -> str:
    """A path as a user pastes it, quoted: relative to the current folder when inside it
    (``relative``), else absolute."""
    import shlex

    path = Path(path).resolve()
    shown = str(path)
    if relative:
        try:
            shown = str(path.relative_to(Path.cwd().resolve()))
        except ValueError:
            pass
    return shlex.quote(shown)


def next_commands(
    out: Path, storage: str, boards: list[dict], specs: list[Path], relative: bool = True
) -> list[str]:
    """Copy-pasteable follow-ups: rank and export each sweep's study, continue its sweep."""
    import shlex

    url = shlex.quote(storage)
    lines: list[str] = []
    for board, spec in zip(boards, specs, strict=True):
        name = board["study"]
        done = len(board["rows"]) + len(board["failed"])
        more = min(done + 5, board.get("variants") or done + 5)
        exported = shell_path(out / f"{name}-rank1.yaml", relative)
        lines += [
            f"merge rank {name} --storage {url}",
            f"merge export {name} --rank 1 --out {exported} --storage {url}",
            f"merge sweep {shell_path(spec, relative)} --trials {more}"
            + (f"   # {more - done} more variants in the same study" if more > done else ""),
        ]
    return lines


def run_demo(
    out: Path,
    *,
    family_dir: Path | None = None,
    size: str = "default",
    trials: int | None = None,
    device: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the demo; returns the summary also written to ``out/summary.json``."""
    import math

    import yaml

    from eval.api import score_path
    from merger.core.engine import run_recipe
    from merger.core.options import MergeOptions
    from merger.core.recipe import parse_recipe
    from merger.study.rank import export, label, leaderboard, print_leaderboard
    from merger.study.spec import load_spec, parse_spec
    from merger.study.sweep import run_sweep
    from pretrain.family import SIZES, build_family

    started = time.perf_counter()
    recipe_files = sorted(DEMO_RECIPES.glob("*.yaml"))
    if not recipe_files or not DEMO_SWEEPS.is_dir():
        raise KruisingError(
            f"the demo recipes are missing under {DEMO_RECIPES.parent}",
            "run the demo from a checkout of kruising (pip install -e .)",
        )
    if size not in SIZES:
        raise KruisingError(f"unknown family size {size!r}", f"use one of {', '.join(SIZES)}")
    family_dir = Path(family_dir) if family_dir else default_family_dir(size)
    out = _prepare(out, overwrite, family_dir)
    cached, last_build = family_state(family_dir, size, seed)
    console.print(expected_duration(size, cached, last_build))
    console.print(
        f"[bold]1/5[/] tiny family ({size}) in {family_dir}"
        + (" (cached)" if cached else ": building it")
    )
    t0 = time.perf_counter()
    members = build_family(family_dir, size=size, seed=seed)
    timings: dict[str, float] = {"family": time.perf_counter() - t0}
    root = Path(members["nl"]).parent

    (out / "recipes").mkdir()
    (out / "scorecards").mkdir()
    rows: list[dict[str, Any]] = []
    per_item: dict[str, dict[str, Any]] = {}  # model -> its per-item results (paired tests)

    console.print(f"[bold]2/5[/] scoring the parents: {', '.join(members)}")
    t0 = time.perf_counter()
    cards: dict[str, dict[str, Any]] = {}
    for name, path in members.items():
        card = score_path(str(path), suite="demo", device=device)
        card["model"] = name
        cards[name] = card
        per_item[name] = card.get("per_item") or {}
        _write_json(out / "scorecards" / f"{name}.json", card)
        rows.append(_row(name, "parent" if name in PARENTS else "base", "-", card))
    timings["parents"] = time.perf_counter() - t0

    console.print(f"[bold]3/5[/] merging and scoring {len(recipe_files)} demo recipes")
    t0 = time.perf_counter()
    for file in recipe_files:
        text = resolve_family(file.read_text(), root)
        resolved = out / "recipes" / file.name
        resolved.write_text(text)
        recipe = parse_recipe(text, str(resolved))
        name = file.stem
        options = MergeOptions(device=device, progress=False)
        child = run_recipe(recipe, out / "children" / name, options, recipe_text=text)
        card = score_path(str(child), suite="demo", device=device)
        card["model"] = name
        cards[name] = card
        per_item[name] = card.get("per_item") or {}
        _write_json(out / "scorecards" / f"{name}.json", card)
        rows.append(_row(name, "child", recipe.merge_method, card))
    timings["recipes"] = time.perf_counter() - t0

    sweeps = sorted(DEMO_SWEEPS.glob("demo-*.yaml"))
    sweeps = [p for p in sweeps if not p.name.endswith(".recipe.yaml")]
    (out / "sweeps").mkdir()
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    console.print(f"[bold]4/5[/] {len(sweeps)} sweeps: {', '.join(p.stem for p in sweeps)}")
    console.print(f"  studies in {storage} (every spec in {out / 'sweeps'} names it)")
    t0 = time.perf_counter()
    boards = []
    spec_files: list[Path] = []
    about: dict[str, str] = {}
    recipes_text = {
        r["model"]: (out / "recipes" / f"{r['model']}.yaml").read_text()
        for r in rows
        if r["kind"] == "child"
    }
    for path in sweeps:
        spec, spec_root = load_spec(path)
        assert isinstance(spec.recipe, str) and spec_root is not None
        base_text = resolve_family((spec_root / spec.recipe).read_text(), root)
        sweep_recipe = out / "recipes" / Path(spec.recipe).name
        sweep_recipe.write_text(base_text)
        spec_data = spec.model_dump(mode="json", exclude_none=True)
        spec_data["recipe"] = str(sweep_recipe.resolve())
        spec_data["storage"] = storage  # `merge sweep` on this file continues the same study
        if trials is not None:
            spec_data["trials"] = trials
        spec_file = out / "sweeps" / path.name
        spec_file.write_text(
            f"# written by `merge demo`: rerun with `merge sweep {shell_path(spec_file, False)}`\n"
            + yaml.safe_dump(spec_data, sort_keys=False)
        )
        spec_files.append(spec_file)
        spec = parse_spec(spec_file.read_text(), str(spec_file))
        base_recipe = parse_recipe(base_text, str(sweep_recipe))
        study = run_sweep(spec, base_recipe, storage=storage, device=device)
        board = leaderboard(study, stability=True)
        grids = [r.grid() for r in spec.search.values()]
        if all(g is not None for g in grids):
            board["variants"] = math.prod(len(g) for g in grids)
        if not board["rows"]:
            raise KruisingError(
                f"every variant of sweep {spec.name} failed",
                f"see `merge rank {spec.name} --storage {storage}`",
            )
        print_leaderboard(board, notes=False)  # run_sweep printed them before its first variant
        boards.append(board)
        about[spec.name] = _about_sweep(spec, base_recipe, board)
        best = board["rows"][0]
        export(board, 1, out / "sweeps" / f"{spec.name}-best.yaml")
        card = {k: best[k] for k in ("dutch_score", "english_score", "probes", "seconds")}
        for k in ("dutch_score_se", "english_score_se"):
            card[k] = best.get(k)
        params = ", ".join(f"{label(board, k)}={v:g}" for k, v in best["params"].items())
        name = f"{spec.name.removeprefix('demo-')} #1"
        row = _row(name, "child", params, card)
        row["sweep"] = spec.name
        rows.append(row)
        per_item[name] = study.trials[best["trial"]].user_attrs.get("per_item") or {}
        recipes_text[name] = best["recipe"]
    timings["sweeps"] = time.perf_counter() - t0

    console.print("[bold]5/5[/] report")
    verdict = chat_vector_verdict(rows, per_item=per_item)
    winner = verdict["best_child"]
    (out / "best-recipe.yaml").write_text(
        f"# kruising demo: the best child by dutch_score ({winner})\n" + recipes_text[winner]
    )
    commands = next_commands(out, storage, boards, spec_files)
    anywhere = next_commands(out, storage, boards, spec_files, relative=False)
    report = _write_report(out, size, rows, boards, verdict, about, anywhere, cards)
    timings["total"] = time.perf_counter() - started
    summary = {
        "family": {k: str(v) for k, v in members.items()},
        "size": size,
        "suite": "demo",
        "storage": storage,
        "models": rows,
        "sweeps": [
            {
                "study": b["study"],
                "storage": storage,
                "spec": str(spec.resolve()),
                "trials": len(b["rows"]),
                "failed": len(b["failed"]),
            }
            for b, spec in zip(boards, spec_files, strict=True)
        ],
        "chat_vector": verdict,
        "report": str(report),
        "next": commands,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    _write_json(out / "summary.json", summary)
    _print_models(rows)
    console.print(f"[bold]Verdict.[/] {escape(verdict['text'])}")
    for detail in verdict["details"]:
        console.print(escape(f"  {detail}"))
    console.print(
        f"report: {report} (open it in a browser), and leaderboard.md, plots/, scorecards/, "
        f"children/, sweeps/ in {out}; {timings['total']:.0f} s in all "
        f"(family {timings['family']:.0f} s, sweeps {timings['sweeps']:.0f} s)"
    )
    console.print("next (copy and paste):")
    for line in commands:
        console.print(escape(f"  {line}"), soft_wrap=True)
    return summary


def _about_sweep(spec, recipe, board: dict[str, Any]) -> str:
    """One sentence on what a sweep varies and how it ranks."""
    from merger.study.notes import model_name

    models = ", ".join(model_name(m) for m in recipe.referenced_models())
    searched = ", ".join(board["labels"].get(p, p) for p in spec.search)
    objectives = " and ".join(spec.objective_names())
    ranked = (
        "ranked by the Pareto front of " + objectives
        if len(spec.objective_names()) > 1
        else "ranked by " + objectives
    )
    done = len(board["rows"])
    failed = len(board["failed"])
    return (
        f"{recipe.merge_method} of {models}; searched: {searched} ({spec.sampler} sampler, "
        f"{done} variants scored" + (f", {failed} failed" if failed else "") + f"); {ranked}."
    )


def _write_report(out, size, rows, boards, verdict, about, commands, cards) -> Path:
    """leaderboard.json, leaderboard.md, report.html and the plots they show."""
    from eval.suites import WEIGHTS
    from merger.demo_report import chat_plot, html_page, legend, markdown, sweep_table
    from merger.study.rank import markdown as board_markdown
    from merger.study.rank import write_plots

    metric = primary_metric()
    (out / "plots").mkdir(exist_ok=True)
    vocab = _vocab_size(cards)
    items = next((r["items"] for r in rows if r["items"].get(CHAT_PROBE)), {})
    has_se = any(r.get(f"{CHAT_PROBE}_se") is not None for r in rows)
    references = {
        r["model"]: (r["english_score"], r["dutch_score"])
        for r in rows
        if r["kind"] in ("parent", "base") and r["dutch_score"] is not None
    }
    report: dict[str, Any] = {
        "out": out,
        "title": f"tiny family ({size}), suite demo, {len(rows)} models and "
        f"{sum(len(b['rows']) for b in boards)} sweep variants",
        "metric": metric,
        "verdict": verdict,
        "legend": legend(metric, items, vocab, has_se, WEIGHTS),
        "rows": rows,
        "plots": [chat_plot(rows, out / "plots" / "dutch_chat.png", metric, vocab)],
        "sweeps": [],
        "commands": commands,
    }
    for board in boards:
        plots = write_plots(board, out / "plots" / board["study"], references=references)
        head, cells, footer = sweep_table(board)
        report["sweeps"].append(
            {
                "study": board["study"],
                "about": about[board["study"]],
                "fixed": board.get("fixed") or [],
                "markdown": board_markdown(board),
                "head": head,
                "cells": cells,
                "footer": footer,
                "plots": plots,
            }
        )
    _write_json(out / "leaderboard.json", {"models": rows, "sweeps": boards})
    (out / "leaderboard.md").write_text(markdown(report))
    page = out / "report.html"
    page.write_text(html_page(report))
    return page


def _vocab_size(cards: dict[str, dict[str, Any]]) -> int:
    for card in cards.values():
        vocab = card.get("vocab_size")
        if isinstance(vocab, int) and vocab > 0:
            return vocab
    return 32000  # the Mistral-7B-v0.1 tokenizer every family member carries


def chat_vector_verdict(
    rows: list[dict[str, Any]],
    metric: str | None = None,
    per_item: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Does the best child (by dutch_score) beat both parents on Dutch questions in chat form?

    ``text`` is one sentence that answers it: yes, no, or "above both, but not significantly".
    Judged on the demo probes' primary metric (eval's choice, ``answer_prob``). With
    ``per_item`` (each model's per-item results) the claim gets a p-value: a one-sided paired
    sign-flip test over the same questions against each parent (for ``answer_prob``, on the
    answer's log-prob per token; for ``acc_norm``, on right/wrong), and "beats both" takes the
    larger of the two p (an intersection-union test); every question asks about another fact,
    so the items are independent units. ``details`` holds the rest: the 4-way ``acc_norm``
    beside it with its own p, the Chat Vector recipe child's test, and the child with the
    highest Dutch-chat score when it is another one.
    """
    metric = metric or primary_metric()
    acc = f"{CHAT_PROBE}_acc_norm"
    parents = {r["model"]: r for r in rows if r["kind"] == "parent"}
    children = [r for r in rows if r["kind"] == "child" and r["dutch_score"] is not None]
    best = max(children, key=lambda r: r["dutch_score"])
    top_chat = max(children, key=lambda r: r[CHAT_PROBE] or 0)
    parent_chat = {name: r[CHAT_PROBE] for name, r in parents.items()}
    beats = all(best[CHAT_PROBE] > v for v in parent_chat.values() if v is not None)
    beats_acc = None
    if best.get(acc) is not None:
        beats_acc = all(best[acc] > r.get(acc, 1.0) for r in parents.values())
    n = best["items"].get(CHAT_PROBE)
    tests = _chat_tests(best["model"], list(parents), per_item or {})
    p = (tests.get("answer_prob") or {}).get("p")
    numbers = (
        f"{metric} {fmt(best[CHAT_PROBE])} against "
        + " and ".join(f"{k} {fmt(v)}" for k, v in parent_chat.items())
        + f", {n} questions"
        + (f", p = {p:.2g}" if p is not None else "")
    )
    subject = f"the best child by dutch_score, {best['model']},"
    if not beats:
        answer: bool | None = False
        text = (
            f"No: {subject} does not beat both parents on Dutch questions in chat form ({numbers})."
        )
    elif p is not None and p >= 0.05:
        answer = None
        text = (
            f"Not shown: {subject} scores above both parents on Dutch questions in chat form, "
            f"but not significantly at 5% ({numbers})."
        )
    else:
        answer = True
        qualifier = " (significant at 5%)" if p is not None else ""
        text = (
            f"Yes: {subject} beats both parents on Dutch questions in chat form{qualifier} "
            f"({numbers})."
        )
    details = []
    if beats_acc is not None:
        details.append(
            f"By 4-way acc_norm (chance 0.25) it {'also beats' if beats_acc else 'does not beat'} "
            f"both: {best[acc]:.3f} against "
            + " and ".join(f"{k} {r[acc]:.3f}" for k, r in parents.items())
            + (f"; one question is {1 / n:.3f}." if n else ".")
        )
    if tests:
        for key, label in (("answer_prob", metric), ("acc_norm", "acc_norm")):
            q = tests[key]["p"]
            details.append(
                f"{label}: p = {q:.2g} that it beats both parents (one-sided paired sign-flip "
                f"test over the {tests[key]['items']} questions against each parent, the larger "
                f"p): {'significant' if q < 0.05 else 'NOT significant'} at 5%."
            )
    if top_chat is not best:
        details.append(
            f"The child with the highest Dutch-chat {metric} is {top_chat['model']} "
            f"({fmt(top_chat[CHAT_PROBE])}); it ranks lower by dutch_score, which also counts "
            "plain-text questions."
        )
    recipe_child = next((r for r in children if r["model"] == CHAT_VECTOR), None)
    recipe_tests = {}
    if recipe_child is not None and recipe_child is not best:
        recipe_tests = _chat_tests(CHAT_VECTOR, list(parents), per_item or {})
        if recipe_tests:
            details.append(
                f"The Chat Vector recipe itself ({CHAT_VECTOR}): {metric} "
                f"{fmt(recipe_child[CHAT_PROBE])}, p = {recipe_tests['answer_prob']['p']:.2g}; "
                f"acc_norm {fmt(recipe_child.get(acc))}, "
                f"p = {recipe_tests['acc_norm']['p']:.2g} (the same test)."
            )
    return {
        "chat_vector_recipe_tests": recipe_tests,
        "tests": tests,
        "p_value": tests.get("answer_prob", {}).get("p") if tests else None,
        "p_value_acc_norm": tests.get("acc_norm", {}).get("p") if tests else None,
        "probe": CHAT_PROBE,
        "metric": metric,
        "items": n,
        "best_child": best["model"],
        "best_child_chat": best[CHAT_PROBE],
        "parents_chat": parent_chat,
        "beats_both_parents": beats,
        "answer": answer,
        "best_child_chat_acc_norm": best.get(acc),
        "parents_chat_acc_norm": {k: r.get(acc) for k, r in parents.items()},
        "beats_both_parents_acc_norm": beats_acc,
        "top_chat_child": top_chat["model"],
        "top_chat_child_value": top_chat[CHAT_PROBE],
        "text": text,
        "details": details,
    }


def _chat_tests(child: str, parents: list[str], per_item: dict[str, dict[str, Any]]) -> dict:
    """Paired one-sided tests of ``child`` against each parent on the Dutch chat questions."""
    from eval.stats import paired_permutation

    items = {name: (per_item.get(name) or {}).get(CHAT_PROBE) for name in [child, *parents]}
    if any(v is None for v in items.values()):
        return {}
    if any(items[p]["ids"] != items[child]["ids"] for p in parents):
        return {}
    out = {}
    for key, field in (("answer_prob", "answer_logprob"), ("acc_norm", "acc_norm")):
        against = {p: paired_permutation(items[child][field], items[p][field]) for p in parents}
        out[key] = {
            "p": max(t["p"] for t in against.values()),
            "items": len(items[child][field]),
            "against": against,
        }
    return out


def _print_models(rows: list[dict[str, Any]]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"parents and children, suite demo (probe columns: {primary_metric()})")
    columns = ("model", "kind", "Dutch", "English", "nl chat", "nl plain", "en chat", "en plain")
    for col in columns:
        if col in ("model", "kind"):
            table.add_column(col, no_wrap=True)
        else:
            table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["model"],
            r["kind"],
            fmt(r["dutch_score"]),
            fmt(r["english_score"]),
            *(fmt(r[p]) for p in PROBE_COLUMNS),
        )
    print_table(table)
    for r in rows:
        if r["kind"] == "child":
            console.print(escape(f"  {r['model']}: {r['method']}"))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
