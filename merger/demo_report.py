"""The demo's report: ``leaderboard.md`` and ``report.html`` from the same facts, and its plot.

Both say, before any table, what the numbers measure (metric, chance level, error bars), give
one verdict sentence, name models instead of recipe indices, note the values a sweep left
fixed, and show or link every plot. ``report.html`` is static (no script, no network): open it
from the report folder in any browser.
"""

from __future__ import annotations

import html
import os
import textwrap
from pathlib import Path
from typing import Any

from kruising.console import fmt
from merger.study.notes import describe

CHAT_PROBE = "demo_nl_chat"
PROBES = {  # column -> (probe, what it asks)
    "nl chat": ("demo_nl_chat", "Dutch questions asked in chat form ([INST] ... [/INST])"),
    "nl plain": ("demo_nl_plain", "Dutch questions as plain text (Vraag: ... Antwoord:)"),
    "en chat": ("demo_en_chat", "English questions asked in chat form"),
    "en plain": ("demo_en_plain", "English questions as plain text"),
}
KIND_COLOURS = {  # distinct per role; the plots' legends name them
    "base": "#7f7f7f",
    "nl": "#1f77b4",
    "instruct": "#2ca02c",
    "child": "#ff7f0e",
    "sweep": "#9467bd",
}


def role(row: dict[str, Any]) -> str:
    """base / nl / instruct (the parents by name) / child (a demo recipe) / sweep (a sweep's #1)."""
    if row["kind"] == "parent":
        return row["model"] if row["model"] in KIND_COLOURS else "nl"
    if row["kind"] == "base":
        return "base"
    return "sweep" if row.get("sweep") else "child"


def _param(value: Any) -> str:
    return fmt(value)


def _fmt(value: Any, se: Any = None) -> str:
    """A score as the tables show it (`kruising.console.fmt`), ``±`` its standard error."""
    text = fmt(value)
    if value is not None and isinstance(se, float):
        text += f" ±{fmt(se)}"
    return text


# --- what the numbers mean ----------------------------------------------------------------------


def legend(
    metric: str, items: dict[str, int | None], vocab: int, has_se: bool, weights: dict
) -> list[tuple[str, str]]:
    """(term, meaning) pairs: the report's legend, the same in Markdown and HTML."""
    nl = items.get(CHAT_PROBE)
    en = items.get("demo_en_chat")

    def score(lang: str) -> str:
        probes = [p for p in weights if p.startswith(f"demo_{lang}_")]
        parts = " and ".join(f"{p} ({weights[p]:g})" for p in probes) or f"the {lang} probes"
        return f"weighted mean of {metric} over {parts}"

    out = [
        ("Dutch", f"dutch_score: {score('nl')}. Higher is better."),
        ("English", f"english_score: {score('en')}. Higher is better (English retention)."),
    ]
    out.append(
        (
            "nl chat, nl plain, en chat, en plain",
            f"{metric} on one probe each: "
            + "; ".join(f"{col} = {probe}, {what}" for col, (probe, what) in PROBES.items())
            + f". {nl or '?'} Dutch and {en or '?'} English questions about the tiny family's "
            "world, in phrasings no training text contains.",
        )
    )
    out.append(
        (
            metric,
            "exp of the mean log-probability per token of the right answer (1 / its "
            "perplexity), so 1 is certain and right. Chance level: a model that spreads its "
            f"probability evenly over the {vocab:,}-token vocabulary scores 1/{vocab:,} = "
            f"{1 / vocab:.1e}. Values of a tiny model are small; compare them with each other.",
        )
    )
    out.append(
        (
            "acc_norm",
            "the share of questions where the right answer out-scores its 3 distractors "
            "(log-prob per byte). Chance level 0.25; one question is "
            + (f"{1 / nl:.3f}" if nl else "1/n")
            + " of the Dutch score.",
        )
    )
    if has_se:
        out.append(("±", "standard error over the questions (the error bars in the plots)."))
    else:
        out.append(
            (
                "error bars",
                "these scorecards carry no standard errors; with n questions a share moves in "
                "steps of 1/n, so treat differences of a few steps as noise.",
            )
        )
    out.append(("Pareto ★", "no other variant of the sweep is better on both Dutch and English."))
    return out


