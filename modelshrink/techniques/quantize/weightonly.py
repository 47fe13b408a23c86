"""Weight-only int8 and int4: rewrite planned weights in a (cloned) model, in place.

int8 (per output channel ``c``, symmetric)::

    s_c = max|W_c| / 127          (1 where a channel is all zeros)
    q   = clip(round(W / s_c), -127, 127)    stored as int8
    W'  = q * s_c                 computed at run time by DequantizeLinear(q, s, axis)

LSTM/GRU/RNN weights ``W [directions, gates x hidden, input]`` and ``R [directions, gates x
hidden, hidden]`` get one scale per direction and gate row: they are quantized as rows
``[directions x gates x hidden, K]`` (biases ``B`` and initial states stay float). Cast + Mul
reads scales ``[directions, gates x hidden, 1]``; DequantizeLinear, which has a single axis,
takes axis 1 for one direction and, for two, dequantizes the ``[2 x gates x hidden, K]`` rows
and a ``Reshape`` restores the weight's shape.

The dequantized tensor keeps the weight's name, so every reader is unchanged. Where the
model's opset has no per-axis ``DequantizeLinear`` (< 13), or none for the weight's float type
(float16/bfloat16 scales need opset 19), the same values come from ``Cast(q) * s`` instead; the
opset is never raised for int8. Embedding tables read only by ``Gather`` are gathered in int8
first and only the gathered rows are scaled (``Gather(q, ids) -> Cast -> Mul(Gather(s, ids))``),
so a large vocabulary is not dequantized on every run.

int4 (blocks of ``B`` values along the reduction axis, symmetric, the block's largest
magnitude mapped to -8 as onnxruntime does)::

    s_b = m_b / -8,  m_b = the signed value of largest magnitude in block b
    q   = clip(round(W / s_b), -8, 7)

``--format nbits`` stores ``q + 8`` two per byte in onnxruntime's ``MatMulNBits`` /
``GatherBlockQuantized`` layouts; ``--format qdq`` stores an INT4 tensor read by an opset-21
block-wise ``DequantizeLinear``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from modelshrink.graph import NameAuthority, dtype_name
from modelshrink.runtime import runs_qdq
from modelshrink.techniques.base import Change, Skip
from modelshrink.techniques.quantize.plan import Unit

__all__ = [
    "Emitted",
    "Int8Weight",
    "block_int4",
    "default_opset",
    "quantize_int4",
    "quantize_int8",
    "symmetric_int8",
]

logger = logging.getLogger(__name__)

# Quantize large tensors in slices of this many elements to bound temporary memory.
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Emitted:
    """What weight-only quantization did to the model."""

    changes: tuple[Change, ...]
    storages: frozenset[str]
    skipped: tuple[Skip, ...] = ()


NON_FINITE_REASON = "has NaN or infinite values, which no integer grid holds; left in float"


def weight_change(
    model: ir.Model,
    unit: Unit,
    what: str,
    *,
    storage: str,
    bytes_after: float,
    snr: float | None,
    dtype: ir.DataType | None = None,
    **extra: object,
) -> Change:
    """The report's entry for one quantized weight: what it became, its bytes and its SNR."""
    w = unit.weight
    return Change(
        node=unit.layer,
        op_type=unit.op_type,
        what=what,
        params_before=w.size,
        params_after=w.size,
        details={
            "weight": w.name,
            "dtype": dtype_name(dtype if dtype is not None else w.dtype),
            "shape": list(w.shape),
            **extra,
            "storage": storage,
            "bytes_before": w.nbytes,
            "bytes_after": int(bytes_after),
            "weight_snr_db": snr,
            "location": w.kind if w.graph is model.graph else f"{w.kind} in subgraph {w.graph.name}",
        },
    )


class NonFiniteWeightError(ValueError):
    """A weight holds NaN or infinity: it is left in float (a skip, not a failure)."""


