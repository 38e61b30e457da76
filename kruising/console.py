"""Terminal output shared by the CLIs: rich on stderr, errors as `error:` + `hint:`.

Results meant for machines (``--json``) go to stdout with plain ``print``; everything
for people (progress, tables, derived numbers) goes through ``console`` to stderr.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from rich.console import Console
from rich.text import Text

from kruising.errors import KruisingError

console = Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")), highlight=False)


def run_cli(app: Callable[[], object], verbose: Callable[[], bool]) -> None:
    """Call a typer app; print expected failures as one line + hint and exit 1."""
    try:
        app()
    except KruisingError as exc:
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


def entry(main: Callable[[], None]) -> NoReturn:
    """The process entry of a CLI: run ``main``, then leave without tearing the interpreter
    down. With torch loaded, module teardown takes ~0.4 s of every command for nothing: the
    commands close and fsync what they write, and atexit handlers still run here."""
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    if "torch" not in sys.modules:
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code or 0)
