"""Every gradient rule against float64 central finite differences (onnx.reference).

Each case is a one-node float64 model whose float inputs are all differentiated; the loss is
``sum(output * R)`` for a fixed random ``R`` (the seed). The gradient graph emitted by the
engine runs in ``onnx.reference.ReferenceEvaluator`` (onnxruntime lacks float64 for some ops,
e.g. Conv), and must match ``(L(w + h) - L(w - h)) / 2h`` element by element.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from reference_ops import STAND_IN_OPS

from modelshrink.techniques.distill.autodiff import append_gradients
from modelshrink.techniques.distill.grad import GradientError
from modelshrink.techniques.distill.rules import RULES

# Central differences in float64 with this step are accurate to ~1e-8 relative for smooth
# functions; the gradient graph itself is exact up to float64 rounding.
FD_STEP = 1e-6
FD_RTOL = 1e-5
FD_ATOL = 1e-7
# Elements perturbed per tensor (chosen at random), to keep the suite fast.
FD_MAX_ELEMENTS = 10


# --- float64-exact stand-ins for onnx.reference ops that are not (checked with onnxruntime) ---


class Erf(OpRun):
    """onnx.reference computes Erf in float32 (``otypes=["f"]``); this one keeps float64."""

    def _run(self, x):  # type: ignore[no-untyped-def]
        return (np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype),)


class Gelu(OpRun):
    """onnx.reference expands Gelu through a function with float32 constants; float64 here."""

    def _run(self, x, approximate="none"):  # type: ignore[no-untyped-def]
        if approximate == "tanh":
            inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
            return (0.5 * x * (1.0 + np.tanh(inner)),)
        erf = np.vectorize(math.erf, otypes=[np.float64])(x / math.sqrt(2.0))
        return ((0.5 * x * (1.0 + erf)).astype(x.dtype),)


def _pool_geometry(x_shape, kernel, strides, pads, dilations, ceil_mode):  # type: ignore[no-untyped-def]
    nd = len(kernel)
    out = []
    for i in range(nd):
        eff = (kernel[i] - 1) * dilations[i] + 1
        span = x_shape[2 + i] + pads[i] + pads[nd + i] - eff
        o = (-(-span // strides[i]) if ceil_mode else span // strides[i]) + 1
        if ceil_mode and (o - 1) * strides[i] >= x_shape[2 + i] + pads[i]:
            o -= 1
        out.append(o)
    return out


class MaxPool(OpRun):
    """onnx.reference returns Indices in padded coordinates when pads are set; onnxruntime
    (and the ONNX spec) index the unpadded input. This one follows onnxruntime."""

    def _run(
        self,
        x,
        auto_pad=None,
        ceil_mode=0,
        dilations=None,
        kernel_shape=None,
        pads=None,
        storage_order=0,
        strides=None,
    ):  # type: ignore[no-untyped-def]
        nd = len(kernel_shape)
        strides = strides or [1] * nd
        dilations = dilations or [1] * nd
        pads = pads or [0] * (2 * nd)
        out = _pool_geometry(x.shape, kernel_shape, strides, pads, dilations, ceil_mode)
        n, c = x.shape[:2]
        y = np.full((n, c, *out), -np.inf, dtype=x.dtype)
        idx = np.zeros((n, c, *out), dtype=np.int64)
        flat = np.arange(x.size).reshape(x.shape)
        for o in np.ndindex(*out):
            for k in np.ndindex(*kernel_shape):
                p = [o[i] * strides[i] - pads[i] + k[i] * dilations[i] for i in range(nd)]
                if all(0 <= p[i] < x.shape[2 + i] for i in range(nd)):
                    v = x[(slice(None), slice(None), *p)]
                    better = v > y[(slice(None), slice(None), *o)]
                    y[(slice(None), slice(None), *o)] = np.where(better, v, y[(slice(None), slice(None), *o)])
                    idx[(slice(None), slice(None), *o)] = np.where(
                        better, flat[(slice(None), slice(None), *p)], idx[(slice(None), slice(None), *o)]
                    )
        return (y, idx)


class ConvTranspose(OpRun):
    """onnx.reference's ConvTranspose mishandles ``group`` > 1; a direct numpy version."""

    def _run(
        self,
        x,
        w,
        b=None,
        auto_pad=None,
        dilations=None,
        group=1,
        kernel_shape=None,
        output_padding=None,
        output_shape=None,
        pads=None,
        strides=None,
    ):  # type: ignore[no-untyped-def]
        nd = x.ndim - 2
        kernel = list(w.shape[2:])
        strides = strides or [1] * nd
        dilations = dilations or [1] * nd
        pads = pads or [0] * (2 * nd)
        output_padding = output_padding or [0] * nd
        n, cin = x.shape[:2]
        cout_g = w.shape[1]
        cin_g = cin // group
        full = [
            strides[i] * (x.shape[2 + i] - 1) + (kernel[i] - 1) * dilations[i] + 1 + output_padding[i]
            for i in range(nd)
        ]
        y = np.zeros((n, cout_g * group, *full), dtype=x.dtype)
        for g in range(group):
            xg = x[:, g * cin_g : (g + 1) * cin_g]
            wg = w[g * cin_g : (g + 1) * cin_g]
            for k in np.ndindex(*kernel):
                contrib = np.einsum("nc...,co->no...", xg, wg[(slice(None), slice(None), *k)])
                sl = tuple(
                    slice(
                        k[i] * dilations[i],
                        k[i] * dilations[i] + strides[i] * (x.shape[2 + i] - 1) + 1,
                        strides[i],
                    )
                    for i in range(nd)
                )
                y[(slice(None), slice(g * cout_g, (g + 1) * cout_g), *sl)] += contrib
        crop = tuple(slice(pads[i], full[i] - pads[nd + i]) for i in range(nd))
        y = y[(slice(None), slice(None), *crop)]
        if b is not None:
            y = y + b.reshape(1, -1, *[1] * nd)
        return (y,)


