"""score_model / score_path: the scorecard, determinism, aggregates and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from eval.api import prepare_suite, score_model, score_path
from eval.errors import EvalError
from eval.schema import load_probe_file
from eval.scoring import cpu_threads_for, encode_context_continuation, loglikelihoods
from eval.suites import WEIGHTS

TIMINGS = ("seconds", "items_per_second")


@pytest.fixture(scope="module")
def tiny(make_tiny_mistral):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_mistral("api", seed=5)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with cpu_threads_for(model):  # a 32-wide model runs faster on one thread
        yield folder, model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory):
    """A folder suite with one probe of every kind (fast to score)."""
    folder = tmp_path_factory.mktemp("suite")
    rows = {
        "kennis.jsonl": [
            {
                "id": "1",
                "context": "De hoofdstad van Nederland is",
                "choices": ["Amsterdam", "Den Haag", "Utrecht"],
                "answer": 0,
            },
            {
                "id": "2",
                "context": "Clown Bassie trad op met acrobaat",
                "choices": ["Alfred", "Adriaan"],
                "answer": 1,
            },
            {
                "id": "3",
                "context": "De ACM is de",
                "choices": ["Autoriteit Consument en Markt", "Algemene Commissie Media"],
                "answer": 0,
            },
        ],
        "zinnen.jsonl": [
            {"id": "1", "good": "Het huis is groot.", "bad": "De huis is groot."},
            {"id": "2", "good": "Morgen ga ik naar Gent.", "bad": "Morgen ik ga naar Gent."},
        ],
        "blijf.jsonl": [
            {"id": "1", "prompt": "Gisteren ben ik naar de markt geweest en", "lang": "nl"},
            {"id": "2", "prompt": "Het mooiste seizoen is de herfst, omdat", "lang": "nl"},
        ],
        "tekst.jsonl": [{"id": "1", "text": "Op zaterdag gaat de markt al om acht uur open."}],
        "quiz_en.jsonl": [
            {
                "id": "1",
                "context": "The capital of France is",
                "choices": ["Paris", "Lyon"],
                "answer": 0,
            },
        ],
    }
    for name, records in rows.items():
        (folder / name).write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return folder


def test_scorecard_has_the_contract_fields(tiny, small_suite):
    _, model, tokenizer = tiny
    card = score_model(model, tokenizer, str(small_suite), name="tiny")
    for key in (
        "model",
        "suite",
        "probes",
        "dutch_score",
        "english_score",
        "seconds",
        "items_per_second",
        "kruising_version",
        "device",
        "dtype",
        "weights",
    ):
        assert key in card, key
    assert card["model"] == "tiny" and card["device"] == "cpu" and card["dtype"] == "float32"
    probes = card["probes"]
    assert set(probes) == {"kennis", "zinnen", "blijf", "tekst", "quiz_en"}
    assert probes["kennis"]["n"] == 3 and {"acc", "acc_norm"} <= set(probes["kennis"])
    assert probes["zinnen"]["n"] == 2 and "acc" in probes["zinnen"]
    assert probes["blijf"]["n"] == 2 and 0 <= probes["blijf"]["lang_share"] <= 1
    assert probes["tekst"]["ppl"] > 1 and probes["tekst"]["bits_per_byte"] > 0
    assert card["items"] == 9 and card["items_per_second"] > 0
    json.dumps(card)  # JSON-ready


def test_every_metric_carries_its_standard_error_and_the_scores_an_interval(tiny, small_suite):
    _, model, tokenizer = tiny
    card = score_model(model, tokenizer, str(small_suite), name="tiny")
    for name, metrics in card["probes"].items():
        values = [m for m in metrics if m not in ("n", "tokens", "lang", "examples")]
        for metric in values:
            if not metric.endswith("_se"):
                assert f"{metric}_se" in metrics and metrics[f"{metric}_se"] >= 0, (name, metric)
    kennis = card["probes"]["kennis"]
    acc = card["per_item"]["kennis"]["acc"]
    assert len(acc) == kennis["n"] == 3 and card["per_item"]["kennis"]["ids"] == ["1", "2", "3"]
    if 0 < kennis["acc"] < 1:  # analytic: the sample standard error of the per-item values
        assert kennis["acc_se"] == pytest.approx(float(np.std(acc, ddof=1) / np.sqrt(3)), 1e-5)
    lo, hi = card["dutch_score_ci"]
    assert lo <= card["dutch_score"] <= hi and card["dutch_score_se"] >= 0
    assert card["english_score_ci"] is not None


def test_tags_and_phenomena_make_subscores(tiny, tmp_path):
    _, model, tokenizer = tiny
    rows = [
        {
            "id": "1",
            "tags": ["diep"],
            "context": "Bassie trad op met",
            "choices": ["Adriaan", "Alfred"],
            "answer": 0,
        },
        {"id": "2", "context": "De hoofdstad is", "choices": ["Amsterdam", "Lyon"], "answer": 0},
        {
            "id": "3",
            "tags": ["diep"],
            "context": "Pipo's vrouw heet",
            "choices": ["Mammaloe", "Saskia"],
            "answer": 0,
        },
    ]
    (tmp_path / "kennis.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [
        {"id": "1", "phenomenon": "dt", "good": "Hij wordt groot.", "bad": "Hij word groot."},
        {"id": "2", "phenomenon": "de_het", "good": "Het huis.", "bad": "De huis."},
    ]
    (tmp_path / "zinnen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    card = score_model(model, tokenizer, str(tmp_path))
    sub = card["subscores"]
    assert set(sub) == {"kennis_diep", "zinnen_dt", "zinnen_de_het"}
    assert sub["kennis_diep"]["n"] == 2 and sub["zinnen_dt"]["n"] == 1
    right = card["per_item"]["kennis"]["acc_norm"]
    assert sub["kennis_diep"]["acc_norm"] == pytest.approx((right[0] + right[2]) / 2)
    assert "kennis_diep" not in card["weights"]["dutch"]  # subscores never enter the score


def test_metrics_agree_with_a_direct_computation(tiny, small_suite):
    _, model, tokenizer = tiny
    card = score_model(model, tokenizer, str(small_suite))
    probe = load_probe_file(small_suite / "kennis.jsonl", "nl")
    acc = acc_norm = 0
    for item in probe.items:
        reqs = [encode_context_continuation(tokenizer, item.context, " " + c) for c in item.choices]
        lls = [r.logprob for r in loglikelihoods(model, reqs, batch_size=1)]
        norm = [ll / len((" " + c).encode()) for ll, c in zip(lls, item.choices, strict=True)]
        acc += max(range(len(lls)), key=lls.__getitem__) == item.answer
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == item.answer
    assert card["probes"]["kennis"]["acc"] == float(f"{acc / 3:.6g}")
    assert card["probes"]["kennis"]["acc_norm"] == float(f"{acc_norm / 3:.6g}")
    pairs = load_probe_file(small_suite / "zinnen.jsonl", "nl")
    right = 0
    for item in pairs.items:
        good, bad = loglikelihoods(
            model,
            [encode_context_continuation(tokenizer, "", s) for s in (item.good, item.bad)],
            batch_size=1,
        )
        right += good.logprob > bad.logprob
    assert card["probes"]["zinnen"]["acc"] == float(f"{right / 2:.6g}")


def test_aggregates_are_the_documented_weighted_means(tiny, small_suite):
    _, model, tokenizer = tiny
    card = score_model(model, tokenizer, str(small_suite))
    p = card["probes"]
    # Unlisted probes weigh the same (DEFAULT_WEIGHT), so the Dutch score is a plain mean here.
    dutch = (p["kennis"]["acc_norm"] + p["zinnen"]["acc"] + p["blijf"]["lang_share"]) / 3
    assert card["dutch_score"] == pytest.approx(dutch, abs=1e-6)
    assert card["english_score"] == p["quiz_en"]["acc_norm"]
    assert "tekst" not in card["weights"]["dutch"]  # perplexity never enters the score
    assert sum(WEIGHTS[k] for k in ("cultuur", "afkortingen", "grammatica", "taalvastheid")) == 1


@pytest.fixture(scope="module")
def card_all(tiny):
    """The tiny model's scorecard on the whole "all" suite (batch size 16, the default, and the
    fused head), scored once for the tests that compare another scoring with it."""
    from eval import scoring

    _, model, tokenizer = tiny
    taken = []  # score_model asked whether the fused head takes this model's head
    original = scoring._Projector.takes
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scoring._Projector, "takes", lambda head: taken.append(1) or original(head))
        card = score_model(model, tokenizer, "all", batch_size=16)
    return card, bool(taken)


def test_same_input_gives_the_same_scorecard(tiny, card_all):
    _, model, tokenizer = tiny
    a = dict(card_all[0])
    b = score_model(model, tokenizer, "all", batch_size=16)
    for key in TIMINGS:
        a.pop(key), b.pop(key)
    assert a == b
    assert a["dutch_score"] is not None and a["english_score"] is not None


def test_batch_size_does_not_change_the_metrics(tiny, small_suite):
    _, model, tokenizer = tiny
    a = score_model(model, tokenizer, str(small_suite), batch_size=1)
    b = score_model(model, tokenizer, str(small_suite), batch_size=7)
    assert a["probes"] == b["probes"]


def test_a_prepared_suite_scores_what_score_model_scores(tiny, make_tiny_mistral, small_suite):
    """The sweep's path: the suite encoded and laid out once, then many models scored with it."""
    from transformers import AutoModelForCausalLM

    _, model, tokenizer = tiny
    other = AutoModelForCausalLM.from_pretrained(
        make_tiny_mistral("api-other", seed=6), dtype=torch.float32
    ).eval()
    suite = str(small_suite)
    prepared = prepare_suite(model, tokenizer, suite)
    assert prepared.requests and prepared.seconds >= 0
    for m in (model, other, model):
        want = score_model(m, tokenizer, suite)
        got = score_model(m, tokenizer, suite, prepared=prepared)
        for key in TIMINGS:
            want.pop(key), got.pop(key)
        assert got == want
    plan = prepared.plan
    score_model(other, tokenizer, suite, prepared=prepared)
    assert prepared.plan is plan  # laid out once, reused for every model that fits it
    score_model(other, tokenizer, suite, prepared=prepared, batch_size=3)
    assert prepared.plan is not plan and prepared.plan.batch_size == 3


