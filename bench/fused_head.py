"""Scoring's vocabulary head, reference vs fused, side by side in one process.

    python bench/fused_head.py MODEL_FOLDER [--suite demo] [--repeat 2]

Scores the suite's log-likelihood requests on one model twice per repeat: ``run_plan`` with the
greedy flag (the reference head: max, subtract, scale, exp2, sum over each block of logits) and
without it (``eval.scoring._Projector``, what ``score_model`` takes). Prints the best wall time of
each, the ratio, and the largest log-prob difference (per request and per token). Not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--suite", default="demo")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.api import prepare_suite
    from eval.scoring import cpu_threads_for, run_plan

    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    prepared = prepare_suite(model, tokenizer, args.suite)
    plan = prepared.plan_for(model, 16)
    best = {True: float("inf"), False: float("inf")}
    results = {}
    with cpu_threads_for(model):
        for _ in range(args.repeat):
            for greedy in (True, False):
                start = time.perf_counter()
                results[greedy] = run_plan(model, plan, greedy=greedy)
                best[greedy] = min(best[greedy], time.perf_counter() - start)
    pairs = list(zip(results[True], results[False], strict=True))
    per_request = max(abs(a.logprob - b.logprob) for a, b in pairs)
    per_token = max(abs(a.logprob - b.logprob) / a.tokens for a, b in pairs)
    print(f"{len(pairs)} requests, suite {args.suite}, {args.model}")
    print(
        f"reference head {best[True]:.2f} s, fused head {best[False]:.2f} s: "
        f"{best[True] / best[False]:.2f}x"
    )
    print(f"largest log-prob difference: {per_request:.1e} per request, {per_token:.1e} per token")


if __name__ == "__main__":
    main()
