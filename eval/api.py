"""Score a model on a suite and return its scorecard (a plain, JSON-ready dict).

``score_model`` takes a model and tokenizer already in memory (the sweep merges in memory and
calls it for every variant); ``score_path`` loads a checkpoint folder or Hub id first.

Scorecard::

    {"model": ..., "suite": ..., "kruising_version": ..., "device": ..., "dtype": ...,
     "probes": {name: {metric: value, ..., "n": items}},
     "dutch_score": float | None, "english_score": float | None, "weights": {...},
     "seconds": float, "items_per_second": float}

Metric values are rounded to 6 significant digits, so the same model and suite give the same scorecard
(leave ``seconds`` and ``items_per_second`` out of any comparison).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.errors import EvalError
from eval.schema import ChoiceItem, PairItem, Probe, TextItem
from eval.suites import DEFAULT_WEIGHT, PRIMARY_METRIC, WEIGHTS, load_suite
from kruising.device import resolve_device

MAX_NEW_TOKENS = 32


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kruising")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def _r(value: float) -> float:
    """Six significant digits: stable across runs, precise for small probabilities too."""
    return float(f"{float(value):.6g}")


def _max_length(model) -> int:
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or 2048
    window = getattr(config, "sliding_window", None)
    if window:
        limit = min(limit, window)
    return int(min(limit, 2048))


def _chat_context(tokenizer, user: str, model_name: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise EvalError(
            f"the tokenizer of {model_name} has no chat template, which the chat probes need",
            "score a suite without chat probes (nl, en), or give the tokenizer a chat_template",
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )


def _choice_requests(tokenizer, item: ChoiceItem, model_name: str):
    from eval.scoring import encode_context_continuation

    if item.format == "chat":
        context = _chat_context(tokenizer, item.context, model_name)
        requests = []
        for choice in item.choices:
            ctx, cont = encode_context_continuation(
                tokenizer, context, item.delimiter + choice, bos=False
            )
            if not ctx or ctx[0] != tokenizer.bos_token_id:
                ctx = (tokenizer.bos_token_id, *ctx)
            requests.append((ctx, cont))
        return requests
    return [
        encode_context_continuation(tokenizer, item.context, item.delimiter + choice)
        for choice in item.choices
    ]


def _sentence_request(tokenizer, text: str):
    from eval.scoring import encode_context_continuation

    return encode_context_continuation(tokenizer, "", text)


def _languages(texts: list[str]) -> list[str]:
    """ISO 639-1 code of each text by py3langid's bundled model ("" for an empty text)."""
    import py3langid

    return [py3langid.classify(t)[0] if t.strip() else "" for t in texts]


