"""Ranking a study: the leaderboard, its JSON, its plots, and exporting a variant as a recipe.

Order: with one objective (or a weighted mix), by that value, best first. With several
objectives, the Pareto front first (marked), then the rest; inside each group by the first
objective. Ties keep trial order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape

from kruising.console import console, fmt, print_table
from kruising.errors import KruisingError
from merger.study.notes import describe, fixed_values, labels
from merger.study.paths import short
from merger.study.storage import journal_path, sqlite_path


def load_study(name: str, storage: str | None):
    """Load study ``name`` for reading; never creates a database, a file or tables.

    A storage that holds no studies, or lacks ``name``, is an error that lists the studies
    found there and, when a study database near the current folder holds ``name``, the
    ``--storage`` to pass.
    """
    import optuna

    from merger.study.spec import DEFAULT_STORAGE
    from merger.study.storage import open_storage

    url = storage or DEFAULT_STORAGE
    _require_existing(url, name)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = open_storage(url, heartbeat=False)
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(store))
    if name not in names:
        raise KruisingError(
            f"no study {name!r} in {url}"
            + (f" (it holds {', '.join(names)})" if names else " (it holds no studies)"),
            _where_else(name, url),
        )
    return optuna.load_study(study_name=name, storage=store)


def _sqlite_studies(path: Path) -> list[str] | None:
    """Study names of an optuna SQLite file, opened read-only; None if it is not one."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
        try:
            return [row[0] for row in con.execute("SELECT study_name FROM studies")]
        finally:
            con.close()
    except sqlite3.Error:
        return None


def _require_existing(url: str, name: str) -> None:
    """Refuse, before optuna opens it (which would create it), a storage that holds no studies."""
    path = sqlite_path(url)
    if path is not None:
        if not path.is_file():
            raise KruisingError(
                f"no study database at {url} ({path} does not exist; nothing was created)",
                _where_else(name, url),
            )
        if _sqlite_studies(path) is None:
            raise KruisingError(f"{path} is not an optuna study database", _where_else(name, url))
        return
    journal = journal_path(url)
    if journal is not None:
        if not journal.is_file():
            raise KruisingError(
                f"no study journal at {url} ({journal} does not exist; nothing was created)",
                _where_else(name, url),
            )
        return
    if "://" not in url or url.startswith("sqlite"):
        return  # open_storage words these errors
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url)
        try:
            has_studies = sqlalchemy.inspect(engine).has_table("studies")
        finally:
            engine.dispose()
    except Exception:  # noqa: BLE001 - drivers raise many types; open_storage words them
        return
    if not has_studies:
        raise KruisingError(
            f"no optuna studies at {url} (the database has no study tables; nothing was created)",
            _where_else(name, url),
        )


SEARCH_DEPTH = 3  # folders below the current one searched for study databases in hints


def nearby_databases(root: Path | None = None) -> list[tuple[Path, list[str]]]:
    """Optuna SQLite files (``*.db``) under ``root`` (default: the current folder), a few
    levels deep, with their study names; hidden folders and virtualenvs are skipped."""
    root = Path(root or Path.cwd())
    found: list[tuple[Path, list[str]]] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(".") or entry.name in ("node_modules", "venv", "__pycache__"):
                continue
            if entry.is_file() and entry.suffix == ".db":
                studies = _sqlite_studies(entry)
                if studies is not None:
                    found.append((entry, studies))
            elif entry.is_dir() and not entry.is_symlink() and depth < SEARCH_DEPTH:
                walk(entry, depth + 1)

    walk(root, 0)
    return found


def _where_else(name: str, url: str) -> str:
    """The hint of a missing study: where it is, if a database near here holds it."""
    import shlex

    here = sqlite_path(url)
    for path, studies in nearby_databases():
        if name in studies and (here is None or path.resolve() != here.resolve()):
            return f"study {name!r} is in {path}: add --storage {shlex.quote(sqlite_url(path))}"
    return (
        "pass the sweep's storage with --storage URL (the spec's storage:, or the URL "
        "`merge demo` printed), or run `merge sweep SPEC` first"
    )


def sqlite_url(path: Path) -> str:
    """``sqlite:///`` + the absolute path: the URL means the same file from any folder."""
    return f"sqlite:///{Path(path).resolve()}"


TIE = 1e-6  # scorecards round metrics to 6 decimals: closer values are a tie


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x >= y - TIE for x, y in zip(a, b, strict=True)) and any(
        x > y + TIE for x, y in zip(a, b, strict=True)
    )


