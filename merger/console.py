"""Terminal output shared by the CLIs: rich on stderr, errors as `error:` + `hint:`.

Results meant for machines (``--json``) go to stdout with plain ``print``; everything
for people (progress, tables, derived numbers) goes through ``console`` to stderr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from rich.console import Console
from rich.text import Text

console = Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")), highlight=False)


def _domain_errors() -> tuple[type[BaseException], ...]:
    from eval.errors import EvalError
    from merger.errors import KruisingError
    from pretrain.errors import PretrainError

    return (KruisingError, PretrainError, EvalError)


def run_cli(app: Callable[[], object], verbose: Callable[[], bool]) -> None:
    """Call a typer app; print expected failures as one line + hint and exit 1."""
    try:
        app()
    except _domain_errors() as exc:
        if verbose():
            raise
        console.print(Text.assemble(("error: ", "bold red"), exc.message), soft_wrap=True)
        if exc.hint:
            console.print()
            console.print(Text.assemble(("hint: ", "bold"), exc.hint), soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[bold red]error:[/] interrupted; nothing half-written was kept")
        sys.exit(130)
