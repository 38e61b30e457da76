"""Sweeps: spec parsing, recipe paths, validation, the optuna study, resume after SIGKILL, ranking."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kruising.errors import KruisingError
from merger.study.evaluator import VariantFailed
from merger.study.paths import parse_path, set_path, variant_recipe
from merger.study.spec import parse_spec
from merger.study.sweep import run_sweep
from merger.study.validate import validate

REPO = Path(__file__).resolve().parents[3]

SLERP = textwrap.dedent(
    """\
    merge_method: slerp
    base_model: /models/nl
    models:
      - model: /models/nl
      - model: /models/instruct
    parameters:
      t:
        - filter: self_attn
          value: [0.0, 0.5, 1.0]
        - filter: mlp
          value: 0.5
        - value: 0.5
    dtype: float32
    """
)

TIES = textwrap.dedent(
    """\
    merge_method: ties
    base_model: /models/base
    models:
      - model: /models/nl
        parameters: {density: 0.5, weight: 1.0}
      - model: /models/instruct
        parameters: {density: 0.5, weight: 1.0}
    parameters: {normalize: true}
    dtype: float32
    """
)


def _recipe(text: str = SLERP):
    from merger.core.recipe import parse_recipe

    return parse_recipe(text, "test.yaml")


def _spec(search: str, **fields) -> str:
    """A spec on four-plus lines; ``search`` is a one-key flow mapping ``{path: {...}}``."""
    if search != "{}":  # quote the path: brackets are flow syntax in YAML
        key, rest = search[1:].split(":", 1)
        search = '{"' + key + '":' + rest
    lines = ["name: test-sweep", "recipe: {}", f"search: {search}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


def _dump(recipe) -> dict:
    return recipe.model_dump(mode="json", exclude_none=True)


def _t_of(variant) -> float:
    t = _dump(variant)["parameters"]["t"]
    return t if isinstance(t, int | float) else next(e for e in t if "filter" not in e)["value"]


class FakeEvaluator:
    """Scores a variant from its parameters: Dutch peaks at t=0.3, English falls with t."""

    def __init__(self, fail_above: float | None = None, nan_above: float | None = None):
        self.calls = 0
        self.fail_above = fail_above
        self.nan_above = nan_above

    def __call__(self, variant) -> dict:
        self.calls += 1
        t = _t_of(variant)
        if self.fail_above is not None and t > self.fail_above:
            raise VariantFailed(f"shape mismatch at t={t}")  # the evaluator's contract
        dutch = (
            float("nan")
            if self.nan_above is not None and t > self.nan_above
            else 1 - (t - 0.3) ** 2
        )
        return {"dutch_score": dutch, "english_score": 1 - t, "seconds": 0.01, "probes": {}}


# --- paths ------------------------------------------------------------------------------------


def test_parse_path_reads_names_indices_filters_and_gradient_points():
    assert parse_path("parameters.t") == ["parameters", "t"]
    assert parse_path("parameters.t[self_attn].0") == ["parameters", "t", "[self_attn]", 0]
    assert parse_path("models[1].parameters.density") == ["models", 1, "parameters", "density"]
    with pytest.raises(ValueError, match="cannot read"):
        parse_path("parameters..t")


def test_an_inline_recipe_mapping_is_the_base_recipe():
    from merger.study.spec import spec_recipe

    spec = parse_spec(
        "name: inline\nrecipe:\n  merge_method: slerp\n  base_model: org/a\n"
        "  models: [{model: org/a}, {model: org/b}]\n  parameters: {t: 0.5}\n"
        "search: {parameters.t: {type: float, low: 0.0, high: 1.0}}\n",
        "inline.yaml",
    )
    recipe = spec_recipe(spec, None)
    assert recipe.merge_method == "slerp" and recipe.parameters == {"t": 0.5}


def test_variant_sets_filtered_gradient_points_and_per_model_values():
    recipe = _recipe()
    variant = variant_recipe(recipe, {"parameters.t[self_attn].1": 0.25, "parameters.t[mlp]": 0.9})
    t = _dump(variant)["parameters"]["t"]
    assert t[0] == {"filter": "self_attn", "value": [0.0, 0.25, 1.0]}
    assert t[1] == {"filter": "mlp", "value": 0.9}
    assert t[2] == {"value": 0.5}
    assert _dump(recipe)["parameters"]["t"][0]["value"] == [0.0, 0.5, 1.0]  # base untouched

    ties = variant_recipe(_recipe(TIES), {"models[1].parameters.density": 0.3})
    assert _dump(ties)["models"][1]["parameters"]["density"] == 0.3
    assert _dump(ties)["models"][0]["parameters"]["density"] == 0.5
    # a parameter the method declares but the recipe leaves at its default is added
    linear = _recipe(SLERP.replace("slerp", "linear").split("parameters:")[0])
    soup = variant_recipe(linear, {"models[0].parameters.weight": 0.3})
    assert _dump(soup)["models"][0]["parameters"] == {"weight": 0.3}
    lam = variant_recipe(_recipe(TIES), {"parameters.lambda": 0.8})
    assert _dump(lam)["parameters"]["lambda"] == 0.8


def test_set_path_refuses_a_gradient_as_a_scalar():
    data = _dump(_recipe())
    with pytest.raises(ValueError, match=r"gradient .*parameters\.t\[self_attn\]\.0"):
        set_path(data, "parameters.t[self_attn]", 0.5)


# --- validation before any merging -----------------------------------------------------------


def _validate(search: str, recipe_text: str = SLERP, **fields):
    spec = parse_spec(_spec(search, **fields), "sweep.yaml")
    validate(spec, _recipe(recipe_text))


def test_empty_search_space_is_an_error():
    with pytest.raises(KruisingError, match="search space is empty"):
        _validate("{}")


def test_a_parameter_the_recipe_does_not_have_is_an_error():
    with pytest.raises(KruisingError, match=r"parameters has no 'density' \(it has t\)"):
        _validate("{parameters.density: {type: float, low: 0.1, high: 0.9}}")
    with pytest.raises(KruisingError, match="has no filter 'embed'"):
        _validate("{parameters.t[embed]: {type: float, low: 0.1, high: 0.9}}")
    with pytest.raises(KruisingError, match=r"models has 2 entries, no \[5\]"):
        _validate("{models[5].parameters.weight: {type: float, low: 0.1, high: 0.9}}")


def test_bounds_outside_the_method_range_are_an_error():
    with pytest.raises(KruisingError, match=r"t must be in \[0, 1\], got 1.5"):
        _validate("{parameters.t[mlp]: {type: float, low: 0.0, high: 1.5}}")
    with pytest.raises(KruisingError, match=r"density must be in .0, 1\], got 1.5"):
        _validate("{models[0].parameters.density: {type: float, low: 0.5, high: 1.5}}", TIES)
    with pytest.raises(KruisingError, match="low 0.9 is above high 0.1"):
        _validate("{parameters.t[mlp]: {type: float, low: 0.9, high: 0.1}}")


def test_unknown_sampler_and_unknown_keys_name_file_line_and_field():
    with pytest.raises(KruisingError, match=r"sweep.yaml:4: sampler: Input should be 'grid'"):
        parse_spec(
            _spec("{parameters.t: {type: float, low: 0, high: 1}}", sampler="bayes"), "sweep.yaml"
        )
    with pytest.raises(KruisingError, match=r"sweep.yaml:4: trails: unknown key"):
        parse_spec(_spec("{parameters.t: {type: float, low: 0, high: 1}}", trails=3), "sweep.yaml")
    with pytest.raises(KruisingError, match="unknown objective 'german_score'"):
        parse_spec(_spec("{}", objectives=["german_score"]), "sweep.yaml")


def test_grid_needs_a_step_and_merge_method_choices_must_exist():
    with pytest.raises(KruisingError, match="grid sampler needs a step"):
        _validate("{parameters.t[mlp]: {type: float, low: 0, high: 1}}", sampler="grid")
    with pytest.raises(KruisingError, match="unknown method 'soup'"):
        _validate("{merge_method: {type: categorical, choices: [slerp, soup]}}")


def test_cmaes_is_single_objective():
    with pytest.raises(KruisingError, match="cmaes optimizes one objective"):
        _validate(
            "{parameters.t[mlp]: {type: float, low: 0, high: 1}}",
            sampler="cmaes",
            objectives=["dutch_score", "english_score"],
        )


def test_storage_that_cannot_be_opened_is_an_error_before_merging(tmp_path):
    spec = parse_spec(_spec("{parameters.t[mlp]: {type: float, low: 0, high: 1}}"), "s.yaml")
    evaluator = FakeEvaluator()
    with pytest.raises(KruisingError, match="cannot open storage .*does not exist"):
        run_sweep(
            spec,
            _recipe(),
            storage=f"sqlite:///{tmp_path}/no/such/dir/s.db",
            evaluator=evaluator,
            progress=False,
        )
    with pytest.raises(KruisingError, match="cannot open storage postgresql://"):
        run_sweep(
            spec,
            _recipe(),
            storage="postgresql://nobody@127.0.0.1:9/none",
            evaluator=evaluator,
            progress=False,
        )
    with pytest.raises(KruisingError, match="not a database URL"):
        run_sweep(spec, _recipe(), storage="studies.db", evaluator=evaluator, progress=False)
    assert evaluator.calls == 0


# --- the study --------------------------------------------------------------------------------


def _run(tmp_path, search: str, evaluator, progress: bool = False, **fields):
    fields.setdefault("trials", 6)
    spec = parse_spec(_spec(search, **fields), "s.yaml")
    storage = f"sqlite:///{tmp_path}/studies.db"
    study = run_sweep(spec, _recipe(), storage=storage, evaluator=evaluator, progress=progress)
    return study, storage


def test_sweep_stores_params_scores_seconds_and_variant_recipe(tmp_path):
    from merger.core.recipe import parse_recipe

    grid = "{parameters.t[default]: {type: float, low: 0.0, high: 1.0, step: 0.25}}"
    study, _ = _run(tmp_path, grid, FakeEvaluator(), sampler="grid", trials=10)
    trials = study.get_trials()
    assert len(trials) == 5  # capped at the grid's size
    assert sorted(t.params["parameters.t[default]"] for t in trials) == [0, 0.25, 0.5, 0.75, 1]
    best = study.best_trial
    assert best.params["parameters.t[default]"] == 0.25
    assert best.user_attrs["dutch_score"] == pytest.approx(1 - 0.05**2)
    assert best.user_attrs["seconds"] >= 0
    stored = parse_recipe(best.user_attrs["recipe"], "stored")
    assert _t_of(stored) == 0.25


def test_failing_and_nan_variants_are_recorded_and_the_sweep_goes_on(tmp_path):
    from optuna.trial import TrialState

    grid = "{parameters.t[default]: {type: float, low: 0.0, high: 1.0, step: 0.25}}"
    study, _ = _run(
        tmp_path, grid, FakeEvaluator(fail_above=0.8, nan_above=0.6), sampler="grid", trials=5
    )
    by_t = {t.params["parameters.t[default]"]: t for t in study.get_trials()}
    assert by_t[1.0].state == TrialState.FAIL
    assert "shape mismatch at t=1.0" in by_t[1.0].user_attrs["fail_reason"]
    assert by_t[0.75].state == TrialState.FAIL
    assert by_t[0.75].user_attrs["fail_reason"] == "dutch_score is nan"
    assert [by_t[t].state for t in (0, 0.25, 0.5)] == [TrialState.COMPLETE] * 3


def test_an_unexpected_error_stops_the_sweep_with_its_traceback(tmp_path):
    """A bug (a torch RuntimeError, an OOM) is not the variant's fault: it is not recorded as
    a failed variant and the sweep does not go on past it."""
    from optuna.trial import TrialState

    class Buggy(FakeEvaluator):
        def __call__(self, variant):
            if self.calls == 1:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return super().__call__(variant)

    grid = "{parameters.t[default]: {type: float, low: 0.0, high: 1.0, step: 0.25}}"
    evaluator = Buggy()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _run(tmp_path, grid, evaluator, sampler="grid", trials=5)
    assert evaluator.calls == 1  # one variant scored; the second one hit the bug
    import optuna

    study = optuna.load_study(study_name="test-sweep", storage=f"sqlite:///{tmp_path}/studies.db")
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and "fail_reason" not in failed[0].user_attrs


def test_pareto_sweep_ranks_the_front_first_and_exports_a_recipe(tmp_path):
    from merger.core.recipe import load_recipe
    from merger.study.rank import export, leaderboard

    search = "{parameters.t[default]: {type: float, low: 0.0, high: 1.0}}"
    study, _ = _run(
        tmp_path,
        search,
        FakeEvaluator(),
        sampler="random",
        objectives=["dutch_score", "english_score"],
        trials=8,
    )
    board = leaderboard(study)
    rows = board["rows"]
    assert len(rows) == 8 and board["objectives"] == ["dutch_score", "english_score"]
    front = [r for r in rows if r["pareto"]]
    assert rows[: len(front)] == front  # the front first
    # on this toy problem t is dominated when another t' is both lower and nearer to 0.3
    ts = [r["params"]["parameters.t[default]"] for r in rows]
    for r, t in zip(rows, ts, strict=True):
        dominated = any(u < t and abs(u - 0.3) <= abs(t - 0.3) for u in ts)
        assert r["pareto"] == (not dominated), t
    assert 0 < len(front) < 8
    out = export(board, 2, tmp_path / "second.yaml")
    assert _t_of(load_recipe(out)) == pytest.approx(rows[1]["params"]["parameters.t[default]"])
    with pytest.raises(KruisingError, match="has ranks 1 to 8, not 9"):
        export(board, 9, tmp_path / "x.yaml")


def test_repeated_points_are_not_merged_twice_and_a_discrete_space_caps_trials(tmp_path, capsys):
    from optuna.trial import TrialState

    evaluator = FakeEvaluator()
    search = "{parameters.t[default]: {type: categorical, choices: [0.1, 0.4, 0.7]}}"
    study, _ = _run(tmp_path, search, evaluator, progress=True, sampler="tpe", trials=10)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["parameters.t[default]"] for t in complete) == [0.1, 0.4, 0.7]
    assert evaluator.calls == 3
    log = capsys.readouterr().err
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned  # three choices, the sampler repeats some
    for t in pruned:
        twin = study.trials[t.user_attrs["duplicate_of"]]
        assert twin.params == t.params and twin.state == TrialState.COMPLETE
        # the log says why this trial number has no scores
        assert f"trial {t.number}: same variant as trial {twin.number}, skipped" in log


def test_weighted_objective_is_one_value(tmp_path):
    search = "{parameters.t[default]: {type: float, low: 0.0, high: 1.0, step: 0.5}}"
    study, _ = _run(
        tmp_path,
        search,
        FakeEvaluator(),
        sampler="grid",
        objectives={"dutch_score": 3, "english_score": 1},
    )
    by_t = {t.params["parameters.t[default]"]: t.values for t in study.get_trials()}
    assert by_t[0.5] == [pytest.approx((3 * (1 - 0.04) + 1 * 0.5) / 4)]


def test_a_changed_search_space_does_not_silently_join_an_old_study(tmp_path):
    _run(
        tmp_path,
        "{parameters.t[default]: {type: float, low: 0, high: 1}}",
        FakeEvaluator(),
        trials=2,
    )
    with pytest.raises(KruisingError, match="exists with another search space"):
        _run(
            tmp_path,
            "{parameters.t[mlp]: {type: float, low: 0, high: 1}}",
            FakeEvaluator(),
            trials=2,
        )


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
from merger.core.recipe import parse_recipe
from merger.study.spec import parse_spec
from merger.study.sweep import run_sweep
sys.path.insert(0, {tests!r})
from test_sweep import FakeEvaluator, SLERP, _spec

class Slow(FakeEvaluator):
    def __call__(self, variant):
        time.sleep(0.4)
        return super().__call__(variant)

spec = parse_spec(_spec({search!r}, sampler="random", trials=6), "s.yaml")
run_sweep(spec, parse_recipe(SLERP, "r"), storage={storage!r}, evaluator=Slow(), progress=False)
"""


