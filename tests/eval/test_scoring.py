"""The batched log-likelihood equals a plain, unbatched transformers computation."""

from __future__ import annotations

import functools
import math
import random

import pytest
import torch

from eval import scoring
from eval.scoring import (
    cpu_threads_for,
    encode_context_continuation,
    loglikelihoods,
    perplexity_metrics,
    rolling_requests,
)


@pytest.fixture(scope="module")
def tiny(make_tiny_mistral):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_mistral("scoring", seed=3)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with cpu_threads_for(model):  # a 32-wide model runs faster on one thread
        yield model, AutoTokenizer.from_pretrained(folder)


def reference(model, context, continuation) -> tuple[float, bool]:
    """One sequence, no padding, no batching, full logits: the textbook computation."""
    ids = torch.tensor([list(context) + list(continuation)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    n = len(context)
    total = sum(logprobs[n - 1 + k, tok].item() for k, tok in enumerate(continuation))
    greedy = all(logprobs[n - 1 + k].argmax().item() == tok for k, tok in enumerate(continuation))
    return total, greedy


def make_requests(tokenizer):
    texts = [
        ("De hoofdstad van Nederland is", " Amsterdam"),
        ("De hoofdstad van Nederland is", " Den Haag"),
        ("De hoofdstad van Nederland is", " Utrecht"),
        ("Clown Bassie trad jarenlang op met acrobaat", " Adriaan"),
        ("Clown Bassie trad jarenlang op met acrobaat", " Alfred"),
        ("", "Het huis staat aan het water."),
        ("", "De huis staat aan het water."),
        ("De afkorting ACM staat voor", " Autoriteit Consument en Markt"),
    ]
    requests = [encode_context_continuation(tokenizer, c, x) for c, x in texts]
    # One-token continuations after one shared prompt, a duplicate, and a prefix of another row.
    ctx = requests[0][0]
    requests += [(ctx, (tok,)) for tok in (1000, 2000, 3000)]
    requests.append(requests[3])
    requests.append((requests[7][0], requests[7][1][:2]))
    rng = random.Random(0)
    for _ in range(10):  # random lengths, so batches mix short and long rows
        c = tuple(rng.randrange(3, 32000) for _ in range(rng.randint(1, 40)))
        x = tuple(rng.randrange(3, 32000) for _ in range(rng.randint(1, 12)))
        requests.append(((1, *c), x))
    return requests


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_loglikelihood_equals_unbatched_transformers(tiny, batch_size):
    model, tokenizer = tiny
    requests = make_requests(tokenizer)
    got = loglikelihoods(model, requests, batch_size=batch_size)
    for (ctx, cont), result in zip(requests, got, strict=True):
        want, greedy = reference(model, ctx, cont)
        assert result.logprob == pytest.approx(want, abs=1e-4)
        assert result.greedy == greedy
        assert result.tokens == len(cont)


@pytest.mark.parametrize("path", ["rows", "full-forward"])
def test_paths_without_the_kv_cache_give_the_same_numbers(tiny, monkeypatch, path):
    model, tokenizer = tiny
    requests = make_requests(tokenizer)
    shared = loglikelihoods(model, requests, batch_size=4)
    if path == "full-forward":
        monkeypatch.setattr(scoring, "_decoder_and_head", lambda m: (None, None))
    rows = loglikelihoods(model, requests, batch_size=4, share_prompts=False)
    for a, b in zip(shared, rows, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert (a.greedy, a.tokens) == (b.greedy, b.tokens)


def test_each_distinct_context_is_read_once_per_batch(tiny, monkeypatch):
    model, tokenizer = tiny
    ctx, _ = encode_context_continuation(tokenizer, "De hoofdstad van Nederland is", " x")
    choices = [" Amsterdam", " Den Haag", " Utrecht", " Rotterdam"]
    requests = [
        encode_context_continuation(tokenizer, "De hoofdstad van Nederland is", c) for c in choices
    ]
    seen = []
    decoder = model.base_model
    original = decoder.forward

    @functools.wraps(original)  # keeps the signature, which names the cache argument
    def spy(*args, **kwargs):
        seen.append(tuple(kwargs["input_ids"].shape))
        return original(*args, **kwargs)

    monkeypatch.setattr(decoder, "forward", spy)
    loglikelihoods(model, requests, batch_size=16)
    # One pass over the shared prompt (1 row), one over the remaining tokens of the choices that
    # have more than one (" Amsterdam" is one token: its log-prob comes from the prompt's pass).
    multi = sum(len(cont) > 1 for _, cont in requests)
    assert multi >= 2
    assert seen[0] == (1, len(ctx))
    assert len(seen) == 2 and seen[1] == (multi, max(len(c) for _, c in requests) - 1)


def test_a_greedy_continuation_is_flagged_greedy(tiny):
    model, tokenizer = tiny
    ctx = tuple(tokenizer("Het weer is", add_special_tokens=True)["input_ids"])
    with torch.no_grad():
        best = model(input_ids=torch.tensor([ctx])).logits[0, -1].argmax().item()
    [hit, miss] = loglikelihoods(model, [(ctx, (best,)), (ctx, ((best + 1) % 32000,))])
    assert hit.greedy and not miss.greedy
    assert hit.logprob > miss.logprob


def test_context_continuation_split_matches_lm_eval(mistral_tokenizer):
    ctx, cont = encode_context_continuation(
        mistral_tokenizer, "Clown Bassie trad op met", " Adriaan"
    )
    assert ctx[0] == mistral_tokenizer.bos_token_id
    whole = mistral_tokenizer("Clown Bassie trad op met Adriaan", add_special_tokens=False)
    assert list(ctx + cont) == [mistral_tokenizer.bos_token_id, *whole["input_ids"]]
    # A trailing space in the context moves to the continuation.
    assert encode_context_continuation(mistral_tokenizer, "trad op met ", "Adriaan") == (
        encode_context_continuation(mistral_tokenizer, "trad op met", " Adriaan")
    )


@pytest.mark.parametrize("n_tokens", [1, 5, 9, 10, 23, 64])
def test_rolling_windows_score_every_token_once_within_the_context(n_tokens):
    ids = list(range(100, 100 + n_tokens))
    requests = rolling_requests(ids, bos=1, max_length=10)
    scored = [t for _, cont in requests for t in cont]
    assert scored == ids
    assert all(len(c) + len(x) - 1 <= 10 for c, x in requests)
    assert requests[0][0] == (1,)


def test_perplexity_of_a_long_text_matches_direct_computation(tiny):
    model, tokenizer = tiny
    text = "Op zaterdag gaat de markt al om acht uur open. " * 3
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    requests = rolling_requests(ids, tokenizer.bos_token_id, max_length=256)
    assert len(requests) == 1  # short enough for one window: compare with one forward pass
    [result] = loglikelihoods(model, requests)
    want, _ = reference(model, (tokenizer.bos_token_id,), ids)
    metrics = perplexity_metrics(result.logprob, result.tokens, len(text.encode()))
    assert metrics["ppl"] == pytest.approx(math.exp(-want / len(ids)), rel=1e-4)
    assert metrics["bits_per_byte"] == pytest.approx(-want / math.log(2) / len(text.encode()))


def test_empty_requests_are_refused(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="continuation"):
        loglikelihoods(model, [((1,), ())])
    with pytest.raises(ValueError, match="context"):
        loglikelihoods(model, [((), (5,))])


def test_batched_greedy_continuations_equal_one_prompt_at_a_time(tiny):
    from eval.scoring import greedy_continuations

    model, tokenizer = tiny
    prompts = [
        "Gisteren ben ik met mijn zus naar de markt geweest. Daar kochten we",
        "Het weer is",
        "De trein naar Brussel had vanochtend een uur vertraging, waardoor",
    ]
    alone = [greedy_continuations(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    batched = greedy_continuations(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    assert batched == alone
    assert all(alone)
