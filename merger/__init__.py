"""kruising's merger: recipes -> plan -> streamed tensor merges -> child folders."""

import os

# Large CPU tensors on transparent huge pages: the torch reference path and the in-memory
# (sweep) merges allocate a fresh output per tensor, and faulting those in 4 KiB at a time
# cost more kernel time than the merge math.
# Read by torch when it is first imported, so set here, before any merger module imports it.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
