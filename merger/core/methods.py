"""Merge methods: each declares its parameters and is a pure function of tensors.

A method gets the input tensors of one output tensor (already on the compute device), the
index of the base model among them (or None), the resolved global parameters and the resolved
per-model parameters, and returns the merged tensor; casting to the output dtype is the
caller's job. No I/O, no knowledge of tensor names: the planner resolved everything.

One dtype contract: every method computes in the dtype of the tensors it is given, with
mergekit 0.1.5's operations in mergekit's order, so a bf16 input rounds where mergekit rounds;
where mergekit casts to float32 inside the method (linear, slerp, karcher's norms, ...), so does
ours, and the result is rounded back to the input dtype as mergekit's is. The caller (the
engine) hands it mergekit's compute dtype — the recipe's ``dtype``, else the promoted dtype of
the inputs — or float32 when the user asked for it (``merge run --compute-dtype float32``).
Then the result is mergekit's, bit for bit, except for the summation order of whole-tensor
reductions (norms, L1 sums: float64 here), which even torch varies with the thread count, and
slerp's angle (float64 here, float32 in mergekit: rounding noise).

Ties are broken by index: TIES keeps, of the entries equal to the k-th largest magnitude, the
lowest indices; Breadcrumbs and DELLA sort stably. mergekit's argsort/sort leave ties in an
arbitrary order; with its sort made stable it gives our result. `count_ties` counts, per merge,
the TIES entries that this rule decided.

The task-vector methods are one core, `task_vector_merge` — base + combine(sparsify(model_i -
base)) — with different settings, as in the TIES, DARE, DELLA, SCE and RAM papers and in
mergekit: TIES (magnitude trim + sign consensus), DARE (random drop), Breadcrumbs (outliers),
DELLA (magnitude-ranked random drop), SCE (variance selection, data weights, consensus), RAM
(overlap-averaged mix).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
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
    #: False: the base model is merged like any other input (mergekit's BasePolicy.IGNORED:
    #: linear, passthrough, karcher), so it need not be among a slice's sources.
    uses_base: bool = True
    min_non_base: int = 0
    max_non_base: int | None = None
    #: draws random numbers: the caller passes a seeded ``generator`` per tensor
    random: bool = False
    #: computes in the dtype it is given, as mergekit (module docstring): every method does
    exact_dtype: bool = True
    #: cross-parameter check of one tensor's resolved values: (params, per_model of the
    #: non-base inputs) -> a problem ("density 0.9 + epsilon 0.15 must be below 1") or None
    check: Callable[[dict[str, Any], Sequence[dict[str, Any]]], str | None] | None = None
    #: the dtype of the result for a compute dtype (mergekit stores it when no out_dtype is
    #: set): the compute dtype itself, except where a float32 mask or factor promotes it
    promotes_to_float32: bool = False

    def result_dtype(self, compute: torch.dtype) -> torch.dtype:
        return torch.promote_types(compute, torch.float32) if self.promotes_to_float32 else compute

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


class MergeInputError(ValueError):
    """Inputs a method cannot merge (as mergekit cannot): the engine reports it with ``hint``."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


