"""Float-model rewrites that ``--mode static`` makes before placing QuantizeLinear/DequantizeLinear.

Each keeps the float model's function (up to float rounding) and makes the quantized one better:

- **Affine folding.** ``Conv -> Mul(c) -> Add(d)`` with constants per output channel (or
  scalars) becomes one Conv: ``W' = c W``, ``b' = c b + d``; an inference BatchNormalization
  is the same with ``c = gamma / sqrt(var + eps)``, ``d = beta - c mean``. onnxruntime folds
  these itself in the float model, but not across the QuantizeLinear that follows a quantized
  Conv, so without this they would run in float on every call (PP-OCRv4's detector has 28
  such pairs, the sample CNN 4 BatchNormalizations), and the Conv's output would be quantized
  before its scale instead of after it.
- **Hard-swish in two ops.** ``x * Clip(x + 3, 0, 6) / 6`` (hard-swish written out, as
  paddle2onnx exports it) becomes ``x * HardSigmoid(x)`` (alpha 1/6, beta 1/2): the same values
  in two passes over the activation instead of four. Between quantized Convs these run in float
  on dequantized tensors, so their cost decides what int8 saves (PP-OCRv4's detector: 24 of
  them, about a fifth of its time).
- **Zero biases** for Conv/Gemm nodes without one, so bias correction has a bias to shift.
- **A bias of its own** for each Conv/Gemm that shares one (tf2onnx exports do): onnxruntime's
  quantizer would copy it under a name that can be another tensor's (:func:`own_biases`).
- **SmoothQuant** (``--smooth ALPHA``, Xiao et al. 2023). An activation ``x`` read by MatMul/Gemm
  nodes with constant weights is divided per input channel ``j`` by::

      s_j = max|x_j|^ALPHA / max|W_j|^(1 - ALPHA)

  and every reader's weight row ``j`` is multiplied by ``s_j`` (``x W = (x / s)(s W)``), which
  moves outlier channels of ``x`` (that would take the whole uint8 range) into the int8
  weights, which have a scale per output channel. ``1 / s`` goes into whatever made ``x`` when
  that is exact: the output columns of a MatMul/Gemm or the scale and bias of a
  LayerNormalization, through Relu and per-channel Add (``relu(a / s) = relu(a) / s`` for
  ``s > 0``), so the activation is small where it is quantized and nothing is added; else one
  ``Mul`` in front of the readers applies it. It is applied only where it lowers the error measured on the calibration
  rows (per-tensor uint8 ``x``, per-channel int8 ``W``, ``|x W - Q(x) Q(W)|^2``) by at least
  ``SMOOTH_MIN_GAIN``; elsewhere it is a no-op and the details say why.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from modelshrink.graph import NameAuthority, name_tail, op_key
from modelshrink.runtime import RuntimeOptions
from modelshrink.techniques.quantize.calibration import stream_values

__all__ = ["SMOOTH_MIN_GAIN", "add_zero_biases", "fold_affine", "fuse_hard_swish", "smooth_quant"]

logger = logging.getLogger(__name__)

# SmoothQuant must cut the measured output error by at least this share to be applied (the
# Mul it adds costs a pass over the activation on every call).
SMOOTH_MIN_GAIN = 0.2
# Rows of each activation kept to measure SmoothQuant's effect (spread over the samples).
SMOOTH_ROWS = 2048


def _float_const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.const_value.dtype != ir.DataType.FLOAT:
        return None
    return np.asarray(value.const_value.numpy())


def _only_user(value: ir.Value) -> tuple[ir.Node, int] | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node, uses[0].idx


def _per_channel(constant: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """A constant that broadcasts along the channel axis (1) of a rank-``rank`` output only."""
    if constant.size == 1:
        return np.full(channels, constant.reshape(()), np.float32)
    if constant.ndim > rank:
        return None
    shape = (1,) * (rank - constant.ndim) + constant.shape
    if shape[1] == channels and all(d == 1 for i, d in enumerate(shape) if i != 1):
        return constant.reshape(channels).astype(np.float32)
    return None


def _set_const(
    model: ir.Model, node: ir.Node, index: int, array: np.ndarray, names: NameAuthority, base: str
) -> None:
    """Give ``node`` input ``index`` a constant of its own holding ``array``."""
    old = node.inputs[index] if index < len(node.inputs) else None
    if old is not None and old.is_initializer() and len(list(old.uses())) == 1 and not old.is_graph_input():
        old.const_value = ir.Tensor(array, name=old.name)
        return
    value = ir.Value(name=names.fresh(base), const_value=ir.Tensor(array, name=None))
    value.const_value.name = value.name  # type: ignore[union-attr]
    model.graph.register_initializer(value)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)


def _batch_norm(node: ir.Node, slot: int, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    """An inference BatchNormalization as ``y = factor * x + shift`` per channel, or None."""
    if op_key(node) != "BatchNormalization" or slot != 0 or len(node.inputs) != 5 or len(node.outputs) != 1:
        return None
    if node.attributes.get_int("training_mode", 0) or node.outputs[0].is_graph_output():
        return None
    params = [_float_const(v) for v in node.inputs[1:]]
    if any(p is None or p.shape != (channels,) for p in params):
        return None
    scale, bias, mean, var = (p.astype(np.float64) for p in params if p is not None)
    factor = scale / np.sqrt(var + node.attributes.get_float("epsilon", 1e-5))
    return factor.astype(np.float32), (bias - mean * factor).astype(np.float32)


def fold_affine(model: ir.Model, names: NameAuthority) -> list[str]:
    """Fold ``Conv -> BatchNormalization/Mul/Add`` (per-channel constants) into the Conv; the Convs."""
    folded: list[str] = []
    for node in list(model.graph):
        if op_key(node) != "Conv" or len(node.inputs) < 2:
            continue
        weight = _float_const(node.inputs[1])
        bias_in = node.inputs[2] if len(node.inputs) > 2 else None
        bias = _float_const(bias_in) if bias_in is not None else None
        if weight is None or weight.ndim < 3 or (bias_in is not None and bias is None):
            continue
        assert node.inputs[1] is not None
        if not node.inputs[1].is_initializer() or len(list(node.inputs[1].uses())) != 1:
            continue
        channels = weight.shape[0]
        w = weight.astype(np.float32).copy()
        b = bias.astype(np.float32).copy() if bias is not None else np.zeros(channels, np.float32)
        out = node.outputs[0]
        absorbed: list[ir.Node] = []
        while (user := _only_user(out)) is not None:
            reader, slot = user
            norm = _batch_norm(reader, slot, channels) if reader.graph is model.graph else None
            if norm is not None:
                factor, shift = norm
                w *= factor.reshape((-1,) + (1,) * (w.ndim - 1))
                b = b * factor + shift
                absorbed.append(reader)
                out = reader.outputs[0]
                continue
            if (
                op_key(reader) not in ("Mul", "Add")
                or len(reader.inputs) != 2
                or reader.graph is not model.graph
            ):
                break
            other = _float_const(reader.inputs[1 - slot])
            vector = _per_channel(other, channels, weight.ndim) if other is not None else None
            if vector is None or reader.outputs[0].is_graph_output():
                break
            if op_key(reader) == "Mul":
                w *= vector.reshape((-1,) + (1,) * (w.ndim - 1))
                b *= vector
            else:
                b += vector
            absorbed.append(reader)
            out = reader.outputs[0]
        if not absorbed:
            continue
        for reader in absorbed:
            ir.convenience.replace_all_uses_with(reader.outputs[0], node.outputs[0])
            model.graph.remove(reader, safe=True)
        _set_const(model, node, 1, w, names, f"{node.name}_weight_folded")
        _set_const(model, node, 2, b, names, f"{node.name}_bias_folded")
        folded.append(node.name or "")
    return folded


def _scalar(value: ir.Value | None) -> float | None:
    array = _float_const(value)
    return float(array.reshape(())) if array is not None and array.size == 1 else None


def _clip_bounds(node: ir.Node) -> tuple[float | None, float | None]:
    if len(node.inputs) >= 3:
        return _scalar(node.inputs[1]), _scalar(node.inputs[2])
    return node.attributes.get_float("min", -np.inf), node.attributes.get_float("max", np.inf)


def fuse_hard_swish(model: ir.Model, names: NameAuthority) -> int:
    """Rewrite ``x * Clip(x + 3, 0, 6) / 6`` as ``x * HardSigmoid(x)``; how many were rewritten."""
    count = 0
    for add in list(model.graph):
        if op_key(add) != "Add" or len(add.inputs) != 2 or add.graph is not model.graph:
            continue
        slot = next((i for i in (0, 1) if _scalar(add.inputs[1 - i]) == 3.0), None)
        x = add.inputs[slot] if slot is not None else None
        clip = _only_user(add.outputs[0])
        if x is None or clip is None or op_key(clip[0]) != "Clip" or clip[1] != 0:
            continue
        if _clip_bounds(clip[0]) != (0.0, 6.0):
            continue
        mul = _only_user(clip[0].outputs[0])
        if mul is None or op_key(mul[0]) != "Mul" or mul[0].inputs[1 - mul[1]] is not x:
            continue
        last = _only_user(mul[0].outputs[0])
        if last is None or last[1] != 0 or last[0].outputs[0].is_graph_output():
            continue
        divisor = _scalar(last[0].inputs[1])
        if divisor is None or not (
            (op_key(last[0]) == "Div" and divisor == 6.0)
            or (op_key(last[0]) == "Mul" and abs(divisor - 1 / 6) < 1e-7)
        ):
            continue
        base = add.name or x.name or "hard_swish"
        gate = ir.Value(name=names.fresh(f"{base}_hard_sigmoid"))
        out = ir.Value(name=names.fresh(f"{base}_hard_swish"))
        nodes = [
            ir.Node(
                "",
                "HardSigmoid",
                [x],
                attributes=[ir.AttrFloat32("alpha", 1 / 6), ir.AttrFloat32("beta", 0.5)],
                outputs=[gate],
                name=names.fresh(f"{base}_HardSigmoid"),
            ),
            ir.Node("", "Mul", [x, gate], outputs=[out], name=names.fresh(f"{base}_HardSwishMul")),
        ]
        model.graph.insert_before(add, nodes)
        ir.convenience.replace_all_uses_with(last[0].outputs[0], out)
        for node in (last[0], mul[0], clip[0], add):
            model.graph.remove(node, safe=True)
        count += 1
    return count


def add_zero_biases(model: ir.Model, ops: Sequence[str], names: NameAuthority, *, excluded: set[str]) -> int:
    """A zero bias for each main-graph Conv/Gemm in ``ops`` with a constant float weight and none."""
    added = 0
    for node in model.graph:
        op = op_key(node)
        if op not in ops or op not in ("Conv", "Gemm") or len(node.inputs) < 2 or node.name in excluded:
            continue
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            continue
        weight = _float_const(node.inputs[1])
        if weight is None or weight.ndim < 2:
            continue
        if op == "Gemm":
            if node.attributes.get_int("transA", 0) or weight.ndim != 2:
                continue
            channels = weight.shape[0] if node.attributes.get_int("transB", 0) else weight.shape[1]
        else:
            channels = weight.shape[0]
        _set_const(model, node, 2, np.zeros(channels, np.float32), names, _bias_name(node))
        added += 1
    return added


def _bias_name(node: ir.Node) -> str:
    return name_tail(f"{node.name}_bias")


def own_biases(model: ir.Model, ops: Sequence[str], names: NameAuthority, *, excluded: set[str]) -> int:
    """Give each main-graph Conv/Gemm in ``ops`` that shares its bias initializer a copy of its own.

    Each node's int32 bias has its own scale, so onnxruntime's quantizer copies a shared bias,
    naming the copy ``NAME`` plus a number it checks only against initializer names: in
    basic-pitch's ``nmp.onnx`` (tf2onnx), bias ``.../conv1d_25`` became ``.../conv1d_252``,
    the name of a Conv's output, and the graph read the bias where that output was (a model
    onnxruntime refuses). Copies named here are fresh among every name in the model.
    """
    copied = 0
    for node in model.graph:
        op = op_key(node)
        if op not in ops or op not in ("Conv", "Gemm") or node.name in excluded or len(node.inputs) < 3:
            continue
        bias = node.inputs[2]
        if bias is None or not bias.is_initializer() or len(list(bias.uses())) < 2:
            continue
        array = _float_const(bias)
        if array is None:
            continue
        _set_const(model, node, 2, array.copy(), names, _bias_name(node))
        copied += 1
    return copied


def _readers(model: ir.Model, ops: Sequence[str], excluded: set[str]) -> dict[str, list[ir.Node]]:
    """Activation name -> the MatMul/Gemm nodes reading it as input 0 with a 2-D float weight."""
    groups: dict[str, list[ir.Node]] = {}
    for node in model.graph:
        op = op_key(node)
        if op not in ops or op not in ("MatMul", "Gemm") or node.name in excluded or len(node.inputs) < 2:
            continue
        x, weight = node.inputs[0], _float_const(node.inputs[1])
        if x is None or not x.name or x.const_value is not None or weight is None or weight.ndim != 2:
            continue
        if op == "Gemm" and (
            node.attributes.get_int("transA", 0) != 0 or node.attributes.get_float("alpha", 1.0) <= 0
        ):
            continue
        groups.setdefault(x.name, []).append(node)
    return groups


def _kn(node: ir.Node) -> np.ndarray:
    """The weight as ``[K, N]`` (input channels first)."""
    weight = _float_const(node.inputs[1])
    assert weight is not None
    return weight.T if op_key(node) == "Gemm" and node.attributes.get_int("transB", 0) != 0 else weight


def _fake_quant_error(x: np.ndarray, w: np.ndarray) -> float:
    """``mean |x w - Q(x) Q(w)|^2``: uint8 per-tensor minmax ``x``, int8 per-column ``w``."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255 or 1.0
    zp = round(-lo / scale)
    xq = (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale
    ws = np.abs(w).max(axis=0) / 127
    ws[ws == 0] = 1.0
    wq = np.clip(np.round(w / ws), -127, 127) * ws
    return float(np.mean((x @ w - xq @ wq) ** 2))


def _divide_columns(model: ir.Model, node: ir.Node, s: np.ndarray, names: NameAuthority) -> bool:
    """Divide the output channels (last axis) of a MatMul/Gemm/LayerNormalization by ``s``."""
    op = op_key(node)
    if op == "LayerNormalization":
        if node.attributes.get_int("axis", -1) != -1:
            return False
        scale = _float_const(node.inputs[1])
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        bias = _float_const(node.inputs[2]) if has_bias else None
        if scale is None or scale.shape != s.shape or (has_bias and bias is None):
            return False
        _set_const(model, node, 1, (scale / s).astype(np.float32), names, f"{node.name}_scale_smoothed")
        if bias is not None:
            _set_const(model, node, 2, (bias / s).astype(np.float32), names, f"{node.name}_bias_smoothed")
        return True
    weight = _float_const(node.inputs[1]) if len(node.inputs) > 1 else None
    if op not in ("MatMul", "Gemm") or weight is None or weight.ndim != 2:
        return False
    trans = op == "Gemm" and node.attributes.get_int("transB", 0) != 0
    if (op == "Gemm" and node.attributes.get_int("transA", 0) != 0) or weight.shape[
        0 if trans else 1
    ] != s.size:
        return False
    has_bias = op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None
    bias = _float_const(node.inputs[2]) if has_bias else None
    if has_bias and (bias is None or bias.size not in (1, s.size)):
        return False
    out = weight / s[:, None] if trans else weight / s[None, :]
    _set_const(model, node, 1, out.astype(np.float32), names, f"{node.name}_weight_smoothed_out")
    if bias is not None:
        full = np.broadcast_to(bias.reshape(-1), s.shape) / s
        _set_const(model, node, 2, full.astype(np.float32), names, f"{node.name}_bias_smoothed_out")
    return True


def _fold_inverse(
    model: ir.Model, x: ir.Value, readers: list[ir.Node], s: np.ndarray, names: NameAuthority
) -> str | None:
    """Divide ``x`` by ``s`` inside the nodes that make it; the node it went into, or None.

    Walks back through Relu and Add of a per-channel constant to a MatMul, Gemm or
    LayerNormalization, every value on the way read by the next step only (so nothing else
    sees the change). Nothing is modified when it fails.
    """
    value: ir.Value | None = x
    allowed = {id(n) for n in readers}
    adds: list[tuple[ir.Node, int]] = []  # Adds whose constant is divided too
    for _ in range(8):
        if value is None or value.is_graph_output() or value.is_graph_input():
            return None
        if any(id(u.node) not in allowed for u in value.uses()):
            return None
        producer = value.producer()
        if producer is None or producer.graph is not model.graph:
            return None
        op = op_key(producer)
        if op == "Relu":
            value, allowed = producer.inputs[0], {id(producer)}
            continue
        if op == "Add" and len(producer.inputs) == 2:
            slot = next((i for i in (0, 1) if _float_const(producer.inputs[i]) is not None), None)
            const = _float_const(producer.inputs[slot]) if slot is not None else None
            if slot is None or const is None or (const.ndim and const.shape[-1] not in (1, s.size)):
                return None
            if any(d != 1 for d in const.shape[:-1]):
                return None
            adds.append((producer, slot))
            value, allowed = producer.inputs[1 - slot], {id(producer)}
            continue
        if op in ("MatMul", "Gemm", "LayerNormalization") and _divide_columns(model, producer, s, names):
            for add, slot in adds:
                const = _float_const(add.inputs[slot])
                assert const is not None
                full = (
                    np.broadcast_to(const, (*const.shape[:-1], s.size))
                    if const.ndim
                    else np.full(s.size, const)
                )
                _set_const(model, add, slot, (full / s).astype(np.float32), names, f"{add.name}_smoothed")
            return producer.name or op
        return None
    return None


def smooth_quant(
    model: ir.Model,
    alpha: float,
    *,
    ops: Sequence[str],
    excluded: set[str],
    samples: Sequence[Mapping[str, np.ndarray]],
    runtime: RuntimeOptions,
    names: NameAuthority,
) -> dict[str, dict[str, object]]:
    """Apply SmoothQuant where it helps; ``{node name: details}`` for every MatMul/Gemm considered."""
    groups = _readers(model, ops, excluded)
    if not groups:
        return {}
    peaks: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {name: [] for name in groups}
    per_sample = max(1, SMOOTH_ROWS // max(1, len(samples)))
    for values in stream_values(model, list(groups), samples, runtime, label="SmoothQuant statistics"):
        for name, array in values.items():
            if array.dtype != np.float32 or array.ndim < 1:
                continue
            flat = array.reshape(-1, array.shape[-1])
            peak = np.abs(flat).max(axis=0)
            peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
            rows[name].append(flat[:: max(1, flat.shape[0] // per_sample)][:per_sample])
    details: dict[str, dict[str, object]] = {}
    for name, readers in groups.items():
        if name not in peaks:
            continue
        x_peak = peaks[name].astype(np.float64)
        weights = [_kn(n) for n in readers]
        if any(w.shape[0] != x_peak.size for w in weights):
            continue
        w_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
        s = np.ones_like(x_peak)
        ok = (x_peak > 0) & (w_peak > 0)
        s[ok] = x_peak[ok] ** alpha / w_peak[ok] ** (1 - alpha)
        s = np.clip(s, 1e-5, 1e5).astype(np.float32)
        x = np.concatenate(rows[name]).astype(np.float32)
        before = sum(_fake_quant_error(x, w) for w in weights)
        after = sum(_fake_quant_error(x / s, w * s[:, None]) for w in weights)
        ratio = after / before if before > 0 else 1.0
        applied = ratio <= 1 - SMOOTH_MIN_GAIN
        outlier = float(x_peak.max() / max(np.median(x_peak), 1e-12))
        for node in readers:
            details[node.name or ""] = {
                "alpha": alpha,
                "applied": applied,
                "error_ratio": round(ratio, 4),
                "outlier_ratio": round(outlier, 2),
            }
        if not applied:
            continue
        x_value = readers[0].inputs[0]
        assert x_value is not None
        for node, w in zip(readers, weights, strict=True):
            scaled = w * s[:, None]
            stored = (
                scaled.T if op_key(node) == "Gemm" and node.attributes.get_int("transB", 0) != 0 else scaled
            )
            _set_const(
                model,
                node,
                1,
                np.ascontiguousarray(stored, np.float32),
                names,
                f"{node.name}_weight_smoothed",
            )
        into = _fold_inverse(model, x_value, readers, s, names)
        for node in readers:
            details[node.name or ""]["inverse_in"] = into or "Mul"
        if into is not None:
            continue
        inverse = ir.Value(name=names.fresh(f"{name}_smooth_inverse"), const_value=ir.Tensor(1 / s))
        inverse.const_value.name = inverse.name  # type: ignore[union-attr]
        model.graph.register_initializer(inverse)
        smoothed = ir.Value(name=names.fresh(f"{name}_smoothed"))
        mul = ir.Node(
            "", "Mul", [x_value, inverse], outputs=[smoothed], name=names.fresh(f"{name}_smooth_mul")
        )
        first = min(readers, key=lambda n: model.graph.index(n))
        model.graph.insert_before(first, [mul])
        for node in readers:
            node.replace_input_with(0, smoothed)
    return details
