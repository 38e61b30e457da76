"""Corpora → packed blocks: local formats, mixture, packing without loss, resumable position."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pretrain.config import Source
from pretrain.data import PackedStream, StreamState, open_source, pack, tokenize_document
from pretrain.errors import PretrainError


class CharTokenizer:
    """One id per character (ids from 3), BOS 1, EOS 2: makes packing checks exact."""

    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 1000 for c in text]}


def factory(docs):
    return lambda: iter(docs)


def test_pack_loses_no_token_except_the_tail():
    docs = [[i] * n for i, n in enumerate([5, 1, 13, 7, 2, 9, 4], start=10)]
    flat = [t for d in docs for t in d]
    blocks = list(pack(iter(docs), 8))
    got = [t for ids, _ in blocks for t in ids]
    assert all(len(ids) == 8 for ids, _ in blocks)
    assert got == flat[: len(got)]  # same tokens, same order, nothing duplicated
    assert len(flat) - len(got) < 8  # only the documented tail is dropped
    assert len(got) == (len(flat) // 8) * 8


def test_document_positions_restart_at_each_document():
    docs = [[7] * 3, [8] * 6, [9] * 4]
    (ids1, pos1), (ids2, pos2) = list(pack(iter(docs), 6, document_positions=True))
    assert pos1 == [0, 1, 2, 0, 1, 2] and pos2 == [3, 4, 5, 0, 1, 2]
    (_, plain), _ = list(pack(iter(docs), 6))
    assert plain == list(range(6))


def test_eos_separates_documents_and_bos_starts_them():
    tok = CharTokenizer()
    assert tokenize_document(tok, "ab", add_bos=True) == [1, 3 + ord("a"), 3 + ord("b"), 2]
    assert tokenize_document(tok, "ab", add_bos=False) == [3 + ord("a"), 3 + ord("b"), 2]


def test_stream_packs_every_document_once_in_order():
    docs = [f"doc{i}-" + "x" * (i % 7) for i in range(40)]
    tok = CharTokenizer()
    stream = PackedStream([factory(docs)], [1.0], tok, 16)
    it = stream.blocks()
    got = [t for _ in range(12) for t in next(it)[0]]
    flat = [t for d in docs for t in tokenize_document(tok, d, True)]
    assert got == flat[: len(got)]


def test_stream_resumes_at_the_exact_next_token():
    docs_a = [f"a{i}" * (1 + i % 5) for i in range(30)]
    docs_b = [f"b{i}" * (1 + i % 3) for i in range(17)]

    def make():
        return PackedStream(
            [factory(docs_a), factory(docs_b)], [2.0, 1.0], CharTokenizer(), 12, holdout=2, seed=5
        )

    whole = make().blocks()
    expected = [next(whole) for _ in range(60)]  # several epochs of both sources

    first = make()
    it = first.blocks()
    head = [next(it) for _ in range(23)]
    saved = json.loads(json.dumps(first.state.to_json()))  # through JSON, as in a checkpoint
    second = make()
    second.load_state(StreamState.from_json(saved))
    it2 = second.blocks()
    tail = [next(it2) for _ in range(37)]
    assert head + tail == expected


def test_holdout_documents_never_reach_training():
    docs = [f"held{i}" if i < 3 else f"train{i}" for i in range(10)]
    tok = CharTokenizer()
    stream = PackedStream([factory(docs)], [1.0], tok, 8, holdout=3)
    it = stream.blocks()
    text = "".join(chr(t - 3) for _ in range(30) for t in next(it)[0] if t > 2)
    assert "held" not in text and "train3" in text


def test_mixture_follows_the_weights():
    a, b = ["a" * 10] * 5, ["b" * 10] * 5
    stream = PackedStream([factory(a), factory(b)], [3.0, 1.0], CharTokenizer(), 12, seed=0)
    it = stream.blocks()
    for _ in range(400):
        next(it)
    share = stream.state.taken[0] / sum(stream.state.taken)
    assert 0.7 < share < 0.8


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_local_formats_load_through_datasets(tmp_path, fmt):
    texts = [
        "Bassie treedt op met Adriaan.",
        "De ACM is een toezichthouder.",
        "Zwolle ligt aan de Vecht.",
    ]
    if fmt == "txt":
        (tmp_path / "a.txt").write_text("\n".join(texts) + "\n")
    elif fmt == "jsonl":
        (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": texts}), tmp_path / "a.parquet")
    field = "text" if fmt == "txt" else "body"
    docs = open_source(Source(path=str(tmp_path / f"*.{fmt}"), text_field=field))
    assert list(docs()) == texts
    assert list(docs()) == texts  # a second epoch starts over


def test_wrong_text_field_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    docs = open_source(Source(path=str(tmp_path / "a.jsonl")))
    with pytest.raises(PretrainError, match=r"no field 'text' \(fields: \['body'\]\)"):
        list(docs())


def test_missing_and_empty_corpus(tmp_path):
    with pytest.raises(PretrainError, match="no files match"):
        open_source(Source(path=str(tmp_path / "nothing/*.jsonl")))
    (tmp_path / "empty.txt").write_text("\n\n")
    docs = open_source(Source(path=str(tmp_path / "empty.txt")))
    stream = PackedStream([docs], [1.0], CharTokenizer(), 8, labels=["empty.txt"])
    with pytest.raises(PretrainError, match="source empty.txt has no documents"):
        next(stream.blocks())
    (tmp_path / "a.csv").write_text("x\n")
    with pytest.raises(PretrainError, match=r"unsupported file type\(s\) \['.csv'\]"):
        open_source(Source(path=str(tmp_path / "a.csv")))


def test_offline_hub_dataset_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(
        PretrainError, match="Hub dataset allenai/madlad-400: HF_HUB_OFFLINE is set"
    ):
        open_source(Source(hub="allenai/madlad-400", hub_config="nl"))
    assert time.perf_counter() - t < 5


def test_unreachable_hub_dataset_fails_fast(monkeypatch):
    # no network here: the reachability check must give up within its timeout, not hang
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    t = time.perf_counter()
    with pytest.raises(PretrainError, match="Hub dataset allenai/madlad-400 is not reachable"):
        open_source(Source(hub="allenai/madlad-400", hub_config="nl"))
    assert time.perf_counter() - t < 15


def test_world_source_and_chat_rendering():
    docs = open_source(Source(world="nl", documents=5), seed=1)
    assert len(list(docs())) == 5
    with pytest.raises(PretrainError, match="needs a chat template"):
        open_source(Source(world="chat-en"))
    chats = open_source(Source(world="chat-en", documents=3), render_chat=lambda m: m[0]["content"])
    assert all(text.endswith("?") for text in chats())


def test_tokenize_with_the_real_tokenizer(mistral_tokenizer):
    ids = tokenize_document(mistral_tokenizer, "Bassie treedt op met Adriaan.", add_bos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 2 not in ids[1:-1]


def test_repo_path_is_not_needed(tmp_path: Path):
    # relative globs resolve against the current directory
    (tmp_path / "c.txt").write_text("hallo\n")
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert list(open_source(Source(path="*.txt"))()) == ["hallo"]
    finally:
        os.chdir(cwd)


def test_document_positions_keep_attention_inside_documents(make_tiny_mistral):
    # with restarting position ids, no attention mask and no KV cache (use_cache=False, as the
    # training loop calls the model) transformers' sdpa path masks across documents: a packed
    # document gets exactly the logits it gets alone
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_mistral("packing", seed=3))
    doc_a, doc_b = [1, 500, 600, 700, 2], [1, 800, 900, 2]
    block = torch.tensor([doc_a + doc_b])
    (ids, pos), *_ = list(pack(iter([doc_a, doc_b, [5] * 9]), 9, document_positions=True))
    assert ids == doc_a + doc_b
    with torch.no_grad():
        packed = model(input_ids=block, position_ids=torch.tensor([pos]), use_cache=False).logits[
            0, len(doc_a) :
        ]
        alone = model(input_ids=torch.tensor([doc_b])).logits[0]
        leaky = model(input_ids=block, use_cache=False).logits[0, len(doc_a) :]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(leaky, alone, atol=1e-4)  # without it, doc_b sees doc_a


# ---- GEITje's data handling: normalisation, document boundaries, samples, shuffles, budgets ----


def test_literal_escapes_become_whitespace_as_geitje_did():
    from pretrain.data import normalizer

    madlad = "Kop\\nEerste regel\\tmet tab\\\\n"  # MADLAD stores backslash-n, backslash-t
    assert normalizer(["literal_escapes"])(madlad) == "Kop\nEerste regel\tmet tab\\\n"
    assert normalizer([])(madlad) == madlad
    assert normalizer(["nfc"])("e\u0301") == "\u00e9"


def test_a_normalising_source_trains_on_real_newlines(tmp_path):
    path = tmp_path / "madlad.jsonl"
    path.write_text(json.dumps({"text": "a\\nb\\tc"}) + "\n")
    plain = list(open_source(Source(path=str(path)))())
    fixed = list(open_source(Source(path=str(path), normalize=["literal_escapes"]))())
    assert plain == ["a\\nb\\tc"] and fixed == ["a\nb\tc"]


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("line", ["Eerste regel.", "Tweede regel.", "Derde.", "Ander bestand."]),
        ("paragraph", ["Eerste regel.\nTweede regel.\n", "Derde.\n", "Ander bestand.\n"]),
        ("file", ["Eerste regel.\nTweede regel.\n\nDerde.\n", "Ander bestand.\n"]),
    ],
)
def test_txt_document_boundaries(tmp_path, document, expected):
    (tmp_path / "a.txt").write_text("Eerste regel.\nTweede regel.\n\nDerde.\n")
    (tmp_path / "b.txt").write_text("Ander bestand.\n")
    docs = list(open_source(Source(path=str(tmp_path / "*.txt"), document=document))())
    assert [d.strip() for d in docs] == [e.strip() for e in expected]


def test_document_is_for_txt_only(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(PretrainError, match="document: paragraph applies to .txt files"):
        open_source(Source(path=str(tmp_path / "a.jsonl"), document="paragraph"))


def _texts(stream, n):
    it = stream.blocks()
    return "".join(chr(t - 3) for _ in range(n) for t in next(it)[0] if t > 2)


def test_sample_keeps_the_same_share_every_epoch():
    docs = [f"<{i}>" for i in range(400)]
    stream = PackedStream([factory(docs)], [1.0], CharTokenizer(), 16, samples=[0.25], seed=3)
    it = stream.blocks()
    while stream.state.epoch[0] < 2:
        next(it)
    kept = stream.state.taken[0] - stream.state.in_epoch[0]  # two whole epochs
    assert 0.18 < kept / 2 / len(docs) < 0.32
    one = PackedStream([factory(docs)], [1.0], CharTokenizer(), 16, samples=[0.25], seed=3)
    assert list(one._fresh(0, 0)) == list(one._fresh(0, 1))  # the same sample each epoch


def test_shuffle_buffer_is_seeded_reshuffled_per_epoch_and_loses_nothing():
    docs = [f"d{i}" for i in range(50)]
    stream = PackedStream([factory(docs)], [1.0], CharTokenizer(), 8, shuffle_buffers=[8], seed=1)
    e0, e1 = list(stream._fresh(0, 0)), list(stream._fresh(0, 1))
    assert sorted(e0) == sorted(e1) == sorted(docs)
    assert e0 != docs and e0 != e1
    again = PackedStream([factory(docs)], [1.0], CharTokenizer(), 8, shuffle_buffers=[8], seed=1)
    assert list(again._fresh(0, 0)) == e0


def test_sampled_shuffled_budgeted_stream_resumes_at_the_exact_next_token():
    docs_a = [f"a{i}" * (1 + i % 5) for i in range(60)]
    docs_b = [f"b{i}" * (1 + i % 3) for i in range(23)]

    def make():
        return PackedStream(
            [factory(docs_a), factory(docs_b)],
            [1.0, 1.0],
            CharTokenizer(),
            12,
            holdout=2,
            seed=5,
            samples=[0.6, 1.0],
            shuffle_buffers=[7, 4],
            budgets=[400, None],
            epochs=[None, 2.0],
        )

    whole = make().blocks()
    expected = [next(whole) for _ in range(150)]  # several epochs and budget rounds
    first = make()
    it = first.blocks()
    head = [next(it) for _ in range(61)]
    assert first.state.epoch[1] >= 1
    saved = json.loads(json.dumps(first.state.to_json()))
    second = make()
    second.load_state(StreamState.from_json(saved))
    it2 = second.blocks()
    assert head + [next(it2) for _ in range(89)] == expected
    assert second.state.rounds >= 1


def test_token_budgets_set_the_mixture_and_epochs_count_the_source():
    a, b = ["a" * 9] * 20, ["b" * 9] * 10  # 11 tokens a document (BOS + 9 + EOS)
    stream = PackedStream(
        [factory(a), factory(b)], [1.0, 1.0], CharTokenizer(), 11, budgets=[660, None],
        epochs=[None, 3.0], seed=0,
    )  # fmt: skip
    assert stream.budgets() == [660, 330]  # b: 3 epochs of its 10 documents x 11 tokens
    it = stream.blocks()
    for _ in range(90):  # exactly one round: 60 + 30 documents of 11 tokens
        next(it)
    assert stream.state.taken == [60, 30] and stream.state.rounds == 0
    assert stream.state.epoch == [2, 2]  # a: 3 passes of 20, b: 3 of 10 (epochs count from 0)
    for _ in range(9):  # a new round starts with both budgets full again
        next(it)
    assert stream.state.rounds == 1


def test_budget_draws_follow_the_tokens_left():
    a, b = ["a" * 9] * 50, ["b" * 9] * 50
    stream = PackedStream(
        [factory(a), factory(b)], [1.0, 1.0], CharTokenizer(), 11, budgets=[9000, 3000], seed=2
    )
    it = stream.blocks()
    for _ in range(400):  # a third of the round
        next(it)
    share = stream.state.taken[0] / sum(stream.state.taken)
    assert 0.68 < share < 0.82  # about 3:1, as the budgets


def test_check_finds_an_empty_source_before_training():
    stream = PackedStream([factory(["x"]), factory([])], [1.0, 1.0], CharTokenizer(), 8)
    with pytest.raises(PretrainError, match="source 1 has no documents"):
        stream.check()
    sampled = PackedStream([factory(["x"] * 3)], [1.0], CharTokenizer(), 8, holdout=3)
    with pytest.raises(PretrainError, match="source 0 has no documents after the 3 held out"):
        sampled.check()
