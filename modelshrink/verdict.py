"""The verdict every report carries: is the result sound, and if not, what is wrong and what to do.

Gates are what the user asked for; the verdict is what the tool says regardless. A result is
*sound* when its outputs keep the fidelity floor (top-1 agreement >= 99 % on class-like
outputs, cosine >= 0.99 on the others; see :mod:`modelshrink.gates`), the comparison could
be made at all (no NaN/inf), and it is neither larger nor slower than the original. Each
finding is one sentence with the figure that shows it; the advice says what to do. The words
are the same for every command, so a script or a person reads them the same way everywhere.
A verdict never changes the exit code: gates do that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modelshrink.gates import FLOOR_AGREEMENT, FLOOR_COSINE
from modelshrink.techniques.base import Judged
from modelshrink.verify import Fidelity, OutputFidelity

__all__ = ["SLOWER_MARGIN", "Finding", "Verdict", "judge"]

# Latency is noisy: a result is called slower only when its p50 is past this ratio.
SLOWER_MARGIN = 1.10

# The fidelity advice is these parts, joined by "; ".
GIVE_A_GATE = (
    "to keep the model, give a fidelity gate (--min-agreement 0.99 or --min-cosine 0.99): the "
    "tool then searches for what keeps it"
)
# With a fidelity gate the search has run: the advice says what is left.
GATE_FAILED = (
    "nothing the search tried meets the fidelity gate (the notes say why): try a milder setting "
    "or another mode"
)
GATE_UNDER_FLOOR = (
    "the fidelity gate given is met but is below the floor: give --min-agreement 0.99 or "
    "--min-cosine 0.99 and the search keeps what a sound result needs"
)
REAL_DATA_CHECK = "check that --data holds inputs like the ones the model really reads"
SYNTHETIC_DATA_CHECK = "verify on real inputs with --data"
WIN_IT_BACK = "or win the accuracy back with modelshrink distill"
# distill: no search, no mode; what moves its result is the training.
DISTILL_ADVICE = (
    "train on: more --epochs, another --lr (details.history has each epoch's validation loss), "
    "or more --data rows; a student closer to the teacher (less pruned or factorized) starts nearer"
)
DISTILL_UNCHANGED_ADVICE = (
    "no epoch did better than the student as it came on the validation rows (details.history has "
    "each epoch's validation loss): try a lower --lr (e.g. 10x) or more --epochs"
)
UNJUDGED_ADVICE = (
    "fix the inputs: pass --data with real inputs, or set sizes and values with --input-shape "
    "and --input-value"
)
VACUOUS_ADVICE = "pass --data with real inputs, or set real sizes with --input-shape"
SKIPPED_ADVICE = "the skipped list says what was left alone and why"


@dataclass(frozen=True)
class Finding:
    """One thing wrong with the result (or its verification).

    Attributes:
        kind: ``fidelity`` (below the floor), ``nonfinite`` (the result outputs NaN/inf),
            ``unjudged`` (the original's own outputs hold NaN/inf), ``vacuous`` (the
            original's outputs do not change with the synthetic inputs), ``unchanged``
            (the technique changed nothing), ``larger``, ``slower``.
        text: One sentence with the figures.
    """

    kind: str
    text: str


@dataclass(frozen=True)
class Verdict:
    """Sound or not, with findings, advice, and what fidelity was judged against.

    Attributes:
        sound: No finding.
        basis: What the fidelity figures compare with (``the original``, ``the teacher t.onnx``).
        summary: One line: the floor figures and the size/speed outcome.
        findings: What is wrong.
        advice: What to do about it, one line per kind of problem.
    """

    sound: bool
    basis: str
    summary: str
    findings: tuple[Finding, ...] = ()
    advice: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, object]:
        """JSON form."""
        return {
            "sound": self.sound,
            "basis": self.basis,
            "summary": self.summary,
            "floor": {"top1_agreement": FLOOR_AGREEMENT, "cosine": FLOOR_COSINE},
            "findings": [{"kind": f.kind, "text": f.text} for f in self.findings],
            "advice": list(self.advice),
        }


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _one_class(o: OutputFidelity) -> str:
    if o.top1_agreement is None:
        return ""
    return "; its top-1 is one class on every row, so agreement says nothing there"


def _fidelity_findings(fidelity: Fidelity) -> tuple[list[Finding], list[str]]:
    # Synthetic inputs can be far from what a model sees (noise into a text detector): say so.
    on = "" if fidelity.real_data else " (on synthetic inputs)"
    findings: list[Finding] = []
    figures: list[str] = []
    if fidelity.reference_nonfinite:
        names = ", ".join(f"'{o.name}'" for o in fidelity.outputs if o.reference_nonfinite)
        findings.append(
            Finding(
                "unjudged",
                f"the original's own outputs hold {fidelity.reference_nonfinite} NaN or infinite values "
                f"({names}) on these inputs, so fidelity cannot be judged",
            )
        )
        return findings, figures
    if fidelity.nonfinite:
        names = ", ".join(f"'{o.name}'" for o in fidelity.outputs if o.nonfinite)
        findings.append(
            Finding(
                "nonfinite",
                f"the result outputs {fidelity.nonfinite} NaN or infinite values where the original's "
                f"are finite ({names})",
            )
        )
        return findings, figures
    agreements = [
        o.top1_agreement for o in fidelity.outputs if o.top1_informative and o.top1_agreement is not None
    ]
    cosines = [
        o.cosine
        for o in fidelity.outputs
        if not o.top1_informative and o.dtype.startswith(("float", "bfloat"))
    ]
    if agreements:
        figures.append(f"top-1 agreement {_pct(min(agreements))}")
    if cosines:
        figures.append(f"cosine {min(cosines):.4f}")
    for o in fidelity.outputs:
        if o.top1_informative and o.top1_agreement is not None:
            if o.top1_agreement < FLOOR_AGREEMENT:
                findings.append(
                    Finding(
                        "fidelity",
                        f"top-1 agreement on '{o.name}' is {_pct(o.top1_agreement)}, below the "
                        f"{_pct(FLOOR_AGREEMENT)} floor{on}",
                    )
                )
        elif o.dtype.startswith(("float", "bfloat")):
            if o.cosine < FLOOR_COSINE:
                findings.append(
                    Finding(
                        "fidelity",
                        f"cosine similarity of '{o.name}' is {o.cosine:.4f}, below the "
                        f"{FLOOR_COSINE:g} floor (SNR {o.snr_db:.1f} dB){on}{_one_class(o)}",
                    )
                )
        elif not o.identical:
            findings.append(
                Finding(
                    "fidelity",
                    f"'{o.name}' ({o.dtype}) differs from the original's (mean |err| {o.mean_abs_error:.4g})",
                )
            )
    return findings, figures


def _judged_findings(judged: Judged) -> tuple[list[Finding], list[str]]:
    findings: list[Finding] = []
    figures: list[str] = []
    rows = f" on {judged.rows} {judged.where}" if judged.rows else ""
    if judged.agreement is not None:
        figures.append(f"top-1 agreement with {judged.against} {_pct(judged.agreement)}{rows}")
        if judged.agreement < FLOOR_AGREEMENT:
            findings.append(
                Finding(
                    "fidelity",
                    f"top-1 agreement with {judged.against} is {_pct(judged.agreement)}{rows}, below the "
                    f"{_pct(FLOOR_AGREEMENT)} floor",
                )
            )
    if judged.cosine is not None:
        figures.append(f"cosine with {judged.against} {judged.cosine:.4f}")
        if judged.cosine < FLOOR_COSINE:
            findings.append(
                Finding(
                    "fidelity",
                    f"cosine similarity with {judged.against} is {judged.cosine:.4f}{rows}, below the "
                    f"{FLOOR_COSINE:g} floor",
                )
            )
    if not figures:
        figures.append(f"fidelity to {judged.against} as a loss only (no floor applies)")
    return findings, figures


def _fidelity_advice(fidelity_gate: bool | None, real_data: bool) -> str:
    """What to do about fidelity below the floor, given the gate the search had (if any)."""
    if fidelity_gate:
        return f"{GATE_UNDER_FLOOR}; {WIN_IT_BACK}"
    first = GIVE_A_GATE if fidelity_gate is None else GATE_FAILED
    data = SYNTHETIC_DATA_CHECK if not real_data else REAL_DATA_CHECK if fidelity_gate is False else None
    return "; ".join(part for part in (first, data, WIN_IT_BACK) if part)


def judge(
    fidelity: Fidelity | None,
    *,
    size_ratio: float | None,
    slowdown: float | None,
    zlib_ratio: float | None = None,
    latency_where: str = "",
    real_data: bool,
    judged: Judged | None = None,
    changed: bool | None = None,
    fidelity_gate: bool | None = None,
) -> Verdict:
    """The verdict on a result.

    Args:
        fidelity: Result against the original on the verification feeds.
        size_ratio: Result size / original size (files).
        zlib_ratio: The same, zlib-compressed (what unstructured sparsity shrinks).
        slowdown: Result p50 / original p50, or None when latency was not measured.
        latency_where: How latency was measured, for the sentence (``cpu, 1 thread``).
        real_data: Whether the verification feeds came from ``--data``.
        judged: Figures that replace ``fidelity`` for the floor (distill: the teacher).
        changed: Whether the technique changed anything (None for ``compare``).
        fidelity_gate: Whether the fidelity gates a technique searched for held (None: none
            was given, or ``compare``, which searches nothing).
    """
    findings: list[Finding] = []
    advice: list[str] = []
    basis = "the original"
    figures: list[str] = []
    if judged is not None:
        basis = judged.against
        found, figures = _judged_findings(judged)
        findings += found
    elif fidelity is not None:
        found, figures = _fidelity_findings(fidelity)
        findings += found
        if fidelity.constant and not real_data and not found:
            findings.append(
                Finding(
                    "vacuous",
                    f"the original's outputs are the same for all {fidelity.samples} synthetic inputs, "
                    "so agreeing with them shows little",
                )
            )
    kinds = {f.kind for f in findings}
    if "fidelity" in kinds or "nonfinite" in kinds:
        advice.append(DISTILL_ADVICE if judged is not None else _fidelity_advice(fidelity_gate, real_data))
    if "unjudged" in kinds:
        advice.append(UNJUDGED_ADVICE)
    if "vacuous" in kinds:
        advice.append(VACUOUS_ADVICE)
    outcome: list[str] = []
    if changed is False:
        findings.append(Finding("unchanged", "nothing was changed: the result is the original's graph"))
        advice.append(DISTILL_UNCHANGED_ADVICE if judged is not None else SKIPPED_ADVICE)
    if size_ratio is not None:
        outcome.append(f"{size_ratio:.3f}x the size")
        # Larger on disk and compressed alike; an unchanged model is said as such, not as larger.
        compressed_smaller = zlib_ratio is not None and zlib_ratio < 1.0
        if size_ratio > 1.0 and not compressed_smaller and changed is not False:
            findings.append(Finding("larger", f"the result is larger than the original ({size_ratio:.3f}x)"))
            advice.append(SKIPPED_ADVICE)
    if slowdown is not None:
        if slowdown > SLOWER_MARGIN:
            where = f" ({latency_where})" if latency_where else ""
            findings.append(
                Finding("slower", f"the result runs {slowdown:.2f}x slower than the original (p50{where})")
            )
            advice.append("the notes say why it is slower and which option keeps the original's speed")
            outcome.append(f"{slowdown:.2f}x slower")
        elif slowdown < 1 / SLOWER_MARGIN:
            outcome.append(f"{1 / slowdown:.2f}x faster")
        else:
            outcome.append("same speed")
    summary = "; ".join(x for x in (", ".join(dict.fromkeys(figures)), ", ".join(outcome)) if x)
    return Verdict(
        sound=not findings,
        basis=basis,
        summary=summary,
        findings=tuple(findings),
        advice=tuple(dict.fromkeys(advice)),
    )
