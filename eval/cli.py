"""`merge eval`: the typer command for scoring models; imported at CLI start-up, so keep it light."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def eval_command(
    models: Annotated[list[str], typer.Argument(help="Checkpoint folders or Hub ids.")],
    suite: Annotated[str, typer.Option(help="nl, en, demo or all.")] = "nl",
    out: Annotated[Path | None, typer.Option(help="Folder for scorecard.json files.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print scorecards as JSON on stdout.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Score MODELS on Dutch probes and write a scorecard per model."""
    from eval.errors import EvalError

    raise EvalError("merge eval is not built yet", "see issue 4")
