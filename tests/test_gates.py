"""The one gate-usage score every sensitivity search ranks by, and the fidelity floor."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from modelshrink.gates import Gates, allowance_used, floor_gates, holds


@dataclass
class Figures:
    max_abs_error: float = 0.0
    cosine: float = 1.0
    top1_agreement: float | None = 1.0


GATES = Gates(max_error=0.1, min_cosine=0.99, min_agreement=0.9)


@pytest.mark.parametrize(
    ("figures", "used"),
    [
        (Figures(), 0.0),
        (Figures(max_abs_error=0.05), 0.5),
        (Figures(cosine=0.98), 2.0),
        (Figures(top1_agreement=0.95), 0.5),
        (Figures(max_abs_error=0.05, cosine=0.995, top1_agreement=0.8), 2.0),
    ],
)
def test_allowance_used_is_the_worst_share(figures: Figures, used: float) -> None:
    assert allowance_used(figures, GATES) == pytest.approx(used)
    assert holds(figures, GATES) == (used <= 1.0)


@pytest.mark.parametrize(
    "figures",
    [
        Figures(max_abs_error=math.nan),
        Figures(max_abs_error=math.inf),
        Figures(cosine=math.nan),
        Figures(top1_agreement=math.nan),
    ],
)
def test_unmeasurable_figures_never_hold(figures: Figures) -> None:
    """NaN means the outputs held NaN/inf: never a pass, never 'no damage' (a NaN cosine once scored 0)."""
    assert allowance_used(figures, GATES) == math.inf
    assert not holds(figures, GATES)


def test_damage_against_a_zero_allowance_is_infinite() -> None:
    exact = Gates(max_error=0.0, min_cosine=1.0)
    assert allowance_used(Figures(), exact) == 0.0
    assert allowance_used(Figures(max_abs_error=1e-9), exact) == math.inf
    assert allowance_used(Figures(cosine=0.999999), exact) == math.inf


def test_the_floor_holds_class_outputs_to_agreement_only_when_it_says_something() -> None:
    assert floor_gates([True], [True]) == Gates(min_agreement=0.99)
    assert floor_gates([True], [False]) == Gates(min_cosine=0.99)  # one class on every row
    assert floor_gates([False]) == Gates(min_cosine=0.99)
    assert floor_gates([True, False], [True, False]) == Gates(min_agreement=0.99, min_cosine=0.99)
