"""A sweep's optuna study: the storage, creating or continuing the study, and recovery.

Rerunning a killed sweep continues it: trials left RUNNING by a dead worker on this host (its
pid is gone) are failed and their variant is queued again; workers on other hosts are caught
by optuna's heartbeat. Storages: any optuna RDB URL (``sqlite:///``, ``postgresql://``, ...)
and ``journal://PATH`` (optuna's JournalStorage on a file, for clusters without a database
server). optuna's public API is used, except for the journal's heartbeat, which implements
optuna's ``BaseHeartbeat`` interface (``optuna.storages._heartbeat``, not exported).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from kruising.errors import KruisingError
from merger.study.spec import DEFAULT_STORAGE, Scorecard, SweepSpec

#: optuna's heartbeat: a running variant records one every HEARTBEAT_SECONDS; one without a
#: heartbeat for GRACE_SECONDS is failed by another worker and queued again, once. Set them
#: with KRUISING_HEARTBEAT_SECONDS / KRUISING_GRACE_SECONDS (a worker's longest silence is a
#: slow storage, never a slow variant: the heartbeat runs in its own thread).
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 60
HEARTBEAT_ATTR = "kruising:heartbeat"


def _seconds(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise KruisingError(
            f"{name}={value!r} is not a whole number of seconds", f"unset it or use {default}"
        )
    return int(value)


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URL (None for other URLs and ``:memory:``)."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        return Path(url.removeprefix("sqlite:///")).expanduser()
    return None


def journal_path(url: str) -> Path | None:
    """The file of a ``journal://PATH`` URL: optuna's JournalStorage on a file (no database
    server; ``journal:///abs/studies.log`` or ``journal://studies.log``)."""
    if url.startswith("journal://"):
        return Path(url.removeprefix("journal://")).expanduser()
    return None


# --- storage and study ------------------------------------------------------------------------


def check_url(url: str) -> None:
    """Refuse, before anything is opened, a storage that is no URL or whose folder is missing."""
    if "://" not in url:
        raise KruisingError(
            f"storage {url!r} is not a database URL",
            "use sqlite:///studies.db, journal:///path/studies.log, postgresql://user@host/db "
            "or another optuna storage URL",
        )
    path = sqlite_path(url) or journal_path(url)
    if path is not None and not path.expanduser().parent.is_dir():
        raise KruisingError(
            f"cannot open storage {url}: folder {path.parent} does not exist",
            "create the folder or give another path",
        )


def check_writable(url: str) -> None:
    """Refuse, before anything is opened, a study file a sweep could not write to: a sweep
    records every variant (SQLite also needs its folder for the journal beside the file)."""
    import tempfile

    path = sqlite_path(url) or journal_path(url)
    if path is None:
        return
    path = path.expanduser()
    try:
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=".kruising-probe-")
        os.close(fd)
        os.unlink(probe)
        if path.exists():
            with open(path, "r+b"):
                pass
    except OSError as exc:
        where = path if path.exists() else path.parent
        raise KruisingError(
            f"storage {url} is read-only here ({exc.strerror}: {where}); a sweep writes each "
            "variant's result into it",
            "copy the study file to a folder you can write and pass --storage with its path "
            "(merge rank reads a read-only study where it is)",
        ) from None


def open_storage(url: str | None, *, heartbeat: bool = True):
    """An optuna storage for ``url`` (default: SQLite file in the current folder).

    ``heartbeat``: a worker's storage (running variants record heartbeats; stale ones are
    failed and queued again once). Reading (`merge rank`) needs none.
    """
    import optuna
    from optuna.exceptions import ExperimentalWarning

    url = url or DEFAULT_STORAGE
    check_url(url)
    beat: dict[str, Any] = {}
    if heartbeat:
        beat = dict(
            heartbeat_interval=_seconds("KRUISING_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS),
            grace_period=_seconds("KRUISING_GRACE_SECONDS", GRACE_SECONDS),
            heartbeat_stale_trial_callback=requeue,
        )
    try:
        with warnings.catch_warnings():  # heartbeat settings are an experimental optuna API
            warnings.filterwarnings("ignore", category=ExperimentalWarning)
            if journal_path(url) is not None:
                from optuna.storages.journal import JournalFileBackend

                backend = JournalFileBackend(str(journal_path(url)))
                if heartbeat:
                    return HeartbeatJournalStorage(backend, **beat)
                return optuna.storages.JournalStorage(backend)
            if (
                url.startswith(("sqlite", "postgresql", "mysql", "oracle", "mssql"))
                or "+" in (url.split("://")[0])
            ):
                engine: dict[str, Any] = {}
                if url.startswith("sqlite"):  # several worker processes on one file
                    engine = {"connect_args": {"timeout": 120}}
                return optuna.storages.RDBStorage(url, engine_kwargs=engine, **beat)
            return optuna.storages.get_storage(url)
    except Exception as exc:  # noqa: BLE001 - drivers raise many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KruisingError(
            f"cannot open storage {url}: {reason}",
            "check the URL, that the server is up and its driver installed (psycopg for "
            "postgresql: pip install -e '.[postgres]')",
        ) from None


