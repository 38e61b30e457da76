"""What a reader of a study needs beside the numbers: names for its search paths, and the
values its search leaves fixed.

- `labels`: ``models[1].parameters.weight`` reads as ``weight of instruct`` (the model's folder
  or Hub name), ``parameters.t[mlp]`` as ``t[mlp]``.
- `fixed_values`: a search that moves some entries of a filtered parameter list leaves the
  others where the recipe put them. The demo's SLERP sweep searches ``t[self_attn]`` and
  ``t[mlp]``; the catch-all ``value: 0.5`` still sets the embeddings, the norms and
  ``lm_head`` in every variant, so even ``t[self_attn]=0, t[mlp]=0`` is not the ``nl`` model.
  With the tensor names of an input (`tensor_names`) the note says which tensors.

Everything here reads plain data (the dumped recipe, file headers): no torch.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from merger.study.paths import parse_path, short


def model_name(ref: str) -> str:
    """``/x/family/nl`` -> ``nl``; ``org/name@rev`` -> ``name``."""
    return Path(str(ref).split("@", 1)[0].rstrip("/")).name or str(ref)


def _render(parts: list[str | int]) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f".{part}"
        elif part.startswith("["):
            text += part
        else:
            text += f".{part}" if text else part
    return text


def labels(search: list[str], recipe: dict[str, Any] | None) -> dict[str, str]:
    """A column label per search path: the model's name instead of its index."""
    recipe = recipe or {}
    models = [m.get("model") for m in recipe.get("models") or [] if isinstance(m, dict)]
    names = [model_name(m) if m else "" for m in models]
    out: dict[str, str] = {}
    for path in search:
        try:
            parts = parse_path(path)
        except ValueError:
            out[path] = path
            continue
        label = short(path)
        if (
            len(parts) >= 4
            and parts[0] == "models"
            and isinstance(parts[1], int)
            and parts[2] == "parameters"
            and -len(names) <= parts[1] < len(names)
            and names[parts[1]]
        ):
            name = names[parts[1]]
            if names.count(name) > 1:
                name = f"{name} (models[{parts[1]}])"
            label = f"{_render(parts[3:])} of {name}"
        elif len(parts) >= 6 and parts[0] == "slices" and parts[2] == "sources":
            try:
                ref = recipe["slices"][parts[1]]["sources"][parts[3]]["model"]
                label = f"{_render(parts[5:])} of {model_name(ref)} (slice {parts[1]})"
            except (KeyError, IndexError, TypeError):
                pass
        out[path] = label
    return out


def _entry_key(entry: dict[str, Any]) -> str:
    return f"[{entry.get('filter') or 'default'}]"


def _node(data: Any, parts: list[str | int]) -> Any:
    node = data
    for part in parts:
        if isinstance(part, str) and part.startswith("["):
            node = next(e for e in node if _entry_key(e) == part)
        else:
            node = node[part]
    return node


def _matches(entry: dict[str, Any], tensor: str) -> bool:
    """mergekit's rule (``evaluate_setting``): no filter or ``*`` matches all, else substring."""
    flt = entry.get("filter")
    return flt is None or flt == "*" or flt in tensor


def fixed_values(
    search: list[str], recipe: dict[str, Any], tensors: list[str] | None = None
) -> list[dict[str, Any]]:
    """Entries of a filtered parameter list that the search moves only partly, left fixed.

    Each note: ``path`` (``parameters.t[default]``), ``value``, ``searched`` (the sibling
    entries the search moves), and with ``tensors`` (names of an input's tensors) the tensors
    that entry sets in every variant (``tensors``) — mergekit's first-match order decides.
    """
    notes: list[dict[str, Any]] = []
    seen: set[str] = set()
    parsed = {}
    for path in search:
        try:
            parsed[path] = parse_path(path)
        except ValueError:
            continue
    for parts in parsed.values():
        k = next((i for i, p in enumerate(parts) if isinstance(p, str) and p.startswith("[")), None)
        if k is None:
            continue
        container = parts[:k]
        key = _render(container)
        if key in seen:
            continue
        seen.add(key)
        try:
            entries = _node(recipe, container)
        except (KeyError, IndexError, TypeError, StopIteration):
            continue
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            continue
        moved = {p[k] for p in parsed.values() if p[:k] == container and len(p) > k and p[k]}
        fixed = [e for e in entries if _entry_key(e) not in moved]
        if not fixed:
            continue
        owner: dict[str, list[str]] = {}
        if tensors:
            for tensor in tensors:
                for entry in entries:
                    if _matches(entry, tensor):
                        owner.setdefault(_entry_key(entry), []).append(tensor)
                        break
        for entry in fixed:
            ekey = _entry_key(entry)
            note = {
                "path": key + ekey,
                "value": entry.get("value"),
                "searched": [key + m for m in sorted(moved)],
            }
            if tensors:
                note["tensors"] = owner.get(ekey, [])
                if not note["tensors"]:
                    continue  # an entry that sets nothing (an earlier filter takes it all)
            notes.append(note)
    return notes


_LAYER = re.compile(r"\.layers\.\d+\.")


def tensor_groups(tensors: list[str]) -> list[str]:
    """Tensor names with the layer number as ``*``, in order, each once."""
    return list(dict.fromkeys(_LAYER.sub(".layers.*.", t) for t in tensors))


def describe(note: dict[str, Any]) -> str:
    """One sentence for a fixed-value note."""
    moved = " and ".join(short(p) for p in note["searched"]) or "other entries"
    value = json.dumps(note["value"])
    text = f"{note['path']} stays {value} in every variant (the search moves only {moved})"
    tensors = note.get("tensors")
    if tensors:
        groups = tensor_groups(tensors)
        shown = ", ".join(groups[:6]) + (
            f", ... ({len(groups) - 6} more)" if len(groups) > 6 else ""
        )
        text += f": {len(tensors)} tensors keep it ({shown})"
    else:
        filters = [p[p.rindex("[") + 1 : -1] for p in note["searched"] if "[" in p]
        if note["path"].endswith("[default]") and filters:
            text += f": every tensor whose name contains none of {', '.join(filters)}"
    return text + f". To move them too, add {note['path']} to search:."


def tensor_names(ref: str) -> list[str] | None:
    """Tensor names of a local safetensors checkpoint, from its file headers; None otherwise."""
    folder = Path(str(ref))
    if not folder.is_dir():
        return None
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            return sorted(json.loads(index.read_text())["weight_map"])
        names: list[str] = []
        for file in sorted(folder.glob("*.safetensors")):
            with open(file, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            names += [n for n in header if n != "__metadata__"]
        return names or None
    except (OSError, ValueError, KeyError):
        return None
