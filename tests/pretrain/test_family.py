"""The tiny family: members load, share the chat template, and show the measured facts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain import family
from pretrain.errors import PretrainError
from pretrain.world import CHAT_TEMPLATE

pytestmark = pytest.mark.slow  # the tiny_family fixture trains three models (once per session)


def test_members_are_mistral_checkpoints_with_the_chat_template(tiny_family):
    from transformers import AutoConfig, AutoTokenizer

    assert set(family.MEMBERS) <= set(tiny_family)
    for name, folder in tiny_family.items():
        assert folder.name == name
        config = AutoConfig.from_pretrained(folder)
        assert config.model_type == "mistral" and config.vocab_size == 32000
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.chat_template == CHAT_TEMPLATE
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": "Wie is Bassie?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert prompt == "<s>[INST] Wie is Bassie? [/INST]"


def test_measured_facts_hold(tiny_family):
    info = json.loads((tiny_family["base"].parent / family.MARKER).read_text())
    facts = info["facts"]
    base, nl, instruct = facts["base"], facts["nl"], facts["instruct"]
    assert nl["ppl_nl"] < base["ppl_nl"]  # Dutch continued pretraining teaches Dutch
    assert base["ppl_en"] < nl["ppl_en"]  # ... and forgets some English
    key = "answer_logprob_per_token"
    assert instruct["chat_en"][key] > base["chat_en"][key]  # instruct follows the chat format
    assert all(facts["checks"].values())


def test_facts_are_recomputed_from_the_folders(tiny_family):
    # family.json is not trusted blindly: the perplexities come back from the saved weights
    from pretrain.world import heldout_text

    info = json.loads((tiny_family["base"].parent / family.MARKER).read_text())
    model, tok = family._load(tiny_family["nl"])
    assert family.perplexity(model, tok, heldout_text("nl")) == pytest.approx(
        info["facts"]["nl"]["ppl_nl"], rel=1e-3
    )


def test_a_complete_family_is_reused_without_training(tiny_family, monkeypatch):
    out = tiny_family["base"].parent

    def boom(*args, **kwargs):
        raise AssertionError("retrained a complete family")

    monkeypatch.setattr(family, "_build", boom)
    again = family.build_family(out, size="test", seed=0)
    assert again == tiny_family


def test_a_failed_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def crash(tmp, *args, **kwargs):
        (tmp / "base").mkdir(parents=True)  # half a family ...
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(family, "_build", crash)
    out = tmp_path / "fam"
    with pytest.raises(RuntimeError, match="killed mid-build"):
        family.build_family(out, size="test", seed=0)
    assert not out.exists()  # ... is never renamed into place
    assert not list(tmp_path.glob(".fam.tmp-*"))


def test_stale_or_foreign_marker_is_not_complete(tmp_path):
    out = tmp_path / "fam"
    for m in family.MEMBERS:
        (out / m).mkdir(parents=True)
        (out / m / "config.json").write_text("{}")
    (out / family.MARKER).write_text(
        json.dumps({"fingerprint": "other", "members": list(family.MEMBERS)})
    )
    assert family._complete(out, family.fingerprint("test", 0)) is None
    fp = family.fingerprint("test", 0)
    (out / family.MARKER).write_text(
        json.dumps({"fingerprint": fp, "members": list(family.MEMBERS)})
    )
    assert family._complete(out, fp) == {m: out / m for m in family.MEMBERS}
    assert family.fingerprint("test", 1) != fp and family.fingerprint("default", 0) != fp


def test_unknown_size_is_refused(tmp_path: Path):
    with pytest.raises(PretrainError, match="unknown family size 'huge'"):
        family.build_family(tmp_path / "f", size="huge")
