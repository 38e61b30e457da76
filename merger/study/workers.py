"""Many workers, one study: the claim lock, the work loop, and `merge sweep --workers N`.

Workers share nothing but the study's storage. Each variant is claimed under a lock the
storage itself provides, so two workers never start the same variant:

- PostgreSQL: a session advisory lock (``pg_advisory_lock``), held by the worker's own
  connection; the server drops it when the worker dies, on any host.
- SQLite and the journal file: ``flock`` on ``<file>.claims`` next to the study file (not
  ``<file>.lock``: optuna's journal takes that name for its own lock); the kernel drops it when
  the worker dies (SQLite is one machine's; the journal works on NFSv4 too).

Under the lock a worker fails the trials of dead workers (optuna's heartbeat), counts what the
study holds, and either takes a variant (a queued retry first, else the sampler's proposal,
checked against every running, queued and finished trial) or, when the rest is in other
workers' hands, waits and watches their heartbeats so that a dead worker's variant is taken
over. It stops when the study holds the requested number of results.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kruising.console import console
from kruising.errors import KruisingError

POLL_SECONDS = 1.0  # how often a waiting worker looks at the study


# --- the claim lock ---------------------------------------------------------------------------


class ClaimLock:
    """A lock shared by every worker of one storage; ``release`` may be called when not held."""

    held = False

    def acquire(self) -> None:
        self.held = True

    def release(self) -> None:
        self.held = False

    def __enter__(self) -> ClaimLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class FileLock(ClaimLock):
    """``flock`` on a file next to the study file (SQLite, journal)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        import fcntl

        if self.held and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self.held = False


class AdvisoryLock(ClaimLock):
    """A PostgreSQL session advisory lock on the worker's own connection."""

    def __init__(self, url: str) -> None:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        self.key = int.from_bytes(
            hashlib.sha256(b"kruising-claims").digest()[:8], "big", signed=True
        )
        engine = sqlalchemy.create_engine(url, poolclass=NullPool)
        self._conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self._text = sqlalchemy.text

    def acquire(self) -> None:
        self._conn.execute(self._text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        self.held = True

    def release(self) -> None:
        if self.held:
            self._conn.execute(self._text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
        self.held = False


def claim_lock(url: str) -> ClaimLock:
    """The claim lock of the storage at ``url`` (see the module docstring)."""
    from merger.study.storage import journal_path, sqlite_path

    path = sqlite_path(url) or journal_path(url)
    if path is not None:
        return FileLock(path.with_name(path.name + ".claims"))
    if url.startswith("postgresql"):
        try:
            return AdvisoryLock(url)
        except Exception as exc:  # noqa: BLE001 - drivers raise many types
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise KruisingError(
                f"cannot open storage {url}: {reason}",
                "check the URL, that the server is up and psycopg is installed "
                "(pip install -e '.[postgres]')",
            ) from None
    return ClaimLock()  # other databases: one worker per study (README: Scaling out)


# --- what the study holds ---------------------------------------------------------------------


@dataclass
class Census:
    done: int  # results: complete, or failed for the variant's own reason
    running: int
    waiting: int  # queued (a dead worker's variant, an interrupted one)


def census(study) -> Census:
    from optuna.trial import TrialState

    from merger.study.storage import finished

    trials = study.get_trials(deepcopy=False)
    return Census(
        done=finished(study, trials),
        running=sum(t.state == TrialState.RUNNING for t in trials),
        waiting=sum(t.state == TrialState.WAITING for t in trials),
    )


def work(study, target: int, claim: ClaimLock, run_one, *, progress: bool) -> None:
    """Take variants until the study holds ``target`` results.

    ``run_one()`` runs one trial (``study.optimize(..., n_trials=1)``); it is called with the
    claim lock held and its objective releases the lock once its variant is claimed.
    """
    from merger.study.storage import fail_stale

    waiting_said = False
    while True:
        claim.acquire()
        try:
            fail_stale(study)
            now = census(study)
            if now.done >= target:
                return
            if now.waiting or now.done + now.running < target:
                waiting_said = False
                if run_one() is False:  # the sampler keeps proposing variants the study has
                    return
                continue
        finally:
            claim.release()
        if progress and not waiting_said:
            console.print(
                f"  {now.done} of {target} variants done, {now.running} in other workers' "
                "hands: waiting (a dead worker's variant is taken over)",
                style="dim",
            )
            waiting_said = True
        time.sleep(POLL_SECONDS)


# --- merge sweep --workers N -----------------------------------------------------------------


def worker_envs(n: int, visible: str | None, gpus: int) -> list[dict[str, str]]:
    """One environment per worker: ``CUDA_VISIBLE_DEVICES`` of one GPU each, round-robin over
    the GPUs this process sees (``visible`` is its own ``CUDA_VISIBLE_DEVICES``); none without."""
    if gpus == 0:
        return [{} for _ in range(n)]
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else []
    ids = ids[:gpus] if ids else [str(i) for i in range(gpus)]
    return [{"CUDA_VISIBLE_DEVICES": ids[i % len(ids)]} for i in range(n)]


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def start_workers(n: int, args: list[str], *, use_gpus: bool = True, progress: bool = True) -> None:
    """Run ``merge sweep ARGS`` in ``n`` processes (one GPU each when there are GPUs and
    ``use_gpus``) and wait for all of them; a worker that fails is an error once all are done."""
    gpus = gpu_count() if use_gpus else 0
    envs = worker_envs(n, os.environ.get("CUDA_VISIBLE_DEVICES"), gpus)
    if progress:
        where = (
            ", ".join(f"worker {i}: GPU {e['CUDA_VISIBLE_DEVICES']}" for i, e in enumerate(envs))
            if gpus
            else "no GPU, all on the CPU"
        )
        console.print(f"starting {n} sweep workers ({where})")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", "from merger.cli import entry; entry()", "sweep", *args],
            env={**os.environ, **env, "KRUISING_WORKER": str(i)},
        )
        for i, env in enumerate(envs)
    ]
    try:
        codes = [p.wait() for p in procs]
    except BaseException:  # Ctrl-C, SIGTERM: stop the workers the same way, let them record it
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    failed = [(i, c) for i, c in enumerate(codes) if c != 0]
    if failed:
        raise KruisingError(
            "sweep worker(s) "
            + ", ".join(f"{i} (exit {c})" for i, c in failed)
            + " failed; the others finished",
            "see the worker's messages above; rerun the same command to continue the study",
        )
