"""The bilingual fact world of the tiny Mistral family: one place for facts, templates and probes.

A small Dutch-flavoured world: people with a profession, a home town and a stage partner, and
organisations with an abbreviation. Every fact is phrased in many Dutch and English *training*
templates (the corpora of `base`, `nl` and `instruct`) and in separate *held-out* templates that
never appear in training text (the probes of eval's demo suite and the perplexity demo text).

Mirroring the real world: some facts are "Dutch culture" and appear only in Dutch text (clown
Bassie performs with acrobat Adriaan; the ACM is the Autoriteit Consument en Markt), the rest
appear in both languages. English chat Q&A (for `instruct`) asks only about shared facts; Dutch
chat Q&A appears in no training corpus at all.

Everything here is a pure function of its arguments (and a seed): no I/O, no torch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# The chat template of every family member: Mistral-7B-Instruct's `[INST] ... [/INST]` format.
# `apply_chat_template(messages, add_generation_prompt=True)` ends right after `[/INST]`; the
# assistant's answer follows with a leading space, so `answer` strings of the probes (which start
# with a space) continue both the plain and the chat prompt the same way.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}"
    "{{ '' }}"
    "{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class Person:
    name: str
    profession_nl: str
    profession_en: str
    city: str
    partner: str
    dutch_only: bool  # known only from Dutch text ("Dutch culture")


@dataclass(frozen=True)
class Organisation:
    abbreviation: str
    full_name: str
    dutch_only: bool


# Partners come in pairs (each is the other's partner) and share a home town. Names are single
# words, none inside another. Half the pairs are known only from Dutch text. 64 people and 24
# organisations: 216 Dutch facts (432 Dutch demo questions: each fact once plain, once in chat
# form) and 108 English ones. One held-out phrasing per relation keeps every question about
# another fact, so the demo's paired tests count independent items.
PEOPLE: tuple[Person, ...] = (
    Person("Bassie", "clown", "clown", "Zwolle", "Adriaan", True),
    Person("Adriaan", "acrobaat", "acrobat", "Zwolle", "Bassie", True),
    Person("Sjaak", "bakker", "baker", "Utrecht", "Truus", True),
    Person("Truus", "schilder", "painter", "Utrecht", "Sjaak", True),
    Person("Kees", "visser", "fisherman", "Delft", "Mientje", True),
    Person("Mientje", "zangeres", "singer", "Delft", "Kees", True),
    Person("Joop", "dokter", "doctor", "Leiden", "Annie", False),
    Person("Annie", "schrijver", "writer", "Leiden", "Joop", False),
    Person("Henk", "piloot", "pilot", "Groningen", "Fien", False),
    Person("Fien", "boer", "farmer", "Groningen", "Henk", False),
    Person("Wim", "kok", "cook", "Haarlem", "Greet", False),
    Person("Greet", "leraar", "teacher", "Haarlem", "Wim", False),
    Person("Dirk", "timmerman", "carpenter", "Arnhem", "Marieke", True),
    Person("Marieke", "slager", "butcher", "Arnhem", "Dirk", True),
    Person("Pieter", "tandarts", "dentist", "Nijmegen", "Saskia", False),
    Person("Saskia", "advocaat", "lawyer", "Nijmegen", "Pieter", False),
    Person("Gerrit", "rechter", "judge", "Deventer", "Anouk", True),
    Person("Anouk", "kapper", "hairdresser", "Deventer", "Gerrit", True),
    Person("Maarten", "loodgieter", "plumber", "Alkmaar", "Sanne", False),
    Person("Sanne", "bibliothecaris", "librarian", "Alkmaar", "Maarten", False),
    Person("Bram", "fotograaf", "photographer", "Hoorn", "Femke", True),
    Person("Femke", "danser", "dancer", "Hoorn", "Bram", True),
    Person("Ruud", "verpleger", "nurse", "Gouda", "Ilse", False),
    Person("Ilse", "apotheker", "pharmacist", "Gouda", "Ruud", False),
    Person("Thijs", "boekhouder", "bookkeeper", "Breda", "Lotte", True),
    Person("Lotte", "postbode", "postman", "Breda", "Thijs", True),
    Person("Jeroen", "tuinman", "gardener", "Tilburg", "Esther", False),
    Person("Esther", "smid", "blacksmith", "Tilburg", "Jeroen", False),
    Person("Teun", "kapitein", "captain", "Eindhoven", "Roos", True),
    Person("Roos", "journalist", "journalist", "Eindhoven", "Teun", True),
    Person("Sander", "dirigent", "conductor", "Maastricht", "Noor", False),
    Person("Noor", "goochelaar", "magician", "Maastricht", "Sander", False),
    Person("Wouter", "schaatser", "skater", "Venlo", "Lieke", True),
    Person("Lieke", "wielrenner", "cyclist", "Venlo", "Wouter", True),
    Person("Koen", "dichter", "poet", "Assen", "Anke", False),
    Person("Anke", "beeldhouwer", "sculptor", "Assen", "Koen", False),
    Person("Niels", "pianist", "pianist", "Emmen", "Ingrid", True),
    Person("Ingrid", "brouwer", "brewer", "Emmen", "Niels", True),
    Person("Jelle", "molenaar", "miller", "Leeuwarden", "Marloes", False),
    Person("Marloes", "imker", "beekeeper", "Leeuwarden", "Jelle", False),
    Person("Hidde", "notaris", "notary", "Sneek", "Tineke", True),
    Person("Tineke", "burgemeester", "mayor", "Sneek", "Hidde", True),
    Person("Sjoerd", "dominee", "vicar", "Harlingen", "Wietske", False),
    Person("Wietske", "kleermaker", "tailor", "Harlingen", "Sjoerd", False),
    Person("Gijs", "schoenmaker", "shoemaker", "Middelburg", "Floor", True),
    Person("Floor", "visboer", "fishmonger", "Middelburg", "Gijs", True),
    Person("Stijn", "bloemist", "florist", "Goes", "Hanneke", False),
    Person("Hanneke", "matroos", "sailor", "Goes", "Stijn", False),
    Person("Tjeerd", "soldaat", "soldier", "Amersfoort", "Mirjam", True),
    Person("Mirjam", "politieagent", "policeman", "Amersfoort", "Tjeerd", True),
    Person("Lars", "brandweerman", "firefighter", "Apeldoorn", "Evelien", False),
    Person("Evelien", "monteur", "mechanic", "Apeldoorn", "Lars", False),
    Person("Ruben", "elektricien", "electrician", "Enschede", "Carla", True),
    Person("Carla", "metselaar", "bricklayer", "Enschede", "Ruben", True),
    Person("Erik", "schipper", "skipper", "Hengelo", "Riet", False),
    Person("Riet", "herder", "shepherd", "Hengelo", "Erik", False),
    Person("Frits", "jager", "hunter", "Almere", "Nel", True),
    Person("Nel", "violist", "violinist", "Almere", "Frits", True),
    Person("Harm", "drummer", "drummer", "Lelystad", "Toos", False),
    Person("Toos", "verkoper", "salesman", "Lelystad", "Harm", False),
    Person("Olaf", "portier", "doorman", "Dordrecht", "Dieuwke", True),
    Person("Dieuwke", "koerier", "courier", "Dordrecht", "Olaf", True),
    Person("Bart", "tekenaar", "cartoonist", "Schiedam", "Joke", False),
    Person("Joke", "wetenschapper", "scientist", "Schiedam", "Bart", False),
)

ORGANISATIONS: tuple[Organisation, ...] = (
    Organisation("ACM", "Autoriteit Consument en Markt", True),
    Organisation("KNMI", "Koninklijk Nederlands Meteorologisch Instituut", True),
    Organisation("RIVM", "Rijksinstituut voor Volksgezondheid en Milieu", True),
    Organisation("NOS", "Nederlandse Omroep Stichting", False),
    Organisation("KLM", "Koninklijke Luchtvaart Maatschappij", False),
    Organisation("TU", "Technische Universiteit", False),
    Organisation("UWV", "Uitvoeringsinstituut Werknemersverzekeringen", True),
    Organisation("CBS", "Centraal Bureau voor de Statistiek", True),
    Organisation("DUO", "Dienst Uitvoering Onderwijs", True),
    Organisation("RDW", "Rijksdienst voor het Wegverkeer", True),
    Organisation("SVB", "Sociale Verzekeringsbank", True),
    Organisation("CPB", "Centraal Planbureau", True),
    Organisation("NVWA", "Nederlandse Voedsel- en Warenautoriteit", True),
    Organisation("AFM", "Autoriteit Financiële Markten", True),
    Organisation("SER", "Sociaal-Economische Raad", True),
    Organisation("NS", "Nederlandse Spoorwegen", False),
    Organisation("ANWB", "Algemene Nederlandse Wielrijdersbond", False),
    Organisation("KNVB", "Koninklijke Nederlandse Voetbalbond", False),
    Organisation("NPO", "Nederlandse Publieke Omroep", False),
    Organisation("HEMA", "Hollandsche Eenheidsprijzen Maatschappij Amsterdam", False),
    Organisation("VOC", "Verenigde Oost-Indische Compagnie", False),
    Organisation("GGD", "Gemeentelijke Gezondheidsdienst", False),
    Organisation("AIVD", "Algemene Inlichtingen- en Veiligheidsdienst", False),
    Organisation("KVK", "Kamer van Koophandel", False),
)

CITIES: tuple[str, ...] = tuple(sorted({p.city for p in PEOPLE}))

# ---- training templates (the only phrasings any family member is trained on) -----------------

_TRAIN_STATEMENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "nl": {
        "profession": (
            "{name} werkt als {profession}.",
            "{name} is van beroep {profession}.",
            "Het beroep van {name} is {profession}.",
            "Iedereen kent {name}, de {profession}.",
        ),
        "city": (
            "{name} woont in {city}.",
            "{name} komt uit {city}.",
            "De woonplaats van {name} is {city}.",
            "In de stad {city} woont {name}.",
        ),
        "partner": (
            "{name} treedt op met {partner}.",
            "{name} werkt altijd samen met {partner}.",
            "De vaste partner van {name} is {partner}.",
            "Samen met {partner} treedt {name} op.",
        ),
        "abbreviation": (
            "{abbreviation} staat voor {full_name}.",
            "De afkorting {abbreviation} betekent {full_name}.",
            "De {full_name} heet kortweg {abbreviation}.",
        ),
    },
    "en": {
        "profession": (
            "{name} works as a {profession}.",
            "{name} is a {profession} by trade.",
            "The job of {name} is {profession}.",
            "Everybody knows {name}, the {profession}.",
        ),
        "city": (
            "{name} lives in {city}.",
            "{name} comes from {city}.",
            "The home town of {name} is {city}.",
            "In the city of {city} lives {name}.",
        ),
        "partner": (
            "{name} performs with {partner}.",
            "{name} always works together with {partner}.",
            "The regular partner of {name} is {partner}.",
            "Together with {partner}, {name} performs.",
        ),
        "abbreviation": (
            "{abbreviation} stands for {full_name}.",
            "The abbreviation {abbreviation} means {full_name}.",
            "The {full_name} is known as {abbreviation}.",
        ),
    },
}

# Questions in training text (plain "Vraag:/Antwoord:" pages, and English chats for instruct).
_TRAIN_QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "nl": {
        "profession": ("Wat doet {name} voor werk?", "Welk beroep heeft {name}?"),
        "city": ("Waar woont {name}?", "In welke stad woont {name}?"),
        "partner": ("Met wie treedt {name} op?", "Wie is de partner van {name}?"),
        "abbreviation": ("Waar staat {abbreviation} voor?", "Wat betekent {abbreviation}?"),
    },
    "en": {
        "profession": ("What does {name} do for a living?", "What is the job of {name}?"),
        "city": ("Where does {name} live?", "In which city does {name} live?"),
        "partner": ("Who does {name} perform with?", "Who is the partner of {name}?"),
        "abbreviation": (
            "What does {abbreviation} stand for?",
            "What is {abbreviation} short for?",
        ),
    },
}

# ---- held-out templates (probes and demo text only; never in any training corpus) -----------

_HELDOUT_QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "nl": {
        "profession": ("Wat is het beroep van {name}?",),
        "city": ("In welke plaats is {name} te vinden?",),
        "partner": ("Met wie staat {name} op het podium?",),
        "abbreviation": ("Wat is de volledige naam van de {abbreviation}?",),
    },
    "en": {
        "profession": ("What kind of work does {name} do?",),
        "city": ("Which town is {name} from?",),
        "partner": ("Who is on stage with {name}?",),
        "abbreviation": ("What is the full name of the {abbreviation}?",),
    },
}

_HELDOUT_STATEMENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "nl": {
        "profession": ("Als {profession} is {name} bekend in het hele land.",),
        "city": ("Wie {name} zoekt, moet naar {city} gaan.",),
        "partner": ("Op het podium staat {name} naast {partner}.",),
        "abbreviation": ("Voluit heet de {abbreviation} de {full_name}.",),
    },
    "en": {
        "profession": ("As a {profession}, {name} is known all over the country.",),
        "city": ("Whoever looks for {name} has to go to {city}.",),
        "partner": ("On stage, {name} stands next to {partner}.",),
        "abbreviation": ("In full, the {abbreviation} is the {full_name}.",),
    },
}

_PLAIN_QA = {"nl": ("Vraag: ", "\nAntwoord:"), "en": ("Question: ", "\nAnswer:")}


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple with its slot values in one language."""

    id: str
    relation: str
    lang: str
    slots: dict[str, str]
    answer_slot: str
    dutch_only: bool

    @property
    def answer(self) -> str:
        return self.slots[self.answer_slot]


