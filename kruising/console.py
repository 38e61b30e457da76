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


def print_table(table, out: Console | None = None) -> None:
    """Print a rich table without cutting any cell or header to an ellipsis.

    On a terminal, cells too wide for it wrap. Elsewhere (a log file, a pipe, CI) there is no
    width to fit, and rich would squeeze the table to 80 columns (``Engli…``): the table is
    printed at its natural width instead. Machine-readable output is ``--json``.
    """
    out = out or console
    for column in table.columns:
        column.no_wrap = False
        column.overflow = "fold"
    if out.is_terminal:
        out.print(table)
        return
    from rich.measure import Measurement

    natural = Measurement.get(out, out.options.update(max_width=10_000), table).maximum
    saved = out._width  # rich caps print(width=) at the console's width: widen it for this one
    out.width = max(out.width, natural)
    try:
        out.print(table)
    finally:
        out._width = saved


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
