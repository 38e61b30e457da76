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

from merger.core.params import PARAMETERS, ParamSpec

Tensor = torch.Tensor


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
        out_dtype: torch.dtype | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """Merge; ``out`` (flat, ``out_dtype``) receives the result when given."""
        return self.fn(
            tensors,
            base_index,
            params,
            per_model,
            generator=generator,
            out_dtype=out_dtype,
            out=out,
            **self.options,
        )


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


#: Elements per block on the CPU: large tensors are merged block by block through small
#: reused float32 buffers that stay in cache, instead of full-size temporaries (whose page
#: faults alone cost more than the arithmetic). On a GPU a tensor is one block.
CPU_BLOCK = 1 << 18


def _blocks(n: int, device: torch.device) -> list[tuple[int, int]]:
    size = n if device.type != "cpu" else CPU_BLOCK
    return [(start, min(n, start + size)) for start in range(0, max(n, 1), max(size, 1))]


def _output(out: Tensor | None, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The flat result buffer: the caller's (e.g. a view of the output shard) or a new one."""
    if out is None:
        return torch.empty(n, dtype=dtype, device=device)
    if out.numel() != n or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"out buffer is {out.dtype}[{out.numel()}] on {out.device}, need {dtype}[{n}]"
        )
    return out.reshape(-1)


def _flat(tensor: Tensor) -> Tensor:
    return tensor.reshape(-1) if tensor.is_contiguous() else tensor.contiguous().reshape(-1)


# --- linear -------------------------------------------------------------------------------


def linear(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    normalize: bool = True,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Weighted sum of the tensors, divided by the sum of weights when ``normalize``."""
    first = tensors[0]
    dtype = _compute_dtype(first)
    total = float(sum(weights))
    if normalize and total == 0:
        raise ValueError("linear weights sum to 0 with normalize: true")
    flats = [_flat(t) for t in tensors]
    n = first.numel()
    out = _output(out, n, out_dtype or dtype, first.device)
    blocks = _blocks(n, first.device)
    acc_full = torch.empty(blocks[0][1] - blocks[0][0], dtype=dtype, device=first.device)
    for start, end in blocks:
        acc = acc_full[: end - start]
        acc.zero_()
        for flat, weight in zip(flats, weights, strict=True):
            acc.add_(flat[start:end], alpha=float(weight))
        if normalize:
            acc.div_(total)
        out[start:end].copy_(acc)
    return out.reshape(first.shape)


def _linear_method(
    tensors, base_index, params, per_model, generator=None, out_dtype=None, out=None
):
    weights = [p["weight"] for p in per_model]
    return linear(tensors, weights, bool(params["normalize"]), out_dtype, out)


# --- slerp --------------------------------------------------------------------------------


def slerp(
    t: float,
    v0: Tensor,
    v1: Tensor,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Spherical interpolation from ``v0`` (t=0) to ``v1`` (t=1) over the flattened tensor.

    The angle comes from the normalised vectors; when they are nearly colinear
    (|cos| > ``dot_threshold``) this falls back to linear interpolation, as mergekit does.
    """
    dtype = _compute_dtype(v0)
    out_dtype = out_dtype or dtype
    if t in (0, 1):
        end = v0 if t == 0 else v1
        return _output(out, end.numel(), out_dtype, end.device).copy_(_flat(end)).reshape(end.shape)
    a, b = _flat(v0), _flat(v1)
    n = a.numel()
    blocks = _blocks(n, v0.device)
    size = blocks[0][1] - blocks[0][0]
    xa = torch.empty(size, dtype=dtype, device=v0.device)
    xb = torch.empty(size, dtype=dtype, device=v0.device)
    sums = torch.zeros(3, dtype=torch.float64, device=v0.device)  # |a|^2, |b|^2, a.b
    for start, end in blocks:
        x, y = xa[: end - start], xb[: end - start]
        x.copy_(a[start:end])
        y.copy_(b[start:end])
        sums[0] += torch.dot(x, x)
        sums[1] += torch.dot(y, y)
        sums[2] += torch.dot(x, y)
    coef_a, coef_b = slerp_coefficients(t, *(float(v) for v in sums.cpu()), dot_threshold, eps)
    out = _output(out, n, out_dtype, v0.device)
    for start, end in blocks:
        x, y = xa[: end - start], xb[: end - start]
        x.copy_(a[start:end])
        y.copy_(b[start:end])
        x.mul_(coef_a).add_(y, alpha=coef_b)
        out[start:end].copy_(x)
    return out.reshape(v0.shape)


def slerp_coefficients(
    t: float,
    norm2_a: float,
    norm2_b: float,
    dot: float,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
) -> tuple[float, float]:
    """The weights of v0 and v1 in slerp, from |v0|^2, |v1|^2 and v0.v1."""
    norm_a = math.sqrt(norm2_a) if math.sqrt(norm2_a) > eps else 1.0
    norm_b = math.sqrt(norm2_b) if math.sqrt(norm2_b) > eps else 1.0
    cos = max(-1.0, min(1.0, dot / (norm_a * norm_b)))
    if abs(cos) > dot_threshold:
        return 1 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def _slerp_method(tensors, base_index, params, per_model, generator=None, out_dtype=None, out=None):
    t = float(params["t"])
    return slerp(t, tensors[base_index], tensors[1 - base_index], out_dtype=out_dtype, out=out)


# --- the task-vector family -----------------------------------------------------------------


def kth_from_top(counts: Tensor, kth: int) -> tuple[int, int]:
    """One radix-select step: the bin holding the ``kth`` largest key, given the key count
    per bin, and how many keys lie in the bins above it."""
    from_top = counts.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, kth))
    bucket = counts.numel() - 1 - position
    return bucket, int(from_top[position]) - int(counts[bucket])


