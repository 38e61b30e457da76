"""Benchmark: `merge run` against `mergekit-yaml` on three synthetic Mistral-7B-shaped checkpoints.

Not a test: it prints numbers. One path, top to bottom:

1. build  — three bf16 checkpoints (base and two fine-tunes = base + small noise) with the
            Mistral-7B shapes and ``--layers`` layers (4: 1.13B parameters, 2.3 GB each), written
            tensor chunk by tensor chunk into 2 safetensors shards + index, a MistralForCausalLM
            config.json and the real Mistral tokenizer. Reused from ``--workdir`` when present.
2. recipe — one per mergekit method (`write_recipes`): linear of 3 models, slerp of 2
            (gradient t with self_attn/mlp filters), ties of base + 2 (density 0.5), the other
            task-vector methods, model_stock, nuslerp, multislerp, karcher of base + 2,
            nearswap and arcee_fusion of base + 1, passthrough stacking both models' layers;
            all with ``dtype: bfloat16``.
3. time   — per method: ``cat`` the inputs (warms the page cache; its best time is the I/O
            floor), then ``merge run`` and ``mergekit-yaml`` as subprocesses, best wall time of
            ``--repeat`` runs, peak RSS of the child process tree sampled every 50 ms.
4. check  — every output tensor of both children compared in float32: max |diff| and the
            fraction of elements more than one bf16 ulp apart; then the outputs are deleted.
5. report — a table with the ratio mergekit/ours and whether the targets of issue 2 are met.

    python bench/merge_vs_mergekit.py                       # CPU, full size (minutes)
    python bench/merge_vs_mergekit.py --small               # smoke run (seconds)
    python bench/merge_vs_mergekit.py --device cuda --workdir /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout that is not pip-installed (a GPU box)
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import torch  # noqa: E402

GiB = 2**30
METHODS = (
    "linear",
    "slerp",
    "ties",
    "task_arithmetic",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
    "ram",
    "ramplus_tl",
    "model_stock",
    "nuslerp",
    "multislerp",
    "karcher",
    "nearswap",
    "arcee_fusion",
    "passthrough",
)
#: the targets of issues 2 and 12: 4x mergekit's wall time for every method, slerp 5x, ties 20x
TARGET_SPEEDUP = {m: 4.0 for m in METHODS} | {"slerp": 5.0, "ties": 20.0}
#: methods that draw random numbers: the children differ from mergekit's by design
RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear", "arcee_fusion")
SHAPES = {
    "full": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=32000,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=896,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=32000,  # the real tokenizer's vocabulary
    ),
}
BASE_STD = 0.02  # weights ~ N(0, 0.02); norms ~ 1 + N(0, 0.02)
FINETUNE_STD = 0.002  # fine-tune = base + N(0, 0.002): |cos| ~ 0.995, below slerp's lerp fallback
CHUNK = 1 << 25  # elements generated / compared at a time (128 MiB in float32)
SAMPLE_S = 0.05
BUILD_VERSION = 1


# --- 1. build -----------------------------------------------------------------------------


def tensor_layout(shape: dict, layers: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Names and shapes of a MistralForCausalLM state dict, split into 2 shards."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]

    def layer(n: int) -> list[tuple[str, tuple[int, ...]]]:
        p = f"model.layers.{n}."
        return [
            (p + "input_layernorm.weight", (h,)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
        ]

    first = [("model.embed_tokens.weight", (shape["vocab_size"], h))]
    second: list[tuple[str, tuple[int, ...]]] = []
    for n in range(layers):
        (first if n < layers // 2 else second).extend(layer(n))
    second += [("model.norm.weight", (h,)), ("lm_head.weight", (shape["vocab_size"], h))]
    return [first, second]


def mistral_config(shape: dict, layers: int) -> dict:
    import transformers

    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        **shape,
        "num_hidden_layers": layers,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
        "transformers_version": transformers.__version__,
    }


def _safetensors_header(entries: list[tuple[str, tuple[int, ...]]]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * 2
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write(f, tensor: torch.Tensor) -> None:
    f.write(memoryview(tensor.cpu().contiguous().view(torch.uint8).numpy()))


def build_checkpoints(models_dir: Path, spec: dict, gen_device: torch.device) -> dict[str, Path]:
    """base, ft1, ft2 under ``models_dir``; reused when the stamp matches ``spec``."""
    names = ("base", "ft1", "ft2")
    folders = {n: models_dir / n for n in names}
    stamp = models_dir / "built.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        print(f"reusing the checkpoints in {models_dir}")
        return folders
    shutil.rmtree(models_dir, ignore_errors=True)
    for folder in folders.values():
        folder.mkdir(parents=True)
    shape, layers = SHAPES[spec["size"]], spec["layers"]
    shards = tensor_layout(shape, layers)
    n_params = sum(math.prod(s) for shard in shards for _, s in shard)
    print(
        f"building 3 checkpoints: {layers} layers, {n_params / 1e9:.3f}B parameters, "
        f"{n_params * 2 / 1e9:.2f} GB each in bf16, random numbers on {gen_device}"
    )
    started = time.perf_counter()
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for shard, file_name in zip(shards, files, strict=True):
        header = _safetensors_header(shard)
        outs = [open(folders[n] / file_name, "wb") for n in names]  # noqa: SIM115
        try:
            for f in outs:
                f.write(header)
            for name, tshape in shard:
                _write_tensor(outs, name, tshape, spec["seed"], gen_device)
        finally:
            for f in outs:
                f.close()
    weight_map = {
        name: file_name for shard, file_name in zip(shards, files, strict=True) for name, _ in shard
    }
    index = {"metadata": {"total_size": n_params * 2}, "weight_map": weight_map}
    config = mistral_config(shape, layers)
    from safetensors import safe_open

    from pretrain.tokenizer import load_mistral_tokenizer

    tokenizer = load_mistral_tokenizer(models_dir / "tokenizer-source")
    for folder in folders.values():
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save_pretrained(folder)
        for shard, file_name in zip(shards, files, strict=True):  # safetensors reads it back
            with safe_open(folder / file_name, framework="pt") as f:
                if sorted(f.keys()) != sorted(n for n, _ in shard):
                    raise RuntimeError(f"{folder / file_name}: tensors do not match the layout")
                last, last_shape = shard[-1]
                if tuple(f.get_slice(last).get_shape()) != last_shape:
                    raise RuntimeError(f"{folder / file_name}: {last} has the wrong shape")
    stamp.write_text(json.dumps(spec))
    print(f"built in {time.perf_counter() - started:.1f} s")
    return folders


def _write_tensor(outs, name: str, shape: tuple[int, ...], seed: int, device: torch.device) -> None:
    """base = N(0, 0.02) (norms: 1 + that); ft_k = bf16(base) + N(0, 0.002); row chunks."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    rows = shape[0]
    row_elems = math.prod(shape[1:])
    step = max(1, CHUNK // max(1, row_elems))
    for start in range(0, rows, step):
        chunk = (min(step, rows - start), *shape[1:])
        base = torch.randn(chunk, generator=g, device=device).mul_(BASE_STD)
        if len(shape) == 1:
            base.add_(1.0)
        base16 = base.to(torch.bfloat16)
        _write(outs[0], base16)
        base32 = base16.float()
        for out in outs[1:]:
            noise = torch.randn(chunk, generator=g, device=device).mul_(FINETUNE_STD)
            _write(out, noise.add_(base32).to(torch.bfloat16))


# --- 2. recipes ---------------------------------------------------------------------------


def write_recipes(recipes_dir: Path, models: dict[str, Path], layers: int) -> dict[str, Path]:
    base, ft1, ft2 = (str(models[n]) for n in ("base", "ft1", "ft2"))
    texts = {
        "linear": f"""\
merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.5}}
  - model: {ft1}
    parameters: {{weight: 0.3}}
  - model: {ft2}
    parameters: {{weight: 0.2}}
dtype: bfloat16
""",
        "slerp": f"""\
slices:
  - sources:
      - model: {base}
        layer_range: [0, {layers}]
      - model: {ft1}
        layer_range: [0, {layers}]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""",
        "ties": f"""\
merge_method: ties
base_model: {base}
models:
  - model: {base}
  - model: {ft1}
    parameters: {{density: 0.5, weight: 0.6}}
  - model: {ft2}
    parameters: {{density: 0.5, weight: 0.4}}
parameters:
  normalize: true
dtype: bfloat16
""",
    }
    texts.update(_more_recipes(base, ft1, ft2, layers))
    recipes_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for method, text in texts.items():
        paths[method] = recipes_dir / f"{method}.yaml"
        paths[method].write_text(text)
    return paths


def _more_recipes(base: str, ft1: str, ft2: str, layers: int) -> dict[str, str]:
    """The methods of issue 12 (and the rest of the task-vector family) on the same models."""

    def task_vectors(method: str, extra: str = "", shared: str = "") -> str:
        return f"""\
merge_method: {method}
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6{extra}}}
  - model: {ft2}
    parameters: {{weight: 0.4{extra}}}
{shared}dtype: bfloat16
"""

    def plain(method: str, models: list[str], shared: str = "", with_base: bool = True) -> str:
        listed = "".join(f"  - model: {m}\n" for m in models)
        head = f"base_model: {base}\n" if with_base else ""
        return f"merge_method: {method}\n{head}models:\n{listed}{shared}dtype: bfloat16\n"

    weights = "".join(
        f"  - model: {m}\n    parameters: {{weight: {w}}}\n" for m, w in ((ft1, 0.6), (ft2, 0.4))
    )
    return {
        "task_arithmetic": task_vectors("task_arithmetic"),
        "dare_ties": task_vectors("dare_ties", ", density: 0.5"),
        "dare_linear": task_vectors("dare_linear", ", density: 0.5"),
        "breadcrumbs": task_vectors("breadcrumbs", ", density: 0.9, gamma: 0.01"),
        "breadcrumbs_ties": task_vectors("breadcrumbs_ties", ", density: 0.9, gamma: 0.01"),
        "della": task_vectors("della", ", density: 0.5, epsilon: 0.1"),
        "della_linear": task_vectors("della_linear", ", density: 0.5, epsilon: 0.1"),
        "sce": plain("sce", [ft1, ft2], "parameters:\n  select_topk: 0.5\n"),
        "ram": plain("ram", [ft1, ft2], "parameters:\n  epsilon: 1.0e-5\n"),
        "ramplus_tl": plain("ramplus_tl", [ft1, ft2], "parameters:\n  r: 0.1\n  alpha: 0.2\n"),
        "model_stock": plain("model_stock", [ft1, ft2]),
        "karcher": plain("karcher", [base, ft1, ft2], with_base=False),
        "nearswap": plain("nearswap", [base, ft1], "parameters:\n  t: 0.001\n"),
        "arcee_fusion": plain("arcee_fusion", [base, ft1]),
        "nuslerp": f"merge_method: nuslerp\nbase_model: {base}\nmodels:\n{weights}dtype: bfloat16\n",
        "multislerp": f"merge_method: multislerp\nbase_model: {base}\nmodels:\n{weights}"
        "dtype: bfloat16\n",
        "passthrough": f"""\
merge_method: passthrough
slices:
  - sources:
      - model: {base}
        layer_range: [0, {layers}]
  - sources:
      - model: {ft1}
        layer_range: [0, {layers}]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - value: 1.0
dtype: bfloat16
""",
    }


_THREE = ("base", "ft1", "ft2")
METHOD_MODELS = {m: _THREE for m in METHODS} | {
    "slerp": ("base", "ft1"),
    "nearswap": ("base", "ft1"),
    "arcee_fusion": ("base", "ft1"),
    "passthrough": ("base", "ft1"),
}


# --- 3. time ------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    peak_rss: int  # bytes, sum over the child's process tree, sampled every 50 ms
    peak_anon: int  # the same for RssAnon (heap, not file-backed mmap pages)
    cpu_seconds: float  # user + system time of the child and the children it waited for
    rc: int
    log: str


def _tree_memory(root: psutil.Process) -> tuple[int, int]:
    rss = anon = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for proc in procs:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, anon


def run_measured(cmd: list[str], log: Path, env: dict[str, str]) -> Run:
    """Wall seconds and peak memory of ``cmd``; its output goes to ``log``."""
    os.sync()  # earlier runs' dirty pages are not flushed on this run's time
    with open(log, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        root = psutil.Process(proc.pid)
        peak_rss = peak_anon = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss, anon = _tree_memory(root)
            peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
            time.sleep(SAMPLE_S)
        seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return Run(seconds, peak_rss, peak_anon, cpu, proc.returncode, str(log))


def time_cat(files: list[Path]) -> float:
    started = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def time_startup(device: torch.device, env: dict[str, str]) -> dict[str, float]:
    """Best of 2: a Python that only imports each tool's merge modules and touches the device.

    Both tools pay this on every run, whatever the model size; on a GPU it is most of the wall.
    """
    touch = f"import torch; torch.zeros(1, device={str(device)!r})"
    imports = {
        "ours": "import merger.cli, merger.core.engine, merger.core.child, merger.share.card",
        "mergekit": "import mergekit.scripts.run_yaml, mergekit.merge",
    }
    best = {}
    for tool, modules in imports.items():
        runs = []
        for _ in range(2):
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-c", f"{touch}; {modules}"], env=env, cwd=REPO, check=True
            )
            runs.append(time.perf_counter() - started)
        best[tool] = min(runs)
    return best


# --- 4. check -----------------------------------------------------------------------------


def _tensor_files(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            where.update({name: file for name in f.keys()})
    return where


def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Float bit patterns as integers ordered like the values: neighbours differ by 1, -0 == +0."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    bits = x.view(ints).to(torch.int64 if ints == torch.int64 else torch.int32)
    magnitude = bits & (2 ** (8 * x.element_size() - 1) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def compare_children(ours: Path, theirs: Path, device: torch.device) -> dict:
    """Every tensor: max |diff| in float32, elements that differ, elements > 1 ulp apart."""
    from safetensors import safe_open

    a_files, b_files = _tensor_files(ours), _tensor_files(theirs)
    result = {
        "tensors": len(a_files),
        "only_ours": sorted(set(a_files) - set(b_files)),
        "only_mergekit": sorted(set(b_files) - set(a_files)),
        "bad_shape_or_dtype": [],
        "max_abs_diff": 0.0,
        "elements": 0,
        "differ": 0,
        "over_1ulp": 0,
        "worst_tensor": None,
    }
    handles: dict[Path, object] = {}

    def get(file: Path, name: str) -> torch.Tensor:
        if file not in handles:
            handles[file] = safe_open(file, framework="pt")
        return handles[file].get_tensor(name)

    for name in sorted(set(a_files) & set(b_files)):
        a, b = get(a_files[name], name), get(b_files[name], name)
        if a.shape != b.shape or a.dtype != b.dtype:
            result["bad_shape_or_dtype"].append(
                f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
            )
            continue
        a, b = a.reshape(-1), b.reshape(-1)
        for start in range(0, a.numel(), CHUNK):
            x, y = a[start : start + CHUNK].to(device), b[start : start + CHUNK].to(device)
            result["elements"] += x.numel()
            ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
            unequal = x.view(ints) != y.view(ints)  # one cheap pass; most elements are equal
            if not bool(unequal.any()):
                continue
            x, y = x[unequal], y[unequal]
            steps = (_ordered_bits(x) - _ordered_bits(y)).abs_()  # representable values apart
            worst = float((x.float() - y.float()).abs_().max())
            if worst > result["max_abs_diff"]:
                result["max_abs_diff"], result["worst_tensor"] = worst, name
            result["differ"] += int((steps > 0).sum())  # -0.0 vs +0.0 is no difference
            result["over_1ulp"] += int((steps > 1).sum())
    handles.clear()
    return result


def agreement_text(check: dict | None, method: str = "") -> str:
    if check is None:
        return "not checked"
    if method in RANDOM_METHODS:
        return "random draws (compared in tests/merger/core/test_parity_methods.py)"
    if check["only_ours"] or check["only_mergekit"] or check["bad_shape_or_dtype"]:
        return "MISMATCH: tensor names/shapes differ"
    n = max(1, check["elements"])
    return (
        f"max|d| {check['max_abs_diff']:.2e}, {100 * check['differ'] / n:.4f}% differ, "
        f"{100 * check['over_1ulp'] / n:.4f}% >1ulp"
    )


# --- 5. run it all ------------------------------------------------------------------------


@dataclass
class MethodResult:
    method: str
    cat_s: float = math.inf
    cat_bytes: int = 0
    ours: list[Run] = field(default_factory=list)
    mergekit: list[Run] = field(default_factory=list)
    check: dict | None = None

    @staticmethod
    def best(runs: list[Run]) -> Run | None:
        ok = [r for r in runs if r.rc == 0]
        return min(ok, key=lambda r: r.seconds) if ok and len(ok) == len(runs) else None


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["HF_HUB_OFFLINE"] = "1"  # local folders only: no network look-ups on anyone's clock
    env.setdefault("NO_COLOR", "1")
    return env


def bench_method(
    method: str,
    recipe: Path,
    inputs: list[Path],
    work: Path,
    args: argparse.Namespace,
    device: torch.device,
) -> MethodResult:
    result = MethodResult(method, cat_bytes=sum(f.stat().st_size for f in inputs))
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = child_env()
    with_mergekit = method not in args.skip_mergekit_methods
    for rep in range(args.repeat):
        ours_out, theirs_out = work / f"out-{method}-ours", work / f"out-{method}-mergekit"
        for out in (ours_out, theirs_out):
            shutil.rmtree(out, ignore_errors=True)
        result.cat_s = min(result.cat_s, time_cat(inputs))
        cmd = [sys.executable, "-m", "merger.cli", "run", str(recipe), "--out", str(ours_out)]
        cmd += ["--device", args.device]
        if args.compute_dtype:
            cmd += ["--compute-dtype", args.compute_dtype]
        run = run_measured(cmd, logs / f"{method}-ours-{rep}.log", env)
        result.ours.append(run)
        print(f"  {method} ours     run {rep + 1}: {_run_text(run)}", flush=True)
        if with_mergekit:
            result.cat_s = min(result.cat_s, time_cat(inputs))
            cmd = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(recipe), str(theirs_out)]
            if device.type == "cuda":
                cmd.append("--cuda")
            run = run_measured(cmd, logs / f"{method}-mergekit-{rep}.log", env)
            result.mergekit.append(run)
            print(f"  {method} mergekit run {rep + 1}: {_run_text(run)}", flush=True)
        if rep == 0 and with_mergekit and result.ours[-1].rc == 0 and result.mergekit[-1].rc == 0:
            started = time.perf_counter()
            result.check = compare_children(ours_out, theirs_out, device)
            print(
                f"  {method} outputs: {agreement_text(result.check, method)} "
                f"(compared in {time.perf_counter() - started:.1f} s)",
                flush=True,
            )
        if not args.keep:
            for out in (ours_out, theirs_out):
                shutil.rmtree(out, ignore_errors=True)
    return result


def _run_text(run: Run) -> str:
    if run.rc != 0:
        tail = Path(run.log).read_text(errors="replace").strip().splitlines()[-15:]
        return f"FAILED (exit {run.rc}); log {run.log}:\n      " + "\n      ".join(tail)
    return (
        f"{run.seconds:.1f} s (CPU {run.cpu_seconds:.1f} s), peak RSS {run.peak_rss / GiB:.2f} GiB "
        f"(of which anonymous {run.peak_anon / GiB:.2f})"
    )


def print_report(
    results: list[MethodResult], device_text: str, startup: dict[str, float]
) -> list[str]:
    header = (
        "method",
        "ours s",
        "mergekit s",
        "mk/ours",
        "ours CPU s",
        "mk CPU s",
        "ours RSS GiB",
        "mk RSS GiB",
        "agreement",
    )
    rows = []
    verdicts = []
    for r in results:
        ours, theirs = MethodResult.best(r.ours), MethodResult.best(r.mergekit)
        ours_rss = max((x.peak_rss for x in r.ours), default=0)
        mk_rss = max((x.peak_rss for x in r.mergekit), default=0)
        ratio = theirs.seconds / ours.seconds if ours and theirs else None
        rows.append(
            (
                r.method,
                f"{ours.seconds:.1f}" if ours else "failed",
                f"{theirs.seconds:.1f}" if theirs else ("skipped" if not r.mergekit else "failed"),
                f"{ratio:.1f}x" if ratio else "-",
                f"{ours.cpu_seconds:.1f}" if ours else "-",
                f"{theirs.cpu_seconds:.1f}" if theirs else "-",
                f"{ours_rss / GiB:.2f}" if ours else "-",
                f"{mk_rss / GiB:.2f}" if theirs else "-",
                agreement_text(r.check, r.method),
            )
        )
        target = TARGET_SPEEDUP[r.method]
        if ratio is not None:
            verdicts.append(
                f"{r.method}: speed >= {target:g}x {'MET' if ratio >= target else 'NOT MET'} "
                f"({ratio:.1f}x wall, {theirs.cpu_seconds / ours.cpu_seconds:.1f}x CPU time); "
                f"peak RSS <= mergekit's "
                f"{'MET' if ours_rss <= mk_rss else 'NOT MET'} "
                f"({ours_rss / GiB:.2f} vs {mk_rss / GiB:.2f} GiB)"
            )
        else:
            verdicts.append(f"{r.method}: no ratio (a side failed or was skipped)")
    widths = [max(len(str(row[k])) for row in [header, *rows]) for k in range(len(header))]
    lines = [f"results ({device_text}; best of the repeats; peak RSS = max over them):"]
    for row in [header, *rows]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    lines.append(
        "cat floor (inputs of each method, page cache warm): "
        + ", ".join(f"{r.method} {r.cat_s:.2f} s ({r.cat_bytes / 1e9:.1f} GB)" for r in results)
    )
    lines.append(
        f"start-up floor (python + imports + device, in every wall time above): "
        f"ours {startup['ours']:.1f} s, mergekit {startup['mergekit']:.1f} s"
    )
    lines.append(
        "peak RSS: VmRSS summed over the child's process tree, sampled every 50 ms "
        "(includes mapped shard pages; the per-run lines also give the anonymous part, RssAnon)"
    )
    lines.append("targets (issues 2 and 12):")
    lines += [f"  {v}" for v in verdicts]
    print("\n" + "\n".join(lines), flush=True)
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time `merge run` against `mergekit-yaml` on synthetic Mistral-7B-shaped models."
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda[:N]; mergekit gets --cuda"
    )
    parser.add_argument(
        "--methods",
        default="linear,slerp,ties",
        help=f"comma list of {','.join(METHODS)}, or all",
    )
    parser.add_argument(
        "--skip-mergekit-methods",
        default="",
        help="comma list of methods to run only with `merge run` (to keep a GPU run short)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="models, recipes, logs; models reused if built"
    )
    parser.add_argument("--keep", action="store_true", help="keep the outputs (and a temp workdir)")
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs per tool and method")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers per model")
    parser.add_argument("--small", action="store_true", help="tiny shapes: a smoke run in seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    parser.add_argument(
        "--compute-dtype",
        default=None,
        help="passed to `merge run` (float32: compute in float32, not in the recipes' bf16 "
        "as mergekit does; then ours differs from mergekit by rounding)",
    )
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.methods == ["all"]:
        args.methods = list(METHODS)
    args.skip_mergekit_methods = {
        m.strip() for m in args.skip_mergekit_methods.split(",") if m.strip()
    }
    unknown = sorted((set(args.methods) | args.skip_mergekit_methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; use {', '.join(METHODS)}")
    if args.repeat < 1 or args.layers < 1:
        parser.error("--repeat and --layers must be at least 1")
    return args


def describe_machine(device: torch.device) -> str:
    from importlib.metadata import version

    cpu = f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / GiB:.0f} GiB RAM"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        cpu += f", GPU {props.name} ({props.total_memory / GiB:.0f} GiB)"
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "log", "-1", "--format=%h %cd", "--date=format:%H:%M"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "merger"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit = f"kruising {commit}{' + uncommitted merger/ edits' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        commit = "kruising (no git checkout)"
    return (
        f"{platform.node()}: {cpu}; {commit}; python {platform.python_version()}, torch {torch.__version__}, "
        f"mergekit {version('mergekit')}; load average {os.getloadavg()[0]:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda asked for, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    print(describe_machine(device), flush=True)
    temp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="kruising-bench-")) if temp else args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        spec = {
            "version": BUILD_VERSION,
            "size": "small" if args.small else "full",
            "layers": args.layers,
            "seed": args.seed,
        }
        models = build_checkpoints(work / "models", spec, device)
        recipes = write_recipes(work / "recipes", models, args.layers)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # the fused kernels are compiled once per source into kruising's cache: build them
        # here, so that the first timed method does not pay for the compiler
        subprocess.run(
            [sys.executable, "-c", "from merger.core import kernels; kernels.available()"],
            env=child_env(),
            cwd=REPO,
            check=True,
        )
        startup = time_startup(device, child_env())
        print(f"start-up floor: ours {startup['ours']:.1f} s, mergekit {startup['mergekit']:.1f} s")
        results = []
        for method in args.methods:
            inputs = sorted(
                f for name in METHOD_MODELS[method] for f in models[name].glob("*.safetensors")
            )
            print(f"{method}: {recipes[method]}", flush=True)
            time_cat(inputs)  # the first cat warms the page cache; the timed ones follow
            results.append(bench_method(method, recipes[method], inputs, work, args, device))
        device_text = f"device {device}, load average now {os.getloadavg()[0]:.2f}"
        lines = print_report(results, device_text, startup)
        report = {
            "machine": describe_machine(device),
            "args": {
                k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()
            },
            "startup_s": startup,
            "results": [asdict(r) for r in results],
            "table": lines,
        }
        (work / f"results-{device.type}.json").write_text(json.dumps(report, indent=2) + "\n")
        if not temp or args.keep:
            print(f"details: {work / f'results-{device.type}.json'}")
        failed = any(r.rc != 0 for res in results for r in (*res.ours, *res.mergekit))
        return 1 if failed else 0
    finally:
        if temp and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