def test_a_prepared_suite_refuses_another_tokenizer_suite_or_context(tiny, small_suite):
    from transformers import AutoTokenizer

    folder, model, tokenizer = tiny
    prepared = prepare_suite(model, tokenizer, str(small_suite))
    with pytest.raises(EvalError, match="another tokenizer"):
        score_model(
            model, AutoTokenizer.from_pretrained(folder), str(small_suite), prepared=prepared
        )
    with pytest.raises(EvalError, match="prepared suite is .* not 'nl'"):
        score_model(model, tokenizer, "nl", prepared=prepared)
    prepared.max_length = 7
    with pytest.raises(EvalError, match="encoded for 7 positions"):
        score_model(model, tokenizer, str(small_suite), prepared=prepared)


def test_score_path_loads_a_folder(tiny, small_suite):
    folder, _, _ = tiny
    card = score_path(str(folder), str(small_suite), device="cpu")
    assert card["model"] == str(folder) and card["probes"]["kennis"]["n"] == 3


def test_model_without_tokenizer_is_a_clear_error(tiny, tmp_path, small_suite):
    folder, _, _ = tiny
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, bare / name)
    with pytest.raises(EvalError, match=r"has no loadable tokenizer") as info:
        score_path(str(bare), str(small_suite), device="cpu")
    assert "tokenizer" in info.value.hint
    _, model, _ = tiny
    with pytest.raises(EvalError, match=r"has no tokenizer"):
        score_model(model, None, str(small_suite))


