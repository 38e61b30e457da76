"""Strict configs: a pydantic base that refuses unknown keys, and YAML read with the line of
every key, so that each problem of a file is reported with its line, all of them together.

- `Strict`: the base of every config model (recipes, sweep specs, pretrain configs): a
  misspelt key is an error, never silently ignored.
- `compose_yaml`: YAML text -> plain data, the 1-based line of every key and list item, and the
  problems found on the way (invalid YAML, duplicate keys, keys that are not plain names).
- `line_of`, `format_loc`: a pydantic error location as a line and as ``models[1].parameters``.
- `Problem`: one problem of a file (source, line, path, message, hint).

Light module: pydantic and yaml only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

#: A location in a config: keys and list positions, like pydantic's ``loc``.
Loc = tuple[str | int, ...]

_MAX_DEPTH = 64
#: The most characters a config file may have: recipes, cards' recipes, sweep specs and pretrain
#: configs are a few KB; a larger file is refused before it is parsed.
MAX_CHARS = 1 << 20
#: The most values (keys, items, scalars) a config may expand to, aliases counted each time they
#: are used: a YAML alias bomb (anchors nested a few levels) is refused instead of grown.
MAX_NODES = 100_000
_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


class Strict(BaseModel):
    """A config model: unknown keys are errors (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    """One problem of a config file: where it is, what is wrong, how to fix it."""

    source: str
    line: int | None  # None for a config built from data rather than read from YAML
    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


#: The message prefix of a problem that is the YAML itself, not a key or value in it.
INVALID_YAML = "invalid YAML: "
#: The message of a file with more than one YAML document (``---``).
SEVERAL_DOCUMENTS = "several YAML documents (---)"


def compose_yaml(text: str, source: str) -> tuple[Any, dict[Loc, int], list[Problem]]:
    """YAML → plain data, plus the 1-based line of every key and list item.

    Problems (invalid YAML, a duplicate key, a key that is not a plain name) are returned, not
    raised, so the caller reports them together with its own. On invalid YAML the data is None.

    Hostile input is refused, not expanded: a text longer than `MAX_CHARS`, aliases that expand
    to more than `MAX_NODES` values (an alias bomb), and tags that construct objects
    (``!!python/object``, ``!!set`` on a mapping; PyYAML's safe loader refuses them on scalars).
    """
    lines: dict[Loc, int] = {(): 1}
    problems: list[Problem] = []
    if len(text) > MAX_CHARS:
        problems.append(
            Problem(
                source=source,
                line=1,
                path="",
                message=f"{len(text)} characters, more than the {MAX_CHARS} a config may have",
                hint="is this the right file? recipes and configs are a few KB of YAML",
            )
        )
        return None, lines, problems
    loader = yaml.SafeLoader(text)
    built = 0

    def build(node: yaml.Node, loc: Loc, depth: int) -> Any:
        nonlocal built
        built += 1
        if built > MAX_NODES:
            raise _Refused(
                problem=f"expands to more than {MAX_NODES} values (an alias bomb?)",
                problem_mark=node.start_mark,
            )
        if depth > _MAX_DEPTH:
            raise _Refused(
                problem=f"nested deeper than {_MAX_DEPTH} levels (recursive alias?)",
                problem_mark=node.start_mark,
            )
        if not isinstance(node, yaml.ScalarNode) and node.tag not in _PLAIN_TAGS:
            raise _Refused(
                problem=f"tag {node.tag!r} is not allowed (a config holds plain values only)",
                problem_mark=node.start_mark,
            )
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:  # duplicates among the keys written here
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` keys may be overridden, as YAML intends
                line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    kind = "mapping" if isinstance(key_node, yaml.MappingNode) else "list"
                    problems.append(
                        Problem(
                            source=source,
                            line=line,
                            path=format_loc(loc),
                            message=f"a key must be a plain name, got a {kind}",
                        )
                    )
                    continue
                key = loader.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)):
                    problems.append(
                        Problem(
                            source=source,
                            line=line,
                            path=format_loc(loc),
                            message=f"a key must be a plain name, got {key!r:.60}",
                        )
                    )
                elif key in first_line:
                    problems.append(
                        Problem(
                            source=source,
                            line=line,
                            path=format_loc((*loc, key)),
                            message=f"duplicate key (first on line {first_line[key]})",
                            hint="remove one of the two; YAML would silently keep the last",
                        )
                    )
                else:
                    first_line[key] = line
            _flatten_merges(node, depth)
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:  # merged keys first, then the written ones
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = loader.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)):
                    continue
                lines[(*loc, key)] = key_node.start_mark.line + 1
                out[key] = build(value_node, (*loc, key), depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                lines[(*loc, i)] = item.start_mark.line + 1
                items.append(build(item, (*loc, i), depth + 1))
            return items
        return loader.construct_object(node, deep=True)

    try:
        root = loader.get_single_node()
        if root is None:
            return None, lines, problems
        lines[()] = root.start_mark.line + 1
        return build(root, (), 0), lines, problems
    except _Refused as exc:
        mark = exc.problem_mark
        problems.append(
            Problem(
                source=source,
                line=mark.line + 1 if mark else 1,
                path="",
                message=f"refused: {exc.problem}",
                hint="remove the tag: a config holds plain keys, lists and values"
                if "tag" in str(exc.problem)
                else "write the values out instead of nesting aliases (a config is a few KB)",
            )
        )
        return None, lines, problems
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        what = " ".join(x for x in (exc.context, exc.problem) if x)
        if exc.context and exc.context_mark and exc.problem_mark:
            if exc.context_mark.line != exc.problem_mark.line:
                what = f"{exc.context} (from line {exc.context_mark.line + 1}): {exc.problem}"
        if "expected a single document" in what:
            what = SEVERAL_DOCUMENTS
        problems.append(
            Problem(
                source=source,
                line=line,
                path="",
                message=INVALID_YAML + what,
                hint="check indentation and quoting around this line (a YAML linter shows it)",
            )
        )
        return None, lines, problems
    except yaml.YAMLError as exc:
        problems.append(Problem(source=source, line=1, path="", message=f"{INVALID_YAML}{exc}"))
        return None, lines, problems
    finally:
        loader.dispose()


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(yaml.MarkedYAMLError):
    """YAML that is valid but hostile: an alias bomb, a recursive alias, an object tag."""


def _flatten_merges(node: yaml.MappingNode, depth: int) -> None:
    """Resolve ``<<: *anchor`` merge keys in place, as PyYAML's ``flatten_mapping`` does (keys
    written here win, then the first merged mapping), but keep each key once: PyYAML keeps every
    copy, so merges of merges grow exponentially (a merge-key bomb)."""
    if depth > _MAX_DEPTH:
        raise _Refused(
            problem=f"merge keys nested deeper than {_MAX_DEPTH} levels (recursive alias?)",
            problem_mark=node.start_mark,
        )
    if not any(key.tag == _MERGE_TAG for key, _ in node.value):
        return
    entries: list[tuple[yaml.Node, yaml.Node]] = []
    own: list[tuple[yaml.Node, yaml.Node]] = []
    for key_node, value_node in node.value:
        if key_node.tag != _MERGE_TAG:
            own.append((key_node, value_node))
            continue
        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for sub in reversed(sources):
            if not isinstance(sub, yaml.MappingNode):
                raise _Refused(
                    problem=f"a merge key (<<) takes mappings, found a {sub.id}",
                    problem_mark=sub.start_mark,
                )
            _flatten_merges(sub, depth + 1)
            entries.extend(sub.value)
    entries.extend(own)
    last: dict[tuple[str, str], int] = {}
    for i, (key_node, _) in enumerate(entries):
        if isinstance(key_node, yaml.ScalarNode):
            last[(key_node.tag, key_node.value)] = i
    node.value = [
        entry
        for i, entry in enumerate(entries)
        if not isinstance(entry[0], yaml.ScalarNode) or last[(entry[0].tag, entry[0].value)] == i
    ]


def format_loc(loc: Loc) -> str:
    """``("models", 1, "parameters")`` → ``models[1].parameters``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][\w-]*", str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{str(part)!r}]"
    return out


def line_of(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    """The line of ``loc``, or of the nearest enclosing key that has one."""
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return None
