"""Many workers, one study: real `merge sweep` processes on the test-size family.

Each test starts worker processes through the CLI (as a user would, on one or many machines)
on one shared study, in PostgreSQL (a throwaway cluster, tests/pg.py), SQLite or optuna's
journal file, and reads the study back to check what the workers did together.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from merger.study.workers import worker_envs

pytestmark = pytest.mark.workers

# a worker without a heartbeat for 3 s is dead (the default is 60 s)
FAST_HEARTBEAT = {"KRUISING_HEARTBEAT_SECONDS": "1", "KRUISING_GRACE_SECONDS": "3"}


def write_spec(folder: Path, family: dict, *, name: str, trials: int, sampler: str) -> Path:
    """A sweep over SLERP's t of nl and instruct (three values), scored on the demo suite."""
    spec = folder / f"{name}.yaml"
    spec.write_text(
        textwrap.dedent(
            f"""\
            name: {name}
            recipe:
              merge_method: slerp
              base_model: {family["nl"]}
              models: [{{model: {family["nl"]}}}, {{model: {family["instruct"]}}}]
              parameters: {{t: 0.5}}
              dtype: float32
            search:
              parameters.t: {{type: categorical, choices: [0.0, 0.5, 1.0]}}
            sampler: {sampler}
            suite: demo
            trials: {trials}
            """
        )
    )
    return spec


def merge(*args: str, cwd: Path, log: Path | None = None, env: dict | None = None):
    """Start ``merge ARGS`` (the console script's code) as its own process."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        [sys.executable, "-c", "from merger.cli import entry; entry()", *args],
        cwd=cwd,
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1", **(env or {})},
    )


def load(storage: str, name: str):
    import optuna

    from merger.study.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=open_storage(storage, heartbeat=False))
    except KeyError:  # not created yet
        return None


@pytest.fixture(
    params=["sqlite", "journal", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def storage(request, tmp_path):
    """One study storage of each kind workers can share."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    if request.param == "journal":
        return f"journal://{tmp_path}/studies.log"
    return f"sqlite:///{tmp_path}/studies.db"


class Watcher:
    """Reads the study while workers write it; remembers each moment two trials merged one
    variant at once (a trial is merging once its variant recipe is stored: after the claim)."""

    def __init__(self, storage: str, name: str) -> None:
        self.storage, self.name = storage, name
        self.study = None
        self.clashes: set[tuple[int, ...]] = set()

    def look(self):
        from optuna.trial import TrialState

        self.study = self.study or load(self.storage, self.name)
        if self.study is None:
            return []
        trials = self.study.get_trials(deepcopy=False)
        merging: dict[tuple, list[int]] = {}
        for t in trials:
            if t.state == TrialState.RUNNING and "recipe" in t.user_attrs:
                merging.setdefault(tuple(t.params.items()), []).append(t.number)
        self.clashes |= {tuple(numbers) for numbers in merging.values() if len(numbers) > 1}
        return trials


def evaluated(*logs: Path) -> list[float]:
    """The t of every variant the workers merged and scored, from their logs."""
    found = []
    for log in logs:
        found += [
            float(t) for t in re.findall(r"trial \d+: t=(\S+)\s+dutch_score", log.read_text())
        ]
    return found


