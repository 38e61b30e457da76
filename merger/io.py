"""The only module of the merger that opens shard files.

Reading: a model reference (local folder or Hub id) becomes a `ModelSource` that knows every
tensor's shard, dtype, shape and byte range from the safetensors headers alone, and maps one
tensor at a time from the page cache (zero-copy; released after use).

Writing: `ShardWriter` lays out all output shards before the first byte is written (shapes
and dtypes are known from the plan), writes each header first and then each tensor's bytes
as soon as it is computed, so no output shard is ever held in memory.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merger.errors import KruisingError

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
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
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
    """Parse a safetensors header and check that every byte range lies inside the file."""
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
    except (OSError, ValueError) as exc:
        raise KruisingError(
            f"corrupt safetensors shard {path}: {exc}",
            "re-download or re-save this checkpoint; the file is truncated or not safetensors",
        ) from None
    data_start = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(x) for x in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise KruisingError(
                f"corrupt safetensors shard {path}: bad header entry for {name}",
                "re-download or re-save this checkpoint",
            ) from None
        expected = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected or data_start + end > size:
            raise KruisingError(
                f"truncated or corrupt safetensors shard {path}: tensor {name} "
                f"needs bytes {begin}..{end} of the data section, the file has "
                f"{max(0, size - data_start)}",
                "the download or copy was cut short; fetch the shard again",
            )
        infos[name] = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
    return infos


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
        """Fault the tensor's pages in now (from a reader thread, ahead of the math)."""
        if name in self._pickled or not self.tensors[name].nbytes:
            return
        raw = self.read(name).reshape(-1).view(torch.uint8)
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
    """A local folder for a model reference: the folder itself, or a Hub snapshot."""
    name, _, revision = ref.partition("@")
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise KruisingError(
                f"model {ref} is a file, not a checkpoint folder",
                "point the recipe at the folder that holds config.json and the shards",
            )
        return local
    if name.startswith((".", "/", "~")) or not HUB_ID.match(name):
        raise KruisingError(
            f"model folder not found: {ref}",
            "check the path in the recipe (relative paths are relative to the current "
            "directory), or use a Hub id like org/name",
        )
    return download_from_hub(name, revision or None, allow_pickle=allow_pickle)


