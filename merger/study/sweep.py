"""Running a sweep: a base recipe, a search space over it, an optuna study that ranks variants.

`run_sweep` is the whole run, top to bottom; the pieces live next to it:

- `merger.study.spec`: the sweep spec (YAML, strict) and its search ranges;
- `merger.study.paths`: the recipe path language (``models[1].parameters.t[mlp].0``) and the
  variant recipes it makes;
- `merger.study.validate`: every problem of the search space, before anything is merged;
- `merger.study.storage`: the optuna storage and study, results, recovery after a kill;
- `merger.study.evaluator`: merging a variant in memory and scoring it;
- `merger.study.streaming`: the runner for inputs that do not fit in memory.

Each trial builds the variant recipe, merges it in memory (inputs loaded once, a resident model
whose weights are replaced), scores it with ``eval.api.score_model`` and stores params, scores,
seconds and the variant recipe in the study. A variant that fails (NaN, a merge or recipe
error) is recorded FAILED with its reason; the sweep goes on. Any other exception is a bug: it
stops the sweep with its traceback. Rerunning a killed sweep continues it: trials left RUNNING
by a dead worker are failed and their variant is queued again.
"""

from __future__ import annotations

import math
import os
import socket
import time
from typing import Any

from pydantic import ValidationError
from rich.markup import escape

from kruising.console import console
from kruising.errors import KruisingError
from merger.study.evaluator import Evaluator, InMemoryEvaluator, VariantFailed
from merger.study.notes import describe, fixed_values, labels, tensor_names
from merger.study.paths import dump_recipe, recipe_yaml, short, variant_recipe
from merger.study.spec import DEFAULT_STORAGE, SweepSpec, suggest
from merger.study.storage import (
    check_url,
    check_writable,
    finished,
    open_storage,
    open_study,
    recover,
    requeue_interrupted,
    store_result,
)
from merger.study.streaming import run_streaming
from merger.study.validate import validate
from merger.study.workers import ClaimLock, claim_lock, work


