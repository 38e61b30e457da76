"""Suites: named sets of probes, and the weights that turn them into `dutch_score`/`english_score`.

- ``nl``: every ``eval/probes/nl/*.jsonl`` (cultuur, afkortingen, grammatica, taalvastheid, ppl_nl);
- ``en``: every ``eval/probes/en/*.jsonl`` (cloze_en, ppl_en);
- ``all``: ``nl`` + ``en``;
- ``demo``: the tiny family's world facts in held-out phrasings, plain and chat, plus held-out
  perplexity text, all taken from ``pretrain.world`` (the one place those facts live);
- a folder path: its ``*.jsonl`` files, scored as Dutch unless a file name ends in ``_en``.

Adding a probe is adding a file: a new ``eval/probes/nl/foo.jsonl`` is part of the ``nl`` suite.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from eval.errors import EvalError
from eval.schema import ChoiceItem, Probe, TextItem, load_probe_file

PROBES_DIR = Path(__file__).resolve().parent / "probes"
SUITES = ("nl", "en", "demo", "all")

# Weights of a probe's primary metric in the language score it counts toward. A probe file a
# user adds (not listed here) weighs DEFAULT_WEIGHT. Perplexity probes never enter the scores:
# they are unbounded and not comparable across tokenizers (bits_per_byte is reported instead).
WEIGHTS: dict[str, float] = {
    # nl suite: knowledge (cultuur + afkortingen) 0.5, grammar 0.3, staying in Dutch 0.2
    "cultuur": 0.3,
    "afkortingen": 0.2,
    "grammatica": 0.3,
    "taalvastheid": 0.2,
    # en suite
    "cloze_en": 1.0,
    # demo suite: plain and chat form weigh the same
    "demo_nl_plain": 0.5,
    "demo_nl_chat": 0.5,
    "demo_en_plain": 0.5,
    "demo_en_chat": 0.5,
}
DEFAULT_WEIGHT = 0.25

# The metric of each kind that enters the language scores.
PRIMARY_METRIC = {"choice": "acc_norm", "pair": "acc", "generate": "lang_share"}

# The demo probes score by answer_prob = exp(mean log-prob per answer token) = 1 / perplexity of the
# correct answers (LAMBADA's target perplexity, per token; log loss, a proper scoring rule). The
# demo suite is the sweep's objective on a tiny family: 4-way accuracy over a few dozen items moves
# in steps of 1/42 and sits at chance until the family knows facts, while the answers' probability
# moves smoothly with every merge parameter. acc and acc_norm are reported alongside.
DEMO_PRIMARY = "answer_prob"

# Held-out demo sentences per language in the demo suite's perplexity probes (an even spread over
# the world's facts): perplexity is reported, never ranked on, and every variant of a sweep pays
# for these tokens.
DEMO_TEXTS = 64


def _folder_suite(folder: Path, lang: str | None = None) -> list[Probe]:
    files = sorted(folder.glob("*.jsonl"))
    probes = []
    for path in files:
        file_lang = lang or ("en" if path.stem.endswith("_en") else "nl")
        probes.append(load_probe_file(path, file_lang))
    return probes


def demo_probes() -> list[Probe]:
    """The tiny family's held-out questions as four choice probes, plus held-out perplexity text."""
    try:
        from pretrain import world
    except ImportError as exc:
        raise EvalError(
            "the demo suite needs pretrain.world, which is not importable",
            "install kruising with its pretrain package (pip install -e .)",
        ) from exc
    questions = world.heldout_questions()
    probes: list[Probe] = []
    for lang in ("nl", "en"):
        for form in ("plain", "chat"):
            items = []
            for q in questions:
                if q["lang"] != lang:
                    continue
                # the answer's slot varies (fixed per question), so a position is no cue
                slot = zlib.crc32(q["id"].encode()) % (len(q["distractors"]) + 1)
                choices = list(q["distractors"])
                choices.insert(slot, q["answer"])
                items.append(
                    ChoiceItem(
                        id=f"{q['id']}-{form}",
                        context=q["prompt"] if form == "plain" else q["user"],
                        choices=choices,
                        answer=slot,
                        format=form,
                        delimiter="",  # answers and distractors start with a space
                    )
                )
            if items:
                name = f"demo_{lang}_{form}"
                probes.append(
                    Probe(name, "choice", lang, tuple(items), "pretrain.world", DEMO_PRIMARY)
                )
        texts = world.heldout_text(lang)
        if len(texts) > DEMO_TEXTS:  # an even spread: perplexity needs far fewer than all
            texts = [texts[i * len(texts) // DEMO_TEXTS] for i in range(DEMO_TEXTS)]
        if texts:
            items_t = tuple(TextItem(id=f"{lang}-{i}", text=t) for i, t in enumerate(texts))
            probes.append(Probe(f"ppl_{lang}", "text", lang, items_t, "pretrain.world"))
    return probes


def load_suite(suite: str) -> list[Probe]:
    """The probes of a named suite or of a folder of probe files."""
    if suite == "nl":
        probes = _folder_suite(PROBES_DIR / "nl", "nl")
    elif suite == "en":
        probes = _folder_suite(PROBES_DIR / "en", "en")
    elif suite == "all":
        probes = _folder_suite(PROBES_DIR / "nl", "nl") + _folder_suite(PROBES_DIR / "en", "en")
    elif suite == "demo":
        probes = demo_probes()
    elif Path(suite).is_dir():
        probes = _folder_suite(Path(suite))
    else:
        raise EvalError(
            f"unknown suite {suite!r}",
            f"use one of {', '.join(SUITES)}, or a folder of *.jsonl probe files",
        )
    if not probes:
        raise EvalError(
            f"suite {suite!r} has no probes",
            "add *.jsonl probe files (schema in eval/probes/README.md)",
        )
    return probes