class _Magnitude:
    """TIES trim of one task vector: keep exactly ``k = max(1, int(density * n))`` entries.

    The threshold is the k-th largest magnitude, found by a two-pass radix select on the
    float32 bit patterns (monotonic for non-negative floats) — counting, not sorting. Entries
    strictly above it are kept; entries equal to it are kept in index order until k are
    kept. mergekit's argsort breaks such ties arbitrarily, so only they may differ.
    """

    def __init__(self, density: float, n: int) -> None:
        self.k = max(1, int(density * n))
        self.n = n
        self.high_counts: Tensor | None = None
        self.low_parts: list[Tensor] = []
        self.threshold: Tensor | None = None
        self.quota = 0

    @staticmethod
    def keys(delta: Tensor) -> Tensor:
        magnitude = delta.abs()
        return magnitude.view(torch.int32) if magnitude.dtype == torch.float32 else magnitude

    def count_high(self, delta: Tensor) -> None:
        high = torch.bincount(self.keys(delta) >> 16, minlength=1 << 15)
        self.high_counts = high if self.high_counts is None else self.high_counts + high

    def pick_bucket(self) -> None:
        self.bucket, self.above = kth_from_top(self.high_counts, self.k)

    def collect_low(self, delta: Tensor) -> None:
        keys = self.keys(delta)
        self.low_parts.append(keys[(keys >> 16) == self.bucket] & 0xFFFF)

    def pick_threshold(self, device: torch.device) -> None:
        lows = torch.cat(self.low_parts)
        low, above_in_bucket = kth_from_top(
            torch.bincount(lows, minlength=1 << 16), self.k - self.above
        )
        strictly_above = self.above + above_in_bucket
        value = (self.bucket << 16) | low
        self.threshold = torch.tensor(value, dtype=torch.int32, device=device)
        self.quota = self.k - strictly_above
        self.low_parts = []

    def exact_threshold(self, delta: Tensor) -> None:
        """float64 task vectors: a selection over the whole tensor."""
        magnitude = delta.abs().reshape(-1)
        kth = torch.kthvalue(magnitude.cpu(), self.n - self.k + 1).values
        self.threshold = kth.to(delta.device)
        self.quota = self.k - int((magnitude > self.threshold).sum())

    def mask(self, delta: Tensor) -> Tensor:
        keys = self.keys(delta)
        keep = keys > self.threshold
        if self.quota > 0:
            equal = keys == self.threshold
            n_equal = int(equal.sum())
            if n_equal:
                if n_equal > self.quota:
                    equal &= equal.cumsum(0) <= self.quota
                keep |= equal
                self.quota -= min(n_equal, self.quota)
        return keep


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Boolean mask of the ``max(1, int(density * n))`` largest-|x| entries (see `_Magnitude`)."""
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    flat = _flat(delta)
    trim = _Magnitude(density, n)
    if flat.dtype == torch.float32:
        trim.count_high(flat)
        trim.pick_bucket()
        trim.collect_low(flat)
        trim.pick_threshold(flat.device)
    else:
        trim.exact_threshold(flat)
    return trim.mask(flat).reshape(delta.shape)


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


def sign_consensus(weighted: Tensor, method: str = "sum") -> Tensor:
    """TIES sign election: mask of entries agreeing with the elected sign per position.

    ``sum``: the sign of the summed (weighted) deltas; ``count``: the majority of signs.
    Zero entries (trimmed) never agree.
    """
    signs = weighted.sign()
    total = weighted.sum(dim=0) if method == "sum" else signs.sum(dim=0)
    elected = (total >= 0).to(signs.dtype).mul_(2).sub_(1)  # +1 / -1, ties go to +1
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
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """The task-vector core: base + lambda * combine(weight_i * sparsify(model_i - base)).

    ``sparsify``: None, "magnitude" (TIES trim), "random" (DARE drop, seeded by
    ``generator``) or "outliers" (Breadcrumbs); ``rescale`` scales each kept task vector to
    its unpruned L1 norm; ``consensus``: None or "sum"/"count" (TIES sign election, disjoint
    mean); ``normalize`` divides by the summed weights of the contributing models.

    Block by block: a pass counts what the trims need (magnitude thresholds, L1 norms), the
    last pass merges; task vectors are recomputed per pass rather than stored.
    """
    dtype = _compute_dtype(base)
    device = base.device
    n = base.numel()
    out = _output(out, n, out_dtype or dtype, device)
    flat_base = _flat(base)
    if not others:
        return out.copy_(flat_base).reshape(base.shape)
    flats = [_flat(o) for o in others]
    k_models = len(others)
    blocks = _blocks(n, device)
    size = blocks[0][1] - blocks[0][0]
    base_buf = torch.empty(size, dtype=dtype, device=device)
    delta_buf = torch.empty((k_models, size), dtype=dtype, device=device)

    def load(start: int, end: int) -> tuple[Tensor, Tensor]:
        b = base_buf[: end - start]
        b.copy_(flat_base[start:end])
        d = delta_buf[:, : end - start]
        for i, flat in enumerate(flats):
            torch.sub(flat[start:end], b, out=d[i])
        return b, d

    active = [sparsify is not None and densities[i] < 1 for i in range(k_models)]
    trims: dict[int, _Magnitude] = {}
    outlier_masks: dict[int, Tensor] = {}
    if sparsify == "magnitude":
        for i in range(k_models):
            if active[i]:
                trims[i] = _Magnitude(max(densities[i], 0.0), n) if densities[i] > 0 else None
        live = {i: t for i, t in trims.items() if t is not None}
        if dtype == torch.float32:
            for start, end in blocks:
                _, d = load(start, end)
                for i, trim in live.items():
                    trim.count_high(d[i])
            for trim in live.values():
                trim.pick_bucket()
            for start, end in blocks:
                _, d = load(start, end)
                for i, trim in live.items():
                    trim.collect_low(d[i])
            for trim in live.values():
                trim.pick_threshold(device)
        else:
            for i, trim in live.items():
                trim.exact_threshold(flats[i].to(dtype) - flat_base.to(dtype))
    elif sparsify == "outliers":
        for i in range(k_models):
            if active[i]:
                delta = flats[i].to(dtype) - flat_base.to(dtype)
                outlier_masks[i] = outlier_magnitude_mask(delta, densities[i], gammas[i])

    def trimmed(d: Tensor, start: int, end: int) -> None:
        """Zero the dropped entries of each task vector in the block, in place."""
        for i in range(k_models):
            if not active[i]:
                continue
            if sparsify == "magnitude":
                trim = trims[i]
                keep = (
                    trim.mask(d[i])
                    if trim is not None
                    else torch.zeros_like(d[i], dtype=torch.bool)
                )
            elif sparsify == "random":
                draws = torch.rand(end - start, generator=generator, device=device)
                keep = draws < densities[i]
            else:
                keep = outlier_masks[i][start:end]
            d[i].mul_(keep)  # (a multiply is vectorised; masked_fill_ is not, on the CPU)

    scales = [1.0] * k_models
    if rescale and any(active):
        state = generator.get_state() if generator is not None else None
        before = torch.zeros(k_models, dtype=torch.float64, device=device)
        after = torch.zeros(k_models, dtype=torch.float64, device=device)
        quotas = {i: t.quota for i, t in trims.items() if t is not None}
        for start, end in blocks:
            _, d = load(start, end)
            before += d.abs().sum(dim=1)
            trimmed(d, start, end)
            after += d.abs().sum(dim=1)
        for i, quota in quotas.items():
            trims[i].quota = quota
        if state is not None:
            generator.set_state(state)
        for i, (b_sum, a_sum) in enumerate(zip(before.tolist(), after.tolist(), strict=True)):
            if active[i] and b_sum >= 1e-7 and a_sum >= 1e-7:
                scales[i] = b_sum / a_sum

    weight = torch.tensor(list(weights), dtype=dtype, device=device).reshape(-1, 1)
    for start, end in blocks:
        b, d = load(start, end)
        trimmed(d, start, end)
        for i, scale in enumerate(scales):
            if scale != 1.0:
                d[i].mul_(scale)
        d.mul_(weight)
        out[start:end].copy_(combine_task_vectors(b, d, weight, consensus, normalize, lambda_))
    return out.reshape(base.shape)


def task_vector_divisor(weights: Sequence[float]) -> float:
    """What ``normalize`` divides by without a sign consensus: the summed weights (or 1)."""
    total = float(sum(weights))
    return 1.0 if abs(total) < 1e-8 else total


def combine_task_vectors(
    base: Tensor,
    weighted: Tensor,
    weight: Tensor,
    consensus: str | None,
    normalize: bool,
    lambda_: float,
) -> Tensor:
    """base + lambda * mix of the trimmed, weighted task vectors (``weighted``: models x n).

    With ``consensus`` only entries agreeing with the elected sign are mixed (TIES disjoint
    mean); ``normalize`` divides by the weights that contributed. ``weighted`` is consumed.
    """
    if consensus:
        agree = sign_consensus(weighted, consensus)
        mixed = (weighted * agree).sum(dim=0)
        if normalize:
            divisor = (weight * agree).sum(dim=0)
            divisor += divisor == 0  # no agreeing model: divide by 1
            mixed.div_(divisor)
    else:
        mixed = weighted.sum(dim=0)
        if normalize:
            mixed.div_(task_vector_divisor(weight.reshape(-1).tolist()))
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base)


def _task_vector_method(
    tensors,
    base_index,
    params,
    per_model,
    generator=None,
    out_dtype=None,
    out=None,
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
        out_dtype=out_dtype,
        out=out,
    )


# --- registry -------------------------------------------------------------------------------


def _task_vector_spec(
    name: str,
    pretty: str,
    paper: str,
    *,
    sparsify: str | None,
    consensus: str | None,
) -> MethodSpec:
    return MethodSpec(
        name=name,
        pretty_name=pretty,
        paper=paper,
        fn=_task_vector_method,
        parameters=PARAMETERS[name],
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
            parameters=PARAMETERS["linear"],
        ),
        MethodSpec(
            name="slerp",
            pretty_name="SLERP",
            paper="https://en.wikipedia.org/wiki/Slerp",
            fn=_slerp_method,
            parameters=PARAMETERS["slerp"],
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
        ),
        _task_vector_spec(
            "ties",
            "TIES",
            "https://arxiv.org/abs/2306.01708",
            sparsify="magnitude",
            consensus="sum",
        ),
        _task_vector_spec(
            "dare_ties",
            "DARE TIES",
            "https://arxiv.org/abs/2311.03099",
            sparsify="random",
            consensus="sum",
        ),
        _task_vector_spec(
            "dare_linear",
            "Linear DARE",
            "https://arxiv.org/abs/2311.03099",
            sparsify="random",
            consensus=None,
        ),
        _task_vector_spec(
            "breadcrumbs",
            "Model Breadcrumbs",
            "https://arxiv.org/abs/2312.06795",
            sparsify="outliers",
            consensus=None,
        ),
        _task_vector_spec(
            "breadcrumbs_ties",
            "Model Breadcrumbs with TIES",
            "https://arxiv.org/abs/2312.06795",
            sparsify="outliers",
            consensus="sum",
        ),
    )
}
