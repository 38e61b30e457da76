"""The recipe path language of sweeps, and the variant recipes it makes.

A path walks the recipe as mergekit writes it: ``.key`` into a mapping, ``[i]`` or ``.i`` into a
list (``parameters.t.0`` is the first point of a gradient), ``[name]`` picks the entry of a
filtered list whose ``filter`` is ``name`` (``[default]``: the entry without a filter). The leaf
must be a scalar the recipe sets, or a parameter its merge method declares at that level.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

# --- recipe paths -----------------------------------------------------------------------------

_SEGMENT = re.compile(r"\.?([A-Za-z_][\w-]*)|\[([^\]]*)\]|\.(\d+)")


def parse_path(path: str) -> list[str | int]:
    """``models[1].parameters.t[mlp].0`` -> ``["models", 1, "parameters", "t", "[mlp]", 0]``.

    Names are ``str``, list positions ``int``, filter selections ``"[name]"``.
    """
    parts: list[str | int] = []
    pos = 0
    while pos < len(path):
        m = _SEGMENT.match(path, pos)
        if m is None or (pos == 0 and path.startswith(".")) or m.end() == pos:
            raise ValueError(f"cannot read {path!r} at {path[pos:]!r}")
        name, bracket, index = m.groups()
        if name is not None:
            parts.append(name)
        elif index is not None:
            parts.append(int(index))
        elif bracket.strip().lstrip("-").isdigit():
            parts.append(int(bracket))
        else:
            parts.append(f"[{bracket.strip()}]")
        pos = m.end()
    if not parts:
        raise ValueError("empty path")
    return parts


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) < 60 else text[:57] + "..."


def _step(node: Any, part: str | int, path: str, done: str) -> Any:
    """One step of a recipe path; KeyError/ValueError names what the recipe has instead."""
    if isinstance(part, str) and part.startswith("["):
        wanted = part[1:-1]
        if not isinstance(node, list) or not all(isinstance(e, dict) for e in node):
            raise ValueError(f"{done} is {_describe(node)}, not a filtered list")
        for entry in node:
            if (entry.get("filter") or "default") == wanted:
                return entry
        filters = [e.get("filter") or "default" for e in node]
        raise KeyError(f"{done} has no filter {wanted!r} (it has {', '.join(filters)})")
    if isinstance(part, int):
        if isinstance(node, dict) and "value" in node:  # a filtered entry: index its value
            node = node["value"]
        if not isinstance(node, list):
            raise ValueError(f"{done} is {_describe(node)}, not a list")
        if not -len(node) <= part < len(node):
            raise KeyError(f"{done} has {len(node)} entries, no [{part}]")
        return node[part]
    if not isinstance(node, dict):
        raise ValueError(f"{done} is {_describe(node)}, not a mapping")
    if part not in node or node[part] is None:
        raise KeyError(f"{done or 'the recipe'} has no {part!r}")
    return node[part]


def method_param(method: str, name: str, per_model: bool):
    from merger.core.methods import METHODS

    spec = METHODS.get(method)
    if spec is None:
        return None
    param = spec.param(name)
    if param is None or param.per_model != per_model or param.unused:
        return None
    return param


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set the recipe value at ``path`` in the dumped recipe ``data`` (in place).

    The leaf must be a scalar the recipe has, or a parameter the merge method declares at that
    level (``parameters.X`` global, ``models[i].parameters.X`` per model), which is then added.
    """
    parts = parse_path(path)
    node: Any = data
    done = ""
    last = parts[-1]
    for i, part in enumerate(parts[:-1]):
        if (
            part == "parameters"
            and i == len(parts) - 2
            and isinstance(node, dict)
            and node.get("parameters") is None
            and isinstance(last, str)
            and method_param(data.get("merge_method", ""), last, i > 0)
        ):
            node["parameters"] = {}  # a model without parameters: add the one searched
        node = _step(node, part, path, done)
        done = _join(done, part)
    parent_is_params = len(parts) >= 2 and parts[-2] == "parameters"
    if isinstance(last, str) and not last.startswith("[") and isinstance(node, dict):
        if last not in node or node[last] is None:
            per_model = len(parts) >= 3 and parts[0] in ("models", "slices")
            if parent_is_params and method_param(data.get("merge_method", ""), last, per_model):
                node[last] = value
                return
            has = ", ".join(k for k, v in node.items() if v is not None) or "nothing"
            raise KeyError(f"{done or 'the recipe'} has no {last!r} (it has {has})")
    target = _step(node, last, path, done)
    here = _join(done, last)
    if isinstance(target, dict) and "value" in target and set(target) <= {"filter", "value"}:
        if isinstance(target["value"], list | dict):
            raise ValueError(
                f"{here} is a gradient {_describe(target['value'])}; "
                f"search its points as {path}.0, {path}.1, ..."
            )
        target["value"] = value
        return
    if isinstance(target, list | dict):
        kind = "gradient" if isinstance(target, list) and _numbers(target) else "structure"
        hint = f"; search its points as {path}.0, {path}.1, ..." if kind == "gradient" else ""
        raise ValueError(f"{here} is a {kind} {_describe(target)}{hint}")
    if isinstance(last, int):
        container = node["value"] if isinstance(node, dict) and "value" in node else node
        container[last] = value
    else:
        node[last] = value