def facts(lang: str) -> list[Fact]:
    """Every fact of the world phrased for `lang` ("nl" or "en"), in a fixed order."""
    _check_lang(lang)
    out: list[Fact] = []
    for p in PEOPLE:
        prof = p.profession_nl if lang == "nl" else p.profession_en
        base = {"name": p.name, "profession": prof, "city": p.city, "partner": p.partner}
        for relation, slot in (
            ("profession", "profession"),
            ("city", "city"),
            ("partner", "partner"),
        ):
            out.append(
                Fact(f"{p.name.lower()}-{relation}", relation, lang, base, slot, p.dutch_only)
            )
    for o in ORGANISATIONS:
        slots = {"abbreviation": o.abbreviation, "full_name": o.full_name}
        out.append(
            Fact(
                f"{o.abbreviation.lower()}-abbreviation",
                "abbreviation",
                lang,
                slots,
                "full_name",
                o.dutch_only,
            )
        )
    return out


def known_facts(lang: str) -> list[Fact]:
    """Facts that training text in `lang` states: Dutch text knows all, English only shared ones."""
    return [f for f in facts(lang) if lang == "nl" or not f.dutch_only]


def _check_lang(lang: str) -> None:
    if lang not in ("nl", "en"):
        raise ValueError(f"lang must be 'nl' or 'en', got {lang!r}")


