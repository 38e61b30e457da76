"""The environment variables kruising reads itself (the README lists every one, with the
Hugging Face and system ones it honours)."""

from __future__ import annotations

import os
from pathlib import Path

#: Values that switch a KRUISING_* feature off.
OFF = ("0", "off", "no", "false")


def cache_dir() -> Path:
    """kruising's cache: ``$KRUISING_CACHE``, else ``$XDG_CACHE_HOME/kruising``, else
    ``~/.cache/kruising`` (the compiled kernels, the demo's tiny family)."""
    root = os.environ.get("KRUISING_CACHE")
    if root:
        return Path(root)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "kruising"


def switched_off(name: str, *also: str) -> bool:
    """Whether the environment variable ``name`` says off (0/off/no/false, or one of ``also``)."""
    return os.environ.get(name, "").strip().lower() in (*OFF, *also)
