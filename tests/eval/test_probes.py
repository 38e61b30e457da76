"""The probe files: counts, coverage and schema errors that name the file and the line."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from eval.errors import EvalError
from eval.schema import ChoiceItem, PairItem, load_probe_file
from eval.suites import PROBES_DIR, load_suite


def _by_name(suite: str):
    return {p.name: p for p in load_suite(suite)}


def test_nl_suite_has_the_probes_of_the_issue_with_enough_items():
    probes = _by_name("nl")
    assert probes["cultuur"].kind == "choice" and len(probes["cultuur"].items) >= 150
    assert probes["afkortingen"].kind == "choice" and len(probes["afkortingen"].items) >= 60
    assert probes["grammatica"].kind == "pair" and len(probes["grammatica"].items) >= 150
    assert probes["taalvastheid"].kind == "generate" and len(probes["taalvastheid"].items) >= 30
    assert probes["ppl_nl"].kind == "text" and len(probes["ppl_nl"].items) >= 10
    assert all(p.lang == "nl" for p in probes.values())


def test_en_suite_has_cloze_items_and_text():
    probes = _by_name("en")
    assert probes["cloze_en"].kind == "choice" and len(probes["cloze_en"].items) >= 60
    assert probes["ppl_en"].kind == "text"
    assert {p.lang for p in probes.values()} == {"en"}


def test_all_is_nl_plus_en():
    assert set(_by_name("all")) == set(_by_name("nl")) | set(_by_name("en"))


def test_grammatica_covers_every_phenomenon_of_the_issue():
    items = _by_name("nl")["grammatica"].items
    counts = Counter(item.phenomenon for item in items if isinstance(item, PairItem))
    for phenomenon in (
        *("de_het", "v2", "bijzin", "scheidbaar", "adjectief", "er", "verkleinwoord"),
        *("dt", "hebben_zijn", "congruentie", "meervoud", "sterk_verleden", "hun_zij"),
    ):
        assert counts[phenomenon] >= 20, phenomenon


def test_cultuur_has_a_deep_dutch_and_flemish_subscore():
    items = [i for i in _by_name("nl")["cultuur"].items if isinstance(i, ChoiceItem)]
    deep = [i for i in items if "diep" in i.tags]
    assert len(deep) >= 150
    topics = Counter(i.topic for i in deep)
    for topic in (
        *("televisie", "radio", "reclame", "sinterklaas", "carnaval", "gezegden"),
        *("politiek", "supermarkt", "suriname", "fries"),
    ):
        assert topics[topic] >= 4, topic
    # items the review named as stale, cued or repeated are gone
    ids = {i.id for i in items}
    for gone in ("114", "042", "092", "100", "082", "057", "093", "128", "175", "187"):
        assert f"cultuur-{gone}" not in ids


def test_taalvastheid_pulls_towards_english_and_asks_in_chat_form():
    items = _by_name("nl")["taalvastheid"].items
    assert sum("engels" in i.tags for i in items) >= 30
    assert sum(i.format == "chat" for i in items) >= 20  # type: ignore[attr-defined]


def test_ppl_nl_spans_registers_and_is_not_a_translation_of_ppl_en():
    probes = _by_name("all")
    texts = probes["ppl_nl"].items
    assert sum(len(t.text) for t in texts) >= 20_000  # type: ignore[attr-defined]
    registers = Counter(tag for t in texts for tag in t.tags)
    for register in ("nieuws", "forum", "juridisch", "spreektaal", "vlaams"):
        assert registers[register] >= 4, register
    # no Dutch text shares its numbers or names with an English one
    english = " ".join(t.text for t in probes["ppl_en"].items)  # type: ignore[attr-defined]
    en_words = {w for w in english.split() if w[:1].isupper() or w.isdigit()}
    for t in texts:
        shared = {w for w in t.text.split() if w in en_words and w not in ("A", "De")}
        assert len(shared) <= 2, (t.id, shared)


def test_cultuur_covers_dutch_and_flemish_topics_and_bassie():
    items = [i for i in _by_name("nl")["cultuur"].items if isinstance(i, ChoiceItem)]
    topics = Counter(i.topic for i in items)
    for topic in ("geografie", "geschiedenis", "instellingen", "televisie", "eten", "sport"):
        assert topics[topic] >= 10, topic
    bassie = [i for i in items if "Bassie" in i.context and "acrobaat" in i.context]
    assert bassie and bassie[0].choices[bassie[0].answer] == "Adriaan"
    flemish = ("Vlaanderen", "Vlaams", "Belg", "Gent", "Antwerpen", "Brugge")
    assert sum(any(w in i.context for w in flemish) for i in items) >= 30


def test_afkortingen_knows_the_acm():
    items = [i for i in _by_name("nl")["afkortingen"].items if isinstance(i, ChoiceItem)]
    acm = next(i for i in items if " ACM " in f" {i.context} ")
    assert acm.choices[acm.answer] == "Autoriteit Consument en Markt"


@pytest.mark.parametrize("name", ["cultuur", "afkortingen", "cloze_en"])
def test_choice_items_have_four_choices_of_similar_length_and_spread_answers(name):
    probes = _by_name("all")
    items = [i for i in probes[name].items if isinstance(i, ChoiceItem)]
    assert all(len(i.choices) == 4 for i in items)
    answers = Counter(i.answer for i in items)
    assert min(answers.values()) >= len(items) // 8  # the answer is not always in one slot
    # Distractors are of the same kind: the answer is rarely the longest or shortest by far.
    lopsided = 0
    for item in items:
        lengths = [len(c) for c in item.choices]
        others = [n for k, n in enumerate(lengths) if k != item.answer]
        if lengths[item.answer] > 2 * max(others) or 2 * lengths[item.answer] < min(others):
            lopsided += 1
    assert lopsided <= len(items) // 10


def test_pairs_differ_minimally():
    """Good and bad sentence use (nearly) the same words: a reordering or one or two swaps."""
    items = [i for i in _by_name("nl")["grammatica"].items if isinstance(i, PairItem)]
    for item in items:
        good = Counter(w.strip(".,?!") for w in item.good.split())
        bad = Counter(w.strip(".,?!") for w in item.bad.split())
        assert abs(sum(good.values()) - sum(bad.values())) <= 1, item.id
        assert sum(((good - bad) + (bad - good)).values()) <= 4, item.id


def _write(tmp_path, lines, name="probe.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"id": "a", "context": "De hoofdstad is", "choices": ["x", "y"], "answer": 0})


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"id": "b", "context": "c", "choices": ["x", "y"], "answer": 0', r":2: not valid JSON"),
        ('["a list"]', r":2: expected a JSON object, got list"),
        ('{"id": "b", "question": "q"}', r":2: cannot tell the probe kind"),
        ('{"id": "b", "context": "c", "choices": ["x", "y"], "answer": 2}', r":2: .*answer must"),
        ('{"id": "b", "context": "c", "choices": ["x"], "answer": 0}', r":2: choices:"),
        ('{"id": "b", "choices": ["x", "y"], "answer": 0}', r":2: context: Field required"),
        ('{"id": "b", "context": "c", "choices": ["x", "y"], "answer": 0, "oops": 1}', r":2: oops"),
        ('{"id": "a", "context": "c", "choices": ["x", "y"], "answer": 1}', r":2: duplicate id"),
        ('{"id": "b", "good": "Ik loop.", "bad": "Ik loopt."}', r":2: a pair item in a file of"),
    ],
)
def test_malformed_probe_file_names_file_and_line(tmp_path, line, match):
    path = _write(tmp_path, [GOOD, line])
    with pytest.raises(EvalError, match=match) as info:
        load_probe_file(path, "nl")
    assert str(path) in info.value.message
    assert info.value.hint


def test_empty_probe_file_is_an_error(tmp_path):
    path = _write(tmp_path, ["", "   "])
    with pytest.raises(EvalError, match=r"has no items"):
        load_probe_file(path, "nl")


def test_unknown_suite_and_empty_suite_folder(tmp_path):
    with pytest.raises(EvalError, match=r"unknown suite 'nederlands'") as info:
        load_suite("nederlands")
    assert "nl, en, demo, all" in info.value.hint
    with pytest.raises(EvalError, match=r"has no probes"):
        load_suite(str(tmp_path))


def test_a_folder_is_a_suite_and_en_files_count_as_english(tmp_path):
    _write(tmp_path, [GOOD], "mijn_probe.jsonl")
    _write(tmp_path, [GOOD], "my_probe_en.jsonl")
    probes = {p.name: p for p in load_suite(str(tmp_path))}
    assert probes["mijn_probe"].lang == "nl" and probes["my_probe_en"].lang == "en"


def test_every_shipped_file_is_valid_jsonl_with_unique_ids():
    files = sorted(PROBES_DIR.glob("*/*.jsonl"))
    assert len(files) >= 7
    for path in files:
        probe = load_probe_file(path, "nl")
        assert len({i.id for i in probe.items}) == len(probe.items)
