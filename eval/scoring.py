"""Log-likelihoods, perplexity and greedy continuations, batched the way lm-eval does it.

A *request* is (context token ids, continuation token ids); its answer is the summed log-probability
of the continuation given the context, and whether greedy decoding would have produced it.

How the work is shared and batched:

- identical requests are scored once, and so is every hidden state several requests share;
- with sdpa or eager attention (which honour a custom 4D mask) the requests are *packed*: a
  context is read once, followed by the prefix tree of its continuations (" Amsterdam" and
  " Amstelveen" share their first token), each token attending to exactly its ancestors; several
  such groups share a row, so a batch is a few full rows with no padding in between, and the
  prompt of a 4-way choice costs its tokens once, not four times;
- otherwise (flash attention) requests are sorted by context, longest first, and batched; each
  distinct context of a batch is read once (right-padded, so a real token never sees padding)
  and its KV cache is copied to one row per continuation, which reads the rest of its tokens;
- models whose decoder cannot be driven either way fall back to one padded row per distinct
  ``context + continuation[:-1]``, with a row shared by every request that is a prefix of it;
- the vocabulary projection runs only at scored positions, in chunks, and the log-sum-exp runs
  in float32 whatever the model's dtype (bf16 on GPU).

All of this is laid out once by ``plan_loglikelihoods``; ``run_plan`` scores the laid-out batches
on a model, so a sweep that scores many variants of one model lays them out once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kruising.device import cpu_threads_for  # noqa: F401  (eval's callers import it here)
from pretrain.perplexity import perplexity_metrics  # noqa: F401  (one definition, shared)

Request = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class Loglikelihood:
    logprob: float
    greedy: bool | None  # None: not checked (``run_plan(..., greedy=False)``)
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


@torch.inference_mode()
def loglikelihoods(
    model,
    requests: Sequence[Request],
    *,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
    share_prompts: bool = True,
    greedy: bool = True,
) -> list[Loglikelihood]:
    """Summed log-probability of each continuation given its context (see module docstring).

    ``on_batch(n)`` is called with the number of requests each batch finished; ``greedy=False``
    leaves out the greedy check (see ``run_plan``).
    """
    plan = plan_loglikelihoods(model, requests, batch_size=batch_size, share_prompts=share_prompts)
    return run_plan(model, plan, on_batch=on_batch, greedy=greedy)


@dataclass
class _Batch:
    """One batch, laid out: the decoder's inputs and which hidden state scores which token.

    ``ids``/``mask``/``positions`` feed the first pass (the distinct contexts, or whole rows);
    a packed batch has ``end`` instead of ``mask``: token ``t`` of a row attends to token
    ``a <= t`` when ``t < end[a]`` (``a``'s subtree ends there).
    ``select`` (a context row per continuation row) and ``x_*`` feed the continuation pass on
    the contexts' KV cache, when there is one. The scored hidden states are
    ``first[rows, cols]`` then ``second[x_rows, x_cols]``, each distinct token prefix once;
    ``index[e]`` is the one that predicts ``targets[e]``, and ``segment[e]`` its request.
    """

    ids: torch.Tensor
    mask: torch.Tensor | None
    positions: torch.Tensor | None
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor
    segment: torch.Tensor
    owners: list[list[int]]
    chunks: list[tuple[int, int, torch.Tensor]]  # (first row, end row, entries) of the head
    select: torch.Tensor | None = None
    x_ids: torch.Tensor | None = None
    x_mask: torch.Tensor | None = None
    x_pos: torch.Tensor | None = None
    x_rows: torch.Tensor | None = None
    x_cols: torch.Tensor | None = None
    end: torch.Tensor | None = None


@dataclass
class LoglikelihoodPlan:
    """Requests laid out in padded batches once, to be scored on one or many models.

    The layout depends on the requests, the batch size, the device, the pad id and on which
    path the model takes (``packed``: each context with the prefix tree of its continuations,
    several per row; ``shared``: contexts once, continuations on their KV cache; ``rows``: one
    row per distinct sequence through the decoder; ``full``: the same rows through the whole
    model). A sweep plans once and runs the plan on every variant.
    """

    kind: str
    device: torch.device
    pad: int
    batch_size: int
    n_requests: int
    longest: int
    batches: list[_Batch]

    def fits(self, model, batch_size: int | None = None, share_prompts: bool = True) -> bool:
        """Whether ``model`` would get this very layout from ``plan_loglikelihoods``."""
        return (
            _path(model, share_prompts, self.longest) == self.kind
            and model_device(model) == self.device
            and _pad_id(model) == self.pad
            and (batch_size is None or batch_size == self.batch_size)
        )


def _path(model, share_prompts: bool = True, longest: int = 0) -> str:
    decoder, _ = _decoder_and_head(model)
    if decoder is None:
        return "full"
    if not share_prompts:
        return "rows"
    if _packs(model, longest):
        return "packed"
    if _cache_argument(decoder) is not None:
        return "shared"
    return "rows"


def _packs(model, longest: int) -> bool:
    """Whether the decoder honours a custom 4D attention mask for requests this long.

    sdpa and eager attention take the mask as given (flash attention ignores it); a sliding
    window is not applied to a given mask, so no request may be longer than the window.
    """
    config = model.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    window = getattr(config, "sliding_window", None)
    return not window or longest <= window


def _cache_argument(decoder) -> str | None:
    """The decoder's name for the KV cache argument (``cache`` from transformers 5.2x)."""
    import inspect

    parameters = inspect.signature(decoder.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


def _head_chunk(device: torch.device, vocab: int) -> int:
    """Positions per vocabulary projection: about 8 MB of float32 logits on a CPU (64 positions
    of a 32k vocabulary), so the projection, its log-sum-exp and the gathers run in cache;
    2048 positions on a GPU."""
    if device.type == "cpu":
        return max(16, (8 << 20) // (4 * max(vocab, 1)))
    return 2048


def plan_loglikelihoods(
    model, requests: Sequence[Request], *, batch_size: int = 16, share_prompts: bool = True
) -> LoglikelihoodPlan:
    """Lay ``requests`` out in batches for ``model`` (see ``LoglikelihoodPlan``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for ctx, cont in requests:
        if not ctx:
            raise ValueError("a request needs at least one context token (BOS)")
        if not cont:
            raise ValueError("a request needs at least one continuation token")
    longest = max((len(c) + len(x) - 1 for c, x in requests), default=0)
    kind = _path(model, share_prompts, longest)
    device = model_device(model)
    pad = _pad_id(model)
    vocab = getattr(model.config, "vocab_size", None) or 32000
    chunk = _head_chunk(device, vocab)
    if kind == "packed":
        batches = _plan_packed(requests, batch_size, pad, device, chunk)
    elif kind == "shared":
        batches = _plan_shared(requests, batch_size, pad, device, chunk)
    else:
        batches = _plan_rows(requests, batch_size, pad, device, chunk)
    return LoglikelihoodPlan(kind, device, pad, batch_size, len(requests), longest, batches)


def _finish(
    targets: list[int], index: list[int], segment: list[int], n_rows: int, chunk: int, device
) -> dict[str, Any]:
    """A batch's scored-token fields: device tensors of the scored tokens, and which of them
    each head chunk scores (``_Batch(..., **_finish(...))``)."""
    order = sorted(range(len(index)), key=lambda e: index[e])
    chunks = []
    k = 0
    for lo in range(0, n_rows, chunk):
        hi = min(lo + chunk, n_rows)
        first = k
        while k < len(order) and index[order[k]] < hi:
            k += 1
        chunks.append((lo, hi, torch.tensor(order[first:k], device=device)))
    return {
        "targets": _longs(targets, device),
        "index": _longs(index, device),
        "segment": _longs(segment, device),
        "chunks": chunks,
    }


def _longs(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


PACK_TOKENS = 128  # tokens per packed row (more when one request is longer)


def _plan_packed(requests, batch_size, pad, device, chunk) -> list[_Batch]:
    """Each context followed by the prefix tree of its continuations; groups packed into rows.

    A group is laid out in preorder (the context, then the distinct proper prefixes of its
    continuations, sorted), so every token's descendants follow it contiguously: the attention
    rule "``t`` sees ``a`` when ``a <= t < end[a]``" is exactly "``t`` sees its ancestors", and
    a token never sees another group or padding. Positions restart at 0 in each group. A
    context with more continuations than fit ``PACK_TOKENS`` is repeated in several groups.
    """
    owners: dict[Request, list[int]] = {}
    for i, request in enumerate(requests):
        owners.setdefault(request, []).append(i)
    cap = max([PACK_TOKENS] + [len(c) + len(x) - 1 for c, x in owners])
    by_context: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for ctx, cont in owners:
        by_context.setdefault(ctx, []).append(cont)
    groups: list[tuple[tuple[int, ...], list[tuple[int, ...]]]] = []
    for ctx, conts in by_context.items():
        current: list[tuple[int, ...]] = []
        prefixes: set[tuple[int, ...]] = set()
        for cont in sorted(conts):
            new = {cont[:j] for j in range(1, len(cont))} - prefixes
            if current and len(ctx) + len(prefixes) + len(new) > cap:
                groups.append((ctx, current))
                current, prefixes = [], set()
                new = {cont[:j] for j in range(1, len(cont))}
            current.append(cont)
            prefixes |= new
        groups.append((ctx, current))
    laid_out = [_lay_group(ctx, conts) for ctx, conts in groups]
    # First fit, longest group first, into rows of ``cap`` tokens.
    rows: list[list[int]] = []
    room: list[int] = []
    for g in sorted(range(len(groups)), key=lambda g: -len(laid_out[g][0])):
        size = len(laid_out[g][0])
        for r, left in enumerate(room):
            if size <= left:
                rows[r].append(g)
                room[r] -= size
                break
        else:
            rows.append([g])
            room.append(cap - size)

    batches = []
    for start in range(0, len(rows), batch_size):
        batch_rows = rows[start : start + batch_size]
        width = max(cap - left for left in room[start : start + batch_size])
        ids = torch.full((len(batch_rows), width), pad, dtype=torch.long)
        positions = torch.zeros((len(batch_rows), width), dtype=torch.long)
        end = (torch.arange(width) + 1).repeat(len(batch_rows), 1)  # padding sees itself
        scored_rows: list[int] = []
        scored_cols: list[int] = []
        targets, index, segment, who = [], [], [], []
        for r, members in enumerate(batch_rows):
            offset = 0
            for g in members:
                tokens, pos, ends, at = laid_out[g]
                n = len(tokens)
                ids[r, offset : offset + n] = torch.tensor(tokens)
                positions[r, offset : offset + n] = torch.tensor(pos)
                end[r, offset : offset + n] = torch.tensor(ends) + offset
                ctx, conts = groups[g]
                first = len(scored_rows)  # the last context token, then every tree node
                scored_rows.extend([r] * (n - len(ctx) + 1))
                scored_cols.extend(range(offset + len(ctx) - 1, offset + n))
                for cont in conts:
                    for j, token in enumerate(cont):
                        index.append(first + at[cont[:j]] - (len(ctx) - 1))
                        targets.append(token)
                        segment.append(len(who))
                    who.append(owners[(ctx, cont)])
                offset += n
        laid = _Batch(
            ids=ids.to(device),
            mask=None,
            positions=positions.to(device),
            rows=torch.tensor(scored_rows, device=device),
            cols=torch.tensor(scored_cols, device=device),
            owners=who,
            end=end.to(device),
            **_finish(targets, index, segment, len(scored_rows), chunk, device),
        )
        batches.append(laid)
    return batches


def _lay_group(ctx: tuple[int, ...], conts: list[tuple[int, ...]]):
    """(tokens, positions, subtree ends, offset of each prefix) of one context and its tree.

    The tree's nodes are the distinct proper prefixes of the continuations (the hidden state at
    a prefix predicts the next token); ``()`` is the last context token.
    """
    prefixes = sorted({cont[:j] for cont in conts for j in range(1, len(cont))})  # preorder
    tokens = list(ctx) + [p[-1] for p in prefixes]
    positions = list(range(len(ctx))) + [len(ctx) + len(p) - 1 for p in prefixes]
    ends = [len(tokens)] * len(ctx)  # everything after a context token descends from it
    node_end = [len(prefixes)] * len(prefixes)
    open_nodes: list[int] = []
    for k, p in enumerate(prefixes):
        while open_nodes and p[: len(prefixes[open_nodes[-1]])] != prefixes[open_nodes[-1]]:
            node_end[open_nodes.pop()] = k
        open_nodes.append(k)
    ends += [len(ctx) + e for e in node_end]
    at = {(): len(ctx) - 1} | {p: len(ctx) + k for k, p in enumerate(prefixes)}
    return tokens, positions, ends, at


def _plan_shared(requests, batch_size, pad, device, chunk) -> list[_Batch]:
    """Each distinct context is read once per batch; its continuations run on its KV cache.

    Contexts are right-padded (a real token never sees padding); the cache rows are then copied
    to one row per continuation, whose positions continue from its own context length, and the
    attention mask hides the context padding between them. Identical requests are scored once,
    and so is a hidden state that several requests share (the prompt's last token predicts the
    first token of every choice).
    """
    owners: dict[Request, list[int]] = {}
    for i, request in enumerate(requests):
        owners.setdefault(request, []).append(i)
    unique = sorted(owners, key=lambda r: (-len(r[0]), r[0], -len(r[1]), r[1]))
    batches = []
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
        # The last context token predicts each continuation's first token: one per context.
        rows = list(range(len(contexts)))
        cols = [len(ctx) - 1 for ctx in contexts]
        # Continuations longer than one token read the rest of their tokens on the shared cache.
        long = [r for r in batch if len(r[1]) > 1]
        mask = mask.to(device)
        x_rows: list[int] = []
        x_cols: list[int] = []
        second: dict[str, torch.Tensor] = {}  # the continuation pass on the contexts' cache
        seen: dict[tuple[int, ...], int] = {}  # ctx + cont[:j] -> scored hidden state
        if long:
            select = [row_of[ctx] for ctx, _ in long]
            cwidth = max(len(cont) - 1 for _, cont in long)
            x_ids = torch.full((len(long), cwidth), pad, dtype=torch.long)
            x_mask = torch.zeros((len(long), cwidth), dtype=torch.long)
            x_pos = torch.zeros((len(long), cwidth), dtype=torch.long)
            for r, (ctx, cont) in enumerate(long):
                x_ids[r, : len(cont) - 1] = torch.tensor(cont[:-1])
                x_mask[r, : len(cont) - 1] = 1
                x_pos[r] = torch.arange(len(ctx), len(ctx) + cwidth)
                for j in range(1, len(cont)):
                    key = ctx + cont[:j]
                    if key not in seen:
                        seen[key] = len(rows) + len(x_rows)
                        x_rows.append(r)
                        x_cols.append(j - 1)
            select_t = torch.tensor(select, device=device)
            second = {
                "select": select_t,
                "x_ids": x_ids.to(device),
                "x_mask": torch.cat([mask[select_t], x_mask.to(device)], dim=1),
                "x_pos": x_pos.to(device),
                "x_rows": torch.tensor(x_rows, device=device),
                "x_cols": torch.tensor(x_cols, device=device),
            }
        targets, index, segment = [], [], []
        for s, (ctx, cont) in enumerate(batch):
            for j, token in enumerate(cont):
                index.append(row_of[ctx] if j == 0 else seen[ctx + cont[:j]])
                targets.append(token)
                segment.append(s)
        n_rows = len(rows) + len(x_rows)
        laid = _Batch(
            ids=ids.to(device),
            mask=mask,
            positions=torch.arange(width, device=device).expand(len(contexts), width),
            rows=torch.tensor(rows, device=device),
            cols=torch.tensor(cols, device=device),
            owners=[owners[request] for request in batch],
            **_finish(targets, index, segment, n_rows, chunk, device),
            **second,
        )
        batches.append(laid)
    return batches


def _plan_rows(requests, batch_size, pad, device, chunk) -> list[_Batch]:
    """One padded row per distinct ``context + continuation[:-1]`` that is not a prefix of another.

    The path for models whose decoder cannot be driven with a KV cache: identical requests,
    one-token choices after one shared prompt and a sentence that starts another share a row,
    and a position that several requests score is projected once.
    """
    owners: dict[Request, list[int]] = {}
    for i, request in enumerate(requests):
        owners.setdefault(request, []).append(i)
    sequences = {ctx + cont[:-1] for ctx, cont in owners}
    rows: list[tuple[int, ...]] = []
    row_of: dict[tuple[int, ...], int] = {}
    for seq in sorted(sequences, key=lambda s: (-len(s), s)):
        if seq in row_of:
            continue
        row_of[seq] = len(rows)
        for end in range(1, len(seq)):
            row_of.setdefault(seq[:end], len(rows))
        rows.append(seq)
    reads: list[list[Request]] = [[] for _ in rows]
    for request in owners:
        ctx, cont = request
        reads[row_of[ctx + cont[:-1]]].append(request)

    batches = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = len(batch[0])  # rows are sorted longest first
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, seq in enumerate(batch):
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
        seen: dict[tuple[int, int], int] = {}  # (row, position) -> scored hidden state
        rows_idx, pos_idx, targets, index, segment, who = [], [], [], [], [], []
        for b in range(len(batch)):
            for request in reads[start + b]:
                ctx, cont = request
                for k, token in enumerate(cont):
                    key = (b, len(ctx) - 1 + k)
                    if key not in seen:
                        seen[key] = len(rows_idx)
                        rows_idx.append(key[0])
                        pos_idx.append(key[1])
                    index.append(seen[key])
                    targets.append(token)
                    segment.append(len(who))
                who.append(owners[request])
        laid = _Batch(
            ids=ids.to(device),
            mask=mask.to(device),
            positions=None,
            rows=torch.tensor(rows_idx, device=device),
            cols=torch.tensor(pos_idx, device=device),
            owners=who,
            **_finish(targets, index, segment, len(rows_idx), chunk, device),
        )
        batches.append(laid)
    return batches


@torch.inference_mode()
def run_plan(
    model,
    plan: LoglikelihoodPlan,
    *,
    on_batch: Callable[[int], None] | None = None,
    greedy: bool = True,
) -> list[Loglikelihood]:
    """Score a planned set of requests on ``model`` (which must fit the plan).

    ``greedy=False`` skips the greedy check (``Loglikelihood.greedy`` is then None), which lets
    a float32 CPU model take the fused projection (``_Projector``): the same log-probabilities
    to float noise (1e-5 per token), in fewer passes over the logits.
    """
    if not plan.fits(model, share_prompts=plan.kind in ("packed", "shared")):
        raise ValueError(
            f"this plan was laid out for a {plan.kind} path on {plan.device} with pad "
            f"{plan.pad}; plan again for this model"
        )
    decoder, head = _decoder_and_head(model)
    cache_arg = _cache_argument(decoder) if plan.kind == "shared" else None
    score = _score_positions
    if not greedy and head is not None and _Projector.takes(head):
        score = _Projector(head)
    results: list[Loglikelihood | None] = [None] * plan.n_requests
    for b in plan.batches:
        if plan.kind == "packed":
            hidden = decoder(
                input_ids=b.ids,
                attention_mask=_tree_mask(b.end, model.dtype),
                position_ids=b.positions,
                use_cache=False,
            )[0]
            logprobs, hits = score(head, hidden[b.rows, b.cols], b)
        elif plan.kind == "shared":
            out = decoder(
                input_ids=b.ids,
                attention_mask=b.mask,
                position_ids=b.positions,
                use_cache=b.select is not None,
            )
            hidden = out[0][b.rows, b.cols]
            if b.select is not None:
                cache = out[1]
                cache.batch_select_indices(b.select)
                second = decoder(
                    input_ids=b.x_ids,
                    attention_mask=b.x_mask,
                    position_ids=b.x_pos,
                    use_cache=True,
                    **{cache_arg: cache},
                )[0]
                hidden = torch.cat([hidden, second[b.x_rows, b.x_cols]])
            logprobs, hits = score(head, hidden, b)
        elif plan.kind == "rows":
            hidden = decoder(input_ids=b.ids, attention_mask=b.mask)[0]
            logprobs, hits = score(head, hidden[b.rows, b.cols], b)
        else:
            logits = model(input_ids=b.ids, attention_mask=b.mask).logits
            logprobs, hits = _score_positions(lambda x: x, logits[b.rows, b.cols], b)
        _collect(results, b, logprobs, hits if greedy else None)
        if on_batch is not None:
            on_batch(sum(len(w) for w in b.owners))
    return results  # type: ignore[return-value]


def _tree_mask(end: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask [rows, 1, t, a] of a packed batch: 0 where ``a <= t < end[a]``."""
    at = torch.arange(end.shape[1], device=end.device)
    sees = (at[None, :, None] >= at[None, None, :]) & (at[None, :, None] < end[:, None, :])
    mask = torch.zeros(sees.shape, dtype=dtype, device=end.device)
    return mask.masked_fill_(~sees, torch.finfo(dtype).min)[:, None]


LOG2_E = 1 / math.log(2)


def _score_positions(head, hidden: torch.Tensor, b: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target token and whether it is a greedy pick, from hidden states [N, H].

    The vocabulary projection runs in chunks of positions (``b.chunks``), so a long text never
    holds N x 32k float32 logits. Per chunk: the row maximum (a target that reaches it is a
    greedy pick), the targets' logits, then the log-sum-exp as ``max + log(sum(2^((x - max) *
    log2 e)))`` in place: ``exp2`` is 4x faster than ``exp`` on a CPU and as exact (within 3e-6
    per token of a float64 log-softmax; a float32 log-softmax is off by up to 4e-5).
    """
    logprobs = torch.empty(b.targets.shape[0], dtype=torch.float32, device=hidden.device)
    greedy = torch.empty(b.targets.shape[0], dtype=torch.bool, device=hidden.device)
    for lo, hi, entries in b.chunks:
        if entries.numel() == 0:
            continue
        logits = head(hidden[lo:hi]).float()
        top = logits.amax(-1)
        row = b.index[entries] - lo
        picked = logits[row, b.targets[entries]]
        lse = logits.sub_(top[:, None]).mul_(LOG2_E).exp2_().sum(-1).log_().add_(top)
        logprobs[entries] = picked - lse[row]
        greedy[entries] = picked >= top[row]
    return logprobs, greedy


class _Projector:
    """Log-prob of each target token from hidden states, fused for a float32 CPU head.

    The same numbers as ``_score_positions`` to float noise, in fewer passes over the logits:
    the head's weight is scaled by log2(e) and transposed to ``[H, V]`` once per run, so each
    product is a plain ``[M, H] x [H, V-block]`` into a reused buffer (the layout MKL runs
    fastest at these shapes: no transposed operand, no fresh allocation per block); each
    position's base-2 logits are shifted by ``c`` (the base-2 logit of one of its targets), then
    ``exp2_`` and ``sum`` finish the log-sum-exp: four passes where the reference takes nine
    (product, max, subtract, scale, exp2, sum). Positions run ``ROWS`` at a time and the
    vocabulary in blocks of ``BLOCK``, so a block of logits (1 MB) stays in cache between those
    passes.

    The target's own term is ``2^0``, so the sum is at least 1 (nothing underflows); it
    overflows only when some token's logit exceeds the target's by more than 110 bits, and
    such positions (a target with a log-prob below about -75) are scored again by
    ``_score_positions``. It gives no greedy check: ``run_plan(..., greedy=False)``.
    """

    ROWS = 256
    BLOCK = 1024

    @staticmethod
    def takes(head) -> bool:
        weight = getattr(head, "weight", None)
        return (
            isinstance(head, torch.nn.Linear)
            and head.bias is None
            and weight is not None
            and weight.device.type == "cpu"
            and weight.dtype == torch.float32
        )

    def __init__(self, head) -> None:
        weight = head.weight.detach()
        self.head = head
        self.scaled = weight * LOG2_E  # [V, H]: the targets' rows
        self.columns = self.scaled.T.contiguous()  # [H, V]: the product's operand
        self.buffers: dict[tuple[int, int], torch.Tensor] = {}

    def _buffer(self, rows: int, width: int) -> torch.Tensor:
        out = self.buffers.get((rows, width))
        if out is None:
            out = self.buffers[(rows, width)] = torch.empty(rows, width, dtype=torch.float32)
        return out

    def __call__(self, head, hidden: torch.Tensor, b: _Batch) -> tuple[torch.Tensor, None]:
        if hidden.dtype != torch.float32 or hidden.device.type != "cpu":
            logprobs, _ = _score_positions(head, hidden, b)
            return logprobs, None
        hidden = hidden.contiguous()
        n = hidden.shape[0]
        columns, vocab = self.columns, self.columns.shape[1]
        # one target per position sets its shift: the first entry that position predicts
        first = torch.full((n,), -1, dtype=torch.long)
        order = torch.arange(b.index.shape[0] - 1, -1, -1)
        first[b.index[order]] = order  # the last write wins: the lowest entry
        shift_token = torch.where(first >= 0, b.targets[first.clamp(min=0)], 0)
        shift = (hidden * self.scaled[shift_token]).sum(-1)  # [N]
        total = torch.empty(n, dtype=torch.float32)
        for lo in range(0, n, self.ROWS):
            hi = min(lo + self.ROWS, n)
            x, c = hidden[lo:hi], shift[lo:hi, None]
            acc = torch.zeros(hi - lo, dtype=torch.float32)
            for v in range(0, vocab, self.BLOCK):
                w = columns[:, v : v + self.BLOCK]
                out = self._buffer(hi - lo, w.shape[1])
                torch.mm(x, w, out=out)
                acc += out.sub_(c).exp2_().sum(-1)
            total[lo:hi] = acc
        # logit * log2 e - c, per entry
        picked = (hidden[b.index] * self.scaled[b.targets]).sum(-1) - shift[b.index]
        logprobs = (picked - total.log2()[b.index]) * math.log(2)
        bad = ~torch.isfinite(total[b.index])
        if bool(bad.any()):  # a sum overflowed: score those entries the reference way
            redo = torch.nonzero(bad).flatten()
            reference, _ = _score_positions(head, hidden, b)
            logprobs[redo] = reference[redo]
        return logprobs, None


def _collect(results: list, b: _Batch, logprobs: torch.Tensor, greedy: torch.Tensor | None) -> None:
    """Sum per-token scores into per-request results (``b.owners[s]``: requests of segment s)."""
    n = len(b.owners)
    sums = torch.zeros(n, dtype=torch.float64, device=logprobs.device)
    sums.index_add_(0, b.segment, logprobs.double())
    misses: list[int | None] = [None] * n
    if greedy is not None:
        counted = torch.zeros(n, dtype=torch.long, device=logprobs.device)
        counted.index_add_(0, b.segment, (~greedy).long())
        misses = counted.tolist()
    tokens = torch.bincount(b.segment, minlength=n)
    for who, lp, miss, count in zip(b.owners, sums.tolist(), misses, tokens.tolist(), strict=True):
        value = Loglikelihood(lp, None if miss is None else miss == 0, count)
        for i in who:
            results[i] = value


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
