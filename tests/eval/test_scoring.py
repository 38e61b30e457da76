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


LAYOUTS = ["packed", "shared", "rows", "full-forward"]


def use_layout(monkeypatch, layout: str) -> dict:
    """Force one of the four layouts; returns the keyword arguments for loglikelihoods."""
    if layout == "shared":
        monkeypatch.setattr(scoring, "_packs", lambda model, longest: False)
    if layout == "full-forward":
        monkeypatch.setattr(scoring, "_decoder_and_head", lambda m: (None, None))
    return {"share_prompts": layout in ("packed", "shared")}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch_size", [1, 5])
def test_every_layout_equals_unbatched_transformers(tiny, monkeypatch, layout, batch_size):
    model, tokenizer = tiny
    requests = make_requests(tokenizer)
    kwargs = use_layout(monkeypatch, layout)
    plan = scoring.plan_loglikelihoods(model, requests, batch_size=batch_size, **kwargs)
    assert plan.kind == layout.removesuffix("-forward")
    got = scoring.run_plan(model, plan)
    for (ctx, cont), result in zip(requests, got, strict=True):
        want, greedy = reference(model, ctx, cont)
        assert result.logprob == pytest.approx(want, abs=1e-4)
        assert result.greedy == greedy
        assert result.tokens == len(cont)


