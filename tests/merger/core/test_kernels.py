"""The fused CPU kernels against the torch reference methods they stand in for."""

from __future__ import annotations

import pytest
import torch

from kruising.device import torch_threads
from merger.core import kernels
from merger.core.io import MemoryOutput
from merger.core.methods import METHODS

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C compiler for kernels")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TV_PARAMS = {"normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": False}


def _models(n: int, dtype: torch.dtype, k: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """A base and k-1 fine-tunes near it, as real task vectors are."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    tuned = [base + 0.05 * torch.randn(n, generator=g) for _ in range(k - 1)]
    return [t.to(dtype) for t in [base, *tuned]]


def _both(method, tensors, base_index, params, per_model, out_dtype):
    """The float32 kernel (no compute dtype: float32 compute) and the reference computing
    in float32 (the engine hands it the inputs in its compute dtype)."""
    fused = kernels.fused_merge(method, tensors, base_index, params, per_model, out_dtype)
    assert fused is not None
    wide = [t.float() for t in tensors]
    reference = METHODS[method](wide, base_index, params, per_model, out_dtype=out_dtype)
    return fused, reference


@needs_kernels
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 4097, 30_011])
def test_linear_and_slerp_match_the_reference(in_dtype, out_dtype, n):
    tensors = _models(n, in_dtype)
    weights = [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}]
    (merged, bad), reference = _both(
        "linear", tensors, None, {"normalize": True}, weights, out_dtype
    )
    assert bad == 0 and merged.dtype == out_dtype
    # float32 sums in another order: one rounding step apart at most
    ulp = 1e-2 if out_dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(merged.float(), reference.float(), rtol=ulp, atol=ulp)
    for t in (0.0, 0.3, 1.0):
        (merged, bad), reference = _both("slerp", tensors[:2], 0, {"t": t}, [{}, {}], out_dtype)
        assert bad == 0
        torch.testing.assert_close(merged.float(), reference.float(), rtol=ulp, atol=ulp)
    (end, _), _ = _both("slerp", tensors[:2], 1, {"t": 1.0}, [{}, {}], in_dtype)
    assert torch.equal(end, tensors[0])  # t=1 from base index 1 is model 0, bit for bit


@needs_kernels
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "densities",
    [(0.5, 0.5), (0.3, 0.9), (0.0, 1.0), (1e-6, 0.99999), (1.0, 1.0)],
)
def test_ties_is_bit_identical_to_the_reference(in_dtype, out_dtype, densities):
    tensors = _models(20_011, in_dtype)
    per_model = [
        {"weight": 1.0},
        {"weight": 0.7, "density": densities[0]},
        {"weight": -0.4, "density": densities[1]},
    ]
    for params in (TV_PARAMS, TV_PARAMS | {"normalize": False, "lambda": 1.5}):
        (merged, bad), reference = _both("ties", tensors, 0, params, per_model, out_dtype)
        assert bad == 0
        assert torch.equal(merged, reference)


@needs_kernels
def test_ties_threshold_ties_are_kept_in_index_order():
    # magnitudes from a handful of values: most entries tie with the k-th largest
    base = torch.zeros(10_000)
    g = torch.Generator().manual_seed(1)
    delta = torch.randint(1, 4, (10_000,), generator=g).float() * 0.25
    delta *= torch.where(torch.rand(10_000, generator=g) < 0.5, -1.0, 1.0)
    per_model = [{"weight": 1.0}, {"weight": 1.0, "density": 0.37}]
    (merged, _), reference = _both(
        "ties", [base, base + delta], 0, TV_PARAMS, per_model, torch.float32
    )
    assert torch.equal(merged, reference)
    assert int((merged != 0).sum()) == int(0.37 * 10_000)  # exactly k kept


@needs_kernels
@pytest.mark.parametrize("in_dtype", DTYPES)
def test_task_arithmetic_is_bit_identical_to_the_reference(in_dtype):
    tensors = _models(9_001, in_dtype, k=4)
    per_model = [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.3}, {"weight": -0.2}]
    params = TV_PARAMS | {"normalize": False, "lambda": 0.8}
    (merged, bad), reference = _both("task_arithmetic", tensors, 0, params, per_model, in_dtype)
    assert bad == 0
    assert torch.equal(merged, reference)


@needs_kernels
def test_non_finite_results_are_counted():
    a, b = _models(5_000, torch.bfloat16, k=2)
    b[7] = float("nan")
    b[4_500] = float("inf")
    weights = [{"weight": 1.0}, {"weight": 1.0}]
    _, bad = kernels.fused_merge("linear", [a, b], None, {"normalize": True}, weights, a.dtype)
    assert bad == 2
    big = torch.full((10,), 3e38)
    _, bad = kernels.fused_merge(
        "linear", [big, big], None, {"normalize": False}, weights, torch.float32
    )
    assert bad == 10  # overflow of a finite input is caught too


@needs_kernels
def test_writes_into_the_given_buffer():
    a, b = _models(3_000, torch.bfloat16, k=2)
    out = torch.empty(3_000, dtype=torch.bfloat16)
    weights = [{"weight": 1}, {"weight": 1}]
    merged, _ = kernels.fused_merge(
        "linear", [a, b], None, {"normalize": True}, weights, a.dtype, MemoryOutput(out)
    )
    assert merged.data_ptr() == out.data_ptr()


def test_falls_back_where_it_does_not_apply():
    a, b = _models(100, torch.float32, k=2)
    per_model = [{"weight": 1.0}, {"weight": 1.0, "density": 0.5}]
    assert kernels.fused_merge("dare_ties", [a, b], 0, TV_PARAMS, per_model, a.dtype) is None
    assert (
        kernels.fused_merge("ties", [a, b], 0, TV_PARAMS | {"rescale": True}, per_model, a.dtype)
        is None
    )
    wide = [t.double() for t in (a, b)]
    assert kernels.fused_merge("ties", wide, 0, TV_PARAMS, per_model, torch.float64) is None
    mixed = [a, b.bfloat16()]
    assert kernels.fused_merge("ties", mixed, 0, TV_PARAMS, per_model, a.dtype) is None


def _forget_the_build(monkeypatch) -> None:
    """Make the next `kernels.available()` look for (or build) the library again."""
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("KRUISING_KERNELS", "off")
    _forget_the_build(monkeypatch)
    assert not kernels.available()
    assert "KRUISING_KERNELS" in kernels.why_not()
    a, b = _models(10, torch.float32, k=2)
    weights = [{"weight": 1.0}, {"weight": 1.0}]
    assert (
        kernels.fused_merge("linear", [a, b], None, {"normalize": True}, weights, a.dtype) is None
    )


@needs_kernels
def test_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("KRUISING_CACHE", str(tmp_path))
    _forget_the_build(monkeypatch)
    assert kernels.available()
    built = list((tmp_path / "kernels").glob("*.so"))
    assert len(built) == 1 and built[0].with_name(built[0].name + ".sha256").is_file()
    stamp = built[0].stat().st_mtime_ns
    _forget_the_build(monkeypatch)
    assert kernels.available()
    assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


class _Stream:
    """An output in uneven spans (as a direct `merger.core.io.ShardOutput` hands them out),
    that checks the calls come in order: each span's buffer taken, then written, once."""

    def __init__(self, n: int, dtype: torch.dtype, step: int) -> None:
        self.numel, self.dtype, self.step = n, dtype, step
        self.result = torch.empty(n, dtype=dtype)
        self.taken: tuple[int, int] | None = None
        self.written: list[tuple[int, int]] = []

    def spans(self):
        return [(a, min(self.numel, a + self.step)) for a in range(0, self.numel, self.step)]

    def buffer(self, start, end):
        assert self.taken is None
        self.taken = (start, end)
        return self.result[start:end]

    def write(self, start, end):
        assert self.taken == (start, end)
        self.taken = None
        self.written.append((start, end))

    def in_memory(self):
        return None  # like a shard: the result is not handed back


@needs_kernels
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_dare_draws_as_the_reference(method, rescale, in_dtype):
    n = 2 * (1 << 18) + 12_345  # three draw blocks, cut across by the segments below
    tensors = _models(n, in_dtype)
    per_model = [{"weight": 1.0}, {"weight": 0.6, "density": 0.3}, {"weight": 0.5, "density": 1.0}]
    params = TV_PARAMS | {"normalize": False, "rescale": rescale}
    stream = _Stream(n, torch.bfloat16, 100_003)
    fused = kernels.fused_merge(
        method, tensors, 0, params, per_model, torch.bfloat16, stream,
        torch.Generator().manual_seed(7),
    )  # fmt: skip
    assert fused is not None and fused[1] == 0
    assert stream.written == stream.spans()
    reference = METHODS[method](
        [t.float() for t in tensors], 0, params, per_model, torch.Generator().manual_seed(7),
        torch.bfloat16,
    )  # fmt: skip
    if rescale:  # the L1 norms are summed in another order: the scale may differ by an ulp
        torch.testing.assert_close(stream.result.float(), reference.float(), rtol=1e-2, atol=1e-3)
        assert (stream.result != reference).float().mean() < 1e-3
    else:
        assert torch.equal(stream.result, reference)
    undropped = METHODS["task_arithmetic"](tensors, 0, params, per_model, None, torch.bfloat16)
    assert (stream.result != undropped).float().mean() > 0.5  # model 1 kept only ~30%


@needs_kernels
def test_a_damaged_cached_build_is_rebuilt(monkeypatch, tmp_path, prebuilt_kernels):
    # "compiling" copies our prebuilt library (the real compiler runs in the test above): the
    # damage check, the rebuild, its digest and the loading are the real ones
    import shutil

    ours, _ = prebuilt_kernels
    compiled = []

    def copy_instead(command):
        compiled.append(command)
        shutil.copyfile(ours, command[command.index("-o") + 1])
        return None

    monkeypatch.setattr(kernels, "_run_compiler", copy_instead)
    monkeypatch.setenv("KRUISING_CACHE", str(tmp_path / "first"))
    _forget_the_build(monkeypatch)
    assert kernels.available()
    (built,) = (tmp_path / "first" / "kernels").glob("*.so")
    # the same build name in another cache (a path this process has not loaded), damaged
    damaged = tmp_path / "second" / "kernels" / built.name
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a shared library")
    monkeypatch.setenv("KRUISING_CACHE", str(tmp_path / "second"))
    _forget_the_build(monkeypatch)
    assert kernels.available(), kernels.why_not()
    assert damaged.read_bytes()[:4] == b"\x7fELF"
    assert len(compiled) == 2  # the damaged file was not loaded: it was built again


# --- the exact-dtype kernels (issue #12): mergekit's rounding in the compute dtype ---------------


def _exact_both(method, stored, base_index, params, per_model, compute, out_dtype, seed=None):
    """The fused kernel on the inputs as stored, the reference on them cast to ``compute``."""
    gen = (lambda: torch.Generator().manual_seed(seed)) if seed is not None else (lambda: None)
    fused = kernels.fused_merge(
        method, stored, base_index, params, per_model, out_dtype, None, gen(), compute
    )
    assert fused is not None, method
    cast = [t.to(compute) for t in stored]
    reference = METHODS[method](cast, base_index, params, per_model, gen(), out_dtype=out_dtype)
    return fused, reference


def _tricky(n: int, dtype: torch.dtype, k: int, seed: int = 0) -> list[torch.Tensor]:
    """Fine-tunes near a base, with untouched entries, exact ties, zeros and tiny changes."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    out = [base]
    for j in range(k):
        delta = 0.05 * torch.randn(n, generator=g)
        delta[torch.rand(n, generator=g) < 0.4] = 0.0  # untouched
        delta[torch.rand(n, generator=g) < 0.05] = 1e-6 * (j + 1)  # around RAM's epsilon
        delta[:7] = 0.25  # equal magnitudes
        out.append(base + delta)
    out = [t.to(dtype) for t in out]
    out[0][5] = 0.0
    return out


STORED_COMPUTE = [
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.float16),
]


@needs_kernels
@pytest.mark.parametrize(("stored", "compute"), STORED_COMPUTE)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_exact_elementwise_kernels_are_bit_identical(stored, compute, out_dtype):
    if compute == torch.float16 and not kernels._load().kr_has_f16():
        pytest.skip("no _Float16 in this compiler")
    tensors = _tricky(30_011, stored, k=3)
    cases = [
        ("passthrough", tensors[1:2], None, {}, [{"scale": None}]),
        ("passthrough", tensors[1:2], None, {}, [{"scale": 0.37}]),
        ("nearswap", tensors[:2], 0, {"t": 0.01}, [{}, {}]),
        ("nearswap", tensors[:2], 1, {"t": 2.5}, [{}, {}]),
        ("ram", tensors, 0, {"epsilon": 1e-5}, [{}] * 4),
        ("ram", tensors, 0, {"epsilon": 0.03}, [{}] * 4),
        ("ramplus_tl", tensors, 0, {"epsilon": 1e-5, "r": 0.3, "alpha": 0.4}, [{}] * 4),
    ]
    for method, inputs, base_index, params, per_model in cases:
        (merged, bad), reference = _exact_both(
            method, inputs, base_index, params, per_model, compute, out_dtype
        )
        assert bad == 0
        assert merged.dtype == reference.dtype == out_dtype
        assert torch.equal(merged, reference), (method, params)


@needs_kernels
@pytest.mark.parametrize(("stored", "compute"), STORED_COMPUTE)
@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(37, 811), (5003,)])
def test_della_kernel_draws_and_merges_as_the_reference(stored, compute, method, shape):
    """Same seed: the same probabilities (ranks, ties in index order), the same
    torch.bernoulli draws, the same rescale and merge, bit for bit."""
    if compute == torch.float16 and not kernels._load().kr_has_f16():
        pytest.skip("no _Float16 in this compiler")
    n = 1
    for d in shape:
        n *= d
    tensors = [t.reshape(shape) for t in _tricky(n, stored, k=2, seed=3)]
    params = {"normalize": method == "della", "rescale": True, "lambda": 1.2, "int8_mask": False}
    per_model = [
        {},
        {"weight": 0.7, "density": 0.4, "epsilon": 0.2},
        {"weight": 0.45, "density": 0.6, "epsilon": 0.1},
    ]
    for p in (params, params | {"rescale": False, "normalize": not params["normalize"]}):
        (merged, bad), reference = _exact_both(
            method, tensors, 0, p, per_model, compute, torch.bfloat16, seed=7
        )
        assert bad == 0
        assert torch.equal(merged, reference), p
    # a model at density 1 draws nothing; one at 0 contributes nothing
    edge = [{}, {"weight": 1.0, "density": 1.0}, {"weight": 0.5, "density": 0.0}]
    (merged, _), reference = _exact_both(
        method, tensors, 0, params, edge, compute, torch.float32, seed=1
    )
    assert torch.equal(merged, reference)


def _syntax_check(*defines: str):
    import shutil
    import subprocess

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    return subprocess.run(
        [compiler, "-fsyntax-only", "-std=c11", *defines, str(kernels.SOURCE)],
        capture_output=True,
        text=True,
    )


def test_the_c_build_takes_the_shared_constants_from_python():
    """kernels.c has no radix constants of its own: without kernels.py's -D defines it does not
    build, with values that contradict each other it does not build, with methods.py's it does."""
    from merger.core import methods

    assert kernels.DEFINES == {"KR_KEY_SHIFT": methods.KEY_SHIFT, "KR_HIGH_BINS": methods.HIGH_BINS}
    assert "build kernels.c through merger/core/kernels.py" in _syntax_check().stderr
    ours = [f"-D{name}={value}" for name, value in kernels.DEFINES.items()]
    assert _syntax_check(*ours).returncode == 0, _syntax_check(*ours).stderr
    wrong = ["-DKR_KEY_SHIFT=16", f"-DKR_HIGH_BINS={2 * methods.HIGH_BINS}"]
    assert "KR_HIGH_BINS covers the high key bits" in _syntax_check(*wrong).stderr


@needs_kernels
def test_the_fused_kernels_count_what_they_merge():
    a, b = _models(1_000, torch.float32, k=2)
    before = kernels.merged_tensors("linear"), kernels.merged_tensors()
    weights = [{"weight": 1.0}, {"weight": 1.0}]
    assert kernels.fused_merge("linear", [a, b], None, {"normalize": True}, weights, a.dtype)
    assert (
        kernels.fused_merge("ties", [a, b], 0, TV_PARAMS | {"rescale": True}, weights, a.dtype)
        is None
    )
    assert (kernels.merged_tensors("linear"), kernels.merged_tensors()) == (
        before[0] + 1,
        before[1] + 1,
    )


@needs_kernels
@pytest.mark.parametrize(("stored", "compute"), STORED_COMPUTE)
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 1e-6])
def test_sce_kernel_is_bit_identical(stored, compute, select_topk):
    """The variance (Welford in float64, as torch.var), the top-k with ties in index order
    across chunks, the weights and the merge: the reference's bits."""
    if compute == torch.float16 and not kernels._load().kr_has_f16():
        pytest.skip("no _Float16 in this compiler")
    tensors = _tricky(30_011, stored, k=3, seed=4)
    (merged, bad), reference = _exact_both(
        "sce", tensors, 0, {"select_topk": select_topk, "int8_mask": False}, [{}] * 4,
        compute, torch.bfloat16,
    )  # fmt: skip
    assert bad == 0
    assert torch.equal(merged, reference)


