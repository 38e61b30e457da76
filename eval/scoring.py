"""Log-likelihoods, perplexity and greedy continuations, batched the way lm-eval does it.

A *request* is (context token ids, continuation token ids); its answer is the summed log-probability
of the continuation given the context, and whether greedy decoding would have produced it.

How the work is shared and batched:

- identical requests are scored once;
- requests are sorted by context, longest first, and batched; each distinct context of a batch is
  read once (right-padded, so a real token never sees padding) and its KV cache is copied to one
  row per continuation, which reads the rest of its tokens on it: the prompt of a 4-way choice
  costs one forward pass, not four;
- models whose decoder cannot be driven with a cache fall back to one padded row per distinct
  ``context + continuation[:-1]``, with a row shared by every request that is a prefix of it;
- the vocabulary projection runs only at scored positions, in chunks, and log-softmax runs in
  float32 whatever the model's dtype (bf16 on GPU).
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
    share_prompts: bool = True,
) -> list[Loglikelihood]:
    """Summed log-probability of each continuation given its context (see module docstring).

    ``on_batch(n)`` is called with the number of requests each batch finished.
    """
    for ctx, cont in requests:
        if not ctx:
            raise ValueError("a request needs at least one context token (BOS)")
        if not cont:
            raise ValueError("a request needs at least one continuation token")
    decoder, head = _decoder_and_head(model)
    if decoder is not None and share_prompts and _cache_argument(decoder) is not None:
        return _shared_prompt_loglikelihoods(model, decoder, head, requests, batch_size, on_batch)
    return _row_loglikelihoods(model, decoder, head, requests, batch_size, on_batch)


def _cache_argument(decoder) -> str | None:
    """The decoder's name for the KV cache argument (``cache`` from transformers 5.2x)."""
    import inspect

    parameters = inspect.signature(decoder.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


def _score_positions(
    head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target and whether it is the argmax, from hidden states [N, H].

    The vocabulary projection runs in chunks so a long text never holds N x 32k float32 logits.
    """
    logprobs, greedy = [], []
    for lo in range(0, hidden.shape[0], chunk):
        logits = head(hidden[lo : lo + chunk]).float()
        lp = logits.log_softmax(-1)
        t = targets[lo : lo + chunk]
        logprobs.append(lp.gather(-1, t[:, None]).squeeze(-1))
        greedy.append(lp.argmax(-1) == t)
    return torch.cat(logprobs), torch.cat(greedy)


def _collect(
    results: list,
    owners: list[list[int]],
    lengths: list[int],
    logprobs: torch.Tensor,
    greedy: torch.Tensor,
) -> None:
    """Split flat per-token scores into per-request sums (``owners[k]``: requests of slice k)."""
    sums = logprobs.double().split(lengths)
    hits = greedy.split(lengths)
    for who, lp, hit in zip(owners, sums, hits, strict=True):
        value = Loglikelihood(float(lp.sum()), bool(hit.all()), len(lp))
        for i in who:
            results[i] = value


def _shared_prompt_loglikelihoods(model, decoder, head, requests, batch_size, on_batch):
    """Each distinct context is read once per batch; its continuations run on its KV cache.

    Contexts are right-padded (a real token never sees padding); the cache rows are then copied
    to one row per continuation, whose positions continue from its own context length, and the
    attention mask hides the context padding between them. Identical requests are scored once.
    """
    cache_arg = _cache_argument(decoder)
    device = model_device(model)
    pad = _pad_id(model)
    owners: dict[Request, list[int]] = {}
    for i, request in enumerate(requests):
        owners.setdefault(request, []).append(i)
    unique = sorted(owners, key=lambda r: (-len(r[0]), r[0], -len(r[1]), r[1]))
    results: list[Loglikelihood | None] = [None] * len(requests)
    for start in range(0, len(unique), batch_size):
        batch = unique[start : start + batch_size]
        contexts = list(dict.fromkeys(ctx for ctx, _ in batch))
        row_of = {ctx: k for k, ctx in enumerate(contexts)}
        width = max(len(c) for c in contexts)
        ids = torch.full((len(contexts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for k, ctx in enumerate(contexts):
            ids[k, : len(ctx)] = torch.tensor(ctx)
            mask[k, : len(ctx)] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = torch.arange(width, device=device).expand(len(contexts), width)
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        ctx_hidden = out[0]
        cache = out[1]
        # Continuations longer than one token read the rest of their tokens on the shared cache.
        long = [r for r in batch if len(r[1]) > 1]
        cont_hidden = None
        cont_row: dict[Request, int] = {}
        if long:
            select = torch.tensor([row_of[ctx] for ctx, _ in long], device=device)
            cache.batch_select_indices(select)
            cwidth = max(len(cont) - 1 for _, cont in long)
            x_ids = torch.full((len(long), cwidth), pad, dtype=torch.long)
            x_mask = torch.zeros((len(long), cwidth), dtype=torch.long)
            x_pos = torch.zeros((len(long), cwidth), dtype=torch.long)
            for r, (ctx, cont) in enumerate(long):
                x_ids[r, : len(cont) - 1] = torch.tensor(cont[:-1])
                x_mask[r, : len(cont) - 1] = 1
                x_pos[r] = torch.arange(len(ctx), len(ctx) + cwidth)
                cont_row[(ctx, cont)] = r
            cont_hidden = decoder(
                input_ids=x_ids.to(device),
                attention_mask=torch.cat([mask[select], x_mask.to(device)], dim=1),
                position_ids=x_pos.to(device),
                use_cache=True,
                **{cache_arg: cache},
            )[0]
        pieces, targets, lengths, who = [], [], [], []
        for request in batch:
            ctx, cont = request
            pieces.append(ctx_hidden[row_of[ctx], len(ctx) - 1 : len(ctx)])
            if len(cont) > 1:
                assert cont_hidden is not None
                pieces.append(cont_hidden[cont_row[request], : len(cont) - 1])
            targets.extend(cont)
            lengths.append(len(cont))
            who.append(owners[request])
        target = torch.tensor(targets, device=device)
        logprobs, greedy = _score_positions(head, torch.cat(pieces), target)
        _collect(results, who, lengths, logprobs, greedy)
        if on_batch is not None:
            on_batch(sum(len(w) for w in who))
    return results


def _row_loglikelihoods(model, decoder, head, requests, batch_size, on_batch):
    """One padded row per distinct ``context + continuation[:-1]`` that is not a prefix of another.

    The path for models whose decoder cannot be driven with a KV cache: identical requests,
    one-token choices after one shared prompt and a sentence that starts another share a row.
    """
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
    reads: list[list[tuple[int, int, tuple[int, ...]]]] = [[] for _ in rows]
    for i, (ctx, cont) in enumerate(requests):
        reads[row_of[ctx + cont[:-1]]].append((i, len(ctx) - 1, cont))

    device = model_device(model)
    pad = _pad_id(model)
    results: list[Loglikelihood | None] = [None] * len(requests)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = len(batch[0])  # rows are sorted longest first
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, seq in enumerate(batch):
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
        rows_idx, pos_idx, targets, lengths, who = [], [], [], [], []
        for b in range(len(batch)):
            for i, first, cont in reads[start + b]:
                rows_idx.extend([b] * len(cont))
                pos_idx.extend(range(first, first + len(cont)))
                targets.extend(cont)
                lengths.append(len(cont))
                who.append([i])
        rows_t = torch.tensor(rows_idx, device=device)
        pos_t = torch.tensor(pos_idx, device=device)
        target = torch.tensor(targets, device=device)
        if decoder is not None:
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device))[0]
            logprobs, greedy = _score_positions(head, hidden[rows_t, pos_t], target)
        else:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logprobs, greedy = _score_positions(lambda x: x, logits[rows_t, pos_t], target)
        _collect(results, who, lengths, logprobs, greedy)
        if on_batch is not None:
            on_batch(len(who))
    return results


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
