"""Small helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path


def load_tensors(folder: Path) -> dict:
    """Every tensor of a checkpoint folder, from all its safetensors shards."""
    from safetensors.torch import load_file

    tensors: dict = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors
