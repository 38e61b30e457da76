"""Log-likelihoods, perplexity and greedy continuations, batched the way lm-eval does it.

A *request* is (context token ids, continuation token ids); its answer is the summed log-probability
of the continuation given the context, and whether greedy decoding would have produced it.

How the work is shared and batched:

- every request needs the model to read ``context + continuation[:-1]`` once; requests whose
  sequence is a prefix of another request's sequence are read off that longer row (identical
  requests, one-token choices after one shared prompt, a sentence that is the start of another);
- rows are sorted by length, longest first, and padded on the right to the longest row of their
  batch; with causal attention a real token never sees padding, so batching does not change the
  numbers beyond float rounding;
- log-softmax runs in float32 whatever the model's dtype (bf16 on GPU).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Request = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class Loglikelihood:
    logprob: float
    greedy: bool
    tokens: int


def encode_context_continuation(
    tokenizer, context: str, continuation: str, *, bos: bool = True
) -> Request:
    """Token ids of (context, continuation) as lm-eval splits them.

    The whole string is encoded once and the continuation is what follows the encoded context, so
    the continuation's tokens are the ones the model would read in the full text. Trailing spaces
    of the context move to the continuation (sentencepiece glues a space to the next word).
    """
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    if whole[: len(ctx)] != ctx:  # the boundary merged into one token: fall back to split encoding
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    else:
        cont = whole[len(ctx) :]
    prefix = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    return tuple(prefix + list(ctx)), tuple(cont)


def _pad_id(model, tokenizer=None) -> int:
    for source in (tokenizer, getattr(model, "generation_config", None), model.config):
        if source is None:
            continue
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(source, attr, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def _decoder_and_head(model):
    """(decoder, lm_head) of a plain decoder-only LM, or (None, None) to use the full forward.

    Mistral and Llama compute ``logits = lm_head(decoder(ids))`` with nothing in between, so the
    head can be applied to the few positions that are scored. Models that post-process logits
    (a softcap, a scale) go through the full forward.
    """
    decoder = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = model.config
    plain = getattr(config, "model_type", "") in {"mistral", "llama", "qwen2", "mixtral"}
    softcap = getattr(config, "final_logit_softcapping", None)
    if decoder is None or decoder is model or head is None or not plain or softcap:
        return None, None
    return decoder, head


@contextlib.contextmanager
def cpu_threads_for(model):
    """Run a small model on CPU with one thread: thread hand-offs cost more than its matmuls."""
    small = getattr(model.config, "hidden_size", 4096) <= 256
    if model_device(model).type != "cpu" or not small or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def loglikelihoods(
    model,
    requests: Sequence[Request],
    *,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[Loglikelihood]:
    """Summed log-probability of each continuation given its context (see module docstring)."""
    for ctx, cont in requests:
        if not ctx:
            raise ValueError("a request needs at least one context token (BOS)")
        if not cont:
            raise ValueError("a request needs at least one continuation token")
    # One row per distinct sequence that is not a prefix of a longer one.
    sequences = {ctx + cont[:-1] for ctx, cont in requests}
    rows: list[tuple[int, ...]] = []
    row_of: dict[tuple[int, ...], int] = {}
    for seq in sorted(sequences, key=lambda s: (-len(s), s)):
        if seq in row_of:
            continue
        row_of[seq] = len(rows)
        for end in range(1, len(seq)):
            row_of.setdefault(seq[:end], len(rows))
        rows.append(seq)
    # Reads per row: (request index, first position, targets).
    reads: list[list[tuple[int, int, tuple[int, ...]]]] = [[] for _ in rows]
    for i, (ctx, cont) in enumerate(requests):
        reads[row_of[ctx + cont[:-1]]].append((i, len(ctx) - 1, cont))

    device = model_device(model)
    pad = _pad_id(model)
    decoder, head = _decoder_and_head(model)
    results: list[Loglikelihood | None] = [None] * len(requests)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = len(batch[0])  # rows are sorted longest first
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, seq in enumerate(batch):
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
        # Logits only where a continuation token is predicted: the vocabulary projection and the
        # log-softmax over 32k entries are most of the work on a small model.
        where: list[tuple[int, int]] = []  # (row in batch, position)
        slices: list[tuple[int, int, tuple[int, ...], int]] = []  # (request, offset, targets, b)
        for b in range(len(batch)):
            for i, first, targets in reads[start + b]:
                slices.append((i, len(where), targets, b))
                where.extend((b, p) for p in range(first, first + len(targets)))
        rows_idx = torch.tensor([b for b, _ in where], device=device)
        pos_idx = torch.tensor([p for _, p in where], device=device)
        if decoder is not None:
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device))[0]
            logits = head(hidden[rows_idx, pos_idx])
        else:
            full = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logits = full[rows_idx, pos_idx]
        logprobs = logits.float().log_softmax(-1)
        greedy_ids = logprobs.argmax(-1)
        for i, offset, targets, _ in slices:
            target = torch.tensor(targets, device=logprobs.device)
            span = logprobs[offset : offset + len(targets)]
            picked = span.gather(-1, target[:, None]).squeeze(-1)
            greedy = bool((greedy_ids[offset : offset + len(targets)] == target).all())
            results[i] = Loglikelihood(float(picked.sum()), greedy, len(targets))
        if on_batch is not None:
            on_batch(len(batch))
    return results  # type: ignore[return-value]


def rolling_requests(token_ids: Sequence[int], bos: int, max_length: int) -> list[Request]:
    """Requests that together score every token of a text once (lm-eval's rolling windows).

    The first window reads the text after BOS; each later window predicts the next chunk with up
    to ``max_length`` tokens of context in total.
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    requests: list[Request] = []
    stride = max_length // 2
    first = tuple(token_ids[: max_length - 1])
    if first:
        requests.append(((bos,), first))
    pos = len(first)
    while pos < len(token_ids):
        chunk = tuple(token_ids[pos : pos + stride])
        context = tuple(token_ids[max(0, pos - (max_length - len(chunk))) : pos])
        requests.append((context, chunk))
        pos += len(chunk)
    return requests


def perplexity_metrics(logprob: float, tokens: int, n_bytes: int) -> dict[str, float]:
    """Perplexity per token and bits per byte from a summed natural-log probability."""
    return {
        "ppl": math.exp(-logprob / tokens),
        "bits_per_byte": -logprob / (math.log(2) * n_bytes),
    }


@torch.inference_mode()
def greedy_continuations(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches, sorted by length)."""
    device = model_device(model)
    pad = _pad_id(model, tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    # BOS by hand: the Mistral tokenizer saved by transformers 5 has add_bos_token=False.
    encoded = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    outputs: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for b, i in enumerate(idx):
            seq = encoded[i]
            ids[b, width - len(seq) :] = torch.tensor(seq)
            mask[b, width - len(seq) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
        )
        for b, i in enumerate(idx):
            outputs[i] = tokenizer.decode(out[b, width:], skip_special_tokens=True).strip()
        if on_batch is not None:
            on_batch(len(idx))
    return outputs
