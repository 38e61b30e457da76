"""A sweep spec: a base recipe, a search space over its parameters, the sampler, the objectives.

A sweep spec (YAML, strict)::

    name: demo-slerp                 # the optuna study name
    recipe: ../demo/slerp.yaml       # a recipe file (relative to this spec) or an inline mapping
    search:                          # recipe paths (merger.study.paths) -> ranges
      parameters.t[self_attn]: {type: float, low: 0.0, high: 1.0, step: 0.25}
      parameters.t.0: {type: float, low: 0.0, high: 1.0}          # a gradient point
      models[1].parameters.density: {type: float, low: 0.2, high: 1.0}
      merge_method: {type: categorical, choices: [slerp, linear]}
    sampler: tpe                     # grid | random | tpe | cmaes
    objectives: [dutch_score]        # one name; {dutch_score: 0.7, english_score: 0.3} (a weighted
                                     # mix); or [dutch_score, english_score] (a Pareto front)
    suite: demo                      # the eval suite each variant is scored on
    trials: 16
    seed: 0
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from kruising.config import Strict, compose_yaml, line_of
from kruising.errors import KruisingError

DEFAULT_STORAGE = "sqlite:///kruising-studies.db"
OBJECTIVES = ("dutch_score", "english_score")
SAMPLERS = ("grid", "random", "tpe", "cmaes")

Scorecard = dict[str, Any]


# --- the spec ---------------------------------------------------------------------------------


class FloatRange(Strict):
    type: Literal["float"]
    low: float
    high: float
    step: float | None = Field(None, gt=0)
    log: bool = False

    def grid(self) -> list[float] | None:
        if self.step is None:
            return None
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [round(self.low + i * self.step, 10) for i in range(n + 1)]

    def bounds(self) -> list[Any]:
        return [self.low, self.high]


class IntRange(Strict):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, gt=0)
    log: bool = False

    def grid(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))

    def bounds(self) -> list[Any]:
        return [self.low, self.high]


class Categorical(Strict):
    type: Literal["categorical"]
    choices: list[str | bool | int | float] = Field(min_length=1)

    def grid(self) -> list[Any]:
        return list(self.choices)

    def bounds(self) -> list[Any]:
        return list(self.choices)


Range = Annotated[FloatRange | IntRange | Categorical, Field(discriminator="type")]


class SweepSpec(Strict):
    """A sweep: a base recipe, the search space over it, the sampler and the objectives."""

    name: str = Field(min_length=1)
    recipe: str | dict[str, Any]
    search: dict[str, Range]
    sampler: Literal["grid", "random", "tpe", "cmaes"] = "tpe"
    objectives: list[str] | dict[str, float] = Field(default_factory=lambda: ["dutch_score"])
    suite: str = "demo"
    trials: int = Field(16, ge=1)
    seed: int = 0
    storage: str | None = None
    mode: Literal["resident", "streaming"] = "resident"
    batch: int = Field(4, ge=1)

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, value: list[str] | dict[str, float]):
        names = list(value)
        if not names:
            raise ValueError("objectives is empty; use dutch_score, english_score or both")
        unknown = [n for n in names if n not in OBJECTIVES]
        if unknown:
            raise ValueError(f"unknown objective {unknown[0]!r}; use {' or '.join(OBJECTIVES)}")
        if isinstance(value, dict) and not any(w > 0 for w in value.values()):
            raise ValueError("objective weights must have a positive sum")
        if len(set(names)) != len(names):
            raise ValueError("an objective is listed twice")
        return value

    @property
    def pareto(self) -> bool:
        return isinstance(self.objectives, list) and len(self.objectives) > 1

    def objective_names(self) -> list[str]:
        """Names of the study's values: the objectives, or one weighted mix."""
        if isinstance(self.objectives, dict):
            return ["+".join(f"{w:g}*{n}" for n, w in self.objectives.items())]
        return list(self.objectives)

    def values(self, scorecard: Scorecard) -> list[float]:
        """The study values of a scorecard (raises ValueError on a missing or NaN score)."""
        scores = {}
        for name in self.objectives:
            value = scorecard.get(name)
            if value is None or not math.isfinite(float(value)):
                raise ValueError(f"{name} is {value!r}")
            scores[name] = float(value)
        if isinstance(self.objectives, dict):
            total = sum(self.objectives.values())
            return [sum(w * scores[n] for n, w in self.objectives.items()) / total]
        return [scores[n] for n in self.objectives]


def parse_spec(text: str, source: str = "<sweep>") -> SweepSpec:
    """Parse a sweep spec; every problem of the file in one error naming file, line and field."""
    data, lines, problems = compose_yaml(text, source)
    if data is None and problems:
        where = f"{source}:{problems[0].line}"
        raise KruisingError(f"{where}: not valid YAML", "check the indentation")
    if problems:
        raise KruisingError("; ".join(str(p) for p in problems), problems[0].hint)
    if not isinstance(data, dict):
        raise KruisingError(
            f"{source}: a sweep spec is a mapping",
            "start from merger/demo_recipes/sweeps/demo-slerp.yaml",
        )
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:
        messages = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if str(p) not in ("float", "int", "categorical"))
            field = ".".join(str(p) for p in loc) or "spec"
            line = line_of(loc, lines)
            where = f"{source}:{line}" if line else source
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            messages.append(f"{where}: {field}: {message}")
        raise KruisingError(
            "; ".join(messages),
            "fields: name, recipe, search, sampler, objectives, suite, trials, seed, storage, "
            "mode, batch (an example: merger/demo_recipes/sweeps/demo-slerp.yaml)",
        ) from None


def load_spec(path: Path) -> tuple[SweepSpec, Path | None]:
    """Read a sweep spec file; returns the spec and the folder its relative paths start from."""
    path = Path(path)
    if not path.is_file():
        raise KruisingError(f"no sweep spec at {path}", "give the path of a sweep YAML file")
    return parse_spec(path.read_text(), str(path)), path.parent


def spec_recipe(spec: SweepSpec, root: Path | None):
    """The sweep's base recipe as a ``MergeRecipe`` (from the inline mapping or the file)."""
    from merger.core.recipe import load_recipe, parse_recipe

    if isinstance(spec.recipe, dict):
        return parse_recipe(yaml.safe_dump(spec.recipe, sort_keys=False), f"{spec.name}:recipe")
    path = Path(spec.recipe).expanduser()
    if not path.is_absolute() and root is not None:
        path = root / path
    if not path.is_file():
        raise KruisingError(
            f"sweep {spec.name}: no recipe at {path}",
            "recipe: is a path relative to the sweep spec, or an inline recipe mapping",
        )
    return load_recipe(path)


def suggest(trial, spec: SweepSpec) -> dict[str, Any]:
    """Ask the optuna trial for one value per searched path."""
    params = {}
    for path, rng in spec.search.items():
        if isinstance(rng, FloatRange):
            params[path] = trial.suggest_float(path, rng.low, rng.high, step=rng.step, log=rng.log)
        elif isinstance(rng, IntRange):
            params[path] = trial.suggest_int(path, rng.low, rng.high, step=rng.step, log=rng.log)
        else:
            params[path] = trial.suggest_categorical(path, rng.choices)
    return params
