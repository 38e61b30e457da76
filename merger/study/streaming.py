"""The streaming runner: one pass over the shards per batch of K variants, for inputs that do
not fit in memory."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from pydantic import ValidationError

from kruising.console import console
from kruising.errors import KruisingError
from merger.study.evaluator import InMemoryEvaluator, VariantFailed
from merger.study.paths import recipe_yaml, variant_recipe
from merger.study.spec import SweepSpec, suggest
from merger.study.storage import store_result


def run_streaming(spec: SweepSpec, recipe, study, remaining: int, device: str, progress: bool):
    """One pass over the shards per batch of K variants, for inputs that do not fit in memory."""
    from merger.core.engine import merge_variants_streaming

    evaluator = InMemoryEvaluator(recipe, spec.suite, device, resident=False)
    host, pid = socket.gethostname(), os.getpid()
    while remaining > 0:
        k = min(spec.batch, remaining)
        if spec.sampler == "grid":
            _queue_grid(study, spec, k)
        trials, variants = [], []
        for _ in range(k):
            trial = study.ask()
            trial.set_user_attr("host", host)
            trial.set_user_attr("pid", pid)
            params = suggest(trial, spec)
            try:
                variant = variant_recipe(recipe, params)
            except (KruisingError, KeyError, ValueError, ValidationError) as exc:
                _tell_failed(study, trial, str(getattr(exc, "message", exc)))
                continue
            trial.set_user_attr("recipe", recipe_yaml(variant))
            trials.append(trial)
            variants.append(variant)
        remaining -= k
        if not variants:
            continue
        start = time.perf_counter()
        states: list[dict[str, Any]] = [{} for _ in variants]
        for name, tensors in merge_variants_streaming(variants, device=device):
            for state, tensor in zip(states, tensors, strict=True):
                state[name] = tensor.to("cpu")
        merge_seconds = (time.perf_counter() - start) / len(variants)
        for trial, variant, state in zip(trials, variants, states, strict=True):
            t0 = time.perf_counter()
            try:
                evaluator.load_weights(state)
                card = evaluator.score(variant.merge_method)
                card["merge_seconds"] = round(merge_seconds, 3)
                values = spec.values(card)
            except (VariantFailed, KruisingError, ValueError) as exc:
                _tell_failed(study, trial, str(getattr(exc, "message", exc)))
                continue
            store_result(trial, card, merge_seconds + time.perf_counter() - t0)
            study.tell(trial, values)
        if progress:
            console.print(f"  batch of {len(variants)} variants merged in one pass")
    return study


def _queue_grid(study, spec: SweepSpec, k: int) -> None:
    """Queue up to ``k`` grid points no trial has taken yet (the streaming runner's grid)."""
    import itertools

    from optuna.trial import TrialState

    paths = list(spec.search)
    taken = {
        tuple(t.params.get(p, t.system_attrs.get("fixed_params", {}).get(p)) for p in paths)
        for t in study.get_trials(deepcopy=False)
        if not (t.state == TrialState.FAIL and t.user_attrs.get("stale"))
    }
    for point in itertools.product(*(spec.search[p].grid() for p in paths)):
        if k == 0:
            return
        if point not in taken:
            study.enqueue_trial(dict(zip(paths, point, strict=True)))
            k -= 1


def _tell_failed(study, trial, reason: str) -> None:
    from optuna.trial import TrialState

    trial.set_user_attr("fail_reason", reason.splitlines()[0][:500])
    study.tell(trial, state=TrialState.FAIL)
