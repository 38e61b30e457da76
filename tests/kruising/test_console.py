"""The CLI process entry: a fast exit that still flushes output and runs atexit handlers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import atexit, sys
    import torch  # the case the fast exit is for
    from kruising.console import entry

    atexit.register(lambda: print("atexit ran", file=sys.stderr))

    def main():
        print("result on stdout", end="")  # unflushed until exit
        raise SystemExit({code!r})

    entry(main)
    """
)


@pytest.mark.parametrize(("code", "rc"), [(0, 0), (None, 0), (3, 3), ("fatal", 1)])
def test_entry_exits_with_the_code_and_loses_no_output(code, rc):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(code=code)], capture_output=True, text=True
    )
    assert done.returncode == rc
    assert done.stdout == "result on stdout"
    assert "atexit ran" in done.stderr
    if isinstance(code, str):
        assert "fatal" in done.stderr