class TieCount:
    """TIES entries decided by the tie rule in one merge (shared by the merging threads).

    Per trimmed task vector where more entries equal the k-th largest magnitude than places are
    left for them: ``tied`` counts those entries, ``kept`` the places (the lowest indices win).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.vectors = 0
        self.tied = 0
        self.kept = 0

    def add(self, tied: int, kept: int) -> None:
        with self._lock:
            self.vectors += 1
            self.tied += tied
            self.kept += kept

    def record(self) -> dict[str, Any]:
        """The provenance entry."""
        return {
            "rule": "of the entries equal to the trim threshold, the lowest indices are kept",
            "task_vectors": self.vectors,
            "tied_entries": self.tied,
            "kept_by_index": self.kept,
        }


_TIES: ContextVar[TieCount | None] = ContextVar("kruising_ties", default=None)


@contextmanager
def count_ties(counter: TieCount | None) -> Iterator[None]:
    """Within the block (this thread), TIES trims add their tie decisions to ``counter``."""
    token = _TIES.set(counter)
    try:
        yield
    finally:
        _TIES.reset(token)


def record_ties(equal: int, quota: int) -> None:
    """A trim with ``equal`` entries at its threshold and ``quota`` places left for them."""
    counter = _TIES.get()
    if counter is not None and equal > quota:
        counter.add(equal, quota)


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
    """Weighted sum of the tensors, divided by the sum of weights when ``normalize``.

    As mergekit: float32 (float64 stays float64) from the inputs' values, the weights and
    their sum in float32, the result rounded to the inputs' dtype (then to ``out_dtype``).
    """
    first = tensors[0]
    dtype = _compute_dtype(first)
    coefficients = torch.tensor([float(w) for w in weights], dtype=dtype, device=first.device)
    total = coefficients.sum()
    if normalize and float(total) == 0:
        raise ValueError("linear weights sum to 0 with normalize: true")
    flats = [_flat(t) for t in tensors]
    n = first.numel()
    out = _output(out, n, out_dtype or first.dtype, first.device)
    round_first = first.dtype != dtype and out.dtype != first.dtype
    blocks = _blocks(n, first.device)
    acc_full = torch.empty(blocks[0][1] - blocks[0][0], dtype=dtype, device=first.device)
    for start, end in blocks:
        acc = acc_full[: end - start]
        acc.zero_()
        for i, flat in enumerate(flats):
            acc.addcmul_(flat[start:end], coefficients[i])  # mergekit's op
        if normalize:
            acc.div_(total)
        out[start:end].copy_(acc.to(first.dtype) if round_first else acc)
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
    out_dtype = out_dtype or v0.dtype
    round_first = v0.dtype != dtype and out_dtype != v0.dtype  # mergekit: result in v0's dtype
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
        x.mul_(coef_a).add_(y.mul_(coef_b))  # mergekit's coef_a * x + coef_b * y
        out[start:end].copy_(x.to(v0.dtype) if round_first else x)
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


#: TIES trims with a radix select on the float32 bit pattern of |delta| (sign bit clear: 31
#: bits): the high ``31 - KEY_SHIFT`` bits pick one of HIGH_BINS bins, the low KEY_SHIFT bits
#: the key within it. The fused kernels are built with the same numbers (merger.core.kernels
#: passes them to kernels.c as -D defines).
KEY_SHIFT = 16
HIGH_BINS = 1 << (31 - KEY_SHIFT)
LOW_BINS = 1 << KEY_SHIFT
#: Rescaling to the unpruned L1 norm is skipped when either norm is below this (mergekit's
#: eps); the fused DARE rescale uses the same floor.
RESCALE_FLOOR = 1e-7


class _Magnitude:
    """TIES trim of one task vector: keep exactly ``k = max(1, int(density * n))`` entries.

    The threshold is the k-th largest magnitude, found by a two-pass radix select on the
    float32 bit patterns (monotonic for non-negative floats) — counting, not sorting. Entries
    strictly above it are kept; entries equal to it are kept in index order until k are
    kept. mergekit's argsort breaks such ties arbitrarily, so only they may differ.
    ``k`` may be given instead of a density (SCE's top-k of the variance).
    """

    def __init__(self, density: float, n: int, k: int | None = None) -> None:
        self.k = max(1, int(density * n)) if k is None else k
        self.n = n
        self.high_counts: Tensor | None = None
        self.low_parts: list[Tensor] = []
        self.threshold: Tensor | None = None
        self.quota = 0
        self.equal = 0  # entries at the threshold (the tie rule decides when > quota)

    @staticmethod
    def keys(delta: Tensor) -> Tensor:
        magnitude = delta.abs()
        if magnitude.dtype in (torch.bfloat16, torch.float16):
            magnitude = magnitude.float()  # exact: the order of the values is kept
        return magnitude.view(torch.int32) if magnitude.dtype == torch.float32 else magnitude

    def count_high(self, delta: Tensor) -> None:
        high = torch.bincount(self.keys(delta) >> KEY_SHIFT, minlength=HIGH_BINS)
        self.high_counts = high if self.high_counts is None else self.high_counts + high

    def pick_bucket(self) -> None:
        self.bucket, self.above = kth_from_top(self.high_counts, self.k)

    def collect_low(self, delta: Tensor) -> None:
        keys = self.keys(delta)
        self.low_parts.append(keys[(keys >> KEY_SHIFT) == self.bucket] & (LOW_BINS - 1))

    def pick_threshold(self, device: torch.device) -> None:
        lows = torch.cat(self.low_parts)
        counts = torch.bincount(lows, minlength=LOW_BINS)
        low, above_in_bucket = kth_from_top(counts, self.k - self.above)
        strictly_above = self.above + above_in_bucket
        value = (self.bucket << KEY_SHIFT) | low
        self.threshold = torch.tensor(value, dtype=torch.int32, device=device)
        self.quota = self.k - strictly_above
        self.equal = int(counts[low])
        self.low_parts = []

    def exact_threshold(self, delta: Tensor) -> None:
        """float64 task vectors: a selection over the whole tensor."""
        magnitude = delta.abs().reshape(-1)
        kth = torch.kthvalue(magnitude.cpu(), self.n - self.k + 1).values
        self.threshold = kth.to(delta.device)
        self.quota = self.k - int((magnitude > self.threshold).sum())
        self.equal = int((magnitude == self.threshold).sum())

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
    """Model Breadcrumbs: drop the ``gamma`` largest, then the smallest, keeping ``density``.

    The entries kept are those at positions ``[bottom, bottom + keep)`` of a stable ascending
    sort of |delta| (as float32; ties in index order), found without sorting: the keys at the
    two end ranks by a radix select (`_keys_at_ranks`), everything strictly between them, and
    of the entries equal to an end key those whose sorted position falls in the range, in
    index order.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)
    if keep <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    keys = _sort_keys(delta)
    ends = _keys_at_ranks(keys, [bottom, bottom + keep - 1])
    (low, _, _), (high, _, _) = ends
    mask = (keys > low) & (keys < high)
    for value, before, equal in dict.fromkeys(ends):
        first = max(bottom, before) - before
        last = min(bottom + keep, before + equal) - before
        if last > first:
            mask[(keys == value).nonzero().reshape(-1)[first:last]] = True
    return mask.reshape(delta.shape)


#: every NaN's sort key: one above +inf's (argsort puts NaNs last, in index order)
_NAN_KEY = 0x7F800001


def _sort_keys(delta: Tensor) -> Tensor:
    """|delta| as float32 bits (int32, sign bit clear): ordered as a float sort orders the
    magnitudes (every NaN one key, above +inf's)."""
    magnitude = delta.reshape(-1).float()
    if magnitude.data_ptr() == delta.data_ptr():
        magnitude = magnitude.clone()
    return magnitude.abs_().view(torch.int32).clamp_(max=_NAN_KEY)


def _keys_at_ranks(keys: Tensor, ranks: Sequence[int]) -> list[tuple[int, int, int]]:
    """Per ascending rank (0-based) of non-negative int32 ``keys``: (the key at that rank, how
    many keys are below it, how many equal it); a two-pass radix select (the high
    ``31 - KEY_SHIFT`` bits, then the low bits within the bin)."""
    high_keys = keys >> KEY_SHIFT
    high = torch.bincount(high_keys, minlength=HIGH_BINS).cpu()
    high_below = high.cumsum(0) - high
    found = []
    lows: dict[int, Tensor] = {}
    for rank in ranks:
        bucket = int(torch.searchsorted(high_below + high, rank, right=True))
        if bucket not in lows:
            inside = keys[high_keys == bucket] & (LOW_BINS - 1)
            lows[bucket] = torch.bincount(inside, minlength=LOW_BINS).cpu()
        low = lows[bucket]
        low_upto = low.cumsum(0)
        offset = rank - int(high_below[bucket])
        value = int(torch.searchsorted(low_upto, offset, right=True))
        below = int(high_below[bucket]) + int(low_upto[value]) - int(low[value])
        found.append(((bucket << KEY_SHIFT) | value, below, int(low[value])))
    return found