def test_packed_rows_with_eager_attention_equal_unbatched_transformers(make_tiny_mistral, tiny):
    from transformers import AutoModelForCausalLM

    _, tokenizer = tiny
    model = AutoModelForCausalLM.from_pretrained(
        make_tiny_mistral("scoring", seed=3), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    requests = make_requests(tokenizer)
    assert scoring.plan_loglikelihoods(model, requests).kind == "packed"
    for (ctx, cont), result in zip(requests, loglikelihoods(model, requests), strict=True):
        want, greedy = reference(model, ctx, cont)
        assert result.logprob == pytest.approx(want, abs=1e-4)
        assert result.greedy == greedy


def test_a_request_longer_than_the_sliding_window_is_not_packed(tiny, monkeypatch):
    model, tokenizer = tiny
    requests = make_requests(tokenizer)
    longest = max(len(c) + len(x) - 1 for c, x in requests)
    monkeypatch.setattr(model.config, "sliding_window", longest - 1)
    assert scoring.plan_loglikelihoods(model, requests).kind == "shared"


def test_a_plan_runs_on_every_model_of_one_architecture(make_tiny_mistral, tiny):
    """A sweep lays its suite out once and scores each variant with that plan."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny
    other = AutoModelForCausalLM.from_pretrained(
        make_tiny_mistral("scoring-other", seed=4), dtype=torch.float32
    ).eval()
    requests = make_requests(tokenizer)
    plan = scoring.plan_loglikelihoods(model, requests, batch_size=4)
    assert plan.fits(other, 4) and not plan.fits(other, 8)
    for m in (model, other, model):
        again = loglikelihoods(m, requests, batch_size=4)
        for a, b in zip(scoring.run_plan(m, plan), again, strict=True):
            assert a == b


def test_a_plan_refuses_a_model_it_does_not_fit(tiny, monkeypatch):
    model, tokenizer = tiny
    plan = scoring.plan_loglikelihoods(model, make_requests(tokenizer), share_prompts=False)
    assert plan.kind == "rows"
    monkeypatch.setattr(scoring, "_decoder_and_head", lambda m: (None, None))
    with pytest.raises(ValueError, match="plan again"):
        scoring.run_plan(model, plan)


def test_packed_rows_read_a_context_once_and_each_shared_prefix_once(tiny, monkeypatch):
    model, tokenizer = tiny
    choices = [" Amsterdam", " Den Haag", " Utrecht", " Rotterdam", " Den Bosch"]
    requests = [
        encode_context_continuation(tokenizer, "De hoofdstad van Nederland is", c) for c in choices
    ]
    ctx = requests[0][0]
    assert all(c == ctx for c, _ in requests)
    tree = {cont[:j] for _, cont in requests for j in range(1, len(cont))}
    assert len(tree) < sum(len(cont) - 1 for _, cont in requests)  # " Den" is shared
    seen = spy_decoder(model, monkeypatch)
    loglikelihoods(model, requests, batch_size=16)
    assert seen == [(1, len(ctx) + len(tree))]


def test_packed_groups_never_see_each_other(tiny):
    """Many contexts in one row give what each gives alone (no attention across groups)."""
    model, tokenizer = tiny
    requests = make_requests(tokenizer)
    together = loglikelihoods(model, requests, batch_size=1)
    plan = scoring.plan_loglikelihoods(model, requests, batch_size=1)
    assert plan.kind == "packed" and any(len(b.owners) > 3 for b in plan.batches)
    for request, got in zip(requests, together, strict=True):
        [alone] = loglikelihoods(model, [request])
        assert got.logprob == pytest.approx(alone.logprob, abs=1e-5)
        assert got.greedy == alone.greedy


def test_shared_path_reads_each_distinct_context_once_per_batch(tiny, monkeypatch):
    model, tokenizer = tiny
    ctx, _ = encode_context_continuation(tokenizer, "De hoofdstad van Nederland is", " x")
    choices = [" Amsterdam", " Den Haag", " Utrecht", " Rotterdam"]
    requests = [
        encode_context_continuation(tokenizer, "De hoofdstad van Nederland is", c) for c in choices
    ]
    use_layout(monkeypatch, "shared")
    seen = spy_decoder(model, monkeypatch)
    loglikelihoods(model, requests, batch_size=16)
    # One pass over the shared prompt (1 row), one over the remaining tokens of the choices that
    # have more than one (" Amsterdam" is one token: its log-prob comes from the prompt's pass).
    multi = sum(len(cont) > 1 for _, cont in requests)
    assert multi >= 2
    assert seen[0] == (1, len(ctx))
    assert len(seen) == 2 and seen[1] == (multi, max(len(c) for _, c in requests) - 1)


def spy_decoder(model, monkeypatch) -> list[tuple[int, ...]]:
    """Record the input shape of every decoder call."""
    seen = []
    decoder = model.base_model
    original = decoder.forward

    @functools.wraps(original)  # keeps the signature, which names the cache argument
    def spy(*args, **kwargs):
        seen.append(tuple(kwargs["input_ids"].shape))
        return original(*args, **kwargs)

    monkeypatch.setattr(decoder, "forward", spy)
    return seen


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


@pytest.mark.parametrize("layout", ["packed", "shared", "rows"])
def test_the_fused_projection_gives_the_reference_log_probs(tiny, monkeypatch, layout):
    """``greedy=False`` takes the fused head (what score_model uses): the same numbers."""
    model, tokenizer = tiny
    requests = make_requests(tokenizer)
    kwargs = use_layout(monkeypatch, layout)
    plan = scoring.plan_loglikelihoods(model, requests, batch_size=5, **kwargs)
    calls = []
    original = scoring._Projector.__call__
    monkeypatch.setattr(
        scoring._Projector, "__call__", lambda self, *a: calls.append(1) or original(self, *a)
    )
    fused = scoring.run_plan(model, plan, greedy=False)
    assert len(calls) == len(plan.batches)  # the fused path ran, once per batch
    exact = scoring.run_plan(model, plan)
    for (ctx, cont), got, want in zip(requests, fused, exact, strict=True):
        assert got.greedy is None and got.tokens == want.tokens
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5 * len(cont))
        assert got.logprob == pytest.approx(reference(model, ctx, cont)[0], abs=1e-4)


@pytest.mark.parametrize(("rows", "block"), [(256, 1024), (3, 7), (1, 32000), (5, 31999)])
def test_the_fused_projection_in_any_blocking_equals_a_float64_log_softmax(tiny, rows, block):
    """Positions ``ROWS`` at a time and the vocabulary in blocks of ``BLOCK`` (a ragged last
    block, a block of the whole vocabulary, one position at a time): every request's log-prob
    is a float64 log-softmax's within 1e-6 per token (float32 sums of 32k terms)."""
    model, tokenizer = tiny
    requests = make_requests(tokenizer)
    plan = scoring.plan_loglikelihoods(model, requests, batch_size=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scoring._Projector, "ROWS", rows)
        patch.setattr(scoring._Projector, "BLOCK", block)
        fused = scoring.run_plan(model, plan, greedy=False)
    for (ctx, cont), got in zip(requests, fused, strict=True):
        want, _ = reference(model, ctx, cont)
        assert got.tokens == len(cont)
        assert abs(got.logprob - want) <= 1e-6 * len(cont) + 1e-6


def test_the_fused_projection_leaves_the_model_and_its_head_as_they_were(tiny):
    """The scaled, transposed copy of the head is the projector's own: the model is untouched."""
    model, tokenizer = tiny
    head = model.get_output_embeddings()
    before = head.weight.detach().clone()
    projector = scoring._Projector(head)
    assert projector.columns.is_contiguous() and projector.columns.shape == before.T.shape
    assert projector.columns.data_ptr() != head.weight.data_ptr()
    scoring.loglikelihoods(model, make_requests(tokenizer), greedy=False)
    assert torch.equal(head.weight, before)


def test_a_log_sum_exp_that_would_overflow_is_scored_the_reference_way(make_tiny_mistral, tiny):
    """A target 150 bits below the top token: the shifted sum overflows, the reference scores it."""
    from transformers import AutoModelForCausalLM

    _, tokenizer = tiny
    model = AutoModelForCausalLM.from_pretrained(
        make_tiny_mistral("scoring", seed=3), dtype=torch.float32
    ).eval()
    ctx = tuple(tokenizer("Het weer is", add_special_tokens=True)["input_ids"])
    with torch.no_grad():
        hidden = model.base_model(input_ids=torch.tensor([ctx]))[0][0, -1]
        head = model.get_output_embeddings().weight
        head[7] = hidden * (120 / hidden.dot(hidden))  # logit 120 nats: 173 bits above the rest
    requests = [(ctx, (100,)), (ctx, (7,)), (ctx, (100, 7))]
    fused = loglikelihoods(model, requests, greedy=False)
    exact = loglikelihoods(model, requests)
    assert exact[0].logprob < -110 and math.isfinite(fused[0].logprob)
    for got, want, (c, x) in zip(fused, exact, requests, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert got.logprob == pytest.approx(reference(model, c, x)[0], abs=1e-3)


def test_family_json_and_merge_eval_share_one_perplexity(tiny):
    """pretrain.family's perplexity (family.json, README) is merge eval's, to rounding: BOS +
    text, every text token scored, EOS not (pretrain/perplexity.py)."""
    from eval.api import score_model
    from eval.schema import Probe, TextItem
    from pretrain.family import perplexity

    model, tokenizer = tiny
    texts = ["Op zaterdag gaat de markt al om acht uur open.", "Bassie en Adriaan treden op."]
    items = tuple(TextItem(id=str(i), text=t) for i, t in enumerate(texts))
    card = score_model(model, tokenizer, probes=[Probe("ppl_x", "text", "nl", items)])
    ours = perplexity(model, tokenizer, texts)
    assert card["probes"]["ppl_x"]["ppl"] == pytest.approx(ours, rel=1e-5)
    with_eos = [[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"],
                 tokenizer.eos_token_id] for t in texts]  # fmt: skip
    lp = sum(reference(model, (s[0],), s[1:])[0] for s in with_eos)
    assert ours != pytest.approx(math.exp(-lp / sum(len(s) - 1 for s in with_eos)), rel=1e-3)
