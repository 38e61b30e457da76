"""`merge eval`: the typer command for scoring models; imported at CLI start-up, so keep it light."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def eval_command(
    models: Annotated[list[str], typer.Argument(help="Checkpoint folders or Hub ids.")],
    suite: Annotated[
        str, typer.Option(help="nl, en, demo, all (nl + en), or a folder of *.jsonl probe files.")
    ] = "nl",
    out: Annotated[
        Path, typer.Option(help="Folder for the scorecards: OUT/<model>/scorecard.json.")
    ] = Path("scorecards"),
    json_: Annotated[
        bool, typer.Option("--json", help="Print the scorecards as JSON on stdout.")
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 16,
    lm_eval: Annotated[
        str | None,
        typer.Option(
            "--lm-eval",
            help="Also run lm-evaluation-harness tasks, comma-separated (needs the lm-eval extra).",
        ),
    ] = None,
    lm_eval_limit: Annotated[
        int | None, typer.Option(help="Items per lm-eval task (default: all).")
    ] = None,
) -> None:
    """Score MODELS on Dutch probes and write a scorecard per model.

    Scores are log-likelihood multiple choice (acc, acc_norm), minimal pairs, greedy continuations
    checked by a language identifier, and held-out perplexity; dutch_score and english_score are
    weighted means (see eval/probes/README.md).
    """
    from transformers.utils import logging as hf_logging

    from eval.api import score_path
    from eval.harness import parse_tasks
    from eval.report import comparison_table, write_scorecards
    from eval.suites import load_suite
    from merger.console import console

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
            f"{ref}: dutch_score {_g(card['dutch_score'])}, "
            f"english_score {_g(card['english_score'])}; {card['seconds']:.1f} s, "
            f"{card['items_per_second']:.0f} items/s on {card['device']}",
            soft_wrap=True,
        )
        cards.append(card)
    written = write_scorecards(cards, list(models), out)
    console.print(comparison_table(cards))
    for path in written:
        console.print(f"wrote {path}")
    for ref, card, path in zip(models, cards, written, strict=True):
        readme = _refresh_child_card(Path(ref), card, path)
        if readme is not None:
            console.print(f"refreshed the model card {readme} with these scores")
    if json_:
        payload = cards[0] if len(cards) == 1 else cards
        print(json.dumps(payload, indent=2, ensure_ascii=False))


def _refresh_child_card(folder: Path, card: dict, scorecard: Path) -> Path | None:
    """A child merged here and scored into itself (``merge eval CHILD --out CHILD``): its
    model card is rewritten with the scores, as `merge push` would show them."""
    if not folder.is_dir() or not scorecard.resolve().is_relative_to(folder.resolve()):
        return None
    from merger.card import is_kruising_card, update_card_scores
    from merger.hub import RECIPE_FILE

    readme = folder / "README.md"
    if not (folder / RECIPE_FILE).is_file() or not readme.is_file():
        return None
    if not is_kruising_card(readme):
        return None  # someone else's card: left as it is
    return update_card_scores(folder, card)


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
