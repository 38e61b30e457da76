"""`merge`'s start-up: the CLI module loads no heavy library, so `merge --help` is instant."""

from __future__ import annotations

import subprocess
import sys

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
