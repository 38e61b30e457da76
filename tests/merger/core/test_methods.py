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


def test_linear_computes_in_float32_from_bf16_and_rounds_as_mergekit(pair):
    """mergekit's linear: float32 arithmetic on bf16 inputs, the result rounded to bf16 —
    also before a wider output dtype (its ``.to(dtype)`` comes first)."""
    a, b = (x.bfloat16() for x in pair)
    weights = [0.3, 0.7]
    w = torch.tensor(weights)
    exact = torch.zeros(a.shape).addcmul_(a, w[0]).addcmul_(b, w[1]).div_(w.sum())
    out = linear([a, b], weights)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, exact.bfloat16())
    wide = linear([a, b], weights, out_dtype=torch.float32)
    assert wide.dtype == torch.float32
    assert torch.equal(wide, exact.bfloat16().float())
    assert not torch.equal(exact, exact.bfloat16().float())  # the rounding is observable


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


# --- the methods added for issue #12: exact values and closed forms --------------------------


def _run(method, tensors, base_index, shared=None, per_model=None, seed=None):
    spec = METHODS[method]
    shared = shared or {}
    params = {p.name: shared.get(p.name, p.default) for p in spec.parameters if not p.per_model}
    rows = []
    for i in range(len(tensors)):
        given = (per_model or [{}] * len(tensors))[i]
        rows.append(
            {
                p.name: given.get(p.name, p.default)
                for p in spec.parameters
                if p.per_model and (i != base_index or p.applies_to_base)
            }
        )
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return spec(tensors, base_index, params, rows, generator)


E0 = torch.tensor([1.0, 0.0, 0.0, 0.0])
E1 = torch.tensor([0.0, 1.0, 0.0, 0.0])


def test_passthrough_copies_or_scales(pair):
    a, _ = pair
    assert torch.equal(_run("passthrough", [a], None), a)
    assert torch.equal(_run("passthrough", [a], None, per_model=[{"scale": 2.0}]), 2 * a)
    out = _run("passthrough", [a.bfloat16()], None, per_model=[{"scale": 0.5}])
    assert out.dtype == torch.bfloat16 and torch.equal(out, a.bfloat16() * 0.5)


def test_model_stock_closed_forms():
    base = torch.zeros(4)
    # orthogonal task vectors: cos 0, t = 0: the base
    assert torch.equal(_run("model_stock", [base, E0, E1], 0), base)
    # equal task vectors: cos 1, t = k / (1 + k - 1) = 1: their average
    same = torch.tensor([0.5, -1.0, 2.0, 0.0])
    assert torch.allclose(_run("model_stock", [base, same, same.clone()], 0), same, atol=1e-6)
    # cos 0.5 for 2 models: t = 2 * 0.5 / 1.5 = 2/3 of the way to the average
    a, b = torch.tensor([1.0, 0.0, 0, 0]), torch.tensor([0.5, 0.75**0.5, 0, 0])
    expected = (2 / 3) * (a + b) / 2
    assert torch.allclose(_run("model_stock", [base, a, b], 0), expected, atol=1e-6)


def test_della_at_density_1_is_ties_without_trim_and_draws_nothing(pair):
    base, other = pair
    third = base - 0.5 * (other - base)
    per_model = [{}, {"weight": 1.0, "density": 1.0}, {"weight": 0.5, "density": 1.0}]
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    della = METHODS["della"]
    params = {p.name: p.default for p in della.parameters if not p.per_model}
    out = della([base, other, third], 0, params, per_model, g)
    assert torch.equal(g.get_state(), state)
    expected = task_vector_merge(
        base, [other, third], [1.0, 0.5], [1.0, 1.0], consensus="sum", normalize=True
    )
    assert torch.equal(out, expected)
    linear_out = _run("della_linear", [base, other, third], 0, per_model=per_model)
    assert torch.allclose(linear_out, base + (other - base) + 0.5 * (third - base), atol=1e-6)


def test_della_is_seeded_and_keeps_about_density():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 256, generator=g)
    other = base + torch.randn(64, 256, generator=g)
    per_model = [{}, {"weight": 1.0, "density": 0.3, "epsilon": 0.1}]
    shared = {"rescale": False}
    first = _run("della_linear", [base, other], 0, shared, per_model, seed=4)
    again = _run("della_linear", [base, other], 0, shared, per_model, seed=4)
    other_seed = _run("della_linear", [base, other], 0, shared, per_model, seed=5)
    assert torch.equal(first, again) and not torch.equal(first, other_seed)
    kept = float(((first - base) != 0).float().mean())
    assert abs(kept - 0.3) < 0.01


