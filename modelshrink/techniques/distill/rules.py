"""Gradient rules: one op family per function, collected in :data:`RULES`.

A rule receives the forward node and the gradients of its outputs (``dY``, None where no
gradient flows) and returns one gradient per input (None where it emits none). Formulas, with
``Y`` the forward output, are written next to each function; every rule emits standard ONNX
ops only and is checked against float64 finite differences in ``tests/test_distill_rules.py``
and ``tests/test_distill_rules_real.py``.

Choices that matter for speed on onnxruntime's CPU kernels (see
``shared/notes/training-engine.md``): masks as ``Mul(dY, Cast(Greater(X, 0)))`` rather than
``Where``; Conv's input gradient as ``ConvTranspose`` with ``output_padding`` restoring the
exact input size; Conv's weight gradient by im2col (``Slice``s + one ``Gemm``/batched
``MatMul``; a 2-D stride s first moves X's s x s phases into channels with one
``SpaceToDepth``, so every slice has unit steps); MaxPool through its ``Indices`` and ``ScatterElements(reduction="add")``;
embedding ``Gather`` through ``ScatterND(reduction="add")``; nearest ``Resize`` by an integer
factor as a sum-pool (``Reshape`` + ``ReduceSum``), other resizes as one ``MatMul`` per
resized axis; edge/reflect ``Pad`` as slices and adds (a scatter only for computed pads).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from modelshrink.techniques.distill.control import CONTROL_RULES
from modelshrink.techniques.distill.grad import Builder, Dim, GradientError, Rule, RuleContext
from modelshrink.techniques.distill.recurrent import RECURRENT_RULES

__all__ = ["RULES"]

Grads = list[str | None]


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if i < len(node.input) else ""


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


_INT_MAX = 2**62  # a Slice bound past either end of any axis


def _str_attr(node: onnx.NodeProto, name: str, default: str) -> str:
    value = _attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def _slice_axis(ctx: RuleContext, x: str, start: int, end: int, axis: int, step: int = 1) -> str:
    inputs = [x, ctx.b.ints([start]), ctx.b.ints([end]), ctx.b.ints([axis])]
    if step != 1:
        inputs.append(ctx.b.ints([step]))
    return ctx.op("Slice", inputs)


def _dim1(ctx: RuleContext, name: str, axis: int) -> str:
    """Dim ``axis`` of a forward value as a 1-D int64 tensor of one element (constant when static)."""
    d = ctx.dims(name)[axis]
    if isinstance(d, int):
        return ctx.b.ints([d])
    return ctx.op("Gather", [ctx.shape_of(name), ctx.b.ints([axis])])


def _dim_part(ctx: RuleContext, name: str, axis: int) -> int | str:
    """Dim ``axis`` as an int when static, else as a 1-D tensor (for :func:`_shape_vector`)."""
    d = ctx.dims(name)[axis]
    return d if isinstance(d, int) else _dim1(ctx, name, axis)


def _shape_vector(ctx: RuleContext, parts: Sequence[int | str]) -> str:
    """A 1-D int64 shape from ints and 1-D int64 tensors (one constant when all are ints)."""
    pieces: list[str] = []
    run: list[int] = []
    for part in parts:
        if isinstance(part, int):
            run.append(part)
            continue
        if run:
            pieces.append(ctx.b.ints(run))
            run = []
        pieces.append(part)
    if run:
        pieces.append(ctx.b.ints(run))
    return pieces[0] if len(pieces) == 1 else ctx.op("Concat", pieces, axis=0)


# --- pass-through ---------------------------------------------------------------------------


def _identity(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Identity, Dropout (inference behaviour): dX = dY."""
    return [dys[0]]