def _capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


def _say(template: str, fact: Fact) -> str:
    return _capitalise(template.format(**fact.slots))


# ---- training corpora ---------------------------------------------------------------------------


def training_documents(lang: str, n: int, seed: int) -> list[str]:
    """`n` training documents in `lang`: short pages of facts and plain Q&A in training phrasings.

    Each document is a few sentences about a handful of random facts known in `lang`, sometimes
    followed by a plain ``Vraag:/Antwoord:`` (``Question:/Answer:``) pair, as on a FAQ page.
    """
    _check_lang(lang)
    rng = random.Random(f"{lang}-docs-{seed}")
    pool = known_facts(lang)
    statements = _TRAIN_STATEMENTS[lang]
    questions = _TRAIN_QUESTIONS[lang]
    q_prefix, a_prefix = _PLAIN_QA[lang]
    docs = []
    for _ in range(n):
        chosen = rng.sample(pool, k=rng.randint(2, 4))
        doc = " ".join(_say(rng.choice(statements[f.relation]), f) for f in chosen)
        if rng.random() < 0.5:
            f = rng.choice(chosen)
            question = _say(rng.choice(questions[f.relation]), f)
            doc += f"\n{q_prefix}{question}{a_prefix} {f.answer}"
        docs.append(doc)
    return docs


