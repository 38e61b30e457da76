"""Exact-value checks of the merge methods as pure tensor functions."""

from __future__ import annotations

import math

import pytest
import torch

from merger.core.methods import (
    METHODS,
    linear,
    magnitude_mask,
    sign_consensus,
    slerp,
    task_vector_merge,
)


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)


def test_linear_weights_and_normalize(pair):
    a, b = pair
    assert torch.allclose(linear([a, b], [1.0, 3.0]), 0.25 * a + 0.75 * b, atol=1e-6)
    assert torch.allclose(linear([a, b], [1.0, 3.0], normalize=False), a + 3 * b, atol=1e-6)
    assert torch.equal(linear([a], [2.0]), a)


def test_linear_computes_in_float32_from_bf16(pair):
    a, b = (x.bfloat16() for x in pair)
    out = linear([a, b], [0.5, 0.5])
    assert out.dtype == torch.float32
    assert torch.allclose(out, (a.float() + b.float()) / 2)


def test_slerp_endpoints_are_exact(pair):
    a, b = pair
    assert torch.equal(slerp(0.0, a, b), a)
    assert torch.equal(slerp(1.0, a, b), b)


def test_slerp_midpoint_follows_the_great_circle():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    mid = slerp(0.5, a, b)
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6)
    assert torch.allclose(torch.linalg.vector_norm(mid), torch.tensor(1.0), atol=1e-6)


def test_slerp_falls_back_to_lerp_when_colinear(pair):
    a, _ = pair
    b = a * 2.0
    assert torch.allclose(slerp(0.3, a, b), 0.7 * a + 0.3 * b, atol=1e-6)


def test_magnitude_mask_keeps_exactly_k_largest():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, generator=g)
    for density in (0.01, 0.1, 0.5, 0.77, 0.999):
        mask = magnitude_mask(x, density)
        k = max(1, int(density * x.numel()))
        assert int(mask.sum()) == k
        assert x.abs()[mask].min() >= x.abs()[~mask].max()


def test_magnitude_mask_breaks_threshold_ties_by_index():
    x = torch.tensor([1.0, -1.0, 1.0, 1.0, 3.0, 0.5])
    mask = magnitude_mask(x, 0.5)  # k = 3: the 3.0, then the first two of the four 1.0s
    assert mask.tolist() == [True, True, False, False, True, False]


def test_magnitude_mask_handles_zero_and_float64():
    assert int(magnitude_mask(torch.zeros(10), 0.3).sum()) == 3
    x = torch.randn(50, dtype=torch.float64)
    assert int(magnitude_mask(x, 0.2).sum()) == 10


def test_sign_consensus_sum_elects_the_heavier_sign():
    deltas = torch.tensor([[1.0, -3.0, 0.0], [-2.0, 1.0, 0.0]])
    agree = sign_consensus(deltas, "sum")
    assert agree.tolist() == [[False, True, False], [True, False, False]]


def test_task_arithmetic_adds_weighted_task_vectors(pair):
    base, other = pair
    out = task_vector_merge(base, [other, other], [0.5, 0.25], [1.0, 1.0])
    assert torch.allclose(out, base + 0.75 * (other - base), atol=1e-6)


def test_ties_keeps_k_values_and_takes_the_disjoint_mean():
    base = torch.zeros(8)
    m1 = torch.tensor([4.0, -1.0, 0.1, 2.0, 0.0, 0.0, -3.0, 0.2])
    m2 = torch.tensor([2.0, 1.0, 0.0, -5.0, 0.3, 0.0, -1.0, 0.0])
    out = task_vector_merge(
        base,
        [m1, m2],
        [1.0, 1.0],
        [0.5, 0.5],
        sparsify="magnitude",
        consensus="sum",
        normalize=True,
    )
    # m1 keeps 4, 2, -3, -1 (k=4); m2 keeps -5, 2, 1, -1. Elected signs: + - (1-1=0 -> +) ...
    trimmed1 = torch.tensor([4.0, -1.0, 0.0, 2.0, 0.0, 0.0, -3.0, 0.0])
    trimmed2 = torch.tensor([2.0, 1.0, 0.0, -5.0, 0.0, 0.0, -1.0, 0.0])
    total = trimmed1 + trimmed2
    elected = torch.where(total >= 0, 1.0, -1.0)
    agree1 = trimmed1.sign() == elected
    agree2 = trimmed2.sign() == elected
    count = agree1.float() + agree2.float()
    expected = (trimmed1 * agree1 + trimmed2 * agree2) / torch.where(count == 0, 1.0, count)
    assert torch.allclose(out, expected)
    assert out.tolist()[:4] == [3.0, 1.0, 0.0, -5.0]


