"""Device names as the CLIs take them: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; CPU threads.

A GPU asked for but absent is an error, never a silent CPU run. torch is imported only when a
name is resolved or threads are set.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from kruising.errors import KruisingError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str, *, error: type[KruisingError] = KruisingError) -> torch.device:
    """auto -> cuda:0 when a GPU is present, else cpu. Asking for cuda without one is an error."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise error(f"unknown device {name!r}", "use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise error(
                f"device {name} was asked for, but no CUDA GPU is available",
                "use --device cpu (or auto), or install a CUDA build of torch on a GPU machine",
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise error(
                f"device {name}: only {torch.cuda.device_count()} GPU(s) present",
                "pick an index below the GPU count",
            )
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise error(f"device {name} is not supported", "use auto, cpu or cuda[:N]")
    return device


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` inside the block, restored after it."""
    import torch

    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def cpu_threads_for(model):
    """Run a small model on CPU with one thread: thread hand-offs cost more than its matmuls.

    That includes the [positions, hidden] x [hidden, 32k] vocabulary projection: on two cores it
    runs 1.8x faster on two threads when the other core is idle, but 3-5x slower when another
    process keeps that core busy, so it stays on one too.
    """
    small = getattr(model.config, "hidden_size", 4096) <= 256
    on_cpu = next(model.parameters()).device.type == "cpu"
    if not (on_cpu and small):
        yield
        return
    with torch_threads(1):
        yield
