"""Error bars and paired comparisons (eval/stats.py) and how the eval table shows them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval import stats
from eval.report import comparison_table, ranking_line


def _card(name: str, acc_norm: list[int], pairs: list[int], logprob: list[float]):
    n = len(acc_norm)
    per_item = {
        "cultuur": {
            "ids": [f"c{i}" for i in range(n)],
            "acc": acc_norm,
            "acc_norm": acc_norm,
            "answer_logprob": logprob,
        },
        "grammatica": {"ids": [f"g{i}" for i in range(len(pairs))], "acc": pairs},
    }
    probes = {
        "cultuur": stats.metrics(
            "cultuur", "choice", {k: v for k, v in per_item["cultuur"].items() if k != "ids"}
        ),
        "grammatica": stats.metrics("grammatica", "pair", {"acc": pairs}),
    }
    rows = [("cultuur", "choice", "acc_norm", 0.5), ("grammatica", "pair", "acc", 0.5)]
    fields = {k: {f: v for f, v in items.items() if f != "ids"} for k, items in per_item.items()}
    interval = stats.score_interval(rows, fields)
    return {
        "model": name,
        "suite": "nl",
        "probes": probes,
        "per_item": per_item,
        "weights": {"dutch": {"cultuur": 0.5, "grammatica": 0.5}, "english": {}},
        "dutch_score": interval["value"],
        "dutch_score_se": interval["se"],
        "dutch_score_ci": interval["ci"],
        "english_score": None,
        "seconds": 1.0,
        "items_per_second": 1.0,
    }


def test_a_mean_has_its_analytic_standard_error_and_a_ratio_its_bootstrap_one():
    acc = [1] * 30 + [0] * 70
    m = stats.metrics("p", "pair", {"acc": acc})
    assert m["acc"] == 0.3 and m["n"] == 100
    assert m["acc_se"] == pytest.approx(np.std(acc, ddof=1) / 10, rel=1e-5)
    text = {
        "logprob": [-10.0, -30.0, -20.0, -25.0],
        "tokens": [5, 10, 8, 9],
        "bytes": [20, 40, 30, 35],
    }
    t = stats.metrics("ppl_x", "text", text)
    assert t["ppl"] == pytest.approx(math.exp(85 / 32), rel=1e-5)
    assert 0 < t["ppl_se"] < t["ppl"] and 0 < t["bits_per_byte_se"]
    assert stats.metrics("ppl_x", "text", text) == t  # seeded: the same numbers every run


def test_the_score_interval_holds_the_score_and_shrinks_with_more_items():
    small = _card("a", [1, 0] * 10, [1, 1, 0] * 5, [-1.0] * 20)
    large = _card("a", [1, 0] * 200, [1, 1, 0] * 100, [-1.0] * 400)
    for card in (small, large):
        lo, hi = card["dutch_score_ci"]
        assert lo <= card["dutch_score"] <= hi
    width = lambda c: c["dutch_score_ci"][1] - c["dutch_score_ci"][0]  # noqa: E731
    assert width(large) < width(small) / 3


def test_paired_bootstrap_separates_a_real_difference_from_noise():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, 300).tolist()
    flipped = list(base)
    for i in range(5):  # 5 of 300 items differ: noise
        flipped[i] = 1 - flipped[i]
    better = [1 if rng.random() < 0.5 else v for v in base]  # about 75 items gained
    pairs = rng.integers(0, 2, 100).tolist()
    a = _card("a", base, pairs, [-1.0] * 300)
    b = _card("b", flipped, pairs, [-1.0] * 300)
    c = _card("c", better, pairs, [-1.0] * 300)
    assert stats.compare_cards(a, a)["p"] == 1.0
    assert not stats.compare_cards(a, b)["significant"]
    test = stats.compare_cards(c, a)
    assert test["significant"] and test["diff"] > 0 and test["p"] < 0.01
    assert test["ci"][0] > 0
    # other items are not comparable
    other = _card("d", base[:200], pairs, [-1.0] * 200)
    assert stats.compare_cards(a, other) is None


def test_the_table_shows_error_bars_and_marks_neighbours_that_are_not_different():
    from rich.console import Console

    rng = np.random.default_rng(2)
    base = rng.integers(0, 2, 300).tolist()
    near = list(base)
    near[0] = 1 - near[0]
    far = [0] * 300
    pairs = rng.integers(0, 2, 100).tolist()
    cards = [
        _card("x", base, pairs, [-1.0] * 300),
        _card("y", near, pairs, [-1.0] * 300),
        _card("z", far, pairs, [-1.0] * 300),
    ]
    console = Console(width=200, record=True, color_system=None)
    console.print(comparison_table(cards))
    text = console.export_text()
    assert "±" in text and "95% CI" in text and "≈" in text
    line = ranking_line(cards)
    assert "> z " in line and "≈ " in line


def test_sign_flip_test_counts_clusters_not_items():
    a = [1.0] * 40
    b = [0.0] * 40
    assert stats.paired_permutation(a, b)["p"] < 1e-3
    clusters = [f"fact{i // 20}" for i in range(40)]  # two facts asked 20 times each
    clustered = stats.paired_permutation(a, b, clusters=clusters)
    assert clustered["units"] == 2 and clustered["p"] > 0.2
    assert stats.paired_permutation([0.0] * 10, [0.0] * 10)["p"] == 1.0


def test_kendall_tau():
    assert stats.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert stats.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert stats.kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="same length"):
        stats.kendall_tau([1], [1, 2])
