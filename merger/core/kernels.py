"""Fused CPU kernels, built from ``kernels.c`` at first use.

`fused_merge` merges one tensor straight from the memory-mapped inputs into its output
(`merger.core.io.Output`: span by span, each written once computed) in one pass per method
step, and returns how many merged values are NaN/Inf (so the engine needs no extra pass to
check). Two kinds:

- linear, slerp, task_arithmetic, ties, dare_ties, dare_linear: float32 compute, as their torch
  references in `methods.py`;
- passthrough, nearswap, ram, ramplus_tl, della, della_linear, sce, nuslerp (the exact-dtype
  methods): every operation rounds to the compute dtype exactly as torch rounds it (bf16/f16 ops
  compute in float32 and round; a Python scalar enters mul/div in float32, add/sub/compare in
  the tensor's dtype), so the result is the torch reference's — mergekit's operations — bit for
  bit (nuslerp's, multislerp's and model_stock's norms are summed as torch.norm sums on CPU,
  checked against it at first use (`_sums_as_torch_norm`); their dot products are sums in
  another order, which round to torch's value in bf16; in float32 and float16 the torch path
  runs).

It returns None when it does not apply — another method, a GPU tensor, an unsupported dtype
(float64), inputs stored in different dtypes, or no C compiler — and the engine then runs the
torch reference, which defines the semantics; tests hold the two to the same results.

The library is compiled once per source, shared constants (`DEFINES`), compiler and CPU into
kruising's cache (`kruising.env.cache_dir`: ``$KRUISING_CACHE``, else
``$XDG_CACHE_HOME/kruising`` or ``~/.cache/kruising``), written under a temporary name and
renamed, so concurrent first runs are safe. `merged_tensors` counts what the kernels merged.
``KRUISING_KERNELS=off`` forces the torch path.

A library in the cache is code this process runs, and its name is predictable, so it is
trusted only when the file is owned by the current user, is not group- or world-writable, sits
in a folder owned by that user that others cannot write, and its SHA-256 is the one recorded
(``<name>.so.sha256``) when this code built it. Otherwise it is built again, with a note; one
without the expected functions is built again too. It is loaded through the file descriptor
that was checked (``/proc/self/fd``), so it cannot be swapped between check and load.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kruising.atomic import write_text
from kruising.env import cache_dir, switched_off
from merger.core import methods
from merger.core.io import MemoryOutput, Output

SOURCE = Path(__file__).with_name("kernels.c")
#: At most this many task vectors (linear: this many + 1 models) go through a fused kernel;
#: more run the torch reference.
MAX_MODELS = 16
#: The constants kernels.c shares with the torch reference, passed to the C build from here
#: (kernels.c refuses to build without them): one definition of each.
DEFINES = {"KR_KEY_SHIFT": methods.KEY_SHIFT, "KR_HIGH_BINS": methods.HIGH_BINS}
#: the methods with a fused kernel (others, and DARE's rescale, run the torch reference)
#: exact-dtype methods (`methods.MethodSpec.exact_dtype`): their kernels compute in the
#: compute dtype with mergekit's rounding, from the inputs as stored
EXACT = (
    "passthrough",
    "nearswap",
    "ram",
    "ramplus_tl",
    "della",
    "della_linear",
    "sce",
    "nuslerp",
    "multislerp",
    "model_stock",
)
#: every method with a fused CPU kernel: the float32 ones, then the exact-dtype ones
FUSED_METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear") + EXACT
#: exact-dtype methods whose kernels sum whole tensors (or rows) in float64 where torch sums in
#: float32 in its own order: in a half-float compute dtype both round to the same value (the
#: torch path's child bit for bit), in float32 they need not, so float32 runs the reference
SUMMING = ("nuslerp", "multislerp", "model_stock")
RANDOM = ("dare_ties", "dare_linear")
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
_lib: Any = None
_tried = False
_why_not = ""
_merged: dict[str, int] = {}  # method -> tensors merged by a fused kernel in this process


def _cache_dir() -> Path:
    return cache_dir() / "kernels"


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(compiler: str, target: Path) -> None:
    base = [compiler, "-O3", "-fno-strict-aliasing", "-shared", "-fPIC", "-std=c11"]
    base += [f"-D{name}={value}" for name, value in DEFINES.items()]
    attempts = [
        ["-march=native", "-DKR_HAVE_F16"],
        ["-DKR_HAVE_F16"],
        [],
    ]
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    errors = []
    for extra in attempts:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)  # mode 0600
        os.close(fd)
        error = _run_compiler([*base, *extra, str(SOURCE), "-o", tmp, "-lm"])
        if error is None:
            os.chmod(tmp, 0o600)  # the linker may have recreated it with the umask
            digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
            write_text(_digest_file(target), digest + "\n")
            os.replace(tmp, target)  # a new file: a loaded library is never changed in place
            return
        os.unlink(tmp)
        errors.append(error)
    raise OSError(f"{compiler} failed: {errors[-1]}")


def _run_compiler(command: list[str]) -> str | None:
    """Run the compiler; None on success, else the last line it printed."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == 0:
        return None
    return (result.stderr.strip().splitlines() or ["?"])[-1]


