"""significance.py: Welch's t-test and the incomplete beta function against closed forms, and the sentences that
call a win only below p < 0.05."""
import math

import pytest

import significance


def test_t_test_p_values_against_closed_forms():
    # Student's t with 1 and 2 degrees of freedom has closed-form tails
    for t in (0.5, 1.0, 3.0, 12.706):
        assert significance.betainc(0.5, 0.5, 1 / (1 + t * t)) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-10)
        assert significance.betainc(1.0, 0.5, 2 / (2 + t * t)) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-10)
    # Welch on two seeds per side with equal variances: df = 2, t = -10 / sqrt(2)
    t, df, p = significance.welch([0.0, 2.0], [10.0, 12.0])
    assert df == pytest.approx(2.0) and t == pytest.approx(-10 / math.sqrt(2))
    assert p == pytest.approx(1 - 10 / math.sqrt(2) / math.sqrt(2 + 50), rel=1e-9)
    # the tabulated 5% point of t with 4 df
    assert significance.betainc(2.0, 0.5, 4 / (4 + 2.776445 ** 2)) == pytest.approx(0.05, abs=1e-5)


def test_findings_call_a_win_only_below_p_005():
    win = significance.finding("Image", "A", [80.0, 81.0, 82.0], "B", [70.0, 71.0, 72.0])
    assert "**A beats B**" in win and "Welch p = " in win
    loss = significance.finding("Image", "A", [70.0, 71.0, 72.0], "B", [80.0, 81.0, 82.0])
    assert "**A is below B**" in loss
    tie = significance.finding("Image", "A", [80.0, 82.0, 78.0], "B", [80.5, 79.0, 81.5])
    assert "no significant difference between A and B" in tie and "p = " in tie
    assert "no test" in significance.finding("x", "A", [1.0], "B", [2.0, 3.0])
