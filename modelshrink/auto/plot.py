"""The Pareto plot of ``auto``: every candidate, the frontier, the gates (matplotlib, optional)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

from modelshrink.gates import Gates

if TYPE_CHECKING:
    from modelshrink.auto.search import Tried

__all__ = ["frontier", "pareto_png"]


def _fidelity(t: Tried, gates: Gates) -> float | None:
    if gates.min_agreement is not None and t.top1_agreement is not None:
        return t.top1_agreement
    return t.cosine


def frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other beats on both axes (smaller x and higher y), by x."""
    best: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not best or y > best[-1][1]:
            best.append((x, y))
    return best


def pareto_png(table: Sequence[Tried], goal: str, gates: Gates, chosen: str | None) -> bytes:
    """A PNG: x = size ratio (goal size) or latency ratio (goal latency), y = fidelity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = []
    for t in table:
        y = _fidelity(t, gates)
        x = t.size_ratio if goal == "size" else (1.0 / t.speedup if t.speedup else None)
        if x is not None and y is not None:
            scored.append((t, x, y))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for t, x, y in scored:
        color = "tab:green" if t.status == "passed" else "tab:red"
        ax.scatter([x], [y], color=color, s=60 if t.name == chosen else 25, zorder=3)
        ax.annotate(t.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    line = frontier([(x, y) for _, x, y in scored])
    if line:
        ax.step([p[0] for p in line], [p[1] for p in line], where="post", color="tab:blue", label="frontier")
    floor = gates.min_agreement if gates.min_agreement is not None else gates.min_cosine
    if floor is not None:
        ax.axhline(floor, color="tab:gray", linestyle="--", label="gate")
    ax.set_xlabel("result size / original size" if goal == "size" else "result latency / original latency")
    ax.set_ylabel("top-1 agreement" if gates.min_agreement is not None else "cosine similarity")
    ax.set_title("modelshrink auto: candidates (green passed every gate)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
