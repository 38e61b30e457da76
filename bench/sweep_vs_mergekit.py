"""Rank K slerp variants of the tiny family: our in-memory sweep vs the mergekit way.

    python bench/sweep_vs_mergekit.py [--k 8] [--size default] [--family DIR] [--suite demo]

Ours: ``merger.study.sweep.run_sweep`` — inputs loaded once, each variant merged into a resident
model and scored in memory. The mergekit way: for each variant, ``mergekit-yaml`` writes a child
folder (a subprocess, as a user would run it), ``from_pretrained`` loads it, and the same probes
score it. Prints both wall times and CPU times (this process's threads and, for the mergekit
way, its ``mergekit-yaml`` subprocesses), the ratios, the scoring part of each, and the largest
score difference between the two (they merge the same recipes, so the scores should agree). On
a shared machine the CPU ratio is the steadier one: a wall ratio moves with the load. Not a test.

Both ways run transformers' Mistral code in this process; its one-time import is paid by a
warm-up load before either clock starts, so neither way gets it free by running second.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its waited-for children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8, help="variants (t evenly over [0, 1])")
    parser.add_argument("--size", default="default", help="tiny family size: default or test")
    parser.add_argument(
        "--family", type=Path, default=None, help="an existing family folder, used as is"
    )
    parser.add_argument("--suite", default="demo", help="eval suite for both ways")
    args = parser.parse_args()

    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.api import score_model
    from eval.suites import load_suite
    from merger.core.recipe import parse_recipe
    from merger.demo import DEMO_SWEEPS, default_family_dir, resolve_family
    from merger.study.evaluator import InMemoryEvaluator
    from merger.study.rank import leaderboard
    from merger.study.spec import parse_spec
    from merger.study.sweep import run_sweep
    from pretrain.family import build_family

    torch.manual_seed(0)
    family_dir = args.family or default_family_dir(args.size)
    if args.family and all((args.family / m / "config.json").is_file() for m in ("nl", "instruct")):
        members = {m: args.family / m for m in ("base", "nl", "instruct")}  # as is, no rebuild
    else:
        members = build_family(family_dir, size=args.size, seed=0)
    root = Path(members["nl"]).parent
    base_text = resolve_family((DEMO_SWEEPS / "demo-slerp.recipe.yaml").read_text(), root)
    recipe = parse_recipe(base_text, "demo-slerp.recipe.yaml")
    ts = [round(i / (args.k - 1), 6) for i in range(args.k)]
    work = Path(tempfile.mkdtemp(prefix="kruising-bench-"))
    try:
        spec = parse_spec(
            yaml.safe_dump(
                {
                    "name": "bench",
                    "recipe": {},
                    "search": {"parameters.t[default]": {"type": "categorical", "choices": ts}},
                    "sampler": "grid",
                    "objectives": ["dutch_score", "english_score"],
                    "suite": args.suite,
                    "trials": args.k,
                }
            ),
            "bench",
        )
        # The filtered t's stay at the recipe's values; only the default t moves. Set all three
        # to the same t so both ways merge plain slerp(t).
        recipe_data = recipe.model_dump(mode="json", exclude_none=True)
        recipe_data["parameters"]["t"] = 0.5
        recipe = parse_recipe(yaml.safe_dump(recipe_data), "bench-recipe")
        spec = spec.model_copy(
            update={
                "search": {
                    "parameters.t": spec.search["parameters.t[default]"],
                }
            }
        )

        print(f"K={args.k} slerp variants of the {args.size} tiny family, suite {args.suite}")
        # Both ways load and run transformers' Mistral code in this process. Whichever way ran
        # first would pay its one-time import (1-2 s) and the other would get it free, so it is
        # paid here, before either clock starts: load one family member once, untimed.
        start = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(str(members["nl"]), dtype=torch.float32)
        AutoTokenizer.from_pretrained(str(members["nl"]))
        print(f"untimed warm-up, shared by both ways: {time.perf_counter() - start:.1f} s")
        score_cpu = {"ours": 0.0, "theirs": 0.0}

        class TimedEvaluator(InMemoryEvaluator):  # run_sweep's own evaluator, scoring timed
            def score(self, name):
                cpu = time.process_time()
                card = super().score(name)
                score_cpu["ours"] += time.process_time() - cpu
                return card

        start, cpu = time.perf_counter(), cpu_seconds()
        evaluator = TimedEvaluator(recipe, spec.suite, device="cpu")  # what run_sweep builds
        study = run_sweep(
            spec,
            recipe,
            storage=f"sqlite:///{work / 'bench.db'}",
            evaluator=evaluator,
            device="cpu",
            progress=False,
        )
        ours, ours_cpu = time.perf_counter() - start, cpu_seconds() - cpu
        board = leaderboard(study)
        ours_scores = {r["params"]["parameters.t"]: r for r in board["rows"]}
        ours_rows = [t.user_attrs for t in study.trials]

        start, cpu = time.perf_counter(), cpu_seconds()
        probes = load_suite(args.suite)
        theirs_scores = {}
        for t in ts:
            data = dict(recipe_data)
            data["parameters"] = {"t": t}
            path = work / f"t{t}.yaml"
            path.write_text(yaml.safe_dump(data))
            out = work / f"child-{t}"
            subprocess.run(
                [shutil.which("mergekit-yaml") or "mergekit-yaml", str(path), str(out)],
                check=True,
                capture_output=True,
            )
            model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(out))
            scoring = time.process_time()
            theirs_scores[t] = score_model(model, tokenizer, args.suite, probes=probes)
            score_cpu["theirs"] += time.process_time() - scoring
        theirs, theirs_cpu = time.perf_counter() - start, cpu_seconds() - cpu
    finally:
        shutil.rmtree(work, ignore_errors=True)

    diff = max(
        abs(ours_scores[t][key] - theirs_scores[t][key])
        for t in ts
        for key in ("dutch_score", "english_score")
    )
    print(f"{'way':<34}{'wall s':>10}{'s/variant':>12}{'CPU s':>10}{'s/variant':>12}")
    for label, wall, used in (
        ("kruising in-memory sweep", ours, ours_cpu),
        ("mergekit-yaml + from_pretrained", theirs, theirs_cpu),
    ):
        print(f"{label:<34}{wall:>10.1f}{wall / args.k:>12.2f}{used:>10.1f}{used / args.k:>12.2f}")
    print(
        f"ratio mergekit / ours: {theirs / ours:.1f}x wall, {theirs_cpu / ours_cpu:.1f}x CPU "
        "(target >= 10x)"
    )
    # Scoring is the same work both ways; what is left is getting K models ready to score.
    ours_score = sum(r.get("score_seconds") or 0 for r in ours_rows)
    theirs_score = sum(c["seconds"] for c in theirs_scores.values())
    print(
        f"of which scoring: ours {ours_score:.1f} s, mergekit way {theirs_score:.1f} s; "
        f"without it: ours {ours - ours_score:.1f} s, mergekit way {theirs - theirs_score:.1f} s "
        f"-> {(theirs - theirs_score) / (ours - ours_score):.1f}x"
    )
    print(
        f"scoring CPU per variant: ours {score_cpu['ours'] / args.k:.2f} s, "
        f"mergekit way {score_cpu['theirs'] / args.k:.2f} s (its suite encoded each time)"
    )
    print(f"largest score difference between the two ways: {diff:.2g}")


if __name__ == "__main__":
    main()
