"""Writes that never leave a half-written file or folder behind.

A file is written into a hidden sibling and renamed over the target (`write_text`,
`write_bytes`); a folder is built in a hidden sibling (`temp_sibling`) and renamed into place
when complete (`replace_folder`). A kill at any moment leaves the old version or the new one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def temp_sibling(final: Path, tag: str = "tmp") -> Path:
    """``dir/.name.<tag>-<pid>``: a hidden sibling of ``final`` to build it in."""
    final = Path(final)
    return final.with_name(f".{final.name}.{tag}-{os.getpid()}")


def replace_folder(tmp: Path, final: Path, *, old_tag: str = "old") -> None:
    """Move the finished folder ``tmp`` to ``final``. An existing ``final`` is moved aside
    first and removed only once the new one is in place."""
    tmp, final = Path(tmp), Path(final)
    trash = None
    if final.exists():
        trash = temp_sibling(final, old_tag)
        if trash.exists():
            shutil.rmtree(trash)
        final.rename(trash)
    tmp.rename(final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a hidden sibling renamed over it."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` through a hidden sibling renamed over it."""
    return write_bytes(path, text.encode(encoding))
