"""Keep freed memory in the process for reuse, instead of handing it back to the kernel.

glibc's malloc serves every block above its mmap threshold (at most 32 MB) with a fresh
``mmap`` and returns it with ``munmap`` when freed. A CPU training step allocates and frees the
same large tensors (logits, their gradients) every step, so each step faults in and zeroes
hundreds of MB of new pages: on the tiny family's default member, 137,000 minor page faults and
0.36 s of system time per step beside 0.38 s of user time, twice the CPU a step needs, and more
wall time still on a busy virtual machine, where page faults are dearer. Served from the heap
and kept there, the freed blocks are reused: 4,000 faults and 0.007 s of system time per step
(README, "The build on a busy machine"). The price is a higher resident set (the heap keeps its
high-water mark and fragments: 1.2 GB against 0.48 GB for that member), so only CPU training uses
it (`pretrain run` on a CPU, the family build), and gives the memory back when it ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator

#: glibc's mallopt parameters (malloc.h) and their defaults
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
#: free memory at the top of the heap kept before malloc trims it (mallopt takes a C int)
KEEP_TRIM_THRESHOLD = 2**31 - 1


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # musl, macOS: their malloc is left as it is
    return libc


_depth = 0  # nesting: the family build keeps memory around each member's `pretrain run`
_applied = False


@contextlib.contextmanager
def kept_freed_memory() -> Iterator[bool]:
    """Inside: large blocks come from the heap, which is never trimmed (yields whether that
    applied: False off glibc). When the outermost one exits, glibc's defaults are back and the
    kept memory is returned to the kernel (``malloc_trim``)."""
    global _depth, _applied
    libc = _glibc()
    if _depth == 0:
        _applied = (
            libc is not None
            and bool(libc.mallopt(M_MMAP_MAX, 0))
            and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD))
        )
    _depth += 1
    try:
        yield _applied
    finally:
        _depth -= 1
        if _depth == 0 and libc is not None:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)
