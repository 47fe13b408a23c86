"""Fidelity of a candidate against the original on the same feeds.

Per output, over all samples: max and mean absolute error, cosine similarity of the flattened
outputs, signal-to-noise ratio ``10 log10(sum(ref^2) / sum((cand-ref)^2))`` in dB, and, for
outputs that look like class scores, top-1 agreement (share of rows whose argmax over the last
axis is the same). ``worst`` takes the worst of each figure across outputs.

The original's outputs are computed once (:class:`Reference`) and reused for every candidate,
which is what sensitivity searches need.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from modelshrink.errors import ModelshrinkError
from modelshrink.feeds import Feeds

if TYPE_CHECKING:
    from modelshrink.runtime import Session

__all__ = [
    "Fidelity",
    "MismatchError",
    "OutputFidelity",
    "Reference",
    "class_like_outputs",
    "is_class_like",
]

_CLASS_NAME = re.compile(r"logit|prob|score|class|label|pred", re.IGNORECASE)
_CLASS_PRODUCERS = {"Softmax", "LogSoftmax"}


class MismatchError(ModelshrinkError):
    """The two models cannot be compared (different outputs, shapes or inputs)."""


@dataclass(frozen=True)
class OutputFidelity:
    """Agreement on one output across all samples.

    ``snr_db`` is ``inf`` when the outputs are identical (``identical`` is then True).
    ``nonfinite`` counts elements that are NaN/inf in the candidate but finite in the original;
    ``reference_nonfinite`` those that are NaN/inf in the original itself: either makes every
    figure but the counts meaningless, so they read NaN (and fail every gate).
    ``varies`` says whether the original's output differed between samples (None with one
    sample): an output that never changes verifies little.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs_error: float
    mean_abs_error: float
    cosine: float
    snr_db: float
    top1_agreement: float | None
    identical: bool
    nonfinite: int
    reference_nonfinite: int = 0
    varies: bool | None = None
    reference_classes: int | None = None

    @property
    def top1_informative(self) -> bool:
        """Whether top-1 agreement says something: a class-like output whose original's top-1
        takes at least two classes over the rows compared (a recogniser that reads noise as
        the blank class on every row agrees 100 % with anything)."""
        return self.top1_agreement is not None and (self.reference_classes or 0) >= 2

    @property
    def judged(self) -> bool:
        """True when the figures mean something (no NaN/inf on either side)."""
        return not self.nonfinite and not self.reference_nonfinite


@dataclass(frozen=True)
class Fidelity:
    """Agreement on every output.

    Attributes:
        outputs: Per output, in the original's output order.
        samples: Number of feeds compared.
        real_data: Whether the feeds came from ``--data``.
        source: Where the feeds came from.
    """

    outputs: tuple[OutputFidelity, ...]
    samples: int
    real_data: bool
    source: str

    @property
    def judged(self) -> bool:
        """True when no output holds NaN/inf on either side (the figures mean something)."""
        return all(o.judged for o in self.outputs)

    @property
    def nonfinite(self) -> int:
        """Elements that are NaN/inf in the candidate where the original's are finite."""
        return sum(o.nonfinite for o in self.outputs)

    @property
    def reference_nonfinite(self) -> int:
        """Elements that are NaN/inf in the original's own outputs."""
        return sum(o.reference_nonfinite for o in self.outputs)

    @property
    def max_abs_error(self) -> float:
        """Worst max abs error over outputs (inf when the candidate went non-finite, NaN when
        the original's outputs are)."""
        if self.reference_nonfinite:
            return math.nan
        if self.nonfinite:
            return math.inf
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    @property
    def mean_abs_error(self) -> float:
        """Worst mean abs error over outputs."""
        if not self.judged:
            return math.nan
        return max((o.mean_abs_error for o in self.outputs), default=0.0)

    @property
    def cosine(self) -> float:
        """Lowest cosine similarity over outputs (NaN when some output holds NaN/inf)."""
        if not self.judged:
            return math.nan
        return min((o.cosine for o in self.outputs), default=1.0)

    @property
    def snr_db(self) -> float:
        """Lowest SNR over outputs (inf when all identical)."""
        if not self.judged:
            return math.nan
        return min((o.snr_db for o in self.outputs), default=math.inf)

    @property
    def top1_agreement(self) -> float | None:
        """Lowest top-1 agreement over class-like outputs; None if there are none."""
        values = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        if not values:
            return None
        return min(values) if self.judged else math.nan

    @property
    def identical(self) -> bool:
        """True when every output matched bit for bit, with finite values throughout."""
        return all(o.identical for o in self.outputs)

    @property
    def constant(self) -> bool:
        """True when no output of the original changed across several samples."""
        flags = [o.varies for o in self.outputs]
        return bool(flags) and all(f is False for f in flags)


