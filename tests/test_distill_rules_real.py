"""Gradient rules for the ops real networks put on their trainable path (issue 17).

Resize/Upsample, Pad, ConvTranspose, Conv with run-time spatial sizes, PRelu, Softplus, Mish,
Elu/Selu/Celu, Max/Min, ReduceMax/ReduceMin, GlobalMaxPool, InstanceNormalization, GroupNormalization,
DepthToSpace/SpaceToDepth, Tile, Einsum, GatherElements, ScatterND/ScatterElements and Split
variants, in random shapes and attribute variants, each case checked twice:

- float64 central finite differences on ``onnx.reference`` (as in ``test_distill_rules.py``);
- on onnxruntime in float32: against the float64 gradient, which catches emitted ops
  onnxruntime lacks; for Resize, and for what ``onnx.reference`` cannot run (Resize-10,
  Upsample, negative pads, ConvTranspose with auto_pad/output_shape, ...), by the adjoint
  identity <R, Y(w) - Y(0)> = <dL/dw, w> of ops linear in ``w`` against onnxruntime's own
  forward (the two runtimes disagree on some Resize forms, and the rule follows the runtime
  it runs on).

Then ties, refusals (each a GradientError saying why), the forms chosen for speed (nearest
integer upsampling as a sum-pool, edge/reflect Pad as slices), and an FPN detector (stride-2
Convs with run-time H and W, a nearest Resize, a Concat of two scales) pruned and distilled.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_distill_rules import (
    I64,
    Case,
    _away_from,
    _case_model,
    _r,
    _static_inputs,
    evaluator,
    gradient_check,
)

from modelshrink import DistillConfig, PruneConfig, RunOptions, api
from modelshrink.techniques.distill.autodiff import append_gradients
from modelshrink.techniques.distill.grad import GradientError
from modelshrink.techniques.distill.rules import RULES
from modelshrink.techniques.distill.step import prepare_student

import models
import patterns

# float32 onnxruntime gradient vs float64 onnx.reference gradient, relative to the largest
# gradient element (float32 rounding through a few MatMuls and reductions)
F32_GRAD_RTOL = 1e-4
# adjoint identity in float32, relative to sum(|dY| * |Y|)
ADJOINT_RTOL = 1e-4

F32 = np.float32
EMPTY = np.zeros(0, dtype=F32)


@dataclass
class DynCase(Case):
    """A case whose listed input axes stay symbolic (known only at run time)."""

    dynamic: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _dyn(case: Case, **axes: Sequence[int]) -> Case:
    """``case`` with the given axes of the given inputs made symbolic (the rest stay static)."""
    fields = {f.name: getattr(case, f.name) for f in dataclasses.fields(Case)}
    return DynCase(**{**fields, "id": case.id + "_dyn"}, dynamic={k: tuple(v) for k, v in axes.items()})


def _model(case: Case) -> onnx.ModelProto:
    """The case's one-node model with static input shapes except the axes ``_dyn`` names."""
    model = _static_inputs(_case_model(case), case.inputs)
    for vi in model.graph.input:
        for i in getattr(case, "dynamic", {}).get(vi.name, ()):
            d = vi.type.tensor_type.shape.dim[i]
            d.ClearField("dim_value")
            d.dim_param = f"{vi.name}_{i}"
    return model


def _resize(
    cid: str,
    x: np.ndarray,
    attrs: dict[str, Any],
    *,
    opset: int,
    scales: Sequence[float] | None = None,
    sizes: Sequence[int] | None = None,
    roi: Sequence[float] | None = None,
    op: str = "Resize",
) -> Case:
    """A Resize (or Upsample) case in the input form of its opset."""
    consts: dict[str, np.ndarray] = {}
    if scales is not None:
        consts["sc"] = np.asarray(scales, dtype=F32)
    if sizes is not None:
        consts["sz"] = np.asarray(sizes, dtype=I64)
    if op == "Upsample" and opset < 9:
        attrs = {**attrs, "scales": [float(s) for s in consts.pop("sc")]}
        order: tuple[str, ...] = ("x",)
    elif op == "Upsample" or opset == 10:
        order = ("x", "sc")
    else:
        if roi is not None:
            consts["roi"] = np.asarray(roi, dtype=F32)
        elif opset < 13:
            consts["roi"] = EMPTY
        if sizes is not None and opset < 13:
            consts["sc"] = EMPTY
        order = ("x", "roi" if "roi" in consts else "", "sc" if "sc" in consts else "")
        if sizes is not None:
            order = (*order, "sz")
    return Case(cid, op, {"x": x}, attrs, consts=consts, input_order=order, opset=opset)


# (mode, coordinate_transformation_mode, nearest_mode, extra attributes, lowest opset)
RESIZE_MODES: list[tuple[str, str, str | None, dict[str, Any], int]] = [
    ("nearest", "half_pixel", "round_prefer_floor", {}, 11),
    ("nearest", "half_pixel", "round_prefer_ceil", {}, 11),
    ("nearest", "asymmetric", "floor", {}, 11),
    ("nearest", "asymmetric", "ceil", {}, 11),
    ("nearest", "asymmetric", "round_prefer_floor", {}, 11),
    ("nearest", "align_corners", "round_prefer_floor", {}, 11),
    ("nearest", "pytorch_half_pixel", "floor", {}, 11),
    ("nearest", "pytorch_half_pixel", "round_prefer_ceil", {}, 11),
    ("nearest", "tf_crop_and_resize", "round_prefer_floor", {"extrapolation_value": 0.5}, 11),
    ("nearest", "half_pixel_symmetric", "round_prefer_floor", {}, 19),
    ("linear", "half_pixel", None, {}, 11),
    ("linear", "asymmetric", None, {}, 11),
    ("linear", "align_corners", None, {}, 11),
    ("linear", "pytorch_half_pixel", None, {}, 11),
    ("linear", "tf_crop_and_resize", None, {}, 11),
    ("linear", "half_pixel_symmetric", None, {}, 19),
    ("linear", "half_pixel", None, {"antialias": 1}, 18),
    ("cubic", "half_pixel", None, {}, 11),
    ("cubic", "asymmetric", None, {"cubic_coeff_a": -0.5, "exclude_outside": 1}, 11),
]
# scales, or sizes for an input of spatial size (3, 4): integer upsampling (the sum-pool
# form for nearest), fractional, downsampling, and sizes both integer and not
RESIZE_SIZES: dict[str, dict[str, Any]] = {
    "up2": {"scales": [1, 1, 2, 2]},
    "up3x2": {"scales": [1, 1, 3, 2]},
    "frac": {"scales": [1, 1, 1.5, 0.6]},
    "down": {"scales": [1, 1, 0.5, 0.75]},
    "sizes": {"sizes": [7, 5]},
    "sizes_x2": {"sizes": [6, 8]},
}


