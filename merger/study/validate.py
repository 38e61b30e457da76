"""Everything wrong with a sweep's search space, found before anything is merged."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import ValidationError

from kruising.errors import KruisingError
from merger.study.paths import (
    declares,
    dump_recipe,
    keep_declared,
    method_param,
    searched_parameter,
    set_path,
    variant_recipe,
)
from merger.study.spec import Categorical, FloatRange, IntRange, SweepSpec

# --- validation before any merging -------------------------------------------------------------


def validate(spec: SweepSpec, recipe) -> None:
    """Every problem of the search space, in one ``KruisingError``, before anything is merged."""
    from merger.core.methods import METHODS

    problems: list[str] = []
    if not spec.search:
        raise KruisingError(
            f"sweep {spec.name}: the search space is empty",
            "add at least one recipe path under search:, e.g. parameters.t: "
            "{type: float, low: 0.0, high: 1.0}",
        )
    methods = [recipe.merge_method]
    for path, rng in spec.search.items():
        if path == "merge_method":
            if not isinstance(rng, Categorical):
                problems.append("merge_method: search it as {type: categorical, choices: [...]}")
                continue
            unknown = [c for c in rng.choices if c not in METHODS]
            if unknown:
                problems.append(
                    f"merge_method: unknown method {unknown[0]!r} (known: {', '.join(METHODS)})"
                )
            methods = [str(c) for c in rng.choices if c in METHODS]
    for path, rng in spec.search.items():
        if path == "merge_method":
            continue
        try:
            name, per_model = searched_parameter(path)
        except ValueError as exc:
            problems.append(f"{path}: {exc}")
            continue
        if isinstance(rng, FloatRange | IntRange):
            if rng.low > rng.high:
                problems.append(f"{path}: low {rng.low} is above high {rng.high}")
                continue
            if rng.log and rng.low <= 0:
                problems.append(f"{path}: log scale needs low > 0, got {rng.low}")
        searched = methods != [recipe.merge_method]
        if searched and name is not None and not any(declares(m, path) for m in methods):
            problems.append(f"{path}: no searched method declares {name}")
            continue
        for method in methods:
            param = method_param(method, name, per_model) if name else None
            if param is None:
                continue
            for value in rng.bounds():
                try:
                    param.check(value)
                except ValueError as exc:
                    problems.append(f"{path}: {exc} (the range of {method} {name})")
                    break
        for value in rng.bounds()[:2] if not isinstance(rng, Categorical) else rng.choices:
            try:
                data = copy.deepcopy(dump_recipe(recipe))
                method = next((m for m in methods if declares(m, path)), methods[0])
                if method != recipe.merge_method:
                    data["merge_method"] = method
                    keep_declared(data, method)
                set_path(data, path, value)
            except (KeyError, ValueError) as exc:
                message = exc.args[0] if exc.args else str(exc)
                problems.append(f"{path}: {message}")
                break
    if spec.sampler == "grid":
        for path, rng in spec.search.items():
            if isinstance(rng, FloatRange) and rng.step is None:
                problems.append(f"{path}: the grid sampler needs a step for float ranges")
    if spec.sampler == "cmaes":
        if spec.pareto:
            problems.append("sampler cmaes optimizes one objective; use tpe for a Pareto front")
        try:
            import cmaes  # noqa: F401
        except ImportError:
            problems.append("sampler cmaes needs the cmaes package (pip install cmaes)")
    if problems:
        raise KruisingError(
            f"sweep {spec.name}: " + "; ".join(dict.fromkeys(problems)),
            "fix the search space: each path must name a value of the recipe, within the "
            "method's range",
        )
    # Corner variants validate as recipes (e.g. a method switch that lacks a parameter).
    for path, rng in spec.search.items():
        for value in rng.bounds() if isinstance(rng, Categorical) else rng.bounds()[:2]:
            params = {p: _centre(r) for p, r in spec.search.items()}
            params[path] = value
            try:
                variant_recipe(recipe, params)
            except (ValidationError, KruisingError, KeyError, ValueError) as exc:
                text = str(getattr(exc, "message", exc)).splitlines()[0]
                raise KruisingError(
                    f"sweep {spec.name}: the variant with {path}={value!r} is not a valid "
                    f"recipe: {text}",
                    "narrow the range or give the recipe the parameters every choice needs",
                ) from None


def _centre(rng: FloatRange | IntRange | Categorical) -> Any:
    if isinstance(rng, Categorical):
        return rng.choices[0]
    if isinstance(rng, IntRange):
        return rng.low
    return rng.low if rng.step is not None else (rng.low + rng.high) / 2
