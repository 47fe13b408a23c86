"""Embedding tables whose rows only ever reach a LayerNorm: a free offset per row.

A LayerNorm subtracts the mean over the last axis, so adding the same number ``c`` to every
value of a token's vector changes nothing after it: ``LN(x + c) = LN(x)`` exactly. When every
path from a ``Gather`` of a table reaches the model's outputs only through such a centering
(pre-LN transformers: ``tok + pos -> LN``, the residual stream read by LNs only; BERT-style
``word + position + type -> LN``), each row of the table may be quantized as ``row + c`` for
any ``c``: the stored codes then approximate ``row + c``, and the model computes what it would
with ``row``. The offset is not stored. Picking ``c`` per row among a few fractions of the grid
step (:data:`OFFSETS`) by the error that remains after centering lowers what rounding costs
(the tiny transformer's 3-bit token table: 0.84x the centered squared error), at no size.

What counts as reaching a centering (:func:`norm_centered`): ``LayerNormalization`` over the
last axis only, ``SkipLayerNormalization`` (com.microsoft), the decomposed form
``x - ReduceMean(x, last axis)``; on the way, ``Add`` (the shift of each summand adds up, still
one number per vector), ``Mul``/``Div`` by a scalar constant, ``Cast``, ``Identity``,
``Dropout``. Anything else (a graph output, a MatMul, an RMSNorm that does not center) ends it:
the table is rounded as usual.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from modelshrink.graph import op_key
from modelshrink.techniques.quantize.plan import Unit

__all__ = ["OFFSETS", "norm_centered", "row_offsets"]

# Offsets tried per row, in grid steps (max|row| / peak): 0.84x the centered error of 0 alone
# on the tiny transformer's 3-bit table, where 41 offsets over a whole step gave 0.82x.
OFFSETS = (-0.5, -0.25, 0.25, 0.5)
# How far along Add/Cast chains the walk goes before it gives up (a residual stream is long).
_MAX_DEPTH = 512
_PASS_THROUGH = frozenset({"Cast", "Identity"})


def row_offsets(unit: Unit) -> tuple[float, ...]:
    """The offsets to try on the rows of ``unit``'s weight: :data:`OFFSETS` for a table read only
    through centerings, else none."""
    return OFFSETS if norm_centered(unit) else ()


def norm_centered(unit: Unit) -> bool:
    """True when every read of the unit's table is a row Gather whose rows reach only centerings."""
    if not unit.uses or unit.weight.shape is None or len(unit.weight.shape) != 2 or unit.weight.shape[1] < 2:
        return False
    for use in unit.uses:
        node = use.node
        if use.kind != "gather" or op_key(node) != "Gather" or use.index != 0:
            return False
        if node.attributes.get_int("axis", 0) != 0 or not _centered(node.outputs[0], 0, set()):
            return False
    return True


def _centered(value: ir.Value, depth: int, seen: set[int]) -> bool:
    """Every use of ``value`` (a shifted vector per position) ends in a centering over its last axis."""
    if id(value) in seen:
        return True
    seen.add(id(value))
    if depth > _MAX_DEPTH or value.is_graph_output():
        return False
    rank = len(value.shape) if value.shape is not None else None
    means = {id(u.node) for u in value.uses() if _is_last_axis_mean(u.node, u.idx, rank)}
    for use in value.uses():
        node, op = use.node, op_key(use.node)
        if op == "LayerNormalization":
            if use.idx != 0 or not _last_axis(node.attributes.get_int("axis", -1), rank):
                return False
        elif op == "com.microsoft::SkipLayerNormalization":
            if use.idx not in (0, 1):
                return False
            summed = node.outputs[3] if len(node.outputs) > 3 else None
            if summed is not None and not _centered(summed, depth + 1, seen):
                return False
        elif id(node) in means:
            # x - mean(x): every reader of the mean must be that subtraction
            mean = node.outputs[0]
            if mean.is_graph_output() or any(
                op_key(m.node) != "Sub" or m.idx != 1 or m.node.inputs[0] is not value for m in mean.uses()
            ):
                return False
        elif op == "Sub" and use.idx == 0 and _producer_id(node.inputs[1]) in means:
            continue  # centered: nothing after it sees the shift
        elif op == "Add" or op in _PASS_THROUGH or (op == "Dropout" and use.idx == 0):
            if not _centered(node.outputs[0], depth + 1, seen):
                return False
        elif op in ("Mul", "Div") and _scalar_const(
            node.inputs[1 - use.idx] if op == "Mul" else node.inputs[1]
        ):
            if op == "Div" and use.idx != 0:
                return False
            if not _centered(node.outputs[0], depth + 1, seen):
                return False
        else:
            return False
    return True


def _producer_id(value: ir.Value | None) -> int | None:
    producer = value.producer() if value is not None else None
    return id(producer) if producer is not None else None


def _last_axis(axis: int, rank: int | None) -> bool:
    return axis == -1 or (rank is not None and axis == rank - 1)


def _is_last_axis_mean(node: ir.Node, index: int, rank: int | None) -> bool:
    """``ReduceMean`` of input 0 over the last axis only, keeping it (opset < 18: attribute; 18: input)."""
    if op_key(node) != "ReduceMean" or index != 0 or node.attributes.get_int("keepdims", 1) != 1:
        return False
    attr = node.attributes.get("axes")
    if attr is not None:
        axes = list(attr.as_ints())
    elif len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].const_value is not None:
        axes = [int(a) for a in np.asarray(node.inputs[1].const_value.numpy()).reshape(-1)]
    else:
        return False
    return len(axes) == 1 and _last_axis(axes[0], rank)


def _scalar_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.const_value.size == 1
