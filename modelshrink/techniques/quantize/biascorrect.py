"""Bias correction for ``--mode static``: remove the mean error a layer's quantization adds.

A quantized Conv or Gemm computes ``Q(W) * Q(x)`` instead of ``W * x``. Even when each rounding
is unbiased, the error of the output has a mean per output channel ``c`` that is far from zero:
``E[(Q(W) - W) x]`` is the rounding error of the weights times the mean of the input, and inputs
after ReLU have large means. That mean is measured on the calibration rows and subtracted from
the bias (Nagel et al. 2019, "empirical bias correction"; NNCF's FastBiasCorrection)::

    e_c = E[Q(W) * Q(x)]_c - E[W * x]_c,    b_c <- b_c - e_c

Both expectations are over the calibration rows and every output position, with ``x`` the float
model's input to the layer, so each layer corrects its own error only (the errors of earlier
layers are theirs to correct). A Conv output's mean is linear in the mean of each input channel
at each kernel offset (padding included), so one pass over the rows with every layer's input
exposed gives every correction: ``E[W * x]_c = sum_{i,k} W[c, i, k] m[i, k]``. ``Q(W)`` are the
quantizer's own int8 weights and ``Q(x)`` uses the input's own scale and zero point, read from
the QDQ model. The shift goes into the int32 bias the quantizer wrote (rounded to its scale).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from modelshrink.graph import op_key
from modelshrink.runtime import RuntimeOptions
from modelshrink.techniques.quantize.calibration import stream_values

__all__ = ["correct_biases", "dequantized_const"]

_INT32 = np.iinfo(np.int32)


def _attr_ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    attr = node.attributes.get(name)
    return [int(v) for v in attr.as_ints()] if attr is not None else default


def _attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    return float(attr.value)


def _dq(value: ir.Value | None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def dequantized_const(dq: ir.Node) -> np.ndarray | None:
    """The float values a DequantizeLinear of a constant gives (per-axis scales included)."""
    q, scale = dq.inputs[0], dq.inputs[1]
    if q is None or q.const_value is None or scale is None or scale.const_value is None:
        return None
    codes = np.asarray(q.const_value.numpy()).astype(np.float64)
    s = np.asarray(scale.const_value.numpy()).astype(np.float64)
    zp_value = dq.inputs[2] if len(dq.inputs) > 2 else None
    zp = (
        np.asarray(zp_value.const_value.numpy()).astype(np.float64)
        if zp_value is not None and zp_value.const_value is not None
        else np.zeros_like(s)
    )
    if s.ndim == 1 and s.size > 1:
        axis = int(_attr(dq, "axis", 1))
        shape = [1] * codes.ndim
        shape[axis] = s.size
        s, zp = s.reshape(shape), zp.reshape(shape)
    return (codes - zp) * s


@dataclass
class _Layer:
    node: ir.Node
    x_name: str
    weight: np.ndarray  # float
    quantized: np.ndarray  # Q(W), dequantized
    scale: float
    zero_point: int
    qmin: int
    qmax: int
    sum_float: np.ndarray | None = None
    sum_quant: np.ndarray | None = None
    rows: int = 0


def _activation_params(value: ir.Value | None) -> tuple[float, int, int, int] | None:
    dq = _dq(value)
    if dq is None or dq.inputs[1] is None or dq.inputs[1].const_value is None:
        return None
    scale = np.asarray(dq.inputs[1].const_value.numpy())
    zp_value = dq.inputs[2] if len(dq.inputs) > 2 else None
    if scale.size != 1 or zp_value is None or zp_value.const_value is None:
        return None
    zp = np.asarray(zp_value.const_value.numpy())
    info = np.iinfo(zp.dtype)
    return float(scale.reshape(())), int(zp.reshape(())), int(info.min), int(info.max)


def _conv_geometry(
    node: ir.Node, kernel: tuple[int, ...], spatial: tuple[int, ...]
) -> tuple[list[int], list[int], list[int]] | None:
    """Pads (begin..., end...), strides and dilations of a 2-D Conv."""
    attr = node.attributes.get("auto_pad")
    auto = attr.as_string() if attr is not None else "NOTSET"
    strides = _attr_ints(node, "strides", [1, 1])
    dilations = _attr_ints(node, "dilations", [1, 1])
    if auto == "VALID":
        pads = [0, 0, 0, 0]
    elif auto in ("", "NOTSET"):
        pads = _attr_ints(node, "pads", [0, 0, 0, 0])
    else:
        begins, ends = [], []
        for size, k, s_, d in zip(spatial, kernel, strides, dilations, strict=True):
            total = max(0, (-(-size // s_) - 1) * s_ + (k - 1) * d + 1 - size)
            begin = total // 2 if auto == "SAME_UPPER" else total - total // 2
            begins.append(begin)
            ends.append(total - begin)
        pads = begins + ends
    return pads, strides, dilations


def _offset_means(x: np.ndarray, node: ir.Node, kernel: tuple[int, int]) -> np.ndarray | None:
    """Mean of each input channel at each kernel offset over every output position: ``[C, kh, kw]``."""
    if x.ndim != 4:
        return None
    geometry = _conv_geometry(node, kernel, (x.shape[2], x.shape[3]))
    if geometry is None:
        return None
    pads, (sh, sw), (dh, dw) = geometry
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    kh, kw = kernel
    ho = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        return None
    out = np.empty((x.shape[1], kh, kw), np.float64)
    for i in range(kh):
        for j in range(kw):
            window = padded[
                :, :, i * dh : i * dh + (ho - 1) * sh + 1 : sh, j * dw : j * dw + (wo - 1) * sw + 1 : sw
            ]
            out[:, i, j] = window.mean(axis=(0, 2, 3), dtype=np.float64)
    return out


def _conv_mean(weight: np.ndarray, means: np.ndarray, groups: int) -> np.ndarray:
    co, ci_g = weight.shape[0], weight.shape[1]
    w = weight.reshape(groups, co // groups, ci_g, *weight.shape[2:])
    m = means.reshape(groups, ci_g, *means.shape[1:])
    return np.einsum("gockl,gckl->go", w, m).reshape(co)


def _layers(quantized: ir.Model, float_model: ir.Model, only: set[str]) -> list[_Layer]:
    floats = {n.name: n for n in float_model.graph if n.name}
    layers: list[_Layer] = []
    for node in quantized.graph:
        op = op_key(node)
        if op not in ("Conv", "Gemm") or node.name not in only or len(node.inputs) < 3:
            continue
        original = floats.get(node.name)
        weight_dq, bias_dq = _dq(node.inputs[1]), _dq(node.inputs[2])
        params = _activation_params(node.inputs[0])
        if original is None or weight_dq is None or bias_dq is None or params is None:
            continue
        bias_codes = bias_dq.inputs[0]
        if (
            bias_codes is None
            or bias_codes.const_value is None
            or bias_codes.const_value.dtype != ir.DataType.INT32
        ):
            continue
        x = original.inputs[0]
        w = original.inputs[1]
        if x is None or not x.name or w is None or w.const_value is None:
            continue
        quantized_weight = dequantized_const(weight_dq)
        if quantized_weight is None:
            continue
        if op == "Gemm":
            if (
                _attr(node, "transA", 0)
                or _attr(node, "alpha", 1.0) != 1.0
                or _attr(node, "beta", 1.0) != 1.0
            ):
                continue
        elif quantized_weight.ndim != 4:
            continue
        layers.append(
            _Layer(
                node, x.name, np.asarray(w.const_value.numpy()).astype(np.float64), quantized_weight, *params
            )
        )
    return layers


def _accumulate(layer: _Layer, x: np.ndarray) -> None:
    q = (
        np.clip(np.round(x / layer.scale) + layer.zero_point, layer.qmin, layer.qmax) - layer.zero_point
    ) * layer.scale
    if op_key(layer.node) == "Gemm":
        rows = x.reshape(-1, x.shape[-1])
        f, qm = rows.mean(axis=0, dtype=np.float64), q.reshape(rows.shape).mean(axis=0, dtype=np.float64)
        n = rows.shape[0]
    else:
        kernel = (layer.weight.shape[2], layer.weight.shape[3])
        fm, qmm = (
            _offset_means(x, layer.node, kernel),
            _offset_means(q.astype(np.float32), layer.node, kernel),
        )
        if fm is None or qmm is None:
            return
        f, qm, n = fm, qmm, x.shape[0]
    layer.sum_float = f * n if layer.sum_float is None else layer.sum_float + f * n
    layer.sum_quant = qm * n if layer.sum_quant is None else layer.sum_quant + qm * n
    layer.rows += n


def _mean_error(layer: _Layer) -> np.ndarray | None:
    if layer.rows == 0 or layer.sum_float is None or layer.sum_quant is None:
        return None
    mf, mq = layer.sum_float / layer.rows, layer.sum_quant / layer.rows
    if op_key(layer.node) == "Gemm":
        trans = _attr(layer.node, "transB", 0)
        w = layer.weight.T if trans else layer.weight
        wq = layer.quantized.T if trans else layer.quantized
        return mq @ wq - mf @ w
    groups = int(_attr(layer.node, "group", 1))
    return _conv_mean(layer.quantized, mq, groups) - _conv_mean(layer.weight, mf, groups)


def correct_biases(
    quantized: ir.Model,
    float_model: ir.Model,
    nodes: set[str],
    samples: Sequence[Mapping[str, np.ndarray]],
    runtime: RuntimeOptions,
) -> dict[str, dict[str, float]]:
    """Shift the int32 bias of each quantized Conv/Gemm in ``nodes``, in place; details per node."""
    layers = _layers(quantized, float_model, nodes)
    if not layers:
        return {}
    names = list(dict.fromkeys(layer.x_name for layer in layers))
    for values in stream_values(float_model, names, samples, runtime, label="bias correction"):
        for layer in layers:
            x = values.get(layer.x_name)
            if x is not None and x.dtype == np.float32:
                _accumulate(layer, x.astype(np.float32))
    done: dict[str, dict[str, float]] = {}
    for layer in layers:
        error = _mean_error(layer)
        bias_dq = _dq(layer.node.inputs[2])
        if error is None or bias_dq is None or not np.isfinite(error).all():
            continue
        codes_value, scale_value = bias_dq.inputs[0], bias_dq.inputs[1]
        assert codes_value is not None and codes_value.const_value is not None
        assert scale_value is not None and scale_value.const_value is not None
        codes = np.asarray(codes_value.const_value.numpy()).astype(np.float64)
        scale = np.broadcast_to(np.asarray(scale_value.const_value.numpy()).astype(np.float64), codes.shape)
        if error.shape != codes.shape:
            continue
        safe = np.where(scale > 0, scale, 1.0)
        shifted = np.where(scale > 0, np.round(codes - error / safe), codes)
        new = np.clip(shifted, _INT32.min, _INT32.max).astype(np.int32)
        codes_value.const_value = ir.Tensor(new, name=codes_value.name)
        bias = dequantized_const(bias_dq)
        done[layer.node.name or ""] = {
            "max_abs_shift": float(f"{np.abs(error).max():.6g}"),
            "mean_abs_shift": float(f"{np.abs(error).mean():.6g}"),
            "max_abs_bias": float(f"{np.abs(bias).max():.6g}") if bias is not None else 0.0,
        }
    return done