def test_sigkill_mid_sweep_then_rerun_continues_without_losing_completed_variants(tmp_path):
    import optuna
    from optuna.trial import TrialState

    from merger.study.storage import open_storage

    search = "{parameters.t[default]: {type: float, low: 0.0, high: 1.0}}"
    storage = f"sqlite:///{tmp_path}/studies.db"
    script = tmp_path / "worker.py"
    script.write_text(
        KILL_SCRIPT.format(
            repo=str(REPO), tests=str(Path(__file__).parent), search=search, storage=storage
        )
    )
    worker = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    store = open_storage(storage, heartbeat=False)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                trials = optuna.load_study(study_name="test-sweep", storage=store).get_trials()
            except KeyError:
                continue
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            running = [t for t in trials if t.state == TrialState.RUNNING and t.params]
            if len(done) >= 2 and running:
                break
        else:
            pytest.fail("the worker never got two variants done")
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
    before = optuna.load_study(study_name="test-sweep", storage=store).get_trials()
    kept = {t.number: t.values for t in before if t.state == TrialState.COMPLETE}
    killed = [t for t in before if t.state == TrialState.RUNNING]
    assert len(kept) >= 2 and len(killed) == 1

    spec = parse_spec(_spec(search, sampler="random", trials=6), "s.yaml")
    evaluator = FakeEvaluator()
    study = run_sweep(spec, _recipe(), storage=storage, evaluator=evaluator, progress=False)
    after = {t.number: t for t in study.get_trials()}
    for number, values in kept.items():  # completed variants kept, untouched
        assert after[number].state == TrialState.COMPLETE and after[number].values == values
    dead = after[killed[0].number]
    assert dead.state == TrialState.FAIL and dead.user_attrs["stale"] is True
    assert dead.user_attrs["fail_reason"] == f"worker {worker.pid} died"
    retry = [t for t in after.values() if t.user_attrs.get("retry_of") == dead.number]
    assert len(retry) == 1 and retry[0].params == dead.params  # the variant in flight reran
    assert retry[0].state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in after.values()) == 6
    assert evaluator.calls == 6 - len(kept)