def leaderboard(study, stability: bool = False) -> dict[str, Any]:
    """The study as plain data: ranked rows of complete trials, and the failed ones.

    Each row after the first says whether it differs from the row above on the first objective
    (``vs_above``: ``>`` a real difference, ``≈`` not significant; paired bootstrap over the
    same items, 95%; None when the trials kept no per-item results). ``stability`` adds the
    Kendall tau between the rankings on two random halves of the items (``board["stability"]``).
    """
    from optuna.trial import TrialState

    from eval.stats import compare_cards, ranking_stability

    objectives = study.user_attrs.get("objectives") or [
        f"value{i}" for i in range(len(study.directions))
    ]
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    front = {
        t.number
        for t in complete
        if not any(_dominates(o.values, t.values) for o in complete if o is not t)
    }
    multi = len(objectives) > 1
    complete.sort(key=lambda t: (not (multi and t.number in front), -t.values[0], t.number))
    rows = []
    for rank, t in enumerate(complete, start=1):
        rows.append(
            {
                "rank": rank,
                "trial": t.number,
                "params": dict(t.params),
                "values": dict(zip(objectives, t.values, strict=True)),
                "dutch_score": t.user_attrs.get("dutch_score"),
                "dutch_score_se": t.user_attrs.get("dutch_score_se"),
                "dutch_score_ci": t.user_attrs.get("dutch_score_ci"),
                "english_score": t.user_attrs.get("english_score"),
                "english_score_se": t.user_attrs.get("english_score_se"),
                "english_score_ci": t.user_attrs.get("english_score_ci"),
                "pareto": t.number in front,
                "seconds": t.user_attrs.get("seconds"),
                "probes": t.user_attrs.get("probes", {}),
                "recipe": t.user_attrs.get("recipe"),
            }
        )
    cards = [
        {"per_item": t.user_attrs.get("per_item"), "weights": t.user_attrs.get("weights")}
        for t in complete
    ]
    for row, card_above, card in zip(rows[1:], cards, cards[1:], strict=False):
        test = compare_cards(card_above, card, objectives[0])
        row["vs_above"] = None if test is None else ("≈" if not test["significant"] else ">")
        row["vs_above_p"] = None if test is None else test["p"]
    if rows:
        rows[0]["vs_above"] = rows[0]["vs_above_p"] = None
    retried = {t.user_attrs.get("retry_of") for t in trials} - {None}
    failed = [
        {
            "trial": t.number,
            "params": dict(t.params),
            "reason": t.user_attrs.get("fail_reason")
            or ("its worker died (no heartbeat)" if t.number in retried else "no reason recorded"),
            "retried": bool(t.user_attrs.get("stale")) or t.number in retried,
        }
        for t in trials
        if t.state == TrialState.FAIL
    ]
    search = study.user_attrs.get("search") or sorted({p for r in rows for p in r["params"]})
    recipe = _recipe_data(study.user_attrs.get("recipe"))
    board_stability = ranking_stability(cards, objectives[0]) if stability else None
    return {
        "stability": board_stability,
        "study": study.study_name,
        "objectives": objectives,
        "search": search,
        "labels": labels(search, recipe),
        "fixed": study.user_attrs.get("fixed") or fixed_values(search, recipe),
        "suite": study.user_attrs.get("suite"),
        "rows": rows,
        "failed": failed,
        "running": sum(t.state == TrialState.RUNNING for t in trials),
    }


def _recipe_data(text: str | None) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(text or "")
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def label(board: dict[str, Any], path: str) -> str:
    """A search path's column label: the model's name, not its index (``weight of nl``)."""
    return (board.get("labels") or {}).get(path) or short(path)


