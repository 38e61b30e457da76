"""The only module of the merger that opens shard files.

Reading: a model reference (local folder or Hub id) becomes a `ModelSource` that knows every
tensor's shard, dtype, shape and byte range from the safetensors headers alone, and maps one
tensor at a time from the page cache (zero-copy; released after use).

Writing: `ShardWriter` lays out all output shards before the first byte is written (shapes
and dtypes are known from the plan), writes each header first and then each tensor's bytes
as soon as it is computed, so no output shard is ever held in memory.

A merged tensor goes to an `Output`, with explicit calls::

    for start, end in out.spans():        # element ranges, in order
        view = out.buffer(start, end)     # a flat tensor of out.dtype to compute into
        ...                               # compute elements [start, end) into view
        out.write(start, end)             # the filled buffer goes to the disk (queued)
    out.commit()                          # all spans written: the tensor is complete

`ShardOutput` is a tensor's place in the shards (`ShardWriter.output(name)`); `MemoryOutput`
is a tensor in memory (one span, nothing to write).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import queue
import re
import struct
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

from kruising.env import switched_off
from kruising.errors import KruisingError
from kruising.hub import resolve_model

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
#: The files of a tokenizer in a checkpoint folder (what a child copies, what a Hub fetch takes).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
HUB_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    *TOKENIZER_FILES,
    "README.md",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard file, dtype, shape and byte range in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check it as the safetensors library does, and more.

    Every tensor's byte range must match its dtype and shape, lie in the data section (never
    in the header), and the ranges must tile the data section: no overlaps, no gaps, nothing
    after the last tensor. A damaged or hostile header is one `KruisingError` naming the file
    and the tensor, before any byte is merged.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, 100_000_000):
                raise ValueError(f"header length {header_len} exceeds the file")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: [[[[...]]]]
        raise KruisingError(
            f"corrupt safetensors shard {path}: {type(exc).__name__ if isinstance(exc, RecursionError) else exc}",
            "re-download or re-save this checkpoint; the file is truncated or not safetensors",
        ) from None
    data_start = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = (_exact_int(x) for x in entry["data_offsets"])
            shape = tuple(_exact_int(x) for x in entry["shape"])
            if begin < 0 or end < begin or any(d < 0 for d in shape):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise KruisingError(
                f"corrupt safetensors shard {path}: bad header entry for {name}: "
                f"{json.dumps(entry)[:120]}",
                "re-download or re-save this checkpoint",
            ) from None
        expected = _numel(shape) * dtype.itemsize
        if end - begin != expected:
            raise KruisingError(
                f"corrupt safetensors shard {path}: tensor {name} is {entry['dtype']} "
                f"{list(shape)} ({expected} bytes) but its data_offsets span {end - begin} bytes",
                "the header does not match the data; re-download or re-save this checkpoint",
            )
        if data_start + end > size:
            raise KruisingError(
                f"truncated or corrupt safetensors shard {path}: tensor {name} "
                f"needs bytes {begin}..{end} of the data section, the file has "
                f"{max(0, size - data_start)}",
                "the download or copy was cut short; fetch the shard again",
            )
        infos[name] = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
    _check_tiling(path, infos, data_start, size)
    return infos


def _exact_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(value)
    return value


def _check_tiling(path: Path, infos: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """The byte ranges tile the data section: each tensor starts where the one before ends."""
    at, previous = data_start, None
    for name, info in sorted(infos.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != at:
            what = (
                f"overlaps {previous}"
                if info.begin < at
                else f"starts {info.begin - at} bytes after the end of "
                + (previous or "the header")
            )
            raise KruisingError(
                f"corrupt safetensors shard {path}: tensor {name} {what} "
                f"(data_offsets {info.begin - data_start}..{info.end - data_start})",
                "a damaged or hand-edited header; re-download or re-save this checkpoint "
                "(the safetensors library refuses this file too)",
            )
        at, previous = info.end, name
    if at != size:
        raise KruisingError(
            f"corrupt safetensors shard {path}: {size - at} bytes after the last tensor "
            f"({previous or 'the header'})",
            "a damaged or hand-edited file; re-download or re-save this checkpoint "
            "(the safetensors library refuses this file too)",
        )


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class ModelSource:
    """One input checkpoint: where it is, its config, and where each tensor lives."""

    ref: str
    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    pickle_files: list[Path] = field(default_factory=list)
    _maps: dict[Path, mmap.mmap] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _pickled: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` on the CPU: a zero-copy view of its bytes in the memory-mapped shard.

        The page cache is mapped, not copied (a copy of every input into fresh buffers costs
        more than the merge math). Call `release` when done, so the mapped pages leave this
        process's resident set: peak memory then stays at the tensors in flight.
        """
        if name in self._pickled:
            return self._pickled[name]
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        mapping = self._maps.get(info.file)
        if mapping is None:
            with self._lock:
                mapping = self._maps.get(info.file)
                if mapping is None:
                    with open(info.file, "rb") as f:
                        # copy-on-write: torch wants a writable buffer; nothing writes to it
                        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                    self._maps[info.file] = mapping
        raw = torch.frombuffer(mapping, dtype=torch.uint8, count=info.nbytes, offset=info.begin)
        return raw.view(info.dtype).reshape(info.shape)

    def prefetch(self, name: str) -> None:
        """Map the tensor's pages now (from a reader thread, ahead of the math): one
        MADV_POPULATE_READ where the kernel has it (5.14+), else a touch of every page."""
        info = self.tensors.get(name)
        if name in self._pickled or info is None or not info.nbytes:
            return
        raw = self.read(name).reshape(-1).view(torch.uint8)
        mapping = self._maps.get(info.file)
        if mapping is not None and _populate_read(mapping, info.begin, info.end):
            return
        raw[:: mmap.PAGESIZE].sum()

    def release(self, name: str) -> None:
        """Drop the tensor's mapped pages from this process (they stay in the page cache)."""
        info = self.tensors.get(name)
        mapping = self._maps.get(info.file) if info is not None else None
        if mapping is None or info.nbytes == 0:
            return
        start = info.begin - info.begin % mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, start, info.end - start)

    def close(self) -> None:
        for mapping in self._maps.values():
            try:
                mapping.close()
            except BufferError:  # a tensor still views it; it closes when that is freed
                pass
        self._maps.clear()


