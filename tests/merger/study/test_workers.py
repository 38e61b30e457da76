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

from merger.study.workers import claim_lock, worker_envs

pytestmark = pytest.mark.workers

# a worker without a heartbeat for 6 s is dead (the default is 60 s; 6 s leaves a live worker
# room on a loaded machine)
FAST_HEARTBEAT = {"KRUISING_HEARTBEAT_SECONDS": "1", "KRUISING_GRACE_SECONDS": "6"}


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
    variants), one is killed with SIGKILL in the middle of a variant and the other takes it
    over. SQLite: two `merge sweep` commands, a third joins later, `merge rank` reads the study
    while they write it. PostgreSQL: two commands and `merge rank`. Journal: one
    `merge sweep --workers 2`."""
    from optuna.trial import TrialState
    from typer.testing import CliRunner

    from merger.cli import app

    kind = storage.split(":")[0]
    name = "shared"
    spec = write_spec(tmp_path, tiny_family, name=name, trials=3, sampler="tpe")
    args = ("sweep", str(spec), "--storage", storage, "--device", "cpu")
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    if kind == "journal":
        procs = [merge(*args, "--workers", "2", cwd=tmp_path, log=logs[0], env=FAST_HEARTBEAT)]
    else:
        procs = [merge(*args, cwd=tmp_path, log=log, env=FAST_HEARTBEAT) for log in logs[:2]]
    watcher = Watcher(storage, name)
    try:
        # kill a worker while it merges or scores a variant: stopped first, so it cannot end it
        deadline = time.monotonic() + 300
        victim = None
        while victim is None:
            assert time.monotonic() < deadline, "no worker started a variant"
            assert all(p.poll() is None for p in procs), logs[0].read_text()
            for trial in watcher.look():
                if trial.state == TrialState.RUNNING and "recipe" in trial.user_attrs:
                    pid = trial.user_attrs["pid"]  # the worker claimed it and merges it
                    os.kill(pid, signal.SIGSTOP)
                    if watcher.study.trials[trial.number].state == TrialState.RUNNING:
                        victim = trial
                        break
                    os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)
        killed = victim.user_attrs["pid"]
        os.kill(killed, signal.SIGKILL)
        if kind != "journal":
            procs = [p for p in procs if p.pid != killed]
            assert len(procs) == 1
        if kind == "sqlite":  # a worker started later joins
            procs.append(merge(*args, cwd=tmp_path, log=logs[2], env=FAST_HEARTBEAT))
        ranked = None
        while any(p.poll() is None for p in procs):
            assert time.monotonic() < deadline + 300, "the workers did not finish"
            trials = watcher.look()
            done = any(t.state == TrialState.COMPLETE for t in trials)
            if kind != "journal" and ranked is None and done:
                # the study is still being written (in this process: the workers are the
                # other processes; a fresh interpreter would add seconds of imports)
                ranked = CliRunner().invoke(app, ["rank", name, "--storage", storage, "--json"])
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    text = {log.name: " ".join(log.read_text().split()) for log in logs if log.exists()}
    if kind == "journal":  # the parent waits for both and names the one that died
        assert procs[0].returncode == 1, text["worker0.log"]
        assert "starting 2 sweep workers (no GPU, all on the CPU)" in text["worker0.log"]
        assert re.search(r"error: sweep worker\(s\) [01] \(exit -9\) failed", text["worker0.log"])
    else:
        assert all(p.returncode == 0 for p in procs), text
    if kind == "sqlite":
        assert re.search(r"[1-3] of 3 variants done", text["worker2.log"])  # C saw their work

    trials = load(storage, name).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["parameters.t"] for t in complete) == [0.0, 0.5, 1.0]  # exactly 3
    assert not watcher.clashes  # never two trials merging one variant at once
    # every variant merged and scored once (the log of the killed one ends before its variant)
    assert sorted(evaluated(*(log for log in logs if log.exists()))) == [0.0, 0.5, 1.0]
    dead = trials[victim.number]
    assert dead.state == TrialState.FAIL
    retries = [t for t in trials if t.user_attrs.get("retry_of") == dead.number]
    assert len(retries) == 1 and retries[0].params == dead.params  # queued once, by heartbeat
    assert retries[0].state == TrialState.COMPLETE and retries[0].user_attrs["pid"] != killed
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [dead.number]
    skipped = [t for t in trials if t.state == TrialState.PRUNED]
    assert all(t.user_attrs["duplicate_of"] != t.number for t in skipped)

    if kind != "journal":
        assert ranked is not None and ranked.exit_code == 0, ranked and ranked.output
        rows = json.loads(ranked.stdout[ranked.stdout.index("{") :])["rows"]
        assert 1 <= len(rows) <= 3 and all(0 <= r["dutch_score"] <= 1 for r in rows)

    # what optuna-dashboard shows: every user attribute is plain JSON (no NaN, no objects)
    study = load(storage, name)
    json.dumps(study.user_attrs, allow_nan=False)
    for trial in study.trials:
        json.dumps(trial.user_attrs, allow_nan=False)


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


def test_a_stopped_worker_queues_its_variant_for_the_others_at_once(tmp_path):
    """SIGTERM (Interrupted) in the middle of a variant: the trial is failed as interrupted and
    its variant queued again before the worker exits, not at the next start."""
    from optuna.trial import TrialState

    from kruising.console import Interrupted
    from merger.core.recipe import parse_recipe
    from merger.study.spec import parse_spec
    from merger.study.sweep import run_sweep

    def evaluator(variant):
        raise Interrupted(signal.SIGTERM)

    recipe = parse_recipe(
        "merge_method: linear\nmodels:\n  - model: /m/a\n    parameters: {weight: 1.0}\n"
        "  - model: /m/b\n    parameters: {weight: 1.0}\ndtype: float32\n",
        "r.yaml",
    )
    spec = parse_spec(
        'name: stop\nrecipe: {}\nsearch: {"models[1].parameters.weight": '
        "{type: float, low: 0.0, high: 1.0}}\nsampler: random\ntrials: 2\n",
        "s.yaml",
    )
    storage = f"sqlite:///{tmp_path}/studies.db"
    with pytest.raises(Interrupted):
        run_sweep(spec, recipe, storage=storage, evaluator=evaluator, progress=False)
    trials = load(storage, "stop").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].user_attrs["fail_reason"] == "interrupted"
    assert trials[1].user_attrs == {"retry_of": 0} and trials[1].params == trials[0].params


def test_a_worker_whose_variant_was_taken_over_goes_on(tmp_path, capsys):
    """A worker silent past the grace period (a stalled machine) finds its variant failed by
    another worker and queued again: it drops its result and goes on, no traceback."""
    from optuna.trial import TrialState

    from merger.core.recipe import parse_recipe
    from merger.study.spec import parse_spec
    from merger.study.storage import open_storage, requeue
    from merger.study.sweep import run_sweep

    storage = f"sqlite:///{tmp_path}/studies.db"
    calls = []

    def evaluator(variant):
        calls.append(variant)
        if len(calls) == 1:  # what another worker's heartbeat check does meanwhile
            study = load(storage, "stalled")
            running = study.get_trials(states=(TrialState.RUNNING,))[0]
            store = open_storage(storage, heartbeat=False)
            store.set_trial_state_values(running._trial_id, TrialState.FAIL)
            requeue(study, store.get_trial(running._trial_id))
        return {"dutch_score": 0.5, "english_score": 0.5, "seconds": 0.0, "probes": {}}

    recipe = parse_recipe(
        "merge_method: linear\nmodels:\n  - model: /m/a\n    parameters: {weight: 1.0}\n"
        "  - model: /m/b\n    parameters: {weight: 1.0}\ndtype: float32\n",
        "r.yaml",
    )
    spec = parse_spec(
        'name: stalled\nrecipe: {}\nsearch: {"models[1].parameters.weight": '
        "{type: float, low: 0.0, high: 1.0}}\nsampler: random\ntrials: 2\n",
        "s.yaml",
    )
    run_sweep(spec, recipe, storage=storage, evaluator=evaluator, progress=True)
    trials = load(storage, "stalled").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].params == trials[0].params
    assert "taken over by another" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "0"], "--workers must be at least 1, got 0"),
        (["--workers", "2", "--device", "cuda:1"], "--workers with --device cuda:1"),
        (["--workers", "2", "--mode-streaming"], "--workers needs mode: resident"),
    ],
)
def test_workers_flags_that_cannot_work_are_one_error(tmp_path, flags, message):
    from typer.testing import CliRunner

    from merger.cli import app

    streaming = "--mode-streaming" in flags
    flags = [f for f in flags if f != "--mode-streaming"]
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "name: flags\nrecipe:\n  merge_method: linear\n  models:\n"
        "    - {model: /m/a, parameters: {weight: 1.0}}\n"
        "    - {model: /m/b, parameters: {weight: 1.0}}\n"
        'search: {"models[1].parameters.weight": {type: float, low: 0.0, high: 1.0}}\n'
        + ("mode: streaming\n" if streaming else "")
    )
    result = CliRunner().invoke(app, ["sweep", str(spec), *flags])
    assert result.exit_code != 0
    assert message in " ".join(str(result.output).split()) or message in str(result.exception)


def test_a_journal_sweep_claims_under_its_own_lock_file(tmp_path):
    """optuna's journal locks `<file>.lock` while it appends; the claim lock is another file, so
    a worker holding a claim never waits on its own journal writes."""
    from optuna.trial import TrialState

    from merger.core.recipe import parse_recipe
    from merger.study.spec import parse_spec
    from merger.study.sweep import run_sweep

    recipe = parse_recipe(
        "merge_method: linear\nmodels:\n  - model: /m/a\n    parameters: {weight: 1.0}\n"
        "  - model: /m/b\n    parameters: {weight: 1.0}\ndtype: float32\n",
        "r.yaml",
    )
    spec = parse_spec(
        'name: journal\nrecipe: {}\nsearch: {"models[1].parameters.weight": '
        "{type: float, low: 0.0, high: 1.0}}\nsampler: random\ntrials: 2\n",
        "s.yaml",
    )
    storage = f"journal://{tmp_path}/studies.log"
    assert claim_lock(storage).path.name == "studies.log.claims"  # optuna's: studies.log.lock
    run_sweep(
        spec,
        recipe,
        storage=storage,
        evaluator=lambda v: {"dutch_score": 0.5, "english_score": 0.5, "seconds": 0, "probes": {}},
        progress=False,
    )
    assert [t.state for t in load(storage, "journal").trials] == [TrialState.COMPLETE] * 2
    assert (tmp_path / "studies.log.claims").is_file()