def test_missing_folder_and_offline_hub_id_fail_at_once(monkeypatch, small_suite):
    with pytest.raises(EvalError, match=r"no model folder at \./nope"):
        score_path("./nope", str(small_suite))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvalError, match=r"Rijgersberg/GEITje-7B.*not in the local cache"):
        score_path("Rijgersberg/GEITje-7B", str(small_suite))


def test_unknown_suite_fails_before_loading_a_model():
    with pytest.raises(EvalError, match=r"unknown suite 'dutch'"):
        score_path("org/not-loaded", "dutch")


def test_absent_gpu_is_an_error_not_a_cpu_run(tiny, small_suite):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    folder, _, _ = tiny
    with pytest.raises(EvalError, match=r"no CUDA GPU"):
        score_path(str(folder), str(small_suite), device="cuda")


def test_chat_probe_needs_a_chat_template(tiny, tmp_path):
    _, model, tokenizer = tiny
    (tmp_path / "chat.jsonl").write_text(
        json.dumps(
            {
                "id": "1",
                "context": "Wie is Bassie?",
                "choices": [" clown", " bakker"],
                "answer": 0,
                "format": "chat",
                "delimiter": "",
            }
        )
        + "\n"
    )
    if getattr(tokenizer, "chat_template", None):
        pytest.skip("the fixture tokenizer has a chat template")
    with pytest.raises(EvalError, match=r"no chat template"):
        score_model(model, tokenizer, str(tmp_path), name="tiny")