def default_opset(model: ir.Model) -> int:
    """The model's ai.onnx opset version."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def _float32(arr: np.ndarray) -> np.ndarray:
    return np.asarray(arr, dtype=np.float32)


def _row_chunks(arr: np.ndarray) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` slices along axis 0 of at most ~_CHUNK_ELEMENTS elements each."""
    rows = arr.shape[0] if arr.ndim else 1
    per_row = max(1, arr.size // max(1, rows))
    step = max(1, _CHUNK_ELEMENTS // per_row)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _absmax(arr: np.ndarray, axis: int | None) -> np.ndarray:
    """max |arr| per slice along ``axis`` (a scalar array for None), in float32, by row chunks."""
    if arr.ndim == 0:
        return np.abs(np.asarray(arr, np.float32))
    others = tuple(i for i in range(arr.ndim) if i != axis)
    if axis is None:
        best = np.float32(0)
        for start, stop in _row_chunks(arr):
            best = max(best, np.abs(_float32(arr[start:stop])).max(initial=0))
        return np.asarray(best, dtype=np.float32)
    if axis == 0:
        out = np.empty(arr.shape[0], dtype=np.float32)
        for start, stop in _row_chunks(arr):
            out[start:stop] = np.abs(_float32(arr[start:stop])).max(axis=others, initial=0)
        return out
    acc = np.zeros(arr.shape[axis], dtype=np.float32)
    for start, stop in _row_chunks(arr):
        np.maximum(acc, np.abs(_float32(arr[start:stop])).max(axis=others, initial=0), out=acc)
    return acc


def _bshape(ndim: int, axis: int | None) -> tuple[int, ...]:
    """Broadcast shape of a per-axis vector against an ``ndim`` tensor."""
    if axis is None:
        return ()
    return tuple(-1 if i == axis else 1 for i in range(ndim))


@dataclass(frozen=True)
class Int8Weight:
    """A weight quantized to int8: values, scales (rounded to the weight's type), and its SNR."""

    q: np.ndarray
    scale: np.ndarray
    snr_db: float | None


def symmetric_int8(arr: np.ndarray, axis: int | None, scale_dtype: np.dtype) -> Int8Weight:
    """Symmetric int8 quantization per slice along ``axis`` (per tensor for None).

    Works through ``arr`` in row chunks (it may be a memory-mapped external tensor), and
    measures the quantization's signal-to-noise ratio on the way.
    """
    amax = _absmax(arr, axis)
    # a channel of denormals would round its scale to 0: the smallest positive scale instead
    scale = np.maximum((amax / np.float32(127)).astype(scale_dtype), np.finfo(scale_dtype).smallest_subnormal)
    scale = np.where(amax > 0, scale, np.ones_like(scale))
    s32 = _float32(scale).reshape(_bshape(arr.ndim, axis))
    q = np.empty(arr.shape, dtype=np.int8)
    signal = noise = 0.0
    if arr.ndim == 0:
        chunks: Iterator[tuple[int, int]] = iter([(0, 1)])
    else:
        chunks = _row_chunks(arr)
    if not np.isfinite(amax).all():
        raise NonFiniteWeightError(NON_FINITE_REASON)
    # |w| / scale peaks at amax / scale (the same float32 division): only a scale rounded
    # below amax / 127 (float16 scales, denormal channels) can round past 127. Clipping a
    # whole weight costs half as much as dividing it, so it is done only when it can matter.
    clip = bool((amax / s32.reshape(amax.shape) >= np.float32(127.5)).any())
    for start, stop in chunks:
        part = _float32(arr[start:stop] if arr.ndim else arr)
        s = s32[start:stop] if axis == 0 else s32
        scaled = part / s
        rounded = np.rint(scaled)
        if clip:
            np.clip(rounded, -127, 127, out=rounded)
        if arr.ndim:
            q[start:stop] = rounded
        else:
            q[...] = rounded
        scaled -= rounded
        scaled *= s  # the error, in the weight's units
        flat_err, flat_part = scaled.reshape(-1), part.reshape(-1)
        with np.errstate(over="ignore"):  # weights near float32's limit: no SNR, no warning
            noise += float(np.dot(flat_err, flat_err))
            signal += float(np.dot(flat_part, flat_part))
    finite = math.isfinite(signal) and math.isfinite(noise)
    snr = round(10 * math.log10(signal / noise), 2) if finite and noise > 0 and signal > 0 else None
    return Int8Weight(q, scale, snr)


def _snr_db(original: np.ndarray, restored: np.ndarray) -> float | None:
    """Signal-to-noise ratio of a weight's quantization, in dB (None when exact)."""
    ref = _float32(original).reshape(-1)
    # weights near float32's limit, or inf kept as inf (bfloat16): no SNR, no warning
    with np.errstate(over="ignore", invalid="ignore"):
        err = _float32(restored).reshape(-1) - ref
        noise = float(np.dot(err, err))
        signal = float(np.dot(ref, ref))
    if noise == 0 or not math.isfinite(noise) or not math.isfinite(signal):
        return None
    return round(10 * math.log10(signal / noise), 2) if signal > 0 else None


def _release(tensor: ir.TensorProtocol) -> None:
    """Unmap an external tensor's pages once read (it maps itself again if read later)."""
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):  # an array still views it: leave it mapped
            tensor.release()


def _value(names: NameAuthority, base: str, dtype: ir.DataType, shape: Sequence[int]) -> ir.Value:
    return ir.Value(name=names.fresh(base), type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))