def test_an_interrupted_variant_is_queued_again_on_the_next_run(tmp_path):
    from optuna.trial import TrialState

    class Interrupting(FakeEvaluator):
        def __call__(self, variant):
            if self.calls == 2:
                raise KeyboardInterrupt
            return super().__call__(variant)

    grid = "{parameters.t[default]: {type: float, low: 0.0, high: 1.0, step: 0.25}}"
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, grid, Interrupting(), sampler="grid", trials=5)
    study, _ = _run(tmp_path, grid, FakeEvaluator(), sampler="grid", trials=5)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["parameters.t[default]"] for t in done) == [0, 0.25, 0.5, 0.75, 1]
    interrupted = [t for t in study.trials if t.user_attrs.get("fail_reason") == "interrupted"]
    assert len(interrupted) == 1
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == interrupted[0].number]
    assert len(retry) == 1 and retry[0].params == interrupted[0].params


def test_rank_cli_json_and_plots(tmp_path):
    from typer.testing import CliRunner

    from merger.cli import app

    search = "{parameters.t[default]: {type: float, low: 0.0, high: 1.0}}"
    _, storage = _run(
        tmp_path,
        search,
        FakeEvaluator(),
        sampler="random",
        objectives=["dutch_score", "english_score"],
        trials=5,
    )
    result = CliRunner().invoke(
        app, ["rank", "test-sweep", "--storage", storage, "--json", "--plots", str(tmp_path / "p")]
    )
    assert result.exit_code == 0, result.output
    board = json.loads(result.stdout[result.stdout.index("{") :])
    assert [r["rank"] for r in board["rows"]] == [1, 2, 3, 4, 5]
    assert (tmp_path / "p" / "pareto.png").stat().st_size > 1000
    assert (tmp_path / "p" / "score_vs_parameters_t_default.png").is_file()
    missing = CliRunner().invoke(app, ["rank", "nope", "--storage", storage])
    assert missing.exit_code != 0
    assert isinstance(missing.exception, KruisingError)
    assert "it holds test-sweep" in missing.exception.message
    assert "--storage" in missing.exception.hint