def is_class_like(
    name: str, shape: Sequence[int], dtype: np.dtype, producer_op: str | None, *, rank2: bool = True
) -> bool:
    """Whether an output looks like class scores (so top-1 agreement means something).

    Float, last axis of at least 2, and either a Softmax / LogSoftmax producer, a name like
    logits/probs/scores, or (``rank2``) rank 2 (``[batch, classes]``).
    """
    if not np.issubdtype(dtype, np.floating) or len(shape) < 2 or shape[-1] < 2:
        return False
    if _class_evidence(name, producer_op):
        return True
    return rank2 and len(shape) == 2 and producer_op not in {"ReduceMean", "ReduceSum", "Flatten"}


def _class_evidence(name: str, producer_op: str | None) -> bool:
    return producer_op in _CLASS_PRODUCERS or bool(_CLASS_NAME.search(name))


def class_like_outputs(outputs: Sequence[tuple[str, Sequence[int], np.dtype, str | None]]) -> list[bool]:
    """:func:`is_class_like` for each ``(name, shape, dtype, producer op)`` of one model.

    Where one output shows it holds class scores (a Softmax producer, a class-like name), the
    others of rank 2 are not taken for class scores on their shape alone: beside a face
    detector's Softmax, ``[N, 4]`` boxes and ``[N, 10]`` landmarks are regressions, and
    top-1 agreement on them would judge an argmax nobody reads.
    """
    evidence = [_class_evidence(name, producer) for name, _, _, producer in outputs]
    shown = sum(evidence)
    return [
        is_class_like(name, shape, dtype, producer, rank2=shown - own == 0)
        for (name, shape, dtype, producer), own in zip(outputs, evidence, strict=True)
    ]


class _Accumulator:
    """Running sums for one output, so no sample's outputs need to be kept."""

    def __init__(self, class_like: bool) -> None:
        self.class_like = class_like
        self.count = 0
        self.sum_abs = 0.0
        self.max_abs = 0.0
        self.dot = 0.0
        self.ref2 = 0.0
        self.cand2 = 0.0
        self.err2 = 0.0
        self.agree = 0
        self.rows = 0
        self.nonfinite = 0
        self.reference_nonfinite = 0
        self.identical = True

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        numeric = ref.dtype.kind in "fiub" and cand.dtype.kind in "fiub"
        same = ref.dtype == cand.dtype and np.array_equal(
            ref, cand, equal_nan=numeric and ref.dtype.kind == "f"
        )
        if self.identical and not same:
            self.identical = False
        if not numeric:
            # strings and the like: count mismatches as errors of 1
            diff = (ref != cand).astype(np.float64).ravel()
            r = np.zeros_like(diff)
            c = diff
        else:
            r = ref.astype(np.float64).ravel()
            c = cand.astype(np.float64).ravel()
            ref_ok = np.isfinite(r)
            self.reference_nonfinite += int(r.size - np.count_nonzero(ref_ok))
            bad = ref_ok & ~np.isfinite(c)
            self.nonfinite += int(bad.sum())
            keep = ref_ok & np.isfinite(c)
            if not keep.all():
                r, c = r[keep], c[keep]
            diff = c - r
        absdiff = np.abs(diff)
        self.count += absdiff.size
        if absdiff.size:
            self.sum_abs += float(absdiff.sum())
            self.max_abs = max(self.max_abs, float(absdiff.max()))
        self.dot += float(np.dot(r, c))
        self.ref2 += float(np.dot(r, r))
        self.cand2 += float(np.dot(c, c))
        self.err2 += float(np.dot(diff, diff))
        if self.class_like:
            a = np.argmax(ref.reshape(-1, ref.shape[-1]), axis=-1)
            b = np.argmax(cand.reshape(-1, cand.shape[-1]), axis=-1)
            self.agree += int((a == b).sum())
            self.rows += a.size

    def result(
        self, name: str, shape: tuple[int, ...], dtype: str, varies: bool | None, classes: int | None
    ) -> OutputFidelity:
        if self.ref2 == 0.0 and self.cand2 == 0.0:
            cosine = 1.0
        elif self.ref2 == 0.0 or self.cand2 == 0.0:
            cosine = 0.0
        else:
            cosine = float(np.clip(self.dot / math.sqrt(self.ref2 * self.cand2), -1.0, 1.0))
        if self.err2 == 0.0:
            snr = math.inf
        elif self.ref2 == 0.0:
            snr = -math.inf
        else:
            snr = 10.0 * math.log10(self.ref2 / self.err2)
        return OutputFidelity(
            name=name,
            shape=shape,
            dtype=dtype,
            max_abs_error=self.max_abs if not self.nonfinite else math.inf,
            mean_abs_error=self.sum_abs / self.count if self.count else 0.0,
            cosine=cosine,
            snr_db=snr,
            top1_agreement=(self.agree / self.rows if self.rows else 1.0) if self.class_like else None,
            identical=self.identical and not self.nonfinite and not self.reference_nonfinite,
            nonfinite=self.nonfinite,
            reference_nonfinite=self.reference_nonfinite,
            varies=varies,
            reference_classes=classes,
        )


