"""Sweeps: a base recipe, a search space over its parameters, an optuna study that ranks variants.

A sweep spec (YAML, strict)::

    name: demo-slerp                 # the optuna study name
    recipe: ../demo/slerp.yaml       # a recipe file (relative to this spec) or an inline mapping
    search:                          # recipe paths -> ranges
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

A path walks the recipe as mergekit writes it: ``.key`` into a mapping, ``[i]`` or ``.i`` into a
list (``parameters.t.0`` is the first point of a gradient), ``[name]`` picks the entry of a
filtered list whose ``filter`` is ``name`` (``[default]``: the entry without a filter). The leaf
must be a scalar the recipe sets, or a parameter its merge method declares at that level.

Each trial builds the variant recipe, merges it in memory (inputs loaded once, a resident model
whose weights are replaced), scores it with ``eval.api.score_model`` and stores params, scores,
seconds and the variant recipe in the study. A variant that fails (NaN, an error) is recorded
FAILED with its reason; the sweep goes on. Rerunning a killed sweep continues it: trials left
RUNNING by a dead worker are failed and their variant is queued again.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator
from rich.markup import escape

from kruising.config import Strict, compose_yaml, line_of
from kruising.console import console
from kruising.errors import KruisingError

DEFAULT_STORAGE = "sqlite:///kruising-studies.db"
OBJECTIVES = ("dutch_score", "english_score")
SAMPLERS = ("grid", "random", "tpe", "cmaes")
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 60

Scorecard = dict[str, Any]
Evaluator = Callable[[Any], Scorecard]


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
        raise KruisingError(f"{source}: a sweep spec is a mapping", "start from recipes/sweeps/")
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
            "mode, batch (see recipes/sweeps/)",
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


def _method_param(method: str, name: str, per_model: bool):
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
            and _method_param(data.get("merge_method", ""), last, i > 0)
        ):
            node["parameters"] = {}  # a model without parameters: add the one searched
        node = _step(node, part, path, done)
        done = _join(done, part)
    parent_is_params = len(parts) >= 2 and parts[-2] == "parameters"
    if isinstance(last, str) and not last.startswith("[") and isinstance(node, dict):
        if last not in node or node[last] is None:
            per_model = len(parts) >= 3 and parts[0] in ("models", "slices")
            if parent_is_params and _method_param(data.get("merge_method", ""), last, per_model):
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


def _dump(recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json", exclude_none=True)


def variant_recipe(recipe, params: dict[str, Any]):
    """The base recipe with the sampled ``params`` (path -> value) set, validated again."""
    from merger.core.recipe import MergeRecipe

    data = copy.deepcopy(_dump(recipe))
    if "merge_method" in params:  # the method first: the others are checked against it
        data["merge_method"] = params["merge_method"]
    for path, value in params.items():
        if path != "merge_method":
            set_path(data, path, value)
    return MergeRecipe.model_validate(data)


def recipe_yaml(recipe) -> str:
    from merger.core.recipe import recipe_to_yaml

    return recipe_to_yaml(recipe)


# --- validation before any merging -------------------------------------------------------------


def _leaf_name(path: str) -> tuple[str | None, bool]:
    """The method parameter a path sets (``t`` for ``parameters.t[mlp].0``) and its level."""
    parts = [p for p in parse_path(path) if isinstance(p, str) and not p.startswith("[")]
    if "parameters" not in parts:
        return None, False
    after = parts[parts.index("parameters") + 1 :]
    return (after[0] if after else None), parts[0] in ("models", "slices")


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
            name, per_model = _leaf_name(path)
        except ValueError as exc:
            problems.append(f"{path}: {exc}")
            continue
        if isinstance(rng, FloatRange | IntRange):
            if rng.low > rng.high:
                problems.append(f"{path}: low {rng.low} is above high {rng.high}")
                continue
            if rng.log and rng.low <= 0:
                problems.append(f"{path}: log scale needs low > 0, got {rng.low}")
        for method in methods:
            param = _method_param(method, name, per_model) if name else None
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
                data = copy.deepcopy(_dump(recipe))
                if methods != [recipe.merge_method]:
                    data["merge_method"] = methods[0]
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


# --- storage and study ------------------------------------------------------------------------


def open_storage(url: str | None, *, heartbeat: bool = True):
    """An optuna storage for ``url`` (default: SQLite file in the current folder)."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    url = url or DEFAULT_STORAGE
    if "://" not in url:
        raise KruisingError(
            f"storage {url!r} is not a database URL",
            "use sqlite:///studies.db, postgresql://user@host/db or another optuna storage URL",
        )
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        folder = Path(url.removeprefix("sqlite:///")).expanduser().parent
        if not folder.is_dir():
            raise KruisingError(
                f"cannot open storage {url}: folder {folder} does not exist",
                "create the folder or give another sqlite:/// path",
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            if (
                url.startswith(("sqlite", "postgresql", "mysql", "oracle", "mssql"))
                or "+" in (url.split("://")[0])
            ):
                kwargs: dict[str, Any] = {}
                if heartbeat:
                    kwargs = dict(
                        heartbeat_interval=HEARTBEAT_SECONDS,
                        grace_period=GRACE_SECONDS,
                        heartbeat_stale_trial_callback=_requeue_stale,
                    )
                return optuna.storages.RDBStorage(url, **kwargs)
            return optuna.storages.get_storage(url)
    except Exception as exc:  # noqa: BLE001 - drivers raise many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KruisingError(
            f"cannot open storage {url}: {reason}",
            "check the URL, that the server is up and its driver installed (psycopg2 for "
            "postgresql)",
        ) from None