# --- the real engine and scorer ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(make_tiny_mistral, tmp_path_factory):
    a = make_tiny_mistral("sweep-a", seed=1)
    b = make_tiny_mistral("sweep-b", seed=2)
    folder = tmp_path_factory.mktemp("sweep-recipes")
    recipe = folder / "slerp.yaml"
    recipe.write_text(SLERP.replace("/models/nl", str(a)).replace("/models/instruct", str(b)))
    probes = folder / "probes"
    probes.mkdir()
    nl = [
        {
            "id": "nl-1",
            "context": "Bassie treedt op met",
            "choices": ["Adriaan", "Pietje", "Jan"],
            "answer": 0,
        },
        {
            "id": "nl-2",
            "context": "De hoofdstad van Nederland is",
            "choices": ["Amsterdam", "Brussel", "Parijs"],
            "answer": 0,
        },
        {
            "id": "nl-3",
            "context": "De ACM is de Autoriteit",
            "choices": ["Consument en Markt", "Cultuur en Media"],
            "answer": 0,
        },
    ]
    en = [
        {
            "id": "en-1",
            "context": "The capital of France is",
            "choices": ["Paris", "Rome"],
            "answer": 0,
        },
        {
            "id": "en-2",
            "context": "Water boils at a hundred degrees",
            "choices": ["Celsius", "Kelvin"],
            "answer": 0,
        },
    ]
    (probes / "kennis.jsonl").write_text("".join(json.dumps(i) + "\n" for i in nl))
    text = [{"id": "t-1", "text": "Bassie en Adriaan reizen samen door het land."}]
    (probes / "ppl_nl.jsonl").write_text(json.dumps(text[0]) + "\n")
    (probes / "cloze_en.jsonl").write_text("".join(json.dumps(i) + "\n" for i in en))
    return recipe, probes


