"""The parameter registry: mergekit's declarations, one ParamSpec each, driving every check."""

from __future__ import annotations

import pytest

from merger.core.methods import METHODS
from merger.core.params import PARAMETERS, ParamSpec, declared


def _scope(p: ParamSpec) -> str:
    if not p.per_model:
        return "shared"
    return "input" if p.applies_to_base else "non_base"


def test_the_registry_is_what_mergekit_declares():
    """Every method mergekit 0.1.5 registers, with the same names, scopes, types, defaults."""
    from typing import get_args

    from mergekit.merge_methods.registry import registered_methods

    theirs = {m.spec.name: m.spec for m in registered_methods()}
    assert set(PARAMETERS) == set(theirs)
    for name, spec in theirs.items():
        want = {
            p.name: (p.scope.value, None if p.required else p.default, p.value_type)
            for p in spec.parameters
        }
        ours = {p.name: (_scope(p), p.default, p.kind) for p in PARAMETERS[name]}
        assert set(ours) == set(want), name
        for param, (scope, default, kind) in ours.items():
            their_scope, their_default, their_type = want[param]
            assert scope == their_scope, (name, param)
            assert default == their_default, (name, param)
            assert kind in (their_type, *get_args(their_type)), (name, param)
        required = {p.name for p in spec.parameters if p.required}
        assert {p.name for p in PARAMETERS[name] if p.required} == required, name


def test_native_methods_take_their_parameters_from_the_registry():
    for name, method in METHODS.items():
        assert method.parameters is PARAMETERS[name]


def test_declared_is_none_for_a_method_mergekit_does_not_have():
    assert declared("soup") is None
    assert declared("arcee_fusion") == ()


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        (PARAMETERS["ties"][5], "0.5", 0.5),  # density: a numeric string is a number
        (PARAMETERS["linear"][1], "true", True),
        (PARAMETERS["linear"][1], 0, False),
        (PARAMETERS["karcher"][0], 3.0, 3),
    ],
)
def test_check_converts(spec, value, expected):
    assert spec.check(value) == expected and type(spec.check(value)) is type(expected)


@pytest.mark.parametrize(
    ("method", "name", "value", "message"),
    [
        ("della", "epsilon", 1.0, r"epsilon must be in \[0, 1\), got 1\.0"),
        ("sce", "select_topk", 0.0, r"select_topk must be in \(0, 1\], got 0\.0"),
        ("karcher", "tol", 0, r"tol must be in \(0, inf\), got 0"),
        ("karcher", "max_iter", 2.5, r"max_iter must be an integer, got 2\.5"),
        ("karcher", "max_iter", -1, r"max_iter must be in \[0, inf\), got -1"),  # 0: allowed
        ("nearswap", "t", -0.5, r"t must be in \[0, inf\), got -0\.5"),  # a distance
        ("ties", "weight", float("nan"), r"weight must be finite"),
        ("ties", "lambda", "big", r"lambda must be a number, got 'big'"),
    ],
)
def test_check_refuses_with_the_range(method, name, value, message):
    spec = next(p for p in PARAMETERS[method] if p.name == name)
    with pytest.raises(ValueError, match=message):
        spec.check(value)


def test_density_of_task_arithmetic_is_declared_but_unused():
    """mergekit declares it (a recipe may set it) and ignores it: no sparsification."""
    density = next(p for p in PARAMETERS["task_arithmetic"] if p.name == "density")
    assert density.unused
    assert not any(p.unused for p in PARAMETERS["ties"])