class Reference:
    """The original model's outputs on a set of feeds, computed once.

    Args:
        session: Session of the original model.
        feeds: The feeds.
        model: The original IR (to find which op produces each output), optional.
        on_progress: Called with (done, total) while running the original.
    """

    def __init__(
        self,
        session: Session,
        feeds: Feeds,
        model: ir.Model | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.session: Session | None = session
        self.input_names = list(session.input_names)
        self.feeds = feeds
        self.output_names = list(session.output_names)
        producers: dict[str, str] = {}
        if model is not None:
            for value in model.graph.outputs:
                node = value.producer()
                if value.name and node is not None:
                    producers[value.name] = node.op_type
        self.outputs: list[list[np.ndarray]] = []
        total = len(feeds.samples)
        for i, feed in enumerate(feeds.samples):
            self.outputs.append(session.run(_select(feed, session.input_names)))
            if on_progress is not None:
                on_progress(i + 1, total)
        first = self.outputs[0] if self.outputs else []
        self.class_like = class_like_outputs(
            [
                (name, arr.shape, arr.dtype, producers.get(name))
                for name, arr in zip(self.output_names, first, strict=True)
            ]
        )
        self.varies: list[bool | None] = [
            _varies([outs[i] for outs in self.outputs]) for i in range(len(self.output_names))
        ]
        self.classes: list[int | None] = [
            _classes([outs[i] for outs in self.outputs]) if class_like else None
            for i, class_like in enumerate(self.class_like)
        ]

    @property
    def top1_informative(self) -> list[bool]:
        """Per output: class-like, and the original's top-1 takes two classes or more."""
        return [c is not None and c >= 2 for c in self.classes]

    def release_session(self) -> None:
        """Drop the original's session (its outputs are cached); frees its weights' memory."""
        self.session = None

    def compare(
        self,
        candidate: Session,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> Fidelity:
        """Run ``candidate`` on the same feeds and measure agreement.

        Raises:
            MismatchError: Outputs or inputs differ in name, or outputs in shape.
        """
        missing_out = [n for n in self.output_names if n not in candidate.output_names]
        if missing_out:
            raise MismatchError(
                f"{candidate.label}: has no output '{missing_out[0]}' (it has: "
                f"{', '.join(candidate.output_names)}); the models are not comparable"
            )
        extra_in = [n for n in candidate.input_names if n not in self.input_names]
        if extra_in:
            raise MismatchError(
                f"{candidate.label}: needs input '{extra_in[0]}', which the original does not "
                "have; the models are not comparable"
            )
        accs = [_Accumulator(c) for c in self.class_like]
        total = len(self.feeds.samples)
        for i, (feed, ref_outs) in enumerate(zip(self.feeds.samples, self.outputs, strict=True)):
            outs = candidate.run(_select(feed, candidate.input_names), self.output_names)
            for name, acc, ref, out in zip(self.output_names, accs, ref_outs, outs, strict=True):
                if ref.shape != out.shape:
                    raise MismatchError(
                        f"{candidate.label}: output '{name}' has shape {list(out.shape)}, the "
                        f"original {list(ref.shape)}"
                    )
                acc.add(ref, out)
            if on_progress is not None:
                on_progress(i + 1, total)
        first = self.outputs[0] if self.outputs else []
        results = tuple(
            acc.result(name, tuple(int(d) for d in ref.shape), str(ref.dtype), varies, classes)
            for name, acc, ref, varies, classes in zip(
                self.output_names, accs, first, self.varies, self.classes, strict=True
            )
        )
        return Fidelity(results, len(self.feeds.samples), self.feeds.real, self.feeds.source)


def _varies(arrays: Sequence[np.ndarray]) -> bool | None:
    """Whether an output differs between samples (None with fewer than two)."""
    if len(arrays) < 2:
        return None
    first = arrays[0]
    for other in arrays[1:]:
        if other.shape != first.shape or other.dtype != first.dtype:
            return True
        if not np.array_equal(first, other, equal_nan=first.dtype.kind == "f"):
            return True
    return False


def _classes(arrays: Sequence[np.ndarray]) -> int:
    """Distinct top-1 classes (argmax over the last axis) across all rows of all samples."""
    seen: set[int] = set()
    for a in arrays:
        if a.ndim and a.shape[-1]:
            seen.update(np.unique(np.argmax(a.reshape(-1, a.shape[-1]), axis=-1)).tolist())
    return len(seen)


def _select(feed: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    return {n: feed[n] for n in names if n in feed}