def _dequantize_node(
    q_value: ir.Value, s_value: ir.Value, attrs: list[ir.Attr], out: ir.Value, name: str
) -> ir.Node:
    """``DequantizeLinear(q, scale)`` writing ``out`` (per axis, or per block with ``block_size``)."""
    return ir.Node("", "DequantizeLinear", [q_value, s_value], attrs, outputs=[out], name=name)


def _initializer(graph: ir.Graph, names: NameAuthority, base: str, array: np.ndarray) -> ir.Value:
    name = names.fresh(base)
    tensor = ir.Tensor(array, name=name)
    value = ir.Value(name=name, const_value=tensor)
    graph.register_initializer(value)
    return value


def _constant(names: NameAuthority, base: str, array: np.ndarray) -> tuple[ir.Node, ir.Value]:
    name = names.fresh(base)
    tensor = ir.Tensor(array, name=name)
    out = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape)
    node = ir.Node(
        "",
        "Constant",
        [],
        [ir.AttrTensor("value", tensor)],
        outputs=[out],
        name=names.fresh(f"{base}_Constant"),
    )
    return node, out


class _Writer:
    """Places new nodes: after a Constant weight's node, else before the graph's first node."""

    def __init__(self) -> None:
        self._anchors: dict[int, ir.Node] = {}

    def place(self, graph: ir.Graph, nodes: Sequence[ir.Node], after: ir.Node | None) -> None:
        if after is not None:
            graph.insert_after(after, list(nodes))
            return
        anchor = self._anchors.get(id(graph))
        if anchor is None:
            # the first node that is not a Constant (Constant weights may be removed later)
            anchor = next((n for n in graph if n.op_type != "Constant"), graph.node(0))
            self._anchors[id(graph)] = anchor
        graph.insert_before(anchor, list(nodes))


def _store_quantized(
    unit: Unit, names: NameAuthority, q: np.ndarray, writer: _Writer
) -> tuple[ir.Value, ir.Node | None]:
    """Put ``q`` where the weight was (initializer or Constant); return its value and the Constant node."""
    w = unit.weight
    base = f"{w.name}_quantized"
    if w.kind == "constant":
        assert w.node is not None
        node, value = _constant(names, base, q)
        writer.place(w.graph, [node], after=w.node)
        return value, node
    return _initializer(w.graph, names, base, q), None


def _retire(unit: Unit, replacement: ir.Value) -> None:
    """Point every reader of the float weight at ``replacement``, drop the float tensor, keep its name."""
    w = unit.weight
    old, name = w.value, w.name
    old.replace_all_uses_with(replacement)
    if w.kind == "initializer":
        w.graph.initializers.pop(old.name or "", None)
    else:
        assert w.node is not None
        w.graph.remove(w.node, safe=True)
    replacement.name = name