# --- Markdown -----------------------------------------------------------------------------------


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return lines


def _model_cells(row: dict[str, Any], metric: str) -> list[str]:
    se = row.get(f"{CHAT_PROBE}_se")
    cells = [row["model"], row["kind"], row["method"]]
    cells += [_fmt(row["dutch_score"], row.get("dutch_score_se"))]
    cells += [_fmt(row["english_score"], row.get("english_score_se"))]
    for _col, (probe, _what) in PROBES.items():
        cells.append(_fmt(row[probe], se if probe == CHAT_PROBE else None))
    cells.append(_fmt(row.get(f"{CHAT_PROBE}_acc_norm")))
    return cells


MODEL_HEAD = ["model", "kind", "recipe", "Dutch", "English", *PROBES, "nl chat acc_norm"]


def _rel(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def markdown(report: dict[str, Any]) -> str:
    """``leaderboard.md``: verdict, legend, models, plots, each sweep with its notes."""
    out = report["out"]
    metric = report["metric"]
    lines = [f"# kruising demo: {report['title']}", ""]
    lines += [f"**Verdict.** {report['verdict']['text']}", ""]
    lines += [f"- {d}" for d in report["verdict"].get("details", [])]
    lines += ["", "Open `report.html` in this folder for the tables and plots on one page.", ""]
    lines += ["## What the numbers mean", ""]
    lines += [f"- **{term}**: {text}" for term, text in report["legend"]]
    lines += ["", f"## Parents and children (probe columns: {metric})", ""]
    lines += _md_table(MODEL_HEAD, [_model_cells(r, metric) for r in report["rows"]])
    lines += ["", "## Plots", ""]
    for plot in report["plots"]:
        lines.append(f"- [{plot['title']}]({_rel(plot['path'], out)})")
    main = report["plots"][0] if report["plots"] else None
    if main is not None:
        lines += ["", f"![{main['title']}]({_rel(main['path'], out)})"]
    for sweep in report["sweeps"]:
        lines += ["", f"## Sweep {sweep['study']}", "", sweep["about"], ""]
        for note in sweep["fixed"]:
            lines.append(f"> **Note:** {describe(note)}")
            lines.append("")
        lines.append(sweep["markdown"].rstrip("\n"))
        lines.append("")
        for plot in sweep["plots"]:
            lines.append(f"- [{plot['title']}]({_rel(plot['path'], out)})")
    lines += ["", "## Next steps", "", "```bash", *report["commands"], "```", ""]
    return "\n".join(lines)


# --- HTML ---------------------------------------------------------------------------------------

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 1180px; margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.verdict { font-size: 1.15em; padding: .8em 1em; border-left: 6px solid #888; background: #f6f6f6; }
.verdict.yes { border-color: #2ca02c; background: #eef8ee; }
.verdict.no { border-color: #d62728; background: #fbeeee; }
.verdict.unclear { border-color: #e0a000; background: #fdf6e3; }
ul.details { color: #444; }
dl.legend { display: grid; grid-template-columns: max-content 1fr; gap: .3em 1em; }
dl.legend dt { font-weight: 600; } dl.legend dd { margin: 0; }
table { border-collapse: collapse; margin: .6em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; } td.name, th.name { text-align: left; }
tr.parent td { background: #f3f8fd; } tr.base td { color: #666; }
.swatch { display: inline-block; width: .8em; height: .8em; border-radius: 2px; margin-right: .4em; }
.note { background: #fff8e1; border: 1px solid #f0d890; padding: .5em .8em; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure img { max-width: 560px; border: 1px solid #eee; }
figure.wide img { max-width: 100%; }
figcaption { font-size: .85em; color: #555; max-width: 560px; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text))


def _html_table(head: list[str], rows: list[tuple[str, list[str]]], names: int = 1) -> str:
    th = "".join(
        f'<th class="name">{_esc(h)}</th>' if i < names else f"<th>{_esc(h)}</th>"
        for i, h in enumerate(head)
    )
    body = []
    for css, cells in rows:
        tds = "".join(
            f'<td class="name">{c}</td>' if i < names else f"<td>{_esc(c)}</td>"
            for i, c in enumerate(cells)
        )
        body.append(f'<tr class="{css}">{tds}</tr>')
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(plot: dict[str, Any], out: Path, wide: bool = False) -> str:
    src = _esc(_rel(plot["path"], out))
    return (
        f'<figure class="{"wide" if wide else ""}"><a href="{src}"><img src="{src}" '
        f'alt="{_esc(plot["title"])}"></a></figure>'
    )


def html_page(report: dict[str, Any]) -> str:
    """``report.html``: the same content as ``leaderboard.md``, with the plots in the page."""
    out = report["out"]
    verdict = report["verdict"]
    css = {True: "yes", False: "no"}.get(verdict.get("answer"), "unclear")
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>kruising demo: {_esc(report['title'])}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>kruising demo</h1><p>{_esc(report['title'])}</p>",
        f'<p class="verdict {css}"><strong>Verdict.</strong> {_esc(verdict["text"])}</p>',
    ]
    if verdict.get("details"):
        items = "".join(f"<li>{_esc(d)}</li>" for d in verdict["details"])
        parts.append(f'<ul class="details">{items}</ul>')
    if report["plots"]:
        parts.append(_figure(report["plots"][0], out, wide=True))
    parts.append("<h2>What the numbers mean</h2><dl class='legend'>")
    parts += [f"<dt>{_esc(t)}</dt><dd>{_esc(x)}</dd>" for t, x in report["legend"]]
    parts.append("</dl>")
    parts.append(
        f"<h2>Parents and children <small>(probe columns: {_esc(report['metric'])})</small></h2>"
    )
    rows = []
    for r in report["rows"]:
        cells = _model_cells(r, report["metric"])
        swatch = f'<span class="swatch" style="background:{KIND_COLOURS[role(r)]}"></span>'
        cells = [swatch + _esc(cells[0]), _esc(cells[1]), _esc(cells[2]), *cells[3:]]
        rows.append((r["kind"], cells))
    parts.append(_html_table(MODEL_HEAD, rows, names=3))
    for plot in report["plots"][1:]:
        parts.append(_figure(plot, out))
    for sweep in report["sweeps"]:
        parts.append(f"<h2>Sweep {_esc(sweep['study'])}</h2><p>{_esc(sweep['about'])}</p>")
        for note in sweep["fixed"]:
            parts.append(f'<p class="note"><strong>Note:</strong> {_esc(describe(note))}</p>')
        head = sweep["head"]
        parts.append(_html_table(head, [("", list(row)) for row in sweep["cells"]], 0))
        if sweep.get("footer"):
            parts.append(f"<p><small>{_esc(sweep['footer'])}</small></p>")
        parts += [_figure(p, out) for p in sweep["plots"]]
    commands = "\n".join(report["commands"])
    parts.append(f"<h2>Next steps</h2><pre>{_esc(commands)}</pre>")
    parts.append(
        "<p><small>Files: leaderboard.md, leaderboard.json, summary.json, scorecards/, "
        "children/, recipes/, sweeps/, study.db, plots/, best-recipe.yaml.</small></p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def sweep_table(board: dict[str, Any]) -> tuple[list[str], list[list[str]], str]:
    """A sweep's leaderboard as (head, cells, footer) for the HTML page; columns named as in
    ``merge rank``: the searched values (by model name), the scores ± standard error."""
    from merger.study.rank import label

    params = board["search"]
    rows = board["rows"]
    compared = any(r.get("vs_above") for r in rows)
    head = ["rank", *(label(board, p) for p in params), "Dutch", "English"]
    head += ["vs above"] if compared else []
    head += ["Pareto", "seconds"]
    cells = []
    for r in rows:
        row = [str(r["rank"]), *(_param(r["params"].get(p)) for p in params)]
        row += [_fmt(r["dutch_score"], r.get("dutch_score_se"))]
        row += [_fmt(r["english_score"], r.get("english_score_se"))]
        row += [r.get("vs_above") or ""] if compared else []
        row += ["★" if r["pareto"] else "", _fmt(r["seconds"])]
        cells.append(row)
    footer = ""
    if compared:
        footer = (
            f"vs above (on {board['objectives'][0]}): ≈ not significantly different from the "
            "row above, > a real difference (paired bootstrap over the same items, 95%)."
        )
    return head, cells, footer


# --- the Dutch-chat plot ------------------------------------------------------------------------


def chat_plot(rows: list[dict[str, Any]], path: Path, metric: str, vocab: int) -> dict[str, Any]:
    """Every model's Dutch-chat score as a dot on a log axis, error bars when known, the
    parents as reference lines, colours by role with a legend, values written beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = next((r["items"].get(CHAT_PROBE) for r in rows if r["items"].get(CHAT_PROBE)), None)
    title = (
        f"Dutch questions in chat form ({CHAT_PROBE}, {n or '?'} questions): {metric} of each "
        "model, log scale"
    )
    chance = 1 / vocab
    values = [r[CHAT_PROBE] for r in rows]
    shown = [v for v in values if v]
    low = min([chance, *shown]) / 3
    high = max([chance * 10, *shown]) * 6  # room for the value labels
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(rows) + 1.6))
    labels_done: set[str] = set()
    names = {
        "base": "base (the parents' common ancestor)",
        "nl": "parent nl (Dutch)",
        "instruct": "parent instruct (chat)",
        "child": "child of a demo recipe",
        "sweep": "best variant of a sweep",
    }
    for y, row in enumerate(rows):
        value = row[CHAT_PROBE]
        kind = role(row)
        colour = KIND_COLOURS[kind]
        label = names[kind] if kind not in labels_done else None
        labels_done.add(kind)
        if not value:
            ax.annotate("no score", (low, y), xytext=(4, -3), textcoords="offset points")
            continue
        ax.hlines(y, low, value, color=colour, alpha=0.35, linewidth=3)
        se = row.get(f"{CHAT_PROBE}_se")
        if isinstance(se, float) and se > 0:
            lo = max(value - se, low)
            ax.errorbar(
                value, y, xerr=[[value - lo], [se]], fmt="none", ecolor="#333", capsize=3, lw=1
            )
        ax.plot(value, y, "o", color=colour, markersize=8, label=label)
        ax.annotate(_fmt(value), (value, y), xytext=(8, -4), textcoords="offset points", fontsize=8)
    for row in rows:
        if row["kind"] == "parent" and row[CHAT_PROBE]:
            ax.axvline(row[CHAT_PROBE], color=KIND_COLOURS[role(row)], ls="--", lw=1, alpha=0.7)
    ax.axvline(chance, color="#999", ls=":", lw=1)
    ax.annotate(
        f"chance 1/{vocab:,}",
        (chance, len(rows) - 0.5),
        xytext=(3, 0),
        textcoords="offset points",
        fontsize=7,
        color="#666",
    )
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.set_ylim(len(rows) - 0.4, -0.6)
    ax.set_yticks(range(len(rows)), [r["model"] for r in rows])
    ax.set_xlabel(f"{metric} on {CHAT_PROBE} (higher is better; dashed: the parents)")
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=10)
    ax.grid(axis="x", which="major", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return {"path": path, "title": title}
