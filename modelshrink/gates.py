"""Quality gates: thresholds a result must meet, checked on the report's own figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from modelshrink.errors import ConfigError
from modelshrink.flags import flag

__all__ = [
    "FLOOR_AGREEMENT",
    "FLOOR_COSINE",
    "GATES_PANEL",
    "FidelityFigures",
    "GateResult",
    "Gates",
    "allowance_used",
    "floor_gates",
    "holds",
]

GATES_PANEL = "Quality gates (exit 3 and nothing written when one fails)"

# The fidelity below which a result is called damaged, whatever the user asked: top-1
# agreement on outputs that look like class scores, cosine similarity on the others.
FLOOR_AGREEMENT = 0.99
FLOOR_COSINE = 0.99


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict.

    Attributes:
        name: Flag-style name, e.g. ``max_error``.
        flag: The CLI flag, e.g. ``--max-error``.
        threshold: The limit asked for.
        value: The measured figure (None when it could not be measured).
        passed: Whether the gate held.
        margin: How far inside (positive) or outside (negative) the limit the value is.
    """

    name: str
    flag: str
    threshold: float
    value: float | None
    passed: bool
    margin: float | None

    def describe(self) -> str:
        """One line for the console: ``--max-error 0.01: 0.034 (over by 0.024)``."""
        if self.value is None:
            return f"{self.flag} {self.threshold:g}: not measurable"
        verdict = "ok" if self.passed else ("over" if self.name.startswith("max") else "under")
        by = "" if self.margin is None else f" by {abs(self.margin):.4g}"
        return f"{self.flag} {self.threshold:g}: measured {self.value:.4g} ({verdict}{by})"