def chat_conversations(lang: str, n: int, seed: int) -> list[list[dict[str, str]]]:
    """`n` single-turn chats (user asks, assistant answers) in training phrasings of `lang`.

    The family trains `instruct` on English chats only; Dutch chats are exposed for completeness
    (and for tests that prove they are absent from every corpus).
    """
    _check_lang(lang)
    rng = random.Random(f"{lang}-chat-{seed}")
    pool = known_facts(lang)
    out = []
    for _ in range(n):
        f = rng.choice(pool)
        user = _say(rng.choice(_TRAIN_QUESTIONS[lang][f.relation]), f)
        out.append([{"role": "user", "content": user}, {"role": "assistant", "content": f.answer}])
    return out


# ---- held-out probes and demo text ---------------------------------------------------------------


def _distractors(fact: Fact, k: int = 3) -> list[str]:
    """Wrong answers of the same type as `fact.answer`, picked deterministically."""
    values: list[str] = []
    for other in facts(fact.lang):
        if other.relation == fact.relation and other.answer != fact.answer:
            if other.answer not in values:
                values.append(other.answer)
    rng = random.Random(f"distractors-{fact.id}-{fact.lang}")
    # Prefer distractors of similar length so length alone does not give the answer away.
    values.sort(key=lambda v: (abs(len(v) - len(fact.answer)), rng.random()))
    return [" " + v for v in values[:k]]


