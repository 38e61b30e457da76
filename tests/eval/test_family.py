"""On the tiny family: `nl` knows Dutch better than `base`, `base` keeps more English."""

from __future__ import annotations

import pytest

from eval.api import score_path


@pytest.fixture(scope="module")
def cards(tiny_family):
    return {m: score_path(str(tiny_family[m]), "demo", device="cpu") for m in ("base", "nl")}


def test_nl_beats_base_on_dutch_perplexity(cards):
    nl, base = cards["nl"]["probes"]["ppl_nl"], cards["base"]["probes"]["ppl_nl"]
    assert nl["ppl"] < base["ppl"]
    assert nl["bits_per_byte"] < base["bits_per_byte"]


def test_nl_beats_base_on_the_dutch_demo_probes(cards):
    assert cards["nl"]["dutch_score"] > cards["base"]["dutch_score"]
    for form in ("plain", "chat"):
        probe = f"demo_nl_{form}"
        assert (
            cards["nl"]["probes"][probe]["answer_prob"]
            > cards["base"]["probes"][probe]["answer_prob"]
        )


def test_base_beats_nl_on_english_score(cards):
    assert cards["base"]["english_score"] > cards["nl"]["english_score"]


def test_demo_scorecard_reports_every_form_and_language(cards):
    probes = cards["nl"]["probes"]
    for name in ("demo_nl_plain", "demo_nl_chat", "demo_en_plain", "demo_en_chat"):
        assert probes[name]["n"] > 0 and {"acc", "acc_norm", "answer_prob"} <= set(probes[name])
    assert set(cards["nl"]["weights"]["dutch"]) == {"demo_nl_plain", "demo_nl_chat"}
    assert set(cards["nl"]["weights"]["english"]) == {"demo_en_plain", "demo_en_chat"}
