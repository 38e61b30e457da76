"""Tensor-level parity: each exact-dtype method against mergekit 0.1.5's own implementation.

Both get the same tensors (float32 and bf16, stored as they would be loaded) and the same
parameters; mergekit's method is called through its public `merge_tensors`, which aligns the
dtypes as its engine does. The results must be the same tensors, bit for bit, dtype included —
except where a whole-tensor reduction is summed in another order (SCE's weights: float64 here),
which the tolerance of that test names. Random methods (DELLA, arcee_fusion's quantile sample)
draw from a generator seeded like mergekit's global one, so those are exact too.
"""

from __future__ import annotations

import pytest
import torch

from merger.core.methods import METHODS

DTYPES = [torch.float32, torch.bfloat16]


def _mergekit(method, tensors, base_index, parameters, seed=None):
    from mergekit.merge_methods import merge_tensors

    if seed is not None:
        torch.manual_seed(seed)
    return merge_tensors(tensors, method, parameters=parameters, base_index=base_index)


def _ours(method, tensors, base_index, shared=None, per_model=None, seed=None):
    """Call our method with its defaults filled in, as the planner resolves them."""
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


def _inputs(n_models, dtype, shape=(24, 40), seed=0, spread=0.05):
    """A base and fine-tunes near it (as real task vectors are), in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    out = [base]
    for _ in range(n_models - 1):
        out.append(base + spread * torch.randn(shape, generator=g))
    return [t.to(dtype) for t in out]


def _same(ours, theirs):
    assert ours.dtype == theirs.dtype
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs), f"max diff {(ours.float() - theirs.float()).abs().max()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [None, 0.5, -1.25])
def test_passthrough(dtype, scale):
    (x,) = _inputs(1, dtype)
    theirs = _mergekit("passthrough", [x], None, {"scale": scale})
    _same(_ours("passthrough", [x], None, per_model=[{"scale": scale}]), theirs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(24, 40), (40,)])
@pytest.mark.parametrize("n_models", [3, 4])
def test_model_stock(dtype, filter_wise, shape, n_models):
    tensors = _inputs(n_models, dtype, shape)
    params = {"filter_wise": filter_wise}
    theirs = _mergekit("model_stock", tensors, 0, params)
    _same(_ours("model_stock", tensors, 0, params), theirs)


def test_model_stock_singular_denominator_keeps_the_base():
    base = torch.zeros(6)
    a = torch.tensor([1.0, 0, 0, 0, 0, 0])
    b = -a  # cos = -1 with 2 models: 1 + (2 - 1) * -1 = 0
    theirs = _mergekit("model_stock", [base, a, b], 0, {})
    ours = _ours("model_stock", [base, a, b], 0)
    _same(ours, theirs)
    assert torch.equal(ours, base)


def _tie_free(n_models, dtype, shape=(24, 40), seed=0):
    """A zero base and models whose rows hold distinct magnitudes (DELLA ranks them: ties are
    ordered by index here, arbitrarily by mergekit's argsort; see the tie test below)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = (1, shape[0]) if len(shape) == 1 else shape
    levels = torch.linspace(0.01, 1.0, cols).to(dtype)
    assert len(set(levels.tolist())) == cols
    out = [torch.zeros(shape, dtype=dtype)]
    for _ in range(n_models - 1):
        picks = torch.stack([levels[torch.randperm(cols, generator=g)] for _ in range(rows)])
        signs = torch.where(torch.rand(rows, cols, generator=g) < 0.5, -1.0, 1.0).to(dtype)
        out.append((picks * signs).reshape(shape))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize(
    ("densities", "epsilons", "rescale"),
    [
        ([0.5, 0.3], [0.15, 0.1], None),
        ([0.7, 0.4], [0.2, 0.05], False),
        ([1.0, 0.5], [0.15, 0.15], True),
        ([1.0, 1.0], [0.15, 0.15], None),  # nothing drawn: deterministic
        ([0.0, 0.6], [0.15, 0.3], None),
    ],
)
def test_della_same_seed_same_child(dtype, method, densities, epsilons, rescale):
    tensors = _tie_free(3, dtype)
    weights = [0.6, 0.5]
    parameters = {"weight": weights, "density": densities, "epsilon": epsilons}
    shared = {}
    if rescale is not None:
        parameters["rescale"] = shared["rescale"] = rescale
    theirs = _mergekit(method, tensors, 0, parameters, seed=11)
    per_model = [{}] + [
        {"weight": w, "density": d, "epsilon": e}
        for w, d, e in zip(weights, densities, epsilons, strict=True)
    ]
    ours = _ours(method, tensors, 0, shared, per_model, seed=11)
    rescaled = rescale is not False and any(0 < d < 1 for d in densities)
    if dtype == torch.float32 and rescaled:
        # the L1 norms of the rescale: float64 sums here, float32 in torch's order there;
        # the factor can differ in its last bit
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=3e-7, atol=6e-7)
    else:
        _same(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_della_1d_and_lambda(dtype):
    tensors = _tie_free(3, dtype, shape=(64,))
    parameters = {"weight": [1.0, 0.5], "density": 0.4, "lambda": 1.5, "normalize": False}
    parameters["rescale"] = False
    theirs = _mergekit("della", tensors, 0, parameters, seed=3)
    per_model = [{}] + [{"weight": w, "density": 0.4} for w in (1.0, 0.5)]
    shared = {"lambda": 1.5, "normalize": False, "rescale": False}
    _same(_ours("della", tensors, 0, shared, per_model, seed=3), theirs)


def test_della_ranks_equal_magnitudes_in_index_order():
    """All entries of a row equally large: ranks 1..n by position, so the keep probability
    rises along the row from density - epsilon to density + epsilon."""
    from merger.core.methods import della_probabilities

    probs = della_probabilities(torch.full((2, 11), -0.5), 0.5, 0.2)
    expected = torch.linspace(0.3, 0.7, 11)
    torch.testing.assert_close(probs, expected.expand(2, -1), rtol=0, atol=1e-6)


def test_della_keep_probability_follows_the_magnitude_rank():
    """Over many seeds, the largest entry of each row is kept with density + epsilon and the
    smallest with density - epsilon; the kept L1 norm matches on average (rescale)."""
    from merger.core.methods import della_magprune

    row = torch.linspace(0.01, 1.0, 101)[
        torch.randperm(101, generator=torch.Generator().manual_seed(0))
    ]
    delta = row.repeat(400, 1)
    kept = della_magprune(
        delta, 0.5, 0.2, rescale=False, generator=torch.Generator().manual_seed(1)
    )
    frequency = (kept != 0).float().mean(dim=0)
    order = row.argsort()
    assert abs(float(frequency[order[-1]]) - 0.7) < 0.06
    assert abs(float(frequency[order[0]]) - 0.3) < 0.06
    assert abs(float(frequency.mean()) - 0.5) < 0.01
    rescaled = della_magprune(
        delta, 0.5, 0.2, rescale=True, generator=torch.Generator().manual_seed(1)
    )
    assert torch.allclose(rescaled.abs().sum(), delta.abs().sum(), rtol=1e-5)


def _without_threshold_ties(n_models, dtype, select_topk):
    """Inputs whose task-vector variances do not tie at SCE's top-k threshold (torch.topk
    keeps arbitrary ones of tied entries, we keep them in index order: see the next test)."""
    for seed in range(50):
        tensors = _inputs(n_models + 1, dtype, seed=seed)
        deltas = torch.stack([t - tensors[0] for t in tensors[1:]])
        var = torch.var(deltas, dim=0, unbiased=False).reshape(-1)
        k = int(torch.count_nonzero(var) * select_topk)
        if select_topk >= 1 or int((var == var.topk(k).values[-1]).sum()) == 1:
            return tensors
    raise AssertionError("no tie-free inputs found")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("n_models", [2, 3])
def test_sce(dtype, select_topk, n_models):
    tensors = _without_threshold_ties(n_models, dtype, select_topk)
    params = {"select_topk": select_topk}
    theirs = _mergekit("sce", tensors, 0, params)
    ours = _ours("sce", tensors, 0, params)
    if dtype == torch.bfloat16:
        _same(ours, theirs)
    else:
        # each model's weight is a whole-tensor mean of squares: we sum it in float64, torch
        # in float32 in its own order, so the weights (and the results) differ in the last bit
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=3e-7, atol=1.2e-7)


