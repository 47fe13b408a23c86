"""Per-layer sensitivity and the tolerance-driven fallback.

Sensitivity: each unit (a weight and its readers) is quantized alone and the model is scored
against the original on the feeds (``context.evaluate``). A unit's *cost* is how far that
score is from the gates, as a fraction of each gate's allowance (``max|err| / --max-error``,
``(1 - cosine) / (1 - --min-cosine)``, ``(1 - agreement) / (1 - --min-agreement)``; the largest
counts), ties broken by the lower SNR.

Fallback: units are ranked by cost, and the ``k`` most costly stay in float, with ``k`` the
smallest number (binary search; one evaluation per step) for which the whole model passes the
fidelity gates. Errors of several layers add up, so the search checks the combined model,
not the per-layer figures.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import onnx_ir as ir

from modelshrink.errors import ConfigError
from modelshrink.gates import Gates, allowance_used, holds
from modelshrink.techniques.base import TechniqueContext
from modelshrink.verify import Fidelity

__all__ = [
    "Scored",
    "Search",
    "SearchUnit",
    "check_agreement_gate",
    "fallback_search",
    "format_table",
    "score_units",
]

logger = logging.getLogger(__name__)

Build = Callable[[frozenset[int]], ir.Model]


class _Named(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...


class SearchUnit(Protocol):
    """What the search ranks: ``plan.Unit`` (weight-only modes) or ``static.StaticUnit``."""

    @property
    def index(self) -> int: ...

    @property
    def layer(self) -> str: ...

    @property
    def op_type(self) -> str: ...

    @property
    def weight(self) -> _Named: ...


@dataclass(frozen=True)
class Scored:
    """A unit quantized alone, scored."""

    unit: SearchUnit
    fidelity: Fidelity
    cost: float

    def row(self) -> dict[str, object]:
        """JSON row for ``details``."""
        f = self.fidelity
        return {
            "layer": self.unit.layer,
            "op_type": self.unit.op_type,
            "weight": self.unit.weight.name,
            "params": self.unit.weight.size,
            "max_abs_error": f.max_abs_error,
            "mean_abs_error": f.mean_abs_error,
            "cosine": f.cosine,
            "snr_db": f.snr_db,
            "top1_agreement": f.top1_agreement,
            "cost": self.cost,
        }


@dataclass(frozen=True)
class Search:
    """Outcome of the fallback search."""

    kept: tuple[Scored, ...]  # left in float, most costly first
    fidelity: Fidelity  # of the chosen candidate
    met: bool
    evaluations: int


def check_agreement_gate(fidelity: Fidelity, gates: Gates) -> None:
    """--min-agreement needs a class-score output (the pipeline says the same, later)."""
    if gates.min_agreement is not None and fidelity.top1_agreement is None:
        names = ", ".join(o.name for o in fidelity.outputs)
        raise ConfigError(
            f"--min-agreement: no output looks like class scores (outputs: {names}); use --max-error or --min-cosine"
        )


def score_units(units: Sequence[SearchUnit], build: Build, context: TechniqueContext) -> list[Scored]:
    """Quantize each unit alone and score it; most costly first."""
    scored: list[Scored] = []
    total = len(units)
    for i, unit in enumerate(units):
        context.progress("sensitivity: one layer at a time", i, total)
        fidelity = context.evaluate(build(frozenset({unit.index})))
        scored.append(Scored(unit, fidelity, allowance_used(fidelity, context.gates)))
        logger.info(
            "sensitivity %s: max err %.4g cosine %.6f", unit.layer, fidelity.max_abs_error, fidelity.cosine
        )
    context.progress("sensitivity: one layer at a time", total, total)
    return sorted(scored, key=lambda s: (-s.cost, s.fidelity.snr_db, s.unit.index))


def fallback_search(
    ranked: Sequence[Scored], build: Build, context: TechniqueContext, full: Fidelity
) -> Search:
    """Fewest most-costly units kept in float so that the whole model passes the gates.

    ``ranked`` is most costly first; ``full`` scores every unit quantized (it fails). Keeping every unit in float would always pass but
    quantize nothing, so the search stops at all but one: if even that fails, the target
    cannot be met and the result says so (``met=False``, all units quantized).
    """
    everything = frozenset(s.unit.index for s in ranked)
    n = len(ranked)
    evaluations = 0
    cache: dict[int, Fidelity] = {0: full}

    def trial(k: int) -> Fidelity:
        nonlocal evaluations
        if k not in cache:
            keep_float = frozenset(s.unit.index for s in ranked[:k])
            cache[k] = context.evaluate(build(everything - keep_float))
            evaluations += 1
            context.progress(
                "fallback: searching layers to keep in float",
                evaluations,
                max(1, math.ceil(math.log2(n + 1)) + 1),
            )
        return cache[k]

    if n == 0:
        raise ValueError("nothing to search")
    if n == 1 or not holds(trial(n - 1), context.gates):
        return Search((), trial(0), False, evaluations)
    lo, hi = 0, n - 1  # trial(lo) fails, trial(hi) passes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if holds(trial(mid), context.gates):
            hi = mid
        else:
            lo = mid
    return Search(tuple(ranked[:hi]), trial(hi), True, evaluations)


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def format_table(ranked: Sequence[Scored], *, with_cost: bool, limit: int = 20) -> str:
    """A fixed-width text table, most costly first (for the report's notes)."""
    header = ("layer", "op", "max|err|", "cosine", "SNR dB", "top-1", "cost")
    rows = [
        (
            s.unit.layer,
            s.unit.op_type,
            _fmt(s.fidelity.max_abs_error),
            f"{s.fidelity.cosine:.6f}",
            _fmt(s.fidelity.snr_db, 3),
            "-" if s.fidelity.top1_agreement is None else f"{s.fidelity.top1_agreement:.2%}",
            _fmt(s.cost, 3) if with_cost else "-",
        )
        for s in ranked[:limit]
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    ]
    if len(ranked) > limit:
        lines.append(f"... {len(ranked) - limit} more layers (see --json details.sensitivity)")
    return "\n".join("  " + line for line in lines)
