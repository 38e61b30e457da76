"""Writes that never leave a half-written file or folder behind.

A file is written into a hidden sibling and renamed over the target (`write_text`,
`write_bytes`); a folder is built in a hidden sibling (`temp_sibling`) and moved into place
when complete: `publish_folder` (never over something that is there, even if it appeared a
moment ago: another run's output is not replaced) or `replace_folder` (swapped with what is
there in one step). A kill at any moment leaves the old version or the new one, plus at most
the hidden sibling, which `stale_siblings` finds for the next run.

On Linux both moves are one ``renameat2`` call (``RENAME_NOREPLACE``, ``RENAME_EXCHANGE``);
where the system or the file system lacks it, a plain rename, which POSIX also refuses onto
a non-empty folder.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


def temp_sibling(final: Path, tag: str = "tmp") -> Path:
    """``dir/.name.<tag>-<pid>``: a hidden sibling of ``final`` to build it in."""
    final = Path(final)
    return final.with_name(f".{final.name}.{tag}-{os.getpid()}")


def host_tag(tag: str) -> str:
    """``tag-<host>``: for `temp_sibling` where folders are shared between machines, so that
    `stale_siblings` tells another machine's live run from a dead one here."""
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
    return f"{tag}-{host}"


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """One ``renameat2``; False where the system or file system does not have it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        return False
    if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish_folder(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``, which must not exist: if something is
    there (another run finished first), `FileExistsError` and ``tmp`` is left as it is."""
    tmp, final = Path(tmp), Path(final)
    try:
        if _renameat2(tmp, final, _RENAME_NOREPLACE):
            return
        if final.exists() or final.is_symlink():
            raise FileExistsError(errno.EEXIST, "exists", str(final))
        os.rename(tmp, final)  # POSIX refuses a non-empty folder, so a child is never replaced
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "exists", str(final)) from None
        raise


def replace_folder(tmp: Path, final: Path, *, old_tag: str = "old") -> None:
    """Move the finished folder ``tmp`` to ``final``. An existing ``final`` (folder or file) is
    swapped out in one step where the system can (``RENAME_EXCHANGE``), else moved aside first;
    it is removed once the new one is in place."""
    tmp, final = Path(tmp), Path(final)
    if final.exists() or final.is_symlink():
        try:
            exchanged = _renameat2(tmp, final, _RENAME_EXCHANGE)
        except FileNotFoundError:  # it went away meanwhile
            exchanged = False
        if exchanged:
            _remove(tmp)  # the old version is where the new one was built
            return
    trash = None
    if final.exists() or final.is_symlink():
        trash = temp_sibling(final, old_tag)
        if trash.exists() or trash.is_symlink():
            _remove(trash)
        final.rename(trash)
    tmp.rename(final)
    if trash is not None:
        _remove(trash)


@dataclass(frozen=True)
class Sibling:
    """A hidden sibling left by a run: its path, whether that run is gone, its size."""

    path: Path
    pid: int
    host: str | None  # None: this machine (a sibling named without a host)
    dead: bool
    bytes: int


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_siblings(folder: Path, tags: tuple[str, ...]) -> list[Sibling]:
    """The hidden siblings ``.NAME.<tag>[-host]-<pid>`` in ``folder`` for any of ``tags``,
    other than this process's own; ``dead`` when their process is gone from this machine."""
    folder = Path(folder)
    here = host_tag("")[1:]
    pattern = re.compile(
        rf"^\..+\.(?:{'|'.join(map(re.escape, tags))})(?:-(?P<host>[A-Za-z0-9_.]+))?-(?P<pid>\d+)$"
    )
    found = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    for path in entries:
        match = pattern.match(path.name)
        if not match:
            continue
        pid, host = int(match["pid"]), match["host"]
        if pid == os.getpid() and host in (None, here):
            continue
        dead = host in (None, here) and not _alive(pid)
        try:
            size = _size(path)
        except OSError:
            continue
        found.append(Sibling(path, pid, None if host in (None, here) else host, dead, size))
    return found


def remove_stale(siblings: list[Sibling]) -> list[Sibling]:
    """Remove the siblings whose process is gone; return those that were removed."""
    removed = []
    for sibling in siblings:
        if sibling.dead:
            _remove(sibling.path)
            if not sibling.path.exists():
                removed.append(sibling)
    return removed


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