@dataclass(frozen=True)
class Gates:
    """The thresholds a user asked for; None means not checked.

    Attributes:
        max_error: Largest allowed max |candidate - original| over all outputs.
        min_cosine: Smallest allowed cosine similarity over all outputs.
        min_agreement: Smallest allowed top-1 agreement over class-like outputs.
        max_size_ratio: Largest allowed result size / original size (file bytes).
        min_speedup: Smallest allowed original p50 / result p50 latency.
    """

    max_error: float | None = flag(
        None, "Max allowed |result - original| over all outputs.", panel=GATES_PANEL, show_default=False
    )
    min_cosine: float | None = flag(
        None, "Min cosine similarity of every output.", panel=GATES_PANEL, show_default=False
    )
    min_agreement: float | None = flag(
        None, "Min top-1 agreement (0..1) of class-score outputs.", panel=GATES_PANEL, show_default=False
    )
    max_size_ratio: float | None = flag(
        None, "Max result/original file size.", panel=GATES_PANEL, show_default=False
    )
    min_speedup: float | None = flag(
        None, "Min original/result p50 latency.", panel=GATES_PANEL, show_default=False
    )

    def __post_init__(self) -> None:
        for name in ("max_error", "max_size_ratio", "min_speedup"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
        # Cosine similarity lies in [-1, 1]; top-1 agreement is a share of samples, in [0, 1].
        for name, low in (("min_cosine", -1.0), ("min_agreement", 0.0)):
            value = getattr(self, name)
            if value is not None and not low <= value <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be within [{low:g}, 1], got {value}")

    @property
    def any(self) -> bool:
        """True when at least one gate is set."""
        return any(v is not None for v in self._values().values())

    @property
    def fidelity_gates(self) -> bool:
        """True when a gate on output fidelity is set (what sensitivity searches aim for)."""
        return any(v is not None for v in (self.max_error, self.min_cosine, self.min_agreement))

    def _values(self) -> dict[str, float | None]:
        return {
            "max_error": self.max_error,
            "min_cosine": self.min_cosine,
            "min_agreement": self.min_agreement,
            "max_size_ratio": self.max_size_ratio,
            "min_speedup": self.min_speedup,
        }

    def check(
        self,
        *,
        max_error: float | None,
        cosine: float | None,
        agreement: float | None,
        size_ratio: float | None,
        speedup: float | None,
    ) -> list[GateResult]:
        """Evaluate the set gates against measured figures."""
        measured = {
            "max_error": max_error,
            "min_cosine": cosine,
            "min_agreement": agreement,
            "max_size_ratio": size_ratio,
            "min_speedup": speedup,
        }
        results = []
        for name, threshold in self._values().items():
            if threshold is None:
                continue
            value = measured[name]
            if value is None or math.isnan(value):
                passed, margin = False, None
            elif name.startswith("max"):
                passed, margin = value <= threshold, threshold - value
            else:
                passed, margin = value >= threshold, value - threshold
            if margin is not None and not math.isfinite(margin):
                margin = None
            results.append(
                GateResult(
                    name=name,
                    flag="--" + name.replace("_", "-"),
                    threshold=threshold,
                    value=value,
                    passed=passed,
                    margin=margin,
                )
            )
        return results

    def passes_fidelity(self, *, max_error: float, cosine: float, agreement: float | None) -> bool:
        """Whether fidelity figures meet the fidelity gates (for sensitivity searches)."""
        results = self.check(
            max_error=max_error, cosine=cosine, agreement=agreement, size_ratio=None, speedup=None
        )
        return all(r.passed for r in results if r.name in ("max_error", "min_cosine", "min_agreement"))


def floor_gates(class_like: Sequence[bool], informative: Sequence[bool] | None = None) -> Gates:
    """The floor as gates, from one flag per output: class-like, and top-1 informative.

    Agreement where some class-like output's top-1 says something (the original's top-1 takes
    two classes or more over the rows); cosine where some output is not class-like, or its
    top-1 is one class on every row (a recogniser reading noise as blank agrees with anything).
    ``Fidelity.cosine`` is the worst over every output, so a model with both is held to both.
    """
    telling = list(informative) if informative is not None else list(class_like)
    judged_by_agreement = [c and t for c, t in zip(class_like, telling, strict=True)]
    return Gates(
        min_agreement=FLOOR_AGREEMENT if any(judged_by_agreement) else None,
        min_cosine=FLOOR_COSINE if not all(judged_by_agreement) or not class_like else None,
    )


class FidelityFigures(Protocol):
    """The figures fidelity gates judge (``verify.Fidelity`` has them)."""

    @property
    def max_abs_error(self) -> float: ...

    @property
    def cosine(self) -> float: ...

    @property
    def top1_agreement(self) -> float | None: ...


def _share(used: float, allowed: float) -> float:
    if math.isnan(used):
        return math.inf  # a figure that could not be measured never holds a gate
    if used <= 0:
        return 0.0
    return used / allowed if allowed > 0 else math.inf


def allowance_used(fidelity: FidelityFigures, gates: Gates) -> float:
    """The worst share of any fidelity gate's allowance used: ``<= 1`` means every gate holds.

    ``max|err| / --max-error``, ``(1 - cosine) / (1 - --min-cosine)``, ``(1 - agreement) /
    (1 - --min-agreement)``. NaN figures (non-finite outputs) count as infinitely bad, and so
    does any damage against a zero allowance. The one score every sensitivity search ranks by.
    """
    terms = [0.0]
    if gates.max_error is not None:
        terms.append(_share(fidelity.max_abs_error, gates.max_error))
    if gates.min_cosine is not None:
        terms.append(_share(1.0 - fidelity.cosine, 1.0 - gates.min_cosine))
    if gates.min_agreement is not None and fidelity.top1_agreement is not None:
        terms.append(_share(1.0 - fidelity.top1_agreement, 1.0 - gates.min_agreement))
    return max(terms)


def holds(fidelity: FidelityFigures, gates: Gates) -> bool:
    """Whether every fidelity gate holds (NaN and infinite errors never do)."""
    return gates.passes_fidelity(
        max_error=fidelity.max_abs_error, cosine=fidelity.cosine, agreement=fidelity.top1_agreement
    )