def _emit_dq(
    unit: Unit,
    names: NameAuthority,
    writer: _Writer,
    q: np.ndarray,
    scale: np.ndarray,
    *,
    per_axis_dq: bool,
) -> str:
    """A DequantizeLinear (or Cast + Mul) in front of the weight's readers."""
    w = unit.weight
    axis = unit.axis
    graph = w.graph
    # recurrent weights of two directions: DequantizeLinear's one axis cannot hold a scale per
    # direction and gate row, so the rows are dequantized flat and reshaped
    flat = per_axis_dq and unit.merged_rows and q.shape[0] > 1
    q_value, const_node = _store_quantized(unit, names, q.reshape(-1, q.shape[-1]) if flat else q, writer)
    out = _value(names, f"{w.name}_dequantized", w.dtype, w.shape)

    def const(base: str, array: np.ndarray) -> tuple[ir.Value, list[ir.Node]]:
        if const_node is not None:
            node, value = _constant(names, base, array)
            return value, [node]
        return _initializer(graph, names, base, array), []

    if per_axis_dq:
        scale_arr = scale if axis is not None else scale.reshape(())
        s_value, nodes = const(f"{w.name}_scale", scale_arr)
        attrs = [ir.AttrInt64("axis", 0 if flat else axis)] if axis is not None else []
        rows = (
            _value(names, f"{w.name}_rows", w.dtype, (q.shape[0] * q.shape[1], q.shape[-1])) if flat else out
        )
        nodes.append(
            _dequantize_node(q_value, s_value, attrs, rows, names.fresh(f"{w.name}_DequantizeLinear"))
        )
        if flat:
            shape_value, shape_nodes = const(f"{w.name}_shape", np.asarray(w.shape, np.int64))
            nodes += shape_nodes
            nodes.append(
                ir.Node(
                    "", "Reshape", [rows, shape_value], outputs=[out], name=names.fresh(f"{w.name}_Reshape")
                )
            )
        storage = "DequantizeLinear"
    else:
        if unit.merged_rows:
            scale_arr = scale.reshape((*q.shape[:2], *([1] * (q.ndim - 2))))
        elif axis is not None:
            scale_arr = scale.reshape(_bshape(q.ndim, axis))
        else:
            scale_arr = scale.reshape(())
        s_value, nodes = const(f"{w.name}_scale", scale_arr)
        cast_out = _value(names, f"{w.name}_cast", w.dtype, w.shape)
        nodes.append(
            ir.Node(
                "",
                "Cast",
                [q_value],
                [ir.AttrInt64("to", int(w.dtype))],
                outputs=[cast_out],
                name=names.fresh(f"{w.name}_Cast"),
            )
        )
        nodes.append(
            ir.Node("", "Mul", [cast_out, s_value], outputs=[out], name=names.fresh(f"{w.name}_Mul"))
        )
        storage = "Cast+Mul"
    writer.place(graph, nodes, after=const_node)
    _retire(unit, out)
    return storage


def _emit_gather_first(
    unit: Unit, names: NameAuthority, writer: _Writer, q: np.ndarray, scale: np.ndarray
) -> str:
    """Each Gather reads int8 rows; only the gathered rows are scaled (Cast + Mul)."""
    w = unit.weight
    axis = unit.axis
    graph_of_weight = w.graph
    q_value, const_node = _store_quantized(unit, names, q, writer)
    # [V, 1, ...]: gathering rows gives ids.shape + [1, ...], which broadcasts over the rows.
    scale_arr = scale.reshape((-1,) + (1,) * (q.ndim - 1 - axis)) if axis is not None else scale.reshape(())
    if const_node is not None:
        s_node, s_value = _constant(names, f"{w.name}_scale", scale_arr)
        graph_of_weight.insert_after(const_node, [s_node])
    else:
        s_value = _initializer(graph_of_weight, names, f"{w.name}_scale", scale_arr)
    for use in unit.uses:
        node = use.node
        graph = node.graph
        assert graph is not None
        ids = node.inputs[1]
        out = node.outputs[0]
        name = out.name or ""
        final = ir.Value(name=None, type=out.type, shape=out.shape)
        out.replace_all_uses_with(final, replace_graph_outputs=True)
        out.name = names.fresh(f"{name}_int8")
        out.type = ir.TensorType(ir.DataType.INT8)
        node.replace_input_with(0, q_value)
        cast_out = ir.Value(name=names.fresh(f"{name}_cast"), type=final.type, shape=final.shape)
        new_nodes = [
            ir.Node(
                "",
                "Cast",
                [out],
                [ir.AttrInt64("to", int(w.dtype))],
                outputs=[cast_out],
                name=names.fresh(f"{node.name}_Cast"),
            )
        ]
        if axis is not None:
            rows = ir.Value(name=names.fresh(f"{name}_scale"), type=ir.TensorType(w.dtype))
            new_nodes.insert(
                0,
                ir.Node(
                    "",
                    "Gather",
                    [s_value, ids],
                    [ir.AttrInt64("axis", 0)],
                    outputs=[rows],
                    name=names.fresh(f"{node.name}_scale"),
                ),
            )
        else:
            rows = s_value
        new_nodes.append(
            ir.Node("", "Mul", [cast_out, rows], outputs=[final], name=names.fresh(f"{node.name}_Mul"))
        )
        graph.insert_after(node, new_nodes)
        final.name = name
    # the float table has no readers left
    if w.kind == "initializer":
        graph_of_weight.initializers.pop(w.value.name or "", None)
    else:
        assert w.node is not None
        graph_of_weight.remove(w.node, safe=True)
    return "Gather+Cast+Mul"


