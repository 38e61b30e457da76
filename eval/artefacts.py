"""Knowledge-free baselines: how far a probe can be solved without knowing anything.

A probe measures knowledge only if strategies that know nothing score at chance on it. For every
choice probe: pick the first / last option, the longest / shortest (characters), the option most
similar to the others (difflib ratio, the "edit one word of the answer" artefact), the option
sharing most words with the context, and the option a unigram word-frequency model (``wordfreq``,
no context) likes best, summed (as ``acc``) and per byte (as ``acc_norm``). For minimal pairs: the
sentence the unigram model likes better, per phenomenon (a non-word in the bad sentence gives
itself away), and the shorter sentence.

Ties between options split the credit (the expected score of breaking them at random), so a
baseline that cannot tell options apart scores exactly chance.

``python -m eval.artefacts [SUITE ...]`` prints the table; tests/eval/test_artefacts.py holds every
shipped choice file within two standard errors of chance and every grammar phenomenon at or below
0.75 for the unigram model. Needs ``wordfreq`` (a dev dependency; its word lists ship inside the
wheel, so it works offline).
"""

from __future__ import annotations

import difflib
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import cache

from eval.schema import ChoiceItem, PairItem, Probe

CHOICE_BASELINES = (
    "first",
    "last",
    "longest",
    "shortest",
    "most_similar",
    "overlap",
    "unigram",
    "unigram_norm",
)
_WORD = re.compile(r"\w+", re.UNICODE)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@cache
def _zipf(word: str, lang: str) -> float:
    from wordfreq import zipf_frequency

    return zipf_frequency(word, lang)


def unigram_logprob(text: str, lang: str) -> float:
    """log10 probability of ``text``'s words under wordfreq's unigram model (unknown: 1e-9)."""
    from wordfreq import tokenize

    return sum(_zipf(w, lang) - 9.0 for w in tokenize(text, lang))


def _credit(scores: Sequence[float], answer: int, higher: bool = True) -> float:
    """1/len(best) when the answer is among the best-scoring options, else 0."""
    best = max(scores) if higher else min(scores)
    tied = [i for i, s in enumerate(scores) if math.isclose(s, best, rel_tol=0, abs_tol=1e-12)]
    return 1.0 / len(tied) if answer in tied else 0.0


def _similarity(choices: Sequence[str]) -> list[float]:
    out = []
    for i, a in enumerate(choices):
        others = [b for j, b in enumerate(choices) if j != i]
        out.append(
            sum(difflib.SequenceMatcher(None, a.lower(), b.lower()).ratio() for b in others)
            / len(others)
        )
    return out


def _overlap(context: str, choices: Sequence[str]) -> list[float]:
    ctx = set(_words(context))
    return [float(len(ctx & set(_words(c)))) for c in choices]


def choice_credits(item: ChoiceItem, lang: str) -> dict[str, float]:
    """Each baseline's (expected) credit on one item: 1 right, 0 wrong, 1/k for a k-way tie."""
    choices, answer = item.choices, item.answer
    k = len(choices)
    strategies: dict[str, Callable[[], float]] = {
        "first": lambda: float(answer == 0),
        "last": lambda: float(answer == k - 1),
        "longest": lambda: _credit([len(c) for c in choices], answer),
        "shortest": lambda: _credit([len(c) for c in choices], answer, higher=False),
        "most_similar": lambda: _credit(_similarity(choices), answer),
        "overlap": lambda: _credit(_overlap(item.context, choices), answer),
        "unigram": lambda: _credit([unigram_logprob(c, lang) for c in choices], answer),
        "unigram_norm": lambda: _credit(
            [unigram_logprob(c, lang) / max(1, len(c.encode("utf-8"))) for c in choices], answer
        ),
    }
    return {name: strategies[name]() for name in CHOICE_BASELINES}


def choice_report(probe: Probe) -> dict[str, dict[str, float]]:
    """Per baseline: ``acc``, ``chance``, ``se`` (of chance-level accuracy) and ``z``."""
    items = [i for i in probe.items if isinstance(i, ChoiceItem)]
    n = len(items)
    chance = sum(1 / len(i.choices) for i in items) / n
    se = math.sqrt(sum((1 / len(i.choices)) * (1 - 1 / len(i.choices)) for i in items)) / n
    totals: dict[str, float] = defaultdict(float)
    for item in items:
        for name, credit in choice_credits(item, probe.lang).items():
            totals[name] += credit
    return {
        name: {
            "acc": totals[name] / n,
            "chance": chance,
            "se": se,
            "z": (totals[name] / n - chance) / se if se else 0.0,
            "n": n,
        }
        for name in CHOICE_BASELINES
    }


def pair_report(probe: Probe) -> dict[str, dict[str, float]]:
    """Per phenomenon (and ``all``): the unigram model's and the shorter sentence's accuracy."""
    groups: dict[str, list[PairItem]] = defaultdict(list)
    for item in probe.items:
        if isinstance(item, PairItem):
            groups[item.phenomenon or "-"].append(item)
            groups["all"].append(item)
    out = {}
    for name, items in sorted(groups.items()):
        uni = sum(
            _credit([unigram_logprob(i.good, probe.lang), unigram_logprob(i.bad, probe.lang)], 0)
            for i in items
        )
        short = sum(_credit([len(i.good), len(i.bad)], 0, higher=False) for i in items)
        out[name] = {"unigram": uni / len(items), "shorter": short / len(items), "n": len(items)}
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    from eval.suites import load_suite

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*", default=["all", "demo"])
    args = parser.parse_args(argv)
    for suite in args.suites:
        for probe in load_suite(suite):
            if probe.kind == "choice":
                report = choice_report(probe)
                first = next(iter(report.values()))
                cells = "  ".join(f"{k} {v['acc']:.3f}" for k, v in report.items())
                print(
                    f"{probe.name:16s} n={first['n']:4d} chance {first['chance']:.3f} "
                    f"± {first['se']:.3f}  {cells}"
                )
                worst = max(report.items(), key=lambda kv: abs(kv[1]["z"]))
                print(f"{'':16s} largest |z|: {worst[0]} {worst[1]['z']:+.2f}")
            elif probe.kind == "pair":
                for name, row in pair_report(probe).items():
                    print(
                        f"{probe.name:16s} {name:14s} n={row['n']:4d} unigram {row['unigram']:.3f}"
                        f"  shorter {row['shorter']:.3f}"
                    )


if __name__ == "__main__":
    main()