@functools.cache
def _heartbeat_journal():
    """JournalStorage with optuna's heartbeat (optuna gives RDBStorage one, not the journal)."""
    import itertools
    import uuid

    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages import JournalStorage
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.trial import TrialState

    class Storage(JournalStorage, BaseHeartbeat):
        """Heartbeats are a counter in a trial system attribute. A trial is stale when its
        counter has not moved for ``grace_period`` seconds of this process's own clock, so
        no two hosts' clocks are compared."""

        def __init__(
            self, backend, *, heartbeat_interval, grace_period, heartbeat_stale_trial_callback
        ):
            super().__init__(backend)
            self._interval, self._grace = heartbeat_interval, grace_period
            self._callback = heartbeat_stale_trial_callback
            self._token = uuid.uuid4().hex[:8]
            self._count = itertools.count()
            self._seen: dict[int, tuple[Any, float]] = {}

        def record_heartbeat(self, trial_id: int) -> None:
            try:
                beat = f"{self._token}:{next(self._count)}"
                self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, beat)
            except UpdateFinishedTrialError:  # the variant finished meanwhile
                pass

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            now, stale = time.monotonic(), []
            for trial in self.get_all_trials(
                study_id, deepcopy=False, states=(TrialState.RUNNING,)
            ):
                beat = trial.system_attrs.get(HEARTBEAT_ATTR)
                seen = self._seen.get(trial._trial_id)
                if seen is None or seen[0] != beat:
                    self._seen[trial._trial_id] = (beat, now)
                elif now - seen[1] > self._grace:
                    stale.append(trial._trial_id)
            return stale

        def get_heartbeat_interval(self) -> int | None:
            return self._interval

        def get_heartbeat_stale_trial_callback(self):
            return self._callback

        get_failed_trial_callback = get_heartbeat_stale_trial_callback  # optuna < 5 asks this

    return Storage


def HeartbeatJournalStorage(backend, **beat):  # noqa: N802 - the class, made on first use
    return _heartbeat_journal()(backend, **beat)


def requeue(study, trial) -> None:
    """A variant whose worker died (heartbeat stale, or its pid gone): queue it again, once.

    optuna's RetryHeartbeatStaleTrialCallback(max_retry=1), with the dead worker's user
    attributes replaced by ``retry_of``; a retry that dies too is not queued a third time.
    """
    import copy

    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    if not trial.params:
        return
    retry = copy.deepcopy(trial)
    retry.user_attrs = {"retry_of": trial.number}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=1)(study, retry)


def fail_stale(study) -> None:
    """Fail the trials whose heartbeat stopped and queue their variants (see `requeue`)."""
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import fail_stale_trials

    with warnings.catch_warnings():  # heartbeat recovery is an experimental optuna API
        warnings.filterwarnings("ignore", category=ExperimentalWarning)
        fail_stale_trials(study)


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

    ``storage`` is the study's (`open_storage`); only optuna's public API is used. Workers on
    other hosts are caught by the heartbeat (``GRACE_SECONDS`` without one, `fail_stale`).
    Call it under the claim lock (merger.study.workers) when several workers share the study.
    Returns the numbers of the trials failed here.
    """
    from optuna.exceptions import UpdateFinishedTrialError
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
                requeue(study, storage.get_trial(trial_id))
        except UpdateFinishedTrialError:  # another worker got there first
            continue
    fail_stale(study)
    requeue_interrupted(study)
    return failed


def requeue_interrupted(study) -> None:
    """Variants failed as interrupted (Ctrl-C, SIGTERM) or by a dead worker, not yet queued
    again: queue them, once."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for trial in trials:
        stale = trial.state == TrialState.FAIL and trial.user_attrs.get("stale")
        if stale and trial.params and trial.number not in retried:
            requeue(study, trial)


def finished(study, trials=None) -> int:
    """Variants with a result: complete, or failed for a reason of their own (not a dead worker)."""
    from optuna.trial import TrialState

    count = 0
    for trial in study.get_trials(deepcopy=False) if trials is None else trials:
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
