"""Merge methods: each declares its parameters and is a pure function of tensors.

A method gets the input tensors of one output tensor (already on the compute device, any
dtype), the index of the base model among them (or None), the resolved global parameters
and the resolved per-model parameters. It computes in float32 (float64 stays float64) on the
device it was given and returns the merged tensor; casting to the output dtype is the
caller's job. No I/O, no knowledge of tensor names: the planner resolved everything.

The task-vector family (task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
breadcrumbs_ties) is one core, `task_vector_merge`, with different settings — as in the
TIES and DARE papers and in mergekit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class ParamSpec:
    """A parameter a method takes. ``per_model`` ones are set per input model."""

    name: str
    per_model: bool
    default: Any = None
    required: bool = False
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    applies_to_base: bool = False

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
            raise ValueError(f"{self.name} must be a number, got {value!r}") from None
        if math.isnan(number) or math.isinf(number):
            raise ValueError(f"{self.name} must be finite, got {value!r}")
        if self.low is not None:
            too_low = number <= self.low if self.low_open else number < self.low
            if too_low:
                raise ValueError(f"{self.name} must be in {self.range_text()}, got {value!r}")
        if self.high is not None and number > self.high:
            raise ValueError(f"{self.name} must be in {self.range_text()}, got {value!r}")
        return number

    def range_text(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open else '['}{low}, {high}]"


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its name, paper, parameters, input contract and tensor function."""

    name: str
    pretty_name: str
    paper: str
    fn: Callable[..., Tensor]
    parameters: tuple[ParamSpec, ...] = ()
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.parameters if p.name == name), None)

    def __call__(
        self,
        tensors: Sequence[Tensor],
        base_index: int | None,
        params: dict[str, Any],
        per_model: Sequence[dict[str, Any]],
        generator: torch.Generator | None = None,
    ) -> Tensor:
        return self.fn(tensors, base_index, params, per_model, generator=generator, **self.options)


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


# --- linear -------------------------------------------------------------------------------


def linear(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    normalize: bool = True,
) -> Tensor:
    """Weighted sum of the tensors, divided by the sum of weights when ``normalize``."""
    dtype = _compute_dtype(tensors[0])
    out = torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    for tensor, weight in zip(tensors, weights, strict=True):
        out.add_(tensor.to(dtype), alpha=float(weight))
    if normalize:
        total = float(sum(weights))
        if total == 0:
            raise ValueError("linear weights sum to 0 with normalize: true")
        out.div_(total)
    return out


def _linear_method(tensors, base_index, params, per_model, generator=None) -> Tensor:
    return linear(tensors, [p["weight"] for p in per_model], bool(params["normalize"]))


# --- slerp --------------------------------------------------------------------------------


def slerp(
    t: float,
    v0: Tensor,
    v1: Tensor,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
) -> Tensor:
    """Spherical interpolation from ``v0`` (t=0) to ``v1`` (t=1) over the flattened tensor.

    The angle comes from the normalised vectors; when they are nearly colinear
    (|cos| > ``dot_threshold``) this falls back to linear interpolation, as mergekit does.
    """
    dtype = _compute_dtype(v0)
    a = v0.to(dtype)
    b = v1.to(dtype)
    if t == 0:
        return a.clone() if a is v0 else a
    if t == 1:
        return b.clone() if b is v1 else b
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = float(torch.vdot(a.reshape(-1), b.reshape(-1)) / (norm_a * norm_b))
    dot = max(-1.0, min(1.0, dot))
    if abs(dot) > dot_threshold:
        coef_a, coef_b = 1 - t, t
    else:
        theta = math.acos(dot)
        sin_theta = math.sin(theta)
        coef_a = math.sin((1 - t) * theta) / sin_theta
        coef_b = math.sin(t * theta) / sin_theta
    return torch.add(a * coef_a, b, alpha=coef_b)


def _slerp_method(tensors, base_index, params, per_model, generator=None) -> Tensor:
    other = 1 - base_index
    return slerp(float(params["t"]), tensors[base_index], tensors[other])


