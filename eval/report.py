"""Scorecards on disk and on screen: scorecard.json files and a rich comparison table, and
`score_models`, the work behind ``merge eval``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from eval.errors import EvalError
from kruising.atomic import write_text
from kruising.console import fmt

# Metrics shown in the table, per probe, in this order (the JSON has them all).
_SHOWN = ("acc", "acc_norm", "answer_prob", "lang_share", "ppl", "bits_per_byte")


def slug(ref: str) -> str:
    """A folder name for a model reference: the last path part, or org--name for a Hub id."""
    path = Path(ref)
    if path.exists():
        name = path.resolve().name
    else:
        name = ref.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", name) or "model"


def _is_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _same_folder(ref: str, out: Path) -> bool:
    path = Path(ref)
    return path.is_dir() and out.is_dir() and path.resolve() == out.resolve()


def check_out(refs: list[str], out: Path) -> None:
    """``--out`` may be a checkpoint folder only when that checkpoint is the one model scored
    (``merge eval CHILD --out CHILD``: the scorecard goes next to the weights). Scorecards of
    other models are never written into someone's checkpoint."""
    out = Path(out)
    if not _is_checkpoint(out):
        return
    if len(refs) == 1 and _same_folder(refs[0], out):
        return
    raise EvalError(
        f"--out {out} is a checkpoint folder: the scorecards of "
        + ("these models" if len(refs) > 1 else refs[0])
        + " would be written inside it",
        "give --out a folder for the scorecards, or --out CHILD only when scoring CHILD alone",
    )


def write_scorecards(cards: list[dict[str, Any]], refs: list[str], out: Path) -> list[Path]:
    """Write ``out/<slug>/scorecard.json`` for each model; slugs that collide get ``-2``, ``-3``.

    A model scored into its own folder (``out`` is the model) gets ``out/scorecard.json``.
    """
    written: list[Path] = []
    used: dict[str, int] = {}
    for card, ref in zip(cards, refs, strict=True):
        name = slug(ref)
        used[name] = used.get(name, 0) + 1
        if used[name] > 1:
            name = f"{name}-{used[name]}"
        folder = out if _same_folder(ref, out) else out / name
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(card, indent=2, ensure_ascii=False) + "\n"
        written.append(write_text(folder / "scorecard.json", text))
    return written


def _cell(value: Any, se: Any) -> str:
    return fmt(value) if se is None or value is None else f"{fmt(value)} ±{fmt(se)}"


def _same_as_best(cards, best: int, key: str, metric: str | None) -> list[bool]:
    """Per card: not significantly different from the best one (paired bootstrap, same items)."""
    from eval.stats import compare_cards

    out = []
    for k, card in enumerate(cards):
        if k == best:
            out.append(False)
            continue
        test = compare_cards(cards[best], card, key, metric)
        out.append(test is not None and not test["significant"])
    return out


def comparison_table(cards: list[dict[str, Any]]):
    """A rich Table: one row per probe metric, one column per model, values ± standard error.

    The best value is bold; ``≈`` marks a value not significantly different from the best
    (paired bootstrap over the same items, 95%). Subscores (tags, grammar phenomena) follow the
    probes.
    """
    from rich.table import Table

    table = Table(title=f"suite {cards[0]['suite']}", show_lines=False)
    table.add_column("probe")
    table.add_column("metric")
    for card in cards:
        table.add_column(Path(card["model"]).name or card["model"], justify="right")
    # (label, metric, values, standard errors, higher is better, comparison key or None)
    rows: list[tuple[str, str, list[Any], list[Any], bool, str | None]] = []
    for score in ("dutch_score", "english_score"):
        values = [c.get(score) for c in cards]
        rows.append((score, "", values, [c.get(f"{score}_se") for c in cards], True, score))
        cis = [c.get(f"{score}_ci") for c in cards]
        if any(cis):
            cells = [f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "-" for ci in cis]
            rows.append((score, "95% CI", cells, [None] * len(cards), True, None))
    for section in ("probes", "subscores"):
        names: list[str] = []
        for card in cards:
            names.extend(p for p in card.get(section, {}) if p not in names)
        for probe in names:
            for metric in _SHOWN:
                got = [c.get(section, {}).get(probe, {}) for c in cards]
                values = [g.get(metric) for g in got]
                if all(v is None for v in values):
                    continue
                ses = [g.get(f"{metric}_se") for g in got]
                higher = metric not in ("ppl", "bits_per_byte")
                key = probe if section == "probes" else None
                rows.append((probe, metric, values, ses, higher, key))
    for card in cards:
        for task, numbers in (card.get("lm_eval") or {}).get("results", {}).items():
            for metric, value in numbers.items():
                if isinstance(value, float) and "stderr" not in metric:
                    got = [(c.get("lm_eval") or {}).get("results", {}).get(task, {}) for c in cards]
                    values = [g.get(metric) for g in got]
                    se_key = metric.replace(",", "_stderr,", 1)
                    ses = [g.get(se_key) for g in got]
                    row = (f"lm-eval {task}", metric, values, ses, True, None)
                    if row not in rows:
                        rows.append(row)
    for probe, metric, values, ses, higher, key in rows:
        numbers = [v for v in values if isinstance(v, int | float)]
        best = (max(numbers) if higher else min(numbers)) if len(numbers) > 1 else None
        best_at = values.index(best) if best is not None else None
        same = (
            _same_as_best(cards, best_at, key, metric or None)
            if key is not None and best_at is not None
            else [False] * len(cards)
        )
        cells = []
        for k, (v, se) in enumerate(zip(values, ses, strict=True)):
            text = _cell(v, se) if isinstance(v, int | float) or v is None else str(v)
            if best is not None and v == best:
                text = f"[bold]{text}[/]"
            elif same[k]:
                text = f"≈ {text}"
            cells.append(text)
        table.add_row(probe, metric, *cells)
    table.add_row("seconds", "", *[f"{c['seconds']:.2f}" for c in cards])
    table.add_row("items/s", "", *[f"{c['items_per_second'] or 0:.1f}" for c in cards])
    return table