def test_ties_lambda_scales_the_merged_task_vector(pair):
    base, other = pair
    kw = dict(sparsify="magnitude", consensus="sum", normalize=True)
    one = task_vector_merge(base, [other], [1.0], [0.3], **kw)
    two = task_vector_merge(base, [other], [1.0], [0.3], lambda_=2.0, **kw)
    assert torch.allclose(two - base, 2 * (one - base), atol=1e-6)


def test_dare_is_seeded_and_rescales_l1(pair):
    base, other = pair
    kw = dict(sparsify="random", consensus=None, rescale=True)
    g1 = torch.Generator().manual_seed(7)
    g2 = torch.Generator().manual_seed(7)
    first = task_vector_merge(base, [other], [1.0], [0.5], generator=g1, **kw)
    again = task_vector_merge(base, [other], [1.0], [0.5], generator=g2, **kw)
    assert torch.equal(first, again)
    delta = first - base
    assert 0.3 < float((delta != 0).float().mean()) < 0.7
    assert torch.allclose(delta.abs().sum(), (other - base).abs().sum(), rtol=1e-4)


def test_every_method_declares_its_parameters():
    for name, spec in METHODS.items():
        assert spec.name == name
        assert spec.paper.startswith("https://")
        for p in spec.parameters:
            if p.required:
                assert p.default is None


@pytest.mark.parametrize(
    ("method", "param", "value", "message"),
    [
        ("ties", "density", 1.5, r"density must be in \[0, 1\], got 1.5"),
        ("ties", "density", -0.1, r"density must be in \[0, 1\], got -0.1"),
        ("slerp", "t", -0.1, r"t must be in \[0, 1\], got -0.1"),
        ("linear", "normalize", "maybe", r"normalize must be true or false"),
    ],
)
def test_parameter_ranges_are_checked(method, param, value, message):
    with pytest.raises(ValueError, match=message):
        METHODS[method].param(param).check(value)


@pytest.mark.parametrize(
    "merge",
    [
        lambda base, a, b, g: linear([base, a, b], [0.2, 0.5, 0.3]),
        lambda base, a, b, g: slerp(0.35, a, b),
        lambda base, a, b, g: task_vector_merge(base, [a, b], [0.7, 0.4], [1.0, 1.0]),
        lambda base, a, b, g: task_vector_merge(
            base,
            [a, b],
            [1.0, 0.5],
            [0.3, 0.6],
            sparsify="magnitude",
            consensus="sum",
            normalize=True,
        ),
        lambda base, a, b, g: task_vector_merge(
            base, [a, b], [1.0, 1.0], [0.5, 0.7], sparsify="outliers", gammas=[0.05, 0.01]
        ),
    ],
    ids=["linear", "slerp", "task_arithmetic", "ties", "breadcrumbs"],
)
def test_block_by_block_equals_one_block(merge, monkeypatch):
    """Blocks of 7 elements (many, with a ragged last one) give the one-block result.

    (DARE draws its mask block by block: seeded and reproducible, see above, but a
    different stream than one block, so it is not in this list.)"""
    from merger.core import methods

    g = torch.Generator().manual_seed(5)
    # quantised values: many entries share the trim threshold, across block borders
    base, a, b = (torch.randint(-8, 8, (10, 9), generator=g).float() / 4 for _ in range(3))
    monkeypatch.setattr(methods, "CPU_BLOCK", 10**9)
    whole = merge(base, a, b, torch.Generator().manual_seed(1))
    monkeypatch.setattr(methods, "CPU_BLOCK", 7)
    blocked = merge(base, a, b, torch.Generator().manual_seed(1))
    assert torch.equal(blocked, whole)


def test_ties_trim_across_blocks_keeps_exactly_k_in_index_order(monkeypatch):
    from merger.core import methods

    monkeypatch.setattr(methods, "CPU_BLOCK", 4)
    base = torch.zeros(20)
    model = torch.tensor([1.0] * 10 + [2.0] * 3 + [0.5] * 7)
    out = task_vector_merge(base, [model], [1.0], [0.4], sparsify="magnitude")
    # k = 8: the three 2.0s, then the first five 1.0s (index order, across blocks of 4)
    assert out.tolist() == [1.0] * 5 + [0.0] * 5 + [2.0] * 3 + [0.0] * 7