def print_leaderboard(board: dict[str, Any], limit: int | None = None, notes: bool = True) -> None:
    """A rich table on stderr: rank, the variant's parameters, scores, Pareto mark, seconds;
    then (``notes``) the values the search left fixed."""
    from rich.table import Table

    table = Table(title=escape(f"study {board['study']} (suite {board['suite'] or '?'})"))
    table.add_column("rank", justify="right")
    params = board["search"]
    for name in params:
        table.add_column(escape(label(board, name)), justify="right")
    table.add_column("Dutch", justify="right")
    table.add_column("English", justify="right")
    weighted = len(board["objectives"]) == 1 and board["objectives"][0] not in (
        "dutch_score",
        "english_score",
    )
    if weighted:
        table.add_column(board["objectives"][0], justify="right")
    table.add_column("vs above", justify="center")
    table.add_column("Pareto", justify="center")
    table.add_column("s", justify="right")
    for row in board["rows"][:limit]:
        cells = [str(row["rank"])]
        cells += [fmt(row["params"].get(p)) for p in params]
        cells += [_pm(row, "dutch_score"), _pm(row, "english_score")]
        if weighted:
            cells.append(fmt(row["values"][board["objectives"][0]]))
        cells += [row.get("vs_above") or "", "★" if row["pareto"] else "", fmt(row["seconds"])]
        table.add_row(*cells)
    print_table(table)
    console.print(
        f"± standard error over items; vs above (on {escape(board['objectives'][0])}): "
        "≈ not significantly different from the row above, > a real difference "
        "(paired bootstrap over the same items, 95%)"
    )
    if board.get("stability"):
        console.print(stability_line(board["stability"]))
    for note in (board.get("fixed") or []) if notes else []:
        console.print(escape(f"note: {describe(note)}"), style="yellow")
    failed = [f for f in board["failed"] if not f["retried"]]
    if failed:
        console.print(f"{len(failed)} failed variant(s):")
        for f in failed[:5]:
            console.print(escape(f"  trial {f['trial']} {f['params']}: {f['reason']}"))
    if board["running"]:
        console.print(f"{board['running']} variant(s) still running")


def _pm(row: dict[str, Any], score: str) -> str:
    se = row.get(f"{score}_se")
    return fmt(row.get(score)) if se is None else f"{fmt(row.get(score))} ±{fmt(se)}"


def stability_line(stability: dict[str, Any]) -> str:
    """One sentence on how stable the ranking is between two random halves of the items."""
    tau = stability["kendall_tau"]
    verdict = (
        "stable: the suite is big enough to rank these variants"
        if tau >= 0.8
        else "partly stable: neighbours may swap"
        if tau >= 0.5
        else "unstable: the order is mostly noise, use more items or fewer, more different variants"
    )
    return (
        f"ranking stability ({stability['key']}, {stability['candidates']} variants): Kendall tau "
        f"{tau:.2f} between rankings on two random halves of the items "
        f"(mean of {stability['splits']} splits, {stability['kendall_tau_min']:.2f}–"
        f"{stability['kendall_tau_max']:.2f}): {verdict}"
    )


