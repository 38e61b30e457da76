"""Corpora → token blocks: `datasets` loading, mixture weights, packing, a resumable position.

A source yields documents (strings), normalised as it asks (`normalize`). Its first
`holdout_docs` documents are the eval split; of the rest it keeps a seeded random `sample` (the
same documents every epoch) and passes them through a seeded shuffle buffer (reseeded per epoch).
The mixture picks the next source from a seeded RNG: by `weight`, or, when the sources have token
budgets (`tokens`, `epochs`), in proportion to the tokens each has left, so every source is spent
by the end of a round as if the budgets were concatenated and shuffled (GEITje's way). Each
document is tokenized, BOS/EOS added, and the tokens are packed into blocks of exactly
`context_length` tokens (no padding). The whole position (documents taken per source and epoch,
tokens spent, the mixture RNG, the partial block) is a small JSON-able dict, so a resumed run
continues with the very next token. The only tokens ever dropped are the partial block left when
training stops (the tail).
"""

from __future__ import annotations

import glob
import hashlib
import os
import random
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kruising.hub import offline
from pretrain.config import PretrainConfig, Source
from pretrain.errors import PretrainError

_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# ---- documents --------------------------------------------------------------------------------


def _local_files(source: Source) -> tuple[str, list[str]]:
    pattern = os.path.expanduser(source.path or "")
    files = sorted(glob.glob(pattern, recursive=True))
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise PretrainError(
            f"source {source.label}: no files match", "check the glob; it is relative to the cwd"
        )
    exts = {Path(f).suffix.lower() for f in files}
    unknown = exts - set(_FORMATS)
    if unknown:
        raise PretrainError(
            f"source {source.label}: unsupported file type(s) {sorted(unknown)}",
            "use .txt, .jsonl, .json or .parquet files",
        )
    kinds = {_FORMATS[e] for e in exts}
    if len(kinds) > 1:
        raise PretrainError(
            f"source {source.label}: mixes file types {sorted(exts)}", "use one source per type"
        )
    kind = kinds.pop()
    if source.document != "line" and kind != "text":
        raise PretrainError(
            f"source {source.label}: document: {source.document} applies to .txt files, "
            f"these are {sorted(exts)}",
            "drop document (a jsonl/json/parquet row is one document)",
        )
    return kind, files


#: `document:` of a .txt source -> the `sample_by` of datasets' text loader.
_SAMPLE_BY = {"line": "line", "paragraph": "paragraph", "file": "document"}


def normalizer(steps: list[str]) -> Callable[[str], str]:
    """The text normalisation of a source: its `normalize` steps, in order."""

    def apply(text: str) -> str:
        for step in steps:
            if step == "literal_escapes":  # as GEITje's fix_madlad_whitespace, in this order
                text = text.replace("\\n", "\n").replace("\\t", "\t")
            elif step == "nfc":
                text = unicodedata.normalize("NFC", text)
        return text

    return apply


def check_hub_reachable(dataset_id: str, timeout: float = 5.0) -> None:
    """Fail at once (never hang) when the Hub cannot be reached for `dataset_id`."""
    hint = "download it once with network, or point the source at local files (path: ...)"
    if offline(datasets=True):
        raise PretrainError(f"Hub dataset {dataset_id}: HF_HUB_OFFLINE is set", hint)
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(dataset_id, timeout=timeout)
    except Exception as exc:  # network errors, 404, auth: all mean we cannot stream it
        kind = type(exc).__name__
        raise PretrainError(
            f"Hub dataset {dataset_id} is not reachable ({kind}: {str(exc).splitlines()[0][:120]})",
            hint + "; check the id and your network",
        ) from None


def _unreadable(label: str, kind: str, exc: Exception) -> PretrainError:
    what = {"text": "UTF-8 text", "json": "JSON lines", "parquet": "Parquet"}.get(kind, "a dataset")
    first = (str(exc).splitlines() or [""])[0][:160]
    return PretrainError(
        f"source {label}: cannot be read as {what} ({type(exc).__name__}: {first})",
        "check that the files are what their names say (a .txt is UTF-8 text, a .jsonl one "
        "JSON object per line, a .parquet a Parquet file)",
    )