def test_workers_share_one_study_a_dead_workers_variant_is_taken_over_once(
    tiny_family, storage, tmp_path
):
    """Two workers start at once on one study (the same TPE seed: they propose the same
    variants), one is killed with SIGKILL in the middle of a variant, a third joins later, and
    `merge rank` reads the study while they write it."""
    from optuna.trial import TrialState

    name = "shared"
    spec = write_spec(tmp_path, tiny_family, name=name, trials=3, sampler="tpe")
    args = ("sweep", str(spec), "--storage", storage, "--device", "cpu")
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    a = merge(*args, cwd=tmp_path, log=logs[0], env=FAST_HEARTBEAT)
    b = merge(*args, cwd=tmp_path, log=logs[1], env=FAST_HEARTBEAT)
    watcher = Watcher(storage, name)
    procs = [a, b]
    try:
        # kill A while it merges or scores a variant: stopped first, so it cannot finish it
        deadline = time.monotonic() + 240
        victim = None
        while victim is None:
            assert time.monotonic() < deadline, "worker A never started a variant"
            assert a.poll() is None, logs[0].read_text()
            for trial in watcher.look():
                if trial.state == TrialState.RUNNING and "recipe" in trial.user_attrs:
                    if trial.user_attrs.get("pid") == a.pid:  # A claimed it and merges it
                        os.kill(a.pid, signal.SIGSTOP)
                        again = watcher.study.trials[trial.number]
                        if again.state == TrialState.RUNNING:
                            victim = again
                        else:
                            os.kill(a.pid, signal.SIGCONT)
            time.sleep(0.05)
        os.kill(a.pid, signal.SIGKILL)
        assert a.wait(timeout=30) == -signal.SIGKILL

        c = merge(*args, cwd=tmp_path, log=logs[2], env=FAST_HEARTBEAT)  # joins later
        procs.append(c)
        ranked = None
        while b.poll() is None or c.poll() is None:
            assert time.monotonic() < deadline + 240, "the workers did not finish"
            trials = watcher.look()
            if ranked is None and any(t.state == TrialState.COMPLETE for t in trials):
                ranked = subprocess.run(  # the study is still being written
                    [sys.executable, "-c", "from merger.cli import entry; entry()", "rank",
                     name, "--storage", storage, "--json"],
                    cwd=tmp_path, capture_output=True, text=True, timeout=120,
                )  # fmt: skip
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert b.returncode == 0, logs[1].read_text()
    assert c.returncode == 0, logs[2].read_text()
    assert "variants done" in logs[2].read_text()  # C saw the study A and B had started

    trials = load(storage, name).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["parameters.t"] for t in complete) == [0.0, 0.5, 1.0]  # exactly 3
    assert not watcher.clashes  # never two trials merging one variant at once
    # every variant merged and scored once (A's log ends before the variant it was killed in)
    assert sorted(evaluated(*logs)) == [0.0, 0.5, 1.0]
    dead = trials[victim.number]
    assert dead.state == TrialState.FAIL
    retries = [t for t in trials if t.user_attrs.get("retry_of") == dead.number]
    assert len(retries) == 1 and retries[0].params == dead.params  # queued once, by heartbeat
    assert retries[0].state == TrialState.COMPLETE
    assert retries[0].user_attrs["pid"] in (b.pid, c.pid)
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [dead.number]
    skipped = [t for t in trials if t.state == TrialState.PRUNED]
    assert all(t.user_attrs["duplicate_of"] != t.number for t in skipped)

    assert ranked is not None and ranked.returncode == 0, ranked and ranked.stderr
    board = json.loads(ranked.stdout)
    assert 1 <= len(board["rows"]) <= 3 and all(0 <= r["dutch_score"] <= 1 for r in board["rows"])

    # what optuna-dashboard shows: every user attribute is plain JSON (no NaN, no objects)
    study = load(storage, name)
    json.dumps(study.user_attrs, allow_nan=False)
    for trial in study.trials:
        json.dumps(trial.user_attrs, allow_nan=False)


def test_merge_sweep_workers_n_starts_n_workers_that_finish_the_study(tiny_family, tmp_path):
    from optuna.trial import TrialState

    spec = write_spec(tmp_path, tiny_family, name="local", trials=3, sampler="grid")
    storage = f"sqlite:///{tmp_path}/studies.db"
    log = tmp_path / "sweep.log"
    sweep = merge("sweep", str(spec), "--workers", "2", "--storage", storage, "--device", "cpu",
                  cwd=tmp_path, log=log)  # fmt: skip
    assert sweep.wait(timeout=300) == 0, log.read_text()
    text = log.read_text()
    assert "starting 2 sweep workers (no GPU, all on the CPU)" in text
    assert text.count("sweep local:") == 2  # each worker's first line
    trials = load(storage, "local").trials
    pids = {t.user_attrs["pid"] for t in trials}
    assert 1 <= len(pids) <= 2 and sweep.pid not in pids  # the workers did the work
    assert sorted(t.params["parameters.t"] for t in trials if t.state == TrialState.COMPLETE) == [
        0.0,
        0.5,
        1.0,
    ]
    assert sorted(evaluated(log)) == [0.0, 0.5, 1.0]


def test_each_worker_sees_one_gpu_round_robin():
    assert worker_envs(2, None, 0) == [{}, {}]
    assert worker_envs(3, None, 2) == [
        {"CUDA_VISIBLE_DEVICES": "0"},
        {"CUDA_VISIBLE_DEVICES": "1"},
        {"CUDA_VISIBLE_DEVICES": "0"},
    ]
    # the GPUs this process was given, not GPU 0 and 1
    assert worker_envs(2, "4,6", 2) == [
        {"CUDA_VISIBLE_DEVICES": "4"},
        {"CUDA_VISIBLE_DEVICES": "6"},
    ]
