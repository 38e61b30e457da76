"""`merge`'s start-up: the CLI module loads no heavy library, so `merge --help` is instant."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "mergekit", "optuna", "datasets", "accelerate")


def test_merge_help_imports_no_heavy_library():
    code = (
        "import sys\n"
        "from merger import cli\n"
        "sys.argv = ['merge', '--help']\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        f"print(sorted(set({HEAVY!r}) & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Usage: merge" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def _help(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", *args, "--help"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "COLUMNS": "120", "NO_COLOR": "1"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _option_line(help_text: str, option: str) -> str:
    lines = [line for line in help_text.splitlines() if f" {option} " in line]
    assert lines, help_text
    return lines[0]


def test_help_shows_flags_without_a_value_type():
    """`--json`, `--verbose -v`, `--help` take no value: the help must not read `<bool>`."""
    root = _help("merger.cli")
    rank = _help("merger.cli", "rank")
    pretrain = _help("pretrain.cli", "run")
    for text in (root, rank, pretrain):
        assert "<bool>" not in text, text
    assert "Show tracebacks" in _option_line(root, "--verbose")
    assert "-v" in _option_line(root, "--verbose")
    assert "JSON" in _option_line(rank, "--json")
    assert "<str>" in _option_line(rank, "--storage")  # options that take a value still say so
    assert "<int>" in _option_line(rank, "--top")


def test_flags_still_parse_as_flags(tmp_path):
    from typer.testing import CliRunner

    from merger.cli import app

    result = CliRunner().invoke(app, ["rank", "nothing", "--json=yes"])
    assert result.exit_code != 0 and "does not take a value" in result.output


@pytest.mark.parametrize(
    ("args", "rc", "stream", "text"),
    [
        (["--help"], 0, "stdout", "Usage: merge"),
        (["run", "no-such-recipe.yaml", "--out", "child"], 1, "stderr", "error: recipe not found"),
    ],
)
def test_the_console_script_exits_normally_with_its_code_and_all_output(
    tmp_path, args, rc, stream, text
):
    """`merge` (merger.cli:entry) with torch loaded: the code, every byte of output (a pipe
    buffers stdout until exit), and atexit handlers."""
    code = (
        "import atexit, sys\n"
        "import torch\n"
        "atexit.register(lambda: print('atexit ran', file=sys.stderr))\n"
        f"sys.argv = ['merge', *{args!r}]\n"
        "from merger.cli import entry\n"
        "entry()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == rc, done.stderr
    assert text in getattr(done, stream)
    assert done.stderr.rstrip().endswith("atexit ran")
