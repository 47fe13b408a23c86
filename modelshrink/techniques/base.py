"""The contract of a technique: ``(model, config, context) -> TechniqueResult``.

A technique never mutates its input model (it clones first), does no file I/O and prints
nothing. It returns the new model plus what it changed and what it skipped, each skip with a
reason, so the report can always answer "why did nothing shrink?".

The :class:`TechniqueContext` gives a technique what the pipeline already has: the feeds
(calibration data), a way to score a candidate against the original (for sensitivity
searches), the gates, and a progress sink.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from modelshrink.gates import Gates
from modelshrink.options import RuntimeOptions

if TYPE_CHECKING:
    import onnx_ir as ir

    from modelshrink.feeds import Feeds
    from modelshrink.verify import Fidelity

__all__ = [
    "Change",
    "Judged",
    "Progress",
    "Skip",
    "Technique",
    "TechniqueContext",
    "TechniqueResult",
    "silent_progress",
]


@dataclass(frozen=True)
class Change:
    """One thing a technique changed.

    Attributes:
        node: The node (or tensor) name.
        op_type: Its op type.
        what: Short human summary, e.g. ``"int8 per-channel"`` or ``"rank 32 of 256"``.
        params_before: Parameters of this layer before.
        params_after: Parameters after.
        details: Machine-readable extras (native JSON types only).
    """

    node: str
    op_type: str
    what: str
    params_before: int = 0
    params_after: int = 0
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Skip:
    """A node a technique could have acted on but did not, and why."""

    node: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class Judged:
    """What a result is judged on when it is meant to differ from its input.

    ``distill`` changes its input on purpose: its verdict comes from the agreement with the
    teacher, not from the comparison with the student as it came.

    Attributes:
        against: What the figures compare with, in words (``the teacher t.onnx``).
        agreement: Top-1 agreement on class-like outputs, or None.
        cosine: Cosine similarity of the other outputs, or None.
        rows: Rows the figures come from.
        where: Which rows (e.g. ``validation split``).
    """

    against: str
    agreement: float | None = None
    cosine: float | None = None
    rows: int = 0
    where: str = ""


@dataclass(frozen=True)
class TechniqueResult:
    """What a technique returns.

    Attributes:
        model: The new model (never the input object).
        changed: What changed, per node.
        skipped: What was left alone and why.
        notes: Facts the user should read (e.g. "dense kernels give no speed-up").
        details: Technique-specific, machine-readable extras for the JSON report (native JSON
            types only), e.g. a sensitivity table or a training history.
        write: False when the run only measured (e.g. a sensitivity analysis): the pipeline
            checks, verifies and reports ``model`` as usual but writes nothing.
        judged: Set by techniques whose result must differ from their input (distill): the
            figures the verdict uses instead of the result-vs-input fidelity.
    """

    model: ir.Model
    changed: tuple[Change, ...] = ()
    skipped: tuple[Skip, ...] = ()
    notes: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)
    write: bool = True
    judged: Judged | None = None

    @property
    def modified(self) -> bool:
        """True when anything changed."""
        return bool(self.changed)


class Progress(Protocol):
    """Where long loops report progress: ``progress(description, done, total)``."""

    def __call__(self, description: str, done: int, total: int) -> None: ...


def silent_progress(description: str, done: int, total: int) -> None:
    """A progress sink that shows nothing."""


@dataclass(frozen=True)
class TechniqueContext:
    """What the pipeline hands a technique besides model and config.

    Attributes:
        feeds: Input feeds (real data from ``--data`` or synthetic); calibration data.
        evaluate: Scores a candidate model against the original on ``feeds``.
        gates: The gates the final result must pass (targets for sensitivity searches).
        runtime: Session options in use.
        seed: Seed for anything random.
        progress: Progress sink.
        floor: The fidelity a result must keep to be called sound (top-1 agreement >= 0.99 on
            class-like outputs, else cosine >= 0.99), as gates. A technique given neither an
            amount nor a fidelity gate searches for the largest amount that keeps it.
    """

    feeds: Feeds
    evaluate: Callable[[ir.Model], Fidelity]
    gates: Gates = field(default_factory=Gates)
    floor: Gates = field(default_factory=lambda: Gates(min_cosine=0.99))
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    seed: int = 0
    progress: Progress = silent_progress


class Technique(Protocol):
    """``technique(model, config, context) -> TechniqueResult``."""

    def __call__(self, model: ir.Model, config: Any, context: TechniqueContext) -> TechniqueResult: ...