# --- the task-vector family -----------------------------------------------------------------


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Boolean mask keeping exactly ``k = max(1, int(density * n))`` largest-|x| entries.

    The threshold is the k-th largest magnitude, found by a two-pass radix select on the
    float32 bit patterns (monotonic for non-negative floats), not by a sort. Entries
    strictly above it are kept; entries equal to it are kept in index order until k are
    kept. mergekit's argsort breaks such ties arbitrarily, so only they may differ.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * n))
    magnitude = delta.abs().reshape(-1)
    if magnitude.dtype == torch.float32:
        keys = magnitude.view(torch.int32)
        threshold, strictly_above = _kth_largest_key(keys, k)
        mask = keys > threshold
    else:
        keys = magnitude
        threshold = torch.kthvalue(magnitude.cpu(), n - k + 1).values.to(delta.device)
        mask = keys > threshold
        strictly_above = int(mask.sum())
    missing = k - strictly_above
    if missing > 0:
        at_threshold = torch.nonzero(keys == threshold).reshape(-1)[:missing]
        mask[at_threshold] = True
    return mask.reshape(delta.shape)


def _kth_largest_key(keys: Tensor, k: int) -> tuple[Tensor, int]:
    """The k-th largest of non-negative int32 keys and how many keys are strictly larger.

    Two counting passes: bucket by the high 16 bits, then the low 16 bits of that bucket.
    """
    high = keys >> 16
    counts = torch.bincount(high, minlength=1 << 15)
    from_top = counts.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, k))
    bucket = counts.numel() - 1 - position
    above = int(from_top[position]) - int(counts[bucket])
    low = keys[high == bucket] & 0xFFFF
    low_counts = torch.bincount(low, minlength=1 << 16)
    low_from_top = low_counts.flip(0).cumsum(0)
    low_position = int(torch.searchsorted(low_from_top, k - above))
    low_value = low_counts.numel() - 1 - low_position
    strictly_above = above + int(low_from_top[low_position]) - int(low_counts[low_value])
    threshold = torch.tensor((bucket << 16) | low_value, dtype=torch.int32, device=keys.device)
    return threshold, strictly_above


def outlier_magnitude_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the ``gamma`` largest, then the smallest, keeping ``density``."""
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.argsort(delta.abs().reshape(-1).float())
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[bottom : bottom + keep]] = True
    return mask.reshape(delta.shape)


def random_mask(delta: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE: keep each entry with probability ``density`` (seeded by ``generator``)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    draws = torch.rand(delta.shape, generator=generator, device=delta.device)
    return draws < density


def _rescale_l1(delta: Tensor, kept: Tensor, eps: float = 1e-7) -> Tensor:
    """Scale the kept entries so the L1 norm matches the unpruned task vector (DARE)."""
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def sign_consensus(weighted: Tensor, method: str = "sum") -> Tensor:
    """TIES sign election: mask of entries agreeing with the elected sign per position.

    ``sum``: the sign of the summed (weighted) deltas; ``count``: the majority of signs.
    Zero entries (trimmed) never agree.
    """
    signs = weighted.sign()
    total = weighted.sum(dim=0) if method == "sum" else signs.sum(dim=0)
    elected = torch.where(total >= 0, 1.0, -1.0).to(signs.dtype)
    return signs == elected


def task_vector_merge(
    base: Tensor,
    others: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    sparsify: str | None = None,
    consensus: str | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    gammas: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The task-vector core: base + lambda * combine(weight_i * sparsify(model_i - base)).

    ``sparsify``: None, "magnitude" (TIES trim), "random" (DARE drop) or "outliers"
    (Breadcrumbs); ``consensus``: None or "sum"/"count" (TIES sign election, disjoint mean);
    ``normalize`` divides by the summed weights of the contributing models.
    """
    dtype = _compute_dtype(base)
    base32 = base.to(dtype)
    if not others:
        return base32
    deltas = torch.empty((len(others), *base.shape), dtype=dtype, device=base.device)
    for i, (model, density) in enumerate(zip(others, densities, strict=True)):
        delta = deltas[i]
        torch.sub(model.to(dtype), base32, out=delta)
        if sparsify is None or density >= 1:
            continue
        if sparsify == "magnitude":
            mask = magnitude_mask(delta, density)
        elif sparsify == "random":
            mask = random_mask(delta, density, generator)
        elif sparsify == "outliers":
            mask = outlier_magnitude_mask(delta, density, gammas[i] if gammas else 0.01)
        else:
            raise ValueError(f"unknown sparsification {sparsify!r}")
        if rescale:
            delta.copy_(_rescale_l1(delta, delta * mask))
        else:
            delta.masked_fill_(~mask, 0)
    weight = torch.tensor(list(weights), dtype=dtype, device=base.device)
    weight = weight.reshape(-1, *([1] * base.dim()))
    deltas.mul_(weight)
    if consensus:
        agree = sign_consensus(deltas, consensus)
        mixed = (deltas * agree).sum(dim=0)
        divisor = (weight * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weight.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base32)


