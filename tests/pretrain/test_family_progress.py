"""The family build's progress line: member k of n, and the training time left once known."""

from __future__ import annotations

from pretrain.family import MEMBERS, _member_line

STEPS = {"base": 200, "nl": 150, "instruct": 80}


def test_the_first_member_says_k_of_n_and_no_guess():
    line = _member_line(1, "base", STEPS, {}, 0.0)
    assert line.startswith(f"family: member 1/{len(MEMBERS)}, base (")
    assert "200 steps" in line and "left" not in line


def test_a_later_member_says_how_long_is_left_from_the_rate_so_far():
    # base took 100 s for 200 steps: 0.5 s a step; nl and instruct have 230 steps to go
    line = _member_line(2, "nl", STEPS, {"base": 100.0}, 104.0)
    assert line.startswith(f"family: member 2/{len(MEMBERS)}, nl (")
    assert "104 s so far, about 115 s of training left" in line
    line = _member_line(3, "instruct", STEPS, {"base": 100.0, "nl": 75.0}, 180.0)
    assert "about 40 s of training left" in line