def _declines(method, inputs, base_index, params, per_model, compute) -> bool:
    """In float32 compute the summing kernels leave the tensor to the reference (torch sums
    in its own order; ours would differ in the last bits), and in float16 too (torch.norm
    sums float16 in another order than `tn_add`, which is torch's for bf16 and float32):
    True after checking that."""
    if compute not in (torch.float32, torch.float16):
        return False
    fused = kernels.fused_merge(
        method, inputs, base_index, params, per_model, torch.bfloat16, None, None, compute
    )
    assert fused is None, method
    return True


@needs_kernels
@pytest.mark.parametrize(("stored", "compute"), STORED_COMPUTE)
@pytest.mark.parametrize(
    ("shape", "flatten", "with_base"),
    [
        ((30_011,), True, True),
        ((61, 493), True, False),
        ((61, 493), False, True),
        ((7,), False, False),
    ],
)
def test_nuslerp_kernel_is_the_reference(stored, compute, shape, flatten, with_base):
    """The norms and dot products are sums (ours in float64, torch's in float32 in its own
    order): in a half-float compute dtype they round to the same value, so the merge is the
    reference's bit for bit (in float32 the reference runs). A row where the two inputs are
    the same is colinear and takes the lerp."""
    if compute == torch.float16 and not kernels._load().kr_has_f16():
        pytest.skip("no _Float16 in this compiler")
    n = 1
    for size in shape:
        n *= size
    tensors = [t.reshape(shape) for t in _tricky(n, stored, k=2, seed=7)]
    if len(shape) == 2:
        tensors[2][3] = tensors[1][3]  # row 3 of the two inputs the same: colinear
    inputs = tensors if with_base else tensors[1:]
    params = {"nuslerp_flatten": flatten, "nuslerp_row_wise": False}
    per_model = ([{}] if with_base else []) + [{"weight": 0.3}, {"weight": 0.5}]
    base_index = 0 if with_base else None
    if _declines("nuslerp", inputs, base_index, params, per_model, compute):
        return
    (merged, bad), reference = _exact_both(
        "nuslerp", inputs, base_index, params, per_model, compute, torch.bfloat16
    )
    assert bad == 0
    assert merged.shape == reference.shape
    assert torch.equal(merged, reference)


