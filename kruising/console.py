"""Terminal output shared by the CLIs: rich on stderr, errors as `error:` + `hint:`.

Results meant for machines (``--json``) go to stdout with plain ``print``; everything
for people (progress, tables, derived numbers) goes through ``console`` to stderr.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.text import Text

from kruising.errors import KruisingError

console = Console(stderr=True, no_color=bool(os.environ.get("NO_COLOR")), highlight=False)

#: What a table shows for a value that is not there.
MISSING = "–"


def fmt(value: Any) -> str:
    """A value as tables, cards and reports show it: four significant digits (``0.4667``,
    ``8.25``, ``1``), one decimal from 1000 on (``35682.4``), ``–`` for None."""
    if value is None:
        return MISSING
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isfinite(value) and abs(value) >= 1000:
        return f"{value:.1f}"
    return f"{value:.4g}"


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


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT, raised in the main thread as a KeyboardInterrupt: every clean-up
    runs (temporary folders removed) as for any failure, and code that treats Ctrl-C
    specially (a sweep marks its variant to be run again) treats SIGTERM the same way."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


#: the signals received (typer turns a KeyboardInterrupt into a silent exit 130, so
#: `run_cli` looks here to say what stopped the command)
_received: list[int] = []


def _raise_interrupted(signum: int, frame: Any) -> None:
    _received.append(signum)
    raise Interrupted(signum)


def run_cli(app: Callable[[], object], verbose: Callable[[], bool]) -> None:
    """Call a typer app; print expected failures as one line + hint and exit 1.

    SIGTERM (``timeout``, Slurm, ``docker stop``) and SIGINT (Ctrl-C) stop the command like a
    failure: its clean-ups run, one line says so, and the exit code is 128 + the signal.
    """
    import signal
    import threading

    handled = (signal.SIGTERM, signal.SIGINT)
    saved = {}
    _received.clear()
    if threading.current_thread() is threading.main_thread():  # only it may set handlers
        saved = {signum: signal.signal(signum, _raise_interrupted) for signum in handled}
    try:
        _run(app, verbose)
    finally:  # a caller in the same process (a test, a script) gets its handlers back
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _run(app: Callable[[], object], verbose: Callable[[], bool]) -> None:
    import signal

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
    except (KeyboardInterrupt, SystemExit) as exc:
        if isinstance(exc, SystemExit) and not _received:
            raise  # a normal exit, or a failure typer or click reported
        if _received:  # a second signal now ends it at once
            for each in (signal.SIGTERM, signal.SIGINT):
                signal.signal(each, signal.SIG_DFL)
        signum = _received[0] if _received else signal.SIGINT
        name = signal.Signals(signum).name
        console.print(
            Text.assemble(
                ("error: ", "bold red"), f"stopped by {name}; nothing half-written was kept"
            ),
            soft_wrap=True,
        )
        sys.exit(128 + signum)