REFERENCE_OPS = [Erf, Gelu, MaxPool, ConvTranspose, *STAND_IN_OPS]


def evaluator(model: onnx.ModelProto) -> ReferenceEvaluator:
    """``onnx.reference`` with the float64-exact stand-ins above."""
    return ReferenceEvaluator(model, new_ops=REFERENCE_OPS)


def float64_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    *,
    opset: int = 18,
    initializers: Mapping[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A model whose graph inputs are ``inputs`` (typed from the arrays)."""
    graph_inputs = [
        helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(arr.dtype), [f"{name}_{i}" for i in range(arr.ndim)]
        )
        for name, arr in inputs.items()
    ]
    graph_outputs = [helper.make_tensor_value_info(name, TensorProto.DOUBLE, None) for name in outputs]
    inits = [numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(list(nodes), "case", graph_inputs, graph_outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _static_inputs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """Give the graph inputs their concrete shapes, like a model with declared shapes."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for vi in copy.graph.input:
        if vi.name in feeds:
            shape = vi.type.tensor_type.shape
            for d, size in zip(shape.dim, feeds[vi.name].shape, strict=True):
                d.ClearField("dim_param")
                d.dim_value = size
    return copy


def _loss(
    session: ReferenceEvaluator,
    feeds: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    seeds: Mapping[str, np.ndarray],
) -> float:
    results = session.run(list(outputs), dict(feeds))
    return float(sum(np.sum(r.astype(np.float64) * seeds[o]) for o, r in zip(outputs, results, strict=True)))


def gradient_check(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    wrt: Sequence[str],
    *,
    seed: int = 0,
    static: bool = True,
    outputs: Sequence[str] | None = None,
    rtol: float = FD_RTOL,
    atol: float = FD_ATOL,
) -> dict[str, np.ndarray]:
    """Assert the engine's gradients match finite differences; returns the analytic gradients."""
    rng = np.random.default_rng(seed)
    if static:
        model = _static_inputs(model, feeds)
    outputs = list(outputs or [o.name for o in model.graph.output])
    forward = evaluator(model)
    values = forward.run(outputs, dict(feeds))
    seeds = {o: rng.standard_normal(v.shape) for o, v in zip(outputs, values, strict=True)}
    seeded = onnx.ModelProto()
    seeded.CopyFrom(model)
    del seeded.graph.output[:]
    seeded.graph.output.extend(
        helper.make_tensor_value_info(o, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
        for o, v in zip(outputs, values, strict=True)
    )
    for o, s in seeds.items():
        seeded.graph.input.append(
            helper.make_tensor_value_info(f"seed__{o}", TensorProto.DOUBLE, list(s.shape))
        )
    grad_model, grads, _ = append_gradients(
        seeded, wrt=wrt, seeds={o: f"seed__{o}" for o in outputs}, rules=RULES
    )
    names = [g for g in grads.values() if g is not None]
    for w, g in grads.items():
        if g is not None:
            grad_model.graph.output.append(
                helper.make_tensor_value_info(g, TensorProto.DOUBLE, list(np.shape(feeds[w])))
            )
    onnx.checker.check_model(grad_model)
    run = evaluator(grad_model)
    got = dict(
        zip(names, run.run(names, {**feeds, **{f"seed__{o}": s for o, s in seeds.items()}}), strict=True)
    )
    result = {}
    for w in wrt:
        base = np.asarray(feeds[w], dtype=np.float64)
        analytic = np.zeros_like(base) if grads[w] is None else np.asarray(got[grads[w]])
        assert analytic.shape == base.shape, f"gradient of {w}: shape {analytic.shape} != {base.shape}"
        flat = rng.permutation(base.size)[:FD_MAX_ELEMENTS]
        for idx in flat:
            pos = np.unravel_index(idx, base.shape)
            plus, minus = base.copy(), base.copy()
            plus[pos] += FD_STEP
            minus[pos] -= FD_STEP
            lp = _loss(forward, {**feeds, w: plus}, outputs, seeds)
            lm = _loss(forward, {**feeds, w: minus}, outputs, seeds)
            numeric = (lp - lm) / (2 * FD_STEP)
            assert analytic[pos] == pytest.approx(numeric, rel=rtol, abs=atol), (
                f"d/d{w}{list(pos)}: engine {analytic[pos]!r}, finite differences {numeric!r}"
            )
        result[w] = analytic
    return result


@dataclass
class Case:
    """One rule test: a single node, its inputs, which inputs are differentiated."""

    id: str
    op: str
    inputs: dict[str, Any]
    attrs: dict[str, Any] = field(default_factory=dict)
    wrt: tuple[str, ...] | None = None
    outputs: int = 1
    opset: int = 18
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    input_order: tuple[str, ...] | None = None
    static: bool = True


def _r(*shape: int, seed: int = 0, low: float | None = None) -> np.ndarray:
    rng = np.random.default_rng(abs(hash(shape)) % 1000 + seed)
    x = rng.standard_normal(shape)
    if low is not None:
        x = np.abs(x) + low
    return x


def _away_from(x: np.ndarray, points: Sequence[float], gap: float = 0.05) -> np.ndarray:
    """Move values off the kinks of piecewise functions so finite differences are valid."""
    x = x.copy()
    for p in points:
        close = np.abs(x - p) < gap
        x[close] = p + np.sign(x[close] - p + 1e-12) * gap * 2
    return x


I64 = np.int64

CASES = [
    # arithmetic, with broadcasting both ways and fan-out via identical inputs
    Case("add_bcast", "Add", {"a": _r(2, 3, 4), "b": _r(4)}),
    Case("add_bcast_mid", "Add", {"a": _r(2, 1, 4), "b": _r(3, 1)}),
    Case("sub", "Sub", {"a": _r(3, 4), "b": _r(1, 4)}),
    Case("mul_bcast", "Mul", {"a": _r(2, 3), "b": _r(2, 1)}),
    Case("div", "Div", {"a": _r(3, 4), "b": _r(3, 4, low=0.5)}),
    Case("neg", "Neg", {"x": _r(3, 4)}),
    Case("pow_square", "Pow", {"a": _r(3, 4)}, consts={"b": np.asarray(2.0)}, input_order=("a", "b")),
    Case("pow", "Pow", {"a": _r(3, 4, low=0.5), "b": _r(3, 4)}),
    Case("sum3", "Sum", {"a": _r(2, 3), "b": _r(3), "c": _r(2, 1)}),
    Case(
        "where",
        "Where",
        {"x": _r(3, 4), "y": _r(4)},
        consts={"c": np.random.default_rng(1).random((3, 4)) > 0.5},
        input_order=("c", "x", "y"),
    ),
    Case("abs", "Abs", {"x": _away_from(_r(3, 4), [0.0])}),
    Case("reciprocal", "Reciprocal", {"x": _r(3, 4, low=0.5)}),
    # activations
    Case("relu", "Relu", {"x": _away_from(_r(3, 5), [0.0])}),
    Case("leaky_relu", "LeakyRelu", {"x": _away_from(_r(3, 5), [0.0])}, {"alpha": 0.1}),
    Case("sigmoid", "Sigmoid", {"x": _r(3, 5)}),
    Case("tanh", "Tanh", {"x": _r(3, 5)}),
    Case(
        "clip",
        "Clip",
        {"x": _away_from(_r(4, 5), [-0.5, 0.7])},
        consts={"lo": np.asarray(-0.5), "hi": np.asarray(0.7)},
        input_order=("x", "lo", "hi"),
    ),
    Case(
        "clip_min_only",
        "Clip",
        {"x": _away_from(_r(4, 5), [-0.5])},
        consts={"lo": np.asarray(-0.5)},
        input_order=("x", "lo"),
    ),
    Case("hard_sigmoid", "HardSigmoid", {"x": _away_from(_r(4, 5) * 3, [-2.5, 2.5])}),
    Case("hard_swish", "HardSwish", {"x": _away_from(_r(4, 5) * 3, [-3.0, 3.0])}),
    Case("erf", "Erf", {"x": _r(3, 5)}),
    Case("gelu", "Gelu", {"x": _r(3, 5)}, opset=20),
    Case("gelu_tanh", "Gelu", {"x": _r(3, 5)}, {"approximate": "tanh"}, opset=20),
    Case("sqrt", "Sqrt", {"x": _r(3, 5, low=0.3)}),
    Case("exp", "Exp", {"x": _r(3, 5)}),
    Case("log", "Log", {"x": _r(3, 5, low=0.3)}),
    Case("softmax", "Softmax", {"x": _r(2, 3, 5)}, {"axis": 1}),
    Case("softmax_last", "Softmax", {"x": _r(2, 3, 5)}),
    Case("log_softmax", "LogSoftmax", {"x": _r(2, 3, 5)}),
    # shape and pass-through
    Case("identity", "Identity", {"x": _r(3, 4)}),
    Case("dropout", "Dropout", {"x": _r(3, 4)}),
    Case("cast_64_32", "Cast", {"x": _r(3, 4)}, {"to": TensorProto.DOUBLE}),
    Case("flatten", "Flatten", {"x": _r(2, 3, 4)}, {"axis": 2}),
    Case(
        "reshape",
        "Reshape",
        {"x": _r(2, 3, 4)},
        consts={"s": np.asarray([4, -1], I64)},
        input_order=("x", "s"),
    ),
    Case("transpose", "Transpose", {"x": _r(2, 3, 4)}, {"perm": [2, 0, 1]}),
    Case("transpose_default", "Transpose", {"x": _r(2, 3, 4)}),
    Case(
        "squeeze",
        "Squeeze",
        {"x": _r(2, 1, 4)},
        consts={"axes": np.asarray([1], I64)},
        input_order=("x", "axes"),
    ),
    Case(
        "unsqueeze",
        "Unsqueeze",
        {"x": _r(2, 4)},
        consts={"axes": np.asarray([0, 2], I64)},
        input_order=("x", "axes"),
    ),
    Case(
        "expand", "Expand", {"x": _r(3, 1)}, consts={"s": np.asarray([2, 3, 4], I64)}, input_order=("x", "s")
    ),
    Case("concat", "Concat", {"a": _r(2, 3), "b": _r(2, 2), "c": _r(2, 1)}, {"axis": 1}),
    Case("concat_dynamic", "Concat", {"a": _r(2, 3), "b": _r(4, 3)}, {"axis": 0}, static=False),
    Case("split", "Split", {"x": _r(2, 6)}, {"axis": 1, "num_outputs": 3}, outputs=3),
    Case(
        "split_sizes",
        "Split",
        {"x": _r(5, 2)},
        consts={"sp": np.asarray([2, 3], I64)},
        input_order=("x", "sp"),
        outputs=2,
    ),
    Case(
        "slice_pad",
        "Slice",
        {"x": _r(4, 6)},
        consts={"st": np.asarray([1, -4], I64), "en": np.asarray([3, 100], I64)},
        input_order=("x", "st", "en"),
    ),
    Case(
        "slice_steps",
        "Slice",
        {"x": _r(4, 7)},
        consts={
            "st": np.asarray([6], I64),
            "en": np.asarray([0], I64),
            "ax": np.asarray([1], I64),
            "sp": np.asarray([-2], I64),
        },
        input_order=("x", "st", "en", "ax", "sp"),
    ),
    Case(
        "slice_dynamic",
        "Slice",
        {"x": _r(5, 3)},
        consts={"st": np.asarray([1], I64), "en": np.asarray([4], I64)},
        input_order=("x", "st", "en"),
        static=False,
    ),
    Case(
        "gather_embed",
        "Gather",
        {"x": _r(6, 4)},
        consts={"i": np.asarray([[0, 5, 2], [2, -1, 0]], I64)},
        input_order=("x", "i"),
    ),
    Case(
        "gather_axis1",
        "Gather",
        {"x": _r(3, 5, 2)},
        {"axis": 1},
        consts={"i": np.asarray([4, 1, 1], I64)},
        input_order=("x", "i"),
    ),
    Case(
        "gather_scalar", "Gather", {"x": _r(4, 3)}, consts={"i": np.asarray(2, I64)}, input_order=("x", "i")
    ),
    # reductions
    Case(
        "reduce_mean_keep",
        "ReduceMean",
        {"x": _r(2, 3, 4)},
        consts={"ax": np.asarray([1], I64)},
        input_order=("x", "ax"),
    ),
    Case(
        "reduce_mean_drop",
        "ReduceMean",
        {"x": _r(2, 3, 4)},
        {"keepdims": 0},
        consts={"ax": np.asarray([0, -1], I64)},
        input_order=("x", "ax"),
    ),
    Case("reduce_mean_attr", "ReduceMean", {"x": _r(2, 3, 4)}, {"axes": [1], "keepdims": 0}, opset=13),
    Case("reduce_sum_all", "ReduceSum", {"x": _r(2, 3, 4)}, {"keepdims": 0}),
    Case(
        "reduce_sum_axes",
        "ReduceSum",
        {"x": _r(2, 3, 4)},
        consts={"ax": np.asarray([2], I64)},
        input_order=("x", "ax"),
    ),
    # linear algebra
    Case("matmul_2d", "MatMul", {"a": _r(3, 4), "b": _r(4, 5)}),
    Case("matmul_3d_2d", "MatMul", {"a": _r(2, 3, 4), "b": _r(4, 5)}),
    Case("matmul_batched", "MatMul", {"a": _r(2, 3, 4), "b": _r(2, 4, 5)}),
    Case("matmul_bcast", "MatMul", {"a": _r(2, 1, 3, 4), "b": _r(3, 4, 2)}),
    Case("matmul_vec_left", "MatMul", {"a": _r(4), "b": _r(4, 5)}),
    Case("matmul_vec_right", "MatMul", {"a": _r(2, 3, 4), "b": _r(4)}),
    Case("matmul_vec_batched", "MatMul", {"a": _r(4), "b": _r(2, 4, 3)}),
    Case("matmul_vec_vec", "MatMul", {"a": _r(4), "b": _r(4)}),
    Case("gemm", "Gemm", {"a": _r(3, 4), "b": _r(4, 5), "c": _r(5)}),
    Case(
        "gemm_trans",
        "Gemm",
        {"a": _r(4, 3), "b": _r(5, 4), "c": _r(3, 1)},
        {"transA": 1, "transB": 1, "alpha": 0.7, "beta": 1.3},
    ),
    Case("gemm_transb", "Gemm", {"a": _r(3, 4), "b": _r(5, 4)}, {"transB": 1}),
    Case("gemm_transa", "Gemm", {"a": _r(4, 3), "b": _r(4, 5), "c": _r(1)}, {"transA": 1}),
    # convolution
    Case("conv", "Conv", {"x": _r(2, 3, 6, 6), "w": _r(4, 3, 3, 3), "b": _r(4)}, {"pads": [1, 1, 1, 1]}),
    Case(
        "conv_stride",
        "Conv",
        {"x": _r(2, 2, 7, 6), "w": _r(3, 2, 3, 2)},
        {"strides": [2, 2], "pads": [1, 0, 0, 1]},
    ),
    Case(
        "conv_dilation",
        "Conv",
        {"x": _r(1, 2, 7, 7), "w": _r(2, 2, 3, 3)},
        {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
    ),
    Case(
        "conv_groups",
        "Conv",
        {"x": _r(2, 4, 5, 5), "w": _r(6, 2, 3, 3), "b": _r(6)},
        {"group": 2, "pads": [1, 1, 1, 1]},
    ),
    Case(
        "conv_depthwise",
        "Conv",
        {"x": _r(2, 3, 6, 6), "w": _r(3, 1, 3, 3)},
        {"group": 3, "strides": [2, 2], "pads": [1, 1, 1, 1]},
    ),
    Case(
        "conv_same_upper",
        "Conv",
        {"x": _r(1, 2, 5, 5), "w": _r(2, 2, 2, 2)},
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    ),
    # equal 2-D strides: im2col through SpaceToDepth (sizes not multiples of the stride, dilated
    # offsets that all fall in one phase)
    Case(
        "conv_stride_dilation",
        "Conv",
        {"x": _r(2, 2, 9, 8), "w": _r(3, 2, 3, 3)},
        {"strides": [2, 2], "dilations": [2, 2], "pads": [1, 2, 2, 0]},
    ),
    Case(
        "conv_stride3",
        "Conv",
        {"x": _r(1, 2, 10, 11), "w": _r(2, 2, 4, 3), "b": _r(2)},
        {"strides": [3, 3], "pads": [1, 1, 2, 0]},
    ),
    Case("conv_1d", "Conv", {"x": _r(2, 3, 9), "w": _r(2, 3, 3)}, {"strides": [2], "pads": [1, 1]}),
    Case("conv_3d", "Conv", {"x": _r(1, 2, 4, 4, 4), "w": _r(2, 2, 2, 2, 2)}, {"strides": [1, 2, 1]}),
    Case("conv_1x1", "Conv", {"x": _r(2, 3, 4, 4), "w": _r(5, 3, 1, 1)}),
    # pooling
    Case("maxpool", "MaxPool", {"x": _r(2, 3, 6, 6)}, {"kernel_shape": [2, 2], "strides": [2, 2]}),
    Case(
        "maxpool_overlap",
        "MaxPool",
        {"x": _r(1, 2, 5, 5)},
        {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]},
    ),
    Case("avgpool", "AveragePool", {"x": _r(2, 3, 6, 6)}, {"kernel_shape": [2, 2], "strides": [2, 2]}),
    Case(
        "avgpool_pad_excl",
        "AveragePool",
        {"x": _r(1, 2, 5, 5)},
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    ),
    Case(
        "avgpool_pad_incl",
        "AveragePool",
        {"x": _r(1, 2, 5, 5)},
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
    ),
    Case(
        "avgpool_ceil",
        "AveragePool",
        {"x": _r(1, 2, 5, 5)},
        {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},
    ),
    Case(
        "maxpool_ceil",
        "MaxPool",
        {"x": _r(1, 2, 5, 5)},
        {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},
    ),
    Case("avgpool_1d", "AveragePool", {"x": _r(2, 3, 7)}, {"kernel_shape": [3], "strides": [2]}),
    Case("global_avgpool", "GlobalAveragePool", {"x": _r(2, 3, 4, 5)}),
    # normalization
    Case(
        "batchnorm_frozen",
        "BatchNormalization",
        {"x": _r(2, 3, 4, 4), "s": _r(3), "b": _r(3)},
        consts={"m": _r(3, seed=3), "v": _r(3, seed=4, low=0.5)},
        input_order=("x", "s", "b", "m", "v"),
    ),
    Case(
        "batchnorm_2d",
        "BatchNormalization",
        {"x": _r(4, 3), "s": _r(3), "b": _r(3)},
        {"epsilon": 1e-3},
        consts={"m": _r(3, seed=3), "v": _r(3, seed=4, low=0.5)},
        input_order=("x", "s", "b", "m", "v"),
    ),
    Case("layernorm", "LayerNormalization", {"x": _r(2, 3, 5), "s": _r(5), "b": _r(5)}, opset=17),
    Case(
        "layernorm_axis1",
        "LayerNormalization",
        {"x": _r(2, 3, 4), "s": _r(3, 4), "b": _r(4)},
        {"axis": 1},
        opset=17,
    ),
]

# below opset 16 (no scatter with reduction): a slice with computed bounds scatters each element once
CASES += [
    replace(c, id=f"{c.id}_dynamic_opset13", static=False, opset=13)
    for c in CASES
    if c.id in ("slice_pad", "slice_steps")
]


def _case_model(case: Case) -> onnx.ModelProto:
    order = case.input_order or tuple(case.inputs)
    outputs = [f"y{i}" for i in range(case.outputs)]
    node = helper.make_node(case.op, list(order), outputs, name=f"{case.id}_node", **case.attrs)
    return float64_model([node], case.inputs, outputs, opset=case.opset, initializers=case.consts)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rule_matches_finite_differences(case: Case) -> None:
    model = _case_model(case)
    wrt = list(case.wrt or [k for k, v in case.inputs.items() if v.dtype == np.float64])
    gradient_check(model, case.inputs, wrt, static=case.static)


def test_fan_out_and_tied_parameters_sum_their_gradients() -> None:
    # h = w @ x; y = w @ ((h + Relu(h)) * w): w feeds three nodes, h two
    x, w = _r(3, 3, seed=5), _r(3, 3, seed=6)
    nodes = [
        helper.make_node("MatMul", ["w", "x"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Add", ["h", "r"], ["s"]),
        helper.make_node("Mul", ["s", "w"], ["p"]),
        helper.make_node("MatMul", ["w", "p"], ["y"]),
    ]
    model = float64_model(nodes, {"x": x, "w": w}, ["y"])
    gradient_check(model, {"x": x, "w": w}, ["w", "x"])


def test_symbolic_batch_dimension() -> None:
    # shapes stay symbolic ("x_0" batch) in the gradient graph; one graph serves two batch sizes
    w, b = _r(4, 3), _r(3)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["z"]),
        helper.make_node("Softmax", ["z"], ["y"]),
    ]
    for batch in (2, 5):
        feeds = {"x": _r(batch, 4), "w": w, "b": b}
        gradient_check(float64_model(nodes, feeds, ["y"]), feeds, ["w", "b"], static=False)


def test_op_without_rule_on_the_path_names_node_and_op() -> None:
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["h"], name="scale"),
        helper.make_node("Cos", ["h"], ["y"], name="the_cosine"),
    ]
    model = float64_model(nodes, {"x": _r(2, 3), "w": _r(3)}, ["y"])
    with pytest.raises(GradientError, match=r"node 'the_cosine' \(Cos\).*no gradient rule"):
        gradient_check(model, {"x": _r(2, 3), "w": _r(3)}, ["w"])


