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

from kruising.console import console, fmt, print_table
from kruising.env import cache_dir
from kruising.errors import KruisingError

#: The demo's recipes and sweep specs: package data, there in a wheel install as in a checkout.
DEMO_RECIPES = Path(__file__).resolve().with_name("demo_recipes")
DEMO_SWEEPS = DEMO_RECIPES / "sweeps"
PLACEHOLDER = "${family}"
PARENTS = ("nl", "instruct")
CHAT_PROBE = "demo_nl_chat"
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
        "english_score": card.get("english_score"),
        **{probe: _metric(card, probe, primary_metric()) for probe in PROBE_COLUMNS},
        f"{CHAT_PROBE}_acc_norm": _metric(card, CHAT_PROBE, "acc_norm"),
        "items": {p: card.get("probes", {}).get(p, {}).get("n") for p in PROBE_COLUMNS},
        "seconds": card.get("seconds"),
    }


def _prepare(out: Path, overwrite: bool) -> Path:
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise KruisingError(
                f"report folder {out} already exists and is not empty",
                "pass --overwrite to replace it, or choose another --out",
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


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
    import yaml

    from eval.api import score_path
    from merger.core.engine import run_recipe
    from merger.core.options import MergeOptions
    from merger.core.recipe import parse_recipe
    from merger.study.paths import short
    from merger.study.rank import export, leaderboard, markdown, print_leaderboard, write_plots
    from merger.study.spec import load_spec, parse_spec
    from merger.study.sweep import run_sweep
    from pretrain.family import build_family

    started = time.perf_counter()
    recipe_files = sorted(DEMO_RECIPES.glob("*.yaml"))
    if not recipe_files or not DEMO_SWEEPS.is_dir():
        raise KruisingError(
            f"the demo recipes are missing under {DEMO_RECIPES.parent}",
            "run the demo from a checkout of kruising (pip install -e .)",
        )
    out = _prepare(out, overwrite)
    family_dir = Path(family_dir) if family_dir else default_family_dir(size)
    console.print(f"[bold]1/5[/] tiny family ({size}) in {family_dir}")
    t0 = time.perf_counter()
    members = build_family(family_dir, size=size, seed=seed)
    timings: dict[str, float] = {"family": time.perf_counter() - t0}
    root = Path(members["nl"]).parent

    (out / "recipes").mkdir()
    (out / "scorecards").mkdir()
    rows: list[dict[str, Any]] = []

    console.print(f"[bold]2/5[/] scoring the parents: {', '.join(members)}")
    t0 = time.perf_counter()
    cards: dict[str, dict[str, Any]] = {}
    for name, path in members.items():
        card = score_path(str(path), suite="demo", device=device)
        card["model"] = name
        cards[name] = card
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
        _write_json(out / "scorecards" / f"{name}.json", card)
        rows.append(_row(name, "child", recipe.merge_method, card))
    timings["recipes"] = time.perf_counter() - t0

    sweeps = sorted(DEMO_SWEEPS.glob("demo-*.yaml"))
    sweeps = [p for p in sweeps if not p.name.endswith(".recipe.yaml")]
    console.print(f"[bold]4/5[/] {len(sweeps)} sweeps: {', '.join(p.stem for p in sweeps)}")
    t0 = time.perf_counter()
    (out / "sweeps").mkdir()
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    boards = []
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
        if trials is not None:
            spec_data["trials"] = trials
        spec_file = out / "sweeps" / path.name
        spec_file.write_text(yaml.safe_dump(spec_data, sort_keys=False))
        spec = parse_spec(spec_file.read_text(), str(spec_file))
        study = run_sweep(
            spec, parse_recipe(base_text, str(sweep_recipe)), storage=storage, device=device
        )
        board = leaderboard(study)
        if not board["rows"]:
            raise KruisingError(
                f"every variant of sweep {spec.name} failed",
                f"see `merge rank {spec.name} --storage {storage}`",
            )
        print_leaderboard(board)
        boards.append(board)
        best = board["rows"][0]
        export(board, 1, out / "sweeps" / f"{spec.name}-best.yaml")
        card = {k: best[k] for k in ("dutch_score", "english_score", "probes", "seconds")}
        params = ", ".join(f"{short(k)}={v:g}" for k, v in best["params"].items())
        name = f"{spec.name.removeprefix('demo-')} #1"
        rows.append(_row(name, "child", params, card))
        recipes_text[name] = best["recipe"]
    timings["sweeps"] = time.perf_counter() - t0

    console.print("[bold]5/5[/] report")
    plots = []
    for board in boards:
        plots += write_plots(board, out / "plots" / board["study"])
    plots.append(_bar_plot(rows, out / "plots" / "dutch_chat.png"))
    verdict = chat_vector_verdict(rows)
    winner = verdict["best_child"]
    (out / "best-recipe.yaml").write_text(
        f"# kruising demo: the best child by dutch_score ({winner})\n" + recipes_text[winner]
    )
    timings["total"] = time.perf_counter() - started
    summary = {
        "family": {k: str(v) for k, v in members.items()},
        "size": size,
        "suite": "demo",
        "models": rows,
        "sweeps": [
            {
                "study": b["study"],
                "storage": storage,
                "trials": len(b["rows"]),
                "failed": len(b["failed"]),
            }
            for b in boards
        ],
        "chat_vector": verdict,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    _write_json(out / "leaderboard.json", {"models": rows, "sweeps": boards})
    (out / "leaderboard.md").write_text(
        _markdown(rows, verdict)
        + "".join(f"\n## Sweep {b['study']}\n\n" + markdown(b) for b in boards)
    )
    _write_json(out / "summary.json", summary)
    _print_models(rows)
    console.print(verdict["text"])
    console.print(
        f"report in {out} (leaderboard.md, leaderboard.json, plots/, scorecards/, sweeps/, "
        f"best-recipe.yaml); {timings['total']:.0f} s in all "
        f"(family {timings['family']:.0f} s, sweeps {timings['sweeps']:.0f} s)"
    )
    return summary


def chat_vector_verdict(rows: list[dict[str, Any]], metric: str | None = None) -> dict[str, Any]:
    """Does the best child (by dutch_score) beat both parents on Dutch questions in chat form?

    Judged on the demo probes' primary metric (eval's choice, ``answer_prob``); the 4-way
    ``acc_norm`` is reported beside it, with the item count, so a reader sees the noise.
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
    text = (
        f"Chat Vector check, {n} Dutch questions asked in chat form ({CHAT_PROBE}): the best "
        f"child by dutch_score, {best['model']}, has {metric} {best[CHAT_PROBE]:.4f} against "
        + ", ".join(f"{k} {v:.4f}" for k, v in parent_chat.items())
        + f" -> it {'beats' if beats else 'does NOT beat'} both parents."
    )
    if beats_acc is not None:
        text += (
            f" 4-way acc_norm: {best[acc]:.3f} against "
            + ", ".join(f"{k} {r[acc]:.3f}" for k, r in parents.items())
            + f" ({'beats' if beats_acc else 'does not beat'} both; one item is {1 / n:.3f})."
        )
    if top_chat is not best:
        text += f" Highest Dutch-chat child: {top_chat['model']} at {top_chat[CHAT_PROBE]:.4f}."
    return {
        "probe": CHAT_PROBE,
        "metric": metric,
        "items": n,
        "best_child": best["model"],
        "best_child_chat": best[CHAT_PROBE],
        "parents_chat": parent_chat,
        "beats_both_parents": beats,
        "best_child_chat_acc_norm": best.get(acc),
        "parents_chat_acc_norm": {k: r.get(acc) for k, r in parents.items()},
        "beats_both_parents_acc_norm": beats_acc,
        "top_chat_child": top_chat["model"],
        "top_chat_child_value": top_chat[CHAT_PROBE],
        "text": text,
    }


def _markdown(rows: list[dict[str, Any]], verdict: dict[str, Any]) -> str:
    head = ["model", "kind", "method", "Dutch", "English", *PROBE_COLUMNS]
    lines = ["# kruising demo", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["kind"], r["method"], fmt(r["dutch_score"])]
        cells.append(fmt(r["english_score"]))
        cells += [fmt(r[p]) for p in PROBE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + verdict["text"] + "\n"


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


def _bar_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["model"] for r in rows]
    values = [r[CHAT_PROBE] or 0 for r in rows]
    colors = ["tab:blue" if r["kind"] == "parent" else "tab:orange" for r in rows]
    ax.bar(range(len(rows)), values, color=colors)
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"{CHAT_PROBE} {primary_metric()}")
    ax.set_title("Dutch questions in chat form: parents (blue) and children")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