def _digest_file(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _not_ours(st: os.stat_result) -> str | None:
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not {os.getuid()}"
    if st.st_mode & 0o022:
        return f"mode {stat.filemode(st.st_mode)}: others can write it"
    return None


def _distrust(target: Path, fd: int) -> str | None:
    """Why the library open at ``fd`` must not be loaded (None: it is ours, as we built it)."""
    if not hasattr(os, "getuid"):
        return None
    why = _not_ours(os.fstat(fd))
    if why:
        return why
    try:
        digest_fd = os.open(_digest_file(target), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return "no recorded SHA-256 (built by another program or an older kruising)"
    try:
        why = _not_ours(os.fstat(digest_fd))
        if why:
            return f"its recorded SHA-256 is {why}"
        recorded = os.read(digest_fd, 200).decode("ascii", "replace").strip()
    finally:
        os.close(digest_fd)
    digest = hashlib.sha256()
    with os.fdopen(os.dup(fd), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != recorded:
        return "its SHA-256 is not the one recorded when it was built"
    return None


def _unsafe_dir() -> Path | None:
    """The cache folder when it is not safe for code (someone else owns it or may write into
    it), else None."""
    folder = _cache_dir()
    try:
        st = folder.stat()
    except OSError:
        return None
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o002):
        return folder
    return None


def _open_trusted(compiler: str, target: Path) -> Any:
    """Build ``target`` if it is missing or not trusted, then load the checked file.

    It is loaded as ``/proc/self/fd/N`` of the descriptor that was checked, and that
    descriptor stays open: the dynamic loader hands back an already loaded library by name,
    so each load needs a name no earlier load had (a rebuilt library at the same path would
    otherwise come back as the old one).
    """
    for _ in range(2):
        try:
            fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            _compile(compiler, target)
            continue
        except OSError as exc:  # e.g. a symlink planted under the name
            _note(target, f"cannot be opened safely ({exc.strerror})")
            target.unlink(missing_ok=True)
            _compile(compiler, target)
            continue
        why = _distrust(target, fd)
        if why is not None:
            os.close(fd)
            _note(target, why)
            _compile(compiler, target)
            continue
        proc = Path(f"/proc/self/fd/{fd}")
        try:
            lib = ctypes.CDLL(str(proc) if proc.exists() else str(target))
        except OSError:  # a damaged cache entry (e.g. a disk that filled up): build again
            os.close(fd)
            _compile(compiler, target)
            continue
        try:
            _declare(lib)
        except AttributeError as exc:
            _note(target, f"lacks {str(exc).split(':')[-1].strip()}")
            _compile(compiler, target)
            continue
        return lib
    raise OSError(f"the kernel library {target} could not be built and checked")


def _note(target: Path, why: str) -> None:
    from kruising.console import console

    console.print(f"note: not loading the cached kernel library {target}: {why}; rebuilt it")


def _load() -> Any:
    """The compiled library, or None (then `why_not()` says why)."""
    global _lib, _tried, _why_not
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            _lib = _build_and_open()
        except (OSError, subprocess.SubprocessError) as exc:
            _why_not = str(exc)
            _lib = None
        _tried = True
    return _lib


def _library_name(compiler: str) -> str:
    """``kruising-kernels-<key>.so``: one build per source, constants, compiler and CPU."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    defines = repr(sorted(DEFINES.items())).encode()
    key = hashlib.sha256(
        SOURCE.read_bytes() + defines + version.encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    return f"kruising-kernels-{key}.so"


def _build_and_open() -> Any:
    if switched_off("KRUISING_KERNELS", "torch"):
        raise OSError("KRUISING_KERNELS=off")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc/gcc) on PATH")
    name = _library_name(compiler)
    shared = _unsafe_dir()
    if shared is None:
        return _open_trusted(compiler, _cache_dir() / name)
    from kruising.console import console

    console.print(
        f"note: the kernel cache {shared} is writable by others or not yours; "
        "building the kernels for this run only"
    )
    private = Path(tempfile.mkdtemp(prefix="kruising-kernels-"))
    try:  # once loaded, the file may go
        return _open_trusted(compiler, private / name)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _declare(lib: Any) -> None:
    """The functions' signatures; AttributeError when the library lacks one."""
    i64, i32, f32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.kr_has_f16.restype = i32
    lib.kr_linear.restype = i64
    lib.kr_linear.argtypes = [i64, i32, ptr, i32, ptr, f32, ptr, i32, i32]
    lib.kr_dots.restype = None
    lib.kr_dots.argtypes = [i64, ptr, ptr, i32, ptr]
    lib.kr_tv_histogram.restype = None
    lib.kr_tv_histogram.argtypes = [i64, i32, ptr, ptr, i32, ptr, ptr, i32]
    lib.kr_tv_merge.restype = i64
    lib.kr_tv_merge.argtypes = [
        i64, i32, ptr, ptr, i32, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, i32, i32, f32, f32,
        ptr, i32,
    ]  # fmt: skip
    lib.kr_tv_l1.restype = None
    lib.kr_tv_l1.argtypes = [i64, i32, ptr, ptr, i32, ptr, ptr, ptr, ptr, ptr, i64]
    lib.kr_scale.restype = i64
    lib.kr_scale.argtypes = [i64, ptr, i32, i32, f32, i32, ptr, i32]
    lib.kr_nearswap.restype = i64
    lib.kr_nearswap.argtypes = [i64, ptr, ptr, i32, f32, i32, ptr, i32]
    lib.kr_ram.restype = i64
    lib.kr_ram.argtypes = [i64, i32, ptr, ptr, i32, f32, ptr, i32, ptr, i32]
    lib.kr_ram_counts.restype = None
    lib.kr_ram_counts.argtypes = [i64, i32, ptr, ptr, i32, f32, i32, ptr, ptr]
    lib.kr_tv_exact.restype = i64
    lib.kr_tv_exact.argtypes = [
        i64, i32, ptr, ptr, i32, ptr, ptr, ptr, i64, i32, ptr, i32, i32, i32, f32, f32, i32,
        ptr, i32, ptr, ptr, ptr,
    ]  # fmt: skip
    lib.kr_della_probs.restype = None
    lib.kr_della_probs.argtypes = [i64, i64, ptr, ptr, i32, i32, i32, f32, f32, ptr, ptr, ptr]
    lib.kr_masked_l1.restype = None
    lib.kr_masked_l1.argtypes = [i64, ptr, ptr, i32, i32, ptr, ptr]
    lib.kr_sce_counts.restype = i32
    lib.kr_sce_counts.argtypes = [i64, i32, ptr, ptr, i32, i32, ctypes.c_int32, ptr, ptr]
    lib.kr_sce_mask.restype = i32
    lib.kr_sce_mask.argtypes = [i64, i32, ptr, ptr, i32, i32, i32, ctypes.c_uint32, ptr, ptr, ptr]
    lib.kr_nuslerp_sq.restype = None
    lib.kr_nuslerp_sq.argtypes = [i64, i64, ptr, ptr, ptr, i32, i32, ptr, ptr]
    lib.kr_nuslerp_dot.restype = None
    lib.kr_nuslerp_dot.argtypes = [i64, i64, ptr, ptr, ptr, i32, i32, ptr, ptr, ptr]
    lib.kr_nuslerp_out.restype = i64
    lib.kr_nuslerp_out.argtypes = [
        i64, i64, i64, ptr, ptr, ptr, i32, i32, ptr, ptr, ptr, ptr, f32, f32, ptr, i32,
    ]  # fmt: skip
    lib.kr_multislerp.restype = i64
    lib.kr_multislerp.argtypes = [
        i32, i64, i32, ptr, ptr, i32, i32, ptr, ptr, f32, ptr, f32, f32, f32, ptr, ptr, i32,
    ]  # fmt: skip
    lib.kr_model_stock_sums.restype = i32
    lib.kr_model_stock_sums.argtypes = [i64, i64, i32, ptr, ptr, i32, i32, ptr, ptr]
    lib.kr_model_stock_out.restype = i64
    lib.kr_model_stock_out.argtypes = [i64, i64, i64, i32, ptr, ptr, i32, i32, ptr, ptr, ptr, i32]
    lib.kr_torch_norm_sq.restype = ctypes.c_double
    lib.kr_torch_norm_sq.argtypes = [i64, ptr, i32]


_norm_checked: dict[torch.dtype, bool] = {}


def _sums_as_torch_norm(lib: Any, dtype: torch.dtype) -> bool:
    """Whether the kernels' `tn_add` sums squares as this process's ``torch.norm`` does on
    CPU in ``dtype`` (float32 in 8 lanes, lane by lane, then the rest: checked once on probes
    where another order rounds to another value). Those sums are the norms of nuslerp,
    multislerp and model_stock; their error grows with the tensor (0.65% on 58.7M entries),
    so the exact sum would round to another bf16 norm than mergekit's on large tensors. False
    (the kernels leave those methods to the torch reference) where torch sums otherwise, as
    in float16."""
    with _lock:
        if dtype not in _norm_checked:
            ok = True
            g = torch.Generator().manual_seed(0)
            probes = [torch.full((2**21 + 11,), 0.7), torch.randn(3, 100_003, generator=g)]
            probes[0][-3:] = 3.0  # 8 lanes give another bf16 norm than 16 lanes or the exact
            for probe in probes:
                x = probe.to(dtype)
                for row in x.reshape(-1, x.shape[-1]):
                    row32 = row.float().contiguous()
                    sq = lib.kr_torch_norm_sq(row32.numel(), row32.data_ptr(), _CODES[dtype])
                    ours = torch.tensor(sq, dtype=torch.float32).sqrt().to(dtype)
                    ok = ok and torch.equal(ours, torch.norm(row))
            _norm_checked[dtype] = ok
        return _norm_checked[dtype]


def available() -> bool:
    return _load() is not None


def merged_tensors(method: str | None = None) -> int:
    """How many tensors the fused kernels have merged in this process (of ``method``, or of
    every method): how a caller (a test, a benchmark) knows the fused path really ran."""
    with _lock:
        return _merged.get(method, 0) if method is not None else sum(_merged.values())


def why_not() -> str:
    """Why the fused kernels are not in use ('' when they are)."""
    _load()
    return _why_not


def _code(dtype: torch.dtype, lib: Any) -> int | None:
    code = _CODES.get(dtype)
    if code == 2 and not lib.kr_has_f16():
        return None
    return code


def _pointers(tensors: Sequence[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def _floats(values: Sequence[float]) -> ctypes.Array:
    return (ctypes.c_float * len(values))(*values)


#: float32 kernels whose mergekit method computes in float32 itself (rounding only its result)
FLOAT32_INSIDE = ("linear", "slerp")
#: task-vector methods whose bf16/f16 compute runs in the exact-dtype kernel (kr_tv_exact, with
#: TIES's trim); dare_* in bf16/f16 run the torch reference
HALF_TASK_VECTORS = ("task_arithmetic", "ties")


def float32_kernel_fits(
    method: str, compute: torch.dtype | None, stored: torch.dtype, out_dtype: torch.dtype
) -> bool:
    """Whether a float32 kernel gives mergekit's result for this compute dtype: float32
    compute; or linear/slerp (float32 inside mergekit too) from inputs stored in the compute
    dtype, stored in it (one rounding of the float32 result, as mergekit's ``.to(dtype)``)."""
    if compute in (None, torch.float32):
        return True
    return method in FLOAT32_INSIDE and stored == compute == out_dtype


def fused_merge(
    method: str,
    tensors: Sequence[torch.Tensor],
    base_index: int | None,
    params: dict[str, Any],
    per_model: Sequence[dict[str, Any]],
    out_dtype: torch.dtype,
    out: Output | None = None,
    generator: torch.Generator | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, int] | None:
    """Merge one tensor with a fused kernel: (result, non-finite count), or None.

    DARE's methods draw from ``generator`` exactly as the torch reference does (same draws,
    same order), so a seed drops the same entries either way: the same child bit for bit,
    or to rounding with ``rescale`` (its L1 norms are summed in another order).

    The exact-dtype methods (`EXACT`) take ``compute_dtype`` (mergekit's: the recipe's dtype,
    else the stored one) and the inputs as stored; each of their operations rounds to it as
    torch's does, so the result is the torch reference's bit for bit. DELLA's probabilities
    come from a kernel, its draws from ``torch.bernoulli`` on them with ``generator``, as the
    reference draws them.

    The result goes to ``out`` (a `merger.core.io.Output` of ``out_dtype``), span by span: each
    span is computed into ``out.buffer`` and handed over with ``out.write``; the caller
    commits. Without ``out`` it goes into a new tensor. The result is returned when it is in
    memory (``out.in_memory()``), else None in its place.
    """
    if method not in FUSED_METHODS:
        return None
    half_task_vectors = False
    if method in EXACT:
        if compute_dtype is None:
            return None
    elif float32_kernel_fits(method, compute_dtype, tensors[0].dtype, out_dtype):
        compute_dtype = None
    elif method in HALF_TASK_VECTORS:
        half_task_vectors = True  # bf16/f16 compute: the exact task-vector kernel
    else:
        return None  # a bf16/f16 compute the float32 kernels do not round as mergekit: torch
    if method in RANDOM and (generator is None or generator.device.type != "cpu"):
        return None
    if method in ("della", "della_linear"):
        if generator is None or generator.device.type != "cpu" or tensors[0].dim() > 2:
            return None
    first = tensors[0]
    if first.device.type != "cpu" or len(tensors) > MAX_MODELS + 1:
        return None
    if any(t.dtype != first.dtype or not t.is_contiguous() for t in tensors):
        return None
    if any(t.shape != first.shape for t in tensors[1:]):
        return None  # the reference path reports it
    if method == "linear" and params["normalize"] and sum(p["weight"] for p in per_model) == 0:
        return None  # the reference raises the error
    if method == "slerp" and params.get("t") is None:
        return None
    if params.get("rescale") and method not in RANDOM + ("della", "della_linear"):
        return None  # TIES with rescale: the reference
    lib = _load()
    if lib is None:
        return None
    in_code, out_code = _code(first.dtype, lib), _code(out_dtype, lib)
    if in_code is None or out_code is None:
        return None
    c_code = _code(compute_dtype, lib) if compute_dtype is not None else None
    if compute_dtype is not None and c_code is None:
        return None
    n = first.numel()
    if out is None:
        out = MemoryOutput(torch.empty(n, dtype=out_dtype))
    elif out.dtype != out_dtype or out.numel != n:
        return None
    flats = [t.reshape(-1) for t in tensors]
    if method == "linear":
        weights = [float(p["weight"]) for p in per_model]
        divisor = _float32_sum(weights) if params["normalize"] else 0.0
        bad = _linear(lib, flats, weights, divisor, in_code, out, out_code, fused=True)
    elif method == "slerp":
        bad = _slerp(lib, flats, base_index, float(params["t"]), in_code, out, out_code)
    elif half_task_vectors:
        bad = _half_task_vectors(
            lib, method, flats, base_index, params, per_model, (in_code, c_code, out_code), out
        )
    elif method in EXACT:
        codes = (in_code, c_code, out_code)
        bad = _exact(
            lib, method, tensors, flats, base_index, params, per_model, codes, out, generator
        )
        if bad is None:
            return None
    else:
        bad = _task_vectors(
            lib,
            method,
            flats,
            base_index,
            params,
            per_model,
            in_code,
            out,
            out_code,
            generator,
        )
    with _lock:
        _merged[method] = _merged.get(method, 0) + 1
    result = out.in_memory()
    return (None if result is None else result.reshape(first.shape)), bad


def _exact(
    lib, method, tensors, flats, base_index, params, per_model, codes, out: Output, generator
):
    """The exact-dtype methods' kernels; None where the reference must run after all."""
    in_code, c_code, out_code = codes
    if method == "passthrough":
        scale = per_model[0].get("scale")
        has, factor = int(scale is not None), float(scale or 0.0)
        return _spans(
            out,
            lambda s, e, v: lib.kr_scale(
                e - s, flats[0][s:e].data_ptr(), in_code, has, factor, c_code, v, out_code
            ),
        )
    if method in SUMMING and c_code == _CODES[torch.float32]:
        return None  # float32 sums in another order than torch's: its last bits; the reference
    if method == "model_stock":
        return _model_stock(lib, tensors[0].shape, flats, base_index, params, codes, out)
    if method == "multislerp":
        return _multislerp(lib, flats, base_index, params, per_model, codes, out)
    if method == "nuslerp":
        return _nuslerp(lib, tensors[0].shape, flats, base_index, params, per_model, codes, out)
    base = flats[base_index]
    others = [flats[i] for i in range(len(flats)) if i != base_index]
    if method == "nearswap":
        t = float(params["t"])
        return _spans(
            out,
            lambda s, e, v: lib.kr_nearswap(
                e - s,
                base[s:e].data_ptr(),
                others[0][s:e].data_ptr(),
                in_code,
                t,
                c_code,
                v,
                out_code,
            ),
        )
    k = len(others)
    if method in ("ram", "ramplus_tl"):
        eps = float(params["epsilon"])
        lam = None
        if method == "ramplus_tl":
            unique, shared = (ctypes.c_int64 * k)(), (ctypes.c_int64 * k)()
            lib.kr_ram_counts(
                base.numel(),
                k,
                base.data_ptr(),
                _pointers(others),
                in_code,
                eps,
                c_code,
                unique,
                shared,
            )
            counts = torch.tensor(list(unique)), torch.tensor(list(shared))
            rho = counts[1] / counts[0].clamp(min=eps)  # as mergekit: float32
            lam = _floats(
                (1 + float(params["r"]) * rho.clamp(min=0, max=float(params["alpha"]))).tolist()
            )
        return _spans(
            out,
            lambda s, e, v: lib.kr_ram(
                e - s,
                k,
                base[s:e].data_ptr(),
                _at(others, s, e),
                in_code,
                eps,
                lam,
                c_code,
                v,
                out_code,
            ),
        )
    if method == "sce":
        return _sce(lib, base, others, float(params["select_topk"]), codes, out)
    return _della(lib, method, tensors, flats, base_index, params, per_model, codes, out, generator)


def _nuslerp(lib, shape, flats, base_index, params, per_model, codes, out: Output):
    """nuslerp, flattened or per row: the norms (pass 1) and the unit vectors' dot products
    (pass 2) summed by kernels, the per-row angles and factors by the reference's torch ops
    on those sums, then the merge (pass 3). Per column (row_wise on a matrix): None."""
    in_code, c_code, out_code = codes
    compute = next(d for d, c in _CODES.items() if c == c_code)
    if not _sums_as_torch_norm(lib, compute):
        return None
    n = flats[0].numel()
    if params["nuslerp_flatten"] or len(shape) <= 1:
        rows, cols = 1, n
    elif params["nuslerp_row_wise"]:
        return None  # per column: the reference
    else:
        cols = shape[-1]
        rows = n // cols if cols else 0
    if n == 0:
        return None
    others = [i for i in range(len(flats)) if i != base_index]
    weights = [per_model[i]["weight"] for i in others]
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    x0, x1 = (flats[i] for i in others)
    base = flats[base_index] if base_index is not None else None
    base_ptr = base.data_ptr() if base is not None else None
    sq = torch.zeros(2, rows, dtype=torch.float64)
    lib.kr_nuslerp_sq(
        rows, cols, base_ptr, x0.data_ptr(), x1.data_ptr(), in_code, c_code,
        sq[0].data_ptr(), sq[1].data_ptr(),
    )  # fmt: skip
    # torch.norm in the compute dtype: a float32 sum of squares, its root rounded
    norms = sq.to(torch.float32).sqrt().to(compute).clamp(min=1e-7)
    n32 = norms.float().contiguous()
    dot = torch.zeros(rows, dtype=torch.float64)
    lib.kr_nuslerp_dot(
        rows, cols, base_ptr, x0.data_ptr(), x1.data_ptr(), in_code, c_code,
        n32[0].data_ptr(), n32[1].data_ptr(), dot.data_ptr(),
    )  # fmt: skip
    # the reference's per-row steps, on the sums
    cos_theta = dot.to(torch.float32).to(compute).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= 1e-8**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    factors = torch.stack([torch.sin((1 - t) * theta), torch.sin(t * theta), torch.sin(theta)])
    s0, s1, st = (f.float().contiguous() for f in factors)
    flags = colinear.to(torch.uint8).contiguous()

    def run(s: int, e: int, v: int) -> int:
        return lib.kr_nuslerp_out(
            s, e - s, cols, base[s:e].data_ptr() if base is not None else None,
            x0[s:e].data_ptr(), x1[s:e].data_ptr(), in_code, c_code, flags.data_ptr(),
            s0.data_ptr(), s1.data_ptr(), st.data_ptr(), 1 - t, t, v, out_code,
        )  # fmt: skip

    return _spans(out, run)


def _model_stock(lib, shape, flats, base_index, params, codes, out: Output):
    """model_stock: one summing pass (per row with filter_wise: the task vectors' squared norms
    and pairwise dot products), the reference's torch ops on the sums for t, then the merge."""
    in_code, c_code, out_code = codes
    compute = next(d for d, c in _CODES.items() if c == c_code)
    if not _sums_as_torch_norm(lib, compute):
        return None
    base = flats[base_index]
    others = [flats[i] for i in range(len(flats)) if i != base_index]
    k, n = len(others), base.numel()
    if k < 2 or n == 0:
        return None
    if params["filter_wise"] and len(shape) > 1:
        cols = shape[-1]
        rows = n // cols
    else:
        rows, cols = 1, n
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    sq = torch.zeros(rows, k, dtype=torch.float64)
    dot = torch.zeros(rows, len(pairs), dtype=torch.float64)
    pointers = _pointers(others)
    if lib.kr_model_stock_sums(
        rows, cols, k, base.data_ptr(), pointers, in_code, c_code, sq.data_ptr(), dot.data_ptr()
    ):
        raise MemoryError("fused model_stock: out of memory for its chunk buffers")
    # the reference's steps on the sums (torch.norm / .sum in the compute dtype: float32 sums)
    norms = sq.to(torch.float32).sqrt().to(compute)
    dots = dot.to(torch.float32).to(compute)
    cos_thetas = []
    for p, (a, b) in enumerate(pairs):
        norm_product = norms[:, a] * norms[:, b]
        cos_thetas.append((dots[:, p] / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0)
    denominator = 1 + (k - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (k * cos_theta) / safe)
    t32, u32 = t.float().contiguous(), (1 - t).float().contiguous()

    def run(s: int, e: int, v: int) -> int:
        return lib.kr_model_stock_out(
            s, e - s, cols, k, base[s:e].data_ptr(), _at(others, s, e), in_code, c_code,
            t32.data_ptr(), u32.data_ptr(), v, out_code,
        )  # fmt: skip

    return _spans(out, run)


def _multislerp(lib, flats, base_index, params, per_model, codes, out: Output):
    """multislerp: four summing passes (the norms, the mean's norm, the dots, the tangent's
    norm) and the merge, each from the inputs; the scalar steps between them are the
    reference's torch ops on the sums. None (the reference) for one model, and where the mean
    direction vanishes (the reference's fallback or its error)."""
    in_code, c_code, out_code = codes
    compute = next(d for d, c in _CODES.items() if c == c_code)
    if not _sums_as_torch_norm(lib, compute):
        return None
    others = [flats[i] for i in range(len(flats)) if i != base_index]
    k, n = len(others), flats[0].numel()
    if k < 2 or n == 0:
        return None
    base = flats[base_index] if base_index is not None else None
    base_ptr = base.data_ptr() if base is not None else None
    pointers = _pointers(others)
    eps = float(params["eps"])
    w = torch.tensor(
        [per_model[i]["weight"] for i in range(len(flats)) if i != base_index], dtype=compute
    )
    if params["normalize_weights"]:
        w = w / w.sum()
    w32 = w.float().contiguous()
    none = ctypes.c_void_p(None)

    def sums(stage: int, nrm=none, mn=0.0, dots=none, count: int = 1) -> torch.Tensor:
        out_sums = torch.zeros(count, dtype=torch.float64)
        if lib.kr_multislerp(
            stage, n, k, base_ptr, pointers, in_code, c_code, nrm, w32.data_ptr(), mn, dots,
            0.0, 0.0, 0.0, out_sums.data_ptr(), None, out_code,
        ) < 0:  # fmt: skip
            raise MemoryError("fused multislerp: out of memory for its chunk buffers")
        return out_sums

    def norm(sq: torch.Tensor) -> torch.Tensor:  # torch.norm in the compute dtype
        return sq.to(torch.float32).sqrt().to(compute)

    norms = norm(sums(1, count=k))
    nrm = (norms + eps).float().contiguous()
    mean_norm = norm(sums(2, nrm.data_ptr()))[0]
    if mean_norm < eps:
        return None
    mn = float(mean_norm)
    dots = sums(3, nrm.data_ptr(), mn, count=k).to(torch.float32).to(compute)
    d32 = dots.float().contiguous()
    tangent_norm = norm(sums(4, nrm.data_ptr(), mn, d32.data_ptr()))[0] + eps
    cos_tn = float(torch.cos(tangent_norm))
    f = float(torch.sin(tangent_norm) / tangent_norm)
    scale = float((norms * w).sum())

    def run(s: int, e: int, v: int) -> int:
        return lib.kr_multislerp(
            5, e - s, k, base[s:e].data_ptr() if base is not None else None, _at(others, s, e),
            in_code, c_code, nrm.data_ptr(), w32.data_ptr(), mn, d32.data_ptr(), cos_tn, f,
            scale, None, v, out_code,
        )  # fmt: skip

    return _spans(out, run)


def _sce(lib, base, others, select_topk: float, codes, out: Output) -> int:
    """SCE: the variance top-k (two counting passes of the radix select), the mask with its
    squared sums (the weights), then the merge, each one pass over the inputs."""
    in_code, c_code, out_code = codes
    compute = next(d for d, c in _CODES.items() if c == c_code)
    n, k = base.numel(), len(others)
    pointers = _pointers(others)
    select, threshold, quota = 0, 0, ctypes.c_int64(0)
    if select_topk <= 0:
        select = 1
    elif select_topk < 1:
        high = torch.zeros(methods.HIGH_BINS, dtype=torch.int32)
        nonzero = ctypes.c_int64(0)
        if lib.kr_sce_counts(
            n, k, base.data_ptr(), pointers, in_code, c_code, -1, high.data_ptr(),
            ctypes.byref(nonzero),
        ):  # fmt: skip
            raise MemoryError("fused SCE: out of memory for its chunk buffers")
        keep = int(torch.tensor(nonzero.value) * select_topk)  # as mergekit: a float32 product
        if keep == 0:
            select = 1
        else:
            bucket, above = methods.kth_from_top(high, keep)
            if c_code == _CODES[torch.bfloat16] and methods.KEY_SHIFT >= 16:  # bf16 variances
                low = _bf16_low_counts(high, bucket)
            else:
                low = torch.zeros(methods.LOW_BINS, dtype=torch.int32)
                lib.kr_sce_counts(
                    n, k, base.data_ptr(), pointers, in_code, c_code, bucket, low.data_ptr(), None
                )
            value, strictly = methods.kth_from_top(low, keep - above)
            threshold = (bucket << methods.KEY_SHIFT) | value
            quota = ctypes.c_int64(keep - above - strictly)
            select = 2
    mask = torch.empty(n, dtype=torch.uint8)
    squares = (ctypes.c_double * k)()
    if lib.kr_sce_mask(
        n, k, base.data_ptr(), pointers, in_code, c_code, select, threshold,
        ctypes.byref(quota), mask.data_ptr(), squares,
    ):  # fmt: skip
        raise MemoryError("fused SCE: out of memory for its chunk buffers")
    sums = torch.tensor(list(squares), dtype=torch.float64)
    w = _floats(methods.sce_weights_from_squares(sums, n, compute).tolist())
    keep_all = mask.data_ptr() if select != 0 else None

    def run(s, e, v):
        return lib.kr_tv_exact(
            e - s, k, base[s:e].data_ptr(), _at(others, s, e), in_code, w, None, keep_all, s,
            0, None, 1, 1, 1, 1.0, 1.0, c_code, v, out_code, None, None, None,
        )  # fmt: skip

    return _spans(out, run)


def _della(
    lib, method, tensors, flats, base_index, params, per_model, codes, out: Output, generator
):
    """DELLA / Linear DELLA: MagPrune's probabilities per row (kernel), torch.bernoulli draws
    (the reference's), the L1 rescale factors, then the task-vector merge in one pass."""
    in_code, c_code, out_code = codes
    compute = next(d for d, c in _CODES.items() if c == c_code)
    others = [i for i in range(len(flats)) if i != base_index]
    base = flats[base_index]
    shape = tensors[base_index].shape
    rows, cols = (1, shape[0]) if len(shape) < 2 else (shape[0], shape[1])
    work = methods.della_work_dtype(torch.empty(0, dtype=compute))
    w_code = _CODES[work]
    rescale = bool(params["rescale"])
    for i in others:  # before any draw: the reference raises mergekit's error
        density = float(per_model[i].get("density", 1.0))
        epsilon = float(per_model[i].get("epsilon", 0.15))
        if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
            return None
    keeps: list[torch.Tensor | None] = []
    ratios = []
    for i in others:
        density = float(per_model[i].get("density", 1.0))
        epsilon = float(per_model[i].get("epsilon", 0.15))
        if density >= 1:
            keeps.append(None)
            ratios.append(1.0)
            continue
        if density <= 0:
            keeps.append(torch.zeros(base.numel(), dtype=torch.uint8))
            ratios.append(1.0)
            continue
        probs = torch.empty(base.numel(), dtype=work)
        before = ctypes.c_double(0.0)
        scratch = torch.empty(3 * cols, dtype=torch.int32)
        lib.kr_della_probs(
            rows, cols, base.data_ptr(), flats[i].data_ptr(), in_code, c_code, w_code,
            density - epsilon, epsilon, probs.data_ptr(), ctypes.byref(before), scratch.data_ptr(),
        )  # fmt: skip
        if before.value < 0:
            raise MemoryError("fused DELLA: out of memory for its row buffers")
        keep = torch.bernoulli(probs.view(rows, cols), generator=generator).reshape(-1)
        keep = keep.to(torch.uint8)
        del probs
        ratio = 1.0
        if rescale:
            after = ctypes.c_double(0.0)
            lib.kr_masked_l1(
                base.numel(), base.data_ptr(), flats[i].data_ptr(), in_code, c_code,
                keep.data_ptr(), ctypes.byref(after),
            )  # fmt: skip
            scale = methods.della_ratio(
                torch.tensor(before.value, dtype=torch.float64),
                torch.tensor(after.value, dtype=torch.float64),
                work,
            )
            ratio = 1.0 if scale is None else float(scale)
        keeps.append(keep)
        ratios.append(ratio)
    weights = torch.tensor([per_model[i]["weight"] for i in others], dtype=compute)
    consensus = method == "della"
    normalize = bool(params["normalize"])
    divisor = 1.0
    if normalize and not consensus:
        total = weights.sum()
        divisor = 1.0 if abs(float(total)) < 1e-8 else float(total)
    k = len(others)
    inputs = [flats[i] for i in others]
    w = _floats(weights.tolist())
    keep_ptrs = (ctypes.c_void_p * k)(*(t.data_ptr() if t is not None else None for t in keeps))
    ratio_arr = _floats(ratios)
    lam = float(params["lambda"])

    def run(s, e, v):
        return lib.kr_tv_exact(
            e - s, k, base[s:e].data_ptr(), _at(inputs, s, e), in_code, w, keep_ptrs, None,
            s, int(rescale), ratio_arr, 0, int(consensus), int(normalize), divisor, lam, c_code,
            v, out_code, None, None, None,
        )  # fmt: skip

    return _spans(out, run)


def _trim_thresholds(lib, base, inputs, in_code, densities, c_code):
    """TIES's thresholds per task vector (two radix-select counting passes, the deltas rounded
    to the compute dtype): (trim flags, threshold keys, quotas of ties still to keep)."""
    k, n = len(inputs), base.numel()
    trim, thresholds, quotas = [0] * k, [0] * k, [0] * k
    for j in range(k):
        if densities[j] <= 0:
            trim[j], thresholds[j] = 1, 0xFFFFFFFF  # nothing is above it: keep nothing
        elif densities[j] < 1:
            trim[j] = 1
    selected = [j for j in range(k) if trim[j] and densities[j] > 0]
    if selected:
        keep = {j: max(1, int(densities[j] * n)) for j in selected}
        high = _histograms(
            lib, base, inputs, in_code, selected, methods.HIGH_BINS, [-1] * k, c_code
        )
        edges = [-1] * k
        above = {}
        for j in selected:
            edges[j], above[j] = methods.kth_from_top(high[j], keep[j])
        if c_code == _CODES[torch.bfloat16] and methods.KEY_SHIFT >= 16:
            low = {j: _bf16_low_counts(high[j], edges[j]) for j in selected}
        else:
            low = _histograms(lib, base, inputs, in_code, selected, methods.LOW_BINS, edges, c_code)
        for j in selected:
            value, strictly_above = methods.kth_from_top(low[j], keep[j] - above[j])
            thresholds[j] = (edges[j] << methods.KEY_SHIFT) | value
            quotas[j] = keep[j] - above[j] - strictly_above
            methods.record_ties(int(low[j][value]), quotas[j])
    return trim, thresholds, quotas


def _bf16_low_counts(high: torch.Tensor, edge: int) -> torch.Tensor:
    """The low-bits histogram of the keys in bin ``edge``, without a counting pass, for keys
    of bf16 values: a bf16 value's float32 bits have their low 16 bits (``KEY_SHIFT``) zero,
    so every key in the bin is ``edge << KEY_SHIFT`` and the pass would count them all at 0."""
    low = torch.zeros(methods.LOW_BINS, dtype=torch.int32)
    low[0] = high[edge]
    return low


def _half_task_vectors(lib, method, flats, base_index, params, per_model, codes, out) -> int:
    """task_arithmetic / TIES in bf16/f16 compute: mergekit's generalized task arithmetic op by
    op in the compute dtype (kr_tv_exact), TIES's trim on the rounded deltas."""
    in_code, c_code, out_code = codes
    compute = next(d for d, c in _CODES.items() if c == c_code)
    others = [i for i in range(len(flats)) if i != base_index]
    base = flats[base_index]
    inputs = [flats[i] for i in others]
    k = len(inputs)
    weights = torch.tensor([float(per_model[i]["weight"]) for i in others], dtype=compute)
    consensus = method == "ties"
    normalize = bool(params["normalize"])
    divisor = 1.0
    if normalize and not consensus:  # mergekit: the weights' sum in the compute dtype
        total = float(weights.sum())
        divisor = 1.0 if abs(total) < 1e-8 else total
    trim = thresholds = quotas = None
    if consensus:
        densities = [float(per_model[i].get("density", 1.0)) for i in others]
        flags, keys, left = _trim_thresholds(lib, base, inputs, in_code, densities, c_code)
        trim = (ctypes.c_uint8 * k)(*flags)
        thresholds = (ctypes.c_uint32 * k)(*keys)
        quotas = (ctypes.c_int64 * k)(*left)  # carried from span to span
    w = _floats(weights.tolist())
    lam = float(params["lambda"])

    def run(s, e, v):
        return lib.kr_tv_exact(
            e - s, k, base[s:e].data_ptr(), _at(inputs, s, e), in_code, w, None, None, s, 0,
            None, 0, int(consensus), int(normalize), divisor, lam, c_code, v, out_code, trim,
            thresholds, quotas,
        )  # fmt: skip

    return _spans(out, run)


def _float32_sum(values: Sequence[float]) -> float:
    """The sum of the values in float32 (as mergekit sums its float32 weight tensor)."""
    return float(torch.tensor(list(values), dtype=torch.float32).sum())


def _divisor(weights: Sequence[float]) -> float:
    """mergekit's normalising divisor without consensus: the float32 sum of the weights, 1
    when it is below 1e-8 in magnitude."""
    total = _float32_sum(weights)
    return 1.0 if abs(total) < 1e-8 else total


def _spans(out: Output, kernel) -> int:
    """Run ``kernel(start, end, view_pointer)`` over the output's spans, writing each."""
    bad = 0
    for start, end in out.spans():
        view = out.buffer(start, end)
        count = kernel(start, end, view.data_ptr())
        if count < 0:
            raise MemoryError("fused merge: out of memory for its chunk buffers")
        bad += count
        out.write(start, end)
    return bad


def _at(tensors: Sequence[torch.Tensor], start: int, end: int) -> ctypes.Array:
    return _pointers([t[start:end] for t in tensors])


def _linear(lib, flats, weights, divisor, in_code, out: Output, out_code, fused=False) -> int:
    """Weighted sum (``fused``: by fused multiply-adds, as mergekit's ``addcmul_``)."""
    bad = 0
    w = _floats(weights)
    for start, end in out.spans():
        view = out.buffer(start, end)
        bad += lib.kr_linear(
            end - start,
            len(flats),
            _at(flats, start, end),
            in_code,
            w,
            divisor,
            view.data_ptr(),
            out_code,
            int(fused),
        )
        out.write(start, end)
    return bad


def _slerp(lib, flats, base_index, t, in_code, out: Output, out_code) -> int:
    v0, v1 = flats[base_index], flats[1 - base_index]
    if t in (0, 1):  # a copy of one end (no 0 * x: that would turn an Inf into NaN)
        return _linear(lib, [v0 if t == 0 else v1], [1.0], 0.0, in_code, out, out_code)
    sums = (ctypes.c_double * 3)()
    lib.kr_dots(v0.numel(), v0.data_ptr(), v1.data_ptr(), in_code, sums)
    coefficients = methods.slerp_coefficients(t, sums[0], sums[1], sums[2])
    return _linear(lib, [v0, v1], coefficients, 0.0, in_code, out, out_code)


def _task_vectors(
    lib, method, flats, base_index, params, per_model, in_code, out: Output, out_code, generator
):
    others = [i for i in range(len(flats)) if i != base_index]
    base = flats[base_index]
    inputs = [flats[i] for i in others]
    weights = [float(per_model[i]["weight"]) for i in others]
    n = base.numel()
    k = len(inputs)
    trim = [0] * k
    thresholds = [0] * k
    quotas = [0] * k
    densities = [float(per_model[i].get("density", 1.0)) for i in others]
    if method == "ties":
        trim, thresholds, quotas = _trim_thresholds(lib, base, inputs, in_code, densities, 0)
    dropped = [j for j in range(k) if densities[j] < 1] if method in RANDOM else []
    scales = [1.0] * k
    masks: dict[int, torch.Tensor] = {}
    if dropped and params.get("rescale"):
        scales, masks = _rescales(lib, base, inputs, in_code, densities, dropped, generator)
    constant = (
        _floats(weights),
        (ctypes.c_uint8 * k)(*trim),
        (ctypes.c_uint32 * k)(*thresholds),
        (ctypes.c_int64 * k)(*quotas),  # ties at the threshold still to keep, carried along
    )
    shared = (
        _floats(densities),
        _floats(scales),
        int(method in ("ties", "dare_ties")),
        int(bool(params["normalize"])),
        _divisor(weights),
        float(params["lambda"]),
    )
    # with rescale the keep masks came from its pass: the draws are not made a second time
    draws = _Draws(n, [] if masks else dropped, generator)
    bits = None
    if masks:
        bits = (ctypes.c_void_p * k)(
            *(masks[j].data_ptr() if j in masks else None for j in range(k))
        )
    bad = 0
    for start, end in out.spans():
        view = out.buffer(start, end)
        for low, high, offset in draws.cover(start, end):
            count = lib.kr_tv_merge(
                high - low,
                k,
                base[low:high].data_ptr(),
                _at(inputs, low, high),
                in_code,
                *constant,
                draws.pointers(k, offset),
                bits,
                low,
                *shared,
                view[low - start :].data_ptr(),
                out_code,
            )
            if count < 0:
                raise MemoryError("fused task-vector merge: out of memory for its chunk buffers")
            bad += count
        out.write(start, end)
    return bad


class _Draws:
    """DARE's uniform draws, made exactly as the torch reference makes them: block by block
    (`methods.CPU_BLOCK` elements), and in each block one ``torch.rand`` per dropping model in
    model order, from the tensor's generator. Without dropping models: one range, no draws."""

    def __init__(self, n: int, dropped: list[int], generator: torch.Generator | None) -> None:
        self.n = n
        self.dropped = dropped
        self.generator = generator
        self.block = -1
        self.tables: dict[int, torch.Tensor] = {}

    def cover(self, start: int, end: int):
        """``(low, high, offset)`` pieces of [start, end), none crossing a block; ``offset`` is
        ``low``'s position in its block's draws."""
        if not self.dropped:
            yield start, end, 0
            return
        size = methods.CPU_BLOCK
        low = start
        while low < end:
            block = low // size
            while self.block < block:  # blocks come in order: draw the next one
                self.block += 1
                length = min(size, self.n - self.block * size)
                self.tables = {
                    j: torch.rand(length, generator=self.generator) for j in self.dropped
                }
            high = min(end, (block + 1) * size)
            yield low, high, low - block * size
            low = high

    def pointers(self, k: int, offset: int) -> ctypes.Array | None:
        if not self.dropped:
            return None
        return (ctypes.c_void_p * k)(
            *(self.tables[j][offset:].data_ptr() if j in self.tables else None for j in range(k))
        )


def _rescales(lib, base, inputs, in_code, densities, dropped, generator):
    """DARE's rescale: each dropping model's task vector scaled back to its unpruned L1 norm.

    One pass over the draws measures the norms and keeps each model's keep mask (a bit per
    element), so the merge pass reuses the mask instead of drawing again (the reference draws
    twice from a rewound generator: the same numbers). The generator is rewound here too.
    """
    k = len(inputs)
    n = base.numel()
    state = generator.get_state()
    before = (ctypes.c_double * k)()
    after = (ctypes.c_double * k)()
    masks = {j: torch.zeros((n + 7) // 8, dtype=torch.uint8) for j in dropped}
    bits = (ctypes.c_void_p * k)(*(masks[j].data_ptr() if j in masks else None for j in range(k)))
    keep_below = _floats(densities)
    draws = _Draws(n, dropped, generator)
    for low, high, offset in draws.cover(0, n):
        lib.kr_tv_l1(
            high - low,
            k,
            base[low:high].data_ptr(),
            _at(inputs, low, high),
            in_code,
            draws.pointers(k, offset),
            keep_below,
            before,
            after,
            bits,
            low,
        )
    scales = [1.0] * k
    for j in dropped:
        if before[j] >= methods.RESCALE_FLOOR and after[j] >= methods.RESCALE_FLOOR:
            scales[j] = before[j] / after[j]
    generator.set_state(state)
    return scales, masks


def _histograms(
    lib, base, inputs, in_code, selected, bins, edges, c_code
) -> dict[int, torch.Tensor]:
    counts = {j: torch.zeros(bins, dtype=torch.int32) for j in selected}
    tables = (ctypes.c_void_p * len(inputs))(
        *(counts[j].data_ptr() if j in counts else None for j in range(len(inputs)))
    )
    lib.kr_tv_histogram(
        base.numel(),
        len(inputs),
        base.data_ptr(),
        _pointers(inputs),
        in_code,
        tables,
        (ctypes.c_int32 * len(inputs))(*edges),
        c_code,
    )
    return counts