def test_in_memory_sweep_scores_match_merge_run_of_the_exported_recipe(tiny_pair, tmp_path):
    """The stored scores of a variant are what `merge run` of its export scores again."""
    from eval.api import score_path
    from merger.core.engine import run_recipe_file
    from merger.core.options import MergeOptions
    from merger.core.recipe import load_recipe
    from merger.study.rank import export, leaderboard

    recipe, probes = tiny_pair
    spec = parse_spec(
        textwrap.dedent(
            f"""\
            name: tiny-slerp
            recipe: {recipe}
            search:
              parameters.t[mlp]: {{type: float, low: 0.0, high: 1.0, step: 0.5}}
            sampler: grid
            suite: {probes}
            trials: 2
            """
        ),
        "tiny.yaml",
    )
    study = run_sweep(
        spec,
        load_recipe(recipe),
        storage=f"sqlite:///{tmp_path}/s.db",
        device="cpu",
        progress=False,
    )
    board = leaderboard(study)
    assert len(board["rows"]) == 2
    best = board["rows"][0]
    assert math.isfinite(best["dutch_score"])
    out = export(board, 1, tmp_path / "best.yaml")
    child = run_recipe_file(out, tmp_path / "child", MergeOptions(device="cpu"))
    card = score_path(str(child), suite=str(probes), device="cpu")
    assert card["dutch_score"] == pytest.approx(best["dutch_score"], abs=1e-6)
    assert card["english_score"] == best["english_score"]
    for name, metrics in best["probes"].items():
        for key, value in metrics.items():
            if isinstance(value, float):  # bits_per_byte and ppl: continuous, not just argmaxes
                assert card["probes"][name][key] == pytest.approx(value, rel=1e-5), (name, key)
    assert "bits_per_byte" in best["probes"]["ppl_nl"]


