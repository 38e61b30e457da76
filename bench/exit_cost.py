"""What the normal interpreter exit costs the `merge` command, against a fast `os._exit`.

    python bench/exit_cost.py [--repeat 7] [--workdir /tmp/kruising-exit]

The `merge` console script ends with the interpreter's normal exit (module teardown, atexit
handlers, buffers flushed), after freezing the objects alive then out of the garbage
collector (`gc.freeze`). Until issue #10 it ended with ``atexit._run_exitfuncs()`` and
``os._exit`` once torch was loaded, to skip the teardown. This script runs the three endings
(merge's, the plain normal exit, the former os._exit) of the same command in one run,
alternating, on `merge --help` and on `merge run` of a linear
merge of two small random checkpoints. Each run marks the moment the command is done; the
script prints the median wall seconds of the whole process and of the part from that mark
until the process is gone (the ending itself). Run it on a quiet
machine (it prints the load average), or read the difference, not the totals.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Every ending runs the command the same way and marks the moment it is done (on stderr); the
#: parent notes when the process is gone. The gap is what the ending costs.
COMMAND = """
import os, sys, time
from merger import cli
sys.argv = ["merge", *{args!r}]
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
try:
    {call}
    code = 0
except SystemExit as exc:
    code = exc.code
print(f"@@done {{time.time()!r}}", file=sys.stderr, flush=True)
"""
ENDINGS = {
    # what `merge` does since issue #10: the normal exit, the import graph frozen out of the GC
    "merge (gc.freeze)": COMMAND.replace("{call}", "cli.entry()") + "sys.exit(code)\n",
    # the normal exit with its full final collections
    "plain exit": COMMAND.replace("{call}", "cli.main()") + "sys.exit(code)\n",
    # the former ending (kruising.console.entry before issue #10)
    "os._exit": COMMAND.replace("{call}", "cli.main()")
    + """
import atexit
if "torch" not in sys.modules:
    sys.exit(code)
atexit._run_exitfuncs()
for stream in (sys.stdout, sys.stderr):
    stream.flush()
os._exit(code or 0)
""",
}


def make_models(root: Path) -> list[Path]:
    """Two random Mistral-shaped checkpoints of ~20 MB each (float32)."""
    import torch
    from safetensors.torch import save_file

    config = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 8000,
        "tie_word_embeddings": False,
    }
    shapes = {"model.embed_tokens.weight": (8000, 256), "lm_head.weight": (8000, 256)}
    for i in range(4):
        for name, shape in [
            ("self_attn.q_proj.weight", (256, 256)),
            ("self_attn.k_proj.weight", (256, 256)),
            ("self_attn.v_proj.weight", (256, 256)),
            ("self_attn.o_proj.weight", (256, 256)),
            ("mlp.gate_proj.weight", (512, 256)),
            ("mlp.up_proj.weight", (512, 256)),
            ("mlp.down_proj.weight", (256, 512)),
            ("input_layernorm.weight", (256,)),
        ]:
            shapes[f"model.layers.{i}.{name}"] = shape
    shapes["model.norm.weight"] = (256,)
    folders = []
    for seed in (0, 1):
        folder = root / f"model-{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(seed)
        tensors = {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config))
        folders.append(folder)
    return folders


def timed(code: str, cwd: Path) -> tuple[float, float]:
    """(wall seconds of the whole process, seconds from "command done" to process gone)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=False
    )
    gone = time.time()
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"command failed ({done.returncode}):\n{done.stderr[-2000:]}")
    mark = next(line for line in done.stderr.splitlines() if line.startswith("@@done "))
    return seconds, gone - float(mark.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs of each ending, alternating")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kruising-exit"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    a, b = make_models(args.workdir / "models")
    recipe = args.workdir / "linear.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.5}}}}\n"
        f"  - {{model: {b}, parameters: {{weight: 0.5}}}}\ndtype: float32\n"
    )
    out = args.workdir / "child"
    cases = {
        "merge --help": ["--help"],
        "merge run": ["run", str(recipe), "--out", str(out), "--device", "cpu", "--overwrite"],
    }
    print(f"load average {os.getloadavg()[0]:.2f}, {args.repeat} runs of each, alternating")
    print("median seconds of the whole command, and (in brackets) from done to exited")
    print(f"{'command':<14}" + "".join(f"{name:>22}" for name in ENDINGS))
    for label, argv in cases.items():
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in ENDINGS}
        for _ in range(args.repeat):
            for name, template in ENDINGS.items():
                times[name].append(timed(template.format(args=argv), REPO))
        cells = []
        for name in ENDINGS:
            wall = statistics.median(t[0] for t in times[name])
            tail = statistics.median(t[1] for t in times[name])
            cells.append(f"{wall:>12.3f} ({tail:.3f})")
        print(f"{label:<14}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