@needs_kernels
def test_nuslerp_per_column_is_left_to_the_reference():
    tensors = [t.reshape(31, 17) for t in _tricky(31 * 17, torch.bfloat16, k=2)]
    params = {"nuslerp_flatten": False, "nuslerp_row_wise": True}
    per_model = [{}, {"weight": 1.0}, {"weight": 1.0}]
    assert (
        kernels.fused_merge(
            "nuslerp", tensors, 0, params, per_model, torch.bfloat16, None, None, torch.bfloat16
        )
        is None
    )


@needs_kernels
@pytest.mark.parametrize(("stored", "compute"), STORED_COMPUTE)
@pytest.mark.parametrize(
    ("k", "with_base", "normalize_weights"), [(2, True, True), (3, True, False), (3, False, True)]
)
def test_multislerp_kernel_is_the_reference(stored, compute, k, with_base, normalize_weights):
    """Five passes with the reference's scalar steps between them: bit for bit in a half-float
    compute dtype (in float32 the reference runs)."""
    if compute == torch.float16 and not kernels._load().kr_has_f16():
        pytest.skip("no _Float16 in this compiler")
    tensors = _tricky(30_011, stored, k=k, seed=11)
    inputs = tensors if with_base else tensors[1:]
    params = {"normalize_weights": normalize_weights, "eps": 1e-8}
    weights = [{"weight": w} for w in (0.5, 0.3, 0.2)[:k]]
    per_model = ([{}] if with_base else []) + weights
    base_index = 0 if with_base else None
    if _declines("multislerp", inputs, base_index, params, per_model, compute):
        return
    (merged, bad), reference = _exact_both(
        "multislerp", inputs, base_index, params, per_model, compute, torch.bfloat16
    )
    assert bad == 0
    assert torch.equal(merged, reference)


