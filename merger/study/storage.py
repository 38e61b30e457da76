"""A sweep's optuna study: the storage, creating or continuing the study, and recovery.

Rerunning a killed sweep continues it: trials left RUNNING by a dead worker on this host (its
pid is gone) are failed and their variant is queued again; workers on other hosts are caught
by the heartbeat. Only optuna's public API is used.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any

from kruising.errors import KruisingError
from merger.study.spec import DEFAULT_STORAGE, Scorecard, SweepSpec

HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 60


# --- storage and study ------------------------------------------------------------------------


def open_storage(url: str | None, *, heartbeat: bool = True):
    """An optuna storage for ``url`` (default: SQLite file in the current folder)."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    url = url or DEFAULT_STORAGE
    if "://" not in url:
        raise KruisingError(
            f"storage {url!r} is not a database URL",
            "use sqlite:///studies.db, postgresql://user@host/db or another optuna storage URL",
        )
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        folder = Path(url.removeprefix("sqlite:///")).expanduser().parent
        if not folder.is_dir():
            raise KruisingError(
                f"cannot open storage {url}: folder {folder} does not exist",
                "create the folder or give another sqlite:/// path",
            )
    try:
        with warnings.catch_warnings():  # heartbeat settings are an experimental optuna API
            warnings.filterwarnings("ignore", category=ExperimentalWarning)
            if (
                url.startswith(("sqlite", "postgresql", "mysql", "oracle", "mssql"))
                or "+" in (url.split("://")[0])
            ):
                kwargs: dict[str, Any] = {}
                if heartbeat:
                    kwargs = dict(
                        heartbeat_interval=HEARTBEAT_SECONDS,
                        grace_period=GRACE_SECONDS,
                        heartbeat_stale_trial_callback=_requeue_stale,
                    )
                return optuna.storages.RDBStorage(url, **kwargs)
            return optuna.storages.get_storage(url)
    except Exception as exc:  # noqa: BLE001 - drivers raise many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KruisingError(
            f"cannot open storage {url}: {reason}",
            "check the URL, that the server is up and its driver installed (psycopg2 for "
            "postgresql)",
        ) from None


def _requeue_stale(study, trial) -> None:
    """Heartbeat-stale trial (a worker died elsewhere): queue its variant again."""
    if trial.params:
        study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})


def _sampler(spec: SweepSpec):
    import optuna

    if spec.sampler == "grid" and spec.mode == "streaming":
        # ask/tell outside study.optimize: GridSampler's stop() would raise; the streaming
        # runner queues the grid points itself (`_queue_grid`).
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler(
            {path: rng.grid() for path, rng in spec.search.items()}, seed=spec.seed
        )
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=spec.seed, warn_independent_sampling=False)
    n = min(10, max(2, spec.trials // 3))
    return optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=n)


def _fingerprint(spec: SweepSpec) -> str:
    """What a resumed sweep must share with the study it continues."""
    keep = {
        "search": {p: r.model_dump() for p, r in spec.search.items()},
        "objectives": spec.objectives,
        "suite": spec.suite,
    }
    return json.dumps(keep, sort_keys=True)


def open_study(spec: SweepSpec, storage, recipe_text: str):
    """Create the study, or load it when it exists and was made from the same search."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["maximize"] * len(spec.objective_names())
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        sampler=_sampler(spec),
        directions=directions,
        load_if_exists=True,
    )
    known = study.user_attrs.get("kruising_spec")
    if known is None:
        study.set_user_attr("kruising_spec", _fingerprint(spec))
        study.set_user_attr("objectives", spec.objective_names())
        study.set_user_attr("search", list(spec.search))
        study.set_user_attr("suite", spec.suite)
        study.set_user_attr("recipe", recipe_text)
    elif known != _fingerprint(spec):
        raise KruisingError(
            f"study {spec.name} exists with another search space, objectives or suite",
            "give the sweep a new name:, or rank the old study with `merge rank`",
        )
    return study


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(study, storage) -> list[int]:
    """Fail trials left RUNNING by a dead worker on this host and queue their variants again.

    ``storage`` is the study's (`open_storage`); only optuna's public API is used.

    Workers on other hosts are caught by the heartbeat (``GRACE_SECONDS`` without one).
    Returns the numbers of the trials failed here.
    """
    from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    host = socket.gethostname()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if trial.user_attrs.get("host") != host or pid is None or _alive(int(pid)):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", f"worker {pid} died")
            storage.set_trial_user_attr(trial_id, "stale", True)
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                failed.append(trial.number)
                if trial.params:
                    study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
        except UpdateFinishedTrialError:  # another worker got there first
            continue
    with warnings.catch_warnings():  # heartbeat recovery is an experimental optuna API
        warnings.filterwarnings("ignore", category=ExperimentalWarning)
        fail_stale_trials(study)
    # Interrupted (Ctrl-C) variants failed without a retry: queue them once.
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for trial in trials:
        stale = trial.state == TrialState.FAIL and trial.user_attrs.get("stale")
        if stale and trial.params and trial.number not in retried:
            study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
    return failed


def finished(study) -> int:
    """Variants with a result: complete, or failed for a reason of their own (not a dead worker)."""
    from optuna.trial import TrialState

    count = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.COMPLETE:
            count += 1
        elif trial.state == TrialState.FAIL and "fail_reason" in trial.user_attrs:
            count += not trial.user_attrs.get("stale", False)
    return count


def store_result(trial, card: Scorecard, seconds: float) -> None:
    for score in ("dutch_score", "english_score"):
        for suffix in ("", "_se", "_ci"):
            trial.set_user_attr(score + suffix, card.get(score + suffix))
    # per-item results: the leaderboard's paired comparisons and stability need them
    trial.set_user_attr("per_item", card.get("per_item"))
    trial.set_user_attr("weights", card.get("weights"))
    trial.set_user_attr("seconds", round(seconds, 3))
    trial.set_user_attr("merge_seconds", card.get("merge_seconds"))
    trial.set_user_attr("score_seconds", card.get("seconds"))
    probes = {
        name: {k: v for k, v in metrics.items() if k != "examples"}
        for name, metrics in card.get("probes", {}).items()
    }
    trial.set_user_attr("probes", probes)