def _numbers(values: list[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _join(done: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{done}[{part}]"
    if part.startswith("["):
        return done + part
    return f"{done}.{part}" if done else part


def dump_recipe(recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json", exclude_none=True)


def variant_recipe(recipe, params: dict[str, Any]):
    """The base recipe with the sampled ``params`` (path -> value) set, validated again.

    When ``merge_method`` is searched and the variant's method is not the recipe's, the
    variant keeps only the parameters that method declares (a ties recipe's weights and
    densities are not model_stock's), and searched parameters it does not declare are left
    out of that variant.
    """
    from merger.core.recipe import MergeRecipe

    data = copy.deepcopy(dump_recipe(recipe))
    method = params.get("merge_method", data.get("merge_method"))
    switched = method != data.get("merge_method")
    data["merge_method"] = method  # the method first: the others are checked against it
    if switched:
        keep_declared(data, method)
    for path, value in params.items():
        if path == "merge_method":
            continue
        if switched and not declares(method, path):
            continue
        set_path(data, path, value)
    return MergeRecipe.model_validate(data)


def searched_parameter(path: str) -> tuple[str | None, bool]:
    """The method parameter a path sets (``t`` for ``parameters.t[mlp].0``, None for another
    recipe value) and whether it is set per model (under ``models`` or ``slices``)."""
    parts = [p for p in parse_path(path) if isinstance(p, str) and not p.startswith("[")]
    if "parameters" not in parts:
        return None, False
    after = parts[parts.index("parameters") + 1 :]
    return (after[0] if after else None), parts[0] in ("models", "slices")


def declares(method: str, path: str) -> bool:
    """Whether ``path`` makes sense for ``method``: not a parameter, or one it declares."""
    from merger.core.params import declared

    name, _ = searched_parameter(path)
    if name is None:
        return True
    return any(p.name == name for p in declared(method) or ())


def keep_declared(data: dict[str, Any], method: str) -> None:
    """Drop, at every level of the dumped recipe, the parameters ``method`` does not declare."""
    from merger.core.params import declared

    names = {p.name for p in declared(method) or ()}

    def prune(node: Any) -> None:
        if isinstance(node, dict):
            params = node.get("parameters")
            if isinstance(params, dict):
                for name in [k for k in params if k not in names]:
                    del params[name]
                if not params:
                    node.pop("parameters")
            for key in ("models", "slices", "sources"):
                for item in node.get(key) or []:
                    prune(item)
            for module in (node.get("modules") or {}).values():
                prune(module)

    prune(data)


def recipe_yaml(recipe) -> str:
    from merger.core.recipe import recipe_to_yaml

    return recipe_to_yaml(recipe)


def short(path: str) -> str:
    """A search path as a column label: ``parameters.t[mlp]`` -> ``t[mlp]``."""
    return path.removeprefix("parameters.")