@needs_kernels
def test_multislerp_of_cancelling_directions_is_left_to_the_reference():
    """The mean direction vanishes: the reference falls back (two models) or raises."""
    base = torch.zeros(4097, dtype=torch.bfloat16)
    up = torch.full((4097,), 0.5, dtype=torch.bfloat16)
    params = {"normalize_weights": True, "eps": 1e-8}
    per_model = [{}, {"weight": 1.0}, {"weight": 1.0}]
    fused = kernels.fused_merge(
        "multislerp", [base, up, -up], 0, params, per_model, torch.bfloat16, None, None,
        torch.bfloat16,
    )  # fmt: skip
    assert fused is None


@needs_kernels
@pytest.mark.parametrize(("stored", "compute"), STORED_COMPUTE)
@pytest.mark.parametrize(
    ("shape", "filter_wise", "k"),
    [((30_011,), False, 2), ((61, 493), True, 3), ((61, 493), False, 3), ((7,), True, 2)],
)
def test_model_stock_kernel_is_the_reference(stored, compute, shape, filter_wise, k):
    """One summing pass, t from the reference's ops on the sums, the merge: bit for bit in a
    half-float compute dtype (in float32 the reference runs)."""
    if compute == torch.float16 and not kernels._load().kr_has_f16():
        pytest.skip("no _Float16 in this compiler")
    n = 1
    for size in shape:
        n *= size
    tensors = [t.reshape(shape) for t in _tricky(n, stored, k=k, seed=13)]
    if len(shape) == 2:
        tensors[2][5] = 2 * tensors[0][5] - tensors[1][5]  # a row of opposite task vectors
    params, per_model = {"filter_wise": filter_wise}, [{}] * (k + 1)
    if _declines("model_stock", tensors, 0, params, per_model, compute):
        return
    (merged, bad), reference = _exact_both(
        "model_stock", tensors, 0, params, per_model, compute, torch.bfloat16
    )
    assert bad == 0
    assert merged.shape == reference.shape
    assert torch.equal(merged, reference)