def test_the_evaluator_encodes_the_suite_once_and_scores_like_score_model(tiny_pair):
    """Each variant is scored with the suite tokenised and laid out once per study."""
    from eval.api import score_model
    from merger.core.recipe import load_recipe
    from merger.study.evaluator import InMemoryEvaluator

    recipe, probes = tiny_pair
    base = load_recipe(recipe)
    evaluator = InMemoryEvaluator(base, str(probes), device="cpu")
    plans = []
    for t in (0.2, 0.9):
        card = evaluator(variant_recipe(base, {"parameters.t[default]": t}))
        plans.append(evaluator.prepared.plan)
        again = score_model(evaluator.model, evaluator.tokenizer, str(probes), name="slerp")
        for key in ("seconds", "items_per_second", "merge_seconds"):
            card.pop(key, None), again.pop(key, None)
        assert card == again
    assert plans[0] is plans[1]


def test_streaming_mode_scores_what_the_resident_mode_scores(tiny_pair, tmp_path):
    """One pass over the shards for K variants gives the same scores as merging each in memory."""
    from merger.core.recipe import load_recipe

    recipe, probes = tiny_pair
    boards = {}
    for mode in ("resident", "streaming"):
        spec = parse_spec(
            textwrap.dedent(
                f"""\
                name: tiny-{mode}
                recipe: {recipe}
                search:
                  parameters.t[default]: {{type: categorical, choices: [0.2, 0.9]}}
                sampler: grid
                suite: {probes}
                trials: 2
                mode: {mode}
                batch: 2
                """
            ),
            f"{mode}.yaml",
        )
        study = run_sweep(
            spec,
            load_recipe(recipe),
            storage=f"sqlite:///{tmp_path}/s.db",
            device="cpu",
            progress=False,
        )
        boards[mode] = {t.params["parameters.t[default]"]: t.user_attrs for t in study.trials}
    assert sorted(boards["streaming"]) == [0.2, 0.9]
    for t in (0.2, 0.9):
        resident, streaming = boards["resident"][t], boards["streaming"][t]
        assert streaming["dutch_score"] == resident["dutch_score"]
        assert streaming["probes"]["ppl_nl"]["bits_per_byte"] == pytest.approx(
            resident["probes"]["ppl_nl"]["bits_per_byte"], rel=1e-6
        )