def markdown(board: dict[str, Any]) -> str:
    """The leaderboard as a Markdown table (the demo's report)."""
    params = board["search"]
    head = ["rank", *(label(board, p) for p in params), "Dutch", "English", "vs above"]
    head += ["Pareto", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in board["rows"]:
        cells = [str(row["rank"]), *(fmt(row["params"].get(p)) for p in params)]
        cells += [_pm(row, "dutch_score"), _pm(row, "english_score")]
        cells += [row.get("vs_above") or "", "★" if row["pareto"] else "", fmt(row["seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"± standard error over items; vs above (on {board['objectives'][0]}): ≈ not "
        "significantly different from the row above, > a real difference (paired bootstrap "
        "over the same items, 95%).",
    ]
    if board.get("stability"):
        notes.append(stability_line(board["stability"]) + ".")
    return "\n".join(lines + notes) + "\n"


SCORE_NAMES = {"dutch_score": "Dutch score", "english_score": "English score"}
SCORE_COLOURS = {"dutch_score": "#333333", "english_score": "#333333"}  # references take colour
REFERENCE_STYLES = {  # parents and base on the plots: marker, colour
    "nl": ("s", "#1f77b4"),
    "instruct": ("^", "#2ca02c"),
    "base": ("D", "#7f7f7f"),
}


def _wrapped(text: str, width: int = 70) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _log_axis(values: list[float]) -> bool:
    """A log axis when the values span more than 20x (a tiny model's probabilities do)."""
    positive = [v for v in values if v is not None and v > 0]
    return len(positive) == len([v for v in values if v is not None]) and (
        bool(positive) and max(positive) / min(positive) > 20
    )


def write_plots(
    board: dict[str, Any],
    folder: Path,
    references: dict[str, tuple[float | None, float | None]] | None = None,
) -> list[dict[str, Any]]:
    """PNGs: each score against each searched parameter, and Dutch vs English (Pareto front).

    ``references`` (name -> (english_score, dutch_score), e.g. the parents) are drawn as
    labelled reference points and lines. Returns ``[{"path", "title"}, ...]``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    references = {k: v for k, v in (references or {}).items() if None not in v}
    rows = board["rows"]
    written: list[dict[str, Any]] = []
    scores = [s for s in ("dutch_score", "english_score") if any(r[s] is not None for r in rows)]
    study = board["study"]
    for param in board["search"]:
        name = label(board, param)
        title = f"{study}: {' and '.join(SCORE_NAMES[s] for s in scores)} against {name}"
        fig, axes = plt.subplots(
            len(scores), 1, figsize=(6.5, 2.4 * len(scores) + 0.9), sharex=True, squeeze=False
        )
        xs = [r["params"].get(param) for r in rows]
        numeric = r_is_numeric([x for x in xs if x is not None])
        categories = sorted({str(x) for x in xs if x is not None})
        for ax, score in zip(axes[:, 0], scores, strict=True):
            points = [(x, r) for x, r in zip(xs, rows, strict=True) if x is not None]
            px = [x if numeric else categories.index(str(x)) for x, _ in points]
            py = [r[score] for _, r in points]
            ses = [r.get(f"{score}_se") for _, r in points]
            if any(isinstance(e, float) for e in ses):
                ax.errorbar(
                    px, py, yerr=[e or 0 for e in ses], fmt="none", ecolor="#bbb", lw=1, capsize=2
                )
            ax.plot(px, py, "o", color=SCORE_COLOURS[score], label="variants")
            values = list(py)
            for ref, (english, dutch) in references.items():
                y = dutch if score == "dutch_score" else english
                values.append(y)
                marker, colour = REFERENCE_STYLES.get(ref, ("x", "#444"))
                ax.axhline(y, color=colour, ls="--", lw=1, alpha=0.8, label=f"{ref} (reference)")
            if _log_axis(values):
                ax.set_yscale("log")
            ax.set_ylabel(SCORE_NAMES[score])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best", framealpha=0.9)
        if not numeric:
            axes[-1, 0].set_xticks(range(len(categories)), categories)
        axes[-1, 0].set_xlabel(f"{name} ({param})" if name != param else param)
        fig.suptitle(_wrapped(title), fontsize=10)
        fig.tight_layout()
        path = folder / f"score_vs_{_slug(param)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append({"path": path, "title": title})
    if len(scores) == 2:
        title = (
            f"{study}: Dutch against English score of every variant; the Pareto front "
            "(no variant better on both) in red"
            + (", the parents as reference points" if references else "")
        )
        fig, ax = plt.subplots(figsize=(6.5, 5))
        rest = [r for r in rows if not r["pareto"]]
        front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["english_score"])
        ax.plot(
            [r["english_score"] for r in rest],
            [r["dutch_score"] for r in rest],
            "o",
            color="#999",
            label="variants",
        )
        ax.plot(
            [r["english_score"] for r in front],
            [r["dutch_score"] for r in front],
            "o-",
            color="#d62728",
            label="Pareto front (rank)",
        )
        for r in front:
            ax.annotate(
                str(r["rank"]),
                (r["english_score"], r["dutch_score"]),
                xytext=(4, 4),
                textcoords="offset points",
                fontsize=8,
            )
        for ref, (english, dutch) in references.items():
            marker, colour = REFERENCE_STYLES.get(ref, ("x", "#444"))
            ax.plot(english, dutch, marker, color=colour, markersize=10, label=ref)
            ax.annotate(ref, (english, dutch), xytext=(6, -10), textcoords="offset points")
        xs = [r["english_score"] for r in rows] + [e for e, _ in references.values()]
        ys = [r["dutch_score"] for r in rows] + [d for _, d in references.values()]
        if _log_axis(xs):
            ax.set_xscale("log")
        if _log_axis(ys):
            ax.set_yscale("log")
        suite = board.get("suite") or "?"
        ax.set_xlabel(f"English score (english_score, suite {suite}; higher is better)")
        ax.set_ylabel(f"Dutch score (dutch_score, suite {suite}; higher is better)")
        ax.set_title(_wrapped(title), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, framealpha=0.9)
        fig.tight_layout()
        path = folder / "pareto.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append({"path": path, "title": title})
    return written


def r_is_numeric(values: list[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def export(board: dict[str, Any], rank: int, out: Path) -> Path:
    """Write the variant at ``rank`` (1 = best) as a normal recipe file."""
    rows = board["rows"]
    if not rows:
        raise KruisingError(
            f"study {board['study']} has no complete variant", "run or continue the sweep first"
        )
    if not 1 <= rank <= len(rows):
        raise KruisingError(
            f"study {board['study']} has ranks 1 to {len(rows)}, not {rank}",
            "see the ranks with `merge rank STUDY`",
        )
    row = rows[rank - 1]
    if not row["recipe"]:
        raise KruisingError(f"trial {row['trial']} has no stored recipe", "rerun the sweep")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# study {board['study']}, rank {rank} (trial {row['trial']}): "
        + ", ".join(f"{k}={fmt(v)}" for k, v in row["values"].items())
        + "\n"
    )
    out.write_text(header + row["recipe"])
    return out
