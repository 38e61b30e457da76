"""A real headless Chromium for the tests: open a local page, take a screenshot.

Chromium comes from the system (Debian's ``chromium`` package; ``.ci/run`` installs it when
missing). It runs headless, as root without its sandbox, with everything that would reach the
network switched off, in a fresh profile folder. `screenshot` raises `Unavailable` with the
reason when Chromium is missing or cannot start; the tests turn that into a visible skip (or a
failure where ``KRUISING_REQUIRE_CHROMIUM=1``, which ``.ci/run`` sets once it has Chromium).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


class Unavailable(Exception):
    """No headless Chromium can be started here (the message says why)."""


def find_chromium() -> str | None:
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 4000) -> Path:
    """Open ``page`` (a local file) in headless Chromium and save a ``width`` x ``height`` PNG."""
    binary = find_chromium()
    if binary is None:
        raise Unavailable(f"no Chromium on PATH (tried {', '.join(NAMES)})")
    png = Path(png)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="kruising-chromium-") as profile:
        cmd = [
            binary,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={png}",
            Path(page).resolve().as_uri(),
        ]
        try:
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=180,
                env={**os.environ, "HOME": profile},
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"{binary} did not run: {exc}") from None
    if done.returncode != 0 or not png.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise Unavailable(f"{binary} exited {done.returncode}: {' / '.join(tail)}")
    return png
