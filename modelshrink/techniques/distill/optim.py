"""Optimizer updates, emitted as ONNX nodes at the end of the train step.

Per parameter ``p`` with gradient ``g`` (masked so exact zeros stay zero when asked), at step
``t`` (1-based) with learning rate ``lr`` (both graph inputs, so schedules need no rebuild):

- AdamW (Loshchilov & Hutter; the PyTorch ``torch.optim.AdamW`` update):
  ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
  ``p = p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.
- SGD with momentum (PyTorch semantics, no dampening):
  ``g = g + wd p``, ``buf = mu buf + g``, ``p = p - lr buf``.

All trained parameters live in one flat vector (as do their states), so the update is a
handful of element-wise ops however many tensors the student has. Weight decay is multiplied
by a mask: 1 for parameters of rank >= 2 (matrices, kernels, embeddings), 0 for biases and
normalization scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from onnx import TensorProto

from modelshrink.techniques.distill.grad import Builder

__all__ = ["OptimizerKind", "OptimizerSpec", "SlotNames", "emit_update"]

OptimizerKind = Literal["adamw", "sgd"]


@dataclass(frozen=True)
class OptimizerSpec:
    """Optimizer hyper-parameters (learning rate and step are graph inputs)."""

    kind: OptimizerKind = "adamw"
    weight_decay: float = 0.01
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def slots(self) -> tuple[str, ...]:
        """Names of the per-parameter state tensors."""
        return ("m", "v") if self.kind == "adamw" else ("momentum",)


@dataclass(frozen=True)
class SlotNames:
    """Graph names for one parameter: its input/output and its state inputs/outputs."""

    param: str
    param_out: str
    state_in: tuple[str, ...]
    state_out: tuple[str, ...]


class _Scalars:
    """Per-step scalars shared by every parameter, emitted once."""

    def __init__(self, b: Builder, spec: OptimizerSpec, lr: str, step: str) -> None:
        self.b, self.spec, self.lr, self.step = b, spec, lr, step
        self._cache: dict[str, str] = {}

    def f(self, value: float) -> str:
        return self.b.scalar(value, TensorProto.FLOAT)

    def get(self, key: str) -> str:
        if key in self._cache:
            return self._cache[key]
        b, s = self.b, self.spec
        if key == "lr_wd":  # lr * wd
            value = b.op("Mul", [self.lr, self.f(s.weight_decay)])
        elif key == "step_size":  # lr / (1 - b1^t)
            bc1 = b.op("Sub", [self.f(1.0), b.op("Pow", [self.f(s.beta1), self.step])])
            value = b.op("Div", [self.lr, bc1])
        elif key == "inv_sqrt_bc2":  # 1 / sqrt(1 - b2^t)
            bc2 = b.op("Sub", [self.f(1.0), b.op("Pow", [self.f(s.beta2), self.step])])
            value = b.op("Reciprocal", [b.op("Sqrt", [bc2])])
        else:
            raise KeyError(key)
        self._cache[key] = value
        return value


def emit_update(
    b: Builder,
    spec: OptimizerSpec,
    *,
    lr: str,
    step: str,
    params: list[tuple[SlotNames, str, str | None]],
) -> None:
    """Emit the update of every ``(names, gradient, decay mask or None)``; outputs get the given names."""
    scalars = _Scalars(b, spec, lr, step)
    for names, grad, decay in params:
        if spec.kind == "adamw":
            _adamw(b, spec, scalars, names, grad, decay)
        else:
            _sgd(b, spec, scalars, names, grad, decay)


def _named(b: Builder, op_type: str, inputs: list[str], output: str) -> None:
    node_out = b.op(op_type, inputs)
    # rename the single output of the node just emitted
    b.nodes[-1].output[0] = output
    b.taken.add(output)
    del node_out


def _adamw(
    b: Builder, spec: OptimizerSpec, sc: _Scalars, names: SlotNames, g: str, decay: str | None
) -> None:
    m_in, v_in = names.state_in
    m_out, v_out = names.state_out
    m_scaled = b.op("Mul", [m_in, sc.f(spec.beta1)])
    _named(b, "Add", [m_scaled, b.op("Mul", [g, sc.f(1.0 - spec.beta1)])], m_out)
    v_scaled = b.op("Mul", [v_in, sc.f(spec.beta2)])
    _named(b, "Add", [v_scaled, b.op("Mul", [b.op("Mul", [g, g]), sc.f(1.0 - spec.beta2)])], v_out)
    denom = b.op("Add", [b.op("Mul", [b.op("Sqrt", [v_out]), sc.get("inv_sqrt_bc2")]), sc.f(spec.eps)])
    update = b.op("Mul", [b.op("Div", [m_out, denom]), sc.get("step_size")])
    base = names.param
    if decay is not None and spec.weight_decay:  # p * (1 - lr * wd * mask)
        factor = b.op("Sub", [sc.f(1.0), b.op("Mul", [sc.get("lr_wd"), decay])])
        base = b.op("Mul", [names.param, factor])
    _named(b, "Sub", [base, update], names.param_out)


def _sgd(b: Builder, spec: OptimizerSpec, sc: _Scalars, names: SlotNames, g: str, decay: str | None) -> None:
    if decay is not None and spec.weight_decay:  # g + wd * mask * p
        g = b.op("Add", [g, b.op("Mul", [names.param, b.op("Mul", [decay, sc.f(spec.weight_decay)])])])
    (buf_in,) = names.state_in
    (buf_out,) = names.state_out
    if spec.momentum:
        _named(b, "Add", [b.op("Mul", [buf_in, sc.f(spec.momentum)]), g], buf_out)
        step_dir = buf_out
    else:
        _named(b, "Identity", [buf_in], buf_out)
        step_dir = g
    _named(b, "Sub", [names.param, b.op("Mul", [step_dir, sc.lr])], names.param_out)