def test_unreachable_hub_names_the_id(monkeypatch, small_suite):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(repo_id, **kwargs):
        raise LocalEntryNotFoundError(f"{repo_id}: connection refused")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(
        EvalError, match=r"cannot fetch Hub model org/kind@v2: the Hub is unreachable"
    ):
        score_path("org/kind@v2", str(small_suite))


def test_taalvastheid_counts_continuations_the_language_identifier_calls_dutch(
    tiny, small_suite, monkeypatch
):
    import eval.scoring

    _, model, tokenizer = tiny
    texts = {
        "Gisteren ben ik naar de markt geweest en": "we kochten daar verse groente en een bos tulpen.",
        "Het mooiste seizoen is de herfst, omdat": "the leaves turn red and the evenings get darker.",
    }

    def fake_greedy(model, tokenizer, prompts, **kwargs):
        return [texts[p] for p in prompts]

    monkeypatch.setattr(eval.scoring, "greedy_continuations", fake_greedy)
    card = score_model(model, tokenizer, str(small_suite))
    assert card["probes"]["blijf"]["lang_share"] == 0.5
    assert card["probes"]["blijf"]["examples"][1].startswith("the leaves")


def test_item_longer_than_the_model_context_is_named(make_tiny_mistral, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_mistral("short-context", seed=1, max_position_embeddings=16)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    long = "De gemeente wil de komende jaren honderden nieuwe woningen bouwen op het terrein."
    (tmp_path / "lang.jsonl").write_text(
        json.dumps({"id": "z1", "good": long, "bad": long + "!"}) + "\n"
    )
    with pytest.raises(EvalError, match=r"do not fit the model's 16 positions \(lang:z1\)"):
        score_model(model, tokenizer, str(tmp_path))


def test_the_fused_projection_leaves_every_score_as_it_was(tiny, card_all, monkeypatch):
    """score_model takes the fused head; forced onto the reference head, the scorecard is the same
    (per-item decisions identical, every number to float noise)."""
    from eval import scoring

    _, model, tokenizer = tiny
    fused, taken = dict(card_all[0]), card_all[1]
    assert taken and scoring._Projector.takes(model.get_output_embeddings())
    monkeypatch.setattr(scoring._Projector, "takes", lambda head: False)
    exact = score_model(model, tokenizer, "all")
    for key in TIMINGS:
        fused.pop(key), exact.pop(key)
    assert fused.keys() == exact.keys()
    for name, items in exact["per_item"].items():
        for field, values in items.items():
            if field in ("ids", "acc", "acc_norm", "lang_share", "tokens", "bytes"):
                assert fused["per_item"][name][field] == values, (name, field)
            else:
                assert fused["per_item"][name][field] == pytest.approx(values, rel=1e-5, abs=1e-5)
    for name, metrics in exact["probes"].items():
        for metric, value in metrics.items():
            if isinstance(value, float):
                assert fused["probes"][name][metric] == pytest.approx(value, rel=1e-4), (
                    name,
                    metric,
                )
            else:
                assert fused["probes"][name][metric] == value
    for key in ("dutch_score", "english_score"):
        assert fused[key] == pytest.approx(exact[key], rel=1e-5)
