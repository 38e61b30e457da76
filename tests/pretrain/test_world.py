"""The fact world: held-out phrasings never leak into training text; probes are well formed."""

from __future__ import annotations

import re

import pytest

from pretrain import world


def _pattern(template: str) -> re.Pattern:
    """A regex matching any filling of `template` (slots become lazy wildcards)."""
    parts = re.split(r"\{[a-z_]+\}", template)
    return re.compile(".+?".join(re.escape(p) for p in parts), re.IGNORECASE)


def _training_text(lang: str) -> str:
    docs = world.training_documents(lang, 800, seed=0)
    chats = world.chat_conversations("en", 400, seed=0) if lang == "en" else []
    return "\n".join(docs + [m["content"] for c in chats for m in c])


@pytest.mark.parametrize("lang", ["nl", "en"])
def test_heldout_phrasings_never_appear_in_training_text(lang):
    text = _training_text(lang)
    for template in world.heldout_templates(lang):
        assert not _pattern(template).search(text), template
    for template in world.training_templates(lang):  # the check itself can find things
        assert _pattern(template).search(text), template


def test_heldout_text_differs_from_every_training_sentence():
    for lang in ("nl", "en"):
        train = _training_text(lang)
        for sentence in world.heldout_text(lang):
            assert sentence not in train


def test_dutch_chat_appears_in_no_family_corpus():
    # instruct trains on English chats; nl on Dutch plain text: no Dutch question is ever
    # followed by its answer in chat form, and Dutch text holds no chat markers.
    nl_text = _training_text("nl")
    assert "[INST]" not in nl_text
    en_chats = world.chat_conversations("en", 400, seed=0)
    dutch_questions = {q for ts in world._TRAIN_QUESTIONS["nl"].values() for q in ts}
    for chat in en_chats:
        assert not any(_pattern(q).fullmatch(chat[0]["content"]) for q in dutch_questions)


def test_dutch_only_facts_are_absent_from_english_text():
    text = _training_text("en")
    for person in world.PEOPLE:
        assert (person.name in text) != person.dutch_only, person.name


def test_heldout_questions_are_well_formed():
    items = world.heldout_questions()
    assert len({q["id"] for q in items}) == len(items)
    langs = {q["lang"] for q in items}
    assert langs == {"nl", "en"}
    for q in items:
        assert q["prompt"].endswith("\nAntwoord:" if q["lang"] == "nl" else "\nAnswer:")
        assert q["user"] in q["prompt"]
        assert q["answer"].startswith(" ") and q["answer"].strip()
        assert len(q["distractors"]) == 3
        assert q["answer"] not in q["distractors"]
        assert all(d.startswith(" ") for d in q["distractors"])
    bassie = next(q for q in items if q["id"] == "nl-bassie-partner-0")
    assert bassie["answer"] == " Adriaan"
    acm = next(q for q in items if q["id"] == "nl-acm-abbreviation-0")
    assert acm["answer"] == " Autoriteit Consument en Markt"
    # English probes only ask about facts English text states
    assert not any(q["dutch_only"] for q in items if q["lang"] == "en")


def test_generator_is_deterministic_per_seed():
    assert world.training_documents("nl", 50, 3) == world.training_documents("nl", 50, 3)
    assert world.training_documents("nl", 50, 3) != world.training_documents("nl", 50, 4)
    assert world.chat_conversations("en", 20, 1) == world.chat_conversations("en", 20, 1)


def test_unknown_language_is_refused():
    with pytest.raises(ValueError, match="lang must be 'nl' or 'en'"):
        world.heldout_text("de")


def test_chat_template_renders_mistral_format(mistral_tokenizer):
    tok = mistral_tokenizer
    tok.chat_template = world.CHAT_TEMPLATE
    chat = [
        {"role": "user", "content": "Wie is Bassie?"},
        {"role": "assistant", "content": "een clown"},
    ]
    assert (
        tok.apply_chat_template(chat, tokenize=False)
        == "<s>[INST] Wie is Bassie? [/INST] een clown</s>"
    )
    prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>[INST] Wie is Bassie? [/INST]"
