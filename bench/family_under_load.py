"""The family build beside a synthetic CPU load: where a busy machine's time goes, and the ratio.

    python bench/family_under_load.py --steps-only       # per training step: minutes
    python bench/family_under_load.py                    # whole --size test builds: long
    python bench/family_under_load.py --size default --load 4

A shared machine is never quiet, so everything here is measured side by side in one run, and in
CPU seconds (getrusage) beside wall seconds: CPU seconds per unit of work do not depend on how
many other processes share the cores; wall seconds do, through the CPU share (CPU s / wall s).

`--steps-only` times training steps (forward, backward, AdamW) of the default family member
(64 wide, 1,024 tokens a step, the 32k vocabulary) in this process, for each setting: torch
threads (one per core, the build before issue #16; one, the build now) x heap (glibc's default;
kept, `kruising.malloc.kept_freed_memory`, the build now) x load (as the machine is, "quiet";
beside `--load` busy-loop processes, "busy"). Per step it prints wall and CPU ms (user +
system), minor page faults and involuntary context switches, and then the busy/quiet ratios of
CPU and wall time per setting. If CPU ms per step stays flat under the load, the wall-time
ratio is the CPU share alone.

Without `--steps-only` it runs whole fresh builds (`pretrain family`, in a temp folder), quiet
and busy, for: the build now (1 thread, kept heap), 1 thread with glibc's heap (before the heap
was kept), one thread per core with glibc's heap (before issue #16), and prints wall, CPU, user,
system seconds, CPU share and minor faults, then the busy/quiet ratio per setting. A benchmark,
not a test: on a loaded 2-core machine a --size test build takes minutes, a default one far more.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BUSY = "while True:\n    pass\n"
GLIBC_HEAP = (
    "import contextlib, kruising.malloc as m; m.kept_freed_memory = contextlib.nullcontext; "
)


def _load(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]
    time.sleep(1.0 if procs else 0)
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def _avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def build(size: str, threads: int, glibc_heap: bool) -> dict[str, float]:
    """Wall, CPU (user, system) seconds and minor faults of one fresh build in a subprocess."""
    drop = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "KRUISING_FAMILY_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["KRUISING_FAMILY_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory(prefix="family-load-") as tmp:
        code = (GLIBC_HEAP if glibc_heap else "") + (
            "from pathlib import Path; from pretrain.family import build_family; "
            f"build_family(Path({tmp + '/f'!r}), size={size!r}, progress=False)"
        )
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
        )
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"error: the build failed:\n{proc.stderr[-2000:]}")
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {
        "wall": wall,
        "cpu": user + system,
        "user": user,
        "sys": system,
        "faults": after.ru_minflt - before.ru_minflt,
    }


def whole_builds(size: str, load: int) -> int:
    cores = len(os.sched_getaffinity(0))
    settings = {
        "1 thread, kept heap (now)": (1, False),
        "1 thread, glibc heap": (1, True),
        f"{cores} threads, glibc heap (before #16)": (cores, True),
    }
    results: dict[str, dict[str, dict[str, float]]] = {}
    for label, (threads, glibc) in settings.items():
        results[label] = {}
        for busy in (False, True):
            procs = _load(load if busy else 0)
            try:
                avg = _avg()
                r = build(size, threads, glibc)
            finally:
                _stop(procs)
            results[label]["busy" if busy else "quiet"] = r
            print(
                f"{label:34s} {'busy' if busy else 'quiet':5s}: {r['wall']:7.1f} s wall, "
                f"CPU {r['cpu']:6.1f} s (user {r['user']:.1f}, sys {r['sys']:.1f}), share "
                f"{r['cpu'] / r['wall']:4.0%}, {r['faults'] / 1e6:.2f}M minor faults "
                f"(load average {avg} at the start)",
                flush=True,
            )
    print(f"family --size {size}, {cores} cores, {load} busy-loop processes when busy:")
    for label, r in results.items():
        q, b = r["quiet"], r["busy"]
        print(
            f"  {label:34s} busy/quiet: wall {b['wall'] / q['wall']:.2f}x, CPU "
            f"{b['cpu'] / q['cpu']:.2f}x; CPU share {q['cpu'] / q['wall']:.0%} -> "
            f"{b['cpu'] / b['wall']:.0%}"
        )
    return 0


def steps_only(load: int, steps: int) -> int:
    """Per training step of the default member: threads x heap x quiet/busy."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from kruising.malloc import kept_freed_memory
    from pretrain.family import SIZES

    s = SIZES["default"]
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=32000, **s["model"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, 32000, (s["micro_batch"], s["context_length"]))
    cores = len(os.sched_getaffinity(0))

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    def timed() -> dict[str, float]:
        for _ in range(2):
            step()  # warm-up (a kept heap grows here once)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(steps):
            step()
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
        return {
            "wall": wall / steps,
            "cpu": (user + system) / steps,
            "user": user / steps,
            "sys": system / steps,
            "faults": (r1.ru_minflt - r0.ru_minflt) / steps,
            "switches": (r1.ru_nivcsw - r0.ru_nivcsw) / steps,
        }

    rows = {}
    # glibc's heap first: kept_freed_memory fixes glibc's mmap threshold for the rest of the
    # process (a mallopt call ends glibc's dynamic threshold)
    for heap in ("glibc", "kept"):
        for threads in (cores, 1):
            torch.set_num_threads(threads)
            for busy in (False, True):
                procs = _load(load if busy else 0)
                try:
                    with kept_freed_memory() if heap == "kept" else contextlib.nullcontext():
                        r = timed()
                finally:
                    _stop(procs)
                rows[(heap, threads, busy)] = r
                print(
                    f"{threads} thread(s), {heap} heap, {'busy' if busy else 'quiet':5s}: "
                    f"{r['wall'] * 1e3:6.0f} ms wall/step, CPU {r['cpu'] * 1e3:4.0f} ms (user "
                    f"{r['user'] * 1e3:3.0f}, sys {r['sys'] * 1e3:3.0f}), share "
                    f"{r['cpu'] / r['wall']:4.0%}, {r['faults']:6.0f} minor faults, "
                    f"{r['switches']:4.0f} preemptions (load average {_avg()})",
                    flush=True,
                )
    print(f"per step, {cores} cores, {load} busy-loop processes when busy:")
    for heap in ("glibc", "kept"):
        for threads in (cores, 1):
            q, b = rows[(heap, threads, False)], rows[(heap, threads, True)]
            print(
                f"  {threads} thread(s), {heap} heap: busy/quiet CPU {b['cpu'] / q['cpu']:.2f}x, "
                f"wall {b['wall'] / q['wall']:.2f}x, share ratio "
                f"{(q['cpu'] / q['wall']) / (b['cpu'] / b['wall']):.2f}x"
            )
    for busy in (False, True):
        label = "busy" if busy else "quiet"
        before, now = rows[("glibc", cores, busy)], rows[("kept", 1, busy)]
        print(
            f"  {label}: the build now (1 thread, kept heap) uses {before['cpu'] / now['cpu']:.1f}x "
            f"less CPU and {before['wall'] / now['wall']:.1f}x less wall per step than before "
            f"#16 ({cores} threads, glibc heap); kept vs glibc heap at 1 thread: "
            f"{rows[('glibc', 1, busy)]['cpu'] / now['cpu']:.1f}x less CPU"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="test", choices=["test", "default"])
    parser.add_argument("--load", type=int, default=2, help="busy-loop processes beside it")
    parser.add_argument("--steps-only", action="store_true", help="time training steps only")
    parser.add_argument("--steps", type=int, default=5, help="steps per setting (--steps-only)")
    args = parser.parse_args()
    if args.steps_only:
        return steps_only(args.load, args.steps)
    return whole_builds(args.size, args.load)


if __name__ == "__main__":
    raise SystemExit(main())
