"""Many workers, one study: real `merge sweep` processes on the test-size family.

Each test starts worker processes through the CLI (as a user would, on one or many machines)
on one shared study, in PostgreSQL (a throwaway cluster, tests/pg.py), SQLite or optuna's
journal file, and reads the study back to check what the workers did together.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.workers


def write_spec(folder: Path, family: dict, *, name: str, trials: int, step: float = 0.125) -> Path:
    """A grid sweep over SLERP's t of nl and instruct, scored on the demo suite."""
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
              parameters.t: {{type: float, low: 0.0, high: 1.0, step: {step}}}
            sampler: grid
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
        env={**os.environ, "NO_COLOR": "1", **(env or {})},
    )


def study_trials(storage: str, name: str):
    import optuna

    from merger.study.sweep import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=open_storage(storage, heartbeat=False)).trials


@pytest.mark.postgres
def test_a_sweep_on_postgresql_is_ranked_from_the_same_database(
    tiny_family, postgres_url, tmp_path
):
    from optuna.trial import TrialState

    spec = write_spec(tmp_path, tiny_family, name="pg-one", trials=3, step=0.5)
    sweep = merge("sweep", str(spec), "--storage", postgres_url, "--device", "cpu",
                  cwd=tmp_path, log=tmp_path / "sweep.log")  # fmt: skip
    assert sweep.wait(timeout=300) == 0, (tmp_path / "sweep.log").read_text()
    trials = study_trials(postgres_url, "pg-one")
    assert sorted(t.params["parameters.t"] for t in trials) == [0.0, 0.5, 1.0]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert all(0 <= t.user_attrs["dutch_score"] <= 1 for t in trials)
    rank = subprocess.run(
        [sys.executable, "-c", "from merger.cli import entry; entry()", "rank", "pg-one",
         "--storage", postgres_url, "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rank.returncode == 0, rank.stderr
    assert '"rank": 3' in rank.stdout and '"study": "pg-one"' in rank.stdout
