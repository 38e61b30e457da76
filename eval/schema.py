"""Probe files: one JSONL file is one probe; every line is one item of the same kind.

The kind follows from the keys of the items (see eval/probes/README.md):

- ``choice``: ``{"id", "context", "choices", "answer"}`` -- cloze multiple choice;
- ``pair``: ``{"id", "good", "bad"}`` -- a grammatical sentence and its ungrammatical twin;
- ``generate``: ``{"id", "prompt", "lang"}`` -- greedy continuation, checked by language id;
- ``text``: ``{"id", "text"}`` -- held-out text for perplexity.

A malformed line is an `EvalError` naming the file and the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from eval.errors import EvalError

Kind = Literal["choice", "pair", "generate", "text"]


class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    # Labels for subscores: a tag ``t`` on items of probe ``p`` gives the scorecard a ``p_t`` entry
    # (``cultuur`` items tagged ``diep`` make ``cultuur_diep``), scored like ``p`` on those items.
    tags: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _tags_are_names(self):
        for tag in self.tags:
            if not tag or not all(c.isalnum() or c == "_" for c in tag):
                raise ValueError(f"tags must be names of letters, digits and _, got {tag!r}")
        if len(set(self.tags)) != len(self.tags):
            raise ValueError("tags must be distinct")
        return self


class ChoiceItem(_Item):
    """Cloze multiple choice: ``context`` + delimiter + each of ``choices``; ``answer`` is an index."""

    context: str
    choices: list[str] = Field(min_length=2)
    answer: int
    topic: str | None = None
    format: Literal["plain", "chat"] = "plain"
    delimiter: str = " "

    @model_validator(mode="after")
    def _answer_in_range(self) -> ChoiceItem:
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(
                f"answer must index choices (0..{len(self.choices) - 1}), got {self.answer}"
            )
        if len(set(self.choices)) != len(self.choices):
            raise ValueError("choices must be distinct")
        if any(not c.strip() for c in self.choices):
            raise ValueError("choices must not be empty")
        return self


class PairItem(_Item):
    """Minimal pair: right when ``good`` gets a higher total log-probability than ``bad``."""

    good: str = Field(min_length=1)
    bad: str = Field(min_length=1)
    phenomenon: str | None = None

    @model_validator(mode="after")
    def _differ(self) -> PairItem:
        if self.good == self.bad:
            raise ValueError("good and bad must differ")
        return self


class GenerateItem(_Item):
    """Greedy continuation of ``prompt``; right when a language identifier calls it ``lang``."""

    prompt: str = Field(min_length=1)
    lang: str = Field(min_length=2, max_length=3)
    format: Literal["plain", "chat"] = "plain"


class TextItem(_Item):
    """Held-out text for perplexity per token and bits per byte."""

    text: str = Field(min_length=1)


ITEM_TYPES: dict[str, type[_Item]] = {
    "choice": ChoiceItem,
    "pair": PairItem,
    "generate": GenerateItem,
    "text": TextItem,
}

# The key that tells a line's kind, checked in this order.
_KIND_KEYS = (("choices", "choice"), ("good", "pair"), ("prompt", "generate"), ("text", "text"))


@dataclass(frozen=True)
class Probe:
    """One probe: a name, a kind, the language its score counts toward, and its items."""

    name: str
    kind: Kind
    lang: str
    items: tuple[_Item, ...]
    source: str = ""
    primary: str | None = None  # the metric that enters the language score; None: the kind's


def kind_of(record: dict) -> Kind | None:
    for key, kind in _KIND_KEYS:
        if key in record:
            return kind  # type: ignore[return-value]
    return None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def load_probe_file(path: Path, lang: str) -> Probe:
    """Parse one JSONL probe file; errors name the file and the (1-based) line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalError(f"cannot read probe file {path}: {exc}", "check the path") from exc
    kind: Kind | None = None
    items: list[_Item] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalError(
                f"{where}: not valid JSON ({exc.msg} at column {exc.colno})",
                "each line of a probe file is one JSON object (JSONL); see eval/probes/README.md",
            ) from exc
        if not isinstance(record, dict):
            raise EvalError(
                f"{where}: expected a JSON object, got {type(record).__name__}",
                "each line of a probe file is one JSON object; see eval/probes/README.md",
            )
        line_kind = kind_of(record)
        if line_kind is None:
            raise EvalError(
                f"{where}: cannot tell the probe kind from keys {sorted(record)}",
                "an item needs one of the keys choices, good, prompt or text; see eval/probes/README.md",
            )
        if kind is None:
            kind = line_kind
        elif line_kind != kind:
            raise EvalError(
                f"{where}: a {line_kind} item in a file of {kind} items",
                "keep one kind of item per probe file",
            )
        try:
            item = ITEM_TYPES[kind].model_validate(record)
        except ValidationError as exc:
            raise EvalError(
                f"{where}: {_first_error(exc)}",
                f"fix the {kind} item; the schema is in eval/probes/README.md",
            ) from exc
        if item.id in seen:
            raise EvalError(
                f"{where}: duplicate id {item.id!r} (first on line {seen[item.id]})",
                "give every item of a probe file its own id",
            )
        seen[item.id] = number
        items.append(item)
    if kind is None:
        raise EvalError(f"probe file {path} has no items", "add items or remove the file")
    return Probe(name=path.stem, kind=kind, lang=lang, items=tuple(items), source=str(path))