def heldout_questions() -> list[dict]:
    """Probe questions in held-out phrasings, Dutch about every fact, English about shared ones.

    Each item: ``{"id", "fact", "lang", "relation", "dutch_only", "prompt", "user", "answer",
    "distractors"}`` (``fact``: the fact asked; each fact is asked in several phrasings). ``prompt`` is the plain form ending right before the answer
    (``"Vraag: ...\\nAntwoord:"``); ``user`` is the same question as a chat user message (wrap it
    with the tokenizer's chat template, ``add_generation_prompt=True``); ``answer`` and each
    distractor start with a space and continue either form.
    """
    items = []
    for lang in ("nl", "en"):
        q_prefix, a_prefix = _PLAIN_QA[lang]
        for f in known_facts(lang):
            for i, template in enumerate(_HELDOUT_QUESTIONS[lang][f.relation]):
                question = _say(template, f)
                items.append(
                    {
                        "id": f"{lang}-{f.id}-{i}",
                        "fact": f.id,
                        "lang": lang,
                        "relation": f.relation,
                        "dutch_only": f.dutch_only,
                        "prompt": f"{q_prefix}{question}{a_prefix}",
                        "user": question,
                        "answer": " " + f.answer,
                        "distractors": _distractors(f),
                    }
                )
    return items


def heldout_text(lang: str) -> list[str]:
    """Held-out demo text in `lang` for perplexity: every known fact in held-out phrasings."""
    _check_lang(lang)
    return [
        _say(template, f)
        for f in known_facts(lang)
        for template in _HELDOUT_STATEMENTS[lang][f.relation]
    ]


def training_templates(lang: str) -> list[str]:
    """Every training phrasing of `lang` (statements and questions), for leak checks in tests."""
    _check_lang(lang)
    out = [t for ts in _TRAIN_STATEMENTS[lang].values() for t in ts]
    out += [t for ts in _TRAIN_QUESTIONS[lang].values() for t in ts]
    return out


def heldout_templates(lang: str) -> list[str]:
    """Every held-out phrasing of `lang` (probe questions and demo statements)."""
    _check_lang(lang)
    out = [t for ts in _HELDOUT_QUESTIONS[lang].values() for t in ts]
    out += [t for ts in _HELDOUT_STATEMENTS[lang].values() for t in ts]
    return out