@needs_kernels
@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_half_compute_task_vectors_are_bit_identical_to_the_reference(method, stored, compute):
    """bf16/f16 compute (mergekit's for such a recipe): the exact kernel rounds every op as
    the torch reference does, TIES's trim included, and counts the same tie decisions."""
    from merger.core.methods import TieCount, count_ties

    tensors = _models(50_011, stored)
    per_model = [
        {"weight": 1.0},
        {"weight": 0.7, "density": 0.4},
        {"weight": -0.4, "density": 0.9},
    ]
    for params in (TV_PARAMS, TV_PARAMS | {"normalize": False, "lambda": 1.5}):
        fused_ties, reference_ties = TieCount(), TieCount()
        with count_ties(fused_ties):
            fused = kernels.fused_merge(
                method, tensors, 0, params, per_model, compute, None, None, compute
            )
        assert fused is not None and fused[1] == 0
        with count_ties(reference_ties):
            reference = METHODS[method](
                [t.to(compute) for t in tensors], 0, params, per_model, out_dtype=compute
            )
        assert torch.equal(fused[0], reference)
        assert fused_ties.record() == reference_ties.record()
        if method == "ties":  # half-precision deltas tie at the threshold: the rule decided
            assert reference_ties.tied > reference_ties.kept > 0
    wide = kernels.fused_merge(method, tensors, 0, TV_PARAMS, per_model, torch.float32)
    assert not torch.equal(wide[0].to(compute), reference)  # the compute dtype matters


