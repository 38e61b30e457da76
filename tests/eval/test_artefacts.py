"""Artefact guard: no probe can be solved without knowledge (eval/artefacts.py).

Every choice probe file under eval/probes/ (and the demo suite) keeps every knowledge-free
baseline within two standard errors of chance, and no grammar phenomenon of a pair file is
solved above 0.75 by a unigram word-frequency model. A new probe file is checked the same way
as soon as it is added: the files are globbed, not listed.
"""

from __future__ import annotations

import pytest

from eval.artefacts import CHOICE_BASELINES, choice_credits, choice_report, pair_report
from eval.schema import ChoiceItem, PairItem, Probe, load_probe_file
from eval.suites import PROBES_DIR, demo_probes

pytest.importorskip("wordfreq", reason="wordfreq is a dev dependency: pip install -e '.[dev]'")

FILES = sorted(PROBES_DIR.glob("*/*.jsonl"))


def _load(path) -> Probe:
    return load_probe_file(path, "en" if path.parent.name == "en" else "nl")


CHOICE_PROBES = [p for p in map(_load, FILES) if p.kind == "choice"]
PAIR_PROBES = [p for p in map(_load, FILES) if p.kind == "pair"]


def test_the_guard_sees_every_shipped_probe_file():
    names = {p.name for p in CHOICE_PROBES} | {p.name for p in PAIR_PROBES}
    assert {"cultuur", "afkortingen", "cloze_en", "grammatica"} <= names


@pytest.mark.parametrize(
    "probe", [*CHOICE_PROBES, *[p for p in demo_probes() if p.kind == "choice"]], ids=str
)
def test_no_knowledge_free_baseline_beats_or_misses_chance(probe):
    report = choice_report(probe)
    off = {
        name: f"{row['acc']:.3f} (chance {row['chance']:.3f}, z {row['z']:+.2f})"
        for name, row in report.items()
        if abs(row["z"]) > 2
    }
    assert not off, f"{probe.name}: baselines off chance by more than 2 SE: {off}"


@pytest.mark.parametrize("probe", PAIR_PROBES, ids=str)
def test_no_grammar_phenomenon_is_solved_by_word_frequencies(probe):
    report = pair_report(probe)
    solved = {name: row["unigram"] for name, row in report.items() if row["unigram"] > 0.75}
    assert not solved, f"{probe.name}: phenomena a unigram model solves: {solved}"


def test_baselines_find_the_artefacts_they_are_for():
    """Each baseline scores 1 on an item built with its artefact, so the guard can fail."""
    edited = ChoiceItem(
        id="x",
        context="De afkorting ACM betekent",
        choices=[
            "Autoriteit Consument en Markt",
            "Autoriteit Consument en Mededinging",
            "Agentschap Consument en Markt",
            "Autoriteit Concurrentie en Markt",
        ],
        answer=0,
    )
    assert choice_credits(edited, "nl")["most_similar"] == 1.0
    overlap = ChoiceItem(
        id="y", context="De rivier de Schelde", choices=["de Schelde", "Maas", "Rijn"], answer=0
    )
    credits = choice_credits(overlap, "nl")
    assert credits["overlap"] == 1.0 and credits["longest"] == 1.0 and credits["first"] == 1.0
    common = ChoiceItem(id="z", context="x", choices=["het huis", "xqzv wprt"], answer=0)
    assert choice_credits(common, "nl")["unigram"] == 1.0
    tied = ChoiceItem(id="t", context="x", choices=["aa", "bb", "cc", "dd"], answer=2)
    credits = choice_credits(tied, "nl")
    assert credits["longest"] == credits["shortest"] == 0.25
    assert set(credits) == set(CHOICE_BASELINES)


def test_a_non_word_in_the_bad_sentence_is_caught():
    probe = Probe(
        "p",
        "pair",
        "nl",
        tuple(
            PairItem(
                id=str(i),
                good="Ik drink een kopje thee.",
                bad=f"Ik drink een kop{i}tje thee.",
                phenomenon="verkleinwoord",
            )
            for i in "xqz"
        ),
    )
    assert pair_report(probe)["verkleinwoord"]["unigram"] == 1.0
