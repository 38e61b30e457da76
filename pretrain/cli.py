"""`pretrain`: continue a Mistral checkpoint on a corpus; build the tiny family."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="pretrain",
    help="Continue a Mistral checkpoint on Dutch text, and build the tiny Mistral family.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

_state = {"verbose": False}


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks.")) -> None:
    _state["verbose"] = verbose


def main() -> None:
    from merger.console import run_cli

    run_cli(app, lambda: _state["verbose"])
