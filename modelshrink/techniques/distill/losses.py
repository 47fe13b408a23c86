"""Distillation losses, emitted as ONNX nodes after the student's forward graph.

With student output ``s`` and teacher output ``t`` (rows over the last axis), temperature ``T``:

- ``kl``: ``T^2 * mean_rows( sum_c softmax(t/T)_c * (log_softmax(t/T)_c - log_softmax(s/T)_c) )``
  (Hinton et al.; the ``T^2`` keeps gradient magnitudes comparable across temperatures).
  Outputs produced by ``Softmax`` are turned back into log-probabilities first, outputs of
  ``LogSoftmax`` are used as they are.
- ``mse``: ``mean((s - t)^2)`` over all elements.
- cross-entropy with integer labels ``y``: ``-mean_rows(log_softmax(s)[y])``, mixed as
  ``(1 - alpha) * distillation + alpha * cross_entropy``.
- feature matching: ``mean((f_s - f_t)^2)`` per ``--match student=teacher`` pair, added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from onnx import TensorProto

from modelshrink.techniques.distill.grad import Builder

__all__ = ["LossKind", "LossTerms", "emit_loss"]

LossKind = Literal["kl", "mse"]


@dataclass(frozen=True)
class LossTerms:
    """What the loss is made of.

    Attributes:
        outputs: ``(student output, teacher target input, kind, producer op)`` per output.
        temperature: Softening temperature for ``kl``.
        labels: ``(class output, labels input, number of classes, producer op)`` or None.
        alpha: Weight of the label loss.
        matches: ``(student tensor, teacher feature input)`` pairs.
    """

    outputs: tuple[tuple[str, str, LossKind, str | None], ...]
    temperature: float = 1.0
    labels: tuple[str, str, int, str | None] | None = None
    alpha: float = 0.0
    matches: tuple[tuple[str, str], ...] = ()


def _scalar(b: Builder, value: float) -> str:
    return b.scalar(value, TensorProto.FLOAT)


def _mean_all(b: Builder, x: str) -> str:
    return b.op("ReduceMean", [x], keepdims=0)


def _log_probs_input(b: Builder, x: str, producer: str | None) -> str:
    """Logits-like values: log-probabilities for Softmax outputs, the output otherwise."""
    if producer == "Softmax":
        return b.op("Log", [b.op("Max", [x, _scalar(b, 1e-30)])])
    return x


def _kl(b: Builder, student: str, teacher: str, temperature: float, producer: str | None) -> str:
    s = _log_probs_input(b, student, producer)
    t = _log_probs_input(b, teacher, producer)
    if temperature != 1.0:
        inv_t = _scalar(b, 1.0 / temperature)
        s = b.op("Mul", [s, inv_t])
        t = b.op("Mul", [t, inv_t])
    log_ps = b.op("LogSoftmax", [s], axis=-1)
    log_pt = b.op("LogSoftmax", [t], axis=-1)
    p_t = b.op("Exp", [log_pt])
    rows = b.op("ReduceSum", [b.op("Mul", [p_t, b.op("Sub", [log_pt, log_ps])]), b.ints([-1])], keepdims=0)
    loss = _mean_all(b, rows)
    return b.op("Mul", [loss, _scalar(b, temperature * temperature)]) if temperature != 1.0 else loss


def _mse(b: Builder, student: str, teacher: str) -> str:
    d = b.op("Sub", [student, teacher])
    return _mean_all(b, b.op("Mul", [d, d]))


def _cross_entropy(b: Builder, student: str, labels: str, classes: int, producer: str | None) -> str:
    log_p = b.op("LogSoftmax", [_log_probs_input(b, student, producer)], axis=-1)
    values = b.const(np.asarray([0.0, 1.0], dtype=np.float32), "onehot_values")
    onehot = b.op("OneHot", [labels, b.const(np.asarray(classes, dtype=np.int64), "depth"), values], axis=-1)
    picked = b.op("ReduceSum", [b.op("Mul", [onehot, log_p]), b.ints([-1])], keepdims=0)
    return b.op("Neg", [_mean_all(b, picked)])


def _total(b: Builder, parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else b.op("Sum", parts)


def emit_loss(b: Builder, terms: LossTerms) -> tuple[str, dict[str, str]]:
    """Emit the loss nodes; returns the scalar loss value and the named terms."""
    named: dict[str, str] = {}
    distill = []
    for student, teacher, kind, producer in terms.outputs:
        term = (
            _kl(b, student, teacher, terms.temperature, producer)
            if kind == "kl"
            else _mse(b, student, teacher)
        )
        named[f"{kind}:{student}"] = term
        distill.append(term)
    parts = []
    if distill:
        total = _total(b, distill)
        if terms.labels is not None and terms.alpha != 0.0:
            total = b.op("Mul", [total, _scalar(b, 1.0 - terms.alpha)])
        parts.append(total)
    if terms.labels is not None:
        output, labels, classes, producer = terms.labels
        ce = _cross_entropy(b, output, labels, classes, producer)
        named[f"ce:{output}"] = ce
        parts.append(b.op("Mul", [ce, _scalar(b, terms.alpha)]) if terms.alpha != 1.0 else ce)
    for student, teacher in terms.matches:
        term = _mse(b, student, teacher)
        named[f"match:{student}"] = term
        parts.append(term)
    return _total(b, parts), named