def run_sweep(
    spec: SweepSpec,
    recipe,
    *,
    storage: str | None = None,
    trials: int | None = None,
    evaluator: Evaluator | None = None,
    device: str = "auto",
    progress: bool = True,
):
    """Run (or continue) the sweep until ``trials`` variants have a result; returns the study."""
    import optuna

    validate(spec, recipe)
    url = storage or spec.storage or DEFAULT_STORAGE
    check_url(url)
    check_writable(url)
    resident = spec.mode == "resident"
    # Several workers may share the study (merger.study.workers): opening it, recovering dead
    # workers' variants and claiming a variant happen under the storage's claim lock.
    claim = claim_lock(url) if resident else ClaimLock()
    with claim:
        store = open_storage(url, heartbeat=resident)
        study = open_study(spec, store, recipe_yaml(recipe))
        requeued = recover(study, store)
        done = finished(study)
    target = trials or spec.trials
    grids = [r.grid() for r in spec.search.values()]
    if all(g is not None for g in grids):  # a discrete space holds this many variants at most
        target = min(target, math.prod(len(g) for g in grids))
    remaining = max(0, target - done)
    fixed = _fixed_values(spec, recipe, study)
    names = labels(list(spec.search), dump_recipe(recipe))  # weight of nl, not models[0]...
    if progress:
        console.print(
            f"sweep [bold]{spec.name}[/]: {len(spec.search)} parameters, sampler {spec.sampler}, "
            f"objectives {', '.join(spec.objective_names())}, suite {spec.suite}; "
            f"{done} of {target} variants done"
            + (f", {len(requeued)} interrupted requeued" if requeued else "")
        )
        for note in fixed:
            console.print(escape(f"  note: {describe(note)}"), style="yellow")
    if remaining == 0:
        return study
    if evaluator is None:
        if spec.mode == "streaming":
            return run_streaming(spec, recipe, study, remaining, device, progress)
        evaluator = InMemoryEvaluator(recipe, spec.suite, device=device)

    host, pid = socket.gethostname(), os.getpid()
    current = [-1]  # the trial this worker runs

    def objective(trial: optuna.Trial) -> list[float]:
        current[0] = trial.number
        try:  # called with the claim lock held (workers.work): the variant is ours once
            trial.set_user_attr("host", host)  # its params are stored and no other trial,
            trial.set_user_attr("pid", pid)  # running, queued or finished, has them
            params = suggest(trial, spec)
            twin = _twin(study, trial.number, params)
        finally:
            claim.release()
        if twin is not None:  # samplers repeat points of discrete spaces: don't merge twice
            skipped[0] += 1
            trial.set_user_attr("duplicate_of", twin)
            if progress:
                console.print(
                    f"  trial {trial.number}: same variant as trial {twin}, skipped "
                    "(the sampler proposed it again)",
                    style="dim",
                )
            raise optuna.TrialPruned(f"same variant as trial {twin}")
        start = time.perf_counter()
        try:
            variant = variant_recipe(recipe, params)
            trial.set_user_attr("recipe", recipe_yaml(variant))
            card = evaluator(variant)
            values = spec.values(card)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (kruising's Interrupted is one)
            trial.set_user_attr("fail_reason", "interrupted")
            trial.set_user_attr("stale", True)  # not the variant's fault: rerun it
            raise
        except (VariantFailed, KruisingError, ValueError, ValidationError) as exc:
            reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            trial.set_user_attr("fail_reason", reason.splitlines()[0][:500])
            trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))
            if progress:
                why = escape(reason.splitlines()[0])
                console.print(f"  trial {trial.number}: [red]failed[/] ({why})")
            raise VariantFailed(reason) from exc
        store_result(trial, card, time.perf_counter() - start)
        if progress:
            shown = escape(
                ", ".join(f"{names.get(k, short(k))}={_show(v)}" for k, v in params.items())
            )
            scores = "  ".join(
                f"{n} {v:.4f}" for n, v in zip(spec.objective_names(), values, strict=True)
            )
            console.print(f"  trial {trial.number}: {shown}  {scores}")
        return values

    skipped = [0]

    def run_one() -> bool:
        current[0] = -1
        try:
            study.optimize(objective, n_trials=1, catch=(VariantFailed,))
        except Exception:
            # this worker went silent longer than the grace period (a stalled machine or
            # storage): another worker failed its variant and queued it again, so optuna
            # cannot store our result (UpdateFinishedTrialError, "Cannot tell a FAIL trial")
            claim.release()
            if not _taken_over(study, current[0]):
                raise
            if progress:
                console.print(
                    "  a variant of this worker was taken over by another (no heartbeat for "
                    "the grace period); its result is dropped",
                    style="yellow",
                )
        return skipped[0] <= 4 * target + 8  # room for repeated points of a discrete space

    try:
        work(study, target, claim, run_one, progress=progress)
    except KeyboardInterrupt:
        requeue_interrupted(study)  # another worker on the study may take it now
        raise
    return study


def _fixed_values(spec: SweepSpec, recipe, study) -> list[dict[str, Any]]:
    """Entries of a filtered parameter the search leaves at the recipe's value (stored once in
    the study, with the tensors they set, for `merge rank` and the demo report)."""
    if "fixed" in study.user_attrs:
        return study.user_attrs["fixed"]
    refs = recipe.referenced_models()  # the base first
    names = tensor_names(refs[0]) if refs else None
    fixed = fixed_values(list(spec.search), dump_recipe(recipe), names)
    study.set_user_attr("fixed", fixed)
    return fixed


def _twin(study, number: int, params: dict[str, Any]) -> int | None:
    """Another trial with these exact params: running or queued (another worker has it), complete,
    or failed for its own reason. A dead worker's trial is no twin: its retry is."""
    from optuna.trial import TrialState

    for other in study.get_trials(deepcopy=False):
        if other.number == number or other.params != params:
            continue
        own_failure = "fail_reason" in other.user_attrs and not other.user_attrs.get("stale")
        if other.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING) or (
            other.state == TrialState.FAIL and own_failure
        ):
            return other.number
    return None


def _taken_over(study, number: int) -> bool:
    """Whether trial ``number`` was failed by another worker and queued again."""
    trials = study.get_trials(deepcopy=False)
    return 0 <= number < len(trials) and any(t.user_attrs.get("retry_of") == number for t in trials)


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
