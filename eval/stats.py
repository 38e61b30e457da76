"""Error bars and significance for scorecards: every number says how sure it is.

A scorecard keeps each probe's per-item results (``per_item``), so everything here is computed
from them, for one model or for two models scored on the same items:

- ``metrics``: a probe's metrics with their standard errors: analytic for means of per-item
  values (``acc``, ``acc_norm``, ``lang_share``: s / sqrt(n)), bootstrap over items for the rest
  (``answer_prob`` = exp(mean log-prob per token), ``ppl``, ``bits_per_byte``);
- ``score_interval``: ``dutch_score`` / ``english_score`` with a 95% percentile interval, from a
  stratified bootstrap (each probe's items resampled within the probe, the weighted mean recomputed);
- ``paired_score_test``: two models, the same bootstrap resamples for both (paired bootstrap over
  the same items): the difference of their scores, its 95% interval and a two-sided p-value;
- ``paired_permutation``: a sign-flip permutation test of a mean per-item difference (one-sided),
  optionally flipping whole clusters (questions about the same fact);
- ``kendall_tau``: rank agreement of two orderings (tau-b, ties allowed).

Resampling is seeded by the probe's name and size, so the same items give the same resamples for
every model (that is what makes the bootstrap paired) and the same scorecard every run.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BOOTSTRAP = 1000  # resamples for bootstrap standard errors and intervals
LEVEL = 0.95

# per-item fields of each kind of probe, and the metrics computed from them
ITEM_FIELDS = {
    "choice": ("acc", "acc_norm", "answer_logprob"),
    "pair": ("acc",),
    "generate": ("lang_share",),
    "text": ("logprob", "tokens", "bytes"),
}


def _rng(name: str, n: int, salt: str = "") -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{name}|{n}|{salt}".encode()))


def resample_indices(name: str, n: int, b: int = BOOTSTRAP, salt: str = "") -> np.ndarray:
    """``b`` bootstrap resamples of ``n`` items, fixed for a probe name and size: (b, n) ints."""
    return _rng(name, n, salt).integers(0, n, size=(b, n))


def _r(value: float) -> float:
    return float(f"{float(value):.6g}")


def _values(kind: str, items: Mapping[str, Sequence[float]], idx: np.ndarray | None = None):
    """Each metric of ``kind`` on all items (idx None) or on each resample row of ``idx``."""

    def take(field: str) -> np.ndarray:
        a = np.asarray(items[field], dtype=np.float64)
        return a if idx is None else a[idx]

    axis = -1
    if kind == "choice":
        return {
            "acc": take("acc").mean(axis),
            "acc_norm": take("acc_norm").mean(axis),
            "answer_prob": np.exp(take("answer_logprob").mean(axis)),
        }
    if kind == "pair":
        return {"acc": take("acc").mean(axis)}
    if kind == "generate":
        return {"lang_share": take("lang_share").mean(axis)}
    if kind == "text":
        lp, tok, byt = take("logprob").sum(axis), take("tokens").sum(axis), take("bytes").sum(axis)
        from pretrain.perplexity import perplexity_metrics  # the one definition

        return perplexity_metrics(lp, tok, byt)
    raise ValueError(f"unknown probe kind {kind!r}")


_MEANS = {"acc", "acc_norm", "lang_share"}


def metrics(name: str, kind: str, items: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """``{metric: value, metric_se: se, ..., "n": items}`` for one probe's per-item results."""
    first = next(iter(items.values()))
    n = len(first)
    point = _values(kind, items)
    out: dict[str, Any] = {}
    boot = None
    for metric, value in point.items():
        if metric in _MEANS:
            a = np.asarray(items[metric], dtype=np.float64)
            se = float(a.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        else:
            if boot is None:
                boot = _values(kind, items, resample_indices(name, n))
            se = float(np.std(boot[metric], ddof=1))
        if se < 1e-12 * max(1.0, abs(float(value))):
            se = 0.0  # all resamples agree: rounding noise, not uncertainty
        out[metric] = _r(value)
        out[f"{metric}_se"] = _r(se)
    out["n"] = n
    return out


def _primary_rows(
    probes: Sequence[tuple[str, str, str, float]],
    per_item: Mapping[str, Mapping[str, Sequence[float]]],
    b: int,
) -> tuple[float, np.ndarray]:
    """Weighted score and its ``b`` bootstrap replicates; probes: (name, kind, metric, weight)."""
    total_w = sum(w for *_, w in probes)
    point = 0.0
    reps = np.zeros(b)
    for name, kind, metric, weight in probes:
        items = per_item[name]
        n = len(next(iter(items.values())))
        point += weight * float(_values(kind, items)[metric])
        reps += weight * _values(kind, items, resample_indices(name, n, b))[metric]
    return point / total_w, reps / total_w


def score_interval(
    probes: Sequence[tuple[str, str, str, float]],
    per_item: Mapping[str, Mapping[str, Sequence[float]]],
    b: int = BOOTSTRAP,
) -> dict[str, Any]:
    """A weighted score with its bootstrap ``se`` and 95% ``ci`` (probes as in ``_primary_rows``)."""
    point, reps = _primary_rows(probes, per_item, b)
    lo, hi = np.quantile(reps, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {"value": _r(point), "se": _r(np.std(reps, ddof=1)), "ci": [_r(lo), _r(hi)]}


def paired_score_test(
    probes: Sequence[tuple[str, str, str, float]],
    per_item_a: Mapping[str, Mapping[str, Sequence[float]]],
    per_item_b: Mapping[str, Mapping[str, Sequence[float]]],
    b: int = BOOTSTRAP,
) -> dict[str, Any]:
    """Score of A minus score of B on the same items: difference, 95% interval, two-sided p."""
    point_a, reps_a = _primary_rows(probes, per_item_a, b)
    point_b, reps_b = _primary_rows(probes, per_item_b, b)
    diff = reps_a - reps_b
    lo, hi = np.quantile(diff, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    p = min(1.0, 2 * min(float(np.mean(diff <= 0)), float(np.mean(diff >= 0))))
    return {
        "diff": _r(point_a - point_b),
        "ci": [_r(lo), _r(hi)],
        "p": _r(p),
        "significant": bool(lo > 0 or hi < 0),
    }


def paired_permutation(
    a: Sequence[float],
    b: Sequence[float],
    *,
    clusters: Sequence[str] | None = None,
    n_resamples: int = 20000,
    seed: int = 0,
) -> dict[str, Any]:
    """One-sided sign-flip test that mean(a - b) > 0 over paired items.

    With ``clusters``, the signs of whole clusters flip together (items asking about the same
    fact are not independent). Returns the mean difference, the p-value (with the +1 correction,
    so never 0) and the number of independent units.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if clusters is not None:
        keys = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
        sums = np.zeros(len(keys))
        np.add.at(sums, [keys[c] for c in clusters], d)
        units = sums
    else:
        units = d
    observed = units.sum()
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_resamples, len(units)))
    null = signs @ units
    p = (1 + int(np.sum(null >= observed - 1e-12))) / (n_resamples + 1)
    return {"mean_diff": _r(d.mean()), "p": _r(p), "units": len(units), "items": len(d)}


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b between two score lists over the same candidates (ties allowed)."""
    n = len(x)
    if n != len(y):
        raise ValueError("kendall_tau needs two lists of the same length")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom else float("nan")


# --- scorecards -------------------------------------------------------------------------------


def item_kind(items: Mapping[str, Sequence[float]]) -> str:
    """The probe kind a per-item record belongs to, from its fields."""
    for kind, fields in ITEM_FIELDS.items():
        if set(fields) <= set(items) and (kind != "pair" or "acc_norm" not in items):
            return kind
    raise ValueError(f"unknown per-item fields {sorted(items)}")


def _fields(items: Mapping[str, Sequence[float]]) -> dict[str, Sequence[float]]:
    return {k: v for k, v in items.items() if k != "ids"}


def card_rows(card: Mapping[str, Any], key: str, metric: str | None = None):
    """What a scorecard number is made of: (probe, kind, metric, weight) rows.

    ``key`` is ``dutch_score``/``english_score`` (the weighted probes), a sweep's weighted mix
    of them (``0.7*dutch_score+0.3*english_score``) or a probe name (with ``metric``, default
    the kind's primary one).
    """
    per_item = card.get("per_item") or {}
    if "*" in key:  # a sweep's weighted mix: "0.7*dutch_score+0.3*english_score"
        rows = []
        for part in key.split("+"):
            weight, _, name = part.partition("*")
            sub = card_rows(card, name)
            if sub is None:
                return None
            total = sum(w for *_, w in sub)
            rows += [(p, k, m, float(weight) * w / total) for p, k, m, w in sub]
        return rows
    if key in ("dutch_score", "english_score"):
        weights = (card.get("weights") or {}).get(key.removesuffix("_score"), {})
        rows = []
        for name, weight in weights.items():
            if name not in per_item:
                return None
            kind = item_kind(per_item[name])
            rows.append((name, kind, _primary(card, name, kind), weight))
        return rows or None
    if key not in per_item:
        return None
    kind = item_kind(per_item[key])
    return [(key, kind, metric or _primary(card, key, kind), 1.0)]


def _primary(card: Mapping[str, Any], name: str, kind: str) -> str:
    from eval.suites import DEMO_PRIMARY, PRIMARY_METRIC

    if kind == "choice" and name.startswith("demo_"):
        return DEMO_PRIMARY
    return PRIMARY_METRIC.get(kind, "ppl")


def compare_cards(
    a: Mapping[str, Any], b: Mapping[str, Any], key: str = "dutch_score", metric: str | None = None
) -> dict[str, Any] | None:
    """Paired bootstrap of scorecard ``a`` against ``b`` on the same items (None: not comparable).

    Comparable means both keep per-item results for the same item ids of every probe involved.
    """
    rows = card_rows(a, key, metric)
    if rows is None or card_rows(b, key, metric) is None:
        return None
    pa, pb = a["per_item"], b["per_item"]
    for name, *_ in rows:
        if pa[name].get("ids") != pb[name].get("ids"):
            return None
    items_a = {name: _fields(pa[name]) for name, *_ in rows}
    items_b = {name: _fields(pb[name]) for name, *_ in rows}
    return paired_score_test(rows, items_a, items_b)


def split_halves(card: Mapping[str, Any], seed: int = 0) -> tuple[dict, dict]:
    """Each probe's items split into two random halves (the same split for every card)."""
    halves: tuple[dict, dict] = ({}, {})
    for name, items in (card.get("per_item") or {}).items():
        n = len(items.get("ids", []))
        order = _rng(name, n, f"halves-{seed}").permutation(n)
        for half, keep in zip(halves, (order[: n // 2], order[n // 2 :]), strict=True):
            half[name] = {k: [v[i] for i in keep] for k, v in items.items()}
    return halves


def card_value(card: Mapping[str, Any], key: str, per_item=None, metric: str | None = None):
    """A scorecard number recomputed from (a subset of) its per-item results."""
    rows = card_rows(card, key, metric)
    if rows is None:
        return None
    per_item = per_item if per_item is not None else card["per_item"]
    total = sum(w for *_, w in rows)
    return (
        sum(w * float(_values(kind, _fields(per_item[name]))[m]) for name, kind, m, w in rows)
        / total
    )


def ranking_stability(
    cards: Sequence[Mapping[str, Any]], key: str = "dutch_score", splits: int = 20
) -> dict[str, Any] | None:
    """How stable a ranking is: Kendall tau between the rankings on two random halves of items.

    For each of ``splits`` random splits (the same split for every card), the candidates are
    scored on each half and the two orderings compared. A tau near 1 means the suite is big
    enough to rank these candidates; near 0, their order is noise.
    """
    usable = [c for c in cards if card_rows(c, key) is not None]
    if len(usable) < 3:
        return None
    taus = []
    for seed in range(splits):
        halves = [split_halves(c, seed) for c in usable]
        first = [card_value(c, key, h[0]) for c, h in zip(usable, halves, strict=True)]
        second = [card_value(c, key, h[1]) for c, h in zip(usable, halves, strict=True)]
        tau = kendall_tau(first, second)
        if not math.isnan(tau):
            taus.append(tau)
    if not taus:
        return None
    return {
        "key": key,
        "candidates": len(usable),
        "splits": len(taus),
        "kendall_tau": _r(float(np.mean(taus))),
        "kendall_tau_min": _r(float(np.min(taus))),
        "kendall_tau_max": _r(float(np.max(taus))),
    }
