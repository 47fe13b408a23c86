"""Tolerance-driven rank choice: a per-layer sensitivity search against the fidelity gates.

1. Sensitivity: each layer alone is factorized at a ladder of ranks (largest first) and the
   model is scored with ``context.evaluate``. A score's *gate usage* ``u`` is the worst of
   ``max_error / --max-error``, ``(1 - cosine) / (1 - --min-cosine)`` and
   ``(1 - agreement) / (1 - --min-agreement)``: ``u <= 1`` means the gates hold. Descending
   stops at the first rank that breaks the gates alone (lower ranks only get worse).
2. Combination: for a threshold ``t``, every layer takes its smallest rank with ``u <= t``
   (or stays dense). Errors add up, so the largest ``t`` whose combined model still passes
   the gates is found by bisection over the measured ``u`` values.
3. Refinement: one greedy pass tries each factorized layer one rung lower (largest saving
   first) and keeps the step when the combined model still passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from modelshrink.errors import ConfigError
from modelshrink.gates import Gates, allowance_used
from modelshrink.techniques import floor_search
from modelshrink.techniques.base import TechniqueContext
from modelshrink.techniques.factorize.ranks import Spectrum, rank_for_energy, round_rank
from modelshrink.verify import Fidelity

__all__ = ["FLOOR_ENERGIES", "LADDER_FRACTIONS", "SearchResult", "floor_ranks", "search_ranks"]

LADDER_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4)

Build = Callable[[Mapping[int, int]], ir.Model]


@dataclass
class SearchResult:
    """Chosen ranks and what the search measured.

    Attributes:
        ranks: Per group: the chosen rank, or None (dense).
        single: Per group: ``{rank: fidelity figures of that layer alone}``.
        evaluations: Models scored.
        threshold: The gate usage threshold chosen (None when nothing could be factorized).
        combined: Fidelity figures of the chosen combination.
        refined: Layers moved one rung lower by the refinement pass.
    """

    ranks: list[int | None]
    single: list[dict[int, dict[str, Any]]] = field(default_factory=list)
    evaluations: int = 0
    threshold: float | None = None
    combined: dict[str, Any] | None = None
    refined: int = 0


def _figures(fidelity: Fidelity, gates: Gates) -> dict[str, Any]:
    return {
        "max_abs_error": fidelity.max_abs_error,
        "cosine": fidelity.cosine,
        "top1_agreement": fidelity.top1_agreement,
        "gate_usage": allowance_used(fidelity, gates),
    }


def ladder(spectrum: Spectrum, allowed: Sequence[int], multiple: int) -> list[int]:
    """Ranks tried per layer: fractions of the full rank that are allowed, plus the largest."""
    if not allowed:
        return []
    ok = set(allowed)
    ranks = {
        round_rank(math.ceil(f * spectrum.max_rank), multiple, spectrum.max_rank) for f in LADDER_FRACTIONS
    }
    ranks.add(round_rank(multiple, multiple, spectrum.max_rank))
    chosen = sorted(r for r in ranks if r in ok)
    if max(allowed) not in chosen:
        chosen.append(max(allowed))
    return sorted(chosen)


def search_ranks(
    build: Build,
    spectra: Sequence[Spectrum],
    allowed: Sequence[Sequence[int]],
    multiple: int,
    context: TechniqueContext,
) -> SearchResult:
    """Smallest ranks (on the ladder) whose combination passes the fidelity gates."""
    gates = context.gates
    ladders = [ladder(s, a, multiple) for s, a in zip(spectra, allowed, strict=True)]
    result = SearchResult(ranks=[None] * len(spectra), single=[{} for _ in spectra])
    total = sum(len(lad) for lad in ladders) + max(1, math.ceil(math.log2(1 + sum(map(len, ladders)))))
    done = 0

    def score(assignment: Mapping[int, int]) -> Fidelity:
        nonlocal done
        fidelity = context.evaluate(build(assignment))
        if gates.min_agreement is not None and fidelity.top1_agreement is None:
            names = ", ".join(o.name for o in fidelity.outputs)
            raise ConfigError(
                f"--min-agreement: no output looks like class scores (outputs: {names}); "
                "use --max-error or --min-cosine"
            )
        result.evaluations += 1
        done += 1
        context.progress("sensitivity search", min(done, total), total)
        return fidelity

    for g, lad in enumerate(ladders):
        for rank in sorted(lad, reverse=True):
            fidelity = score({g: rank})
            result.single[g][rank] = _figures(fidelity, gates)
            if not gates.passes_fidelity(
                max_error=fidelity.max_abs_error, cosine=fidelity.cosine, agreement=fidelity.top1_agreement
            ):
                break

    def assignment(threshold: float) -> dict[int, int]:
        chosen: dict[int, int] = {}
        for g, table in enumerate(result.single):
            ok = [r for r, fig in table.items() if fig["gate_usage"] <= threshold]
            if ok:
                chosen[g] = min(ok)
        return chosen

    thresholds = sorted(
        {fig["gate_usage"] for table in result.single for fig in table.values() if fig["gate_usage"] <= 1}
    )
    lo, hi = -1, len(thresholds) - 1  # thresholds[lo] passes (lo = -1: nothing factorized)
    best: tuple[dict[int, int], dict[str, Any]] | None = None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        chosen = assignment(thresholds[mid])
        fidelity = score(chosen)
        if gates.passes_fidelity(
            max_error=fidelity.max_abs_error, cosine=fidelity.cosine, agreement=fidelity.top1_agreement
        ):
            lo = mid
            best = (chosen, _figures(fidelity, gates))
        else:
            hi = mid - 1
    if lo >= 0 and best is not None:  # best is the assignment of thresholds[lo]
        result.threshold = thresholds[lo]
        chosen, figures = best
        lower = {g: [r for r in ladders[g] if r < chosen[g]] for g in chosen}
        order = sorted(
            (g for g in chosen if lower[g]),
            key=lambda g: (-(spectra[g].params(chosen[g]) - spectra[g].params(max(lower[g]))), g),
        )
        total += len(order)
        for g in order:
            trial = {**chosen, g: max(lower[g])}
            fidelity = score(trial)
            if gates.passes_fidelity(
                max_error=fidelity.max_abs_error, cosine=fidelity.cosine, agreement=fidelity.top1_agreement
            ):
                chosen, figures = trial, _figures(fidelity, gates)
                result.refined += 1
        result.combined = figures
        for g, rank in chosen.items():
            result.ranks[g] = rank
    context.progress("sensitivity search", total, total)
    return result


# --- the default: the smallest ranks that keep the fidelity floor ------------------------------

# Energy kept per layer, tried as whole-model settings (bisection), most kept first.
FLOOR_ENERGIES = (0.9999, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5)


def floor_ranks(
    build: Build,
    spectra: Sequence[Spectrum],
    allowed: Sequence[Sequence[int]],
    multiple: int,
    context: TechniqueContext,
    *,
    total: int,
    budget: int = floor_search.DEFAULT_BUDGET,
) -> tuple[list[int | None], floor_search.FloorResult]:
    """The smallest ranks whose model keeps ``context.floor``, in a few runs (see :mod:`_floor`).

    Each layer's states are dense, then its allowed ranks from the largest down; the proxy of a
    state's damage is the energy it loses (``1 - energy_kept``), and the uniform settings keep
    the same share of energy in every layer (:data:`FLOOR_ENERGIES`).

    Args:
        build: Builds the model with layer ``g`` at rank ``ranks[g]``.
        spectra: Per layer, its spectrum.
        allowed: Per layer, the ranks it may take (ascending; empty: it stays dense).
        multiple: ``--rank-multiple``.
        context: Gives the floor, ``evaluate`` and progress.
        total: Parameters the share removed is counted in.
        budget: Most candidates to run.

    Returns:
        Per layer the rank chosen (None: dense), and how it was found.
    """
    states: list[list[int]] = [sorted(a, reverse=True) for a in allowed]
    ladders = [
        floor_search.Ladder(
            g,
            (0, *(s.dense_params - s.params(r) for r in ranks)),
            (0.0, *(1.0 - s.energy_kept(r) for r in ranks)),
        )
        for g, (s, ranks) in enumerate(zip(spectra, states, strict=True))
        if ranks
    ]

    def state_for(g: int, energy: float) -> int:
        want = rank_for_energy(spectra[g], energy, multiple)
        fits = [i for i, r in enumerate(states[g], start=1) if r >= want]
        return fits[-1] if fits else 0

    family: list[dict[int, int]] = []
    for energy in FLOOR_ENERGIES:
        setting = {lad.key: state_for(lad.key, energy) for lad in ladders}
        setting = {g: i for g, i in setting.items() if i > 0}
        if setting and (not family or setting != family[-1]):
            family.append(setting)

    def ranks_of(assignment: Mapping[int, int]) -> dict[int, int]:
        return {g: states[g][i - 1] for g, i in assignment.items() if i > 0}

    found = floor_search.largest_keeping_floor(
        ladders, family, lambda a: context.evaluate(build(ranks_of(a))), context, total=total, budget=budget
    )
    chosen = ranks_of(found.assignment)
    return [chosen.get(g) for g in range(len(spectra))], found
