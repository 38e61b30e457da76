"""Output shards: both ways to the disk write the same valid safetensors files."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from merger.core import io
from merger.core.io import ShardWriter


def _layout(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors of awkward sizes: block boundaries fall inside tensors and headers."""
    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (3, 5), "b.weight": (1_000_003,), "c.weight": (777, 13), "d.bias": (1,)}
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}


def _write(folder, tensors, *, direct, max_shard=1 << 40, segment_bytes=None, monkeypatch=None):
    if segment_bytes is not None:
        monkeypatch.setattr(io, "SEGMENT_BYTES", segment_bytes)
    layout = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    folder.mkdir()
    writer = ShardWriter(folder, layout, max_shard, workers=2, direct=direct)
    threads = [
        threading.Thread(target=writer.write, args=(name, tensor))
        for name, tensor in reversed(list(tensors.items()))  # out of file order, at once
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.finish()
    return writer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("max_shard", [1 << 40, 1_000_000])
def test_direct_and_mapped_files_are_identical(tmp_path, monkeypatch, dtype, max_shard):
    tensors = _layout(dtype)
    direct = _write(
        tmp_path / "direct",
        tensors,
        direct=True,
        max_shard=max_shard,
        segment_bytes=64 << 10,  # many segments per tensor
        monkeypatch=monkeypatch,
    )
    _write(tmp_path / "mapped", tensors, direct=False, max_shard=max_shard)
    names = sorted(p.name for p in (tmp_path / "direct").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "mapped").iterdir())
    for name in names:
        assert (tmp_path / "direct" / name).read_bytes() == (
            tmp_path / "mapped" / name
        ).read_bytes()
    loaded = {}
    for shard in (tmp_path / "direct").glob("*.safetensors"):
        loaded |= load_file(shard)
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
    if max_shard < 1 << 40:
        index = json.loads((tmp_path / "direct" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    assert direct.direct  # this file system takes O_DIRECT (ext4, xfs, btrfs do)


def test_mixed_element_sizes_use_the_mapped_way(tmp_path):
    layout = [("a", torch.float32, (3,)), ("b", torch.bfloat16, (5,))]
    (tmp_path / "out").mkdir()
    writer = ShardWriter(tmp_path / "out", layout, 1 << 40)
    assert not writer.direct
    writer.abort()


def test_a_failed_write_reaches_the_merging_thread(tmp_path, monkeypatch):
    tensors = {"big": torch.ones(3_000_000, dtype=torch.bfloat16)}
    monkeypatch.setattr(io, "SEGMENT_BYTES", 64 << 10)
    (tmp_path / "out").mkdir()
    writer = ShardWriter(tmp_path / "out", [("big", torch.bfloat16, (3_000_000,))], 1 << 40)

    def broken(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "pwrite", broken)
    with pytest.raises(OSError, match="No space left"):
        writer.write("big", tensors["big"])
        writer.finish()
    writer.abort()


def test_no_o_direct_falls_back_to_the_mapped_way(tmp_path, monkeypatch):
    real_open = io.os.open

    def no_direct(path, flags, *args):
        if flags & io.os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(io.os, "open", no_direct)
    tensors = _layout(torch.bfloat16)
    writer = _write(tmp_path / "out", tensors, direct=True)
    assert not writer.direct
    assert torch.equal(
        load_file(tmp_path / "out" / "model.safetensors")["c.weight"], tensors["c.weight"]
    )


def test_a_shard_smaller_than_one_block(tmp_path):
    tensors = {"a.weight": torch.arange(15.0).reshape(3, 5), "d.bias": torch.tensor([7.0])}
    writer = _write(tmp_path / "out", tensors, direct=True)
    assert writer.direct
    shard = tmp_path / "out" / "model.safetensors"
    assert shard.stat().st_size < io.ALIGN
    loaded = load_file(shard)
    assert torch.equal(loaded["a.weight"], tensors["a.weight"])
    assert torch.equal(loaded["d.bias"], tensors["d.bias"])
