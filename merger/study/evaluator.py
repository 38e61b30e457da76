"""Scoring variants in memory: inputs loaded once, one resident model whose weights are replaced."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kruising.errors import KruisingError
from merger.study.spec import Scorecard

Evaluator = Callable[[Any], Scorecard]


class VariantFailed(Exception):
    """A variant that cannot be scored (NaN, a merge error); recorded as a FAILED trial."""


# --- the in-memory evaluator ------------------------------------------------------------------


def child_skeleton(recipe, sources: dict[str, Any], device):
    """The resident model and tokenizer a variant's child would load as, weights not yet set.

    The child's ``config.json`` and tokenizer files (``tokenizer_source``, ``chat_template``)
    are written once by the engine's own writers into a temporary folder, so a variant scores
    exactly as its written child would; the model is built with ``from_config`` in the dtype
    ``eval.api.load_model`` uses (float32 on CPU, bfloat16 on GPU).
    """
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from merger.core.child import write_config, write_tokenizer
    from merger.core.plan import build_plan

    plan = build_plan(recipe, sources)
    with tempfile.TemporaryDirectory(prefix="kruising-skeleton-") as tmp:
        write_config(plan, Path(tmp))
        if write_tokenizer(plan, Path(tmp)) is None:
            raise KruisingError(
                f"none of {', '.join(sources)} has a tokenizer, which scoring needs",
                "save the tokenizer into the base model's folder",
            )
        config = AutoConfig.from_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with _no_init():  # every weight is replaced before scoring: skip the random init
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to(device).eval()
    return model, tokenizer


def _no_init():
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # an older transformers: pay for the random init
        return contextlib.nullcontext()
    return no_init_weights()


class InMemoryEvaluator:
    """Scores variants of one recipe: inputs loaded once, one resident model, weights replaced."""

    def __init__(self, recipe, suite: str, device: str = "auto", *, resident: bool = True):
        from eval.api import prepare_suite
        from eval.suites import load_suite
        from kruising.device import resolve_device
        from merger.core.engine import ResidentInputs, open_sources

        self.device = resolve_device(device)
        self.suite = suite
        self.probes = load_suite(suite)
        start = time.perf_counter()
        if resident:
            self.inputs = ResidentInputs.load(recipe, device=str(self.device))
            sources = self.inputs.sources
        else:
            self.inputs = None
            sources = open_sources(recipe)
        self.model, self.tokenizer = child_skeleton(recipe, sources, self.device)
        # The suite is tokenised (and its batches laid out) once per study, not per variant.
        self.prepared = prepare_suite(self.model, self.tokenizer, suite, probes=self.probes)
        self.load_seconds = time.perf_counter() - start

    def load_weights(self, state: dict[str, Any]) -> None:
        """Copy a child state dict into the resident model (every tensor; tied ones shared)."""
        import torch

        expected = self.model.state_dict()
        tied = _tied_keys(self.model)
        missing = [k for k in expected if k not in state and k not in tied]
        extra = [k for k in state if k not in expected]
        if missing or extra:
            raise VariantFailed(
                f"the merged child does not fit the child config: missing {missing[:3]}, "
                f"unexpected {extra[:3]}"
            )
        with torch.no_grad():
            for name, tensor in state.items():
                target = expected[name]
                if target.shape != tensor.shape:
                    raise VariantFailed(
                        f"{name}: merged shape {tuple(tensor.shape)}, "
                        f"model has {tuple(target.shape)}"
                    )
                target.copy_(tensor)

    def score(self, name: str) -> Scorecard:
        from eval.api import score_model

        return score_model(
            self.model, self.tokenizer, self.suite, name=name, prepared=self.prepared
        )

    def __call__(self, variant) -> Scorecard:
        from merger.core.engine import merge_in_memory

        start = time.perf_counter()
        state = merge_in_memory(variant, self.inputs)  # NaN/Inf: the engine raises
        self.load_weights(state)
        merge_seconds = time.perf_counter() - start
        card = self.score(variant.merge_method)
        card["merge_seconds"] = round(merge_seconds, 3)
        return card


def _tied_keys(model) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {"lm_head.weight"}