def _requeue_stale(study, trial) -> None:
    """Heartbeat-stale trial (a worker died elsewhere): queue its variant again."""
    if trial.params:
        study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})


def _sampler(spec: SweepSpec):
    import optuna

    if spec.sampler == "grid" and spec.mode == "streaming":
        # ask/tell outside study.optimize: GridSampler's stop() would raise; the streaming
        # runner queues the grid points itself (`_queue_grid`).
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler(
            {path: rng.grid() for path, rng in spec.search.items()}, seed=spec.seed
        )
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=spec.seed, warn_independent_sampling=False)
    n = min(10, max(2, spec.trials // 3))
    return optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=n)


def _fingerprint(spec: SweepSpec) -> str:
    """What a resumed sweep must share with the study it continues."""
    keep = {
        "search": {p: r.model_dump() for p, r in spec.search.items()},
        "objectives": spec.objectives,
        "suite": spec.suite,
    }
    return json.dumps(keep, sort_keys=True)


def open_study(spec: SweepSpec, storage, recipe_text: str):
    """Create the study, or load it when it exists and was made from the same search."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["maximize"] * len(spec.objective_names())
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        sampler=_sampler(spec),
        directions=directions,
        load_if_exists=True,
    )
    known = study.user_attrs.get("kruising_spec")
    if known is None:
        study.set_user_attr("kruising_spec", _fingerprint(spec))
        study.set_user_attr("objectives", spec.objective_names())
        study.set_user_attr("search", list(spec.search))
        study.set_user_attr("suite", spec.suite)
        study.set_user_attr("recipe", recipe_text)
    elif known != _fingerprint(spec):
        raise KruisingError(
            f"study {spec.name} exists with another search space, objectives or suite",
            "give the sweep a new name:, or rank the old study with `merge rank`",
        )
    return study


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(study) -> list[int]:
    """Fail trials left RUNNING by a dead worker on this host and queue their variants again.

    Workers on other hosts are caught by the heartbeat (``GRACE_SECONDS`` without one).
    Returns the numbers of the trials failed here.
    """
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    storage = study._storage
    host = socket.gethostname()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if trial.user_attrs.get("host") != host or pid is None or _alive(int(pid)):
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", f"worker {pid} died")
            storage.set_trial_user_attr(trial._trial_id, "stale", True)
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                failed.append(trial.number)
                if trial.params:
                    study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
        except Exception:  # noqa: BLE001 - another worker got there first
            continue
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fail_stale_trials(study)
    # Interrupted (Ctrl-C) variants failed without a retry: queue them once.
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for trial in trials:
        stale = trial.state == TrialState.FAIL and trial.user_attrs.get("stale")
        if stale and trial.params and trial.number not in retried:
            study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
    return failed


def finished(study) -> int:
    """Variants with a result: complete, or failed for a reason of their own (not a dead worker)."""
    from optuna.trial import TrialState

    count = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.COMPLETE:
            count += 1
        elif trial.state == TrialState.FAIL and "fail_reason" in trial.user_attrs:
            count += not trial.user_attrs.get("stale", False)
    return count


# --- running ---------------------------------------------------------------------------------


class VariantFailed(Exception):
    """A variant that cannot be scored (NaN, a merge error); recorded as a FAILED trial."""


def _suggest(trial, spec: SweepSpec) -> dict[str, Any]:
    params = {}
    for path, rng in spec.search.items():
        if isinstance(rng, FloatRange):
            params[path] = trial.suggest_float(path, rng.low, rng.high, step=rng.step, log=rng.log)
        elif isinstance(rng, IntRange):
            params[path] = trial.suggest_int(path, rng.low, rng.high, step=rng.step, log=rng.log)
        else:
            params[path] = trial.suggest_categorical(path, rng.choices)
    return params


def run_sweep(
    spec: SweepSpec,
    recipe,
    *,
    storage: str | None = None,
    trials: int | None = None,
    evaluator: Evaluator | None = None,
    device: str = "auto",
    progress: bool = True,
):
    """Run (or continue) the sweep until ``trials`` variants have a result; returns the study."""
    import optuna

    validate(spec, recipe)
    store = open_storage(storage or spec.storage, heartbeat=spec.mode == "resident")
    study = open_study(spec, store, recipe_yaml(recipe))
    target = trials or spec.trials
    grids = [r.grid() for r in spec.search.values()]
    if all(g is not None for g in grids):  # a discrete space holds this many variants at most
        target = min(target, math.prod(len(g) for g in grids))
    requeued = recover(study)
    done = finished(study)
    remaining = max(0, target - done)
    if progress:
        console.print(
            f"sweep [bold]{spec.name}[/]: {len(spec.search)} parameters, sampler {spec.sampler}, "
            f"objectives {', '.join(spec.objective_names())}, suite {spec.suite}; "
            f"{done} of {target} variants done"
            + (f", {len(requeued)} interrupted requeued" if requeued else "")
        )
    if remaining == 0:
        return study
    if evaluator is None:
        if spec.mode == "streaming":
            return _run_streaming(spec, recipe, study, remaining, device, progress)
        evaluator = InMemoryEvaluator(recipe, spec.suite, device=device)

    host, pid = socket.gethostname(), os.getpid()

    def objective(trial: optuna.Trial) -> list[float]:
        trial.set_user_attr("host", host)
        trial.set_user_attr("pid", pid)
        params = _suggest(trial, spec)
        twin = _twin(study, trial.number, params)
        if twin is not None:  # samplers repeat points of discrete spaces: don't merge twice
            trial.set_user_attr("duplicate_of", twin)
            raise optuna.TrialPruned(f"same variant as trial {twin}")
        start = time.perf_counter()
        try:
            variant = variant_recipe(recipe, params)
            trial.set_user_attr("recipe", recipe_yaml(variant))
            card = evaluator(variant)
            values = spec.values(card)
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            trial.set_user_attr("stale", True)  # not the variant's fault: rerun it next time
            raise
        except (VariantFailed, KruisingError, ValueError, ValidationError, RuntimeError) as exc:
            reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            trial.set_user_attr("fail_reason", reason.splitlines()[0][:500])
            trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))
            if progress:
                why = escape(reason.splitlines()[0])
                console.print(f"  trial {trial.number}: [red]failed[/] ({why})")
            raise VariantFailed(reason) from exc
        _store(trial, card, time.perf_counter() - start)
        if progress:
            shown = escape(", ".join(f"{short(k)}={_show(v)}" for k, v in params.items()))
            scores = "  ".join(
                f"{n} {v:.4f}" for n, v in zip(spec.objective_names(), values, strict=True)
            )
            console.print(f"  trial {trial.number}: {shown}  {scores}")
        return values

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.optimize(
            objective,
            n_trials=4 * remaining + 8,  # room for repeated points; _stop_at ends the run
            catch=(VariantFailed,),
            callbacks=[_stop_at(target)],
        )
    return study


def _twin(study, number: int, params: dict[str, Any]) -> int | None:
    """An earlier trial (complete, or failed for its own reason) with these exact params."""
    from optuna.trial import TrialState

    for other in study.get_trials(deepcopy=False):
        if other.number == number or other.params != params:
            continue
        own_failure = "fail_reason" in other.user_attrs and not other.user_attrs.get("stale")
        if other.state == TrialState.COMPLETE or (other.state == TrialState.FAIL and own_failure):
            return other.number
    return None


def short(path: str) -> str:
    """A search path as a column label: ``parameters.t[mlp]`` -> ``t[mlp]``."""
    return path.removeprefix("parameters.")


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _stop_at(target: int) -> Callable:
    """Stop when the shared study has ``target`` results (several workers on one study)."""

    def callback(study, trial) -> None:
        if finished(study) >= target:
            study.stop()

    return callback


def _store(trial, card: Scorecard, seconds: float) -> None:
    trial.set_user_attr("dutch_score", card.get("dutch_score"))
    trial.set_user_attr("english_score", card.get("english_score"))
    trial.set_user_attr("seconds", round(seconds, 3))
    trial.set_user_attr("merge_seconds", card.get("merge_seconds"))
    trial.set_user_attr("score_seconds", card.get("seconds"))
    probes = {
        name: {k: v for k, v in metrics.items() if k != "examples"}
        for name, metrics in card.get("probes", {}).items()
    }
    trial.set_user_attr("probes", probes)


# --- the in-memory evaluator ------------------------------------------------------------------


def child_skeleton(recipe, sources: dict[str, Any], device):
    """The resident model and tokenizer a variant's child would load as, weights not yet set.

    The child's ``config.json`` and tokenizer files (``tokenizer_source``, ``chat_template``)
    are written once by the engine's own writers into a temporary folder, so a variant scores
    exactly as its written child would; the model is built with ``from_config`` in the dtype
    ``eval.api.load_model`` uses (float32 on CPU, bfloat16 on GPU).
    """
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from merger.core.child import write_config, write_tokenizer
    from merger.core.plan import build_plan

    plan = build_plan(recipe, sources)
    with tempfile.TemporaryDirectory(prefix="kruising-skeleton-") as tmp:
        write_config(plan, Path(tmp))
        if write_tokenizer(plan, Path(tmp)) is None:
            raise KruisingError(
                f"none of {', '.join(sources)} has a tokenizer, which scoring needs",
                "save the tokenizer into the base model's folder",
            )
        config = AutoConfig.from_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with _no_init():  # every weight is replaced before scoring: skip the random init
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to(device).eval()
    return model, tokenizer


def _no_init():
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # an older transformers: pay for the random init
        return contextlib.nullcontext()
    return no_init_weights()


class InMemoryEvaluator:
    """Scores variants of one recipe: inputs loaded once, one resident model, weights replaced."""

    def __init__(self, recipe, suite: str, device: str = "auto", *, resident: bool = True):
        from eval.api import prepare_suite
        from eval.suites import load_suite
        from kruising.device import resolve_device
        from merger.core.engine import ResidentInputs, open_sources

        self.device = resolve_device(device)
        self.suite = suite
        self.probes = load_suite(suite)
        start = time.perf_counter()
        if resident:
            self.inputs = ResidentInputs.load(recipe, device=str(self.device))
            sources = self.inputs.sources
        else:
            self.inputs = None
            sources = open_sources(recipe)
        self.model, self.tokenizer = child_skeleton(recipe, sources, self.device)
        # The suite is tokenised (and its batches laid out) once per study, not per variant.
        self.prepared = prepare_suite(self.model, self.tokenizer, suite, probes=self.probes)
        self.load_seconds = time.perf_counter() - start

    def load_weights(self, state: dict[str, Any]) -> None:
        """Copy a child state dict into the resident model (every tensor; tied ones shared)."""
        import torch

        expected = self.model.state_dict()
        tied = _tied_keys(self.model)
        missing = [k for k in expected if k not in state and k not in tied]
        extra = [k for k in state if k not in expected]
        if missing or extra:
            raise VariantFailed(
                f"the merged child does not fit the child config: missing {missing[:3]}, "
                f"unexpected {extra[:3]}"
            )
        with torch.no_grad():
            for name, tensor in state.items():
                target = expected[name]
                if target.shape != tensor.shape:
                    raise VariantFailed(
                        f"{name}: merged shape {tuple(tensor.shape)}, "
                        f"model has {tuple(target.shape)}"
                    )
                target.copy_(tensor)

    def score(self, name: str) -> Scorecard:
        from eval.api import score_model

        return score_model(
            self.model, self.tokenizer, self.suite, name=name, prepared=self.prepared
        )

    def __call__(self, variant) -> Scorecard:
        from merger.core.engine import merge_in_memory

        start = time.perf_counter()
        state = merge_in_memory(variant, self.inputs)  # NaN/Inf: the engine raises
        self.load_weights(state)
        merge_seconds = time.perf_counter() - start
        card = self.score(variant.merge_method)
        card["merge_seconds"] = round(merge_seconds, 3)
        return card


def _tied_keys(model) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {"lm_head.weight"}


def _run_streaming(spec: SweepSpec, recipe, study, remaining: int, device: str, progress: bool):
    """One pass over the shards per batch of K variants, for inputs that do not fit in memory."""
    from merger.core.engine import merge_variants_streaming

    evaluator = InMemoryEvaluator(recipe, spec.suite, device, resident=False)
    host, pid = socket.gethostname(), os.getpid()
    while remaining > 0:
        k = min(spec.batch, remaining)
        if spec.sampler == "grid":
            _queue_grid(study, spec, k)
        trials, variants = [], []
        for _ in range(k):
            trial = study.ask()
            trial.set_user_attr("host", host)
            trial.set_user_attr("pid", pid)
            params = _suggest(trial, spec)
            try:
                variant = variant_recipe(recipe, params)
            except (KruisingError, KeyError, ValueError, ValidationError) as exc:
                _tell_failed(study, trial, str(getattr(exc, "message", exc)))
                continue
            trial.set_user_attr("recipe", recipe_yaml(variant))
            trials.append(trial)
            variants.append(variant)
        remaining -= k
        if not variants:
            continue
        start = time.perf_counter()
        states: list[dict[str, Any]] = [{} for _ in variants]
        for name, tensors in merge_variants_streaming(variants, device=device):
            for state, tensor in zip(states, tensors, strict=True):
                state[name] = tensor.to("cpu")
        merge_seconds = (time.perf_counter() - start) / len(variants)
        for trial, variant, state in zip(trials, variants, states, strict=True):
            t0 = time.perf_counter()
            try:
                evaluator.load_weights(state)
                card = evaluator.score(variant.merge_method)
                card["merge_seconds"] = round(merge_seconds, 3)
                values = spec.values(card)
            except (VariantFailed, KruisingError, ValueError, RuntimeError) as exc:
                _tell_failed(study, trial, str(getattr(exc, "message", exc)))
                continue
            _store(trial, card, merge_seconds + time.perf_counter() - t0)
            study.tell(trial, values)
        if progress:
            console.print(f"  batch of {len(variants)} variants merged in one pass")
    return study


def _queue_grid(study, spec: SweepSpec, k: int) -> None:
    """Queue up to ``k`` grid points no trial has taken yet (the streaming runner's grid)."""
    import itertools

    from optuna.trial import TrialState

    paths = list(spec.search)
    taken = {
        tuple(t.params.get(p, t.system_attrs.get("fixed_params", {}).get(p)) for p in paths)
        for t in study.get_trials(deepcopy=False)
        if not (t.state == TrialState.FAIL and t.user_attrs.get("stale"))
    }
    for point in itertools.product(*(spec.search[p].grid() for p in paths)):
        if k == 0:
            return
        if point not in taken:
            study.enqueue_trial(dict(zip(paths, point, strict=True)))
            k -= 1


def _tell_failed(study, trial, reason: str) -> None:
    from optuna.trial import TrialState

    trial.set_user_attr("fail_reason", reason.splitlines()[0][:500])
    study.tell(trial, state=TrialState.FAIL)