def test_della_check_names_density_and_epsilon():
    check = METHODS["della"].check
    assert check({}, [{"density": 0.5, "epsilon": 0.15}]) is None
    assert check({}, [{"density": 1.0, "epsilon": 0.5}]) is None  # nothing is drawn
    problem = check({}, [{"density": 0.9, "epsilon": 0.15}])
    assert "density 0.9 +/- epsilon 0.15 must stay inside (0, 1)" in problem


def test_nuslerp_ends_and_midpoint():
    w = {"nuslerp_flatten": True}
    v0, v1 = 2 * E0, 2 * E1
    at = lambda w0, w1: _run("nuslerp", [v0, v1], None, w, [{"weight": w0}, {"weight": w1}])  # noqa: E731
    assert torch.allclose(at(1.0, 0.0), v0, atol=1e-6)
    assert torch.allclose(at(0.0, 1.0), v1, atol=1e-6)
    assert torch.allclose(at(1.0, 1.0), (v0 + v1) / 2**0.5, atol=1e-6)
    # with a base: the same on the task vectors
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    out = _run("nuslerp", [base, base + v0, base + v1], 0, w, [{}, {"weight": 1}, {"weight": 1}])
    assert torch.allclose(out, base + (v0 + v1) / 2**0.5, atol=1e-6)


def test_nuslerp_row_wise_interpolates_each_column_pair():
    v0 = torch.stack([E0[:2], E0[:2]], dim=1)  # columns along dim 0
    v1 = torch.stack([E1[:2], E1[:2]], dim=1)
    out = _run(
        "nuslerp",
        [v0, v1],
        None,
        {"nuslerp_row_wise": True, "nuslerp_flatten": False},
        [{"weight": 1.0}, {"weight": 1.0}],
    )
    assert torch.allclose(out, torch.full((2, 2), 0.5**0.5), atol=1e-6)


def test_multislerp_single_model_and_orthogonal_pair():
    assert torch.equal(_run("multislerp", [E0], None, per_model=[{"weight": 3.0}]), E0)
    out = _run("multislerp", [E0, 3 * E1], None, per_model=[{"weight": 1.0}, {"weight": 1.0}])
    # the spherical midpoint of the directions, at the mean norm (1 + 3) / 2
    assert torch.allclose(out, 2 * (E0 + E1) / 2**0.5, atol=1e-5)


def test_karcher_mean_of_orthogonal_directions():
    out = _run("karcher", [E0, 3 * E1], None)
    assert torch.allclose(out, 2 * (E0 + E1) / 2**0.5, atol=1e-5)
    assert torch.equal(_run("karcher", [E1], None), E1)


def test_nearswap_t_0_is_the_base_and_a_large_t_the_other(pair):
    base, other = pair
    assert torch.equal(_run("nearswap", [base, other], 0, {"t": 0.0}), base)
    assert torch.equal(_run("nearswap", [base, other], 0, {"t": 1e9}), other)
    # within t of the base: swapped in; farther: interpolated by t / |diff|
    b, o = torch.tensor([0.0, 0.0]), torch.tensor([0.05, 0.4])
    out = _run("nearswap", [b, o], 0, {"t": 0.1})
    assert torch.allclose(out, torch.tensor([0.05, 0.25 * 0.4]), atol=1e-7)


def test_arcee_fusion_of_a_model_with_itself_is_the_base(pair):
    base, _ = pair
    assert torch.equal(_run("arcee_fusion", [base, base.clone()], 0), base)


def test_ram_takes_unique_entries_and_averages_shared_ones():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 2.0, 0.0, 1e-7])
    b = torch.tensor([0.0, 4.0, -3.0, 0.0])
    out = _run("ram", [base, a, b], 0)  # 1e-7 is below epsilon: dropped
    assert torch.equal(out, torch.tensor([1.0, 3.0, -3.0, 0.0]))
    # RAM+: a has 1 shared, 1 unique entry (rho 1 -> clamped to alpha 0.2), b 1 and 1
    plus = _run("ramplus_tl", [base, a, b], 0, {"r": 0.5, "alpha": 0.2})
    assert torch.allclose(plus, torch.tensor([1.1, 3.0, -3.3, 0.0]))
    assert plus.dtype == torch.float32


def test_new_parameter_ranges():
    with pytest.raises(ValueError, match=r"t must be in \[0, inf\), got -0.1"):
        METHODS["nearswap"].param("t").check(-0.1)
    assert METHODS["nearswap"].param("t").check(2.5) == 2.5  # a distance, not a fraction
    with pytest.raises(ValueError, match="max_iter must be an integer, got 2.5"):
        METHODS["karcher"].param("max_iter").check(2.5)
    assert METHODS["karcher"].param("max_iter").check(3.0) == 3
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\), got 1"):
        METHODS["della"].param("epsilon").check(1)
    with pytest.raises(ValueError, match=r"select_topk must be in \(0, 1\], got 0"):
        METHODS["sce"].param("select_topk").check(0)