def _int8_view(arr: np.ndarray, unit: Unit) -> tuple[np.ndarray, int | None]:
    """The array and axis that give one int8 scale per channel (per direction and gate row for
    recurrent weights: ``[directions x gates x hidden, K]``, axis 0)."""
    if unit.merged_rows:
        return arr.reshape(-1, arr.shape[-1]), 0
    return arr, unit.axis


def quantize_int8(
    model: ir.Model,
    units: Sequence[Unit],
    names: NameAuthority,
    *,
    cast: bool = False,
    fixed: Mapping[str, Int8Weight] | None = None,
) -> Emitted:
    """Quantize ``units`` (planned on this very model) to int8 in place.

    Args:
        model: The model the units were planned on (modified).
        units: What to quantize.
        names: Fresh names.
        cast: Rebuild weights with ``Cast + Mul`` even where ``DequantizeLinear`` is available.
        fixed: Values and scales to store instead of rounding to nearest, by weight name
            (``--method gptq`` / ``awq``).
    """
    opset = default_opset(model)
    writer = _Writer()
    changes: list[Change] = []
    storages: set[str] = set()
    skipped: list[Skip] = []
    for unit in units:
        w = unit.weight
        dtype = w.dtype
        given = fixed.get(w.name) if fixed is not None else None
        try:
            quantized = (
                given
                if given is not None
                else symmetric_int8(*_int8_view(w.numpy(), unit), np.dtype(dtype.numpy()))
            )
        except NonFiniteWeightError as exc:
            skipped.append(Skip(unit.layer, unit.op_type, f"'{w.name}': {exc}"))
            continue
        finally:
            _release(w.tensor)
        q, scale, snr = quantized.q.reshape(w.shape), quantized.scale, quantized.snr_db
        gather_only = all(u.kind == "gather" for u in unit.uses)
        dq_ok = (
            not cast
            and opset >= (13 if unit.axis is not None else 10)
            and (dtype == ir.DataType.FLOAT or opset >= 19)
            and runs_qdq(opset)
        )
        if gather_only:
            storage = _emit_gather_first(unit, names, writer, q, scale)
        else:
            storage = _emit_dq(unit, names, writer, q, scale, per_axis_dq=dq_ok)
        storages.add(storage)
        granularity = (
            "per-tensor"
            if unit.axis is None
            else "per direction and gate row"
            if unit.merged_rows
            else f"per-channel axis {unit.axis}"
        )
        changes.append(
            weight_change(
                model,
                unit,
                f"int8 {granularity} ({storage})",
                storage=storage,
                bytes_after=q.nbytes + scale.nbytes,
                snr=snr,
                dtype=dtype,
                axis=unit.axis,
            )
        )
        logger.debug("int8 %s (%s) via %s", w.name, unit.layer, storage)
    return Emitted(tuple(changes), frozenset(storages), tuple(skipped))


# --- int4 ----------------------------------------------------------------------------------------

MS_DOMAIN = "com.microsoft"


def block_int4(wt: np.ndarray, block_size: int, scale_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 per block of ``block_size`` along the last axis of a 2-D ``wt[N, K]``.

    The value of largest magnitude in each block maps to -8 (``scale = m / -8``), as
    onnxruntime's own quantizer does, so all 16 levels are used.

    Returns:
        ``(q, scale)``: int8 values in [-8, 7] of shape ``[N, blocks * block_size]`` (zero
        padded), and scales ``[N, blocks]`` rounded to ``scale_dtype``.
    """
    n, k = wt.shape
    blocks = -(-k // block_size)
    q = np.zeros((n, blocks * block_size), dtype=np.int8)
    scales = np.zeros((n, blocks), dtype=scale_dtype)
    step = max(1, _CHUNK_ELEMENTS // max(1, blocks * block_size))
    for start in range(0, n, step):
        rows = _float32(wt[start : start + step])
        padded = np.zeros((rows.shape[0], blocks * block_size), dtype=np.float32)
        padded[:, :k] = rows
        b = padded.reshape(rows.shape[0], blocks, block_size)
        pick = np.abs(b).argmax(axis=2)[..., None]
        s = (np.take_along_axis(b, pick, axis=2)[..., 0] / np.float32(-8)).astype(scale_dtype)
        s32 = _float32(s)[..., None]
        safe = np.where(s32 == 0, np.float32(1), s32)
        qb = np.where(s32 == 0, 0, np.clip(np.rint(b / safe), -8, 7))
        q[start : start + step] = qb.reshape(rows.shape[0], -1)
        scales[start : start + step] = s
    return q, scales


def _pack_uint4(values: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte along the last axis, low nibble first (onnxruntime's layout)."""
    v = values.astype(np.uint8)
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros((*v.shape[:-1], 1), np.uint8)], axis=-1)
    return (v[..., 0::2] & 0xF) | ((v[..., 1::2] & 0xF) << 4)