def sign_consensus(weighted: Tensor, method: str = "sum") -> Tensor:
    """TIES sign election: mask of entries agreeing with the elected sign per position.

    ``sum``: the sign of the summed (weighted) deltas; ``count``: the majority of signs.
    Zero entries (trimmed) never agree.
    """
    signs = weighted.sign()
    total = weighted.sum(dim=0) if method == "sum" else signs.sum(dim=0)
    elected = (total >= 0).to(signs.dtype).mul_(2).sub_(1)  # +1 / -1, ties go to +1
    return signs == elected


def della_magprune(
    delta: Tensor,
    density: float,
    epsilon: float,
    rescale: bool,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DELLA's MagPrune, as mergekit's ``sparsify.della_magprune``: drop each entry with a
    probability that falls with its magnitude rank within its row, then (``rescale``) scale the
    kept ones back to the tensor's L1 norm.

    Keep probabilities run linearly from ``density - epsilon`` (smallest |x| of a row) to
    ``density + epsilon`` (largest); the draws are ``torch.bernoulli`` from ``generator``. The
    work dtype is mergekit's: the tensor's own on a GPU and for bf16, float32 for a CPU half.
    Two choices where mergekit's result is not defined by its operations alone: entries of
    equal magnitude are ranked in index order (a stable sort; mergekit's argsort orders them
    arbitrarily — as TIES keeps threshold ties in index order), and the L1 norms are summed in
    float64 before rounding to the work dtype (torch's own order depends on its thread count).
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    probs = della_probabilities(delta, density, epsilon)
    mask = torch.bernoulli(probs, generator=generator).to(probs.dtype)
    tensor = delta.unsqueeze(0) if delta.dim() < 2 else delta
    tensor = tensor.to(probs.dtype)
    masked = tensor * mask
    if rescale:
        ratio = della_ratio(
            tensor.abs().sum(dtype=torch.float64),
            masked.abs().sum(dtype=torch.float64),
            probs.dtype,
        )
        if ratio is not None:
            masked = masked * ratio
    return masked.to(delta.dtype).reshape(delta.shape)


def della_work_dtype(delta: Tensor) -> torch.dtype:
    """mergekit's: the tensor's dtype on a GPU and for bf16, float32 for other CPU tensors."""
    keep = delta.device.type != "cpu" or delta.dtype == torch.bfloat16
    return delta.dtype if keep else torch.float32


def della_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's keep probability of every entry (work dtype, rows of a >= 2-D view), from the
    rank of its magnitude within its row, as mergekit computes it (ties in index order)."""
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("Epsilon must be chosen such that density +/- epsilon is in (0, 1)")
    work_dtype = della_work_dtype(delta)
    tensor = delta.unsqueeze(0) if delta.dim() < 2 else delta
    order = torch.argsort(tensor.abs(), dim=1, stable=True)
    positions = torch.arange(tensor.shape[1], device=tensor.device)
    positions = positions.view(1, -1, *([1] * (tensor.dim() - 2))).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)  # argsort(order): its inverse
    ranks = ranks.to(work_dtype) + 1
    min_ranks = ranks.min(dim=1, keepdim=True).values
    max_ranks = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def della_ratio(before: Tensor, after: Tensor, work_dtype: torch.dtype, eps: float = RESCALE_FLOOR):
    """DELLA's L1 rescale factor (before / after in the work dtype), or None where mergekit
    does not rescale (either norm below eps)."""
    before, after = before.to(work_dtype), after.to(work_dtype)
    if before < eps or after < eps:
        return None
    return before / after


def task_vector_merge(
    base: Tensor,
    others: Sequence[Tensor],
    weights: Sequence[float] | None,
    densities: Sequence[float] | None,
    *,
    sparsify: str | None = None,
    consensus: str | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    select_topk: float = 1.0,
    mix: str = "weighted",
    ram: tuple[float, float | None, float | None] | None = None,
    work_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """The task-vector core: base + lambda * combine(sparsify(model_i - base)).

    ``sparsify`` (per model): None, "magnitude" (TIES trim), "random" (DARE drop, seeded by
    ``generator``), "outliers" (Breadcrumbs, ``gammas``), "magprune" (DELLA, ``epsilons``,
    seeded; rescaled inside, as mergekit does) or "nonzero" (RAM: entries above ``ram[0]``);
    ``rescale`` scales each kept task vector to its unpruned L1 norm.
    ``select_topk`` < 1 (SCE): keep only the entries where the task vectors vary most across
    models (the top fraction of the non-zero variances), for all models at once.
    ``mix``: "weighted" — the task vectors times ``weights``, summed; with ``consensus``
    ("sum"/"count", TIES sign election) only entries agreeing with the elected sign, and
    ``normalize`` divides by the weights of the contributing models. "sce" — weights from the
    data (each model's mean squared task vector, normalised), sign election on the unweighted
    task vectors, then the weighted mean of the agreeing ones. "ram" — entries set by one model
    are taken as they are, entries several models set are averaged over them; ``ram = (epsilon,
    r, alpha)`` with r, alpha (RAM+) scaling each model's unique entries by 1 + r * min(alpha,
    shared/unique).

    ``work_dtype``: None computes in float32 (float64 stays float64); a dtype computes in that
    dtype with mergekit's operations and rounding (exact-dtype methods, module docstring).

    Block by block: a pass counts what the trims need (magnitude thresholds, L1 norms,
    variances, overlap counts), the last pass merges; task vectors are recomputed per pass
    rather than stored (DELLA's, which are random and ranked per row, are made up front).
    """
    exact = work_dtype is not None
    dtype = work_dtype or _compute_dtype(base)
    device = base.device
    n = base.numel()
    if not others:
        if exact:
            return _finish(base.to(dtype), out_dtype, out)
        out = _output(out, n, out_dtype or dtype, device)
        return out.copy_(_flat(base)).reshape(base.shape)
    out = _output(out, n, out_dtype or _mix_dtype(dtype, mix, ram), device)
    flat_base = _flat(base)
    flats = [_flat(o) for o in others]
    k_models = len(others)
    blocks = _blocks(n, device)
    size = blocks[0][1] - blocks[0][0]
    base_buf = torch.empty(size, dtype=dtype, device=device)
    delta_buf = torch.empty((k_models, size), dtype=dtype, device=device)
    densities = list(densities) if densities is not None else [1.0] * k_models

    def load(start: int, end: int) -> tuple[Tensor, Tensor]:
        b = base_buf[: end - start]
        b.copy_(flat_base[start:end])
        d = delta_buf[:, : end - start]
        for i, flat in enumerate(flats):
            if exact and flat.dtype != dtype:  # round to the compute dtype first, as mergekit
                torch.sub(flat[start:end].to(dtype), b, out=d[i])
            else:  # (float32 compute of half inputs: upcast inside the subtraction)
                torch.sub(flat[start:end], b, out=d[i])
        return b, d

    per_model_sparsify = sparsify in ("magnitude", "random", "outliers", "magprune")
    active = [per_model_sparsify and densities[i] < 1 for i in range(k_models)]
    trims: dict[int, _Magnitude | None] = {}
    precomputed_masks: dict[int, Tensor] = {}
    sparse_deltas: dict[int, Tensor] = {}
    if sparsify == "magnitude":
        for i in range(k_models):
            if active[i]:
                trims[i] = _Magnitude(max(densities[i], 0.0), n) if densities[i] > 0 else None
        live = {i: t for i, t in trims.items() if t is not None}
        _select_thresholds(live, blocks, lambda s, e: load(s, e)[1], dtype, device)
        for i, trim in live.items():
            if trim.threshold is None:
                trim.exact_threshold(flats[i].to(dtype) - flat_base.to(dtype))
            record_ties(trim.equal, trim.quota)
    elif sparsify == "outliers":
        for i in range(k_models):
            if active[i]:
                delta = flats[i].to(dtype) - flat_base.to(dtype)
                precomputed_masks[i] = outlier_magnitude_mask(delta, densities[i], gammas[i])
    elif sparsify == "magprune":
        for i in range(k_models):
            if active[i]:
                delta = others[i].to(dtype) - base.to(dtype)
                sparse_deltas[i] = _flat(
                    della_magprune(delta, densities[i], epsilons[i], rescale, generator)
                )

    joint: _Magnitude | None = None
    keep_nothing = False
    if select_topk < 1:  # SCE: the top-k of the variances across models, k of the non-zero
        if select_topk <= 0:
            keep_nothing = True
        else:
            joint, keep_nothing = _variance_selection(select_topk, n, blocks, load, dtype, device)

    def sparsified(d: Tensor, start: int, end: int) -> None:
        """Zero the dropped entries of the task vectors in the block, in place."""
        for i in range(k_models):
            if i in sparse_deltas:
                d[i].copy_(sparse_deltas[i][start:end])
                continue
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
                keep = precomputed_masks[i][start:end]
            d[i].mul_(keep)  # (a multiply is vectorised; masked_fill_ is not, on the CPU)
        if keep_nothing:
            d.mul_(0)
        elif joint is not None:
            d.mul_(joint.mask(torch.var(d, dim=0, unbiased=False)))

    def sweep(visit: Callable[[Tensor, Tensor, int, int], None]) -> None:
        """One pass over the sparsified task vectors, leaving the trims as they were."""
        state = generator.get_state() if generator is not None else None
        quotas = {i: t.quota for i, t in trims.items() if t is not None}
        joint_quota = joint.quota if joint is not None else 0
        for start, end in blocks:
            b, d = load(start, end)
            visit(b, d, start, end)
        for i, quota in quotas.items():
            trims[i].quota = quota
        if joint is not None:
            joint.quota = joint_quota
        if state is not None:
            generator.set_state(state)

    scales = [1.0] * k_models
    if rescale and sparsify in ("random", "magnitude", "outliers") and any(active):
        before = torch.zeros(k_models, dtype=torch.float64, device=device)
        after = torch.zeros(k_models, dtype=torch.float64, device=device)

        def norms(b: Tensor, d: Tensor, start: int, end: int) -> None:
            before.add_(d.abs().sum(dim=1))
            sparsified(d, start, end)
            after.add_(d.abs().sum(dim=1))

        sweep(norms)
        # mergekit's factor: the ratio of the L1 norms in its work dtype (DARE's, as DELLA's;
        # the tensor's own for the magnitude trims); the norms summed in float64 (`della_ratio`)
        ratio_dtype = dtype
        if exact and sparsify == "random":
            ratio_dtype = della_work_dtype(torch.empty(0, dtype=dtype, device=device))
        for i, (b_sum, a_sum) in enumerate(zip(before.tolist(), after.tolist(), strict=True)):
            if not active[i]:
                continue
            if exact:
                ratio = della_ratio(torch.tensor(b_sum), torch.tensor(a_sum), ratio_dtype)
                if ratio is not None:
                    scales[i] = float(ratio)
            elif b_sum >= RESCALE_FLOOR and a_sum >= RESCALE_FLOOR:
                scales[i] = b_sum / a_sum

    if mix == "sce":
        weight = _sce_weights(sweep, sparsified, k_models, n, dtype, device)
    elif mix == "ram":
        weight = None
    else:
        weight = torch.tensor(list(weights), dtype=dtype, device=device).reshape(-1, 1)
    lam = None
    if mix == "ram" and ram[1] is not None:
        lam = _ram_plus_lambdas(sweep, sparsified, k_models, *ram, device)
    divisor: float | Tensor = 1.0
    if mix == "weighted" and normalize and not consensus:
        if exact:  # mergekit: the sum of the weights, in the compute dtype
            divisor = weight.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        else:
            divisor = task_vector_divisor(weight.reshape(-1).tolist())

    for start, end in blocks:
        b, d = load(start, end)
        sparsified(d, start, end)
        for i, scale in enumerate(scales):
            if scale != 1.0:
                d[i].mul_(scale)
        if mix == "sce":
            merged = sce_combine(b, d, weight)
        elif mix == "ram":
            merged = ram_combine(b, d, ram[0], lam)
        else:
            d.mul_(weight)
            merged = combine_task_vectors(b, d, weight, consensus, normalize, lambda_, divisor)
        out[start:end].copy_(merged)
    return out.reshape(base.shape)


def _mix_dtype(dtype: torch.dtype, mix: str, ram: tuple | None) -> torch.dtype:
    """The dtype of the merged values before the output cast (RAM+'s float32 lambdas promote)."""
    if mix == "ram" and ram is not None and ram[1] is not None:
        return torch.promote_types(dtype, torch.float32)
    return dtype


def _select_thresholds(
    trims: dict[int, _Magnitude],
    blocks: list[tuple[int, int]],
    values: Callable[[int, int], Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Two counting passes of the radix select for each ``trims[i]`` over ``values(s, e)[i]``
    (float32 keys; a float64 tensor is left to ``exact_threshold``)."""
    if not trims or dtype == torch.float64:
        return
    for start, end in blocks:
        v = values(start, end)
        for i, trim in trims.items():
            trim.count_high(v[i])
    for trim in trims.values():
        trim.pick_bucket()
    for start, end in blocks:
        v = values(start, end)
        for i, trim in trims.items():
            trim.collect_low(v[i])
    for trim in trims.values():
        trim.pick_threshold(device)


def _variance_selection(
    select_topk: float,
    n: int,
    blocks: list[tuple[int, int]],
    load: Callable[[int, int], tuple[Tensor, Tensor]],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[_Magnitude | None, bool]:
    """SCE's selection (mergekit's ``sce_mask``): of the entries whose variance across the
    models' task vectors is non-zero, the ``int(count * select_topk)`` largest variances.
    Returns the trim (its mask is applied to each block's variances) and whether nothing is kept.
    """

    def variance(start: int, end: int) -> Tensor:
        return torch.var(load(start, end)[1], dim=0, unbiased=False).unsqueeze(0)

    nonzero = 0
    for start, end in blocks:
        nonzero += int(torch.count_nonzero(variance(start, end)))
    k = int(torch.tensor(nonzero) * select_topk)  # mergekit's product: a float32 tensor
    if k == 0:
        return None, True
    trim = _Magnitude(select_topk, n, k=k)
    if dtype == torch.float64:
        whole = torch.cat([variance(s, e)[0] for s, e in blocks])
        trim.exact_threshold(whole)
    else:
        _select_thresholds({0: trim}, blocks, variance, dtype, device)
    return trim, False


def _sce_weights(sweep, sparsified, k_models: int, n: int, dtype, device) -> Tensor:
    """mergekit's ``sce_weight``: each model's mean squared (selected) task vector, divided
    by their sum (uniform when the sum is below 1e-6), in the compute dtype; shape (k, 1)."""
    sums = torch.zeros(k_models, dtype=torch.float64, device=device)

    def squares(b: Tensor, d: Tensor, start: int, end: int) -> None:
        sparsified(d, start, end)
        sums.add_(d.square().sum(dim=1, dtype=torch.float64))

    sweep(squares)
    return sce_weights_from_squares(sums, n, dtype).reshape(-1, 1)


def sce_weights_from_squares(sums: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """SCE's model weights from each model's summed squared (selected) task vector (float64):
    the means in the compute dtype, divided by their sum (uniform below 1e-6), as mergekit."""
    weights = (sums / n).to(dtype)
    weight_sum = torch.sum(weights).item()
    if abs(weight_sum) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / weight_sum


def _ram_plus_lambdas(sweep, sparsified, k_models, epsilon, r, alpha, device) -> Tensor:
    """RAM+'s per-model factor 1 + r * clamp(shared / unique, 0, alpha) for the entries only
    that model sets (counts of entries above ``epsilon``, as mergekit; float32; shape (k, 1))."""
    shared = torch.zeros(k_models, dtype=torch.int64, device=device)
    unique = torch.zeros(k_models, dtype=torch.int64, device=device)

    def count(b: Tensor, d: Tensor, start: int, end: int) -> None:
        sparsified(d, start, end)
        nonzero = d.abs() > epsilon
        counts = nonzero.sum(dim=0, keepdim=True)
        shared.add_((nonzero & (counts > 1)).sum(dim=1))
        unique.add_((nonzero & (counts == 1)).sum(dim=1))

    sweep(count)
    rho = shared / unique.clamp(min=epsilon)
    return (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)


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
    divisor: float | Tensor | None = None,
) -> Tensor:
    """base + lambda * mix of the trimmed, weighted task vectors (``weighted``: models x n).

    With ``consensus`` only entries agreeing with the elected sign are mixed (TIES disjoint
    mean); ``normalize`` divides by the weights that contributed, or without consensus by
    ``divisor`` (default: the summed weights). ``weighted`` is consumed.
    """
    if consensus:
        agree = sign_consensus(weighted, consensus)
        mixed = (weighted * agree).sum(dim=0)
        if normalize:
            total = (weight * agree).sum(dim=0)
            total += total == 0  # no agreeing model: divide by 1
            mixed.div_(total)
    else:
        mixed = weighted.sum(dim=0)
        if normalize:
            if divisor is None:
                divisor = task_vector_divisor(weight.reshape(-1).tolist())
            mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base)


def sce_combine(base: Tensor, deltas: Tensor, weight: Tensor) -> Tensor:
    """SCE's merge of (selected) task vectors ``deltas`` (models x n): the sign is elected on
    the unweighted sum, then the weighted mean of the agreeing entries (mergekit's order)."""
    agree = sign_consensus(deltas, "sum")
    erased = weight * agree
    merged = (deltas * erased).sum(dim=0)
    return base + merged / erased.sum(dim=0).clamp(min=1e-6)


def ram_combine(base: Tensor, deltas: Tensor, epsilon: float, lam: Tensor | None) -> Tensor:
    """RAM: entries above ``epsilon`` in one model only are kept (RAM+: times that model's
    ``lam``), entries several models set are averaged over those models (mergekit's order)."""
    nonzero = deltas.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    overlap = counts > 1
    unique = counts == 1
    kept = deltas * nonzero
    alone = kept * unique if lam is None else kept * unique * lam
    merged = (alone + (kept * overlap / counts.clamp(min=1))).sum(dim=0)
    return base + merged


def _promoted(tensors: Sequence[Tensor]) -> torch.dtype:
    """mergekit's compute dtype of a group: the promotion of the inputs' dtypes."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _finish(result: Tensor, out_dtype: torch.dtype | None, out: Tensor | None) -> Tensor:
    """The result in ``out_dtype`` — into ``out`` (flat, ``out_dtype``) when given."""
    if out is not None:
        buffer = _output(out, result.numel(), out_dtype or out.dtype, result.device)
        buffer.copy_(result.reshape(-1))
        return buffer.reshape(result.shape)
    return result.to(out_dtype) if out_dtype is not None else result


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
    exact: bool = False,
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
        epsilons=[per_model[i].get("epsilon", 0.15) for i in others],
        work_dtype=_promoted(tensors) if exact else None,
        generator=generator,
        out_dtype=out_dtype,
        out=out,
    )


def _sce_method(tensors, base_index, params, per_model, generator=None, out_dtype=None, out=None):
    others = [i for i in range(len(tensors)) if i != base_index]
    return task_vector_merge(
        tensors[base_index],
        [tensors[i] for i in others],
        None,
        None,
        select_topk=float(params["select_topk"]),
        mix="sce",
        work_dtype=_promoted(tensors),
        out_dtype=out_dtype,
        out=out,
    )


def _ram_method(
    tensors, base_index, params, per_model, generator=None, out_dtype=None, out=None, *, plus
):
    others = [i for i in range(len(tensors)) if i != base_index]
    epsilon = float(params["epsilon"])
    ram = (epsilon, float(params["r"]), float(params["alpha"])) if plus else (epsilon, None, None)
    return task_vector_merge(
        tensors[base_index],
        [tensors[i] for i in others],
        None,
        None,
        mix="ram",
        ram=ram,
        work_dtype=_promoted(tensors),
        out_dtype=out_dtype,
        out=out,
    )


# --- passthrough, model_stock ------------------------------------------------------------------


def passthrough(tensor: Tensor, scale: float | None = None) -> Tensor:
    """The one input, times ``scale`` when given (mergekit's passthrough)."""
    return tensor if scale is None else tensor * scale


def _passthrough_method(
    tensors, base_index, params, per_model, generator=None, out_dtype=None, out=None
):
    return _finish(passthrough(tensors[0], per_model[0].get("scale")), out_dtype, out)


def model_stock(base: Tensor, others: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock: interpolate from the base towards the average of the fine-tuned models by
    t = k cos / (1 + (k - 1) cos), cos the mean pairwise cosine of their task vectors (per row
    with ``filter_wise``); where the denominator vanishes, the base (mergekit's order)."""
    w_0, ws = base, list(others)
    out_shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0 = w_0.unsqueeze(0)
            ws = [w.unsqueeze(0) for w in ws]
    else:
        w_0 = w_0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for idx, offset_a in enumerate(offsets):
        for offset_b in offsets[idx + 1 :]:
            norm_product = torch.norm(offset_a, dim=-1) * torch.norm(offset_b, dim=-1)
            cos_thetas.append(
                ((offset_a * offset_b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1)
            )
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average = sum(ws) / count
    return (t * average + (1 - t) * w_0).reshape(out_shape)


def _model_stock_method(
    tensors, base_index, params, per_model, generator=None, out_dtype=None, out=None
):
    tensors = _aligned(tensors)
    others = [t for i, t in enumerate(tensors) if i != base_index]
    merged = model_stock(tensors[base_index], others, bool(params["filter_wise"]))
    return _finish(merged, out_dtype, out)


def _aligned(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The inputs in their promoted dtype (mergekit's ``align_dtype``)."""
    dtype = _promoted(tensors)
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


# --- nuslerp, multislerp, karcher, nearswap, arcee_fusion ------------------------------------


def nuslerp(
    t: float,
    v0: Tensor,
    v1: Tensor,
    dim: int = -1,
    eps: float = 1e-8,
    flatten: bool = False,
) -> Tensor:
    """Spherical interpolation per row (``dim``) or over the flattened tensor (mergekit's
    ``nuslerp``); linear where the two are colinear (1 - cos^2 <= eps^2)."""
    out_shape = v0.shape

    def _normalize(x: Tensor, eps: float = 1e-7) -> Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)

    if flatten:
        v0 = v0.reshape(-1)
        v1 = v1.reshape(-1)
    elif dim != -1:
        v0 = v0.transpose(dim, -1)
        v1 = v1.transpose(dim, -1)
    v0_u = _normalize(v0)
    v1_u = _normalize(v1)
    cos_theta = torch.sum(v0_u * v1_u, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


def _nuslerp_method(
    tensors, base_index, params, per_model, generator=None, out_dtype=None, out=None
):
    tensors = _aligned(tensors)
    others = [i for i in range(len(tensors)) if i != base_index]
    weights = [per_model[i]["weight"] for i in others]
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    v0, v1 = (tensors[i] for i in others)
    dim = 0 if params["nuslerp_row_wise"] else -1
    flatten = bool(params["nuslerp_flatten"])
    if base_index is not None:
        base = tensors[base_index]
        merged = base + nuslerp(t, v0 - base, v1 - base, dim=dim, flatten=flatten)
    else:
        merged = nuslerp(t, v0, v1, dim=dim, flatten=flatten)
    return _finish(merged, out_dtype, out)


def multislerp(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    base: Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """Barycentric interpolation on the hypersphere (mergekit's ``multislerp``): the unit
    (task) vectors are mapped to the tangent space at their weighted mean, averaged there and
    mapped back, then scaled to the weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(list(tensors), dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] == 2:
            result = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
            return result + base if base is not None else result
        raise MergeInputError(
            "the weighted mean of the unit (task) vectors is zero: they cancel out, or are all "
            "zero (fine-tunes that left this tensor unchanged)",
            "mergekit 0.1.5 stops here too; use weights that do not balance out, two models "
            "(then multislerp falls back to linear), or another method",
        )
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangents = units - dots * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = result * (norms.squeeze(-1) * w).sum()
    result = result.view(stacked.shape[1:])
    return result + base if base is not None else result


def _multislerp_method(
    tensors, base_index, params, per_model, generator=None, out_dtype=None, out=None
):
    tensors = _aligned(tensors)
    others = [i for i in range(len(tensors)) if i != base_index]
    merged = multislerp(
        [tensors[i] for i in others],
        [per_model[i]["weight"] for i in others],
        tensors[base_index] if base_index is not None else None,
        bool(params["normalize_weights"]),
        float(params["eps"]),
    )
    return _finish(merged, out_dtype, out)


def karcher_mean(
    tensors: Sequence[Tensor], alphas: Sequence[float], max_iter: int = 10, tol: float = 1e-5
) -> Tensor:
    """The weighted Karcher (Riemannian) mean of the directions, scaled by the weighted mean
    norm (mergekit's ``karcher_merge_tensors``: norms in float32, float64 stays float64).

    mergekit's operations in its order and operand order (a 0-dim float32 factor first is
    rounded to the tensor's dtype, second it is not), each written into a buffer allocated
    once (rounding as the op that allocates its result): the same values, without a fresh
    tensor-sized allocation per op.
    """
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    half = tensors[0].dtype != dtype  # bf16/f16: the norms are of a float32 copy
    # the float32 copy the norms are taken of; between norms, its bytes hold a scratch tensor
    wide = torch.empty(tensors[0].shape, dtype=dtype, device=tensors[0].device) if half else None

    def norm_of(tensor: Tensor) -> Tensor:  # torch.linalg.vector_norm(tensor.to(dtype))
        if tensor.dtype == dtype:
            return torch.linalg.vector_norm(tensor)
        return torch.linalg.vector_norm(wide.copy_(tensor))

    norms = []
    units = []
    for tensor in tensors:
        norm = norm_of(tensor)
        norms.append(norm)
        if norm.item() == 0.0:
            units.append(torch.zeros_like(tensor))
        else:
            units.append((tensor / norm).to(tensor.dtype))
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)
    valid_alphas = [alphas[i] for i in valid]
    alpha_sum = sum(valid_alphas)
    normalized = [alpha / alpha_sum for alpha in valid_alphas]
    valid_units = [units[i] for i in valid]
    mean = torch.zeros_like(valid_units[0])
    if half and valid_units[0].element_size() * 2 == wide.element_size():
        work = wide.view(-1).view(mean.dtype)[: mean.numel()].view(mean.shape)
    else:
        work = torch.empty_like(mean)
    for alpha, unit in zip(normalized, valid_units, strict=True):
        mean += torch.mul(unit, alpha, out=work)  # alpha * unit
    mean_norm = norm_of(mean)
    if mean_norm.item() < tol:
        mean = valid_units[0].clone()
    else:
        mean = torch.div(mean, mean_norm, out=mean)
    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        tangent.zero_()
        for alpha, unit in zip(normalized, valid_units, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            # tangent += alpha * (theta / sin(theta)) * (unit - dot * mean)
            factor = alpha * (theta / torch.sin(theta))
            torch.mul(dot, mean, out=work)
            torch.sub(unit, work, out=work)
            tangent += torch.mul(factor, work, out=work)
        tangent_norm = norm_of(tangent)
        if tangent_norm.item() < tol:
            break
        # mean = cos(|tangent|) * mean + sin(|tangent|) * (tangent / |tangent|)
        torch.mul(torch.cos(tangent_norm), mean, out=mean)
        torch.div(tangent, tangent_norm, out=tangent)
        torch.mul(torch.sin(tangent_norm), tangent, out=tangent)
        mean += tangent
        unit_norm = norm_of(mean)
        if unit_norm.item() > tol:
            torch.div(mean, unit_norm, out=mean)
    wide = work = tangent = None  # freed before the result is made
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    if isinstance(scale, Tensor) and scale.dim() == 0:
        return torch.mul(scale, mean, out=mean)  # scale * mean, in place
    return scale * mean


def _karcher_method(
    tensors, base_index, params, per_model, generator=None, out_dtype=None, out=None
):
    tensors = _aligned(tensors)
    if len(tensors) == 1:
        return _finish(tensors[0], out_dtype, out)
    alphas = [1.0 / len(tensors)] * len(tensors)
    merged = karcher_mean(tensors, alphas, int(params["max_iter"]), float(params["tol"]))
    return _finish(merged, out_dtype, out)


def nearswap(t: float, base: Tensor, other: Tensor) -> Tensor:
    """NearSwap: take ``other`` where it is within ``t`` of the base, interpolating by
    t / |base - other| elsewhere (mergekit's order)."""
    absdiff = torch.abs(base - other)
    weight = (t / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def _nearswap_method(
    tensors, base_index, params, per_model, generator=None, out_dtype=None, out=None
):
    tensors = _aligned(tensors)
    other = tensors[1 - base_index]
    return _finish(nearswap(float(params["t"]), tensors[base_index], other), out_dtype, out)


#: arcee_fusion estimates its quantiles from this many entries of a larger tensor (mergekit)
QUANTILE_SAMPLE_SIZE = 1_000_000


def arcee_fusion(base: Tensor, other: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Arcee Fusion: take ``other``'s entries whose importance |other - base| * KL(softmax of
    the row) reaches median + 1.5 IQR of all importances, the base's elsewhere. The quantiles
    of a tensor above 1M entries come from 1M entries drawn (with replacement) from
    ``generator``, as mergekit draws them. The mask is float32, so the result is too."""
    eps = 1e-8
    # mergekit's ops in its operand order, written into buffers (the same values)
    diff = torch.sub(other, base).abs_()  # (other - base).abs()
    p = torch.nn.functional.softmax(other, dim=-1).add_(eps)
    q = torch.nn.functional.softmax(base, dim=-1).add_(eps)
    ratio = torch.div(p, q, out=q)  # p / q
    kl_div = torch.sum(torch.mul(p, torch.log(ratio, out=ratio), out=ratio), dim=-1, keepdim=True)
    del p, q, ratio
    importance = torch.mul(diff, kl_div, out=diff)  # diff * kl_div
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE_SIZE:
        picks = torch.randint(
            flat.numel(), (QUANTILE_SAMPLE_SIZE,), device=flat.device, generator=generator
        )
        flat = flat[picks]
    ordered, _ = torch.sort(flat)
    q_points = torch.tensor([0.25, 0.5, 0.75])
    at = (q_points.to(ordered.device) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[at]
    threshold = median + 1.5 * (q3 - q1)
    mask = (importance >= threshold).float()
    # base + (other - base) * mask
    delta = torch.sub(other, base, out=importance)
    if torch.result_type(delta, mask) != mask.dtype:  # float64: a float64 result
        return base + delta * mask
    merged = torch.mul(delta, mask, out=mask)
    return torch.add(base, merged, out=merged)


def _arcee_fusion_method(
    tensors, base_index, params, per_model, generator=None, out_dtype=None, out=None
):
    tensors = _aligned(tensors)
    merged = arcee_fusion(tensors[base_index], tensors[1 - base_index], generator)
    return _finish(merged, out_dtype, out)


# --- registry -------------------------------------------------------------------------------


def _linear_check(params: dict[str, Any], per_model: Sequence[dict[str, Any]]) -> str | None:
    """mergekit divides by the summed weights (a child of inf/NaN); we refuse at planning."""
    weights = [p.get("weight") for p in per_model]
    if params.get("normalize") and all(isinstance(w, int | float) for w in weights):
        if float(sum(weights)) == 0:
            return "linear weights sum to 0 with normalize: true"
    return None


def _della_check(params: dict[str, Any], per_model: Sequence[dict[str, Any]]) -> str | None:
    """mergekit raises mid-merge when density +/- epsilon leaves (0, 1); we say so up front."""
    for p in per_model:
        density, epsilon = p.get("density", 1.0), p.get("epsilon", 0.15)
        if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
            return (
                f"density {density:g} +/- epsilon {epsilon:g} must stay inside (0, 1) "
                "(DELLA's keep probabilities)"
            )
    return None


def _task_vector_spec(
    name: str,
    pretty: str,
    paper: str,
    *,
    sparsify: str | None,
    consensus: str | None,
) -> MethodSpec:
    magprune = sparsify == "magprune"
    return MethodSpec(
        name=name,
        pretty_name=pretty,
        paper=paper,
        fn=_task_vector_method,
        parameters=PARAMETERS[name],
        needs_base=True,
        options={"sparsify": sparsify, "consensus": consensus, "exact": True},
        random=sparsify in ("random", "magprune"),
        check=_della_check if magprune else None,
    )


def _ram_spec(name: str, pretty: str, plus: bool) -> MethodSpec:
    return MethodSpec(
        name=name,
        pretty_name=pretty,
        paper="https://arxiv.org/abs/2601.13572",
        fn=_ram_method,
        parameters=PARAMETERS[name],
        needs_base=True,
        options={"plus": plus},
        exact_dtype=True,
        promotes_to_float32=plus,
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
            uses_base=False,
            check=_linear_check,
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
        _task_vector_spec(
            "della",
            "DELLA",
            "https://arxiv.org/abs/2406.11617",
            sparsify="magprune",
            consensus="sum",
        ),
        _task_vector_spec(
            "della_linear",
            "Linear DELLA",
            "https://arxiv.org/abs/2406.11617",
            sparsify="magprune",
            consensus=None,
        ),
        MethodSpec(
            name="sce",
            pretty_name="SCE",
            paper="https://arxiv.org/abs/2408.07990",
            fn=_sce_method,
            parameters=PARAMETERS["sce"],
            needs_base=True,
            exact_dtype=True,
        ),
        _ram_spec("ram", "Reinforced Agent Merging", plus=False),
        _ram_spec("ramplus_tl", "Reinforced Agent Merging Plus (Tensor-Local)", plus=True),
        MethodSpec(
            name="passthrough",
            pretty_name="Passthrough",
            paper="https://github.com/arcee-ai/mergekit#passthrough",
            fn=_passthrough_method,
            parameters=PARAMETERS["passthrough"],
            max_models=1,
            uses_base=False,
            exact_dtype=True,
        ),
        MethodSpec(
            name="model_stock",
            pretty_name="Model Stock",
            paper="https://arxiv.org/abs/2403.19522",
            fn=_model_stock_method,
            parameters=PARAMETERS["model_stock"],
            needs_base=True,
            min_models=3,
            exact_dtype=True,
        ),
        MethodSpec(
            name="nuslerp",
            pretty_name="NuSLERP",
            paper="https://github.com/arcee-ai/mergekit#nuslerp",
            fn=_nuslerp_method,
            parameters=PARAMETERS["nuslerp"],
            min_non_base=2,
            max_non_base=2,
            exact_dtype=True,
        ),
        MethodSpec(
            name="multislerp",
            pretty_name="Multi-SLERP",
            paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
            fn=_multislerp_method,
            parameters=PARAMETERS["multislerp"],
            min_non_base=1,
            exact_dtype=True,
        ),
        MethodSpec(
            name="karcher",
            pretty_name="Karcher Mean",
            paper="https://arxiv.org/abs/2603.04972",
            fn=_karcher_method,
            parameters=PARAMETERS["karcher"],
            uses_base=False,
            exact_dtype=True,
        ),
        MethodSpec(
            name="arcee_fusion",
            pretty_name="Arcee Fusion",
            paper="https://arcee.ai",
            fn=_arcee_fusion_method,
            parameters=PARAMETERS["arcee_fusion"],
            needs_base=True,
            min_models=2,
            max_models=2,
            random=True,
            exact_dtype=True,
            promotes_to_float32=True,
        ),
        MethodSpec(
            name="nearswap",
            pretty_name="NearSwap",
            paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
            fn=_nearswap_method,
            parameters=PARAMETERS["nearswap"],
            needs_base=True,
            min_models=2,
            max_models=2,
            exact_dtype=True,
        ),
    )
}