def resolve_model_path(ref: str, *, allow_pickle: bool = False) -> Path:
    """A local folder for a model reference: the folder itself, or a Hub snapshot of its
    safetensors, config and tokenizer files (and pickles with ``allow_pickle``)."""
    patterns = HUB_PATTERNS + (["*.bin", "*.bin.index.json"] if allow_pickle else [])
    path = resolve_model(ref, allow_patterns=patterns)
    if path is None:
        raise KruisingError(
            f"model folder not found: {ref}",
            "check the path in the recipe (relative paths are relative to the current "
            "directory), or use a Hub id like org/name",
        )
    return path


def open_model(ref: str, *, allow_pickle: bool = False) -> ModelSource:
    """Open a model reference: read its config and the headers of all its shards."""
    path = resolve_model_path(ref, allow_pickle=allow_pickle)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise KruisingError(
            f"model {ref} has no config.json in {path}",
            "a checkpoint folder is what save_pretrained writes: config.json + shards",
        )
    config = read_config(config_file)
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            tensors.update(read_safetensors_header(shard))
        index = path / "model.safetensors.index.json"
        if index.is_file():
            _check_index(index, tensors, path)
        return ModelSource(ref, path, config, tensors)
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise KruisingError(
            f"model {ref} has no weight files (*.safetensors) in {path}",
            "save the model with save_pretrained(safe_serialization=True)",
        )
    if not allow_pickle:
        raise KruisingError(
            f"model {ref} has only pickle checkpoints ({pickles[0].name}); refusing to load them",
            "pickle files can run code when loaded: convert to safetensors, or pass "
            "--allow-pickle to load them with torch.load(weights_only=True)",
        )
    return _open_pickled(ref, path, config, pickles)


