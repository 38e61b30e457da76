"""The CLI wrapper leaves through the normal interpreter exit: the code, all output, atexit."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import atexit, sys
    import torch  # loaded, as in every merge command
    from kruising.console import run_cli

    atexit.register(lambda: print("atexit ran", file=sys.stderr))

    def main():
        print("result on stdout", end="")  # unflushed until exit
        raise SystemExit({code!r})

    run_cli(main, lambda: False)
    """
)


@pytest.mark.parametrize(("code", "rc"), [(0, 0), (None, 0), (3, 3), ("fatal", 1)])
def test_the_cli_exits_with_the_code_and_loses_no_output(code, rc):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(code=code)], capture_output=True, text=True
    )
    assert done.returncode == rc
    assert done.stdout == "result on stdout"
    assert "atexit ran" in done.stderr
    if isinstance(code, str):
        assert "fatal" in done.stderr


def _wide_table():
    from rich.table import Table

    table = Table(title="study demo-chat-vector (suite demo)")
    table.add_column("model", no_wrap=True)
    for name in ("rank", "weight of nl", "weight of instruct", "Dutch", "English", "seconds"):
        table.add_column(name, justify="right")
    table.add_row(
        "chat-vector #1 (a long model name that must survive)",
        *("1", "0.75", "1.25", "0.012345 ±0.0031", "0.234567 ±0.0040", "0.25"),
    )
    return table


def test_a_table_is_not_cut_when_stderr_is_not_a_terminal():
    import io

    from rich.console import Console

    from kruising.console import print_table

    buf = io.StringIO()
    out = Console(file=buf, width=80, no_color=True)  # a pipe or a log file: not a terminal
    assert not out.is_terminal
    print_table(_wide_table(), out)
    text = buf.getvalue()
    assert "…" not in text
    for cell in ("weight of instruct", "English", "0.234567 ±0.0040", "must survive"):
        assert cell in text, text
    out.print("x " * 60)  # later output is back at the console's own width (two lines)
    assert [len(line.rstrip()) for line in buf.getvalue().splitlines()[-2:]] == [79, 39]


def test_a_table_wraps_on_a_narrow_terminal_instead_of_cutting():
    import io

    from rich.console import Console
    from rich.text import Text

    from kruising.console import print_table

    buf = io.StringIO()
    out = Console(file=buf, width=60, force_terminal=True, no_color=True)
    print_table(_wide_table(), out)
    text = Text.from_ansi(buf.getvalue()).plain
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 60
