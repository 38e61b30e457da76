"""kruising.malloc: inside kept_freed_memory a freed large block is reused, not faulted in
again; outside it glibc's defaults are back."""

import subprocess
import sys

import pytest

PROBE = """
import ctypes, resource
from kruising.malloc import kept_freed_memory

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 64 << 20


def faults():
    for _ in range(2):  # warm-up: the heap grows to the block's size once
        p = libc.malloc(SIZE); ctypes.memset(p, 1, SIZE); libc.free(p)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):  # a 64 MB block allocated, written and freed ten times
        p = libc.malloc(SIZE); ctypes.memset(p, 1, SIZE); libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


plain = faults()
with kept_freed_memory() as applied:
    with kept_freed_memory():  # nested (the family build around pretrain run): one setting
        pass
    kept = faults()  # still kept after the inner one ended
after = faults()
print(applied, plain, kept, after)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_freed_blocks_are_reused_inside_and_returned_after():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    applied, plain, kept, after = out.stdout.split()
    plain, kept, after = int(plain), int(kept), int(after)
    assert applied == "True"
    # glibc's default: each block a fresh mmap, 16,384 pages faulted in per allocation (fewer
    # with transparent huge pages); kept on the heap the same pages serve every allocation
    assert plain > 10 * 2048, plain
    assert kept < plain / 20, (plain, kept)
    assert after > plain / 2, (plain, after)  # the defaults are back: mmap per block again