def test_op_without_rule_off_the_path_runs_forward_only() -> None:
    # Cos only sees the input x, which no parameter affects: it runs forward only.
    nodes = [
        helper.make_node("Cos", ["x"], ["c"], name="the_cosine"),
        helper.make_node("Mul", ["c", "w"], ["y"]),
    ]
    feeds = {"x": _r(2, 3), "w": _r(3)}
    grads = gradient_check(float64_model(nodes, feeds, ["y"]), feeds, ["w"])
    assert grads["w"].shape == (3,)


def test_non_differentiable_paths_are_not_on_the_gradient_path() -> None:
    # Shape(h) feeds a Reshape: the integer path needs no rule (Shape has none), the data path does.
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["h"]),
        helper.make_node("Shape", ["h"], ["s"]),
        helper.make_node("Reshape", ["h", "s"], ["y"]),
    ]
    feeds = {"x": _r(2, 3), "w": _r(3)}
    gradient_check(float64_model(nodes, feeds, ["y"]), feeds, ["w", "x"])


def test_parameter_no_gradient_reaches_is_none() -> None:
    nodes = [helper.make_node("Mul", ["x", "w"], ["y"]), helper.make_node("Neg", ["v"], ["unused"])]
    model = float64_model(nodes, {"x": _r(2, 3), "w": _r(3), "v": _r(3)}, ["y"])
    model.graph.output.pop()  # "unused" is computed but not an output
    _, grads, _ = append_gradients(
        _with_seed(model, "y", (2, 3)), wrt=["w", "v"], seeds={"y": "seed__y"}, rules=RULES
    )
    assert grads["v"] is None and grads["w"] is not None


def _with_seed(model: onnx.ModelProto, out: str, shape: tuple[int, ...]) -> onnx.ModelProto:
    model.graph.input.append(helper.make_tensor_value_info(f"seed__{out}", TensorProto.DOUBLE, list(shape)))
    return model
