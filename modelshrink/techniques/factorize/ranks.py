"""Rank selection: the spectrum of a layer and the three rank rules.

A layer's matrix ``S`` (``rows x cols``, possibly activation-whitened) has singular values
``s_1 >= s_2 >= ...``; keeping rank ``r`` costs ``r (rows + cols)`` parameters and keeps the
share ``sum_{i<=r} s_i^2 / sum_i s_i^2`` of its energy (Eckart-Young: the best rank-r
approximation loses exactly the tail energy). All rules round ranks *up* to a multiple of
``rank_multiple`` (never below what the rule asked for) and cap them at ``min(rows, cols)``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Spectrum",
    "allowed_ranks",
    "budget_ranks",
    "max_saving_rank",
    "rank_for_energy",
    "rank_for_ratio",
    "round_rank",
]


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Singular values of one layer's matrix, with what a rank costs and keeps.

    Attributes:
        values: Singular values, descending, float64.
        rows: Rows of the matrix (as stored).
        cols: Columns of the matrix.
    """

    values: np.ndarray
    rows: int
    cols: int

    @property
    def max_rank(self) -> int:
        """``min(rows, cols)``."""
        return min(self.rows, self.cols)

    @property
    def dense_params(self) -> int:
        """Parameters of the unfactorized matrix."""
        return self.rows * self.cols

    def params(self, rank: int) -> int:
        """Parameters of the two factors at ``rank``."""
        return rank * (self.rows + self.cols)

    def energy_kept(self, rank: int) -> float:
        """Share of the squared singular values kept at ``rank`` (1.0 for a zero matrix)."""
        sq = self.values.astype(np.float64) ** 2
        total = float(sq.sum())
        if total <= 0.0:
            return 1.0
        return float(min(1.0, sq[:rank].sum() / total))

    def rel_error(self, rank: int) -> float:
        """Relative Frobenius error of the best rank-``rank`` approximation."""
        return math.sqrt(max(0.0, 1.0 - self.energy_kept(rank)))


def round_rank(rank: int, multiple: int, max_rank: int) -> int:
    """Round up to a multiple of ``multiple``, within ``[1, max_rank]``."""
    rank = max(1, rank)
    rounded = -(-rank // multiple) * multiple
    return max(1, min(rounded, max_rank))


def rank_for_ratio(ratio: float, max_rank: int, multiple: int) -> int:
    """``ceil(ratio * min(rows, cols))``, rounded."""
    return round_rank(math.ceil(ratio * max_rank - 1e-9), multiple, max_rank)


def rank_for_energy(spectrum: Spectrum, energy: float, multiple: int) -> int:
    """Smallest rank keeping at least ``energy`` of the squared singular values, rounded."""
    sq = spectrum.values.astype(np.float64) ** 2
    total = float(sq.sum())
    if total <= 0.0:
        return round_rank(1, multiple, spectrum.max_rank)
    kept = np.cumsum(sq) / total
    # tolerate float round-off so that energy=1.0 selects the numerical rank, not beyond
    rank = int(np.searchsorted(kept, energy - 1e-12, side="left")) + 1
    return round_rank(min(rank, spectrum.max_rank), multiple, spectrum.max_rank)


def max_saving_rank(rows: int, cols: int, min_saving: float) -> int:
    """Largest rank with ``r (rows + cols) <= (1 - min_saving) rows cols`` (0 if none)."""
    return math.floor((1.0 - min_saving) * rows * cols / (rows + cols) + 1e-9)


def allowed_ranks(spectrum: Spectrum, multiple: int, min_saving: float) -> list[int]:
    """Every rank a rule may pick: multiples of ``multiple`` (or the full rank) that save enough."""
    limit = min(spectrum.max_rank, max_saving_rank(spectrum.rows, spectrum.cols, min_saving))
    ranks = list(range(multiple, limit + 1, multiple))
    if spectrum.max_rank <= limit and spectrum.max_rank not in ranks:
        ranks.append(spectrum.max_rank)
    return ranks


def budget_ranks(
    spectra: Sequence[Spectrum], allowed: Sequence[Sequence[int]], reduce_by: int
) -> list[int | None]:
    """Ranks removing at least ``reduce_by`` parameters at the least error per parameter saved.

    Each layer moves through states ``dense -> r_max -> ... -> r_min``; the error of a state
    is the relative squared error ``1 - energy_kept(r)`` (0 when dense). Greedily, the move
    with the smallest ``(error increase) / (parameters saved)`` among all layers is taken,
    where a layer may jump over states (the lower convex hull of its error/size curve), until
    the saving reaches ``reduce_by``. Ties go to the earlier layer. Layers never touched stay
    ``None`` (dense). When every layer is at its smallest rank the result is returned as is.
    """
    states: list[list[tuple[int | None, int, float]]] = []
    for spectrum, ranks in zip(spectra, allowed, strict=True):
        chain: list[tuple[int | None, int, float]] = [(None, spectrum.dense_params, 0.0)]
        for r in sorted(ranks, reverse=True):
            chain.append((r, spectrum.params(r), 1.0 - spectrum.energy_kept(r)))
        states.append(chain)
    position = [0] * len(states)

    def best_move(i: int) -> tuple[float, int] | None:
        chain = states[i]
        _, cost0, err0 = chain[position[i]]
        best: tuple[float, int] | None = None
        for j in range(position[i] + 1, len(chain)):
            _, cost, err = chain[j]
            saved = cost0 - cost
            if saved <= 0:
                continue
            slope = max(0.0, err - err0) / saved
            if best is None or slope < best[0] - 1e-15:
                best = (slope, j)
        return best

    heap: list[tuple[float, int, int]] = []
    for i in range(len(states)):
        move = best_move(i)
        if move is not None:
            heapq.heappush(heap, (move[0], i, move[1]))
    saved_total = 0
    while saved_total < reduce_by and heap:
        _, i, j = heapq.heappop(heap)
        saved_total += states[i][position[i]][1] - states[i][j][1]
        position[i] = j
        move = best_move(i)
        if move is not None:
            heapq.heappush(heap, (move[0], i, move[1]))
    return [states[i][position[i]][0] for i in range(len(states))]