#: config.json fields the merger reads as sizes: whole numbers when present
CONFIG_SIZES = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def read_config(config_file: Path) -> dict[str, Any]:
    """A checkpoint's config.json as a dict: UTF-8 JSON, an object, its sizes whole numbers."""
    hint = "fix or re-save it (save_pretrained writes a UTF-8 JSON object)"
    try:
        config = json.loads(config_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise KruisingError(f"{config_file}: not UTF-8 text ({exc.reason})", hint) from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise KruisingError(f"{config_file}: invalid JSON ({exc})", hint) from None
    except OSError as exc:
        raise KruisingError(f"cannot read {config_file}: {exc.strerror or exc}", hint) from None
    if not isinstance(config, dict):
        raise KruisingError(
            f"{config_file}: a JSON {type(config).__name__}, not an object of settings", hint
        )
    for key in CONFIG_SIZES:
        value = config.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise KruisingError(
                f"{config_file}: {key} must be a whole number, got {json.dumps(value)[:60]}",
                hint,
            )
    return config


def _check_index(index: Path, tensors: dict[str, TensorInfo], folder: Path) -> None:
    try:
        weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"weight_map is a {type(weight_map).__name__}")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise KruisingError(f"{index}: not a safetensors index ({exc})", "re-save") from None
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        shard = weight_map[missing[0]]
        raise KruisingError(
            f"{index} lists {len(missing)} tensors not found in any shard of {folder}, "
            f"e.g. {missing[0]} (in {shard})",
            "a shard is missing or incomplete: fetch the checkpoint again",
        )


def _open_pickled(ref: str, path: Path, config: dict, files: list[Path]) -> ModelSource:
    source = ModelSource(ref, path, config, {}, pickle_files=files)
    for file in files:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise KruisingError(
                f"could not load pickle checkpoint {file}: {exc}",
                "it may hold more than tensors; convert it to safetensors",
            ) from None
        for name, tensor in state.items():
            source._pickled[name] = tensor
            nbytes = tensor.numel() * tensor.element_size()
            source.tensors[name] = TensorInfo(file, tensor.dtype, tuple(tensor.shape), 0, nbytes)
    return source


