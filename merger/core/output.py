"""Where a child (or an MoE child, or an adapter) goes: ``--out``, safely.

- The output is never an input, never holds one and never lies inside one: ``--out`` set
  to a parent's folder (or its parent) is refused, with ``--overwrite`` or without.
- ``--overwrite`` replaces only what kruising wrote (a folder with our provenance file or a
  card tagged ``kruising``) or an empty folder; anything else is refused.
- The child is built in ``.NAME.kruising-tmp-HOST-PID`` beside it and moved into place in one
  step at the end: without ``--overwrite`` never over something that appeared meanwhile
  (another run to the same ``--out`` that finished first), with it swapped in one step.
- Hidden siblings that dead runs of this machine left (a SIGKILL, a power cut) are removed
  by the next run, with a note; those of live runs or other machines are named with their
  size, and counted when the free disk falls short.

`prepare` is called before any byte is written, `commit` at the very end.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from kruising.atomic import (
    Sibling,
    host_tag,
    publish_folder,
    remove_stale,
    replace_folder,
    stale_siblings,
    temp_sibling,
)
from kruising.console import console
from kruising.errors import KruisingError

TMP_TAG = "kruising-tmp"
OLD_TAG = "kruising-old"


def _mb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def check_not_an_input(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an ``out`` that is, contains or lies inside one of the input folders."""
    out = Path(out).expanduser().resolve()
    for folder in inputs:
        folder = Path(folder).expanduser().resolve()
        if out == folder:
            why = "is"
        elif _inside(folder, out):
            why = "contains"
        elif _inside(out, folder):
            why = "lies inside"
        else:
            continue
        raise KruisingError(
            f"--out {out} {why} the input model folder {folder}",
            "write the child to a folder of its own, outside every input "
            "(--overwrite would have deleted the input)",
        )


def is_replaceable(folder: Path) -> bool:
    """True for an empty folder or one kruising wrote (provenance file, or a kruising card)."""
    from merger.core.child import PROVENANCE_FILE
    from merger.share.card import is_kruising_card

    if not folder.is_dir() or folder.is_symlink():
        return False
    if not any(folder.iterdir()):
        return True
    return (folder / PROVENANCE_FILE).is_file() or is_kruising_card(folder / "README.md")


def _refuse_existing(out: Path, overwrite: bool, what: str) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise KruisingError(
            f"output folder {out} already exists", "choose another --out, or pass --overwrite"
        )
    if not is_replaceable(out):
        from merger.core.child import PROVENANCE_FILE

        kind = "a folder" if out.is_dir() and not out.is_symlink() else "not a folder"
        raise KruisingError(
            f"--overwrite refuses to replace {out}: it is {kind} that kruising did not write "
            f"(no {PROVENANCE_FILE}, no kruising model card)",
            f"--overwrite only replaces a {what} written by kruising, or an empty folder; "
            "choose another --out, or remove it yourself",
        )


def leftovers(parent: Path) -> list[Sibling]:
    """Hidden siblings of earlier runs in ``parent``; those of dead runs here are removed."""
    siblings = stale_siblings(parent, (TMP_TAG, OLD_TAG))
    removed = remove_stale(siblings)
    for sibling in removed:
        console.print(
            f"note: removed {sibling.path.name} ({_mb(sibling.bytes)}), left by a stopped "
            f"run (pid {sibling.pid})"
        )
    others = [s for s in siblings if s not in removed]
    for sibling in others:
        who = f"pid {sibling.pid}" + (f" on {sibling.host}" if sibling.host else "")
        console.print(
            f"note: {sibling.path.name} ({_mb(sibling.bytes)}) belongs to another run ({who}); "
            "left as it is"
        )
    return others


def check_disk(folder: Path, needed: int, held: list[Sibling] = ()) -> None:
    """Enough free space in ``folder`` for ``needed`` bytes (and a 64 MB margin)?"""
    free = shutil.disk_usage(folder).free
    if free < needed + 64 * 2**20:
        others = ""
        if held:
            total = sum(s.bytes for s in held)
            others = (
                f"; {len(held)} temporary folder{'s' if len(held) != 1 else ''} of other runs "
                f"hold {_mb(total)} there ({', '.join(s.path.name for s in held[:3])})"
            )
        raise KruisingError(
            f"not enough disk for the child in {folder}: it needs {_mb(needed)}, "
            f"{_mb(free)} is free{others}",
            "free some space or choose another --out",
        )


def prepare(
    out: Path,
    *,
    overwrite: bool,
    inputs: Iterable[Path] = (),
    needed: int | None = None,
    what: str = "child",
) -> Path:
    """Check ``out`` and the disk, clear dead runs' leftovers; make and return the temp folder."""
    out = Path(out).expanduser().resolve()
    check_not_an_input(out, inputs)
    _refuse_existing(out, overwrite, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    held = leftovers(out.parent)
    if needed is not None:
        check_disk(out.parent, needed, held)
    tmp = temp_sibling(out, host_tag(TMP_TAG))
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, out: Path, *, overwrite: bool, what: str = "child") -> None:
    """Move the finished ``tmp`` to ``out`` in one step; "exists" is checked again here.

    Raises `KruisingError` when ``out`` appeared meanwhile (without ``--overwrite``) or
    became something kruising may not replace; ``tmp`` is then the caller's to remove.
    """
    out = Path(out).expanduser().resolve()
    if not overwrite:
        try:
            publish_folder(tmp, out)
        except FileExistsError:
            raise KruisingError(
                f"output folder {out} appeared while this {what} was being written "
                "(another run to the same --out?); it was left as it is and this one discarded",
                "choose another --out, or pass --overwrite to replace it",
            ) from None
        return
    _refuse_existing(out, overwrite, what)
    replace_folder(tmp, out, old_tag=host_tag(OLD_TAG))