def _aggregate(probes: list[Probe], metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    scores: dict[str, float | None] = {}
    used: dict[str, dict[str, float]] = {"nl": {}, "en": {}}
    for lang in ("nl", "en"):
        total = weight_sum = 0.0
        for probe in probes:
            metric = probe.primary or PRIMARY_METRIC.get(probe.kind)
            if probe.lang != lang or metric is None:
                continue
            weight = WEIGHTS.get(probe.name, DEFAULT_WEIGHT)
            total += weight * metrics[probe.name][metric]
            weight_sum += weight
            used[lang][probe.name] = weight
        scores[lang] = _r(total / weight_sum) if weight_sum else None
    return {
        "dutch_score": scores["nl"],
        "english_score": scores["en"],
        "weights": {"dutch": used["nl"], "english": used["en"]},
    }


@dataclass
class PreparedSuite:
    """A suite encoded once for one tokenizer and context length, to score many models with.

    Every log-likelihood request of every probe, which requests belong to which item, and the
    laid-out batches of the last model scored (``eval.scoring.LoglikelihoodPlan``), which the
    next model reuses when it takes the same layout. A sweep scores every variant of one
    resident model this way: the suite is tokenised and batched once per study, not per variant.
    Scores are those of ``score_model`` without it.
    """

    suite: str
    probes: list[Probe]
    tokenizer: Any
    max_length: int
    requests: list[tuple[tuple[int, ...], tuple[int, ...]]]
    spans: dict[str, list[tuple[int, int]]]  # probe -> [(first request, count)] per item
    extra: dict[str, list[int]]  # text probes: utf-8 bytes per item
    seconds: float
    plan: Any = None

    def plan_for(self, model, batch_size: int):
        """The batches for ``model``: the last ones when they fit it, else laid out anew."""
        from eval.scoring import plan_loglikelihoods

        if self.plan is None or not self.plan.fits(model, batch_size):
            self.plan = plan_loglikelihoods(model, self.requests, batch_size=batch_size)
        return self.plan


def prepare_suite(
    model,
    tokenizer,
    suite: str = "nl",
    *,
    name: str = "<in-memory>",
    probes: list[Probe] | None = None,
) -> PreparedSuite:
    """Encode ``suite`` for ``tokenizer`` and ``model``'s context length (see ``PreparedSuite``)."""
    from eval.scoring import rolling_requests

    if tokenizer is None:
        raise EvalError(f"{name} has no tokenizer", "pass the tokenizer the model was trained with")
    probes = load_suite(suite) if probes is None else probes
    if not probes:
        raise EvalError(f"suite {suite!r} has no probes", "add probe files to the suite")
    bos = tokenizer.bos_token_id
    if bos is None:
        raise EvalError(f"the tokenizer of {name} has no BOS token", "use a Mistral tokenizer")
    start = time.perf_counter()
    requests: list = []
    too_long: list[str] = []
    spans: dict[str, list[tuple[int, int]]] = {}
    extra: dict[str, list[int]] = {}
    max_length = _max_length(model)
    for probe in probes:
        item_spans = []
        for item in probe.items:
            first = len(requests)
            if isinstance(item, ChoiceItem):
                requests.extend(_choice_requests(tokenizer, item, name))
            elif isinstance(item, PairItem):
                requests.append(_sentence_request(tokenizer, item.good))
                requests.append(_sentence_request(tokenizer, item.bad))
            elif isinstance(item, TextItem):
                ids = tokenizer(item.text, add_special_tokens=False)["input_ids"]
                requests.extend(rolling_requests(ids, bos, max_length))
                extra.setdefault(probe.name, []).append(len(item.text.encode("utf-8")))
            else:
                continue
            item_spans.append((first, len(requests) - first))
            if any(len(c) + len(x) - 1 > max_length for c, x in requests[first:]):
                too_long.append(f"{probe.name}:{item.id}")
        spans[probe.name] = item_spans
    if too_long:
        raise EvalError(
            f"{len(too_long)} probe items do not fit the model's {max_length} positions "
            f"({', '.join(too_long[:3])})",
            "shorten the items or score a model with a longer context",
        )
    seconds = time.perf_counter() - start
    return PreparedSuite(suite, probes, tokenizer, max_length, requests, spans, extra, seconds)


def score_model(
    model,
    tokenizer,
    suite: str = "nl",
    *,
    name: str = "<in-memory>",
    device=None,
    batch_size: int = 16,
    progress: bool = False,
    probes: list[Probe] | None = None,
    prepared: PreparedSuite | None = None,
) -> dict[str, Any]:
    """Score a causal LM already in memory on ``suite``; returns the scorecard dict.

    ``device`` moves the model first (None: leave it where it is). ``probes`` overrides the
    suite's probe list (already loaded probes; the sweep can load them once). ``prepared``
    (from ``prepare_suite`` with this tokenizer) skips encoding the suite and reuses its
    batches; the scorecard's ``seconds`` then leave that one-time work out.
    """
    import torch

    from eval.scoring import cpu_threads_for, greedy_continuations, perplexity_metrics, run_plan

    if batch_size < 1:
        raise EvalError(f"batch_size must be at least 1, got {batch_size}", "use --batch-size 16")
    if tokenizer is None:
        raise EvalError(f"{name} has no tokenizer", "pass the tokenizer the model was trained with")
    if prepared is not None:
        if prepared.suite != suite:
            raise EvalError(
                f"the prepared suite is {prepared.suite!r}, not {suite!r}",
                "prepare_suite with the suite you score",
            )
        if prepared.tokenizer is not tokenizer:
            raise EvalError(
                f"the prepared suite {suite!r} was encoded with another tokenizer",
                "prepare_suite with the tokenizer you score with",
            )
        if prepared.max_length != _max_length(model):
            raise EvalError(
                f"the prepared suite was encoded for {prepared.max_length} positions, "
                f"{name} has {_max_length(model)}",
                "prepare_suite with the model you score",
            )
    if device is not None:
        model.to(device)
    was_training = model.training
    model.eval()

    # 1. Every log-likelihood request of every probe, scored in one batched pass.
    start = time.perf_counter()
    if prepared is None:
        prepared = prepare_suite(model, tokenizer, suite, name=name, probes=probes)
    probes = prepared.probes
    requests, spans, extra = prepared.requests, prepared.spans, prepared.extra
    n_items = sum(len(p.items) for p in probes)

    gen_probes = [p for p in probes if p.kind == "generate"]
    n_gen = sum(len(p.items) for p in gen_probes)
    bar, advance = _progress(progress, len(requests) + n_gen, name)
    try:
        with bar, cpu_threads_for(model):
            plan = prepared.plan_for(model, batch_size)
            results = run_plan(model, plan, on_batch=advance)
            # 2. Greedy continuations for the language-consistency probes.
            continuations: dict[str, list[str]] = {}
            for probe in gen_probes:
                prompts = [item.prompt for item in probe.items]  # type: ignore[attr-defined]
                continuations[probe.name] = greedy_continuations(
                    model,
                    tokenizer,
                    prompts,
                    max_new_tokens=MAX_NEW_TOKENS,
                    batch_size=batch_size,
                    on_batch=advance,
                )
    except torch.OutOfMemoryError as exc:
        raise EvalError(
            f"out of memory while scoring {name} with batch size {batch_size}",
            "lower --batch-size",
        ) from exc
    finally:
        if was_training:
            model.train()

    # 3. Metrics per probe.
    metrics: dict[str, dict[str, Any]] = {}
    for probe in probes:
        if probe.kind == "choice":
            acc = acc_norm = 0
            answer_logprob = 0.0  # per token, summed over items
            for item, (first, count) in zip(probe.items, spans[probe.name], strict=True):
                lls = [r.logprob for r in results[first : first + count]]
                assert isinstance(item, ChoiceItem)
                right = results[first + item.answer]
                answer_logprob += right.logprob / right.tokens
                lengths = [len((item.delimiter + c).encode("utf-8")) for c in item.choices]
                acc += _argmax(lls) == item.answer
                acc_norm += _argmax([ll / n for ll, n in zip(lls, lengths, strict=True)]) == (
                    item.answer
                )
            n = len(probe.items)
            metrics[probe.name] = {
                "acc": _r(acc / n),
                "acc_norm": _r(acc_norm / n),
                # 1 / perplexity of the correct answers (log loss, a proper scoring rule)
                "answer_prob": _r(math.exp(answer_logprob / n)),
                "n": n,
            }
        elif probe.kind == "pair":
            right = sum(
                results[first].logprob > results[first + 1].logprob
                for first, _ in spans[probe.name]
            )
            n = len(probe.items)
            metrics[probe.name] = {"acc": _r(right / n), "n": n}
        elif probe.kind == "text":
            logprob = sum(
                r.logprob for first, c in spans[probe.name] for r in results[first : first + c]
            )
            tokens = sum(
                r.tokens for first, c in spans[probe.name] for r in results[first : first + c]
            )
            ppl = perplexity_metrics(logprob, tokens, sum(extra[probe.name]))
            metrics[probe.name] = {
                "ppl": _r(ppl["ppl"]),
                "bits_per_byte": _r(ppl["bits_per_byte"]),
                "tokens": tokens,
                "n": len(probe.items),
            }
        elif probe.kind == "generate":
            langs = {item.lang for item in probe.items}  # type: ignore[attr-defined]
            texts = continuations[probe.name]
            found = _languages(texts)
            right = sum(
                f == item.lang  # type: ignore[attr-defined]
                for item, f in zip(probe.items, found, strict=True)
            )
            metrics[probe.name] = {
                "lang_share": _r(right / len(texts)),
                "lang": ",".join(sorted(langs)),
                "n": len(texts),
                "examples": texts[:3],
            }
    seconds = time.perf_counter() - start
    param = next(model.parameters())
    return {
        "model": name,
        "suite": suite,
        "kruising_version": _version(),
        "device": str(param.device),
        "dtype": str(param.dtype).removeprefix("torch."),
        "probes": metrics,
        **_aggregate(probes, metrics),
        "items": n_items,
        "seconds": round(seconds, 3),
        "items_per_second": round(n_items / seconds, 2) if seconds > 0 else None,
    }


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _progress(enabled: bool, total: int, name: str) -> tuple[Any, Callable[[int], None]]:
    import contextlib

    if not enabled:
        return contextlib.nullcontext(), lambda n: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from kruising.console import console

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    task = bar.add_task(f"scoring {name}", total=total)
    return bar, lambda n: bar.advance(task, n)


def resolve_model_path(ref: str) -> Path:
    """A local folder as is; a Hub id ``org/name[@revision]`` from the cache or the Hub."""
    from kruising.hub import resolve_model

    path = resolve_model(ref, error=EvalError)
    if path is None:
        raise EvalError(
            f"no model folder at {ref}", "give a checkpoint folder or a Hub id org/name"
        )
    return path


def load_model(ref: str, device: str = "auto"):
    """(model, tokenizer, device) for a folder or Hub id; bf16 on GPU, float32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device, error=EvalError)
    path = resolve_model_path(ref)
    if not (path / "config.json").is_file():
        raise EvalError(f"{ref} has no config.json", "give a save_pretrained checkpoint folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - transformers raises many types here
        raise EvalError(
            f"{ref} has no loadable tokenizer ({type(exc).__name__})",
            "save the tokenizer into the folder (tokenizer.save_pretrained) or set tokenizer_source in the recipe",
        ) from exc
    if not hasattr(tokenizer, "bos_token_id") or isinstance(tokenizer, bool):
        raise EvalError(f"{ref} has no tokenizer", "save the tokenizer into the folder")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise EvalError(
            f"cannot load {ref} as a causal LM: {exc}".splitlines()[0],
            "check that the folder loads with AutoModelForCausalLM.from_pretrained",
        ) from exc
    model.to(dev)
    return model, tokenizer, dev


def score_path(
    path_or_hub_id: str,
    suite: str = "nl",
    *,
    device: str = "auto",
    batch_size: int = 16,
    progress: bool = False,
    lm_eval_tasks: list[str] | None = None,
    lm_eval_limit: int | None = None,
) -> dict[str, Any]:
    """Load a checkpoint folder or Hub id and score it; the scorecard names the model by its ref.

    ``lm_eval_tasks`` also runs lm-evaluation-harness on the loaded model and stores its numbers
    under ``lm_eval``.
    """
    probes = load_suite(suite)  # a bad suite fails before a model is loaded
    if lm_eval_tasks:
        from eval.harness import require_lm_eval

        require_lm_eval()  # and a missing extra before one is
    model, tokenizer, _ = load_model(path_or_hub_id, device)
    card = score_model(
        model,
        tokenizer,
        suite,
        name=str(path_or_hub_id),
        batch_size=batch_size,
        progress=progress,
        probes=probes,
    )
    if lm_eval_tasks:
        from eval.harness import run_lm_eval

        card["lm_eval"] = run_lm_eval(
            model, tokenizer, lm_eval_tasks, batch_size=batch_size, limit=lm_eval_limit
        )
    return card
