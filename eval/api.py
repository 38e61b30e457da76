"""Score a model on a suite and return its scorecard (a plain, JSON-ready dict).

``score_model`` takes a model and tokenizer already in memory (the sweep merges in memory and
calls it for every variant); ``score_path`` loads a checkpoint folder or Hub id first.

Scorecard::

    {"model": ..., "suite": ..., "kruising_version": ..., "device": ..., "dtype": ...,
     "probes": {name: {metric: value, metric_se: standard error, ..., "n": items}},
     "subscores": {"cultuur_diep": {...}, "grammatica_dt": {...}, ...},  # by tag / phenomenon
     "dutch_score": float | None, "dutch_score_se": ..., "dutch_score_ci": [lo, hi],
     "english_score": ..., "english_score_se": ..., "english_score_ci": [lo, hi],
     "weights": {...}, "items": int,
     "per_item": {name: {"ids": [...], field: [one value per item], ...}},
     "seconds": float, "items_per_second": float}

Standard errors, intervals and paired comparisons come from ``per_item`` (eval/stats.py): a mean
of per-item values has its analytic standard error, the rest (answer_prob, perplexity, the
language scores' 95% intervals) a seeded bootstrap over items. Metric values are rounded to 6
significant digits, so the same model and suite give the same scorecard
(leave ``seconds`` and ``items_per_second`` out of any comparison).
"""

from __future__ import annotations

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


# A chat-form generate item for a tokenizer without a chat template (a base model) is asked in
# this plain form instead; the scorecard counts such items (``chat_fallback``).
CHAT_FALLBACK = "Vraag: {prompt}\nAntwoord:"


def _generate_prompt(tokenizer, item, model_name: str) -> str:
    """The text a generate item continues: the prompt, or the chat-wrapped user message."""
    if item.format != "chat":
        return item.prompt
    if not getattr(tokenizer, "chat_template", None):
        return CHAT_FALLBACK.format(prompt=item.prompt)
    text = _chat_context(tokenizer, item.prompt, model_name)
    bos = tokenizer.bos_token or ""
    # greedy_continuations puts BOS in front itself
    return text[len(bos) :] if bos and text.startswith(bos) else text


def _sentence_request(tokenizer, text: str):
    from eval.scoring import encode_context_continuation

    return encode_context_continuation(tokenizer, "", text)


def _languages(texts: list[str]) -> list[str]:
    """ISO 639-1 code of each text by py3langid's bundled model ("" for an empty text)."""
    import py3langid

    return [py3langid.classify(t)[0] if t.strip() else "" for t in texts]


def _probe_metrics(probe: Probe, items: dict[str, list]) -> dict[str, Any]:
    from eval.stats import metrics

    return metrics(probe.name, probe.kind, {k: v for k, v in items.items() if k != "ids"})


def _subset(items: dict[str, list], keep: list[int]) -> dict[str, list]:
    return {k: [v[i] for i in keep] for k, v in items.items()}


def _subscores(probes: list[Probe], per_item: dict[str, dict[str, list]]) -> dict[str, Any]:
    """``{probe}_{tag}`` (and ``{probe}_{phenomenon}`` for pairs): the probe's metrics on those items.

    Reported beside the probes, never weighted into the language scores.
    """
    out: dict[str, Any] = {}
    for probe in probes:
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(probe.items):
            labels = list(item.tags)
            if isinstance(item, PairItem) and item.phenomenon:
                labels.append(item.phenomenon)
            for label in labels:
                groups.setdefault(label, []).append(i)
        for label, keep in sorted(groups.items()):
            name = f"{probe.name}_{label}"
            items = _subset(per_item[probe.name], keep)
            sub = Probe(name, probe.kind, probe.lang, (), probe.source, probe.primary)
            out[name] = _probe_metrics(sub, items)
    return out


def score_probes(probes: list[Probe], lang: str) -> list[tuple[str, str, str, float]]:
    """(probe, kind, primary metric, weight) of every probe that enters ``lang``'s score."""
    rows = []
    for probe in probes:
        metric = probe.primary or PRIMARY_METRIC.get(probe.kind)
        if probe.lang != lang or metric is None:
            continue
        rows.append((probe.name, probe.kind, metric, WEIGHTS.get(probe.name, DEFAULT_WEIGHT)))
    return rows


