"""The parameter registry: what every merge method of mergekit 0.1.5 declares, in one place.

A method's parameters are data (`ParamSpec`: name, scope, type, default, range). The registry
drives every check of a parameter value:

- the recipe (`merger.core.recipe`): a name the method does not declare is an error, and every
  literal value is checked against the declared type and range, with file and line;
- the plan (`merger.core.plan`): each resolved value is checked and converted
  (`ParamSpec.check`) and defaults are filled in, for the methods we implement natively;
- the sweep (`merger.study.sweep`): the bounds of a search range are checked the same way.

The native implementations (`merger.core.methods.METHODS`) take their parameters from here.
Light module: no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParamSpec:
    """A parameter a method takes. ``per_model`` ones are set per input model.

    ``unused``: declared by mergekit (so a recipe may set it) but without effect on this
    method (e.g. ``density`` of task_arithmetic); the planner does not resolve it.
    """

    name: str
    per_model: bool
    default: Any = None
    required: bool = False
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    applies_to_base: bool = False
    unused: bool = False
    hint: str = ""

    def check(self, value: Any) -> Any:
        """Validate and convert one resolved value; ValueError names the field and a fix."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, int | float) and value in (0, 1):
                return bool(value)
            raise ValueError(f"{self.name} must be true or false, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            what = "an integer" if self.kind is int else "a number"
            raise ValueError(f"{self.name} must be {what}, got {value!r}") from None
        if math.isnan(number) or math.isinf(number):
            raise ValueError(f"{self.name} must be finite, got {value!r}")
        if self.kind is int and not number.is_integer():
            raise ValueError(f"{self.name} must be an integer, got {value!r}")
        if not self.in_range(number):
            raise ValueError(f"{self.name} must be in {self.range_text()}, got {value!r}")
        return int(number) if self.kind is int else number

    def in_range(self, number: float) -> bool:
        if self.low is not None and (number <= self.low if self.low_open else number < self.low):
            return False
        return self.high is None or (number < self.high if self.high_open else number <= self.high)

    @property
    def has_range(self) -> bool:
        return self.low is not None or self.high is not None

    def range_text(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        opens = "(" if self.low_open or self.low is None else "["
        closes = ")" if self.high_open or self.high is None else "]"
        return f"{opens}{low}, {high}{closes}"


# --- the parameters mergekit 0.1.5 declares, method by method --------------------------------

_UNIT = {"low": 0.0, "high": 1.0}


def _density(**extra: Any) -> ParamSpec:
    return ParamSpec(
        "density",
        per_model=True,
        default=1.0,
        **_UNIT,
        hint="density is the fraction of each task vector kept",
        **extra,
    )


def _t(required: bool = True) -> ParamSpec:
    return ParamSpec(
        "t",
        per_model=False,
        required=required,
        **_UNIT,
        hint="t=0 gives the base model, t=1 the other model",
    )


_EPSILON_HINT = "epsilon is the half-width of DELLA's keep-probability range"


def _epsilon(default: float, per_model: bool) -> ParamSpec:
    return ParamSpec(
        "epsilon",
        per_model=per_model,
        default=default,
        low=0.0,
        high=1.0,
        high_open=True,
        hint=_EPSILON_HINT,
    )


def _task_vector_params(
    *,
    normalize: bool,
    rescale: bool,
    sparsify: str | None,
) -> tuple[ParamSpec, ...]:
    """mergekit's generalized task arithmetic: the same declarations for every variant."""
    params = [
        ParamSpec("normalize", per_model=False, default=normalize, kind=bool),
        ParamSpec("rescale", per_model=False, default=rescale, kind=bool),
        ParamSpec("lambda", per_model=False, default=1.0),
        ParamSpec("int8_mask", per_model=False, default=False, kind=bool),
        ParamSpec("weight", per_model=True, required=True),
        _density(unused=sparsify is None),
    ]
    if sparsify == "outliers":
        params.append(
            ParamSpec(
                "gamma",
                per_model=True,
                default=0.01,
                **_UNIT,
                hint="gamma is the fraction of largest-magnitude entries removed",
            )
        )
    if sparsify == "della":
        params.append(_epsilon(0.15, per_model=True))
    return tuple(params)


#: method name -> the parameters it declares, for every method mergekit 0.1.5 registers.
PARAMETERS: dict[str, tuple[ParamSpec, ...]] = {
    "linear": (
        ParamSpec("weight", per_model=True, required=True, applies_to_base=True),
        ParamSpec("normalize", per_model=False, default=True, kind=bool),
    ),
    "slerp": (_t(),),
    "nuslerp": (
        ParamSpec("weight", per_model=True, required=True),
        ParamSpec("nuslerp_row_wise", per_model=False, default=False, kind=bool),
        ParamSpec("nuslerp_flatten", per_model=False, default=True, kind=bool),
    ),
    "multislerp": (
        ParamSpec("weight", per_model=True, required=True),
        ParamSpec("normalize_weights", per_model=False, default=True, kind=bool),
        ParamSpec("eps", per_model=False, default=1e-8, low=0.0, low_open=True),
    ),
    "karcher": (
        ParamSpec("max_iter", per_model=False, default=10, kind=int, low=0.0),
        ParamSpec("tol", per_model=False, default=1e-5, low=0.0, low_open=True),
    ),
    "nearswap": (
        ParamSpec(
            "t",
            per_model=False,
            required=True,
            low=0.0,
            hint="nearswap's t is the distance |base - other| below which the other model's "
            "value is taken (e.g. 0.0001)",
        ),
    ),
    "passthrough": (ParamSpec("scale", per_model=True, applies_to_base=True),),
    "model_stock": (ParamSpec("filter_wise", per_model=False, default=False, kind=bool),),
    "arcee_fusion": (),
    "sce": (
        ParamSpec("int8_mask", per_model=False, default=False, kind=bool),
        ParamSpec("select_topk", per_model=False, default=1.0, low=0.0, high=1.0, low_open=True),
    ),
    "ram": (_epsilon(1e-5, per_model=False),),
    "ramplus_tl": (
        ParamSpec("r", per_model=False, default=0.1),
        ParamSpec("alpha", per_model=False, default=0.2),
        _epsilon(1e-5, per_model=False),
    ),
    "task_arithmetic": _task_vector_params(normalize=False, rescale=False, sparsify=None),
    "ties": _task_vector_params(normalize=True, rescale=False, sparsify="magnitude"),
    "dare_ties": _task_vector_params(normalize=False, rescale=True, sparsify="random"),
    "dare_linear": _task_vector_params(normalize=False, rescale=True, sparsify="random"),
    "breadcrumbs": _task_vector_params(normalize=False, rescale=False, sparsify="outliers"),
    "breadcrumbs_ties": _task_vector_params(normalize=False, rescale=False, sparsify="outliers"),
    "della": _task_vector_params(normalize=True, rescale=True, sparsify="della"),
    "della_linear": _task_vector_params(normalize=False, rescale=True, sparsify="della"),
}


def declared(method: str) -> tuple[ParamSpec, ...] | None:
    """The parameters ``method`` declares, or None for a method mergekit does not register."""
    return PARAMETERS.get(method)
