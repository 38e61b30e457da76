"""Scorecards on disk and on screen: scorecard.json files and a rich comparison table."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

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


def write_scorecards(cards: list[dict[str, Any]], refs: list[str], out: Path) -> list[Path]:
    """Write ``out/<slug>/scorecard.json`` for each model; slugs that collide get ``-2``, ``-3``."""
    written: list[Path] = []
    used: dict[str, int] = {}
    for card, ref in zip(cards, refs, strict=True):
        name = slug(ref)
        used[name] = used.get(name, 0) + 1
        if used[name] > 1:
            name = f"{name}-{used[name]}"
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "scorecard.json"
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(target)
        written.append(target)
    return written


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.1f}"
        if 0 < abs(value) < 0.01:
            return f"{value:.3g}"  # small probabilities keep three significant digits
        return f"{value:.4f}"
    return str(value)


def comparison_table(cards: list[dict[str, Any]]):
    """A rich Table: one row per probe metric, one column per model; best value in bold."""
    from rich.table import Table

    table = Table(title=f"suite {cards[0]['suite']}", show_lines=False)
    table.add_column("probe")
    table.add_column("metric")
    for card in cards:
        table.add_column(Path(card["model"]).name or card["model"], justify="right")
    rows: list[tuple[str, str, list[Any], bool]] = [
        ("dutch_score", "", [c.get("dutch_score") for c in cards], True),
        ("english_score", "", [c.get("english_score") for c in cards], True),
    ]
    probes: list[str] = []
    for card in cards:
        probes.extend(p for p in card["probes"] if p not in probes)
    for probe in probes:
        for metric in _SHOWN:
            values = [c["probes"].get(probe, {}).get(metric) for c in cards]
            if all(v is None for v in values):
                continue
            higher = metric not in ("ppl", "bits_per_byte")
            rows.append((probe, metric, values, higher))
    for card in cards:
        for task, numbers in (card.get("lm_eval") or {}).get("results", {}).items():
            for metric, value in numbers.items():
                if isinstance(value, float) and "stderr" not in metric:
                    probes_values = [
                        (c.get("lm_eval") or {}).get("results", {}).get(task, {}).get(metric)
                        for c in cards
                    ]
                    row = (f"lm-eval {task}", metric, probes_values, True)
                    if row not in rows:
                        rows.append(row)
    for probe, metric, values, higher in rows:
        numbers = [v for v in values if isinstance(v, int | float)]
        best = (max(numbers) if higher else min(numbers)) if len(numbers) > 1 else None
        cells = [
            f"[bold]{_fmt(v)}[/]" if best is not None and v == best else _fmt(v) for v in values
        ]
        table.add_row(probe, metric, *cells)
    table.add_row("seconds", "", *[f"{c['seconds']:.2f}" for c in cards])
    table.add_row("items/s", "", *[f"{c['items_per_second'] or 0:.1f}" for c in cards])
    return table