# --- writing ------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise KruisingError(f"cannot read size {text!r}", "write it like 5GB, 500MB or 2GiB")
    number = float(match.group(1))
    unit = (match.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    scale.update({"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40})
    return int(number * scale[unit])


_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)
_populate_works = True


def _populate_read(mapping: mmap.mmap, begin: int, end: int) -> bool:
    global _populate_works
    if not _populate_works or _POPULATE_READ is None:
        return False
    start = begin - begin % mmap.PAGESIZE
    try:
        mapping.madvise(_POPULATE_READ, start, end - start)
        return True
    except OSError:  # an older kernel: EINVAL
        _populate_works = False
        return False


@dataclass
class _Shard:
    file_name: str
    entries: list[tuple[str, torch.dtype, tuple[int, ...], int, int]]  # name, dtype, shape, b, e

    def file_size(self, header: bytes) -> int:
        return len(header) + (self.entries[-1][4] if self.entries else 0)

    def header_bytes(self) -> bytes:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        for name, dtype, shape, begin, end in self.entries:
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [begin, end],
            }
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw


#: O_DIRECT writes go in whole blocks of this many bytes, from buffers aligned to it
ALIGN = 4096
#: bytes per staging buffer: a worker computes a tensor segment by segment into these
SEGMENT_BYTES = 8 << 20


def _nothing() -> None:
    pass


def _down(offset: int) -> int:
    return offset - offset % ALIGN


def _up(offset: int) -> int:
    return _down(offset + ALIGN - 1)


class _Pool:
    """Page-aligned staging buffers, reused so their pages stay mapped and warm."""

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self._free: list[mmap.mmap] = []
        self._made = 0
        self._limit = count
        self._cond = threading.Condition()

    def acquire(self, failed: threading.Event) -> mmap.mmap:
        with self._cond:
            while not self._free and self._made >= self._limit:
                if failed.is_set():
                    raise OSError("the shard writer stopped")
                self._cond.wait(0.1)
            if self._free:
                return self._free.pop()
            self._made += 1
        return mmap.mmap(-1, self.size)

    def release(self, buffer: mmap.mmap) -> None:
        with self._cond:
            self._free.append(buffer)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            for buffer in self._free:
                try:
                    buffer.close()
                except BufferError:  # a caller still holds a view; freed with it
                    pass
            self._free.clear()


class _DirectShard:
    """One shard file written with O_DIRECT: no page cache to fill, nothing left to flush.

    Whole aligned blocks go straight from a staging buffer to the file; the bytes of a block
    that several tensors (or the header) share are gathered in `partial` until the block is
    complete. The last block is written whole and the file truncated to its size at the end.
    """

    def __init__(self, path: Path, size: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(path, flags | os.O_DIRECT, 0o644)
        try:  # some file systems open with O_DIRECT but refuse 4 KiB-aligned writes
            os.pwrite(self.fd, mmap.mmap(-1, ALIGN), 0)
        except OSError:
            os.close(self.fd)
            raise
        self.size = size
        self.partial: dict[int, list] = {}  # block offset -> [aligned buffer, bytes in it]
        self.lock = threading.Lock()

    def gather(self, offset: int, data: memoryview) -> list[tuple[int, mmap.mmap]]:
        """Add bytes at ``offset`` (within blocks); return the blocks that are now complete."""
        complete = []
        with self.lock:
            while len(data):
                block = _down(offset)
                take = min(len(data), block + ALIGN - offset)
                entry = self.partial.get(block)
                if entry is None:
                    entry = self.partial[block] = [mmap.mmap(-1, ALIGN), 0]
                entry[0][offset - block : offset - block + take] = data[:take]
                entry[1] += take
                if entry[1] == min(ALIGN, self.size - block):
                    complete.append((block, self.partial.pop(block)[0]))
                offset += take
                data = data[take:]
        return complete


def _preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes for a file that will be written through a memory map.

    A store into a mapped page the disk has no room for kills the process with SIGBUS (no
    message, the temp folder left behind); reserved up front, a full disk is an `OSError`
    (ENOSPC) before any byte is written. File systems without fallocate go unreserved.
    """
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise


class ShardWriter:
    """Output shards laid out up front (names, dtypes, shapes from the plan).

    A tensor is produced through `output(name)` (a `ShardOutput`): the merge computes it span
    by span into the buffers the output hands out, and each filled span is written (by
    `ShardOutput.write`) while the next is computed. Two ways to the disk:

    - direct (where the file system takes O_DIRECT and all tensors share one element size):
      segments are staged in a few reused, aligned buffers and a writer thread writes them
      with O_DIRECT. The child does not pass through the page cache, so a merge costs no
      page-cache allocation and no final flush, and its memory stays a few staging buffers.
    - mapped (elsewhere): each shard is created at its final size and memory-mapped; the one
      span of a tensor is its bytes in the mapped file (so `write` has nothing left to do).

    `finish` writes what is left, fsyncs every shard and writes the index.
    """

    def __init__(
        self,
        folder: Path,
        layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int,
        *,
        workers: int = 1,
        direct: bool | None = None,
    ) -> None:
        self.folder = folder
        self._workers = max(1, workers)
        self.shards: list[_Shard] = []
        current: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []
        offset = 0
        for name, dtype, shape in layout:
            nbytes = _numel(shape) * dtype.itemsize
            if current and offset + nbytes > max_shard_bytes:
                self.shards.append(_Shard("", current))
                current, offset = [], 0
            current.append((name, dtype, shape, offset, offset + nbytes))
            offset += nbytes
        if current or not self.shards:
            self.shards.append(_Shard("", current))
        n = len(self.shards)
        self._where: dict[str, tuple[int, torch.dtype, tuple[int, ...], int, int]] = {}
        self._written: set[str] = set()
        headers = []
        for i, shard in enumerate(self.shards):
            shard.file_name = (
                "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            )
            header = shard.header_bytes()
            headers.append(header)
            for name, dtype, shape, begin, end in shard.entries:
                self._where[name] = (i, dtype, shape, len(header) + begin, len(header) + end)
        self.total_bytes = sum(e[4] - e[3] for s in self.shards for e in s.entries)
        item_sizes = {dtype.itemsize for _, dtype, _ in layout}
        if direct is None:
            direct = not switched_off("KRUISING_DIRECT_IO")
        self.direct = direct and hasattr(os, "O_DIRECT") and len(item_sizes) <= 1
        self._maps: list[mmap.mmap | None] = []
        self._files: list[_DirectShard] = []
        if self.direct:
            try:
                self._open_direct(headers)
            except OSError:  # e.g. tmpfs: no O_DIRECT
                for shard in self._files:
                    os.close(shard.fd)
                self._files = []
                self.direct = False
        if not self.direct:
            self._open_mapped(headers)

    # --- the two ways to the disk -------------------------------------------------------

    def _open_direct(self, headers: list[bytes]) -> None:
        for shard, header in zip(self.shards, headers, strict=True):
            self._files.append(_DirectShard(self.folder / shard.file_name, shard.file_size(header)))
        self._pool = _Pool(count=2 * self._workers + 2, size=SEGMENT_BYTES)
        self._queue: queue.Queue = queue.Queue()
        self._failed = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write_loop, daemon=True, name="writer")
        self._thread.start()
        for index, header in enumerate(headers):
            self._blocks(index, self._files[index].gather(0, memoryview(header)))

    def _open_mapped(self, headers: list[bytes]) -> None:
        for shard, header in zip(self.shards, headers, strict=True):
            size = shard.file_size(header)
            with open(self.folder / shard.file_name, "wb+") as f:
                _preallocate(f.fileno(), size)  # a full disk: ENOSPC here, not SIGBUS later
                f.write(header)
                f.truncate(size)
                f.flush()
                mapped = mmap.mmap(f.fileno(), size) if size > len(header) else None
            self._maps.append(mapped)

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            fd, view, offset, done = job
            try:
                if not self._failed.is_set():
                    written = os.pwrite(fd, view, offset)
                    if written != len(view):
                        raise OSError(f"short write: {written} of {len(view)} bytes")
            except BaseException as exc:  # raised again in the merging threads
                self._error = exc
                self._failed.set()
            finally:
                view.release()
                done()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _blocks(self, index: int, blocks: list[tuple[int, mmap.mmap]]) -> None:
        fd = self._files[index].fd
        for offset, buffer in blocks:
            self._queue.put((fd, memoryview(buffer), offset, _nothing))

    # --- producing tensors --------------------------------------------------------------

    def output(self, name: str) -> ShardOutput:
        """Where tensor ``name`` goes: spans to compute into and write (see `ShardOutput`)."""
        return ShardOutput(self, name)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store a tensor computed elsewhere (e.g. on a GPU); it must match the layout."""
        _, dtype, shape, _, _ = self._where[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"writer expected {name} {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}"
            )
        out = self.output(name)
        try:
            write_tensor(out, tensor)
        except BaseException:
            out.release()
            raise
        out.commit()

    def finish(self) -> None:
        """Write what is left, fsync every shard; write the index (for more than one)."""
        missing = [name for name in self._where if name not in self._written]
        if missing:
            raise RuntimeError(f"writer finished before {missing[0]}")
        if self.direct:
            self._queue.put(None)
            self._thread.join()
            self._check()
            for shard in self._files:
                if shard.partial:
                    raise RuntimeError(f"{len(shard.partial)} output blocks never completed")
                os.ftruncate(shard.fd, shard.size)
                os.fsync(shard.fd)
                os.close(shard.fd)
            self._files = []
            self._pool.close()
        for shard, mapped in zip(self.shards, self._maps, strict=False):
            if mapped is not None:
                mapped.flush()
                try:
                    mapped.close()
                except BufferError:  # a finished tensor still views it; closed when freed
                    pass
            with open(self.folder / shard.file_name, "rb+") as f:
                os.fsync(f.fileno())
        self._maps = [None] * len(self._maps)
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {e[0]: s.file_name for s in self.shards for e in s.entries},
            }
            (self.folder / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n"
            )

    def abort(self) -> None:
        if self.direct and self._files:
            self._failed.set()
            self._queue.put(None)
            self._thread.join()
            for shard in self._files:
                os.close(shard.fd)
            self._files = []
            self._pool.close()
        for mapped in self._maps:
            if mapped is not None:
                try:
                    mapped.close()
                except BufferError:
                    pass
        self._maps = [None] * len(self._maps)


class Output(Protocol):
    """Where one merged tensor goes (see the module docstring for the calls, in order)."""

    dtype: torch.dtype
    numel: int

    def spans(self) -> list[tuple[int, int]]:
        """The element ranges ``[start, end)`` to compute, in order, covering the tensor."""
        ...

    def buffer(self, start: int, end: int) -> torch.Tensor:
        """A flat tensor of ``dtype`` to compute elements ``[start, end)`` into."""
        ...

    def write(self, start: int, end: int) -> None:
        """The buffer of ``[start, end)`` is filled: write it."""
        ...

    def release(self) -> None:
        """After a failure: give back a buffer taken but not written."""
        ...

    def commit(self) -> None:
        """Every span is written: the tensor is complete."""
        ...

    def in_memory(self) -> torch.Tensor | None:
        """The flat tensor, when the output is one in memory; None for a shard."""
        ...


class MemoryOutput:
    """An `Output` that is a flat tensor in memory: one span, nothing to write."""

    def __init__(self, tensor: torch.Tensor) -> None:
        if not tensor.is_contiguous():
            raise ValueError("a memory output is a contiguous tensor")
        self.tensor = tensor.reshape(-1)
        self.dtype = tensor.dtype
        self.numel = tensor.numel()

    def spans(self) -> list[tuple[int, int]]:
        return [(0, self.numel)]

    def buffer(self, start: int, end: int) -> torch.Tensor:
        return self.tensor[start:end]

    def write(self, start: int, end: int) -> None:
        pass  # the buffer is the tensor

    def release(self) -> None:
        pass

    def commit(self) -> None:
        pass

    def in_memory(self) -> torch.Tensor:
        return self.tensor


class ShardOutput:
    """An `Output` that is one tensor's bytes in the shards of a `ShardWriter`.

    Direct writer: each span is at most `SEGMENT_BYTES`, computed into a pooled aligned
    staging buffer; `write` copies the bytes of the blocks it shares with neighbours aside
    and queues the whole blocks for the writer thread (which gives the buffer back once
    written). Mapped writer: one span, the tensor's bytes in the mapped shard.
    """

    def __init__(self, writer: ShardWriter, name: str) -> None:
        self.writer = writer
        self.name = name
        self._index, self.dtype, self.shape, self._begin, self._end = writer._where[name]
        self.numel = _numel(self.shape)
        self._held: tuple[int, int, mmap.mmap] | None = None  # byte range, staging buffer

    def _bytes(self, start: int, end: int) -> tuple[int, int]:
        size = self.dtype.itemsize
        return self._begin + start * size, self._begin + end * size

    def spans(self) -> list[tuple[int, int]]:
        size = self.dtype.itemsize
        if self._end == self._begin:
            return []
        if not self.writer.direct:
            return [(0, self.numel)]
        spans = []
        a = self._begin
        while a < self._end:
            b = min(self._end, _down(a) + SEGMENT_BYTES)
            spans.append(((a - self._begin) // size, (b - self._begin) // size))
            a = b
        return spans

    def buffer(self, start: int, end: int) -> torch.Tensor:
        a, b = self._bytes(start, end)
        writer = self.writer
        if not writer.direct:
            mapped = writer._maps[self._index]
            return torch.frombuffer(mapped, dtype=torch.uint8, count=b - a, offset=a).view(
                self.dtype
            )
        if self._held is not None:
            raise RuntimeError(f"{self.name}: a buffer is taken and not yet written")
        writer._check()
        staging = writer._pool.acquire(writer._failed)
        self._held = (a, b, staging)
        raw = torch.frombuffer(staging, dtype=torch.uint8, count=b - a, offset=a - _down(a))
        return raw.view(self.dtype)

    def write(self, start: int, end: int) -> None:
        writer = self.writer
        if not writer.direct:
            return  # computed in place, in the mapped shard
        a, b = self._bytes(start, end)
        if self._held is None or self._held[:2] != (a, b):
            raise RuntimeError(f"{self.name}: write of [{start}, {end}) without its buffer")
        staging = self._held[2]
        self._held = None
        shard = writer._files[self._index]
        lead = a - _down(a)
        view = memoryview(staging)
        # the shared first and last blocks are copied out before the buffer can go back
        complete = shard.gather(a, view[lead : lead + min(b, _up(a)) - a])
        if b % ALIGN and _down(b) >= _up(a):
            tail = _down(b)
            complete += shard.gather(tail, view[tail - _down(a) : b - _down(a)])
        inner_start, inner_end = _up(a), _down(b)
        if inner_end > inner_start:
            inner = view[inner_start - _down(a) : inner_end - _down(a)]
            release = partial(writer._pool.release, staging)
            writer._queue.put((shard.fd, inner, inner_start, release))
        else:
            writer._pool.release(staging)
        del view
        writer._blocks(self._index, complete)

    def release(self) -> None:
        if self._held is not None:
            self.writer._pool.release(self._held[2])
            self._held = None

    def commit(self) -> None:
        """Mark the tensor complete (mapped: its pages leave this process; they stay cached)."""
        writer = self.writer
        writer._written.add(self.name)
        mapped = writer._maps[self._index] if writer._maps else None
        if mapped is not None and self._end > self._begin:
            start = self._begin - self._begin % mmap.PAGESIZE
            mapped.madvise(mmap.MADV_DONTNEED, start, self._end - start)

    def in_memory(self) -> None:
        return None


def write_tensor(out: Output, tensor: torch.Tensor) -> None:
    """Copy a finished tensor into ``out``, span by span (the caller commits)."""
    flat = tensor.detach().reshape(-1)
    for start, end in out.spans():
        out.buffer(start, end).copy_(flat[start:end])
        out.write(start, end)
