"""Held-out perplexity: the one definition `pretrain family` (family.json) and `merge eval` use.

A text is scored as BOS followed by its tokens. Every token of the text is predicted, from BOS
and the tokens before it; EOS is not scored, since held-out text is a passage, not a document
that ends there (lm-eval's ``loglikelihood_rolling``, which `merge eval` matches to the digit).

    ppl = exp(-sum of log p(token) / number of text tokens)
    bits per byte = -sum of log p(token) / (ln 2 x UTF-8 bytes of the text)

Summed over several texts, the log-probs and the counts are summed first (one mean over all
tokens). `eval` imports this module; pretrain never imports eval.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def text_tokens(tokenizer: Any, text: str) -> list[int]:
    """The scored tokens of `text`: its token ids, no BOS, no EOS (BOS is the context)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def perplexity_metrics(logprob: Any, tokens: Any, n_bytes: Any) -> dict[str, Any]:
    """Perplexity per token and bits per byte from a summed natural-log probability of
    `tokens` scored tokens of texts with `n_bytes` UTF-8 bytes. Numbers in, floats out; numpy
    arrays in (eval's bootstrap resamples), arrays out."""
    ppl = np.exp(-np.asarray(logprob, dtype=np.float64) / tokens)
    bpb = -np.asarray(logprob, dtype=np.float64) / (math.log(2) * np.asarray(n_bytes))
    if ppl.ndim == 0:
        return {"ppl": float(ppl), "bits_per_byte": float(bpb)}
    return {"ppl": ppl, "bits_per_byte": bpb}