def open_source(
    source: Source, render_chat: Callable[[list[dict]], str] | None = None, seed: int = 0
) -> Callable[[], Iterator[str]]:
    """A factory of fresh document iterators over `source` (called again for each epoch)."""
    if source.world is not None:
        from pretrain import world

        if source.world == "chat-en":
            if render_chat is None:
                raise PretrainError("world: chat-en needs a chat template", "set chat_template")
            chats = world.chat_conversations("en", source.documents, seed)
            docs = [render_chat(c) for c in chats]
        else:
            docs = world.training_documents(source.world, source.documents, seed)
        fix = normalizer(source.normalize)
        docs = [fix(d) for d in docs]
        return lambda: iter(docs)

    import datasets

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its read errors are ours to say
    datasets.disable_progress_bars()
    kind = "hub"
    if source.path is not None:
        kind, files = _local_files(source)
        split_label = source.label
        try:
            extra = {"sample_by": _SAMPLE_BY[source.document]} if kind == "text" else {}
            ds = datasets.load_dataset(
                kind, data_files=files, split="train", streaming=True, **extra
            )
        except Exception as exc:  # e.g. a .parquet that is not Parquet: its footer is read here
            raise _unreadable(split_label, kind, exc) from None
    else:
        assert source.hub is not None
        if not Path(source.hub).exists():
            check_hub_reachable(source.hub)
        try:
            ds = datasets.load_dataset(
                source.hub, source.hub_config, split=source.split, streaming=True
            )
        except Exception as exc:
            raise PretrainError(
                f"Hub dataset {source.label} could not be opened: {str(exc).splitlines()[0][:160]}",
                "check the id, hub_config and split",
            ) from None
        split_label = f"{source.label}[{source.split}]"

    field_name = source.messages_field or source.text_field
    if source.messages_field is not None and render_chat is None:
        raise PretrainError(
            f"source {source.label}: messages_field needs a chat template",
            "set chat_template in the config or use a tokenizer that has one",
        )

    def rows() -> Iterator[dict]:
        """The rows, with a file that is not what its name says (binary garbage in a .txt,
        a .jsonl that is not JSON lines, a damaged .parquet) as one error."""
        it = iter(ds)
        while True:
            try:
                row = next(it)
            except StopIteration:
                return
            except Exception as exc:
                raise _unreadable(split_label, kind, exc) from None
            if not isinstance(row, dict):
                raise PretrainError(
                    f"source {split_label}: a row is a {type(row).__name__}, not a record",
                    "write one JSON object per line",
                )
            yield row

    fix = normalizer(source.normalize)

    def documents() -> Iterator[str]:
        for row in rows():
            if field_name not in row:
                raise PretrainError(
                    f"source {split_label}: rows have no field {field_name!r} "
                    f"(fields: {sorted(row)})",
                    "set text_field (or messages_field) to the field holding the text",
                )
            value = row[field_name]
            text = render_chat(value) if source.messages_field else value
            if isinstance(text, str):
                text = fix(text)
                if text.strip():
                    yield text

    return documents


# ---- packing ----------------------------------------------------------------------------------


