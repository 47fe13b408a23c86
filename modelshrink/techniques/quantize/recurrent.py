"""``--mode dynamic`` for LSTM: onnxruntime's ``com.microsoft`` ``DynamicQuantizeLSTM``.

For each direction ``d``, ``W[d]`` ``[4H, K]`` and ``R[d]`` ``[4H, H]`` are quantized symmetric
int8 with one scale per gate row::

    s[d, j] = max|W[d, j, :]| / 127,   q = clip(round(W / s), -127, 127)

and stored transposed, ``[directions, K, 4H]`` and ``[directions, H, 4H]``: the layout the
kernel reads, whose per-channel scales ``[directions, 4H]`` run along its columns. Zero points
are int8 zeros of the same shape (the kernel requires zeros for int8 weights). At every time
step the kernel quantizes ``X`` and ``h`` per tensor to uint8 and runs the gate products in
integers::

    gates = s_x s_W (q_x - z_x) q_W + s_h s_R (q_h - z_h) q_R + B

Biases ``B``, peepholes ``P``, ``sequence_lens`` and the initial states pass through as they
were (float). The node keeps the LSTM's attributes and outputs. The kernel has no ``layout``
attribute, so batch-major LSTMs (``layout=1``) are left to weight-only int8.

An LSTM is rewritten only when both its ``W`` and ``R`` are quantized and every reader of each
is such an LSTM; otherwise its weights take weight-only int8 (``Cast + Mul``, folded at load,
float compute) and the report says why. GRU and RNN have no integer kernel in onnxruntime and
always take weight-only int8.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from modelshrink.graph import NameAuthority, op_key
from modelshrink.techniques.base import Change, Skip
from modelshrink.techniques.quantize.plan import Unit
from modelshrink.techniques.quantize.weightonly import (
    MS_DOMAIN,
    Emitted,
    NonFiniteWeightError,
    _initializer,
    _release,
    symmetric_int8,
    weight_change,
)

__all__ = ["DYNAMIC_LSTM", "LstmOutcome", "quantize_dynamic_lstm"]

logger = logging.getLogger(__name__)

DYNAMIC_LSTM = "DynamicQuantizeLSTM"
# LSTM inputs after R, in order: B, sequence_lens, initial_h, initial_c, P.
_PASSED_THROUGH = 5


@dataclass(frozen=True)
class LstmOutcome:
    """What :func:`quantize_dynamic_lstm` did, and the recurrent units it left to weight-only int8.

    Attributes:
        emitted: The DynamicQuantizeLSTM weights.
        weight_only: Units to store in weight-only int8, each with the reason.
    """

    emitted: Emitted
    weight_only: tuple[tuple[Unit, str], ...]


def _own_reason(node: ir.Node, by_value: dict[int, Unit]) -> str | None:
    """Why this node cannot become DynamicQuantizeLSTM on its own terms, or None."""
    op = op_key(node)
    if op != "LSTM":
        return f"{op} has no integer kernel in onnxruntime (DynamicQuantizeLSTM covers LSTM only)"
    if node.attributes.get_int("layout", 0) != 0:
        return "LSTM with layout=1 (batch-major): DynamicQuantizeLSTM has no layout attribute"
    for slot, name in ((1, "W"), (2, "R")):
        value = node.inputs[slot] if len(node.inputs) > slot else None
        if value is None or id(value) not in by_value:
            return f"DynamicQuantizeLSTM needs W and R both in int8, and {name} stays float (see skipped)"
    w, r = (by_value[id(node.inputs[s])].weight.shape for s in (1, 2))
    hidden = node.attributes.get_int("hidden_size", -1)
    if w[1] != 4 * hidden or r[1:] != (4 * hidden, hidden) or w[0] != r[0]:
        return f"W {list(w)} and R {list(r)} do not match hidden_size {hidden}"
    return None


def _plan_nodes(units: Sequence[Unit]) -> tuple[dict[int, ir.Node], dict[int, str]]:
    """LSTM nodes to rewrite (by id), and the reason for every other reader of the units."""
    by_value = {id(u.weight.value): u for u in units}
    readers = {id(use.node): use.node for u in units for use in u.uses}
    ok: dict[int, ir.Node] = {}
    why: dict[int, str] = {}
    for key, node in readers.items():
        reason = _own_reason(node, by_value)
        if reason is None:
            ok[key] = node
        else:
            why[key] = reason
    # a weight shared with a reader that stays float must stay weight-only everywhere
    changed = True
    while changed:
        changed = False
        for key, node in list(ok.items()):
            for slot, name in ((1, "W"), (2, "R")):
                unit = by_value[id(node.inputs[slot])]
                other = next((u.node for u in unit.uses if id(u.node) not in ok), None)
                if other is not None:
                    del ok[key]
                    why[key] = (
                        f"its {name} '{unit.weight.name}' is also read by '{other.name}', which "
                        "cannot become DynamicQuantizeLSTM"
                    )
                    changed = True
                    break
            if changed:
                break
    return ok, why


def quantize_dynamic_lstm(model: ir.Model, units: Sequence[Unit], names: NameAuthority) -> LstmOutcome:
    """Rewrite the LSTMs that read ``units`` (recurrent W/R) into DynamicQuantizeLSTM, in place.

    Args:
        model: The model the units were planned on (modified).
        units: Recurrent units (W and R of LSTM/GRU/RNN).
        names: Fresh names.

    Returns:
        The changes, and the units left to weight-only int8 with the reason for each.
    """
    ok, why = _plan_nodes(units)
    changes: list[Change] = []
    skipped: list[Skip] = []
    weight_only: list[tuple[Unit, str]] = []
    quantized: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}
    failed: set[int] = set()
    for unit in units:
        stays = next((why[id(u.node)] for u in unit.uses if id(u.node) not in ok), None)
        if stays is not None:
            weight_only.append((unit, stays))
            continue
        w = unit.weight
        dirs, rows, k = w.shape
        try:
            q8 = symmetric_int8(w.numpy().reshape(dirs * rows, k), 0, np.dtype(np.float32))
        except NonFiniteWeightError as exc:
            skipped.append(Skip(unit.layer, unit.op_type, f"'{w.name}': {exc}"))
            failed.add(id(w.value))
            continue
        finally:
            _release(w.tensor)
        q = np.ascontiguousarray(q8.q.reshape(dirs, rows, k).transpose(0, 2, 1))
        scale = q8.scale.reshape(dirs, rows)
        zero = np.zeros((dirs, rows), np.int8)
        quantized[id(w.value)] = (
            _initializer(w.graph, names, f"{w.name}_quantized", q),
            _initializer(w.graph, names, f"{w.name}_scale", scale),
            _initializer(w.graph, names, f"{w.name}_zero_point", zero),
        )
        changes.append(
            weight_change(
                model,
                unit,
                f"dynamic int8 ({DYNAMIC_LSTM}, one scale per direction and gate row, input and "
                "hidden state quantized at run time)",
                storage=DYNAMIC_LSTM,
                bytes_after=q.nbytes + scale.nbytes + zero.nbytes,
                snr=q8.snr_db,
                granularity="channel",
            )
        )
    rewritten = 0
    for node in ok.values():
        w_value, r_value = node.inputs[1], node.inputs[2]
        assert w_value is not None and r_value is not None
        if id(w_value) in failed or id(r_value) in failed:
            continue  # a NaN weight stays float; the LSTM stays as it was
        _rewrite(node, quantized[id(w_value)], quantized[id(r_value)], names)
        rewritten += 1
    if rewritten and MS_DOMAIN not in model.opset_imports:
        model.opset_imports[MS_DOMAIN] = 1
    for unit in units:
        value = unit.weight.value
        if id(value) in quantized and not value.uses():
            _drop(unit)
    storages = frozenset({DYNAMIC_LSTM} if changes else set())
    return LstmOutcome(Emitted(tuple(changes), storages, tuple(skipped)), tuple(weight_only))


def _drop(unit: Unit) -> None:
    w = unit.weight
    if w.kind == "initializer":
        w.graph.initializers.pop(w.value.name or "", None)
    elif w.node is not None:
        w.graph.remove(w.node, safe=True)


def _rewrite(
    node: ir.Node,
    w: tuple[ir.Value, ir.Value, ir.Value],
    r: tuple[ir.Value, ir.Value, ir.Value],
    names: NameAuthority,
) -> None:
    """Replace ``node`` (an LSTM) by a DynamicQuantizeLSTM reading the quantized ``w`` and ``r``."""
    graph = node.graph
    assert graph is not None
    rest = [node.inputs[i] if len(node.inputs) > i else None for i in range(3, 3 + _PASSED_THROUGH)]
    inputs = [node.inputs[0], w[0], r[0], *rest, w[1], w[2], r[1], r[2]]
    attrs = [a for name, a in node.attributes.items() if name != "layout"]
    outputs = [ir.Value(name=None, type=o.type, shape=o.shape) for o in node.outputs]
    new = ir.Node(
        MS_DOMAIN,
        DYNAMIC_LSTM,
        inputs,
        attrs,
        outputs=outputs,
        name=names.fresh(f"{node.name or 'LSTM'}_quant"),
    )
    graph.insert_before(node, [new])
    kept = [o.name for o in node.outputs]
    for old, out in zip(node.outputs, outputs, strict=True):
        old.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    for out, name in zip(outputs, kept, strict=True):
        out.name = name