def ranking_line(cards: list[dict[str, Any]], key: str = "dutch_score") -> str | None:
    """The models ordered by ``key``, ``>`` between neighbours that differ significantly
    (paired bootstrap over the same items, 95%) and ``≈`` where they do not."""
    from eval.stats import compare_cards

    scored = [c for c in cards if c.get(key) is not None]
    if len(scored) < 2:
        return None
    scored.sort(key=lambda c: -c[key])
    parts = [f"{Path(scored[0]['model']).name or scored[0]['model']} {fmt(scored[0][key])}"]
    for above, below in zip(scored, scored[1:], strict=False):
        test = compare_cards(above, below, key)
        sign = "?" if test is None else (">" if test["significant"] else "≈")
        parts.append(f"{sign} {Path(below['model']).name or below['model']} {fmt(below[key])}")
    return f"{key}: " + " ".join(parts)


def score_models(
    models: list[str],
    suite: str,
    out: Path | None,
    *,
    device: str = "auto",
    batch_size: int = 16,
    lm_eval: str | None = None,
    lm_eval_limit: int | None = None,
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Score each model on ``suite``, show the table and, with ``out``, write
    ``out/<model>/scorecard.json``; nothing is written without it.

    Returns the scorecards and the files written (in the order of ``models``, or none).
    """
    from transformers.utils import logging as hf_logging

    from eval.api import score_path
    from eval.harness import parse_tasks
    from eval.suites import load_suite
    from kruising.console import console, print_table

    if out is not None:
        check_out(list(models), out)
    hf_logging.disable_progress_bar()  # our own progress bar says what is happening
    tasks = parse_tasks(lm_eval) if lm_eval is not None else None
    probes = load_suite(suite)
    n_items = sum(len(p.items) for p in probes)
    console.print(
        f"{len(models)} model{'s' if len(models) != 1 else ''}, suite {suite}: "
        f"{len(probes)} probes, {n_items} items"
        + (f", lm-eval {', '.join(tasks)}" if tasks else "")
    )
    cards = []
    for ref in models:
        card = score_path(
            ref,
            suite,
            device=device,
            batch_size=batch_size,
            progress=True,
            lm_eval_tasks=tasks,
            lm_eval_limit=lm_eval_limit,
        )
        console.print(
            f"{ref}: dutch_score {fmt(card['dutch_score'])} ±{fmt(card.get('dutch_score_se'))}, "
            f"english_score {fmt(card['english_score'])} ±{fmt(card.get('english_score_se'))}; "
            f"{card['seconds']:.1f} s, "
            f"{card['items_per_second']:.0f} items/s on {card['device']}",
            soft_wrap=True,
        )
        cards.append(card)
    written = write_scorecards(cards, list(models), out) if out is not None else []
    print_table(comparison_table(cards))
    for key in ("dutch_score", "english_score"):
        line = ranking_line(cards, key)
        if line:
            console.print(line, soft_wrap=True)
    if len(cards) > 1:
        console.print(
            "± standard error; ≈ not significantly different from the best, > a real difference "
            "(paired bootstrap over the same items, 95%)"
        )
    for path in written:
        console.print(f"wrote {path}")
    return cards, written