def download_from_hub(repo_id: str, revision: str | None, *, allow_pickle: bool) -> Path:
    """Fetch safetensors, config and tokenizer files of a Hub model (nothing else)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = HUB_PATTERNS + (["*.bin", "*.bin.index.json"] if allow_pickle else [])
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline
        )
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise KruisingError(
            f"Hub model {repo_id} not found or not accessible ({type(exc).__name__})",
            "check the id, or log in with `hf auth login` for gated/private repos",
        ) from None
    except RevisionNotFoundError:
        raise KruisingError(
            f"Hub model {repo_id} has no revision {revision}", "check the @revision"
        ) from None
    except LocalEntryNotFoundError:
        raise KruisingError(
            f"Hub model {repo_id} is not in the local cache and the Hub cannot be reached",
            "connect to the network, or download it elsewhere and use a local folder",
        ) from None
    except Exception as exc:  # network errors come in many types
        raise KruisingError(
            f"could not fetch Hub model {repo_id}: {type(exc).__name__}: {exc}",
            "check the network (or set HF_HUB_OFFLINE=1 to use only the local cache)",
        ) from None
    return Path(path)


def open_model(ref: str, *, allow_pickle: bool = False) -> ModelSource:
    """Open a model reference: read its config and the headers of all its shards."""
    path = resolve_model_path(ref, allow_pickle=allow_pickle)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise KruisingError(
            f"model {ref} has no config.json in {path}",
            "a checkpoint folder is what save_pretrained writes: config.json + shards",
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise KruisingError(f"{config_file}: invalid JSON ({exc})", "fix or re-save it") from None
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


def _check_index(index: Path, tensors: dict[str, TensorInfo], folder: Path) -> None:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as exc:
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


@dataclass
class _Shard:
    file_name: str
    entries: list[tuple[str, torch.dtype, tuple[int, ...], int, int]]  # name, dtype, shape, b, e

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


class ShardWriter:
    """Output shards laid out up front (names, dtypes, shapes from the plan), memory-mapped.

    Each shard file is created at its final size with its header in place; `target(name)`
    is a view of the tensor's bytes in the mapped file, so a method computes straight into
    the page cache (no copy, no write order). `finish` flushes and fsyncs every shard.
    """

    def __init__(
        self,
        folder: Path,
        layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int,
    ) -> None:
        self.folder = folder
        self.shards: list[_Shard] = []
        current: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []
        offset = 0
        for name, dtype, shape in layout:
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            if current and offset + nbytes > max_shard_bytes:
                self.shards.append(_Shard("", current))
                current, offset = [], 0
            current.append((name, dtype, shape, offset, offset + nbytes))
            offset += nbytes
        if current or not self.shards:
            self.shards.append(_Shard("", current))
        n = len(self.shards)
        self._where: dict[str, tuple[int, torch.dtype, tuple[int, ...], int, int]] = {}
        self._maps: list[mmap.mmap | None] = []
        self._written: set[str] = set()
        for i, shard in enumerate(self.shards):
            shard.file_name = (
                "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            )
            header = shard.header_bytes()
            size = len(header) + (shard.entries[-1][4] if shard.entries else 0)
            with open(folder / shard.file_name, "wb+") as f:
                f.write(header)
                f.truncate(size)
                f.flush()
                mapped = mmap.mmap(f.fileno(), size) if size > len(header) else None
            self._maps.append(mapped)
            for name, dtype, shape, begin, end in shard.entries:
                self._where[name] = (i, dtype, shape, len(header) + begin, len(header) + end)
        self.total_bytes = sum(e[4] - e[3] for s in self.shards for e in s.entries)

    def target(self, name: str) -> torch.Tensor:
        """The flat CPU view of tensor ``name``'s bytes in its shard, to compute into."""
        index, dtype, shape, begin, end = self._where[name]
        raw = torch.frombuffer(
            self._maps[index], dtype=torch.uint8, count=end - begin, offset=begin
        )
        return raw.view(dtype)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store a tensor computed elsewhere (e.g. on a GPU); it must match the layout."""
        index, dtype, shape, begin, end = self._where[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"writer expected {name} {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}"
            )
        if end > begin:
            self.target(name).copy_(tensor.detach().reshape(-1))
        self.done(name)

    def done(self, name: str) -> None:
        """Mark ``name`` complete and let its pages leave this process (they stay cached)."""
        index, _, _, begin, end = self._where[name]
        self._written.add(name)
        mapped = self._maps[index]
        if mapped is not None and end > begin:
            start = begin - begin % mmap.PAGESIZE
            mapped.madvise(mmap.MADV_DONTNEED, start, end - start)

    def finish(self) -> None:
        """Flush and fsync every shard; write the index (when there is more than one)."""
        missing = [name for name in self._where if name not in self._written]
        if missing:
            raise RuntimeError(f"writer finished before {missing[0]}")
        for shard, mapped in zip(self.shards, self._maps, strict=True):
            if mapped is not None:
                mapped.flush()
                try:
                    mapped.close()
                except BufferError:  # a finished tensor still views it; closed when freed
                    pass
            with open(self.folder / shard.file_name, "rb+") as f:
                os.fsync(f.fileno())
        self._maps = [None] * len(self.shards)
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {e[0]: s.file_name for s in self.shards for e in s.entries},
            }
            (self.folder / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n"
            )

    def abort(self) -> None:
        for mapped in self._maps:
            if mapped is not None:
                try:
                    mapped.close()
                except BufferError:
                    pass
        self._maps = [None] * len(self.shards)
