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
from merger.study.paths import short


def load_study(name: str, storage: str | None):
    """Load study ``name``; an unknown name lists the studies the storage holds."""
    import optuna

    from merger.study.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = open_storage(storage, heartbeat=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(store)]
    if name not in names:
        raise KruisingError(
            f"no study {name!r} in {getattr(store, 'url', storage)}",
            f"studies there: {', '.join(names)}" if names else "run `merge sweep SPEC` first",
        )
    return optuna.load_study(study_name=name, storage=store)


TIE = 1e-6  # scorecards round metrics to 6 decimals: closer values are a tie


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x >= y - TIE for x, y in zip(a, b, strict=True)) and any(
        x > y + TIE for x, y in zip(a, b, strict=True)
    )


def leaderboard(study) -> dict[str, Any]:
    """The study as plain data: ranked rows of complete trials, and the failed ones."""
    from optuna.trial import TrialState

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
                "english_score": t.user_attrs.get("english_score"),
                "pareto": t.number in front,
                "seconds": t.user_attrs.get("seconds"),
                "probes": t.user_attrs.get("probes", {}),
                "recipe": t.user_attrs.get("recipe"),
            }
        )
    failed = [
        {
            "trial": t.number,
            "params": dict(t.params),
            "reason": t.user_attrs.get("fail_reason", "no reason recorded"),
            "retried": bool(t.user_attrs.get("stale")),
        }
        for t in trials
        if t.state == TrialState.FAIL
    ]
    return {
        "study": study.study_name,
        "objectives": objectives,
        "search": study.user_attrs.get("search") or sorted({p for r in rows for p in r["params"]}),
        "suite": study.user_attrs.get("suite"),
        "rows": rows,
        "failed": failed,
        "running": sum(t.state == TrialState.RUNNING for t in trials),
    }


def print_leaderboard(board: dict[str, Any], limit: int | None = None) -> None:
    """A rich table on stderr: rank, the variant's parameters, scores, Pareto mark, seconds."""
    from rich.table import Table

    table = Table(title=escape(f"study {board['study']} (suite {board['suite'] or '?'})"))
    table.add_column("rank", justify="right")
    params = board["search"]
    for name in params:
        table.add_column(escape(short(name)), justify="right")
    table.add_column("Dutch", justify="right")
    table.add_column("English", justify="right")
    weighted = len(board["objectives"]) == 1 and board["objectives"][0] not in (
        "dutch_score",
        "english_score",
    )
    if weighted:
        table.add_column(board["objectives"][0], justify="right")
    table.add_column("Pareto", justify="center")
    table.add_column("s", justify="right")
    for row in board["rows"][:limit]:
        cells = [str(row["rank"])]
        cells += [fmt(row["params"].get(p)) for p in params]
        cells += [fmt(row["dutch_score"]), fmt(row["english_score"])]
        if weighted:
            cells.append(fmt(row["values"][board["objectives"][0]]))
        cells += ["★" if row["pareto"] else "", fmt(row["seconds"])]
        table.add_row(*cells)
    print_table(table)
    failed = [f for f in board["failed"] if not f["retried"]]
    if failed:
        console.print(f"{len(failed)} failed variant(s):")
        for f in failed[:5]:
            console.print(escape(f"  trial {f['trial']} {f['params']}: {f['reason']}"))
    if board["running"]:
        console.print(f"{board['running']} variant(s) still running")


def markdown(board: dict[str, Any]) -> str:
    """The leaderboard as a Markdown table (the demo's report)."""
    params = board["search"]
    head = ["rank", *params, "Dutch", "English", "Pareto", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in board["rows"]:
        cells = [str(row["rank"]), *(fmt(row["params"].get(p)) for p in params)]
        cells += [fmt(row["dutch_score"]), fmt(row["english_score"])]
        cells += ["★" if row["pareto"] else "", fmt(row["seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_plots(board: dict[str, Any], folder: Path) -> list[Path]:
    """PNGs: each score against each searched parameter, and Dutch vs English (Pareto front)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = board["rows"]
    written: list[Path] = []
    scores = [s for s in ("dutch_score", "english_score") if any(r[s] is not None for r in rows)]
    for param in board["search"]:
        xs = [r["params"].get(param) for r in rows]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for score in scores:
            points = [(x, r[score]) for x, r in zip(xs, rows, strict=True) if x is not None]
            if points and r_is_numeric([p[0] for p in points]):
                points.sort(key=lambda p: p[0])
                ax.plot(*zip(*points, strict=True), "o", label=score)
            elif points:
                labels = sorted({str(p[0]) for p in points})
                ax.plot(
                    [labels.index(str(p[0])) for p in points],
                    [p[1] for p in points],
                    "o",
                    label=score,
                )
                ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(param)
        ax.set_ylabel("score")
        ax.set_title(f"{board['study']}: score vs {param}")
        ax.legend()
        fig.tight_layout()
        path = folder / f"score_vs_{_slug(param)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if len(scores) == 2:
        fig, ax = plt.subplots(figsize=(5, 4))
        rest = [r for r in rows if not r["pareto"]]
        front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["english_score"])
        ax.plot(
            [r["english_score"] for r in rest],
            [r["dutch_score"] for r in rest],
            "o",
            color="grey",
            label="variants",
        )
        ax.plot(
            [r["english_score"] for r in front],
            [r["dutch_score"] for r in front],
            "o-",
            color="tab:red",
            label="Pareto front",
        )
        for r in front:
            ax.annotate(str(r["rank"]), (r["english_score"], r["dutch_score"]), fontsize=8)
        ax.set_xlabel("english_score")
        ax.set_ylabel("dutch_score")
        ax.set_title(f"{board['study']}: Dutch vs English")
        ax.legend()
        fig.tight_layout()
        path = folder / "pareto.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
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