def tokenize_document(tokenizer: Any, text: str, add_bos: bool) -> list[int]:
    """Token ids of one document: [BOS] + text + EOS (EOS is what separates packed documents)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    head = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    return head + list(ids) + [tokenizer.eos_token_id]


def pack(
    docs: Iterator[list[int]], context_length: int, document_positions: bool = False
) -> Iterator[tuple[list[int], list[int]]]:
    """Concatenate token documents and cut them into blocks of `context_length`.

    Yields ``(input_ids, position_ids)``. Position ids count 0..L-1 per block, or restart at
    every document start when `document_positions` (a document cut by a block edge continues
    counting in the next block). The final partial block (the tail) is dropped.
    """
    ids: list[int] = []
    pos: list[int] = []
    for doc in docs:
        ids.extend(doc)
        pos.extend(range(len(doc)))
        while len(ids) >= context_length:
            block_ids, ids = ids[:context_length], ids[context_length:]
            block_pos, pos = pos[:context_length], pos[context_length:]
            yield block_ids, (block_pos if document_positions else list(range(context_length)))


@dataclass
class StreamState:
    """Where the mixture stands: JSON-able, saved in every checkpoint."""

    taken: list[int]  # documents taken from each source since the start (all epochs)
    rng: list[Any]  # random.Random state of the mixture
    buffer_ids: list[int] = field(default_factory=list)
    buffer_pos: list[int] = field(default_factory=list)
    blocks: int = 0
    epoch: list[int] = field(default_factory=list)  # the epoch each source is in
    in_epoch: list[int] = field(default_factory=list)  # documents taken in that epoch
    spent: list[int] = field(default_factory=list)  # tokens taken this round (token budgets)
    rounds: int = 0  # completed rounds of the budgets

    def to_json(self) -> dict[str, Any]:
        return {
            "taken": self.taken,
            "rng": self.rng,
            "buffer_ids": self.buffer_ids,
            "buffer_pos": self.buffer_pos,
            "blocks": self.blocks,
            "epoch": self.epoch,
            "in_epoch": self.in_epoch,
            "spent": self.spent,
            "rounds": self.rounds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StreamState:
        rng = data["rng"]
        taken = list(data["taken"])
        return cls(
            taken=taken,
            rng=[rng[0], list(rng[1]), rng[2]],
            buffer_ids=list(data["buffer_ids"]),
            buffer_pos=list(data["buffer_pos"]),
            blocks=int(data["blocks"]),
            # a state written before epochs were counted: `taken` wraps in _positioned
            epoch=list(data.get("epoch", [0] * len(taken))),
            in_epoch=list(data.get("in_epoch", taken)),
            spent=list(data.get("spent", [0] * len(taken))),
            rounds=int(data.get("rounds", 0)),
        )


def _seed(*parts: Any) -> int:
    """A stable seed from parts (Python's hash() of a str changes per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _shuffled(docs: Iterator[str], size: int, rng: random.Random) -> Iterator[str]:
    """A shuffle buffer of `size` documents: each incoming document replaces a random one."""
    buffer: list[str] = []
    for doc in docs:
        if len(buffer) < size:
            buffer.append(doc)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = doc
    rng.shuffle(buffer)
    yield from buffer


class PackedStream:
    """Mixture of sources → packed blocks, resumable from a `StreamState`.

    Each source skips its first `holdout` documents (the eval split), keeps its `sample` of the
    rest, shuffles them in its buffer, and starts over when it runs out (a new epoch, a new
    shuffle). With `budgets` (tokens per source) the next source is drawn in proportion to the
    tokens it has left this round; a new round starts when every budget is spent.
    """

    def __init__(
        self,
        factories: list[Callable[[], Iterator[str]]],
        weights: list[float],
        tokenizer: Any,
        context_length: int,
        *,
        add_bos: bool = True,
        document_positions: bool = False,
        holdout: int = 0,
        seed: int = 0,
        labels: list[str] | None = None,
        samples: list[float] | None = None,
        shuffle_buffers: list[int] | None = None,
        budgets: list[int | None] | None = None,
        epochs: list[float | None] | None = None,
    ) -> None:
        n = len(factories)
        self.factories = factories
        self.weights = weights
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.add_bos = add_bos
        self.document_positions = document_positions
        self.holdout = holdout
        self.seed = seed
        self.labels = labels or [str(i) for i in range(n)]
        self.samples = samples or [1.0] * n
        self.shuffle_buffers = shuffle_buffers or [0] * n
        self._budgets = budgets or [None] * n
        self._epochs = epochs or [None] * n
        self.budgeted = any(b is not None for b in self._budgets) or any(
            e is not None for e in self._epochs
        )
        rng = random.Random(seed)
        self.state = StreamState(
            taken=[0] * n,
            rng=list(rng.getstate()),
            epoch=[0] * n,
            in_epoch=[0] * n,
            spent=[0] * n,
        )
        self._iters: list[Iterator[str] | None] = [None] * n
        self._resolved: list[int] | None = None

    def load_state(self, state: StreamState) -> None:
        self.state = state
        self._iters = [None] * len(self.factories)

    def _fresh(self, i: int, epoch: int = 0) -> Iterator[str]:
        """Source `i` from its first training document, as epoch `epoch` sees it."""
        it = self.factories[i]()
        for _ in range(self.holdout):
            if next(it, None) is None:
                raise self._empty(i)
        if self.samples[i] < 1.0:  # the same documents every epoch
            keep = random.Random(_seed(self.seed, i, "sample"))
            p = self.samples[i]
            it = (doc for doc in it if keep.random() < p)
        if self.shuffle_buffers[i]:
            rng = random.Random(_seed(self.seed, i, "shuffle", epoch))
            it = _shuffled(it, self.shuffle_buffers[i], rng)
        return it

    def _positioned(self, i: int) -> Iterator[str]:
        """A fresh iterator of source `i` advanced to where the state says it is."""
        epoch, skip = self.state.epoch[i], self.state.in_epoch[i]
        it = self._fresh(i, epoch)
        skipped = 0
        while skipped < skip:
            if next(it, None) is None:  # a state written before epochs were counted
                if skipped == 0:
                    raise self._empty(i)
                epoch += skip // skipped
                self.state.epoch[i], self.state.in_epoch[i] = epoch, skip % skipped
                return self._positioned(i)
            skipped += 1
        return it

    def _empty(self, i: int) -> PretrainError:
        return PretrainError(
            f"source {self.labels[i]} has no documents"
            + (f" after the {self.holdout} held out" if self.holdout else "")
            + (f" in its sample of {self.samples[i]}" if self.samples[i] < 1 else ""),
            "check the files, the split, text_field and sample (empty texts are skipped)",
        )

    def check(self) -> None:
        """Every source opens and has a training document (fails before any model loads)."""
        for i in range(len(self.factories)):
            if next(self._fresh(i), None) is None:
                raise self._empty(i)

    def _next_document(self, i: int) -> str:
        it = self._iters[i]
        if it is None:
            it = self._iters[i] = self._positioned(i)
        doc = next(it, None)
        if doc is None:  # end of an epoch: start the source over
            self.state.epoch[i] += 1
            self.state.in_epoch[i] = 0
            it = self._iters[i] = self._fresh(i, self.state.epoch[i])
            doc = next(it, None)
            if doc is None:
                raise self._empty(i)
        self.state.taken[i] += 1
        self.state.in_epoch[i] += 1
        return doc

    def budgets(self) -> list[int] | None:
        """Tokens per source and round (None: the sources mix by weight). `epochs` budgets are
        counted here, in one pass over the source's training documents."""
        if not self.budgeted:
            return None
        if self._resolved is None:
            resolved = []
            for i, (tokens, epochs) in enumerate(zip(self._budgets, self._epochs, strict=True)):
                if tokens is None:
                    assert epochs is not None
                    count = sum(
                        len(tokenize_document(self.tokenizer, t, self.add_bos))
                        for t in self._fresh(i)
                    )
                    tokens = max(1, round(epochs * count))
                resolved.append(tokens)
            self._resolved = resolved
        return self._resolved

    def _documents(self) -> Iterator[list[int]]:
        rng = random.Random()
        rng.setstate((self.state.rng[0], tuple(self.state.rng[1]), self.state.rng[2]))
        sources = range(len(self.factories))
        budgets = self.budgets()
        while True:
            if budgets is None:
                weights = self.weights
            else:
                weights = [max(0, b - s) for b, s in zip(budgets, self.state.spent, strict=True)]
                if not any(weights):  # every budget spent: a new round
                    self.state.spent = [0] * len(budgets)
                    self.state.rounds += 1
                    weights = list(budgets)
            i = rng.choices(sources, weights=weights)[0]
            text = self._next_document(i)
            self.state.rng = list(rng.getstate())
            doc = tokenize_document(self.tokenizer, text, self.add_bos)
            self.state.spent[i] += len(doc)
            yield doc

    def blocks(self) -> Iterator[tuple[list[int], list[int]]]:
        """Endless packed blocks; `self.state` always describes the position after the last one."""
        L = self.context_length
        docs = self._documents()
        while True:
            while len(self.state.buffer_ids) < L:
                doc = next(docs)
                self.state.buffer_ids.extend(doc)
                self.state.buffer_pos.extend(range(len(doc)))
            ids, pos = self.state.buffer_ids[:L], self.state.buffer_pos[:L]
            self.state.buffer_ids = self.state.buffer_ids[L:]
            self.state.buffer_pos = self.state.buffer_pos[L:]
            self.state.blocks += 1
            yield ids, (pos if self.document_positions else list(range(L)))


def eval_blocks(
    factories: list[Callable[[], Iterator[str]]],
    tokenizer: Any,
    context_length: int,
    holdout: int,
    add_bos: bool,
    document_positions: bool,
    max_blocks: int,
) -> list[tuple[list[int], list[int]]]:
    """Packed blocks of the held-out split: the first `holdout` documents of every source."""

    def docs() -> Iterator[list[int]]:
        for factory in factories:
            it = factory()
            for _ in range(holdout):
                text = next(it, None)
                if text is None:
                    break
                yield tokenize_document(tokenizer, text, add_bos)

    out = []
    for block in pack(docs(), context_length, document_positions):
        out.append(block)
        if len(out) >= max_blocks:
            break
    if not out:
        raise PretrainError(
            f"the held-out split ({holdout} documents per source) is shorter than one "
            f"block of {context_length} tokens",
            "raise holdout_docs or lower context_length",
        )
    return out


def build_stream(config: PretrainConfig, tokenizer: Any, render_chat: Callable | None):
    """The training stream and the eval factories of `config`."""
    factories = [open_source(s, render_chat, config.seed) for s in config.sources]
    stream = PackedStream(
        factories,
        [s.weight for s in config.sources],
        tokenizer,
        config.context_length,
        add_bos=config.add_bos,
        document_positions=config.document_attention,
        holdout=config.holdout_docs,
        seed=config.seed,
        labels=[s.label for s in config.sources],
        samples=[s.sample for s in config.sources],
        shuffle_buffers=[s.shuffle_buffer for s in config.sources],
        budgets=[s.tokens for s in config.sources],
        epochs=[s.epochs for s in config.sources],
    )
    return stream, factories