def _dequant_int4(q: np.ndarray, scales: np.ndarray, block_size: int, k: int) -> np.ndarray:
    s = np.repeat(_float32(scales), block_size, axis=1)
    return (q.astype(np.float32) * s)[:, :k]


def _replace_node(node: ir.Node, new_nodes: Sequence[ir.Node], result: ir.Value) -> None:
    """Put ``new_nodes`` where ``node`` was; ``result`` takes over its output (name included)."""
    graph = node.graph
    assert graph is not None
    out = node.outputs[0]
    name = out.name
    result.type, result.shape = out.type, out.shape
    out.replace_all_uses_with(result, replace_graph_outputs=True)
    graph.insert_before(node, list(new_nodes))
    graph.remove(node, safe=True)
    result.name = name


def _int4_nbits_matmul(
    unit: Unit,
    names: NameAuthority,
    q: np.ndarray,
    scales: np.ndarray,
    n: int,
    k: int,
    block_size: int,
    accuracy_level: int,
) -> None:
    w = unit.weight
    graph = w.graph
    packed = _pack_uint4((q + 8).astype(np.uint8)).reshape(n, -1, block_size // 2)
    b_value = _initializer(graph, names, f"{w.name}_int4", packed)
    s_value = _initializer(graph, names, f"{w.name}_scales", scales.reshape(-1))
    for use in unit.uses:
        node = use.node
        attrs = [
            ir.AttrInt64("K", k),
            ir.AttrInt64("N", n),
            ir.AttrInt64("bits", 4),
            ir.AttrInt64("block_size", block_size),
            ir.AttrInt64("accuracy_level", accuracy_level),
        ]
        base = node.name or "MatMul"
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        out = ir.Value(name=names.fresh(f"{base}_nbits"))
        new = [
            ir.Node(
                MS_DOMAIN,
                "MatMulNBits",
                [node.inputs[0], b_value, s_value],
                attrs,
                outputs=[out],
                name=names.fresh(f"{base}_MatMulNBits"),
            )
        ]
        result = out
        if bias is not None:
            result = ir.Value(name=names.fresh(f"{base}_bias"))
            new.append(ir.Node("", "Add", [out, bias], outputs=[result], name=names.fresh(f"{base}_Add")))
        _replace_node(node, new, result)
    _drop_float(unit)


def _int4_nbits_gather(
    unit: Unit, names: NameAuthority, q: np.ndarray, scales: np.ndarray, d: int, block_size: int
) -> None:
    w = unit.weight
    graph = w.graph
    packed = _pack_uint4((q[:, :d] + 8).astype(np.uint8))
    data = _initializer(graph, names, f"{w.name}_int4", packed)
    s_value = _initializer(graph, names, f"{w.name}_scales", scales)
    for use in unit.uses:
        node = use.node
        attrs = [
            ir.AttrInt64("gather_axis", 0),
            ir.AttrInt64("quantize_axis", 1),
            ir.AttrInt64("block_size", block_size),
            ir.AttrInt64("bits", 4),
        ]
        base = node.name or "Gather"
        out = ir.Value(name=names.fresh(f"{base}_int4"))
        new = ir.Node(
            MS_DOMAIN,
            "GatherBlockQuantized",
            [data, node.inputs[1], s_value],
            attrs,
            outputs=[out],
            name=names.fresh(f"{base}_GatherBlockQuantized"),
        )
        _replace_node(node, [new], out)
    _drop_float(unit)


def _drop_float(unit: Unit) -> None:
    """Remove the float weight once nothing reads it."""
    w = unit.weight
    if w.value.uses():
        return
    if w.kind == "initializer":
        w.graph.initializers.pop(w.value.name or "", None)
    elif w.node is not None:
        w.graph.remove(w.node, safe=True)


def _int4_qdq(
    unit: Unit,
    names: NameAuthority,
    writer: _Writer,
    q_layout: np.ndarray,
    s_layout: np.ndarray,
    axis: int,
    block_size: int,
) -> None:
    """A block-wise opset-21 DequantizeLinear of an INT4 tensor in front of the readers."""
    w = unit.weight
    q_value, const_node = _store_quantized(unit, names, q_layout.astype(ml_dtypes.int4), writer)
    out = _value(names, f"{w.name}_dequantized", w.dtype, w.shape)
    if const_node is not None:
        s_node, s_value = _constant(names, f"{w.name}_scale", s_layout)
        nodes = [s_node]
    else:
        s_value, nodes = _initializer(w.graph, names, f"{w.name}_scale", s_layout), []
    attrs = [ir.AttrInt64("axis", axis), ir.AttrInt64("block_size", block_size)]
    nodes.append(_dequantize_node(q_value, s_value, attrs, out, names.fresh(f"{w.name}_DequantizeLinear")))
    writer.place(w.graph, nodes, after=const_node)
    _retire(unit, out)


def quantize_int4(
    model: ir.Model,
    units: Sequence[Unit],
    names: NameAuthority,
    *,
    block_size: int,
    fmt: str,
    accuracy_level: int,
    fixed: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> Emitted:
    """Quantize ``units`` (planned on this very model, 2-D weights) to block-wise int4 in place.

    Args:
        model: The model (modified); for ``qdq`` it must already be at opset 21.
        units: What to quantize.
        names: Fresh names.
        block_size: Values per block along the reduction axis.
        fmt: ``nbits`` (MatMulNBits / GatherBlockQuantized) or ``qdq``.
        accuracy_level: MatMulNBits ``accuracy_level``.
        fixed: ``(q, scales)`` as :func:`block_int4` returns them, to store instead of rounding
            to nearest, by weight name (``--method gptq`` / ``awq``).
    """
    writer = _Writer()
    changes: list[Change] = []
    storages: set[str] = set()
    if fmt == "nbits" and units and MS_DOMAIN not in model.opset_imports:
        model.opset_imports[MS_DOMAIN] = 1
    skipped: list[Skip] = []
    for unit in units:
        w = unit.weight
        arr = w.numpy()
        axis = unit.axis
        assert axis is not None and arr.ndim == 2
        if not np.isfinite(arr).all():
            skipped.append(Skip(unit.layer, unit.op_type, f"'{w.name}': {NON_FINITE_REASON}"))
            del arr
            _release(w.tensor)
            continue
        # rows = output channels (or table rows), columns = the reduction axis, blocked
        wt = arr.T if axis == 0 else arr
        n, k = wt.shape
        scale_dtype = np.dtype(w.dtype.numpy())
        given = fixed.get(w.name) if fixed is not None else None
        q, scales = given if given is not None else block_int4(wt, block_size, scale_dtype)
        snr = _snr_db(wt, _dequant_int4(q, scales, block_size, k))
        del arr, wt
        _release(w.tensor)
        gather = unit.uses[0].kind == "gather"
        if fmt == "nbits":
            if gather:
                _int4_nbits_gather(unit, names, q, scales, k, block_size)
                storage = "GatherBlockQuantized"
            else:
                _int4_nbits_matmul(unit, names, q, scales, n, k, block_size, accuracy_level)
                storage = "MatMulNBits"
            bytes_after = (n * (-(-k // 2)) if gather else q.size // 2) + scales.nbytes
        else:
            q_layout, s_layout = (q[:, :k].T, scales.T) if axis == 0 else (q[:, :k], scales)
            _int4_qdq(
                unit,
                names,
                writer,
                np.ascontiguousarray(q_layout),
                np.ascontiguousarray(s_layout),
                axis,
                block_size,
            )
            storage = "DequantizeLinear"
            bytes_after = -(-q_layout.size // 2) + scales.nbytes
        storages.add(storage)
        changes.append(
            weight_change(
                model,
                unit,
                f"int4 blocks of {block_size} along axis {axis} ({storage})",
                storage=storage,
                bytes_after=bytes_after,
                snr=snr,
                block_axis=axis,
                block_size=block_size,
            )
        )
    return Emitted(tuple(changes), frozenset(storages), tuple(skipped))