def test_sce_selection_keeps_exactly_k_ties_in_index_order():
    base = torch.zeros(8)
    a = torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0, 0.0, 0.0, 0.0])
    b = torch.zeros(8)
    # variances 0.25 x4, 2.25, then zeros: 5 non-zero, k = int(5 * 0.6) = 3 -> the 3.0 and
    # the first two of the tied 1.0s
    out = _ours("sce", [base, a, b], 0, {"select_topk": 0.6})
    assert torch.equal(out, torch.tensor([1.0, 1.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0]))


def test_sce_is_ties_like_with_data_weights():
    """Two models, disjoint task vectors, nothing selected away: each entry comes from the one
    model that set it (the weighted mean of one agreeing model)."""
    base = torch.zeros(4)
    a = torch.tensor([1.0, 0, 2.0, 0])
    b = torch.tensor([0, -3.0, 0, 0.5])
    out = _ours("sce", [base, a, b], 0)
    assert torch.equal(out, torch.tensor([1.0, -3.0, 2.0, 0.5]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_wise", [False, True])
@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp(dtype, row_wise, flatten, with_base):
    tensors = _inputs(3, dtype)
    shared = {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
    weights = [0.3, 0.9]
    if with_base:
        theirs = _mergekit("nuslerp", tensors, 0, {"weight": weights, **shared})
        per_model = [{}] + [{"weight": w} for w in weights]
        _same(_ours("nuslerp", tensors, 0, shared, per_model), theirs)
    else:
        theirs = _mergekit("nuslerp", tensors[1:], None, {"weight": weights, **shared})
        per_model = [{"weight": w} for w in weights]
        _same(_ours("nuslerp", tensors[1:], None, shared, per_model), theirs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize_weights", [True, False])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("n_models", [1, 2, 3])
def test_multislerp(dtype, normalize_weights, with_base, n_models):
    tensors = _inputs(n_models + 1, dtype)
    weights = [0.5, 0.3, 0.8][:n_models]
    shared = {"normalize_weights": normalize_weights, "eps": 1e-8}
    base_index = 0 if with_base else None
    inputs = tensors if with_base else tensors[1:]
    theirs = _mergekit("multislerp", inputs, base_index, {"weight": weights, **shared})
    per_model = ([{}] if with_base else []) + [{"weight": w} for w in weights]
    _same(_ours("multislerp", inputs, base_index, shared, per_model), theirs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("max_iter", "tol"), [(10, 1e-5), (0, 1e-5), (3, 1e-2), (50, 1e-9)])
@pytest.mark.parametrize("n_models", [2, 3])
def test_karcher(dtype, max_iter, tol, n_models):
    tensors = _inputs(n_models, dtype, spread=0.7)
    params = {"max_iter": max_iter, "tol": tol}
    theirs = _mergekit("karcher", tensors, None, params)
    _same(_ours("karcher", tensors, None, params), theirs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_arcee_fusion(dtype):
    tensors = _inputs(2, dtype, spread=0.3)
    theirs = _mergekit("arcee_fusion", tensors, 0, {})
    _same(_ours("arcee_fusion", tensors, 0), theirs)


def test_arcee_fusion_samples_large_tensors_like_mergekit(monkeypatch):
    """Above the sample size the quantiles come from random draws: same seed, same draws."""
    from mergekit.merge_methods import arcee_fusion as theirs_module

    from merger.core import methods

    monkeypatch.setattr(theirs_module, "_QUANTILE_SAMPLE_SIZE", 300)
    monkeypatch.setattr(methods, "QUANTILE_SAMPLE_SIZE", 300)
    tensors = _inputs(2, torch.float32, spread=0.3)
    theirs = _mergekit("arcee_fusion", tensors, 0, {}, seed=5)
    _same(_ours("arcee_fusion", tensors, 0, seed=5), theirs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, 0.001, 0.05, 2.0])
def test_nearswap(dtype, t):
    tensors = _inputs(2, dtype)
    theirs = _mergekit("nearswap", tensors, 0, {"t": t})
    _same(_ours("nearswap", tensors, 0, {"t": t}), theirs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
@pytest.mark.parametrize("epsilon", [1e-5, 0.03])
@pytest.mark.parametrize("n_models", [1, 2, 3])
def test_ram(dtype, method, epsilon, n_models):
    tensors = _inputs(n_models + 1, dtype)
    # sparse task vectors, so that entries are set by one model, several, or none
    g = torch.Generator().manual_seed(9)
    for t in tensors[1:]:
        t.copy_(torch.where(torch.rand(t.shape, generator=g) < 0.5, tensors[0], t))
    params = {"epsilon": epsilon}
    if method == "ramplus_tl":
        params.update(r=0.4, alpha=0.5)
    theirs = _mergekit(method, tensors, 0, params)
    _same(_ours(method, tensors, 0, params), theirs)


def test_methods_without_task_vectors_return_the_base():
    base = torch.randn(5, 3)
    for method, shared in [("sce", {}), ("ram", {}), ("ramplus_tl", {})]:
        assert torch.equal(_ours(method, [base], 0, shared), base)
