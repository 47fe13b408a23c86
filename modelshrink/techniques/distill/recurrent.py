"""Gradient rules for the recurrent layers ``LSTM``, ``GRU`` and ``RNN``: backpropagation through time.

Per direction, in *processing order* (time reversed within each sequence's length for the
reverse direction, which is what ``ReverseSequence`` does), with ``H_prev`` the states before
each step (``initial_h`` then ``Y`` shifted by one step), and ``dY`` masked to the valid steps:

- the forward gates of every step are recomputed at once from ``X`` and ``H_prev`` (one MatMul
  each: they depend on the previous state only through ``H_prev``, which ``Y`` holds); the
  LSTM cell state needs its own recurrence ``c_t = f_t * c_(t-1) + i_t * g_t`` (a Scan of two
  element-wise ops per step);
- everything of the backward step that does not depend on the carried gradient is an
  element-wise coefficient computed for all steps at once; the reverse recurrence then holds
  only what must be sequential: ``dh = carry + dY_t`` and one ``MatMul`` by ``R`` per step
  (for the LSTM also ``dc = carry_c + dh * o * h'(c)``, ``dc_prev = dc * f``):

    RNN   h = f(X W^T + H_prev R^T + b):      da = dh * f'(h);  dH_prev = da R
    GRU   h = (1 - z) * n + z * H_prev:        dn = dh (1 - z) g'(n), dz = dh (H_prev - n) f'(z),
          n = g(X W_h^T + r * (H_prev R_h^T + Rb_h) + Wb_h)  (linear_before_reset=1): dr = dn (H_prev R_h^T + Rb_h) f'(r)
          n = g(X W_h^T + (r * H_prev) R_h^T + Rb_h + Wb_h)  (linear_before_reset=0): dr = (dn R_h) H_prev f'(r)
    LSTM  c = f * c_prev + i * g,  h = o * h(c): do = dh h(c) f'(o), dc += dh o h'(c),
          di = dc g f'(i), df = dc c_prev f'(f), dg = dc i g'(g),   dc_prev = dc * f

- the weight gradients are then one ``Gemm`` each over all steps (``dW = dG^T X``,
  ``dR = dG^T H_prev``, ``dB = sum dG``) and ``dX = dG W``.

Padding steps (``t >= sequence_lens[b]``) contribute nothing: their coefficients are zero and
the carried gradient passes them unchanged (the state is not updated there), so ``dY_h``
reaches the last valid step. The reverse recurrence is a ``Scan`` (``scan_*_directions`` 1)
over the steps; unrolling it (static lengths only) is kept for measurements (``FORM``).

Refused with a :class:`GradientError` naming the node: activations other than Sigmoid, Tanh
and Relu, ``clip``, ``input_forget=1``, peephole weights ``P``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper

from modelshrink.techniques.distill.grad import Builder, GradientError, Rule, RuleContext

__all__ = ["RECURRENT_RULES"]

Grads = list[str | None]
# "scan": one Scan over the steps (any length); "unroll": the steps as separate nodes (static
# lengths only). Measured on onnxruntime CPU (see the README / report): Scan is the default.
Form = Literal["scan", "unroll"]
FORM: Form = "scan"

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
_SUPPORTED_ACTIVATIONS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}
_INT_MAX = 2**62


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            if isinstance(value, bytes):
                return value.decode()
            if isinstance(value, list):
                return [v.decode() if isinstance(v, bytes) else v for v in value]
            return value
    return default


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if i < len(node.input) else ""


@dataclass(frozen=True)
class _Spec:
    """What a recurrent node computes."""

    kind: str
    hidden: int
    reverse: tuple[bool, ...]  # per direction
    layout: int
    activations: tuple[tuple[str, ...], ...]  # per direction
    linear_before_reset: int


def _spec(ctx: RuleContext, node: onnx.NodeProto) -> _Spec:
    kind = node.op_type
    direction = str(_attr(node, "direction", "forward"))
    reverse = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}.get(direction)
    if reverse is None:
        raise GradientError(f"direction '{direction}' is not one of forward, reverse, bidirectional")
    if _attr(node, "clip") is not None:
        raise GradientError(
            "'clip' is set: the gradient of a clipped cell is not emitted (export the layer without clip, "
            "or freeze the weights before it with --train)"
        )
    if int(_attr(node, "input_forget", 0)):  # type: ignore[call-overload]
        raise GradientError("input_forget=1 (coupled input and forget gates) has no gradient rule")
    if kind == "LSTM" and _input(node, 7):
        raise GradientError("peephole weights (input P) have no gradient rule")
    default = _DEFAULT_ACTIVATIONS[kind]
    given = _attr(node, "activations")
    names: list[str] = list(given) if given else list(default) * len(reverse)  # type: ignore[call-overload]
    if len(names) != len(default) * len(reverse):
        raise GradientError(f"{len(names)} activations for {len(reverse)} direction(s) of {len(default)}")
    acts = []
    for name in names:
        known = _SUPPORTED_ACTIVATIONS.get(name.lower())
        if known is None:
            raise GradientError(
                f"activation '{name}' has no gradient rule here (Sigmoid, Tanh and Relu have); "
                f"activations={names}"
            )
        acts.append(known)
    per_dir = tuple(tuple(acts[d * len(default) : (d + 1) * len(default)]) for d in range(len(reverse)))
    hidden = _attr(node, "hidden_size")
    if hidden is None:
        rdims = ctx.dims(node.input[2])
        if not isinstance(rdims[-1], int):
            raise GradientError("hidden_size is not set and R's shape is not static")
        hidden = rdims[-1]
    return _Spec(
        kind,
        int(hidden),  # type: ignore[call-overload]
        reverse,
        int(_attr(node, "layout", 0)),  # type: ignore[call-overload]
        per_dir,
        int(_attr(node, "linear_before_reset", 0)),  # type: ignore[call-overload]
    )


def _prepare(node: onnx.NodeProto, builder: Builder) -> onnx.NodeProto:
    """Name the Y output (every step's state): the backward reads H_prev from it."""
    if node.output and node.output[0]:
        return node
    new = onnx.NodeProto()
    new.CopyFrom(node)
    if not new.output:
        new.output.append("")
    new.output[0] = builder.fresh(f"{node.name or node.op_type}_Y")
    return new


# --- small emitters ---------------------------------------------------------------------------


class _Emit:
    """Element-wise helpers in one element type, over a builder (the rule's or a loop body's)."""

    def __init__(self, b: Builder, elem: int) -> None:
        self.b = b
        self.elem = elem

    def op(self, op_type: str, inputs: Sequence[str], **attrs: Any) -> str:
        name: str = self.b.op(op_type, inputs, **attrs)
        return name

    def scalar(self, value: float) -> str:
        return self.b.scalar(value, self.elem)

    def mul(self, *xs: str) -> str:
        out = xs[0]
        for x in xs[1:]:
            out = self.op("Mul", [out, x])
        return out

    def add(self, a: str, b: str) -> str:
        return self.op("Add", [a, b])

    def one_minus(self, x: str) -> str:
        return self.op("Sub", [self.scalar(1.0), x])

    def take(self, x: str, index: int, axis: int) -> str:
        """``x`` at ``index`` along ``axis`` (the axis removed)."""
        return self.op("Gather", [x, self.b.const(np.asarray(index, dtype=np.int64), "index")], axis=axis)

    def slice0(self, x: str, start: int, end: int, axis: int = 0) -> str:
        return self.op("Slice", [x, self.b.ints([start]), self.b.ints([end]), self.b.ints([axis])])

    def unsqueeze0(self, x: str) -> str:
        return self.op("Unsqueeze", [x, self.b.ints([0])])

    def activation(self, name: str, x: str) -> str:
        return self.op(name, [x])

    def derivative(self, name: str, y: str) -> str:
        """f'(x) written with y = f(x)."""
        if name == "Sigmoid":
            return self.mul(y, self.one_minus(y))
        if name == "Tanh":
            return self.one_minus(self.mul(y, y))
        return self.op("Cast", [self.op("Greater", [y, self.scalar(0.0)])], to=self.elem)  # Relu


def _value_info(name: str, elem: int, rank: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, [None] * rank)


Step = Callable[[_Emit, list[str], list[str]], tuple[list[str], list[str]]]


def _recurrence(
    e: _Emit,
    *,
    carries: Sequence[tuple[str, int]],
    sequences: Sequence[tuple[str, int]],
    outputs: Sequence[int],
    step: Step,
    reverse: bool,
    steps: int | None,
    form: Form,
) -> tuple[list[str], list[str]]:
    """Run ``step(emit, carries, slices) -> (new carries, outputs)`` over the time axis (0) of
    ``sequences`` (name, rank), forward or reverse, from ``carries`` (name, rank).

    Returns the final carries and the step outputs stacked along time (in time order); each
    output's per-step rank is given in ``outputs``.
    """
    if form == "unroll" and steps is not None:
        return _unrolled(e, carries, sequences, step, reverse, steps)
    b = e.b
    sub = b.child()
    inner = _Emit(sub, e.elem)
    carry_in = [sub.fresh("carry") for _ in carries]
    slice_in = [sub.fresh("step") for _ in sequences]
    new_carries, step_outs = step(inner, list(carry_in), list(slice_in))
    body_outs = []
    for name in [*new_carries, *step_outs]:
        # a body output must be produced in the body, once (not a body input or a repeat)
        if name in carry_in or name in slice_in or name in body_outs:
            name = sub.op("Identity", [name])
        body_outs.append(name)
    body = helper.make_graph(
        sub.nodes,
        sub.fresh("bptt_body"),
        [_value_info(n, e.elem, r) for n, (_, r) in zip(carry_in, carries, strict=True)]
        + [_value_info(n, e.elem, r - 1) for n, (_, r) in zip(slice_in, sequences, strict=True)],
        [_value_info(n, e.elem, r) for n, (_, r) in zip(body_outs, carries, strict=False)]
        + [_value_info(n, e.elem, r) for n, r in zip(body_outs[len(carries) :], outputs, strict=True)],
    )
    b.initializers.extend(sub.initializers)
    direction = 1 if reverse else 0
    results = b.op(
        "Scan",
        [c for c, _ in carries] + [s for s, _ in sequences],
        outputs=len(carries) + len(outputs),
        body=body,
        num_scan_inputs=len(sequences),
        scan_input_directions=[direction] * len(sequences),
        scan_output_directions=[direction] * len(outputs),
    )
    results = [results] if isinstance(results, str) else list(results)
    return results[: len(carries)], results[len(carries) :]


def _unrolled(
    e: _Emit,
    carries: Sequence[tuple[str, int]],
    sequences: Sequence[tuple[str, int]],
    step: Step,
    reverse: bool,
    steps: int,
) -> tuple[list[str], list[str]]:
    b = e.b
    pieces: list[list[str]] = []
    for name, _ in sequences:
        parts = b.op("Split", [name, b.ints([1] * steps)], axis=0, outputs=steps) if steps > 1 else [name]
        parts = [parts] if isinstance(parts, str) else list(parts)
        pieces.append([b.op("Squeeze", [p, b.ints([0])]) for p in parts])
    carry = [c for c, _ in carries]
    per_step: dict[int, list[str]] = {}
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        carry, outs = step(e, carry, [p[t] for p in pieces])
        per_step[t] = outs
    n_out = len(per_step[0]) if steps else 0
    stacked = []
    for k in range(n_out):
        parts = [e.unsqueeze0(per_step[t][k]) for t in range(steps)]
        stacked.append(parts[0] if len(parts) == 1 else b.op("Concat", parts, axis=0))
    return carry, stacked


# --- the rule --------------------------------------------------------------------------------


@dataclass
class _Node:
    """The node's values in time-major form, shared by its directions."""

    ctx: RuleContext
    e: _Emit
    spec: _Spec
    x: str  # [T, B, I]
    y: str  # [T, D, B, H]
    dy: str | None  # [T, D, B, H]
    dyh: str | None  # [D, B, H]
    dyc: str | None
    h0: str | None  # [D, B, H]
    c0: str | None
    lens: str | None  # int64 [B]
    mask: str | None  # [T, B, 1], 1 on valid steps
    unmask: str | None  # 1 - mask
    zeros_bh: str  # [B, H]
    steps: int | None
    _reversed_x: str | None = None

    def rev(self, v: str) -> str:
        """Processing order of the reverse direction (and back: it is its own inverse)."""
        if self.lens is not None:
            return self.e.op("ReverseSequence", [v, self.lens], batch_axis=1, time_axis=0)
        b = self.e.b
        return self.e.op("Slice", [v, b.ints([-1]), b.ints([-_INT_MAX]), b.ints([0]), b.ints([-1])])

    def x_in_order(self, reverse: bool) -> str:
        if not reverse:
            return self.x
        if self._reversed_x is None:
            self._reversed_x = self.rev(self.x)
        return self._reversed_x

    def masked(self, v: str) -> str:
        return v if self.mask is None else self.e.mul(v, self.mask)


@dataclass
class _Direction:
    """One direction's inputs, in processing order."""

    d: int
    reverse: bool
    acts: tuple[str, ...]
    x: str  # [T, B, I]
    h: str  # [T, B, H] its states
    h_prev: str  # [T, B, H]
    dy: str | None  # [T, B, H], masked
    dyh: str | None  # [B, H]
    dyc: str | None
    c0: str | None
    w: str  # [G*H, I]
    r: str  # [G*H, H]
    wb: str | None  # [G*H]
    rb: str | None


@dataclass
class _DirGrads:
    dx: str  # [T, B, I], processing order
    dw: str  # [G*H, I]
    dr: str
    db: str  # [2*G*H]
    dh0: str  # [B, H]
    dc0: str | None = None


def _backward(
    e: _Emit,
    nd: _Node,
    carries: list[tuple[str, int]],
    seqs: list[tuple[str, int]],
    step: Callable[[_Emit, list[str], list[str]], tuple[list[str], list[str]]],
) -> tuple[list[str], list[str]]:
    """Backpropagation through time: ``step`` run from the last time step to the first, the
    carried gradients in ``carries``, one stacked output per step."""
    return _recurrence(
        e, carries=carries, sequences=seqs, outputs=[2], step=step, reverse=True, steps=nd.steps, form=FORM
    )


def _stacked_grads(e: _Emit, dd: _Direction, dgates: str, dh0: str, dc0: str | None = None) -> _DirGrads:
    """The gradients of a direction whose gates are ``x W^T + h R^T + Wb + Rb`` stacked (RNN,
    LSTM), from the per-step gate gradients ``dgates`` [T, B, G*H]: Wb and Rb get the same."""
    db = _sum_tb(e, dgates)
    return _DirGrads(
        dx=e.op("MatMul", [dgates, dd.w]),
        dw=_gemm_t(e, dgates, dd.x),
        dr=_gemm_t(e, dgates, dd.h_prev),
        db=e.op("Concat", [db, db], axis=0),
        dh0=dh0,
        dc0=dc0,
    )


def _transpose_if(e: _Emit, v: str | None, layout: int, perm: Sequence[int]) -> str | None:
    if v is None or layout == 0:
        return v
    return e.op("Transpose", [v], perm=list(perm))


def _recurrent(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """LSTM, GRU, RNN: backpropagation through time (see the module docstring)."""
    spec = _spec(ctx, node)
    x, w, r = node.input[:3]
    bias, lens, h0 = _input(node, 3), _input(node, 4), _input(node, 5)
    c0 = _input(node, 6) if spec.kind == "LSTM" else ""
    if not node.output or not node.output[0]:
        raise GradientError("the Y output is not named (the rule's prepare step did not run)")
    elem = ctx.elem(x)
    e = _Emit(ctx.b, elem)
    dys = list(dys) + [None] * (3 - len(dys))
    layout = spec.layout
    xt = _transpose_if(e, x, layout, [1, 0, 2])
    assert xt is not None
    xdims = ctx.dims(x)
    t_dim, b_dim = (xdims[0], xdims[1]) if layout == 0 else (xdims[1], xdims[0])
    batch = e.b.ints([b_dim]) if isinstance(b_dim, int) else _shape_slice(e, xt, 1)
    steps_len = e.b.ints([t_dim]) if isinstance(t_dim, int) else _shape_slice(e, xt, 0)
    zeros_bh = e.op(
        "ConstantOfShape",
        [e.op("Concat", [batch, e.b.ints([spec.hidden])], axis=0)],
        value=helper.make_tensor("zero", elem, [1], [0.0]),
    )
    lens64 = mask = unmask = None
    if lens:
        lens64 = e.op("Cast", [lens], to=TensorProto.INT64)
        time = e.op(
            "Range",
            [
                e.b.const(np.asarray(0, np.int64), "zero_i"),
                e.op("Squeeze", [steps_len, e.b.ints([0])]),
                e.b.const(np.asarray(1, np.int64), "one_i"),
            ],
        )
        valid = e.op(
            "Less",
            [e.op("Unsqueeze", [time, e.b.ints([1, 2])]), e.op("Unsqueeze", [lens64, e.b.ints([0, 2])])],
        )
        mask = e.op("Cast", [valid], to=elem)
        unmask = e.one_minus(mask)
    nd = _Node(
        ctx=ctx,
        e=e,
        spec=spec,
        x=xt,
        y=_transpose_if(e, node.output[0], layout, [1, 2, 0, 3]),  # type: ignore[arg-type]
        dy=_transpose_if(e, dys[0], layout, [1, 2, 0, 3]),
        dyh=_transpose_if(e, dys[1], layout, [1, 0, 2]),
        dyc=_transpose_if(e, dys[2], layout, [1, 0, 2]),
        h0=_transpose_if(e, h0 or None, layout, [1, 0, 2]),
        c0=_transpose_if(e, c0 or None, layout, [1, 0, 2]),
        lens=lens64,
        mask=mask,
        unmask=unmask,
        zeros_bh=zeros_bh,
        steps=t_dim if isinstance(t_dim, int) else None,
    )
    gates = _GATES[spec.kind] * spec.hidden
    backward = {"LSTM": _lstm_direction, "GRU": _gru_direction, "RNN": _rnn_direction}[spec.kind]
    per_dir = []
    for d, reverse in enumerate(spec.reverse):
        h = e.take(nd.y, d, 1)
        h = nd.rev(h) if reverse else h
        first = e.unsqueeze0(e.take(nd.h0, d, 0) if nd.h0 is not None else zeros_bh)
        dy = None
        if nd.dy is not None:
            dy = nd.masked(nd.rev(e.take(nd.dy, d, 1)) if reverse else e.take(nd.dy, d, 1))
        bd = e.take(bias, d, 0) if bias else None
        direction = _Direction(
            d=d,
            reverse=reverse,
            acts=spec.activations[d],
            x=nd.x_in_order(reverse),
            h=h,
            h_prev=e.op("Concat", [first, e.slice0(h, 0, -1)], axis=0),
            dy=dy,
            dyh=e.take(nd.dyh, d, 0) if nd.dyh is not None else None,
            dyc=e.take(nd.dyc, d, 0) if nd.dyc is not None else None,
            c0=e.take(nd.c0, d, 0) if nd.c0 is not None else None,
            w=e.take(w, d, 0),
            r=e.take(r, d, 0),
            wb=e.slice0(bd, 0, gates) if bd is not None else None,
            rb=e.slice0(bd, gates, 2 * gates) if bd is not None else None,
        )
        per_dir.append(backward(nd, direction))
    return _assemble(ctx, node, nd, per_dir)


def _shape_slice(e: _Emit, v: str, axis: int) -> str:
    return e.slice0(e.op("Shape", [v]), axis, axis + 1)


def _stack(e: _Emit, parts: Sequence[str]) -> str:
    ups = [e.unsqueeze0(p) for p in parts]
    return ups[0] if len(ups) == 1 else e.op("Concat", ups, axis=0)


def _assemble(ctx: RuleContext, node: onnx.NodeProto, nd: _Node, per_dir: Sequence[_DirGrads]) -> Grads:
    e = nd.e
    grads: Grads = [None] * len(node.input)
    if ctx.needs(node, 0):
        parts = [nd.rev(g.dx) if rev else g.dx for g, rev in zip(per_dir, nd.spec.reverse, strict=True)]
        dx = parts[0] if len(parts) == 1 else e.add(parts[0], parts[1])
        grads[0] = _transpose_if(e, dx, nd.spec.layout, [1, 0, 2])
    if ctx.needs(node, 1):
        grads[1] = _stack(e, [g.dw for g in per_dir])
    if ctx.needs(node, 2):
        grads[2] = _stack(e, [g.dr for g in per_dir])
    if ctx.needs(node, 3):
        grads[3] = _stack(e, [g.db for g in per_dir])
    if ctx.needs(node, 5):
        grads[5] = _transpose_if(e, _stack(e, [g.dh0 for g in per_dir]), nd.spec.layout, [1, 0, 2])
    if nd.spec.kind == "LSTM" and ctx.needs(node, 6):
        dc0 = [g.dc0 for g in per_dir]
        assert all(c is not None for c in dc0)
        grads[6] = _transpose_if(e, _stack(e, dc0), nd.spec.layout, [1, 0, 2])  # type: ignore[arg-type]
    return grads


def _gemm_t(e: _Emit, a: str, b: str) -> str:
    """sum over (t, n) of a[t, n, :]^T b[t, n, :]: a [T, B, m], b [T, B, k] -> [m, k]."""
    return e.op("Gemm", [e.op("Flatten", [a], axis=2), e.op("Flatten", [b], axis=2)], transA=1)


def _sum_tb(e: _Emit, a: str) -> str:
    return e.b.reduce("ReduceSum", a, [0, 1], keepdims=False)


def _pre_activations(e: _Emit, x: str, h_prev: str, w: str, r: str, bias: str | None) -> str:
    """X W^T + H_prev R^T (+ bias) for every step at once."""
    out = e.add(
        e.op("MatMul", [x, e.op("Transpose", [w], perm=[1, 0])]),
        e.op("MatMul", [h_prev, e.op("Transpose", [r], perm=[1, 0])]),
    )
    return out if bias is None else e.add(out, bias)


def _split(e: _Emit, v: str, parts: int, hidden: int) -> list[str]:
    out = e.b.op("Split", [v, e.b.ints([hidden] * parts)], axis=-1, outputs=parts)
    return [out] if isinstance(out, str) else list(out)


def _carry_init(nd: _Node, value: str | None) -> str:
    return value if value is not None else nd.zeros_bh


def _rnn_direction(nd: _Node, dd: _Direction) -> _DirGrads:
    """RNN: da = (dY + carry) * f'(h); carry = da R."""
    e = nd.e
    (act,) = dd.acts
    k = nd.masked(e.derivative(act, dd.h))
    seqs = [(k, 3)] + ([(dd.dy, 3)] if dd.dy is not None else []) + ([(nd.unmask, 3)] if nd.unmask else [])
    r = dd.r

    def step(s: _Emit, carry: list[str], xs: list[str]) -> tuple[list[str], list[str]]:
        dh = carry[0] if dd.dy is None else s.add(carry[0], xs[1])
        da = s.mul(dh, xs[0])
        new = s.op("MatMul", [da, r])
        if nd.unmask is not None:
            new = s.add(new, s.mul(dh, xs[-1]))
        return [new], [da]

    (dh0,), (da,) = _backward(e, nd, [(_carry_init(nd, dd.dyh), 2)], seqs, step)
    return _stacked_grads(e, dd, da, dh0)


def _gru_direction(nd: _Node, dd: _Direction) -> _DirGrads:
    """GRU (gates z, r, h): the carried gradient is linear in dh; the loop keeps only dh."""
    e = nd.e
    hidden = nd.spec.hidden
    f_act, g_act = dd.acts
    xz, xr, xh = _split(e, _pre_activations_x(e, dd.x, dd.w, dd.wb), 3, hidden)
    rb = _split(e, dd.rb, 3, hidden) if dd.rb is not None else None
    lbr = nd.spec.linear_before_reset
    r_zr = e.slice0(dd.r, 0, 2 * hidden)
    r_h = e.slice0(dd.r, 2 * hidden, 3 * hidden)
    h_zr = e.op("MatMul", [dd.h_prev, e.op("Transpose", [r_zr], perm=[1, 0])])
    hz, hr = _split(e, h_zr, 2, hidden)
    if rb is not None:
        hz, hr = e.add(hz, rb[0]), e.add(hr, rb[1])
    z = e.activation(f_act, e.add(xz, hz))
    rg = e.activation(f_act, e.add(xr, hr))
    hh = None
    if lbr:
        hh = e.op("MatMul", [dd.h_prev, e.op("Transpose", [r_h], perm=[1, 0])])
        hh = hh if rb is None else e.add(hh, rb[2])
        n = e.activation(g_act, e.add(xh, e.mul(rg, hh)))
        rh_prev = None
    else:
        rh_prev = e.mul(rg, dd.h_prev)
        pre = e.add(xh, e.op("MatMul", [rh_prev, e.op("Transpose", [r_h], perm=[1, 0])]))
        n = e.activation(g_act, pre if rb is None else e.add(pre, rb[2]))
    kn = nd.masked(e.mul(e.one_minus(z), e.derivative(g_act, n)))
    kz = nd.masked(e.mul(e.op("Sub", [dd.h_prev, n]), e.derivative(f_act, z)))
    dr_act = e.derivative(f_act, rg)
    zk = z if nd.mask is None else e.add(e.mul(z, nd.mask), nd.unmask)  # type: ignore[arg-type]
    if lbr:
        assert hh is not None
        kr = e.mul(kn, hh, dr_act)
        knr = e.mul(kn, rg)
        extra = [(kr, 3), (knr, 3)]
    else:
        kr0 = e.mul(dd.h_prev, dr_act)
        extra = [(kr0, 3), (rg, 3)]
    seqs = [(kz, 3), (kn, 3), (zk, 3), *extra] + ([(dd.dy, 3)] if dd.dy is not None else [])
    r_all = dd.r

    def step(s: _Emit, carry: list[str], xs: list[str]) -> tuple[list[str], list[str]]:
        dh = carry[0] if dd.dy is None else s.add(carry[0], xs[5])
        s_kz, s_kn, s_zk, s_a, s_b = xs[:5]
        if lbr:
            cat = s.op("Concat", [s.mul(dh, s_kz), s.mul(dh, s_a), s.mul(dh, s_b)], axis=-1)
            new = s.add(s.op("MatMul", [cat, r_all]), s.mul(dh, s_zk))
        else:
            u = s.op("MatMul", [s.mul(dh, s_kn), r_h])
            cat = s.op("Concat", [s.mul(dh, s_kz), s.mul(u, s_a)], axis=-1)
            new = s.add(s.add(s.op("MatMul", [cat, r_zr]), s.mul(u, s_b)), s.mul(dh, s_zk))
        return [new], [dh]

    (dh0,), (dh_all,) = _backward(e, nd, [(_carry_init(nd, dd.dyh), 2)], seqs, step)
    dz = e.mul(dh_all, kz)
    dn = e.mul(dh_all, kn)
    if lbr:
        dr = e.mul(dh_all, kr)
        dgx = e.op("Concat", [dz, dr, dn], axis=-1)
        dgh = e.op("Concat", [dz, dr, e.mul(dh_all, knr)], axis=-1)
        d_r = _gemm_t(e, dgh, dd.h_prev)
        db = e.op("Concat", [_sum_tb(e, dgx), _sum_tb(e, dgh)], axis=0)
    else:
        assert rh_prev is not None
        dr = e.mul(e.op("MatMul", [dn, r_h]), kr0)
        dgx = e.op("Concat", [dz, dr, dn], axis=-1)
        d_r = e.op(
            "Concat",
            [_gemm_t(e, e.op("Concat", [dz, dr], axis=-1), dd.h_prev), _gemm_t(e, dn, rh_prev)],
            axis=0,
        )
        sx = _sum_tb(e, dgx)
        db = e.op("Concat", [sx, sx], axis=0)
    return _DirGrads(
        dx=e.op("MatMul", [dgx, dd.w]),
        dw=_gemm_t(e, dgx, dd.x),
        dr=d_r,
        db=db,
        dh0=dh0,
    )


def _pre_activations_x(e: _Emit, x: str, w: str, bias: str | None) -> str:
    out = e.op("MatMul", [x, e.op("Transpose", [w], perm=[1, 0])])
    return out if bias is None else e.add(out, bias)


def _lstm_direction(nd: _Node, dd: _Direction) -> _DirGrads:
    """LSTM (gates i, o, f, c): the cell states are recomputed by a forward Scan, then the loop
    carries (dh, dc) and emits every step's gate gradient."""
    e = nd.e
    hidden = nd.spec.hidden
    f_act, g_act, h_act = dd.acts
    bias = e.add(dd.wb, dd.rb) if dd.wb is not None and dd.rb is not None else None
    gi, go, gf, gc = _split(e, _pre_activations(e, dd.x, dd.h_prev, dd.w, dd.r, bias), 4, hidden)
    i, o, f, g = (
        e.activation(f_act, gi),
        e.activation(f_act, go),
        e.activation(f_act, gf),
        e.activation(g_act, gc),
    )
    ig = e.mul(i, g)
    c_init = _carry_init(nd, dd.c0)

    def cell(s: _Emit, carry: list[str], xs: list[str]) -> tuple[list[str], list[str]]:
        c = s.add(s.mul(xs[0], carry[0]), xs[1])
        return [c], [c]

    _, (cells,) = _recurrence(
        e,
        carries=[(c_init, 2)],
        sequences=[(f, 3), (ig, 3)],
        outputs=[2],
        step=cell,
        reverse=False,
        steps=nd.steps,
        form=FORM,
    )
    hc = e.activation(h_act, cells)
    c_prev = e.op("Concat", [e.unsqueeze0(c_init), e.slice0(cells, 0, -1)], axis=0)
    k_c = nd.masked(e.mul(o, e.derivative(h_act, hc)))  # dh -> dc
    k_o = nd.masked(e.mul(hc, e.derivative(f_act, o)))  # dh -> do
    k_i = nd.masked(e.mul(g, e.derivative(f_act, i)))  # dc -> di
    k_f = nd.masked(e.mul(c_prev, e.derivative(f_act, f)))  # dc -> df
    k_g = nd.masked(e.mul(i, e.derivative(g_act, g)))  # dc -> dg
    f_keep = f if nd.mask is None else e.add(e.mul(f, nd.mask), nd.unmask)  # type: ignore[arg-type]
    seqs = [(k_c, 3), (k_o, 3), (k_i, 3), (k_f, 3), (k_g, 3), (f_keep, 3)]
    if dd.dy is not None:
        seqs.append((dd.dy, 3))
    if nd.unmask is not None:
        seqs.append((nd.unmask, 3))
    r = dd.r

    def step(s: _Emit, carry: list[str], xs: list[str]) -> tuple[list[str], list[str]]:
        s_kc, s_ko, s_ki, s_kf, s_kg, s_f = xs[:6]
        rest = xs[6:]
        dh = carry[0]
        if dd.dy is not None:
            dh = s.add(dh, rest.pop(0))
        dc = s.add(carry[1], s.mul(dh, s_kc))
        dgates = s.op("Concat", [s.mul(dc, s_ki), s.mul(dh, s_ko), s.mul(dc, s_kf), s.mul(dc, s_kg)], axis=-1)
        new_h = s.op("MatMul", [dgates, r])
        if rest:
            new_h = s.add(new_h, s.mul(dh, rest[0]))
        return [new_h, s.mul(dc, s_f)], [dgates]

    (dh0, dc0), (dg,) = _backward(
        e, nd, [(_carry_init(nd, dd.dyh), 2), (_carry_init(nd, dd.dyc), 2)], seqs, step
    )
    return _stacked_grads(e, dd, dg, dh0, dc0)


def _rule(inputs: tuple[int, ...]) -> Rule:
    return Rule(_recurrent, inputs=inputs, outputs=(0, 1, 2), prepare=_prepare)


RECURRENT_RULES: dict[str, Rule] = {
    "LSTM": _rule((0, 1, 2, 3, 5, 6)),
    "GRU": _rule((0, 1, 2, 3, 5)),
    "RNN": _rule((0, 1, 2, 3, 5)),
}