def _cast(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Cast between float types: dX = Cast(dY, X's type)."""
    dy = dys[0]
    assert dy is not None
    return [ctx.op("Cast", [dy], to=ctx.elem(node.input[0]))]


def _reshape_like_input(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Reshape, Flatten, Squeeze, Unsqueeze: dX = Reshape(dY, Shape(X))."""
    dy = dys[0]
    assert dy is not None
    return [ctx.reshape_like(dy, node.input[0])]


def _transpose(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Transpose: dX = Transpose(dY, inverse(perm))."""
    dy = dys[0]
    assert dy is not None
    perm = _attr(node, "perm") or list(reversed(range(ctx.rank(node.input[0]))))
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return [ctx.op("Transpose", [dy], perm=inverse)]


def _expand(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Expand: dX = ReduceSum of dY over the broadcast axes."""
    dy = dys[0]
    assert dy is not None
    return [ctx.reduce_to(dy, ctx.dims(node.output[0]), node.input[0])]


# --- element-wise arithmetic ----------------------------------------------------------------


def _binary_grads(ctx: RuleContext, node: onnx.NodeProto, ga: str | None, gb: str | None) -> Grads:
    out = ctx.dims(node.output[0])
    da = ctx.reduce_to(ga, out, node.input[0]) if ga is not None and ctx.needs(node, 0) else None
    db = ctx.reduce_to(gb, out, node.input[1]) if gb is not None and ctx.needs(node, 1) else None
    return [da, db]


def _add(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Add: dA = dY, dB = dY (summed over broadcast axes)."""
    return _binary_grads(ctx, node, dys[0], dys[0])


def _sub(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Sub: dA = dY, dB = -dY."""
    dy = dys[0]
    assert dy is not None
    return _binary_grads(ctx, node, dy, ctx.op("Neg", [dy]) if ctx.needs(node, 1) else None)


def _mul(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Mul: dA = dY * B, dB = dY * A."""
    dy = dys[0]
    assert dy is not None
    a, b = node.input[0], node.input[1]
    ga = ctx.op("Mul", [dy, b]) if ctx.needs(node, 0) else None
    gb = ctx.op("Mul", [dy, a]) if ctx.needs(node, 1) else None
    return _binary_grads(ctx, node, ga, gb)


def _div(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Div: dA = dY / B, dB = -dY * Y / B."""
    dy = dys[0]
    assert dy is not None
    b, y = node.input[1], node.output[0]
    ga = ctx.op("Div", [dy, b]) if ctx.needs(node, 0) else None
    gb = ctx.op("Neg", [ctx.op("Div", [ctx.op("Mul", [dy, y]), b])]) if ctx.needs(node, 1) else None
    return _binary_grads(ctx, node, ga, gb)


def _pow(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Pow: dA = dY * B * A^(B-1), dB = dY * Y * log(A)."""
    dy = dys[0]
    assert dy is not None
    a, b, y = node.input[0], node.input[1], node.output[0]
    ga = gb = None
    if ctx.needs(node, 0):
        exponent = ctx.const_value(b)
        if exponent is not None and exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2.0:
            ga = ctx.op("Mul", [dy, ctx.op("Mul", [a, ctx.scalar(2.0, a)])])
        else:
            bb = b if ctx.elem(b) == ctx.elem(a) else ctx.op("Cast", [b], to=ctx.elem(a))
            power = ctx.op("Pow", [a, ctx.op("Sub", [bb, ctx.scalar(1.0, a)])])
            ga = ctx.op("Mul", [dy, ctx.op("Mul", [bb, power])])
    if ctx.needs(node, 1):
        gb = ctx.op("Mul", [ctx.op("Mul", [dy, y]), ctx.op("Log", [a])])
    return _binary_grads(ctx, node, ga, gb)


def _sum(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Sum (variadic): dX_i = dY summed over X_i's broadcast axes."""
    dy = dys[0]
    assert dy is not None
    out = ctx.dims(node.output[0])
    return [ctx.reduce_to(dy, out, x) if ctx.needs(node, i) else None for i, x in enumerate(node.input)]


def _where(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Where(C, X, Y): dX = dY where C, dY' = dY where not C."""
    dy = dys[0]
    assert dy is not None
    cond = node.input[0]
    zero = ctx.scalar(0.0, node.output[0])
    out = ctx.dims(node.output[0])
    gx = gy = None
    if ctx.needs(node, 1):
        gx = ctx.reduce_to(ctx.op("Where", [cond, dy, zero]), out, node.input[1])
    if ctx.needs(node, 2):
        gy = ctx.reduce_to(ctx.op("Where", [cond, zero, dy]), out, node.input[2])
    return [None, gx, gy]


def _max_min(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Max, Min (variadic, broadcasting): with h_i = [X_i == Y], dX_i = dY * h_i / sum_j h_j,
    summed over X_i's broadcast axes (ties share the gradient evenly, as in PyTorch)."""
    dy = dys[0]
    assert dy is not None
    y = node.output[0]
    if len(node.input) == 1:
        return [dy]
    hits = [_mask(ctx, ctx.op("Equal", [x, y]), y) for x in node.input]
    share = ctx.op("Div", [dy, ctx.op("Sum", hits)])
    out = ctx.dims(y)
    return [
        ctx.reduce_to(ctx.op("Mul", [share, hit]), out, x) if ctx.needs(node, i) else None
        for i, (x, hit) in enumerate(zip(node.input, hits, strict=True))
    ]


def _neg(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Neg: dX = -dY."""
    dy = dys[0]
    assert dy is not None
    return [ctx.op("Neg", [dy])]


def _abs(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Abs: dX = dY * sign(X)."""
    dy = dys[0]
    assert dy is not None
    return [ctx.op("Mul", [dy, ctx.op("Sign", [node.input[0]])])]


def _straight_through(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Round: the straight-through estimator dX = dY (Bengio et al. 2013).

    Round's derivative is 0 wherever it exists, which would stop every gradient; quantization-
    aware training (``quantize --qat``) differentiates rounding as the identity and zeroes the
    gradient outside the grid with a Clip before the Round.
    """
    return [dys[0]]


def _reciprocal(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Reciprocal: dX = -dY * Y^2."""
    dy = dys[0]
    assert dy is not None
    y = node.output[0]
    return [ctx.op("Neg", [ctx.op("Mul", [dy, ctx.op("Mul", [y, y])])])]


# --- element-wise activations ---------------------------------------------------------------


def _mask(ctx: RuleContext, condition: str, like: str) -> str:
    return ctx.op("Cast", [condition], to=ctx.elem(like))


def _relu(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Relu: dX = dY * (X > 0)."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    return [ctx.op("Mul", [dy, _mask(ctx, ctx.op("Greater", [x, ctx.scalar(0.0, x)]), x)])]


def _leaky_relu(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """LeakyRelu: dX = dY * ((X > 0) * (1 - alpha) + alpha)."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    alpha = float(_attr(node, "alpha", 0.01))
    mask = _mask(ctx, ctx.op("Greater", [x, ctx.scalar(0.0, x)]), x)
    slope = ctx.op("Add", [ctx.op("Mul", [mask, ctx.scalar(1.0 - alpha, x)]), ctx.scalar(alpha, x)])
    return [ctx.op("Mul", [dy, slope])]


def _sigmoid(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Sigmoid: dX = dY * Y * (1 - Y)."""
    dy = dys[0]
    assert dy is not None
    y = node.output[0]
    return [ctx.op("Mul", [dy, ctx.op("Mul", [y, ctx.op("Sub", [ctx.scalar(1.0, y), y])])])]


def _tanh(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Tanh: dX = dY * (1 - Y^2)."""
    dy = dys[0]
    assert dy is not None
    y = node.output[0]
    return [ctx.op("Mul", [dy, ctx.op("Sub", [ctx.scalar(1.0, y), ctx.op("Mul", [y, y])])])]


def _clip(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Clip: dX = dY * (min <= X <= max); no gradient to min/max."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    lo, hi = _input(node, 1), _input(node, 2)
    if not lo and _attr(node, "min") is not None:
        lo = ctx.scalar(float(_attr(node, "min")), x)
    if not hi and _attr(node, "max") is not None:
        hi = ctx.scalar(float(_attr(node, "max")), x)
    conds = []
    if lo:
        conds.append(ctx.op("GreaterOrEqual", [x, lo]))
    if hi:
        conds.append(ctx.op("LessOrEqual", [x, hi]))
    if not conds:
        return [dy]
    cond = conds[0] if len(conds) == 1 else ctx.op("And", conds)
    return [ctx.op("Mul", [dy, _mask(ctx, cond, x)])]


def _hard_sigmoid(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """HardSigmoid: with v = alpha*X + beta, dX = dY * alpha * (0 < v < 1)."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    alpha = float(_attr(node, "alpha", 0.2))
    beta = float(_attr(node, "beta", 0.5))
    v = ctx.op("Add", [ctx.op("Mul", [x, ctx.scalar(alpha, x)]), ctx.scalar(beta, x)])
    inside = ctx.op(
        "And", [ctx.op("Greater", [v, ctx.scalar(0.0, x)]), ctx.op("Less", [v, ctx.scalar(1.0, x)])]
    )
    return [ctx.op("Mul", [dy, ctx.op("Mul", [_mask(ctx, inside, x), ctx.scalar(alpha, x)])])]


def _hard_swish(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """HardSwish: Y = X * h(X), h = clip(X/6 + 1/2, 0, 1): dX = dY * (h + X/6 * (-3 < X < 3))."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    h = ctx.op("HardSigmoid", [x], alpha=1.0 / 6.0, beta=0.5)
    inside = ctx.op(
        "And", [ctx.op("Greater", [x, ctx.scalar(-3.0, x)]), ctx.op("Less", [x, ctx.scalar(3.0, x)])]
    )
    slope = ctx.op("Mul", [ctx.op("Mul", [x, ctx.scalar(1.0 / 6.0, x)]), _mask(ctx, inside, x)])
    return [ctx.op("Mul", [dy, ctx.op("Add", [h, slope])])]


def _erf(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Erf: dX = dY * 2/sqrt(pi) * exp(-X^2)."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    e = ctx.op("Exp", [ctx.op("Neg", [ctx.op("Mul", [x, x])])])
    return [ctx.op("Mul", [dy, ctx.op("Mul", [e, ctx.scalar(2.0 / math.sqrt(math.pi), x)])])]


def _gelu(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Gelu: exact dX = dY * (Phi(X) + X * phi(X)); tanh form differentiated as written."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    if _attr(node, "approximate", b"none") in (b"tanh", "tanh"):
        c = math.sqrt(2.0 / math.pi)
        x2 = ctx.op("Mul", [x, x])
        inner = ctx.op(
            "Mul",
            [
                ctx.op("Add", [x, ctx.op("Mul", [ctx.op("Mul", [x2, x]), ctx.scalar(0.044715, x)])]),
                ctx.scalar(c, x),
            ],
        )
        t = ctx.op("Tanh", [inner])
        one = ctx.scalar(1.0, x)
        left = ctx.op("Mul", [ctx.op("Add", [one, t]), ctx.scalar(0.5, x)])
        dinner = ctx.op(
            "Mul", [ctx.op("Add", [one, ctx.op("Mul", [x2, ctx.scalar(3 * 0.044715, x)])]), ctx.scalar(c, x)]
        )
        right = ctx.op(
            "Mul",
            [
                ctx.op(
                    "Mul",
                    [ctx.op("Mul", [x, ctx.scalar(0.5, x)]), ctx.op("Sub", [one, ctx.op("Mul", [t, t])])],
                ),
                dinner,
            ],
        )
        return [ctx.op("Mul", [dy, ctx.op("Add", [left, right])])]
    cdf = ctx.op(
        "Mul",
        [
            ctx.op(
                "Add",
                [
                    ctx.op("Erf", [ctx.op("Mul", [x, ctx.scalar(1.0 / math.sqrt(2.0), x)])]),
                    ctx.scalar(1.0, x),
                ],
            ),
            ctx.scalar(0.5, x),
        ],
    )
    pdf = ctx.op(
        "Mul",
        [
            ctx.op("Exp", [ctx.op("Mul", [ctx.op("Mul", [x, x]), ctx.scalar(-0.5, x)])]),
            ctx.scalar(1.0 / math.sqrt(2.0 * math.pi), x),
        ],
    )
    return [ctx.op("Mul", [dy, ctx.op("Add", [cdf, ctx.op("Mul", [x, pdf])])])]


def _sqrt(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Sqrt: dX = dY * 0.5 / Y."""
    dy = dys[0]
    assert dy is not None
    y = node.output[0]
    return [ctx.op("Div", [ctx.op("Mul", [dy, ctx.scalar(0.5, y)]), y])]


def _exp(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Exp: dX = dY * Y."""
    dy = dys[0]
    assert dy is not None
    return [ctx.op("Mul", [dy, node.output[0]])]


def _log(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Log: dX = dY / X."""
    dy = dys[0]
    assert dy is not None
    return [ctx.op("Div", [dy, node.input[0]])]


def _positive(ctx: RuleContext, x: str) -> str:
    """``Cast(X > 0)`` in X's type."""
    return _mask(ctx, ctx.op("Greater", [x, ctx.scalar(0.0, x)]), x)


def _prelu(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """PRelu: Y = X if X > 0 else slope * X: dX = dY * (slope + (X > 0) * (1 - slope));
    dslope = dY * min(X, 0), summed over the axes slope is broadcast along."""
    dy = dys[0]
    assert dy is not None
    x, slope = node.input[0], node.input[1]
    dx = dslope = None
    if ctx.needs(node, 0):
        gain = ctx.op("Mul", [_positive(ctx, x), ctx.op("Sub", [ctx.scalar(1.0, x), slope])])
        dx = ctx.op("Mul", [dy, ctx.op("Add", [gain, slope])])
    if ctx.needs(node, 1):
        negative_part = ctx.op("Min", [x, ctx.scalar(0.0, x)])
        dslope = ctx.reduce_to(ctx.op("Mul", [dy, negative_part]), ctx.dims(node.output[0]), slope)
    return [dx, dslope]


def _softplus(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Softplus: Y = log(1 + exp(X)): dX = dY * sigmoid(X)."""
    dy = dys[0]
    assert dy is not None
    return [ctx.op("Mul", [dy, ctx.op("Sigmoid", [node.input[0]])])]


def _mish(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Mish: Y = X * t, t = tanh(softplus(X)): dX = dY * (t + X * sigmoid(X) * (1 - t^2))."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    t = ctx.op("Tanh", [ctx.op("Softplus", [x])])
    one_minus_t2 = ctx.op("Sub", [ctx.scalar(1.0, x), ctx.op("Mul", [t, t])])
    slope = ctx.op("Add", [t, ctx.op("Mul", [ctx.op("Mul", [x, ctx.op("Sigmoid", [x])]), one_minus_t2])])
    return [ctx.op("Mul", [dy, slope])]


def _exponential_unit(ctx: RuleContext, x: str, y: str, dy: str, pos: float, neg_shift: float) -> str:
    """``dY * (pos if X > 0 else Y + neg_shift)``: on X <= 0 every *LU below has dY/dX = Y + shift.

    Written with Y rather than exp(X) so that large positive X cannot make inf * 0 = NaN.
    """
    m = _positive(ctx, x)
    neg = ctx.op(
        "Mul", [ctx.op("Sub", [ctx.scalar(1.0, x), m]), ctx.op("Add", [y, ctx.scalar(neg_shift, x)])]
    )
    posm = m if pos == 1.0 else ctx.op("Mul", [m, ctx.scalar(pos, x)])
    return ctx.op("Mul", [dy, ctx.op("Add", [posm, neg])])


def _elu(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Elu: Y = X if X > 0 else alpha * (exp(X) - 1): dX = dY * (1 if X > 0 else Y + alpha)."""
    dy = dys[0]
    assert dy is not None
    alpha = float(_attr(node, "alpha", 1.0))
    return [_exponential_unit(ctx, node.input[0], node.output[0], dy, 1.0, alpha)]


_SELU_ALPHA = 1.67326319217681884765625
_SELU_GAMMA = 1.05070102214813232421875


def _selu(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Selu: Y = gamma * (X if X > 0 else alpha * (exp(X) - 1)):
    dX = dY * (gamma if X > 0 else Y + gamma * alpha)."""
    dy = dys[0]
    assert dy is not None
    alpha = float(_attr(node, "alpha", _SELU_ALPHA))
    gamma = float(_attr(node, "gamma", _SELU_GAMMA))
    return [_exponential_unit(ctx, node.input[0], node.output[0], dy, gamma, gamma * alpha)]


def _celu(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Celu: Y = max(0, X) + min(0, alpha * (exp(X / alpha) - 1)):
    dX = dY * (1 if X > 0 else exp(X / alpha) = Y / alpha + 1)."""
    dy = dys[0]
    assert dy is not None
    x, y = node.input[0], node.output[0]
    alpha = float(_attr(node, "alpha", 1.0))
    scaled_y = y if alpha == 1.0 else ctx.op("Mul", [y, ctx.scalar(1.0 / alpha, x)])
    return [_exponential_unit(ctx, x, scaled_y, dy, 1.0, 1.0)]


# --- softmax ----------------------------------------------------------------------------------


def _softmax(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Softmax: dX = Y * (dY - sum(dY * Y, axis))."""
    dy = dys[0]
    assert dy is not None
    y = node.output[0]
    axis = _axis(int(_attr(node, "axis", -1)), ctx.rank(y))
    dyy = ctx.op("Mul", [dy, y])
    s = ctx.b.reduce("ReduceSum", dyy, [axis], keepdims=True)
    return [ctx.op("Sub", [dyy, ctx.op("Mul", [y, s])])]


def _log_softmax(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """LogSoftmax: dX = dY - exp(Y) * sum(dY, axis)."""
    dy = dys[0]
    assert dy is not None
    y = node.output[0]
    axis = _axis(int(_attr(node, "axis", -1)), ctx.rank(y))
    s = ctx.b.reduce("ReduceSum", dy, [axis], keepdims=True)
    return [ctx.op("Sub", [dy, ctx.op("Mul", [ctx.op("Exp", [y]), s])])]


# --- reductions -------------------------------------------------------------------------------


def _reduce_axes(ctx: RuleContext, node: onnx.NodeProto) -> list[int] | None:
    """Normalized reduce axes; None means 'identity' (empty axes with noop_with_empty_axes)."""
    rank = ctx.rank(node.input[0])
    axes_attr = _attr(node, "axes")
    if axes_attr is not None:
        axes = [int(a) for a in axes_attr]
    elif _input(node, 1):
        value = ctx.const_value(node.input[1])
        if value is None:
            raise GradientError("reduce axes come from a computed tensor; only constant axes are supported")
        axes = [int(a) for a in value.reshape(-1)]
    else:
        axes = []
    if not axes:
        if int(_attr(node, "noop_with_empty_axes", 0)):
            return None
        axes = list(range(rank))
    return sorted(_axis(a, rank) for a in axes)


def _reduce_sum_mean(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """ReduceSum: dX = Expand(dY, Shape(X)); ReduceMean divides by the reduced count."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    axes = _reduce_axes(ctx, node)
    if axes is None:
        return [dy]
    if not int(_attr(node, "keepdims", 1)):
        dy = ctx.op("Unsqueeze", [dy, ctx.b.ints(axes)])
    if node.op_type == "ReduceMean":
        dy = ctx.op("Mul", [dy, ctx.op("Reciprocal", [ctx.count(x, node.output[0])])])
    return [ctx.op("Expand", [dy, ctx.shape_of(x)])]


def _reduce_max_min(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """ReduceMax, ReduceMin: with h = [X == Y] (Y and dY unsqueezed back when keepdims=0),
    dX = h * dY / sum(h over the axes) (ties share the gradient evenly, as PyTorch's amax)."""
    dy = dys[0]
    assert dy is not None
    x, y = node.input[0], node.output[0]
    axes = _reduce_axes(ctx, node)
    if axes is None:
        return [dy]
    if not int(_attr(node, "keepdims", 1)):
        dy = ctx.op("Unsqueeze", [dy, ctx.b.ints(axes)])
        y = ctx.op("Unsqueeze", [y, ctx.b.ints(axes)])
    return [_max_grad(ctx, x, y, dy, axes)]


def _max_grad(ctx: RuleContext, x: str, y: str, dy: str, axes: Sequence[int]) -> str:
    """The gradient of a max (or min) over ``axes``, ``y`` and ``dy`` keeping those axes as 1:
    ``h * dY / sum(h)`` with ``h = [X == Y]``."""
    hit = _mask(ctx, ctx.op("Equal", [x, y]), x)
    count = ctx.b.reduce("ReduceSum", hit, axes, keepdims=True)
    return ctx.op("Mul", [hit, ctx.op("Div", [dy, count])])


# --- linear algebra -------------------------------------------------------------------------


def _matmul(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """MatMul: dA = dY @ B^T, dB = A^T @ dY, each summed over broadcast batch axes."""
    dy = dys[0]
    assert dy is not None
    a, b = node.input[0], node.input[1]
    adims, bdims = ctx.dims(a), ctx.dims(b)
    ydims = ctx.dims(node.output[0])
    need_a, need_b = ctx.needs(node, 0), ctx.needs(node, 1)
    a2, b2, dy2 = a, b, dy
    a2dims, b2dims, y2dims = adims, bdims, ydims
    if len(adims) == 1:  # [k] -> [1, k]; Y lost the m axis
        a2 = ctx.op("Unsqueeze", [a, ctx.b.ints([0])])
        a2dims = (1, adims[0])
        dy2 = ctx.op("Unsqueeze", [dy2, ctx.b.ints([-2 if len(bdims) > 1 else -1])])
        y2dims = (*ydims[:-1], 1, ydims[-1]) if len(bdims) > 1 else (*ydims, 1)
    if len(bdims) == 1:  # [k] -> [k, 1]; Y lost the n axis
        b2 = ctx.op("Unsqueeze", [b, ctx.b.ints([-1])])
        b2dims = (bdims[0], 1)
        if len(adims) > 1:
            dy2 = ctx.op("Unsqueeze", [dy2, ctx.b.ints([-1])])
            y2dims = (*ydims, 1)
        else:
            y2dims = (1, 1)
            dy2 = ctx.op("Reshape", [dy, ctx.b.ints([1, 1])])
    ra, rb = len(a2dims), len(b2dims)
    da = db = None
    if need_a:
        if ra == 2 and rb == 2:
            da = ctx.op("Gemm", [dy2, b2], transB=1)
        else:
            bt = ctx.op("Transpose", [b2], perm=[*range(rb - 2), rb - 1, rb - 2])
            da = ctx.op("MatMul", [dy2, bt])
            da_dims = (*y2dims[:-2], *a2dims[-2:])
            da = ctx.reduce_to(da, da_dims, a2) if a2 == a else _reduce_virtual(ctx, da, da_dims, a2dims)
        if a2 != a:
            da = ctx.reshape_like(da, a)
    if need_b:
        if rb == 2:
            k, n = b2dims
            if ra == 2:
                db = ctx.op("Gemm", [a2, dy2], transA=1)
            else:
                a_flat = ctx.op(
                    "Reshape", [a2, ctx.b.ints([-1, k]) if isinstance(k, int) else _last_dim_shape(ctx, a2)]
                )
                dy_flat = ctx.op(
                    "Reshape", [dy2, ctx.b.ints([-1, n]) if isinstance(n, int) else _last_dim_shape(ctx, dy2)]
                )
                db = ctx.op("Gemm", [a_flat, dy_flat], transA=1)
        else:
            at = ctx.op("Transpose", [a2], perm=[*range(ra - 2), ra - 1, ra - 2])
            db = ctx.op("MatMul", [at, dy2])
            db_dims = (*y2dims[:-2], *b2dims[-2:])
            db = ctx.reduce_to(db, db_dims, b2) if b2 == b else _reduce_virtual(ctx, db, db_dims, b2dims)
        if b2 != b:
            db = ctx.reshape_like(db, b)
    return [da, db]


def _last_dim_shape(ctx: RuleContext, x: str) -> str:
    """``[-1, last]`` as a tensor, for flattening all but the last axis of a value."""
    last = ctx.op("Slice", [ctx.op("Shape", [x]), ctx.b.ints([-1]), ctx.b.ints([2**62])])
    return ctx.op("Concat", [ctx.b.ints([-1]), last], axis=0)


def _reduce_virtual(
    ctx: RuleContext, grad: str, grad_dims: tuple[Dim, ...], target_dims: tuple[Dim, ...]
) -> str:
    """Sum leading broadcast axes of a gradient whose target is an unsqueezed 2-D operand."""
    lead = len(grad_dims) - len(target_dims)
    if lead <= 0:
        return grad
    return ctx.b.reduce("ReduceSum", grad, list(range(lead)), keepdims=False)


def _gemm(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Gemm Y = alpha * A' @ B' + beta * C: gradients through transposed Gemms."""
    dy = dys[0]
    assert dy is not None
    a, b = node.input[0], node.input[1]
    alpha = float(_attr(node, "alpha", 1.0))
    beta = float(_attr(node, "beta", 1.0))
    ta, tb = int(_attr(node, "transA", 0)), int(_attr(node, "transB", 0))
    da = db = dc = None
    if ctx.needs(node, 0):
        if ta:
            da = ctx.op("Gemm", [b, dy], alpha=alpha, transA=tb, transB=1)
        else:
            da = ctx.op("Gemm", [dy, b], alpha=alpha, transB=0 if tb else 1)
    if ctx.needs(node, 1):
        if tb:
            db = ctx.op("Gemm", [dy, a], alpha=alpha, transA=1, transB=ta)
        else:
            db = ctx.op("Gemm", [a, dy], alpha=alpha, transA=0 if ta else 1)
    if ctx.needs(node, 2):
        g = dy if beta == 1.0 else ctx.op("Mul", [dy, ctx.scalar(beta, node.output[0])])
        dc = ctx.reduce_to(g, ctx.dims(node.output[0]), node.input[2])
    return [da, db, dc]


def _einsum_terms(equation: str, ranks: Sequence[int]) -> tuple[list[str], str]:
    """The input terms and output term of an Einsum, with ``...`` replaced by letters (the same
    letter for the same right-aligned broadcast axis) and the implicit output made explicit."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise GradientError(f"equation '{equation}' has {len(terms)} terms for {len(ranks)} inputs")
    used = set(eq) - {".", ",", "-", ">"}
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used]
    widths = [rank - len(t.replace("...", "")) for t, rank in zip(terms, ranks, strict=True) if "..." in t]
    width = max(widths, default=0)
    if width > len(spare):
        raise GradientError(f"equation '{equation}': too many axes under '...'")
    ell = "".join(spare[:width])  # letter of each broadcast axis, outermost first

    def expand(term: str, rank: int | None) -> str:
        if "..." not in term:
            return term
        w = (rank - len(term.replace("...", ""))) if rank is not None else width
        return term.replace("...", ell[width - w :])

    inputs = [expand(t, r) for t, r in zip(terms, ranks, strict=True)]
    for t in inputs:
        if t and not t.isalpha():
            raise GradientError(f"equation '{equation}': cannot read term '{t}'")
        if len(set(t)) != len(t):
            raise GradientError(
                f"equation '{equation}': a label repeated within one operand (a diagonal) has no gradient rule"
            )
    if arrow:
        output = expand(rhs, None)
    else:
        counts: dict[str, int] = {}
        for t in inputs:
            for c in t:
                counts[c] = counts.get(c, 0) + 1
        output = ell + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    return inputs, output


def _einsum(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Einsum without repeated labels in one operand (batched matmuls ``bij,bjk->bik``,
    attention ``bhqd,bhkd->bhqk`` and ``bhqk,bhkd->bhqd``, projections, transposes, reductions,
    ``...``): dX_i = Einsum(dY and the other operands -> X_i's term), with the labels only X_i
    has (summed over in the forward) put back by Unsqueeze + Expand. Letters stand for the
    ``...`` axes, so operands whose ``...`` axes broadcast (one has size 1 where another does
    not) are refused; diagonals (``ii->i``) are refused."""
    dy = dys[0]
    assert dy is not None
    equation = _str_attr(node, "equation", "")
    ranks = [ctx.rank(x) for x in node.input]
    terms, output = _einsum_terms(equation, ranks)
    sizes: dict[str, Dim] = {}
    for x, term in zip(node.input, terms, strict=True):
        for label, d in zip(term, ctx.dims(x), strict=True):
            seen = sizes.setdefault(label, d)
            if isinstance(seen, int) and isinstance(d, int) and seen != d:
                raise GradientError(
                    f"equation '{equation}': label '{label}' has sizes {seen} and {d} (broadcast "
                    "axes under '...' are not supported)"
                )
    grads: Grads = []
    for i, x in enumerate(node.input):
        if not ctx.needs(node, i):
            grads.append(None)
            continue
        others = [t for j, t in enumerate(terms) if j != i]
        elsewhere = set(output).union(*others)
        kept = "".join(c for c in terms[i] if c in elsewhere)
        operands = [dy, *(v for j, v in enumerate(node.input) if j != i)]
        grad = ctx.op("Einsum", operands, equation=f"{','.join([output, *others])}->{kept}")
        if kept != terms[i]:
            missing = [k for k, c in enumerate(terms[i]) if c not in elsewhere]
            grad = ctx.op("Expand", [ctx.op("Unsqueeze", [grad, ctx.b.ints(missing)]), ctx.shape_of(x)])
        grads.append(grad)
    return grads


# --- convolution ----------------------------------------------------------------------------


def _conv_geometry(ctx: RuleContext, node: onnx.NodeProto, x: str, w_shape: Sequence[int]) -> dict[str, Any]:
    xshape = ctx.dims(x)
    spatial = [d for d in xshape[2:]]
    if not all(isinstance(d, int) for d in spatial):
        raise GradientError(
            f"needs static spatial dims for its gradient; input '{x}' has {list(xshape)} "
            "(give the student a fixed input size)"
        )
    nd = len(spatial)
    kernel = list(_attr(node, "kernel_shape") or w_shape[2:])
    strides = list(_attr(node, "strides") or [1] * nd)
    dilations = list(_attr(node, "dilations") or [1] * nd)
    pads = list(_attr(node, "pads") or [0] * (2 * nd))
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    ceil_mode = int(_attr(node, "ceil_mode", 0))
    out: list[int] = []
    for i in range(nd):
        size = int(spatial[i])  # type: ignore[arg-type]
        eff = (kernel[i] - 1) * dilations[i] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            o = -(-size // strides[i])
            total = max((o - 1) * strides[i] + eff - size, 0)
            small = total // 2
            pads[i], pads[nd + i] = (
                (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
            )
        elif auto_pad == "VALID":
            pads[i] = pads[nd + i] = 0
        span = size + pads[i] + pads[nd + i] - eff
        o = (-(-span // strides[i]) if ceil_mode else span // strides[i]) + 1
        if ceil_mode and (o - 1) * strides[i] >= size + pads[i]:
            o -= 1  # the last window must start inside the input or the left padding
        out.append(o)
    # ConvTranspose restores the exact input size with output_padding; windows that run past
    # the end padding (ceil_mode) count as extra end padding.
    end_pads = list(pads[nd:])
    output_padding = []
    for i in range(nd):
        eff = (kernel[i] - 1) * dilations[i] + 1
        covered = strides[i] * (out[i] - 1) + eff
        extra = int(spatial[i]) + pads[i] + end_pads[i] - covered  # type: ignore[arg-type]
        if extra < 0:
            end_pads[i] -= extra
            extra = 0
        output_padding.append(extra)
    return {
        "spatial": [int(s) for s in spatial],  # type: ignore[arg-type]
        "kernel": kernel,
        "strides": strides,
        "dilations": dilations,
        "pads": pads,
        "tpads": pads[:nd] + end_pads,
        "out": out,
        "output_padding": output_padding,
        "nd": nd,
    }


def _dynamic_conv_geometry(ctx: RuleContext, node: onnx.NodeProto, w_shape: Sequence[int]) -> dict[str, Any]:
    """Conv geometry when spatial sizes are only known at run time (explicit pads, VALID, or SAME
    with stride 1, whose pads do not depend on the size)."""
    nd = len(w_shape) - 2
    kernel = list(_attr(node, "kernel_shape") or w_shape[2:])
    strides = list(_attr(node, "strides") or [1] * nd)
    dilations = list(_attr(node, "dilations") or [1] * nd)
    pads = list(_attr(node, "pads") or [0] * (2 * nd))
    auto_pad = _str_attr(node, "auto_pad", "NOTSET")
    if auto_pad == "VALID":
        pads = [0] * (2 * nd)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if any(s != 1 for s in strides):
            raise GradientError(
                f"auto_pad={auto_pad} with strides {strides} pads by the input size, which is only known "
                "at run time here; give the student a fixed input size"
            )
        for i in range(nd):
            total = (kernel[i] - 1) * dilations[i]
            small = total // 2
            pads[i], pads[nd + i] = (
                (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
            )
    return {
        "kernel": kernel,
        "strides": strides,
        "dilations": dilations,
        "pads": pads,
        "out": None,
        "nd": nd,
    }


def _conv(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Conv: dX = ConvTranspose(dY, W); dW by im2col and one Gemm (batched MatMul for groups); dB = sum(dY).

    With static spatial sizes, ConvTranspose's pads and output_padding restore the exact input
    size. With sizes known only at run time, ConvTranspose crops only the begin padding and its
    result is zero-padded (the rows no window reads, when the stride does not divide evenly) and
    sliced back to X's size; the im2col slices end where dY's size says.
    """
    dy = dys[0]
    assert dy is not None
    x, w = node.input[0], node.input[1]
    w_shape = ctx.static_shape(w)
    if w_shape is None:
        raise GradientError(f"weight '{w}' needs a static shape")
    group = int(_attr(node, "group", 1))
    spatial = ctx.dims(x)[2:]
    dynamic = not all(isinstance(d, int) for d in spatial)
    geo = _dynamic_conv_geometry(ctx, node, w_shape) if dynamic else _conv_geometry(ctx, node, x, w_shape)
    nd = geo["nd"]
    dx = dw = db = None
    if ctx.needs(node, 0):
        window = {"kernel_shape": geo["kernel"], "strides": geo["strides"], "dilations": geo["dilations"]}
        if not dynamic:
            dx = ctx.op(
                "ConvTranspose",
                [dy, w],
                group=group,
                pads=geo["tpads"],
                output_padding=geo["output_padding"],
                **window,
            )
        else:
            pads = geo["pads"]
            dx = ctx.op("ConvTranspose", [dy, w], group=group, pads=[*pads[:nd], *[0] * nd], **window)
            if any(s != 1 for s in geo["strides"]):  # X's rows past the last window get zeros
                size_x = _slice_axis(ctx, ctx.op("Shape", [x]), 2, _INT_MAX, 0)
                size_dx = _slice_axis(ctx, ctx.op("Shape", [dx]), 2, _INT_MAX, 0)
                short = ctx.op("Add", [ctx.op("Sub", [size_x, size_dx]), ctx.b.ints(pads[nd:])])
                dx = ctx.op("Pad", [dx, ctx.op("Concat", [ctx.b.ints([0] * (nd + 4)), short], axis=0)])
            if any(pads[nd:]):
                ends = [-p if p else _INT_MAX for p in pads[nd:]]
                dx = ctx.op(
                    "Slice", [dx, ctx.b.ints([0] * nd), ctx.b.ints(ends), ctx.b.ints(range(2, 2 + nd))]
                )
    if ctx.needs(node, 1):
        dw = _conv_weight_grad(ctx, x, dy, w_shape, group, geo)
    if len(node.input) > 2 and ctx.needs(node, 2):
        db = ctx.b.reduce("ReduceSum", dy, [0, *range(2, 2 + nd)], keepdims=False)
    return [dx, dw, db]


def _conv_weight_grad(
    ctx: RuleContext, x: str, dy: str, w_shape: Sequence[int], group: int, geo: dict[str, Any]
) -> str:
    """dW[o, c, k] = sum over (n, out positions) of dY[n, o, p] * Xpad[n, c, p*s + k*d].

    The im2col columns are one slice of Xpad per kernel offset. With a 2-D stride s > 1 and
    static sizes, SpaceToDepth(Xpad, s) (padded to a multiple of s) first puts each phase
    (k*d mod s per axis) in its own channel block, so each offset is a unit-step slice of its
    phase starting at k*d // s: one pass over X instead of k*k element-strided slices, which
    cost 2-3x more than the whole weight Gemm on onnxruntime's CPU kernels.
    """
    nd = geo["nd"]
    channels_out = w_shape[0]
    cg = w_shape[1]
    channels_in = cg * group
    kernel, strides, dilations, pads, out = (
        geo["kernel"],
        geo["strides"],
        geo["dilations"],
        geo["pads"],
        geo["out"],
    )
    xt = ctx.op("Transpose", [x], perm=[1, 0, *range(2, 2 + nd)])  # [C, N, *spatial]
    pad_begin, pad_end = pads[:nd], list(pads[nd:])
    for i in range(nd if out is not None else 0):  # ceil-mode windows may read past the end padding
        need = (out[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
        pad_end[i] = max(pad_end[i], need - geo["spatial"][i] - pad_begin[i])
    phased = out is not None and nd == 2 and strides[0] == strides[1] > 1
    for i in range(nd if phased else 0):  # SpaceToDepth needs sizes that are multiples of s
        pad_end[i] += -(geo["spatial"][i] + pad_begin[i] + pad_end[i]) % strides[i]
    if any(pad_begin) or any(pad_end):
        xt = ctx.op("Pad", [xt, ctx.b.ints([0, 0, *pad_begin, 0, 0, *pad_end])])
    offsets = list(itertools.product(*[range(k) for k in kernel]))
    identity_window = (
        len(offsets) == 1 and all(s == 1 for s in strides) and not any(pad_begin) and not any(pad_end)
    )
    if identity_window:
        cols = xt
    elif phased:
        s = strides[0]
        sizes = [(geo["spatial"][i] + pad_begin[i] + pad_end[i]) // s for i in range(nd)]
        # [C, s*s*N, H/s, W/s], phase (a, b) in channels (a*s + b)*N ..: as [C, s*s, N, H/s, W/s]
        phases = ctx.op("SpaceToDepth", [xt], blocksize=s)
        phases = ctx.op("Reshape", [phases, ctx.b.ints([0, s * s, -1, *sizes])])
        pieces = []
        for off in offsets:
            at = [off[i] * dilations[i] for i in range(nd)]
            phase = (at[0] % s) * s + at[1] % s
            begin = [phase, *[a // s for a in at]]
            end = [phase + 1, *[at[i] // s + out[i] for i in range(nd)]]
            pieces.append(
                ctx.op("Slice", [phases, ctx.b.ints(begin), ctx.b.ints(end), ctx.b.ints([1, 3, 4])])
            )
        cols = pieces[0] if len(pieces) == 1 else ctx.op("Concat", pieces, axis=1)  # [C, K, N, *out]
    else:
        pieces = []
        axes = list(range(2, 2 + nd))
        if out is None:  # sizes known at run time: a window starting at k ends at k + s * (out - 1) + 1
            span = ctx.op(
                "Mul", [_slice_axis(ctx, ctx.op("Shape", [dy]), 2, _INT_MAX, 0), ctx.b.ints(strides)]
            )
        for off in offsets:
            starts = [off[i] * dilations[i] for i in range(nd)]
            if out is None:
                ends = ctx.op("Add", [span, ctx.b.ints([starts[i] - strides[i] + 1 for i in range(nd)])])
            else:
                ends = ctx.b.ints([starts[i] + strides[i] * (out[i] - 1) + 1 for i in range(nd)])
            pieces.append(
                ctx.op("Slice", [xt, ctx.b.ints(starts), ends, ctx.b.ints(axes), ctx.b.ints(strides)])
            )
        cols = pieces[0] if len(pieces) == 1 else ctx.op("Concat", pieces, axis=1)  # [C, K*N, *out]
    kk = len(offsets)
    dyt = ctx.op("Transpose", [dy], perm=[1, 0, *range(2, 2 + nd)])  # [O, N, *out]
    if group == 1:
        cols2 = ctx.op("Reshape", [cols, ctx.b.ints([channels_in * kk, -1])])
        dy2 = ctx.op("Reshape", [dyt, ctx.b.ints([channels_out, -1])])
        dw2 = ctx.op("Gemm", [dy2, cols2], transB=1)
    else:
        cols3 = ctx.op("Reshape", [cols, ctx.b.ints([group, cg * kk, -1])])
        dy3 = ctx.op("Reshape", [dyt, ctx.b.ints([group, channels_out // group, -1])])
        dw2 = ctx.op("MatMul", [dy3, ctx.op("Transpose", [cols3], perm=[0, 2, 1])])
    return ctx.op("Reshape", [dw2, ctx.b.ints(list(w_shape))])


def _conv_transpose_pads(
    ctx: RuleContext, node: onnx.NodeProto, x: str, y: str, kernel: Sequence[int]
) -> list[int]:
    """The begin and end pads ConvTranspose applied, from ``pads`` or from auto_pad/output_shape.

    With auto_pad SAME_* or output_shape the runtime splits the total padding itself; an even
    total splits the same way under every convention, an odd one is refused.
    """
    xdims, ydims = ctx.dims(x), ctx.dims(y)
    nd = len(kernel)
    spatial_in, spatial_out = list(xdims[2:]), list(ydims[2:])
    if not all(isinstance(d, int) for d in [*spatial_in, *spatial_out]):
        raise GradientError(
            f"needs static spatial dims for its gradient; '{x}' has {list(xdims)} and '{y}' has "
            f"{list(ydims)} (give the student a fixed input size)"
        )
    strides = list(_attr(node, "strides") or [1] * nd)
    dilations = list(_attr(node, "dilations") or [1] * nd)
    out_pad = list(_attr(node, "output_padding") or [0] * nd)
    auto_pad = _str_attr(node, "auto_pad", "NOTSET")
    pads = list(_attr(node, "pads") or [0] * (2 * nd))
    if auto_pad == "VALID":
        pads = [0] * (2 * nd)
    for i in range(nd):
        n, m = int(spatial_in[i]), int(spatial_out[i])  # type: ignore[arg-type]
        full = strides[i] * (n - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER") or _attr(node, "output_shape") is not None:
            total = full - m
            if total < 0 or total % 2:
                raise GradientError(
                    f"total padding {total} on spatial axis {i} (from auto_pad={auto_pad} or "
                    "output_shape) splits differently across runtimes; give explicit pads"
                )
            pads[i] = pads[nd + i] = total // 2
        if full - pads[i] - pads[nd + i] != m:
            raise GradientError(f"output size {m} on spatial axis {i} does not follow from its attributes")
        if out_pad[i] >= strides[i]:
            raise GradientError(f"output_padding {out_pad[i]} >= stride {strides[i]} is not supported")
    return pads


def _conv_transpose(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """ConvTranspose, the adjoint of the Conv X <- Y with the same attributes and weight:
    dX = Conv(dY, W) with the forward's strides, pads, dilations and group;
    dW[c, o, k] = sum over (n, q) of X[n, c, q] * dYpad[n, o, q*s + k*d], which is Conv's im2col
    weight gradient with input and output gradient swapped; dB = sum(dY)."""
    dy = dys[0]
    assert dy is not None
    x, w, y = node.input[0], node.input[1], node.output[0]
    w_shape = ctx.static_shape(w)
    if w_shape is None:
        raise GradientError(f"weight '{w}' needs a static shape")
    group = int(_attr(node, "group", 1))
    nd = len(w_shape) - 2
    kernel = list(_attr(node, "kernel_shape") or w_shape[2:])
    strides = list(_attr(node, "strides") or [1] * nd)
    dilations = list(_attr(node, "dilations") or [1] * nd)
    pads = _conv_transpose_pads(ctx, node, x, y, kernel)
    conv_attrs: dict[str, Any] = {
        "kernel_shape": kernel,
        "strides": strides,
        "dilations": dilations,
        "pads": pads,
    }
    dx = dw = db = None
    if ctx.needs(node, 0):
        dx = ctx.op("Conv", [dy, w], group=group, **conv_attrs)
    if ctx.needs(node, 1):
        adjoint = helper.make_node("Conv", [y, w], [node.output[0]], **conv_attrs)
        geo = _conv_geometry(ctx, adjoint, y, w_shape)
        dw = _conv_weight_grad(ctx, dy, x, w_shape, group, geo)
    if len(node.input) > 2 and ctx.needs(node, 2):
        db = ctx.b.reduce("ReduceSum", dy, [0, *range(2, 2 + nd)], keepdims=False)
    return [dx, dw, db]


# --- pooling ----------------------------------------------------------------------------------


def _prepare_maxpool(node: onnx.NodeProto, builder: Builder) -> onnx.NodeProto:
    """Ask MaxPool for its Indices output (only in the step graph: it costs time)."""
    if len(node.output) > 1 and node.output[1]:
        return node
    new = onnx.NodeProto()
    new.CopyFrom(node)
    del new.output[:]
    new.output.extend([node.output[0], builder.fresh("maxpool_indices")])
    return new


def _flat_scatter_add(
    ctx: RuleContext, like: str, indices: str, updates: str, *, unique: bool = False
) -> str:
    """Zeros shaped like ``like``, flattened, plus ``updates`` scattered at flat ``indices``.

    ``unique``: no index repeats (a slice), so a plain scatter adds as well, at any opset
    (``reduction="add"`` needs opset 16)."""
    size = ctx.op("Reshape", [ctx.op("Size", [like]), ctx.b.ints([1])])
    value = onnx.numpy_helper.from_array(np.zeros(1, dtype=helper.tensor_dtype_to_np_dtype(ctx.elem(like))))
    zeros = ctx.op("ConstantOfShape", [size], value=value)
    flat_i = ctx.op("Reshape", [indices, ctx.b.ints([-1])])
    flat_u = ctx.op("Reshape", [updates, ctx.b.ints([-1])])
    reduction = None if unique else "add"  # None: the attribute is left out
    scattered = ctx.op("ScatterElements", [zeros, flat_i, flat_u], axis=0, reduction=reduction)
    return ctx.reshape_like(scattered, like)


def _maxpool(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """MaxPool: dX = ScatterElements(zeros, Indices, dY, reduction='add')."""
    dy = dys[0]
    assert dy is not None
    if int(_attr(node, "storage_order", 0)):
        raise GradientError("storage_order=1 (column-major indices) is not supported")
    return [_flat_scatter_add(ctx, node.input[0], node.output[1], dy)]


def _pool_divisors(geo: dict[str, Any], include_pad: bool) -> np.ndarray:
    """Per output position, the number of elements AveragePool divides by."""
    per_dim = []
    for i in range(geo["nd"]):
        size, k, s, d = geo["spatial"][i], geo["kernel"][i], geo["strides"][i], geo["dilations"][i]
        pb, pe = geo["pads"][i], geo["pads"][geo["nd"] + i]
        counts = []
        for o in range(geo["out"][i]):
            pos = [o * s - pb + j * d for j in range(k)]
            if include_pad:
                counts.append(sum(1 for p in pos if p < size + pe))
            else:
                counts.append(sum(1 for p in pos if 0 <= p < size))
        per_dim.append(np.asarray(counts, dtype=np.float64))
    grid = per_dim[0]
    for c in per_dim[1:]:
        grid = np.multiply.outer(grid, c)
    return grid


def _average_pool(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """AveragePool: dX = ConvTranspose(dY / divisors, ones), depthwise."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    xdims = ctx.dims(x)
    channels = xdims[1]
    if not isinstance(channels, int):
        raise GradientError(f"needs a static channel count; input '{x}' has {list(xdims)}")
    geo = _conv_geometry(ctx, node, x, [channels, 1, *_attr(node, "kernel_shape")])
    dtype = helper.tensor_dtype_to_np_dtype(ctx.elem(x))
    inv = (1.0 / _pool_divisors(geo, bool(_attr(node, "count_include_pad", 0)))).astype(dtype)
    scaled = ctx.op("Mul", [dy, ctx.b.const(inv.reshape(1, 1, *inv.shape), "pool_inv_count")])
    ones = ctx.b.const(np.ones((channels, 1, *geo["kernel"]), dtype=dtype), "pool_ones")
    dx = ctx.op(
        "ConvTranspose",
        [scaled, ones],
        group=channels,
        kernel_shape=geo["kernel"],
        strides=geo["strides"],
        dilations=geo["dilations"],
        pads=geo["tpads"],
        output_padding=geo["output_padding"],
    )
    return [dx]


def _global_average_pool(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """GlobalAveragePool: dX = Expand(dY / (H*W), Shape(X))."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    scaled = ctx.op("Mul", [dy, ctx.op("Reciprocal", [ctx.count(x, node.output[0])])])
    return [ctx.op("Expand", [scaled, ctx.shape_of(x)])]


def _global_max_pool(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """GlobalMaxPool: a ReduceMax over the spatial axes that keeps them (magika's classifier
    pools its features this way)."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    return [_max_grad(ctx, x, node.output[0], dy, list(range(2, len(ctx.dims(x)))))]


# --- normalization --------------------------------------------------------------------------


def _channel_shape(rank: int) -> list[int]:
    return [-1] + [1] * (rank - 2)


def _batch_norm(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """BatchNormalization with frozen statistics: Y = a*(X - mean) + B, a = scale/sqrt(var + eps).

    dX = dY * a; dscale = sum(dY * (X - mean) / sqrt(var + eps)); dB = sum(dY). The running
    statistics get no gradient (``--bn-mode train`` rewrites the node before differentiation).
    """
    dy = dys[0]
    assert dy is not None
    if int(_attr(node, "training_mode", 0)) or len([o for o in node.output if o]) > 1:
        raise GradientError("training-mode BatchNormalization must be rewritten before differentiation")
    x, scale, _bias, mean, var = node.input[:5]
    rank = ctx.rank(x)
    eps = float(_attr(node, "epsilon", 1e-5))
    cshape = ctx.b.ints(_channel_shape(rank))
    inv_std = ctx.op("Reciprocal", [ctx.op("Sqrt", [ctx.op("Add", [var, ctx.scalar(eps, x)])])])
    axes = [0, *range(2, rank)]
    dx = dscale = dbias = None
    if ctx.needs(node, 0):
        a = ctx.op("Reshape", [ctx.op("Mul", [scale, inv_std]), cshape])
        dx = ctx.op("Mul", [dy, a])
    if ctx.needs(node, 1):
        xhat = ctx.op(
            "Mul",
            [ctx.op("Sub", [x, ctx.op("Reshape", [mean, cshape])]), ctx.op("Reshape", [inv_std, cshape])],
        )
        dscale = ctx.b.reduce("ReduceSum", ctx.op("Mul", [dy, xhat]), axes, keepdims=False)
    if ctx.needs(node, 2):
        dbias = ctx.b.reduce("ReduceSum", dy, axes, keepdims=False)
    return [dx, dscale, dbias, None, None]


def _prepare_layer_norm(node: onnx.NodeProto, builder: Builder) -> onnx.NodeProto:
    """Ask LayerNormalization for its Mean and InvStdDev outputs."""
    outputs = list(node.output) + [""] * (3 - len(node.output))
    if all(outputs):
        return node
    new = onnx.NodeProto()
    new.CopyFrom(node)
    del new.output[:]
    new.output.extend(
        [outputs[0], outputs[1] or builder.fresh("ln_mean"), outputs[2] or builder.fresh("ln_inv_std")]
    )
    return new


def _layer_norm(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """LayerNormalization over axes [axis, rank): with xh = (X - mean) * inv_std, g = dY * scale,
    dX = inv_std * (g - mean(g) - xh * mean(g * xh)); dscale = sum(dY * xh); dB = sum(dY).
    """
    dy = dys[0]
    assert dy is not None
    x, scale = node.input[0], node.input[1]
    rank = ctx.rank(x)
    axis = _axis(int(_attr(node, "axis", -1)), rank)
    naxes = list(range(axis, rank))
    elem = ctx.elem(x)
    mean = ctx.op("Cast", [node.output[1]], to=elem)
    inv_std = ctx.op("Cast", [node.output[2]], to=elem)
    xhat = ctx.op("Mul", [ctx.op("Sub", [x, mean]), inv_std])
    ydims = ctx.dims(node.output[0])
    dx = dscale = dbias = None
    if ctx.needs(node, 0):
        g = ctx.op("Mul", [dy, scale])
        xdims = ctx.dims(x)
        normalized = xdims[axis:]
        static = [d for d in normalized if isinstance(d, int)]
        if len(static) == len(normalized):
            inv_n = ctx.scalar(1.0 / math.prod(static), x)
        else:
            inv_n = ctx.op("Reciprocal", [ctx.count(x, node.output[1])])
        mean_g = ctx.op("Mul", [ctx.b.reduce("ReduceSum", g, naxes, keepdims=True), inv_n])
        mean_gx = ctx.op(
            "Mul", [ctx.b.reduce("ReduceSum", ctx.op("Mul", [g, xhat]), naxes, keepdims=True), inv_n]
        )
        inner = ctx.op("Sub", [ctx.op("Sub", [g, mean_g]), ctx.op("Mul", [xhat, mean_gx])])
        dx = ctx.op("Mul", [inner, inv_std])
    if ctx.needs(node, 1):
        dscale = ctx.reduce_to(ctx.op("Mul", [dy, xhat]), ydims, scale)
    if len(node.input) > 2 and ctx.needs(node, 2):
        dbias = ctx.reduce_to(dy, ydims, node.input[2])
    return [dx, dscale, dbias]


def _normalize_backward(ctx: RuleContext, g: str, xhat: str, inv_std: str, axes: Sequence[int]) -> str:
    """dX of xhat = (X - mean) * inv_std over ``axes``, given g = dL/dxhat:
    inv_std * (g - mean(g) - xhat * mean(g * xhat))."""
    mean_g = ctx.b.reduce("ReduceMean", g, axes, keepdims=True)
    mean_gx = ctx.b.reduce("ReduceMean", ctx.op("Mul", [g, xhat]), axes, keepdims=True)
    inner = ctx.op("Sub", [ctx.op("Sub", [g, mean_g]), ctx.op("Mul", [xhat, mean_gx])])
    return ctx.op("Mul", [inner, inv_std])


def _standardize(ctx: RuleContext, x: str, axes: Sequence[int], eps: float, like: str) -> tuple[str, str]:
    """(xhat, inv_std) of ``x`` (of ``like``'s type) over ``axes``; the statistics are recomputed
    because these forward ops output none."""
    centred = ctx.op("Sub", [x, ctx.b.reduce("ReduceMean", x, axes, keepdims=True)])
    var = ctx.b.reduce("ReduceMean", ctx.op("Mul", [centred, centred]), axes, keepdims=True)
    inv_std = ctx.op("Reciprocal", [ctx.op("Sqrt", [ctx.op("Add", [var, ctx.scalar(eps, like)])])])
    return ctx.op("Mul", [centred, inv_std]), inv_std


def _instance_norm(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """InstanceNormalization over the spatial axes of each (n, c): with xh = (X - mean) * inv_std
    and g = dY * scale, dX = inv_std * (g - mean(g) - xh * mean(g * xh));
    dscale = sum(dY * xh), dB = sum(dY) over the batch and spatial axes."""
    dy = dys[0]
    assert dy is not None
    x, scale = node.input[0], node.input[1]
    rank = ctx.rank(x)
    if rank < 3:
        raise GradientError(f"input '{x}' has rank {rank}; InstanceNormalization needs [N, C, D1, ...]")
    spatial = list(range(2, rank))
    xhat, inv_std = _standardize(ctx, x, spatial, float(_attr(node, "epsilon", 1e-5)), x)
    dx = dscale = dbias = None
    if ctx.needs(node, 0):
        g = ctx.op("Mul", [dy, ctx.op("Reshape", [scale, ctx.b.ints(_channel_shape(rank))])])
        dx = _normalize_backward(ctx, g, xhat, inv_std, spatial)
    if ctx.needs(node, 1):
        dscale = ctx.b.reduce("ReduceSum", ctx.op("Mul", [dy, xhat]), [0, *spatial], keepdims=False)
    if ctx.needs(node, 2):
        dbias = ctx.b.reduce("ReduceSum", dy, [0, *spatial], keepdims=False)
    return [dx, dscale, dbias]


def _group_norm(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """GroupNormalization: X [N, C, ...] viewed as [N, G, C/G * spatial] is normalized per (n, group)
    (statistics recomputed), then Y = scale * xh + B per channel (opset 21) or per group (opset
    18-20, where scale and B have G values): dX as for InstanceNormalization on the grouped view,
    with g = dY * scale per channel; dscale = sum(dY * xh), dB = sum(dY) over batch and spatial
    axes, then over the channels of each group for the opset 18 form."""
    dy = dys[0]
    assert dy is not None
    x, scale = node.input[0], node.input[1]
    rank = ctx.rank(x)
    groups = int(_attr(node, "num_groups"))
    channels = ctx.dims(x)[1]
    if not isinstance(channels, int):
        raise GradientError(f"needs a static channel count; input '{x}' has {list(ctx.dims(x))}")
    per_group = ctx.b.opset < 21
    spatial = list(range(2, rank))
    grouped = ctx.op("Reshape", [x, ctx.b.ints([0, groups, -1])])
    xhat_g, inv_std = _standardize(ctx, grouped, [2], float(_attr(node, "epsilon", 1e-5)), x)
    xhat = ctx.reshape_like(xhat_g, x)
    cshape = ctx.b.ints(_channel_shape(rank))

    def per_channel(values: str) -> str:
        if not per_group:
            return ctx.op("Reshape", [values, cshape])
        spread = ctx.op(
            "Expand",
            [ctx.op("Reshape", [values, ctx.b.ints([groups, 1])]), ctx.b.ints([groups, channels // groups])],
        )
        return ctx.op("Reshape", [spread, cshape])

    def summed(values: str) -> str:
        total = ctx.b.reduce("ReduceSum", values, [0, *spatial], keepdims=False)  # [C]
        if not per_group:
            return total
        return ctx.b.reduce(
            "ReduceSum", ctx.op("Reshape", [total, ctx.b.ints([groups, -1])]), [1], keepdims=False
        )

    dx = dscale = dbias = None
    if ctx.needs(node, 0):
        g = ctx.op("Reshape", [ctx.op("Mul", [dy, per_channel(scale)]), ctx.b.ints([0, groups, -1])])
        dx = ctx.reshape_like(_normalize_backward(ctx, g, xhat_g, inv_std, [2]), x)
    if ctx.needs(node, 1):
        dscale = summed(ctx.op("Mul", [dy, xhat]))
    if ctx.needs(node, 2):
        dbias = summed(dy)
    return [dx, dscale, dbias]


# --- indexing, joining, slicing -------------------------------------------------------------


def _gather(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Gather (embeddings): dData = ScatterND(zeros, indices, dY, reduction='add')."""
    dy = dys[0]
    assert dy is not None
    data, indices = node.input[0], node.input[1]
    rank = ctx.rank(data)
    q = ctx.rank(indices)
    axis = _axis(int(_attr(node, "axis", 0)), rank)
    idx = ctx.op("Unsqueeze", [_positive_indices(ctx, indices, data, axis), ctx.b.ints([-1])])
    if axis == 0:
        zeros = ctx.zeros_like(data)
        return [ctx.op("ScatterND", [zeros, idx, dy], reduction="add"), None]
    perm = [axis, *range(axis), *range(axis + 1, rank)]
    inverse = [0] * rank
    for i, p in enumerate(perm):
        inverse[p] = i
    yperm = [*range(axis, axis + q), *range(axis), *range(axis + q, rank - 1 + q)]
    dyt = ctx.op("Transpose", [dy], perm=yperm)
    tshape = ctx.op("Gather", [ctx.shape_of(data), ctx.b.ints(perm)])
    value = onnx.numpy_helper.from_array(np.zeros(1, dtype=helper.tensor_dtype_to_np_dtype(ctx.elem(data))))
    zeros = ctx.op("ConstantOfShape", [tshape], value=value)
    scattered = ctx.op("ScatterND", [zeros, idx, dyt], reduction="add")
    return [ctx.op("Transpose", [scattered], perm=inverse), None]


def _np_int(ctx: RuleContext, name: str) -> Any:
    return helper.tensor_dtype_to_np_dtype(ctx.elem(name))


def _cast_like(ctx: RuleContext, value: str, like: str) -> str:
    return value if ctx.elem(like) == onnx.TensorProto.INT64 else ctx.op("Cast", [value], to=ctx.elem(like))


def _concat(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Concat: dX_i = the matching Split of dY along the axis."""
    dy = dys[0]
    assert dy is not None
    rank = ctx.rank(node.output[0])
    axis = _axis(int(_attr(node, "axis")), rank)
    sizes = [ctx.dims(x)[axis] for x in node.input]
    if all(isinstance(s, int) for s in sizes):
        split = ctx.b.ints([int(s) for s in sizes])  # type: ignore[arg-type]
    else:
        split = ctx.op(
            "Concat",
            [ctx.op("Gather", [ctx.op("Shape", [x]), ctx.b.ints([axis])]) for x in node.input],
            axis=0,
        )
    if len(node.input) == 1:
        return [dy]
    parts = ctx.op("Split", [dy, split], axis=axis, outputs=len(node.input))
    return [p if ctx.needs(node, i) else None for i, p in enumerate(parts)]


def _split(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Split: dX = Concat(dY_i, zeros where an output has no gradient)."""
    rank = ctx.rank(node.input[0])
    axis = _axis(int(_attr(node, "axis", 0)), rank)
    parts = [dy if dy is not None else ctx.zeros_like(out) for dy, out in zip(dys, node.output, strict=True)]
    return [parts[0] if len(parts) == 1 else ctx.op("Concat", parts, axis=axis), None]


def _slice(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Slice: dX = Pad(dY) for constant unit-step slices, else a scatter through an index map."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    consts = [ctx.const_value(_input(node, i)) for i in range(1, 5)]
    starts, ends = consts[0], consts[1]
    if (
        starts is not None
        and ends is not None
        and (not _input(node, 3) or consts[2] is not None)
        and (not _input(node, 4) or consts[3] is not None)
    ):
        rank = ctx.rank(x)
        axes = [int(a) for a in consts[2].reshape(-1)] if consts[2] is not None else list(range(len(starts)))
        steps = [int(s) for s in consts[3].reshape(-1)] if consts[3] is not None else [1] * len(axes)
        xdims = ctx.dims(x)
        axes = [_axis(a, rank) for a in axes]
        if all(s == 1 for s in steps) and all(isinstance(xdims[a], int) for a in axes):
            pads = [0] * (2 * rank)
            for a, st, en in zip(axes, starts.reshape(-1), ends.reshape(-1), strict=True):
                size = int(xdims[a])  # type: ignore[arg-type]
                b = int(st) + size if int(st) < 0 else int(st)
                e = int(en) + size if int(en) < 0 else int(en)
                b = min(max(b, 0), size)
                e = min(max(e, b), size)
                pads[a] = b
                pads[rank + a] = size - e
            return [ctx.op("Pad", [dy, ctx.b.ints(pads)])]
    size = ctx.op("Size", [x])
    index_map = ctx.op(
        "Reshape",
        [
            ctx.op(
                "Range", [ctx.b.const(np.asarray(0, np.int64)), size, ctx.b.const(np.asarray(1, np.int64))]
            ),
            ctx.shape_of(x),
        ],
    )
    picked = ctx.op("Slice", [index_map, *node.input[1:]])
    return [_flat_scatter_add(ctx, x, picked, dy, unique=True)]  # a slice picks each element once


def _positive_indices(ctx: RuleContext, indices: str, data: str, axis: int) -> str:
    """``indices`` into axis ``axis`` of ``data`` with negative values wrapped, as int64."""
    dim = ctx.op("Gather", [ctx.shape_of(data), ctx.b.const(np.asarray(axis, dtype=np.int64))])
    fixed = ctx.op(
        "Where",
        [
            ctx.op("Less", [indices, ctx.b.const(np.asarray(0, dtype=_np_int(ctx, indices)))]),
            ctx.op("Add", [indices, _cast_like(ctx, dim, indices)]),
            indices,
        ],
    )
    if _np_int(ctx, indices) != np.int64:
        fixed = ctx.op("Cast", [fixed], to=onnx.TensorProto.INT64)
    return fixed


def _gather_elements(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """GatherElements: dX = ScatterElements(zeros, indices, dY, axis, reduction='add')."""
    dy = dys[0]
    assert dy is not None
    if ctx.b.opset < 16:
        raise GradientError("its gradient (a scatter-add) needs opset 16")
    data, indices = node.input[0], node.input[1]
    axis = _axis(int(_attr(node, "axis", 0)), ctx.rank(data))
    fixed = _positive_indices(ctx, indices, data, axis)
    return [ctx.op("ScatterElements", [ctx.zeros_like(data), fixed, dy], axis=axis, reduction="add"), None]


def _scatter(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """ScatterND and ScatterElements (indices constant or computed, never differentiated):
    reduction 'none': dData = the same scatter of zeros into dY (overwritten elements get
    nothing), dUpdates = GatherND/GatherElements(dY, indices); reduction 'add': dData = dY and
    the same dUpdates. Refused: 'mul', 'max', 'min'."""
    dy = dys[0]
    assert dy is not None
    data, indices, updates = node.input[:3]
    reduction = _str_attr(node, "reduction", "none")
    if reduction not in ("none", "add"):
        raise GradientError(f"reduction '{reduction}' has no gradient rule (only 'none' and 'add')")
    attrs: dict[str, Any] = {}
    gather = "GatherND"
    if node.op_type == "ScatterElements":
        attrs["axis"] = _axis(int(_attr(node, "axis", 0)), ctx.rank(data))
        gather = "GatherElements"
    ddata = dupdates = None
    if ctx.needs(node, 0):
        ddata = (
            dy
            if reduction == "add"
            else ctx.op(node.op_type, [dy, indices, ctx.zeros_like(updates)], **attrs)
        )
    if ctx.needs(node, 2):
        dupdates = ctx.op(gather, [dy, indices], **attrs)
    return [ddata, None, dupdates]


# --- resampling, padding, tiling ------------------------------------------------------------


def _contract_axis(ctx: RuleContext, g: str, matrix: str, axis: int, rank: int) -> str:
    """``g`` with axis ``axis`` (size m) contracted with ``matrix`` [n, m]: that axis becomes n."""
    if axis == rank - 2:
        return ctx.op("MatMul", [matrix, g])
    matrix_t = ctx.op("Transpose", [matrix], perm=[1, 0])
    if axis == rank - 1:
        return ctx.op("MatMul", [g, matrix_t])
    perm = list(range(rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    moved = ctx.op("MatMul", [ctx.op("Transpose", [g], perm=perm), matrix_t])
    return ctx.op("Transpose", [moved], perm=perm)


# (coordinate_transformation_mode, nearest_mode) pairs under which nearest upsampling by an
# integer factor k reads input i for outputs k*i .. k*i + k - 1 (each input copied k times):
# asymmetric: x = o/k; half_pixel: x = (o + 1/2)/k - 1/2, within 1/2 - 1/(2k) of i, so every
# rounding gives i; tf_half_pixel_for_nn: x = (o + 1/2)/k, in [i, i + 1). "simple" is Resize-10
# and Upsample: truncation when upsampling.
_NEAREST_COPIES = frozenset(
    {("asymmetric", "floor"), ("asymmetric", "simple"), ("tf_half_pixel_for_nn", "floor")}
    | set(
        itertools.product(
            ("half_pixel", "pytorch_half_pixel", "half_pixel_symmetric"),
            ("round_prefer_floor", "round_prefer_ceil"),
        )
    )
)


class _ResizeForm:
    """What a Resize/Upsample node says about each axis (inputs and attributes of every opset)."""

    def __init__(self, ctx: RuleContext, node: onnx.NodeProto) -> None:
        self.node = node
        self.x, self.y = node.input[0], node.output[0]
        self.rank = ctx.rank(self.x)
        opset = ctx.b.opset
        self.upsample = node.op_type == "Upsample"
        self.legacy = self.upsample or opset < 11  # asymmetric, Resize-10/Upsample nearest rounding
        self.mode = _str_attr(node, "mode", "nearest")
        if self.legacy:
            self.ctm, self.nearest = "asymmetric", "simple"
        else:
            self.ctm = _str_attr(node, "coordinate_transformation_mode", "half_pixel")
            self.nearest = _str_attr(node, "nearest_mode", "round_prefer_floor")
        axes = _attr(node, "axes") if opset >= 18 and not self.upsample else None
        self.axes = [_axis(int(a), self.rank) for a in axes] if axes else list(range(self.rank))
        self.scales_name = self.sizes_name = roi_name = ""
        self.scales: np.ndarray | None = None
        if self.upsample and opset < 9:
            self.scales = np.asarray(_attr(node, "scales"), dtype=np.float32)
        elif self.legacy:
            self.scales_name = _input(node, 1)
        else:
            roi_name, self.scales_name, self.sizes_name = _input(node, 1), _input(node, 2), _input(node, 3)
        if self.sizes_name:
            self.scales_name = ""
            if _str_attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
                raise GradientError(
                    "keep_aspect_ratio_policy other than 'stretch' with 'sizes' is not supported; "
                    "export the resize with scales"
                )
        elif self.scales_name:
            self.scales = ctx.const_value(self.scales_name)
        self.sizes = ctx.const_value(self.sizes_name) if self.sizes_name else None
        self.roi: np.ndarray | None = None
        if self.ctm == "tf_crop_and_resize":
            self.roi = ctx.const_value(roi_name)
            if self.roi is None:
                raise GradientError("tf_crop_and_resize with a computed roi is not supported")
            self.roi = self.roi.reshape(-1)

    def scale(self, j: int) -> float | None:
        """The constant scale of the j-th resized axis, if the node has one."""
        return None if self.scales is None else float(self.scales.reshape(-1)[j])

    def out_size(self, ctx: RuleContext, j: int) -> Dim:
        a = self.axes[j]
        if self.sizes is not None:
            return int(self.sizes.reshape(-1)[j])
        return ctx.dims(self.y)[a]

    def box(self, j: int) -> tuple[float, float]:
        if self.roi is None:
            return (0.0, 1.0)
        return float(self.roi[j]), float(self.roi[len(self.axes) + j])

    def unscaled(self, ctx: RuleContext, j: int) -> bool:
        """Whether the resize leaves axis j as it is (scale 1, full roi)."""
        if self.box(j) != (0.0, 1.0):
            return False
        s = self.scale(j)
        if s is not None:
            return s == 1.0
        n = ctx.dims(self.x)[self.axes[j]]
        # sizes: same size means scale 1; a computed scale that keeps the size is in
        # [1, 1 + 1/n), and exporters compute exactly 1 there
        return n is not None and n == self.out_size(ctx, j)

    def copy_factor(self, ctx: RuleContext, j: int) -> int:
        """k when axis j is nearest upsampling that copies each input k >= 2 times, else 0."""
        if self.mode != "nearest" or (self.ctm, self.nearest) not in _NEAREST_COPIES:
            return 0
        s = self.scale(j)
        if s is not None:
            return int(s) if s.is_integer() and s >= 2 else 0
        n, m = ctx.dims(self.x)[self.axes[j]], self.out_size(ctx, j)
        if self.sizes_name and isinstance(n, int) and isinstance(m, int) and n and m % n == 0 and m >= 2 * n:
            return m // n
        return 0

    def matrix(self, ctx: RuleContext, j: int) -> str:
        """A^T [n, m] of axis j (A[o, i]: weight of input i in output o): the same op applied to
        an identity matrix along its last axis."""
        a, node, x = self.axes[j], self.node, self.x
        opset = ctx.b.opset
        dtype = helper.tensor_dtype_to_np_dtype(ctx.elem(x))
        n = ctx.dims(x)[a]
        if isinstance(n, int):
            eye = ctx.b.const(np.eye(n, dtype=dtype), "resize_eye")
        elif opset >= 9:
            n1 = _dim1(ctx, x, a)
            zero = onnx.numpy_helper.from_array(np.zeros(1, dtype=dtype))
            eye = ctx.op(
                "EyeLike", [ctx.op("ConstantOfShape", [ctx.op("Concat", [n1, n1], axis=0)], value=zero)]
            )
        else:
            raise GradientError(f"needs a static size of axis {a} of '{x}' at opset {opset}")
        skip = {"axes", "keep_aspect_ratio_policy", "extrapolation_value", "scales"}
        attrs = {at.name: helper.get_attribute_value(at) for at in node.attribute if at.name not in skip}
        s = self.scale(j)
        if s is not None:
            scales = ctx.b.const(np.asarray([1.0, s], dtype=np.float32), "resize_scales")
        elif self.scales_name:
            one = ctx.b.const(np.asarray([1.0], dtype=np.float32), "resize_scales")
            scales = ctx.op("Concat", [one, ctx.op("Gather", [self.scales_name, ctx.b.ints([j])])], axis=0)
        else:
            scales = ""
        if self.upsample and opset < 9:
            return ctx.op("Upsample", [eye], scales=[1.0, float(s)], **attrs)  # type: ignore[arg-type]
        if self.legacy:
            return ctx.op(node.op_type, [eye, scales], **attrs)
        empty = ctx.b.const(np.zeros(0, dtype=np.float32), "empty") if opset < 13 else ""
        roi = empty
        if self.roi is not None:
            start, end = self.box(j)
            roi = ctx.b.const(np.asarray([0.0, start, 1.0, end], dtype=self.roi.dtype), "resize_roi")
        if not self.sizes_name:
            return ctx.op("Resize", [eye, roi, scales], **attrs)
        m = self.out_size(ctx, j)
        sizes = _shape_vector(
            ctx,
            [
                n if isinstance(n, int) else _dim1(ctx, x, a),
                m if isinstance(m, int) else _dim1(ctx, self.y, a),
            ],
        )
        return ctx.op("Resize", [eye, roi, scales or empty, sizes], **attrs)


def _resize(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Resize (opsets 10-19) and Upsample (7, 9). Nearest, linear and cubic resizes are separable:
    along each resized axis Y = A X for a matrix A[o, i] (weight of input i in output o), so
    dX = dY multiplied along each resized axis by A^T.

    - Nearest upsampling by an integer factor k that copies each input k times (asymmetric with
      floor or Resize-10/Upsample rounding, half_pixel and pytorch_half_pixel with round_prefer_*,
      ...; scales, or static sizes): dX is a sum-pool of dY, k^2 * AveragePool(dY, kernel k,
      stride k) on spatial axes (onnxruntime's pooling kernel is twice as fast as the
      equivalent ReduceSum(Reshape(dY, [..., n, k, ...])), used for batch or channel axes); no
      matrix and no scatter, also with sizes known only at run time.
    - Any other axis (linear, cubic, every coordinate_transformation_mode and nearest_mode,
      cubic_coeff_a, exclude_outside, antialias, a tf_crop_and_resize roi, non-integer scales):
      A^T [n, m] is the same op applied to an n x n identity along its last axis, so it follows
      the runtime's own coordinate arithmetic, and dY is contracted with it by one MatMul (a
      constant the runtime folds when n and the scale are static).
    Axes the resize leaves alone cost nothing. Refused: keep_aspect_ratio_policy other than
    stretch with `sizes`; tf_crop_and_resize with a computed roi.
    """
    dy = dys[0]
    assert dy is not None
    form = _ResizeForm(ctx, node)
    x, rank = form.x, form.rank
    copies: dict[int, int] = {}
    g = dy
    for j, a in enumerate(form.axes):
        if form.unscaled(ctx, j):
            continue
        k = form.copy_factor(ctx, j)
        if k:
            copies[a] = k
        else:
            g = _contract_axis(ctx, g, form.matrix(ctx, j), a, rank)
    if copies and min(copies) >= 2 and 3 <= rank <= 5:  # spatial axes: a pooling kernel does it
        kernel = [copies.get(i, 1) for i in range(2, rank)]
        pooled = ctx.op("AveragePool", [g], kernel_shape=kernel, strides=kernel)
        g = ctx.op("Mul", [pooled, ctx.scalar(float(math.prod(kernel)), x)])
    elif copies:
        parts: list[int | str] = []
        summed = []
        for i in range(rank):
            parts.append(_dim_part(ctx, x, i))
            if i in copies:
                summed.append(len(parts))
                parts.append(copies[i])
        g = ctx.b.reduce(
            "ReduceSum", ctx.op("Reshape", [g, _shape_vector(ctx, parts)]), summed, keepdims=False
        )
    return [g]


def _add_at(ctx: RuleContext, x: str, axis: int, start: int, end: int, value: str) -> str:
    """``x`` with ``value`` added to its slice [start, end) along ``axis``."""
    head = _slice_axis(ctx, x, 0, start, axis)
    body = ctx.op("Add", [_slice_axis(ctx, x, start, end, axis), value])
    tail = _slice_axis(ctx, x, end, _INT_MAX, axis)
    return ctx.op("Concat", [head, body, tail], axis=axis)


def _unpad_axis(ctx: RuleContext, g: str, axis: int, before: int, after: int, mode: str, n: Dim) -> str:
    """The adjoint of edge or reflect padding of one axis (size ``n``) by ``before``/``after`` >= 0.

    Reflect: Y[before - t] = X[t] and Y[before + n - 1 + t] = X[n - 1 - t] for t = 1..pad, so
    each strip, reversed, adds onto the elements next to the edge; edge: each strip's sum adds
    onto the edge element. With a static n, one Split of dY into the strips and the parts of X
    they add to and one Concat (two passes over dY); otherwise slices and a Concat per strip.
    """
    reflect = mode == "reflect"
    if isinstance(n, int) and n - 2 - (before + after if reflect else 0) >= 0:
        return _unpad_axis_split(ctx, g, axis, before, after, reflect, n)
    inner = _slice_axis(ctx, g, before, -after if after else _INT_MAX, axis)
    if not reflect:
        if before:
            strip = ctx.b.reduce("ReduceSum", _slice_axis(ctx, g, 0, before, axis), [axis], keepdims=True)
            inner = _add_at(ctx, inner, axis, 0, 1, strip)
        if after:
            strip = ctx.b.reduce(
                "ReduceSum", _slice_axis(ctx, g, -after, _INT_MAX, axis), [axis], keepdims=True
            )
            inner = _add_at(ctx, inner, axis, -1, _INT_MAX, strip)
        return inner
    if before:
        strip = _slice_axis(ctx, g, before - 1, -_INT_MAX, axis, -1)  # mirrors X[1 .. before]
        inner = _add_at(ctx, inner, axis, 1, 1 + before, strip)
    if after:
        strip = _slice_axis(ctx, g, -1, -after - 1, axis, -1)  # mirrors X[n - 1 - after .. n - 2]
        inner = _add_at(ctx, inner, axis, -1 - after, -1, strip)
    return inner


def _unpad_axis_split(
    ctx: RuleContext, g: str, axis: int, before: int, after: int, reflect: bool, n: int
) -> str:
    """:func:`_unpad_axis` by one Split and one Concat: dY along ``axis`` is [strip before, X[0],
    the part the strip mirrors (reflect), the middle, the part the other strip mirrors, X[n-1],
    strip after]."""
    mirrored = (before, after) if reflect else (0, 0)
    sizes = [before, 1, mirrored[0], n - 2 - sum(mirrored), mirrored[1], 1, after]
    kept = [i for i, size in enumerate(sizes) if size]
    lengths = [sizes[i] for i in kept]
    if ctx.b.opset < 13:
        split = ctx.op("Split", [g], axis=axis, split=lengths, outputs=len(kept))
    else:
        split = ctx.op("Split", [g, ctx.b.ints(lengths)], axis=axis, outputs=len(kept))
    parts = dict(zip(kept, split if len(kept) > 1 else [split], strict=True))
    # (strip, the part it adds onto): reflect strips reversed onto the mirrored parts, edge
    # strips summed onto the edge elements
    for src, dst in ((0, 2), (6, 4)) if reflect else ((0, 1), (6, 5)):
        if sizes[src]:
            if reflect:
                add = _slice_axis(ctx, parts[src], -1, -_INT_MAX, axis, -1)
            else:
                add = ctx.b.reduce("ReduceSum", parts[src], [axis], keepdims=True)
            parts[dst] = ctx.op("Add", [parts[dst], add])
    pieces = [parts[i] for i in range(1, 6) if sizes[i]]
    return pieces[0] if len(pieces) == 1 else ctx.op("Concat", pieces, axis=axis)


def _unpad_constant(ctx: RuleContext, dy: str, rank: int, axes: Sequence[int], pads: np.ndarray) -> str:
    """The adjoint of constant padding by constant pads: slice off what was added, zero-fill
    what was cropped (negative pads)."""
    flat = [int(p) for p in pads.reshape(-1)]
    begins, ends = flat[: len(axes)], flat[len(axes) :]
    cropped = [(a, b, e) for a, b, e in zip(axes, begins, ends, strict=True) if b > 0 or e > 0]
    if cropped:
        dy = ctx.op(
            "Slice",
            [
                dy,
                ctx.b.ints([max(b, 0) for _, b, _ in cropped]),
                ctx.b.ints([-e if e > 0 else _INT_MAX for _, _, e in cropped]),
                ctx.b.ints([a for a, _, _ in cropped]),
            ],
        )
    fill = [0] * (2 * rank)
    for a, b, e in zip(axes, begins, ends, strict=True):
        fill[a], fill[rank + a] = max(-b, 0), max(-e, 0)
    if not any(fill):
        return dy
    if ctx.b.opset < 11:
        return ctx.op("Pad", [dy], pads=fill, mode="constant")
    return ctx.op("Pad", [dy, ctx.b.ints(fill)])


def _pad(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Pad (opset 2 attribute form, 11+ input form, 18 ``axes``):

    - constant: dX = dY with what was added sliced off and what was cropped (negative pads)
      zero-filled again; with computed pads, Pad(dY, -pads), which does both;
    - edge and reflect with constant pads >= 0, axis by axis: the inner part of dY, plus the sum
      of each edge strip added to the edge element it copies (edge), or each strip mirrored onto
      the elements it copies (reflect): slices and adds, no scatter;
    - anything else (computed or negative pads, wrap): the same Pad applied to the index map
      of X gives the source of every output element, and
      dX = ScatterElements(zeros, that map, dY, reduction='add') (opset 16).
    """
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    rank = ctx.rank(x)
    opset = ctx.b.opset
    mode = _str_attr(node, "mode", "constant")
    pads_name = axes_name = ""
    if opset < 11:
        pads: np.ndarray | None = np.asarray(_attr(node, "pads"), dtype=np.int64)
    else:
        pads_name, axes_name = _input(node, 1), _input(node, 3)
        pads = ctx.const_value(pads_name)
    axes_value = ctx.const_value(axes_name) if axes_name else np.arange(rank)
    if mode == "constant":
        if pads is None or axes_value is None:  # computed: crop with the negated pads
            negated = ctx.op("Neg", [pads_name])
            return [ctx.op("Pad", [dy, negated, "", axes_name] if axes_name else [dy, negated])]
        return [_unpad_constant(ctx, dy, rank, [_axis(int(a), rank) for a in axes_value.reshape(-1)], pads)]
    if mode in ("edge", "reflect") and pads is not None and axes_value is not None and (pads >= 0).all():
        axes = [_axis(int(a), rank) for a in axes_value.reshape(-1)]
        flat = [int(p) for p in pads.reshape(-1)]
        g = dy
        for i, a in enumerate(axes):
            before, after = flat[i], flat[len(axes) + i]
            size = ctx.dims(x)[a]
            if mode == "reflect" and isinstance(size, int) and max(before, after) >= size:
                break  # reflecting more than the axis holds: the runtime decides; follow it below
            if before or after:
                g = _unpad_axis(ctx, g, a, before, after, mode, size)
        else:
            return [g]
    if opset < 16:
        raise GradientError(f"mode '{mode}' with these pads needs opset 16 for its gradient (a scatter-add)")
    index = ctx.op(
        "Reshape",
        [
            ctx.op(
                "Range",
                [
                    ctx.b.const(np.asarray(0, np.int64)),
                    ctx.op("Size", [x]),
                    ctx.b.const(np.asarray(1, np.int64)),
                ],
            ),
            ctx.shape_of(x),
        ],
    )
    source = ctx.op("Pad", [index, pads_name, "", axes_name] if axes_name else [index, pads_name], mode=mode)
    return [_flat_scatter_add(ctx, x, source, dy)]


def _tile(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Tile: along axis i, Y holds r_i copies of X one after the other, so
    dX = ReduceSum(Reshape(dY, [r_0, d_0, r_1, d_1, ...]), the r axes) (axes with r_i = 1 are not
    split; computed repeats: r = Shape(Y) / Shape(X) at run time)."""
    dy = dys[0]
    assert dy is not None
    x, y = node.input[0], node.output[0]
    rank = ctx.rank(x)
    repeats = ctx.const_value(node.input[1])
    if repeats is not None:
        parts: list[int | str] = []
        summed = []
        for i, r in enumerate(int(r) for r in repeats.reshape(-1)):
            if r != 1:
                summed.append(len(parts))
                parts.append(r)
            parts.append(_dim_part(ctx, x, i))
        if not summed:
            return [dy]
        shape = _shape_vector(ctx, parts)
    else:
        xs = ctx.op("Shape", [x])
        reps = ctx.op("Div", [ctx.op("Shape", [y]), xs])
        pairs = [ctx.op("Unsqueeze", [v, ctx.b.ints([1])]) for v in (reps, xs)]
        shape = ctx.op("Reshape", [ctx.op("Concat", pairs, axis=1), ctx.b.ints([-1])])
        summed = list(range(0, 2 * rank, 2))
    return [ctx.b.reduce("ReduceSum", ctx.op("Reshape", [dy, shape]), summed, keepdims=False)]


def _depth_to_space(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """DepthToSpace is a permutation of elements, so dX is the inverse permutation of dY:
    SpaceToDepth(dY) for mode DCR (its exact inverse); for CRD, Reshape(dY, [N, C/b², H, b, W, b])
    -> Transpose(0, 1, 3, 5, 2, 4) -> Reshape(X's shape)."""
    dy = dys[0]
    assert dy is not None
    x = node.input[0]
    b = int(_attr(node, "blocksize"))
    if _str_attr(node, "mode", "DCR") == "DCR":
        return [ctx.op("SpaceToDepth", [dy], blocksize=b)]
    channels = ctx.dims(x)[1]
    depth: int | str = (
        channels // (b * b)
        if isinstance(channels, int)
        else ctx.op("Div", [_dim1(ctx, x, 1), ctx.b.ints([b * b])])
    )
    shape = _shape_vector(
        ctx, [_dim_part(ctx, x, 0), depth, _dim_part(ctx, x, 2), b, _dim_part(ctx, x, 3), b]
    )
    moved = ctx.op("Transpose", [ctx.op("Reshape", [dy, shape])], perm=[0, 1, 3, 5, 2, 4])
    return [ctx.reshape_like(moved, x)]


def _space_to_depth(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """SpaceToDepth: dX = DepthToSpace(dY, mode DCR), its exact inverse permutation."""
    dy = dys[0]
    assert dy is not None
    return [ctx.op("DepthToSpace", [dy], blocksize=int(_attr(node, "blocksize")), mode="DCR")]


# --- the table ------------------------------------------------------------------------------


def _unary(fn: Any, **kw: Any) -> Rule:
    return Rule(fn, inputs=(0,), outputs=(0,), **kw)


RULES: dict[str, Rule] = {
    # pass-through and shape
    "Identity": _unary(_identity),
    "Dropout": _unary(_identity),
    "Cast": _unary(_cast),
    "Reshape": _unary(_reshape_like_input),
    "Flatten": _unary(_reshape_like_input),
    "Squeeze": _unary(_reshape_like_input),
    "Unsqueeze": _unary(_reshape_like_input),
    "Transpose": _unary(_transpose),
    "Expand": _unary(_expand),
    # arithmetic
    "Add": Rule(_add),
    "Sub": Rule(_sub),
    "Mul": Rule(_mul),
    "Div": Rule(_div),
    "Pow": Rule(_pow),
    "Sum": Rule(_sum),
    "Where": Rule(_where, inputs=(1, 2)),
    "Max": Rule(_max_min),
    "Min": Rule(_max_min),
    "Neg": _unary(_neg),
    "Abs": _unary(_abs),
    "Reciprocal": _unary(_reciprocal),
    "Round": _unary(_straight_through),
    # activations
    "Relu": _unary(_relu),
    "LeakyRelu": _unary(_leaky_relu),
    "Sigmoid": _unary(_sigmoid),
    "Tanh": _unary(_tanh),
    "Clip": _unary(_clip),
    "HardSigmoid": _unary(_hard_sigmoid),
    "HardSwish": _unary(_hard_swish),
    "Erf": _unary(_erf),
    "Gelu": _unary(_gelu),
    "Sqrt": _unary(_sqrt),
    "Exp": _unary(_exp),
    "Log": _unary(_log),
    "PRelu": Rule(_prelu, inputs=(0, 1)),
    "Softplus": _unary(_softplus),
    "Mish": _unary(_mish),
    "Elu": _unary(_elu),
    "Selu": _unary(_selu),
    "Celu": _unary(_celu),
    "Softmax": _unary(_softmax),
    "LogSoftmax": _unary(_log_softmax),
    # reductions
    "ReduceSum": _unary(_reduce_sum_mean),
    "ReduceMean": _unary(_reduce_sum_mean),
    "ReduceMax": _unary(_reduce_max_min),
    "ReduceMin": _unary(_reduce_max_min),
    # linear algebra
    "MatMul": Rule(_matmul),
    "Gemm": Rule(_gemm),
    "Conv": Rule(_conv),
    "ConvTranspose": Rule(_conv_transpose),
    "Einsum": Rule(_einsum),
    # pooling
    "MaxPool": Rule(_maxpool, inputs=(0,), outputs=(0,), prepare=_prepare_maxpool, min_opset=16),
    "AveragePool": _unary(_average_pool),
    "GlobalAveragePool": _unary(_global_average_pool),
    "GlobalMaxPool": _unary(_global_max_pool),
    # normalization
    "BatchNormalization": Rule(_batch_norm, inputs=(0, 1, 2), outputs=(0,)),
    "LayerNormalization": Rule(_layer_norm, inputs=(0, 1, 2), outputs=(0,), prepare=_prepare_layer_norm),
    "InstanceNormalization": Rule(_instance_norm),
    "GroupNormalization": Rule(_group_norm),
    # indexing, joining, slicing
    "Gather": Rule(_gather, inputs=(0,), min_opset=16),
    "Concat": Rule(_concat),
    "Split": Rule(_split, inputs=(0,)),
    "Slice": Rule(_slice, inputs=(0,)),
    "GatherElements": Rule(_gather_elements, inputs=(0,), min_opset=16),
    "ScatterND": Rule(_scatter, inputs=(0, 2)),
    "ScatterElements": Rule(_scatter, inputs=(0, 2)),
    # resampling, padding, tiling, rearranging
    "Resize": Rule(_resize, inputs=(0,)),
    "Upsample": Rule(_resize, inputs=(0,)),
    "Pad": Rule(_pad, inputs=(0,)),
    "Tile": Rule(_tile, inputs=(0,)),
    "DepthToSpace": _unary(_depth_to_space),
    "SpaceToDepth": _unary(_space_to_depth),
    # recurrent layers (backpropagation through time: recurrent.py)
    **RECURRENT_RULES,
    # control flow: If, Scan, Loop (their bodies differentiated with this table: control.py)
    **CONTROL_RULES,
}