@needs_kernels
def test_half_compute_goes_to_the_reference_where_no_kernel_rounds_as_mergekit():
    tensors = _models(1_000, torch.bfloat16)
    per_model = [{"weight": 1.0}, {"weight": 0.5, "density": 0.5}, {"weight": 0.5}]
    bf16 = torch.bfloat16
    assert kernels.fused_merge("dare_ties", tensors, 0, TV_PARAMS, per_model, bf16,
                               None, torch.Generator(), bf16) is None  # fmt: skip
    weights = [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}]
    params = {"normalize": True}
    # linear: float32 inside mergekit too, one rounding when stored and computed alike
    assert kernels.fused_merge("linear", tensors, None, params, weights, bf16, None, None, bf16)
    # a float32 output of a bf16 compute rounds twice in mergekit (to bf16, then widened)
    wide = torch.float32
    assert (
        kernels.fused_merge("linear", tensors, None, params, weights, wide, None, None, bf16)
        is None
    )


def _lane_sensitive(n: int, k: int) -> list[torch.Tensor]:
    """A zero base and k bf16 task vectors of n entries: 1.0 in the first 8 (one per lane of
    torch.norm's float32 sum), then entries whose squares are below half a float32 ulp of 1.0
    (+-2**-12 * 31/32, sign blocks per model): torch.norm adds each to a lane sum of 1.0 and
    loses it, the exact sum keeps them all: norms a few bf16 steps apart (as on a 7B model's
    58.7M-entry tensors, where the squares are small against their lane's sum)."""
    base = torch.zeros(n)
    out = [base]
    for j in range(k):
        x = torch.full((n,), 2.0**-12 * 31 / 32)
        x[(torch.arange(n) // (1024 * (j + 1))) % 2 == 1] *= -1  # another direction per model
        x[:8] = 1.0
        x[8 + j] = 0.5  # not colinear in the large entries either
        out.append(x)
    return [t.to(torch.bfloat16) for t in out]


@needs_kernels
@pytest.mark.parametrize("method", ["multislerp", "nuslerp", "model_stock"])
def test_summing_kernels_take_torch_norms_on_large_tensors(method):
    """The norms of nuslerp, multislerp and model_stock are torch.norm's float32 sums (8
    lanes, then the rest), not exact sums rounded: on a large bf16 tensor the two give other
    norms, and mergekit's child is torch's (fixed: multislerp differed from mergekit on 20.5%
    of a 7B merge's elements by more than one bf16 ulp; 11% of a 14336x4096 tensor's)."""
    from mergekit.merge_methods import merge_tensors

    n, k = 2**21 + 11, 3 if method == "model_stock" else 2
    tensors = _lane_sensitive(n, k)
    first = tensors[1]
    exact = first.double().norm().to(torch.bfloat16)
    assert not torch.equal(torch.norm(first), exact)  # the premise: order matters here
    weights = [0.6, 0.4, 0.3][:k]
    params = {
        "multislerp": {"normalize_weights": True, "eps": 1e-8},
        "nuslerp": {"nuslerp_row_wise": False, "nuslerp_flatten": True},
        "model_stock": {"filter_wise": False},
    }[method]
    per_model = [{}] + [{"weight": w} for w in weights]
    fused = kernels.fused_merge(
        method, tensors, 0, params, per_model, torch.bfloat16, None, None, torch.bfloat16
    )
    assert fused is not None, method
    theirs_params = dict(params, **({"weight": weights} if method != "model_stock" else {}))
    # mergekit on one thread: torch's bf16 sums (model_stock's dots) change with the thread
    # count; ours are the one-thread values on any machine (README, the reducing methods)
    with torch_threads(1):
        theirs = merge_tensors(
            [t.clone() for t in tensors], method, parameters=theirs_params, base_index=0
        )
    merged, bad = fused
    assert bad == 0
    diff = int((merged != theirs).sum())
    assert diff == 0, f"{diff} of {n} entries differ from mergekit"