def test_a_variant_the_engine_cannot_merge_is_failed_with_its_reason(tiny_pair, tmp_path):
    """linear with weights summing to 0 under normalize: that variant fails, the sweep goes on."""
    from optuna.trial import TrialState

    from merger.core.recipe import load_recipe

    slerp, probes = tiny_pair
    data = load_recipe(slerp).model_dump(mode="json", exclude_none=True)
    linear = tmp_path / "linear.yaml"
    linear.write_text(
        textwrap.dedent(
            f"""\
            merge_method: linear
            models:
              - model: {data["models"][0]["model"]}
                parameters: {{weight: 1.0}}
              - model: {data["models"][1]["model"]}
                parameters: {{weight: 1.0}}
            dtype: float32
            """
        )
    )
    spec = parse_spec(
        textwrap.dedent(
            f"""\
            name: tiny-linear
            recipe: {linear}
            search:
              models[1].parameters.weight: {{type: categorical, choices: [-1.0, 0.5]}}
            sampler: grid
            suite: {probes}
            trials: 2
            """
        ),
        "linear-sweep.yaml",
    )
    study = run_sweep(
        spec,
        load_recipe(linear),
        storage=f"sqlite:///{tmp_path}/s.db",
        device="cpu",
        progress=False,
    )
    by_w = {t.params["models[1].parameters.weight"]: t for t in study.trials}
    assert by_w[-1.0].state == TrialState.FAIL
    assert "sum to 0" in by_w[-1.0].user_attrs["fail_reason"]
    assert by_w[0.5].state == TrialState.COMPLETE


# --- any native method: DELLA's epsilon, model_stock against ties (issue #12) ------------------


DELLA = TIES.replace("merge_method: ties", "merge_method: della")


def test_della_epsilon_is_searched_within_its_range():
    search = "{models[0].parameters.epsilon: {type: float, low: 0.05, high: 0.3}}"
    validate(parse_spec(_spec(search), "s.yaml"), _recipe(DELLA))
    variant = variant_recipe(_recipe(DELLA), {"models[0].parameters.epsilon": 0.2})
    assert _dump(variant)["models"][0]["parameters"] == {
        "density": 0.5,
        "weight": 1.0,
        "epsilon": 0.2,
    }
    too_wide = "{models[0].parameters.epsilon: {type: float, low: 0.0, high: 1.0}}"
    with pytest.raises(KruisingError, match=r"epsilon must be in \[0, 1\), got 1.0"):
        validate(parse_spec(_spec(too_wide), "s.yaml"), _recipe(DELLA))


def test_model_stock_or_ties_keeps_each_methods_own_parameters():
    search = '{merge_method: {type: categorical, choices: [model_stock, ties]}, "models[0].parameters.density": {type: float, low: 0.3, high: 0.9}}'
    spec = parse_spec("name: s\nrecipe: {}\nsearch: " + search + "\n", "s.yaml")
    recipe = _recipe(
        TIES.replace(
            "      - model: /models/instruct",
            "      - model: /models/math\n        parameters: {density: 0.5, weight: 0.5}\n      - model: /models/instruct",
        )
    )
    validate(spec, recipe)
    stock = variant_recipe(
        recipe, {"merge_method": "model_stock", "models[0].parameters.density": 0.4}
    )
    assert stock.merge_method == "model_stock"
    assert all(m.parameters is None for m in stock.models) and stock.parameters is None
    ties = variant_recipe(recipe, {"merge_method": "ties", "models[0].parameters.density": 0.4})
    assert _dump(ties)["models"][0]["parameters"] == {"density": 0.4, "weight": 1.0}


def test_a_path_no_searched_method_declares_is_an_error():
    search = '{merge_method: {type: categorical, choices: [model_stock, karcher]}, "parameters.normalize": {type: categorical, choices: [true, false]}}'
    spec = parse_spec("name: s\nrecipe: {}\nsearch: " + search + "\n", "s.yaml")
    with pytest.raises(
        KruisingError, match="parameters.normalize: no searched method declares normalize"
    ):
        validate(spec, _recipe(TIES))


