"""The family build beside a synthetic CPU load: how much slower does a busy machine make it?

    python bench/family_under_load.py                    # --size test, 2 busy processes
    python bench/family_under_load.py --size default --load 4

Runs `pretrain family` (a fresh build each time, in a temp folder) six times: with one torch
intra-op thread per core (the build before issue #16), the same with OMP_WAIT_POLICY=PASSIVE
(threads that wait sleep instead of spinning), and with the build's default now (one thread;
`KRUISING_FAMILY_THREADS` unset), each on the machine as it is ("quiet") and beside `--load`
busy-loop processes ("busy"). It prints wall seconds, the CPU share the build
got (CPU seconds / wall seconds) and the busy/quiet ratio per setting, with the load average.
A shared machine is never quiet: read the ratios, which are measured side by side in one run.
A benchmark, not a test: it takes minutes (far more on a loaded machine with a thread per core).

    python bench/family_under_load.py --steps-only       # seconds: the mechanism alone

`--steps-only` times training steps (forward, backward, AdamW) of the family's test-size member
in this process, one thread against one per core, quiet and busy: the per-step cost of the
threads' hand-offs without the rest of the build.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BUSY = "while True:\n    pass\n"


def build(size: str, extra: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, the build and its children) of one fresh build."""
    drop = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "KRUISING_FAMILY_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    with tempfile.TemporaryDirectory(prefix="family-load-") as tmp:
        cmd = [sys.executable, "-m", "pretrain.cli", "family", "--out", f"{tmp}/f", "--size", size]
        before = os.times()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = os.times()
    if proc.returncode != 0:
        sys.exit(f"error: the build failed:\n{proc.stderr[-2000:]}")
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return wall, cpu


def steps_only(load: int, steps: int) -> int:
    """Seconds per training step of the test-size member: threads x quiet/busy."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from pretrain.family import SIZES

    s = SIZES["test"]
    model = MistralForCausalLM(MistralConfig(vocab_size=32000, **s["model"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, 32000, (s["micro_batch"], s["context_length"]))
    cores = len(os.sched_getaffinity(0))

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    rows = {}
    for threads in (cores, 1):
        torch.set_num_threads(threads)
        for busy in (False, True):
            procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load * busy)]
            try:
                time.sleep(0.5 if procs else 0)
                for _ in range(3):
                    step()  # warm-up
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(steps):
                    step()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            avg = " ".join(f"{x:.1f}" for x in os.getloadavg())
            rows[(threads, busy)] = wall / steps
            print(
                f"{threads} thread(s) {'busy' if busy else 'quiet':5s}: {wall / steps * 1e3:7.1f} ms"
                f"/step, CPU share {cpu / wall:5.0%} (load average {avg})",
                flush=True,
            )
    for threads in (cores, 1):
        q, b = rows[(threads, False)], rows[(threads, True)]
        print(f"  {threads} thread(s): busy/quiet {b / q:.2f}x")
    print(f"  busy: 1 thread is {rows[(cores, True)] / rows[(1, True)]:.1f}x faster than {cores}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="test", choices=["test", "default"])
    parser.add_argument("--load", type=int, default=2, help="busy-loop processes beside it")
    parser.add_argument("--steps-only", action="store_true", help="time training steps only")
    parser.add_argument("--steps", type=int, default=20, help="steps per setting (--steps-only)")
    args = parser.parse_args()
    if args.steps_only:
        return steps_only(args.load, args.steps)

    cores = len(os.sched_getaffinity(0))
    settings = {
        "1 thread (the default now)": {},
        f"{cores} threads (before #16)": {"KRUISING_FAMILY_THREADS": str(cores)},
        f"{cores} threads, passive OMP": {
            "KRUISING_FAMILY_THREADS": str(cores),
            "OMP_WAIT_POLICY": "PASSIVE",
        },
    }
    results: dict[str, dict[str, tuple[float, float, str]]] = {}
    for label, extra in settings.items():
        results[label] = {}
        for busy in (False, True):
            load = [
                subprocess.Popen([sys.executable, "-c", BUSY])
                for _ in range(args.load if busy else 0)
            ]
            try:
                time.sleep(0.5 if load else 0)
                avg = " ".join(f"{x:.1f}" for x in os.getloadavg())
                wall, cpu = build(args.size, extra)
            finally:
                for p in load:
                    p.kill()
                    p.wait()
            results[label]["busy" if busy else "quiet"] = (wall, cpu, avg)
            print(
                f"{label:28s} {'busy' if busy else 'quiet':5s}: {wall:7.1f} s wall, "
                f"CPU share {cpu / wall:5.0%}  (load average {avg} at the start)",
                flush=True,
            )
    print(f"family --size {args.size}, {cores} cores, {args.load} busy-loop processes when busy:")
    for label, r in results.items():
        print(
            f"  {label:28s} quiet {r['quiet'][0]:7.1f} s, busy {r['busy'][0]:7.1f} s: "
            f"{r['busy'][0] / r['quiet'][0]:.2f}x slower busy"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