def _resize_cases() -> list[Case]:
    rng = np.random.default_rng(17)
    cases = []
    opsets = [11, 13, 18, 19]
    for k, (mode, ctm, nearest, extra, lowest) in enumerate(RESIZE_MODES):
        kinds = list(RESIZE_SIZES)
        picked = [kinds[(k + i) % len(kinds)] for i in range(0, len(kinds), 2)]  # 3 of 6, rotating
        if mode == "nearest" and nearest == "round_prefer_floor" and ctm == "half_pixel":
            picked = kinds  # the default: every size kind
        for kind in picked:
            opset = max(lowest, opsets[(k + len(cases)) % len(opsets)])
            n, c = (int(v) for v in rng.integers(1, 3, 2))
            x = _r(n, c, 3, 4, seed=k)
            attrs = {"mode": mode, "coordinate_transformation_mode": ctm, **extra}
            if nearest is not None:
                attrs["nearest_mode"] = nearest
            spec = dict(RESIZE_SIZES[kind])
            if "sizes" in spec:
                spec["sizes"] = [n, c, *spec["sizes"]]
            roi = [0, 0, 0.2, 0.1, 1, 1, 0.9, 0.7] if ctm == "tf_crop_and_resize" else None
            cid = (
                f"resize{opset}_{mode}_{ctm}_{nearest or ''}{'_aa' if extra.get('antialias') else ''}_{kind}"
            )
            cases.append(_resize(cid, x, attrs, opset=opset, roi=roi, **spec))
    x = _r(2, 3, 3, 4)
    cases += [
        # opset 18 `axes`, other ranks, a resized channel axis
        _resize("resize18_axes", x, {"mode": "linear", "axes": [2, 3]}, opset=18, scales=[1.5, 2]),
        _resize("resize18_axes_sizes", x, {"mode": "nearest", "axes": [2, 3]}, opset=18, sizes=[6, 12]),
        _resize("resize13_1d", _r(2, 3, 5), {"mode": "linear"}, opset=13, scales=[1, 1, 2.5]),
        _resize("resize13_1d_nearest", _r(2, 3, 5), {"mode": "nearest"}, opset=13, scales=[1, 1, 3]),
        _resize("resize13_3d", _r(1, 2, 2, 3, 3), {"mode": "linear"}, opset=13, scales=[1, 1, 2, 1.5, 2]),
        _resize("resize13_channels", x, {"mode": "nearest"}, opset=13, scales=[1, 1.5, 1, 2]),
        _resize("resize13_batch_dup", x, {"mode": "nearest"}, opset=13, scales=[2, 1, 1, 1]),
    ]
    # symbolic (run-time) sizes: the sum-pool form, and the identity-matrix form
    cases += [
        _dyn(
            _resize("resize13_nearest_up2", x, {"mode": "nearest"}, opset=13, scales=[1, 1, 2, 2]),
            x=[0, 2, 3],
        ),
        _dyn(
            _resize(
                "resize13_nearest_asym",
                x,
                {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
                opset=13,
                scales=[1, 1, 3, 2],
            ),
            x=[0, 2, 3],
        ),
        _dyn(_resize("resize13_linear", x, {"mode": "linear"}, opset=13, scales=[1, 1, 2, 2]), x=[0, 2, 3]),
        _dyn(_resize("resize11_sizes", x, {"mode": "linear"}, opset=11, sizes=[2, 3, 5, 7]), x=[2, 3]),
    ]
    return cases


def _resize_runtime_cases() -> list[Case]:
    """Resize forms onnx.reference cannot run (Resize-10, Upsample, tf_half_pixel_for_nn,
    unsorted negative `axes`): checked on onnxruntime only."""
    x = _r(2, 3, 3, 4)
    half_nn = {"mode": "nearest", "coordinate_transformation_mode": "tf_half_pixel_for_nn"}
    return [
        _resize("resize10_nearest_up2", x, {"mode": "nearest"}, opset=10, scales=[1, 1, 2, 2]),
        _resize("resize10_nearest_frac", x, {"mode": "nearest"}, opset=10, scales=[1, 1, 1.7, 2.5]),
        _resize("resize10_nearest_down", x, {"mode": "nearest"}, opset=10, scales=[1, 1, 0.7, 0.5]),
        _resize("resize10_linear", x, {"mode": "linear"}, opset=10, scales=[1, 1, 2, 1.5]),
        _resize("upsample9_nearest", x, {"mode": "nearest"}, opset=9, scales=[1, 1, 2, 3], op="Upsample"),
        _resize("upsample9_linear", x, {"mode": "linear"}, opset=9, scales=[1, 1, 2, 2], op="Upsample"),
        _resize("upsample7_nearest", x, {"mode": "nearest"}, opset=7, scales=[1, 1, 2, 2], op="Upsample"),
        _resize("upsample7_linear", x, {"mode": "linear"}, opset=7, scales=[1, 1, 1.5, 2], op="Upsample"),
        _dyn(
            _resize("upsample9_nearest", x, {"mode": "nearest"}, opset=9, scales=[1, 1, 2, 2], op="Upsample"),
            x=[0, 2, 3],
        ),
        _resize(
            "resize11_half_nn_floor_up2",
            x,
            {**half_nn, "nearest_mode": "floor"},
            opset=11,
            scales=[1, 1, 2, 2],
        ),
        _resize(
            "resize11_half_nn_floor_frac",
            x,
            {**half_nn, "nearest_mode": "floor"},
            opset=11,
            scales=[1, 1, 1.5, 2.5],
        ),
        _resize(
            "resize11_half_nn_round",
            x,
            {**half_nn, "nearest_mode": "round_prefer_ceil"},
            opset=11,
            scales=[1, 1, 2, 3],
        ),
        _resize("resize18_axes_unsorted", x, {"mode": "linear", "axes": [-1, 2]}, opset=18, scales=[1.5, 2]),
    ]


RESIZE_CASES = _resize_cases()
RESIZE_RUNTIME_CASES = _resize_runtime_cases()
RESIZE_REFUSALS = [
    (
        _resize(
            "resize_keep_aspect",
            _r(1, 2, 3, 4),
            {"mode": "linear", "keep_aspect_ratio_policy": "not_larger"},
            opset=18,
            sizes=[1, 2, 6, 6],
        ),
        "keep_aspect_ratio_policy",
    ),
    (
        Case(
            "resize_crop_computed_roi",
            "Resize",
            {"x": _r(1, 2, 3, 4), "roi": np.asarray([0, 0, 0, 0, 1, 1, 1, 1], F32)},
            {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize"},
            consts={"sc": np.asarray([1, 1, 2, 2], F32)},
            input_order=("x", "roi", "sc"),
        ),
        "computed roi",
    ),
]


PAD_X = _r(2, 3, 5)

PAD_CASES = [
    Case(
        "pad_constant",
        "Pad",
        {"x": PAD_X},
        consts={"p": np.asarray([0, 1, 2, 0, 2, 3], I64)},
        input_order=("x", "p"),
    ),
    Case(
        "pad_constant_value",
        "Pad",
        {"x": PAD_X},
        consts={"p": np.asarray([1, 0, 0, 0, 1, 2], I64), "v": np.asarray(0.5)},
        input_order=("x", "p", "v"),
    ),
    Case("pad10_constant_attr", "Pad", {"x": PAD_X}, {"pads": [0, 1, 2, 1, 0, 1], "value": 0.3}, opset=10),
    Case(
        "pad18_constant_axes",
        "Pad",
        {"x": PAD_X},
        consts={"p": np.asarray([2, 1, 0, 3], I64), "ax": np.asarray([-1, 1], I64)},
        input_order=("x", "p", "", "ax"),
    ),
    Case(
        "pad10_reflect_attr", "Pad", {"x": PAD_X}, {"pads": [0, 2, 1, 0, 1, 4], "mode": "reflect"}, opset=10
    ),
    Case("pad10_edge_attr", "Pad", {"x": PAD_X}, {"pads": [1, 0, 3, 0, 2, 2], "mode": "edge"}, opset=10),
    Case(
        "pad13_reflect",
        "Pad",
        {"x": PAD_X},
        {"mode": "reflect"},
        consts={"p": np.asarray([0, 1, 4, 0, 2, 3], I64)},
        input_order=("x", "p"),
        opset=13,
    ),
    Case(
        "pad_edge",
        "Pad",
        {"x": PAD_X},
        {"mode": "edge"},
        consts={"p": np.asarray([0, 2, 3, 0, 0, 6], I64)},
        input_order=("x", "p"),
    ),
    Case(
        "pad_edge_single",
        "Pad",
        {"x": _r(2, 1, 3)},
        {"mode": "edge"},
        consts={"p": np.asarray([0, 2, 1, 0, 3, 0], I64)},
        input_order=("x", "p"),
    ),
    Case(
        "pad18_reflect_axes",
        "Pad",
        {"x": _r(2, 3, 4, 5)},
        {"mode": "reflect"},
        consts={"p": np.asarray([1, 2, 2, 3], I64), "ax": np.asarray([2, 3], I64)},
        input_order=("x", "p", "", "ax"),
    ),
    Case(
        "pad18_edge_axes",
        "Pad",
        {"x": _r(2, 3, 4, 5)},
        {"mode": "edge"},
        consts={"p": np.asarray([0, 2, 1, 3], I64), "ax": np.asarray([-2, -1], I64)},
        input_order=("x", "p", "", "ax"),
    ),
    Case(
        "pad19_wrap",
        "Pad",
        {"x": PAD_X},
        {"mode": "wrap"},
        consts={"p": np.asarray([0, 1, 2, 0, 2, 3], I64)},
        input_order=("x", "p"),
        opset=19,
    ),
    # pads computed at run time (a graph input here): the index-map scatter, and -pads
    Case(
        "pad_reflect_computed",
        "Pad",
        {"x": PAD_X, "p": np.asarray([0, 1, 2, 0, 1, 3], I64)},
        {"mode": "reflect"},
    ),
    Case(
        "pad_edge_computed", "Pad", {"x": PAD_X, "p": np.asarray([1, 1, 0, 0, 2, 3], I64)}, {"mode": "edge"}
    ),
    _dyn(
        Case(
            "pad_reflect",
            "Pad",
            {"x": PAD_X},
            {"mode": "reflect"},
            consts={"p": np.asarray([0, 0, 4, 0, 0, 3], I64)},
            input_order=("x", "p"),
        ),
        x=[0, 2],
    ),
]
PAD_RUNTIME_CASES = [
    # onnx.reference (numpy.pad) cannot crop; onnxruntime can
    Case("pad_constant_computed", "Pad", {"x": PAD_X, "p": np.asarray([1, -1, 0, 0, 2, -3], I64)}),
    *(
        Case(
            f"pad_negative_{mode}_{i}",
            "Pad",
            {"x": _r(3, 4, 6)},
            {"mode": mode},
            consts={"p": np.asarray(pads, I64)},
            input_order=("x", "p"),
        )
        for i, (pads, mode) in enumerate(
            [
                ([0, -1, 2, 0, 2, -3], "constant"),
                ([-1, 0, -2, 0, 1, 0], "constant"),
                ([0, -1, 2, 0, 1, -2], "reflect"),
                ([0, 2, -1, 0, -2, 1], "edge"),
            ]
        )
    ),
]
PAD_REFUSALS = [
    (
        Case(
            "pad_reflect_computed_13",
            "Pad",
            {"x": PAD_X, "p": np.asarray([0, 1, 1, 0, 1, 1], I64)},
            {"mode": "reflect"},
            opset=13,
        ),
        "opset 16",
    ),
]

CONV_TRANSPOSE_CASES = [
    Case(
        "convt",
        "ConvTranspose",
        {"x": _r(2, 3, 4, 4), "w": _r(3, 2, 3, 3), "b": _r(2)},
        {"pads": [1, 1, 1, 1]},
    ),
    Case(
        "convt_stride_outpad",
        "ConvTranspose",
        {"x": _r(2, 3, 3, 4), "w": _r(3, 4, 3, 2)},
        {"strides": [2, 3], "pads": [1, 0, 0, 1], "output_padding": [1, 2]},
    ),
    Case(
        "convt_groups_dilation",
        "ConvTranspose",
        {"x": _r(1, 4, 3, 3), "w": _r(4, 3, 2, 2), "b": _r(6)},
        {"group": 2, "dilations": [2, 1], "strides": [2, 2]},
    ),
    Case(
        "convt_depthwise",
        "ConvTranspose",
        {"x": _r(2, 3, 3, 3), "w": _r(3, 1, 4, 4)},
        {"group": 3, "strides": [2, 2], "pads": [1, 1, 1, 1]},
    ),
    Case(
        "convt_1d",
        "ConvTranspose",
        {"x": _r(2, 3, 5), "w": _r(3, 2, 3)},
        {"strides": [2], "output_padding": [1]},
    ),
    Case(
        "convt_3d", "ConvTranspose", {"x": _r(1, 2, 2, 3, 2), "w": _r(2, 2, 2, 2, 2)}, {"strides": [2, 1, 2]}
    ),
]
CONV_TRANSPOSE_RUNTIME_CASES = [
    # the float64 stand-in ConvTranspose of the FD tests has no auto_pad/output_shape
    Case(f"convt_{cid}", "ConvTranspose", {"x": _r(2, 3, 3, 4), "w": _r(3, 2, *attrs["kernel_shape"])}, attrs)
    for cid, attrs in [
        ("same_upper", {"strides": [2, 2], "auto_pad": "SAME_UPPER", "kernel_shape": [4, 4]}),
        ("same_lower", {"strides": [2, 2], "auto_pad": "SAME_LOWER", "kernel_shape": [2, 4]}),
        ("output_shape", {"strides": [2, 1], "output_shape": [7, 6], "kernel_shape": [3, 3]}),
        ("valid", {"strides": [2, 2], "auto_pad": "VALID", "kernel_shape": [3, 3]}),
    ]
]
CONV_TRANSPOSE_REFUSALS = [
    (
        Case(
            "convt_odd_output_shape",
            "ConvTranspose",
            {"x": _r(1, 2, 3, 3), "w": _r(2, 2, 3, 3)},
            {"strides": [2, 2], "output_shape": [6, 6]},
        ),
        "explicit pads",
    ),
]

CONV_DYNAMIC_CASES = [
    _dyn(
        Case(
            "conv_stride",
            "Conv",
            {"x": _r(2, 2, 7, 6), "w": _r(3, 2, 3, 2)},
            {"strides": [2, 2], "pads": [1, 0, 0, 1]},
        ),
        x=[0, 2, 3],
    ),
    _dyn(
        Case(
            "conv_stride3",
            "Conv",
            {"x": _r(2, 2, 8, 7), "w": _r(3, 2, 2, 3), "b": _r(3)},
            {"strides": [3, 2], "pads": [0, 2, 1, 0]},
        ),
        x=[0, 2, 3],
    ),
    _dyn(
        Case(
            "conv_groups",
            "Conv",
            {"x": _r(2, 4, 5, 5), "w": _r(6, 2, 3, 3), "b": _r(6)},
            {"group": 2, "pads": [1, 1, 1, 1], "dilations": [2, 1]},
        ),
        x=[0, 2, 3],
    ),
    _dyn(
        Case(
            "conv_same_stride1",
            "Conv",
            {"x": _r(1, 2, 5, 6), "w": _r(2, 2, 3, 2)},
            {"auto_pad": "SAME_LOWER"},
        ),
        x=[2, 3],
    ),
    _dyn(
        Case("conv_1d", "Conv", {"x": _r(2, 3, 9), "w": _r(2, 3, 3)}, {"strides": [2], "pads": [1, 1]}), x=[2]
    ),
    _dyn(Case("conv_1x1", "Conv", {"x": _r(2, 3, 4, 4), "w": _r(5, 3, 1, 1)}), x=[0, 2, 3]),
]
CONV_DYNAMIC_REFUSALS = [
    (
        _dyn(
            Case(
                "conv_same_stride2",
                "Conv",
                {"x": _r(1, 2, 5, 5), "w": _r(2, 2, 2, 2)},
                {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
            ),
            x=[2, 3],
        ),
        "fixed input size",
    ),
]

ACTIVATION_CASES = [
    Case("prelu_channel", "PRelu", {"x": _away_from(_r(2, 3, 4, 4), [0.0]), "s": _r(3, 1, 1)}),
    Case("prelu_shared", "PRelu", {"x": _away_from(_r(2, 3, 4), [0.0]), "s": _r(1)}),
    Case("prelu_last_axis", "PRelu", {"x": _away_from(_r(2, 3, 4), [0.0]), "s": _r(4)}),
    Case("prelu_full", "PRelu", {"x": _away_from(_r(3, 4), [0.0]), "s": _r(3, 4)}),
    Case("softplus", "Softplus", {"x": _r(3, 5) * 3}),
    Case("mish", "Mish", {"x": _r(3, 5) * 3}),
    Case("elu", "Elu", {"x": _away_from(_r(3, 5), [0.0])}),
    Case("elu_alpha", "Elu", {"x": _away_from(_r(3, 5), [0.0])}, {"alpha": 0.3}),
    Case("selu", "Selu", {"x": _away_from(_r(3, 5), [0.0])}),
    Case("selu_custom", "Selu", {"x": _away_from(_r(3, 5), [0.0])}, {"alpha": 1.2, "gamma": 0.8}),
    Case("celu", "Celu", {"x": _away_from(_r(3, 5), [0.0])}),
    Case("celu_alpha", "Celu", {"x": _away_from(_r(3, 5), [0.0])}, {"alpha": 2.5}),
    Case("max1", "Max", {"a": _r(3, 4)}),
    Case("max2", "Max", {"a": _r(3, 4), "b": _r(4)}),
    Case("max3_bcast", "Max", {"a": _r(2, 3, 1), "b": _r(3, 4), "c": _r(2, 1, 4)}),
    Case("min2_bcast", "Min", {"a": _r(2, 1), "b": _r(1, 3)}),
    Case("min3", "Min", {"a": _r(2, 3), "b": _r(2, 3, seed=1), "c": _r(3)}),
]

REDUCE_CASES = [
    Case("reducemax13_attr", "ReduceMax", {"x": _r(2, 3, 4)}, {"axes": [1], "keepdims": 1}, opset=13),
    Case(
        "reducemin13_attr_drop", "ReduceMin", {"x": _r(2, 3, 4)}, {"axes": [0, -1], "keepdims": 0}, opset=13
    ),
    Case("reducemax13_all", "ReduceMax", {"x": _r(2, 3, 4)}, {"keepdims": 0}, opset=13),
    Case(
        "reducemax18_input",
        "ReduceMax",
        {"x": _r(2, 3, 4)},
        {"keepdims": 0},
        consts={"ax": np.asarray([2], I64)},
        input_order=("x", "ax"),
    ),
    Case(
        "reducemin18_input_keep",
        "ReduceMin",
        {"x": _r(2, 3, 4)},
        consts={"ax": np.asarray([-2, 0], I64)},
        input_order=("x", "ax"),
    ),
    Case("reducemin18_all", "ReduceMin", {"x": _r(2, 3, 4)}),
    Case("reducemax18_noop", "ReduceMax", {"x": _r(2, 3, 4)}, {"noop_with_empty_axes": 1}),
    Case("global_maxpool", "GlobalMaxPool", {"x": _r(2, 3, 4, 5)}),
    # 4-D only: onnx's reference evaluator gets other ranks wrong ([2, 3, 7] gives [2, 1])
    _dyn(
        Case(
            "reducemax18_bcast",
            "ReduceMax",
            {"x": _r(2, 3, 4)},
            {"keepdims": 0},
            consts={"ax": np.asarray([1], I64)},
            input_order=("x", "ax"),
        ),
        x=[0, 1, 2],
    ),
]

NORM_CASES = [
    Case("instnorm", "InstanceNormalization", {"x": _r(2, 3, 4, 5), "s": _r(3), "b": _r(3)}),
    Case(
        "instnorm_1d_eps",
        "InstanceNormalization",
        {"x": _r(3, 2, 6), "s": _r(2), "b": _r(2)},
        {"epsilon": 0.1},
    ),
    Case("instnorm_3d", "InstanceNormalization", {"x": _r(1, 2, 3, 3, 2), "s": _r(2), "b": _r(2)}),
    _dyn(
        Case("instnorm", "InstanceNormalization", {"x": _r(2, 3, 4, 5), "s": _r(3), "b": _r(3)}), x=[0, 2, 3]
    ),
    Case(
        "groupnorm21",
        "GroupNormalization",
        {"x": _r(2, 4, 3, 3), "s": _r(4), "b": _r(4)},
        {"num_groups": 2, "stash_type": TensorProto.DOUBLE},
        opset=21,
    ),
    Case(
        "groupnorm21_one_group",
        "GroupNormalization",
        {"x": _r(2, 3, 5), "s": _r(3), "b": _r(3)},
        {"num_groups": 1, "epsilon": 1e-3, "stash_type": TensorProto.DOUBLE},
        opset=21,
    ),
    Case(
        "groupnorm21_per_channel",
        "GroupNormalization",
        {"x": _r(2, 3, 2, 3), "s": _r(3), "b": _r(3)},
        {"num_groups": 3, "stash_type": TensorProto.DOUBLE},
        opset=21,
    ),
]

REARRANGE_CASES = [
    Case("d2s_dcr", "DepthToSpace", {"x": _r(2, 8, 2, 3)}, {"blocksize": 2}),
    Case("d2s_crd", "DepthToSpace", {"x": _r(1, 18, 2, 2)}, {"blocksize": 3, "mode": "CRD"}),
    _dyn(
        Case("d2s_crd", "DepthToSpace", {"x": _r(2, 8, 2, 3)}, {"blocksize": 2, "mode": "CRD"}), x=[0, 2, 3]
    ),
    Case("s2d", "SpaceToDepth", {"x": _r(2, 2, 4, 6)}, {"blocksize": 2}),
    Case("tile", "Tile", {"x": _r(2, 3)}, consts={"r": np.asarray([2, 3], I64)}, input_order=("x", "r")),
    Case(
        "tile_ones",
        "Tile",
        {"x": _r(2, 3, 2)},
        consts={"r": np.asarray([1, 3, 1], I64)},
        input_order=("x", "r"),
    ),
    Case("tile_noop", "Tile", {"x": _r(2, 3)}, consts={"r": np.asarray([1, 1], I64)}, input_order=("x", "r")),
    Case("tile_computed", "Tile", {"x": _r(1, 3, 2), "r": np.asarray([4, 1, 2], I64)}),
    _dyn(
        Case("tile", "Tile", {"x": _r(2, 3)}, consts={"r": np.asarray([3, 2], I64)}, input_order=("x", "r")),
        x=[0, 1],
    ),
]

EINSUM_CASES = [
    Case(f"einsum_{name}", "Einsum", dict(zip("abc", arrays, strict=False)), {"equation": eq})
    for name, eq, arrays in [
        ("bmm", "bij,bjk->bik", [_r(2, 3, 4), _r(2, 4, 5)]),
        ("scores", "bhqd,bhkd->bhqk", [_r(2, 2, 3, 4), _r(2, 2, 5, 4)]),
        ("context", "bhqk,bhkd->bhqd", [_r(2, 2, 3, 5), _r(2, 2, 5, 4)]),
        ("proj", "bsh,hd->bsd", [_r(2, 3, 4), _r(4, 5)]),
        ("xl_scores", "ibnd,jbnd->bnij", [_r(3, 2, 2, 4), _r(5, 2, 2, 4)]),
        ("transpose", "ij->ji", [_r(3, 4)]),
        ("heads", "bqhd->bhqd", [_r(2, 3, 2, 4)]),
        ("rowsum", "ij->i", [_r(3, 4)]),
        ("total", "ij->", [_r(3, 4)]),
        ("dot", "i,i->", [_r(4), _r(4)]),
        ("hadamard", "ij,ij->ij", [_r(3, 4), _r(3, 4)]),
        ("lonely", "ij,jk->k", [_r(3, 4), _r(4, 5)]),
        ("chain3", "bij,bjk,bkl->bil", [_r(2, 3, 4), _r(2, 4, 2), _r(2, 2, 3)]),
        ("implicit", "ij,jk", [_r(3, 4), _r(4, 5)]),
        ("upper", "BiJ,BJk->Bik", [_r(2, 3, 4), _r(2, 4, 5)]),
        ("ellipsis", "...ij,...jk->...ik", [_r(2, 3, 3, 4), _r(2, 3, 4, 2)]),
        ("ellipsis_rank", "...ij,jk->...ik", [_r(2, 3, 3, 4), _r(4, 2)]),
        ("ellipsis_implicit", "...ij,...jk", [_r(2, 3, 4), _r(2, 4, 2)]),
        ("ellipsis_mid", "b...d,bd->b...", [_r(2, 3, 2, 4), _r(2, 4)]),
    ]
]
EINSUM_REFUSALS = [
    (Case("einsum_diagonal", "Einsum", {"a": _r(3, 3)}, {"equation": "ii->i"}), "diagonal"),
    (
        Case(
            "einsum_bcast", "Einsum", {"a": _r(1, 3, 4), "b": _r(2, 4, 5)}, {"equation": "...ij,...jk->...ik"}
        ),
        "broadcast",
    ),
]

INDEX_CASES = [
    Case(
        "gather_elements_axis1",
        "GatherElements",
        {"x": _r(3, 4)},
        {"axis": 1},
        consts={"i": np.asarray([[0, 3, -1], [1, 1, 0], [2, 0, 0]], I64)},
        input_order=("x", "i"),
    ),
    Case(
        "gather_elements_axis0_dup",
        "GatherElements",
        {"x": _r(3, 2, 2)},
        consts={
            "i": np.asarray([[[0, 2], [2, 2]], [[-1, 0], [1, 1]], [[0, 0], [0, 0]], [[1, 2], [0, 1]]], I64)
        },
        input_order=("x", "i"),
    ),
    Case(
        "gather_elements_last_int32",
        "GatherElements",
        {"x": _r(2, 3, 4)},
        {"axis": 2},
        consts={"i": np.random.default_rng(3).integers(-4, 4, (2, 3, 3)).astype(np.int32)},
        input_order=("x", "i"),
    ),
    Case(
        "scatternd",
        "ScatterND",
        {"x": _r(4, 3, 2), "u": _r(2, 3, 2)},
        consts={"i": np.asarray([[1], [3]], I64)},
        input_order=("x", "i", "u"),
    ),
    Case(
        "scatternd_elements",
        "ScatterND",
        {"x": _r(3, 4), "u": _r(3)},
        consts={"i": np.asarray([[0, 1], [2, 3], [1, 0]], I64)},
        input_order=("x", "i", "u"),
    ),
    Case(
        "scatternd_add",
        "ScatterND",
        {"x": _r(4, 3), "u": _r(3, 3)},
        {"reduction": "add"},
        consts={"i": np.asarray([[1], [3], [1]], I64)},
        input_order=("x", "i", "u"),
    ),
    Case(
        "scatter_elements",
        "ScatterElements",
        {"x": _r(4, 3), "u": _r(2, 3)},
        consts={"i": np.asarray([[1, 0, 2], [3, 2, 1]], I64)},
        input_order=("x", "i", "u"),
    ),
    Case(
        "scatter_elements_add_axis1",
        "ScatterElements",
        {"x": _r(2, 4), "u": _r(2, 3)},
        {"axis": 1, "reduction": "add"},
        consts={"i": np.asarray([[1, 1, 3], [0, -1, 0]], I64)},
        input_order=("x", "i", "u"),
    ),
    Case("split11_attr", "Split", {"x": _r(2, 7)}, {"axis": 1, "split": [3, 4]}, outputs=2, opset=11),
    Case("split18_uneven", "Split", {"x": _r(7, 2)}, {"axis": 0, "num_outputs": 3}, outputs=3),
    Case("split_negative_axis", "Split", {"x": _r(2, 3, 4)}, {"axis": -1, "num_outputs": 2}, outputs=2),
]
INDEX_RUNTIME_CASES = [
    # onnx.reference's GatherElements mishandles a negative axis
    Case(
        "gather_elements_negative_axis",
        "GatherElements",
        {"x": _r(2, 3, 4)},
        {"axis": -1},
        consts={"i": np.random.default_rng(4).integers(-4, 4, (2, 3, 5))},
        input_order=("x", "i"),
    ),
]
INDEX_REFUSALS = [
    (
        Case(
            "scatter_mul",
            "ScatterND",
            {"x": _r(4, 3), "u": _r(1, 3)},
            {"reduction": "mul"},
            consts={"i": np.asarray([[1]], I64)},
            input_order=("x", "i", "u"),
        ),
        "reduction 'mul'",
    ),
    (
        Case(
            "gather_elements_opset13",
            "GatherElements",
            {"x": _r(3, 4)},
            consts={"i": np.asarray([[0, 1, 2, 0]], I64)},
            input_order=("x", "i"),
            opset=13,
        ),
        "opset 16",
    ),
]

CASES = [
    *ACTIVATION_CASES,
    *REDUCE_CASES,
    *NORM_CASES,
    *CONV_DYNAMIC_CASES,
    *CONV_TRANSPOSE_CASES,
    *RESIZE_CASES,
    *PAD_CASES,
    *REARRANGE_CASES,
    *EINSUM_CASES,
    *INDEX_CASES,
]
# linear in what is differentiated, checked against onnxruntime's own forward
RUNTIME_CASES = [
    *CONV_TRANSPOSE_RUNTIME_CASES,
    *RESIZE_CASES,
    *RESIZE_RUNTIME_CASES,
    *PAD_RUNTIME_CASES,
    *INDEX_RUNTIME_CASES,
]
REFUSALS = [
    *CONV_DYNAMIC_REFUSALS,
    *CONV_TRANSPOSE_REFUSALS,
    *RESIZE_REFUSALS,
    *PAD_REFUSALS,
    *EINSUM_REFUSALS,
    *INDEX_REFUSALS,
]


def _wrt(case: Case) -> list[str]:
    return list(case.wrt or [k for k, v in case.inputs.items() if v.dtype == np.float64])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rule_matches_finite_differences(case: Case) -> None:
    gradient_check(_model(case), case.inputs, _wrt(case), static=False)


# --- the same gradient graphs on onnxruntime (float32) --------------------------------------


def _as_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 copy of a float64 case model (inputs, outputs, float64 constants, attributes)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for init in g.initializer:
        if init.data_type == TensorProto.DOUBLE:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(F32), init.name))
    for vi in [*g.input, *g.output]:
        if vi.type.tensor_type.elem_type == TensorProto.DOUBLE:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in g.node:
        for attr in node.attribute:
            if attr.name == "stash_type":
                attr.i = TensorProto.FLOAT
    return m


def _gradients(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    wrt: Sequence[str],
    seeds: Mapping[str, np.ndarray],
    *,
    on_ort: bool,
) -> dict[str, np.ndarray]:
    """The engine's gradients of sum(output * seed), run on onnxruntime or onnx.reference."""
    seeded = onnx.ModelProto()
    seeded.CopyFrom(model)
    for out, s in seeds.items():
        seeded.graph.input.append(
            helper.make_tensor_value_info(
                f"seed__{out}", helper.np_dtype_to_tensor_dtype(s.dtype), list(s.shape)
            )
        )
    grad_model, grads, _ = append_gradients(
        seeded, wrt=wrt, seeds={o: f"seed__{o}" for o in seeds}, rules=RULES
    )
    names = [grads[w] for w in wrt]
    assert all(n is not None for n in names)
    del grad_model.graph.output[:]
    for w, n in zip(wrt, names, strict=True):
        elem = helper.np_dtype_to_tensor_dtype(feeds[w].dtype)
        grad_model.graph.output.append(helper.make_tensor_value_info(n, elem, None))
    inputs = {**feeds, **{f"seed__{o}": s for o, s in seeds.items()}}
    if on_ort:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(
            grad_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        names_in = {i.name for i in session.get_inputs()}
        out = session.run(list(names), {k: v for k, v in inputs.items() if k in names_in})
    else:
        out = evaluator(grad_model).run(list(names), inputs)
    return dict(zip(wrt, out, strict=True))


@pytest.mark.parametrize("case", [c for c in CASES if c.op != "Resize"], ids=lambda c: c.id)
def test_rule_on_onnxruntime_matches_float64(case: Case) -> None:
    model = _model(case)
    wrt = _wrt(case)
    outputs = [o.name for o in model.graph.output]
    values = evaluator(model).run(outputs, dict(case.inputs))
    rng = np.random.default_rng(1)
    seeds = {o: rng.standard_normal(v.shape) for o, v in zip(outputs, values, strict=True)}
    want = _gradients(model, case.inputs, wrt, seeds, on_ort=False)
    feeds32 = {k: (v.astype(F32) if v.dtype == np.float64 else v) for k, v in case.inputs.items()}
    got = _gradients(
        _as_float32(model), feeds32, wrt, {k: v.astype(F32) for k, v in seeds.items()}, on_ort=True
    )
    for w in wrt:
        scale = max(float(np.abs(want[w]).max()), 1e-6)
        np.testing.assert_allclose(got[w], want[w], rtol=0, atol=F32_GRAD_RTOL * scale, err_msg=w)


@pytest.mark.parametrize("case", RUNTIME_CASES, ids=lambda c: c.id)
def test_linear_rule_on_onnxruntime_is_the_adjoint(case: Case) -> None:
    # onnxruntime and onnx.reference disagree on some Resize forms (e.g. which scale a
    # non-integer output size transforms coordinates with); the rule follows the runtime it
    # runs on, so each is checked against its own forward: <R, Y(w) - Y(0)> = <dL/dw, w>
    model = _as_float32(_model(case))
    feeds = {k: (v.astype(F32) if v.dtype == np.float64 else v) for k, v in case.inputs.items()}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    forward = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out = model.graph.output[0].name
    y = forward.run([out], feeds)[0]
    r = np.random.default_rng(5).standard_normal(y.shape).astype(F32)
    wrt = _wrt(case)
    grads = _gradients(model, feeds, wrt, {out: r}, on_ort=True)
    for w in wrt:
        y0 = forward.run([out], {**feeds, w: np.zeros_like(feeds[w])})[0]
        lhs = float(np.sum(r.astype(np.float64) * (y - y0)))
        rhs = float(np.sum(grads[w].astype(np.float64) * feeds[w]))
        scale = float(np.sum(np.abs(r) * (np.abs(y) + np.abs(y0))))
        assert abs(lhs - rhs) <= ADJOINT_RTOL * scale, f"{w}: <R, dY> {lhs} != <dw, w> {rhs}"


def test_group_norm_opset18_scale_per_group(monkeypatch: pytest.MonkeyPatch) -> None:
    # GroupNormalization-18 (scale and bias per group) is deprecated: onnx.checker refuses it,
    # but exported models have it and both runtimes run it
    monkeypatch.setattr(onnx.checker, "check_model", lambda *a, **k: None)
    case = Case(
        "groupnorm18", "GroupNormalization", {"x": _r(2, 4, 3, 3), "s": _r(2), "b": _r(2)}, {"num_groups": 2}
    )
    gradient_check(_case_model(case), case.inputs, ["x", "s", "b"])
    model = _model(case)
    outputs = {"y0": np.random.default_rng(2).standard_normal((2, 4, 3, 3))}
    want = _gradients(model, case.inputs, ["x", "s", "b"], outputs, on_ort=False)
    feeds32 = {k: v.astype(F32) for k, v in case.inputs.items()}
    got = _gradients(
        _as_float32(model), feeds32, ["x", "s", "b"], {"y0": outputs["y0"].astype(F32)}, on_ort=True
    )
    for w in ("x", "s", "b"):
        np.testing.assert_allclose(got[w], want[w], rtol=0, atol=F32_GRAD_RTOL * np.abs(want[w]).max())


# --- ties, refusals, and the forms chosen for speed ------------------------------------------


def _grads_of(case: Case, seed_value: float = 1.0) -> dict[str, np.ndarray]:
    model = _model(case)
    outputs = [o.name for o in model.graph.output]
    values = evaluator(model).run(outputs, dict(case.inputs))
    seeds = {o: np.full(v.shape, seed_value) for o, v in zip(outputs, values, strict=True)}
    return _gradients(model, case.inputs, _wrt(case), seeds, on_ort=False)


def test_max_min_ties_share_the_gradient() -> None:
    a = np.asarray([[1.0, 2.0, 3.0]])
    grads = _grads_of(Case("max_ties", "Max", {"a": a, "b": np.asarray([[1.0, 0.0, 3.0]]), "c": a.copy()}))
    np.testing.assert_allclose(grads["a"], [[1 / 3, 0.5, 1 / 3]])
    np.testing.assert_allclose(grads["b"], [[1 / 3, 0.0, 1 / 3]])
    np.testing.assert_allclose(grads["a"] + grads["b"] + grads["c"], [[1.0, 1.0, 1.0]])


def test_reduce_max_ties_share_the_gradient() -> None:
    x = np.asarray([[2.0, 5.0, 5.0], [1.0, 1.0, 1.0]])
    grads = _grads_of(Case("rmax_ties", "ReduceMax", {"x": x}, {"axes": [1], "keepdims": 0}, opset=13))
    np.testing.assert_allclose(grads["x"], [[0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])


def _refusal(case: Case, match: str) -> None:
    model = _model(case)
    model.graph.input.append(helper.make_tensor_value_info("seed", TensorProto.DOUBLE, None))
    with pytest.raises(GradientError, match=match):
        append_gradients(model, wrt=_wrt(case), seeds={"y0": "seed"}, rules=RULES)


@pytest.mark.parametrize(("case", "match"), REFUSALS, ids=lambda v: v.id if isinstance(v, Case) else "")
def test_refusals_say_why(case: Case, match: str) -> None:
    _refusal(case, match)


def _op_types(case: Case) -> set[str]:
    model = _model(case)
    seeded = onnx.ModelProto()
    seeded.CopyFrom(model)
    seeded.graph.input.append(helper.make_tensor_value_info("seed", TensorProto.DOUBLE, None))
    grad_model, _, _ = append_gradients(seeded, wrt=_wrt(case), seeds={"y0": "seed"}, rules=RULES)
    return {n.op_type for n in grad_model.graph.node[len(model.graph.node) :]}


@pytest.mark.parametrize(
    ("ctm", "nearest"),
    [
        ("asymmetric", "floor"),
        ("half_pixel", "round_prefer_floor"),
        ("pytorch_half_pixel", "round_prefer_ceil"),
    ],
)
def test_nearest_integer_upsampling_is_a_sum_pool(ctm: str, nearest: str) -> None:
    attrs = {"mode": "nearest", "coordinate_transformation_mode": ctm, "nearest_mode": nearest}
    case = _dyn(_resize("up", _r(2, 3, 4, 4), attrs, opset=13, scales=[1, 1, 2, 2]), x=[0, 2, 3])
    assert _op_types(case) == {"AveragePool", "Mul"}


def test_linear_resize_contracts_with_a_matrix_not_a_scatter() -> None:
    case = _resize("lin", _r(2, 3, 4, 4), {"mode": "linear"}, opset=13, scales=[1, 1, 2, 2])
    ops = _op_types(case)
    assert "MatMul" in ops and not {"ScatterElements", "ScatterND"} & ops


@pytest.mark.parametrize("mode", ["edge", "reflect"])
def test_edge_and_reflect_pad_use_slices_not_a_scatter(mode: str) -> None:
    case = Case(
        "p",
        "Pad",
        {"x": PAD_X},
        {"mode": mode},
        consts={"p": np.asarray([0, 1, 2, 0, 2, 3], I64)},
        input_order=("x", "p"),
    )
    assert not {"ScatterElements", "ScatterND"} & _op_types(case)


# --- through distill: old-opset Upsample, and an FPN detector ------------------------------


def _upsample_net(mode: str) -> onnx.ModelProto:
    """An opset-9 model: Conv -> Upsample(2x) -> Conv, as old exporters wrote it."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
            helper.make_node("Upsample", ["a", "scales"], ["u"], mode=mode),
            helper.make_node("Conv", ["u", "w2"], ["y"]),
        ],
        "upsample_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 10])],
        [
            numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(F32), "w1"),
            numpy_helper.from_array(rng.standard_normal((3, 4, 1, 1)).astype(F32), "w2"),
            numpy_helper.from_array(np.asarray([1, 1, 2, 2], F32), "scales"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 7
    return model


def _forward(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))[0]


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_old_upsample_trains_at_the_converted_opset(mode: str) -> None:
    model = _upsample_net(mode)
    student = prepare_student(ir.serde.deserialize_model(model))
    assert any(n.op_type == "Resize" for n in student.proto.graph.node)
    x = _r(1, 2, 4, 5).astype(F32)
    params = {p.name: p.value for p in student.params}
    np.testing.assert_allclose(
        _forward(student.proto, {"x": x, **params}), _forward(model, {"x": x}), atol=1e-5
    )


def _images(n: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Noise with a few flat-coloured rectangles: something for a detector to respond to."""
    x = 0.1 * rng.standard_normal((n, 3, size, size)).astype(F32)
    for i in range(n):
        for _ in range(int(rng.integers(1, 4))):
            h, w = rng.integers(4, 14, 2)
            r, c = rng.integers(0, size - 4, 2)
            x[i, :, r : r + h, c : c + w] += rng.uniform(-1, 1, 3)[:, None, None].astype(F32)
    return x


def _detector_agreement(path: Path, teacher: np.ndarray, images: np.ndarray) -> tuple[float, float]:
    """Share of grid cells whose objectness and class decisions (channels 4, 5 > 0) match the
    teacher's, and the cosine similarity of all outputs."""
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]
    agree = float(((out[:, 4:6] > 0) == (teacher[:, 4:6] > 0)).mean())
    cosine = float((out * teacher).sum() / np.sqrt((out * out).sum() * (teacher * teacher).sum()))
    return agree, cosine


def test_fpn_detector_pruned_then_distilled(tmp_path: Path) -> None:
    # stride-2 Convs with run-time H and W, a nearest Resize upsample, a Concat of two scales:
    # before the Resize rule, distill stopped at "node 'upsample' (Resize) ... has no gradient rule"
    teacher_path = models.save(patterns.fpn_detector(0), tmp_path / "det.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "train.npz", image=_images(256, rng))
    held_out = _images(64, np.random.default_rng(2))
    teacher_out = _forward(onnx.load(str(teacher_path)), {"image": held_out})
    options = RunOptions(latency=False)
    pruned, recovered = tmp_path / "pruned.onnx", tmp_path / "recovered.onnx"
    api.prune(
        str(teacher_path),
        str(pruned),
        PruneConfig(sparsity=0.25, structured=True, channel_multiple=1),
        options,
    )
    config = DistillConfig(teacher=str(teacher_path), epochs=5, lr=3e-3)
    train = dataclasses.replace(options, data=str(tmp_path / "train.npz"))
    report = json.loads(api.distill(str(pruned), str(recovered), config, train).to_json())
    fidelity = report["details"]["teacher_fidelity"]
    assert fidelity["after"]["loss"] < 0.3 * fidelity["before"]["loss"]
    losses = [h["train_loss"] for h in report["details"]["history"]]
    assert losses == sorted(losses, reverse=True)
    agree_before, cos_before = _detector_agreement(pruned, teacher_out, held_out)
    agree_after, cos_after = _detector_agreement(recovered, teacher_out, held_out)
    assert agree_after > agree_before + 0.005
    assert cos_after > cos_before + 0.1