def test_in_memory_sweeps_over_della_and_model_stock_or_ties(tiny_pair, tmp_path):
    """Real merges and scores: a DELLA epsilon sweep and a method choice, every trial complete."""
    from optuna.trial import TrialState

    from merger.core.recipe import load_recipe

    slerp, probes = tiny_pair
    models = [m["model"] for m in load_recipe(slerp).model_dump(mode="json")["models"]]
    third = tmp_path / "third"
    import shutil

    shutil.copytree(models[1], third)
    recipe = tmp_path / "della.yaml"
    recipe.write_text(
        textwrap.dedent(
            f"""\
            merge_method: della
            base_model: {models[0]}
            models:
              - model: {models[1]}
                parameters: {{weight: 0.6, density: 0.5, epsilon: 0.1}}
              - model: {third}
                parameters: {{weight: 0.4, density: 0.5}}
            dtype: float32
            """
        )
    )
    for name, search in (
        (
            "della-eps",
            "models[0].parameters.epsilon: {type: float, low: 0.05, high: 0.3, step: 0.25}",
        ),
        ("stock-or-ties", "merge_method: {type: categorical, choices: [model_stock, ties]}"),
    ):
        spec = parse_spec(
            f"name: {name}\nrecipe: {recipe}\nsearch:\n  {search}\nsampler: grid\n"
            f"suite: {probes}\ntrials: 2\n",
            "sweep.yaml",
        )
        study = run_sweep(
            spec,
            load_recipe(recipe),
            storage=f"sqlite:///{tmp_path}/{name}.db",
            device="cpu",
            progress=False,
        )
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2, [
            t.user_attrs.get("fail_reason") for t in study.trials
        ]
        values = {tuple(sorted(t.params.items())) for t in study.trials}
        assert len(values) == 2


class PerItemEvaluator:
    """Scorecards with per-item results: 400 chat questions, right on 90% of them for t <= 0.5,
    on 30% above; variants on the same side give the very same answers."""

    def __call__(self, variant) -> dict:
        from eval import stats

        t = _t_of(variant)
        share = 0.9 if t <= 0.5 else 0.3
        right = [int((i * 7919 % 400) / 400 < share) for i in range(400)]
        items = {"acc": right, "acc_norm": right, "answer_logprob": [-1.0 + r for r in right]}
        per_item = {"demo_nl_chat": {"ids": [f"q{i}" for i in range(400)], **items}}
        rows = [("demo_nl_chat", "choice", "acc_norm", 1.0)]
        score = stats.score_interval(rows, {"demo_nl_chat": items})
        return {
            "dutch_score": score["value"],
            "dutch_score_se": score["se"],
            "dutch_score_ci": score["ci"],
            "english_score": 1 - t,
            "per_item": per_item,
            "weights": {"dutch": {"demo_nl_chat": 1.0}, "english": {}},
            "seconds": 0.01,
            "probes": {},
        }


def test_the_leaderboard_says_which_neighbours_really_differ_and_how_stable_it_is(tmp_path):
    from typer.testing import CliRunner

    from merger.cli import app
    from merger.study.rank import leaderboard, markdown

    grid = "{parameters.t[default]: {type: float, low: 0.0, high: 1.0, step: 0.25}}"
    study, storage = _run(tmp_path, grid, PerItemEvaluator(), sampler="grid", trials=5)
    board = leaderboard(study, stability=True)
    rows = board["rows"]
    assert [r["params"]["parameters.t[default]"] <= 0.5 for r in rows] == [True] * 3 + [False] * 2
    assert [r["vs_above"] for r in rows] == [None, "≈", "≈", ">", "≈"]
    lo, hi = rows[0]["dutch_score_ci"]
    assert lo < rows[0]["dutch_score"] < hi and rows[0]["dutch_score_se"] > 0
    assert board["stability"]["kendall_tau"] == 1.0 and board["stability"]["candidates"] == 5
    assert "≈" in markdown(board) and "Kendall tau 1.00" in markdown(board)
    result = CliRunner().invoke(app, ["rank", "test-sweep", "--storage", storage, "--stability"])
    assert result.exit_code == 0, result.output
    assert "Kendall tau 1.00" in result.output and "vs above" in result.output
