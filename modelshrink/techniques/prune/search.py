"""Tolerance-driven pruning: a per-layer sensitivity search under the fidelity gates.

1. *Sensitivity*: each unit (a weight tensor, or a channel group for ``--structured``) is pruned
   alone at increasing levels; every candidate is scored against the original outputs with
   ``context.evaluate``. A score is the worst ratio of measured damage to what a gate allows
   (``max_error / --max-error``, ``(1 - cosine) / (1 - --min-cosine)``,
   ``(1 - agreement) / (1 - --min-agreement)``): below 1 the gates hold. The levels of a unit
   stop at the first one that breaks a gate on its own.
2. *Combination*: all (unit, level) steps are sorted by score (cheapest damage first, larger
   gains first among equals) and taken in that order until the overall target ``--sparsity``
   is reached (or the steps run out: "as much as the gates allow").
3. *Verification*: the combined model is evaluated; if it breaks a gate, a binary search finds
   the longest prefix of the sorted steps that holds them.

The report lists, per unit, the level chosen and the score of every level tried.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from modelshrink.gates import Gates, allowance_used, holds
from modelshrink.techniques import floor_search
from modelshrink.techniques.base import TechniqueContext
from modelshrink.techniques.prune.magnitude import magnitude
from modelshrink.verify import Fidelity

__all__ = ["SearchResult", "Unit", "describe_default", "magnitude_error", "score_share", "search"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """Something the search sets a level for.

    Attributes:
        key: Identifier used in assignments.
        label: Name for the report (node or producers).
        op_type: Op type for the report.
        size: Elements (unstructured) or channels (structured) the levels apply to.
        levels: Levels to try, ascending, all > 0.
        removed: How many of ``size`` a level removes.
    """

    key: int
    label: str
    op_type: str
    size: int
    levels: tuple[float, ...]
    removed: Callable[[float], int]


@dataclass
class SearchResult:
    """The per-unit levels chosen and how they were found."""

    assignment: dict[int, float]
    table: list[dict[str, Any]]
    evaluations: int
    achieved: float
    target: float
    fidelity: Fidelity | None = None
    limited_by_gates: bool = False
    steps_taken: int = 0
    notes: list[str] = field(default_factory=list)


def _overall(units: Sequence[Unit], assignment: dict[int, float]) -> float:
    total = sum(u.size for u in units)
    removed = sum(u.removed(assignment.get(u.key, 0.0)) for u in units)
    return removed / total if total else 0.0


def search(
    units: Sequence[Unit],
    build: Callable[[dict[int, float]], ir.Model],
    context: TechniqueContext,
    target: float,
) -> SearchResult:
    """Choose a level per unit reaching ``target`` overall while every fidelity gate holds."""
    gates = context.gates
    evaluations = 0

    def score(assignment: dict[int, float]) -> tuple[Fidelity, float, bool]:
        nonlocal evaluations
        evaluations += 1
        fidelity = context.evaluate(build(assignment))
        return fidelity, allowance_used(fidelity, gates), holds(fidelity, gates)

    table: list[dict[str, Any]] = []
    steps: list[tuple[float, float, float, int, float]] = []
    feasible: dict[int, list[float]] = {u.key: [] for u in units}
    total_trials = sum(len(u.levels) for u in units)
    done = 0
    for unit in units:
        tried: dict[str, float | None] = {}
        worst = 0.0
        for i, level in enumerate(unit.levels):
            fidelity, value, ok = score({unit.key: level})
            done += 1
            context.progress("sensitivity search", done, total_trials)
            tried[f"{level:g}"] = round(value, 6) if math.isfinite(value) else None
            if not ok:
                done += len(unit.levels) - i - 1
                context.progress("sensitivity search", done, total_trials)
                break
            worst = max(worst, value)
            feasible[unit.key].append(level)
            gain = unit.removed(level) / max(sum(u.size for u in units), 1)
            steps.append((worst, 1.0 - fidelity.cosine, -gain, unit.key, level))
        table.append(
            {"layer": unit.label, "op_type": unit.op_type, "size": unit.size, "scores": tried, "chosen": 0.0}
        )
    steps.sort()
    assignment: dict[int, float] = {}
    prefix: list[tuple[int, float]] = []
    for _, _, _, key, level in steps:
        if _overall(units, assignment) >= target:
            break
        current = assignment.get(key, 0.0)
        if level <= current:
            continue
        # do not overshoot: the smallest feasible level of this unit that reaches the target
        for smaller in feasible[key]:
            if current < smaller < level and _overall(units, {**assignment, key: smaller}) >= target:
                level = smaller
                break
        prefix.append((key, level))
        assignment[key] = level

    def assign(n: int) -> dict[int, float]:
        chosen: dict[int, float] = {}
        for key, level in prefix[:n]:
            chosen[key] = max(chosen.get(key, 0.0), level)
        return chosen

    final: Fidelity | None = None
    taken = len(prefix)
    if prefix:
        final, _, ok = score(assignment)
        if not ok:
            lo, hi = 0, len(prefix)
            final = None
            while hi - lo > 1:
                mid = (lo + hi) // 2
                fidelity, _, ok = score(assign(mid))
                context.progress("combining layers", hi - lo, len(prefix))
                if ok:
                    lo, final = mid, fidelity
                else:
                    hi = mid
            taken = lo
            assignment = assign(lo)
    achieved = _overall(units, assignment)
    by_key = {u.key: i for i, u in enumerate(units)}
    for key, level in assignment.items():
        table[by_key[key]]["chosen"] = level
    result = SearchResult(
        assignment=assignment,
        table=table,
        evaluations=evaluations,
        achieved=achieved,
        target=target,
        fidelity=final,
        limited_by_gates=achieved + 1e-12 < target,
        steps_taken=taken,
    )
    logger.info(
        "sensitivity search: %d evaluations, %.1f%% of %.1f%% reached",
        evaluations,
        100 * achieved,
        100 * target,
    )
    return result


def describe(result: SearchResult, unit_word: str) -> str:
    """One note line about the search outcome."""
    reached = f"reached {100 * result.achieved:.1f}% of the {unit_word} (asked {100 * result.target:.1f}%)"
    why = "; the gates allowed no more" if result.limited_by_gates else ""
    return (
        f"sensitivity search ({result.evaluations} evaluations against the gates): {reached}{why}; "
        "details.search lists the level chosen per layer"
    )


def levels_for(target: float, grid: Sequence[float], cap: float) -> tuple[float, ...]:
    """Ascending levels from ``grid`` plus ``target`` itself, within (0, cap]."""
    values = {round(x, 6) for x in grid if 0 < x <= cap}
    if 0 < target <= cap:
        values.add(round(target, 6))
    return tuple(sorted(values))


# --- the default: the largest amount that keeps the fidelity floor ----------------------------


def magnitude_error(array: np.ndarray, levels: Sequence[float]) -> tuple[float, ...]:
    """Relative squared error ``|W - W_pruned|² / |W|²`` of magnitude pruning at each level.

    The proxy that orders the default search's per-layer steps (no run needed): zeroing the
    ``k`` smallest ``|w|`` removes exactly their squared sum.
    """
    sq = np.sort(np.square(magnitude(array).ravel().astype(np.float64)))
    cumulative = np.cumsum(sq)
    total = float(cumulative[-1]) if cumulative.size else 0.0
    out = []
    for level in levels:
        k = round(level * sq.size)
        if k <= 0 or total <= 0:
            out.append(0.0)
        elif not math.isfinite(total):  # NaN/inf weights: no magnitude to go by
            out.append(float(level))
        else:
            out.append(float(min(1.0, cumulative[k - 1] / total)))
    return tuple(out)


def score_share(scores: np.ndarray, channels: Sequence[int]) -> tuple[float, ...]:
    """Share of a channel group's importance removed with the ``c`` least important channels."""
    values = np.sort(np.asarray(scores, dtype=np.float64))
    finite = np.where(np.isfinite(values), values, 0.0)
    cumulative = np.cumsum(finite)
    total = float(cumulative[-1]) if cumulative.size else 0.0
    return tuple(
        0.0 if c <= 0 or total <= 0 else float(min(1.0, cumulative[c - 1] / total)) for c in channels
    )


def describe_default(result: floor_search.FloorResult, floor: Gates, amount: str, unit_word: str) -> str:
    """The note saying what the default search did, or that nothing kept the floor."""
    bar = floor_search.describe_floor(floor)
    runs = f"{result.evaluations} candidate models run"
    if result.assignment:
        spent = "; the run budget ended the search" if result.budget_spent else ""
        return (
            f"no --{amount} and no gate: the largest {amount} that keeps the fidelity floor ({bar}) "
            f"was searched: {100 * result.achieved:.1f}% {unit_word} reached ({runs}{spent}); "
            f"give --{amount} for an exact amount, or a gate (--min-cosine, --min-agreement, "
            "--max-error) to choose the bar; details.default_search has the runs"
        )
    return (
        f"no --{amount} and no gate: no {amount} tried keeps the fidelity floor ({bar}{floor_search.least_tried(result, unit_word)}), so "
        f"nothing was pruned and the model is unchanged ({runs}); give --{amount} to prune anyway "
        "(the report then shows the damage), or --data so the floor is measured on real inputs"
    )