def _aggregate(probes: list[Probe], per_item: dict[str, dict[str, list]]) -> dict[str, Any]:
    from eval.stats import score_interval

    out: dict[str, Any] = {}
    used: dict[str, dict[str, float]] = {}
    for lang, key in (("nl", "dutch"), ("en", "english")):
        rows = score_probes(probes, lang)
        used[key] = {name: weight for name, _, _, weight in rows}
        if rows:
            interval = score_interval(rows, per_item)
            out[f"{key}_score"] = interval["value"]
            out[f"{key}_score_se"] = interval["se"]
            out[f"{key}_score_ci"] = interval["ci"]
        else:
            out[f"{key}_score"] = out[f"{key}_score_se"] = out[f"{key}_score_ci"] = None
    out["weights"] = used
    return out


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
    from pretrain.perplexity import text_tokens

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
                ids = text_tokens(tokenizer, item.text)  # pretrain.perplexity's definition
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

    from eval.scoring import cpu_threads_for, greedy_continuations, run_plan

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
            results = run_plan(model, plan, on_batch=advance, greedy=False)
            # 2. Greedy continuations for the language-consistency probes.
            continuations: dict[str, list[str]] = {}
            for probe in gen_probes:
                prompts = [_generate_prompt(tokenizer, item, name) for item in probe.items]
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

    # 3. Per-item results, then each probe's metrics with standard errors (eval.stats).
    per_item: dict[str, dict[str, list]] = {}
    examples: dict[str, list[str]] = {}
    for probe in probes:
        item_spans = spans.get(probe.name, [])
        if probe.kind == "choice":
            rows: dict[str, list] = {"acc": [], "acc_norm": [], "answer_logprob": []}
            for item, (first, count) in zip(probe.items, item_spans, strict=True):
                assert isinstance(item, ChoiceItem)
                lls = [r.logprob for r in results[first : first + count]]
                right = results[first + item.answer]
                lengths = [len((item.delimiter + c).encode("utf-8")) for c in item.choices]
                norm = [ll / n for ll, n in zip(lls, lengths, strict=True)]
                rows["acc"].append(int(_argmax(lls) == item.answer))
                rows["acc_norm"].append(int(_argmax(norm) == item.answer))
                rows["answer_logprob"].append(right.logprob / right.tokens)
        elif probe.kind == "pair":
            rows = {
                "acc": [
                    int(results[first].logprob > results[first + 1].logprob)
                    for first, _ in item_spans
                ]
            }
        elif probe.kind == "text":
            rows = {"logprob": [], "tokens": [], "bytes": []}
            for (first, count), n_bytes in zip(item_spans, extra[probe.name], strict=True):
                chunk = results[first : first + count]
                rows["logprob"].append(sum(r.logprob for r in chunk))
                rows["tokens"].append(sum(r.tokens for r in chunk))
                rows["bytes"].append(n_bytes)
        elif probe.kind == "generate":
            texts = continuations[probe.name]
            found = _languages(texts)
            rows = {
                "lang_share": [
                    int(f == item.lang)  # type: ignore[attr-defined]
                    for item, f in zip(probe.items, found, strict=True)
                ]
            }
            examples[probe.name] = texts[:3]
        else:  # pragma: no cover - the schema knows no other kind
            continue
        per_item[probe.name] = {"ids": [item.id for item in probe.items], **rows}
    metrics = {p.name: _probe_metrics(p, per_item[p.name]) for p in probes}
    for probe in probes:
        if probe.kind == "text":
            metrics[probe.name]["tokens"] = int(sum(per_item[probe.name]["tokens"]))
        elif probe.kind == "generate":
            langs = {item.lang for item in probe.items}  # type: ignore[attr-defined]
            metrics[probe.name]["lang"] = ",".join(sorted(langs))
            metrics[probe.name]["examples"] = examples[probe.name]
            fallback = (
                sum(getattr(item, "format", "plain") == "chat" for item in probe.items)
                if not getattr(tokenizer, "chat_template", None)
                else 0
            )
            if fallback:
                metrics[probe.name]["chat_fallback"] = fallback
    seconds = time.perf_counter() - start
    param = next(model.parameters())
    return {
        "model": name,
        "suite": suite,
        "kruising_version": _version(),
        "device": str(param.device),
        "dtype": str(param.dtype).removeprefix("torch."),
        "probes": metrics,
        "subscores": _subscores(probes, per_item),
        **_aggregate(probes, per_item),
        "items": n_items,
        "per_item": per_item,
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