def _task_vector_method(
    tensors,
    base_index,
    params,
    per_model,
    generator=None,
    *,
    sparsify: str | None,
    consensus: str | None,
) -> Tensor:
    others = [i for i in range(len(tensors)) if i != base_index]
    return task_vector_merge(
        tensors[base_index],
        [tensors[i] for i in others],
        [per_model[i]["weight"] for i in others],
        [per_model[i].get("density", 1.0) for i in others],
        sparsify=sparsify,
        consensus=consensus,
        normalize=bool(params["normalize"]),
        rescale=bool(params["rescale"]),
        lambda_=float(params["lambda"]),
        gammas=[per_model[i].get("gamma", 0.01) for i in others],
        generator=generator,
    )


# --- registry -------------------------------------------------------------------------------

_WEIGHT = ParamSpec("weight", per_model=True, required=True)
_DENSITY = ParamSpec("density", per_model=True, default=1.0, low=0.0, high=1.0)


def _task_vector_spec(
    name: str,
    pretty: str,
    paper: str,
    *,
    sparsify: str | None,
    consensus: str | None,
    normalize: bool,
    rescale: bool,
) -> MethodSpec:
    params = [
        ParamSpec("normalize", per_model=False, default=normalize, kind=bool),
        ParamSpec("rescale", per_model=False, default=rescale, kind=bool),
        ParamSpec("lambda", per_model=False, default=1.0),
        ParamSpec("int8_mask", per_model=False, default=False, kind=bool),
        _WEIGHT,
    ]
    if sparsify is not None:
        params.append(_DENSITY)
    if sparsify == "outliers":
        params.append(ParamSpec("gamma", per_model=True, default=0.01, low=0.0, high=1.0))
    return MethodSpec(
        name=name,
        pretty_name=pretty,
        paper=paper,
        fn=_task_vector_method,
        parameters=tuple(params),
        needs_base=True,
        options={"sparsify": sparsify, "consensus": consensus},
    )


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            name="linear",
            pretty_name="Linear (model soups)",
            paper="https://arxiv.org/abs/2203.05482",
            fn=_linear_method,
            parameters=(
                ParamSpec("weight", per_model=True, required=True, applies_to_base=True),
                ParamSpec("normalize", per_model=False, default=True, kind=bool),
            ),
        ),
        MethodSpec(
            name="slerp",
            pretty_name="SLERP",
            paper="https://en.wikipedia.org/wiki/Slerp",
            fn=_slerp_method,
            parameters=(ParamSpec("t", per_model=False, required=True, low=0.0, high=1.0),),
            needs_base=True,
            min_models=2,
            max_models=2,
        ),
        _task_vector_spec(
            "task_arithmetic",
            "Task Arithmetic",
            "https://arxiv.org/abs/2212.04089",
            sparsify=None,
            consensus=None,
            normalize=False,
            rescale=False,
        ),
        _task_vector_spec(
            "ties",
            "TIES",
            "https://arxiv.org/abs/2306.01708",
            sparsify="magnitude",
            consensus="sum",
            normalize=True,
            rescale=False,
        ),
        _task_vector_spec(
            "dare_ties",
            "DARE TIES",
            "https://arxiv.org/abs/2311.03099",
            sparsify="random",
            consensus="sum",
            normalize=False,
            rescale=True,
        ),
        _task_vector_spec(
            "dare_linear",
            "Linear DARE",
            "https://arxiv.org/abs/2311.03099",
            sparsify="random",
            consensus=None,
            normalize=False,
            rescale=True,
        ),
        _task_vector_spec(
            "breadcrumbs",
            "Model Breadcrumbs",
            "https://arxiv.org/abs/2312.06795",
            sparsify="outliers",
            consensus=None,
            normalize=False,
            rescale=False,
        ),
        _task_vector_spec(
            "breadcrumbs_ties",
            "Model Breadcrumbs with TIES",
            "https://arxiv.org/abs/2312.06795",
            sparsify="outliers",
            consensus="sum",
            normalize=False,
            rescale=False,
        ),
    )
}
