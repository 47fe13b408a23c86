"""``--mode dynamic``: int8 weights and activations quantized at run time, for CPU speed.

For ``Y = X @ W`` (MatMul, or Gemm with ``transA=0``), with ``W[K, N]`` quantized symmetric per
output column (``s_w[n] = max|W[:, n]| / 127``, int8) where that gains at least 6 dB of weight
SNR, else per tensor (one ``s_w``, faster in onnxruntime's kernels), and ``X`` quantized per
tensor at run time by ``DynamicQuantizeLinear`` (uint8, scale ``s_x``, zero point ``z_x``)::

    Y = (MatMulInteger(q_x, q_w, z_x, 0) as float) * (s_x * s_w)

the same node pattern onnxruntime's ``quantize_dynamic`` emits, which onnxruntime fuses into
``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat`` kernels at load. One
``DynamicQuantizeLinear`` serves every MatMul that reads the same activation. Gemm's
``alpha`` is folded into the scales, ``beta * C`` is added after. Unlike ``quantize_dynamic``,
this also reaches weights in ``Constant`` nodes and subgraphs, and Gemm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from modelshrink.graph import NameAuthority
from modelshrink.techniques.base import Change, Skip
from modelshrink.techniques.quantize.plan import Unit
from modelshrink.techniques.quantize.weightonly import (
    Emitted,
    NonFiniteWeightError,
    _initializer,
    _release,
    _Writer,
    symmetric_int8,
    weight_change,
)

__all__ = ["quantize_dynamic"]

logger = logging.getLogger(__name__)


class _Activations:
    """One DynamicQuantizeLinear per activation (and graph), placed right after its producer."""

    def __init__(self, names: NameAuthority) -> None:
        self.names = names
        self.cache: dict[tuple[int, int], tuple[ir.Value, ir.Value, ir.Value]] = {}
        self.writer = _Writer()

    def get(self, x: ir.Value, graph: ir.Graph) -> tuple[ir.Value, ir.Value, ir.Value]:
        key = (id(x), id(graph))
        if key in self.cache:
            return self.cache[key]
        base = x.name or "x"
        outs = (
            ir.Value(name=self.names.fresh(f"{base}_quantized")),
            ir.Value(name=self.names.fresh(f"{base}_scale")),
            ir.Value(name=self.names.fresh(f"{base}_zero_point")),
        )
        node = ir.Node(
            "",
            "DynamicQuantizeLinear",
            [x],
            outputs=list(outs),
            name=self.names.fresh(f"{base}_DynamicQuantizeLinear"),
        )
        producer = x.producer()
        if producer is not None and producer.graph is graph:
            graph.insert_after(producer, [node])
        else:
            self.writer.place(graph, [node], after=None)
        self.cache[key] = outs
        return outs


# Per-channel weight scales must buy at least this much weight SNR (6 dB: a quarter of the
# noise power, one bit) to be used: onnxruntime's integer MatMul kernels scale per-column
# outputs in an extra pass, measured 4-11 % slower at batch 1 than one scale per tensor
# (`python bench/run.py quantize`, head to head). Ordinary weights gain 1.5-5.5 dB from
# per-channel scales (the sample and generated models, magika's Dense layers); weights
# with outlier channels gain far more, and there per-tensor scales would waste most codes.
PER_CHANNEL_MIN_GAIN_DB = 6.0


def per_channel_pays(per_channel_snr: float | None, per_tensor_snr: float | None) -> bool:
    """Whether per-channel scales improve a weight's SNR enough to pay their kernel cost.

    None means no measurable noise (exact) or no measurable SNR (weights near float32's
    limit): an exact per-channel result against a lossy per-tensor one pays; otherwise
    per-tensor is kept.
    """
    if per_tensor_snr is None:
        return False
    if per_channel_snr is None:
        return True
    return per_channel_snr - per_tensor_snr >= PER_CHANNEL_MIN_GAIN_DB


def _attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    return float(attr.as_float()) if attr.type == ir.AttributeType.FLOAT else float(attr.as_int())


def quantize_dynamic(model: ir.Model, units: Sequence[Unit], names: NameAuthority) -> Emitted:
    """Rewrite the MatMul/Gemm readers of ``units`` into dynamic int8 in place."""
    acts = _Activations(names)
    changes: list[Change] = []
    skipped: list[Skip] = []
    for unit in units:
        w = unit.weight
        arr = np.asarray(w.numpy())
        axis = unit.axis
        assert axis is not None and arr.ndim == 2
        try:
            per_channel = symmetric_int8(arr, axis, np.dtype(np.float32))
            per_tensor = symmetric_int8(arr, None, np.dtype(np.float32))
        except NonFiniteWeightError as exc:
            skipped.append(Skip(unit.layer, unit.op_type, f"'{w.name}': {exc}"))
            continue
        finally:
            del arr
            _release(w.tensor)
        channel = per_channel_pays(per_channel.snr_db, per_tensor.snr_db)
        quantized = per_channel if channel else per_tensor
        del per_channel, per_tensor
        q = quantized.q.T if axis == 0 else quantized.q  # MatMulInteger reads [K, N]
        scale, snr = quantized.scale, quantized.snr_db
        graph_w = w.graph
        q_value = _initializer(graph_w, names, f"{w.name}_quantized", np.ascontiguousarray(q))
        s_value = _initializer(graph_w, names, f"{w.name}_scale", scale)
        for use in unit.uses:
            _rewrite(use.node, acts, names, q_value, s_value, scale)
        if not w.value.uses():
            if w.kind == "initializer":
                graph_w.initializers.pop(w.value.name or "", None)
            elif w.node is not None:
                graph_w.remove(w.node, safe=True)
        changes.append(
            weight_change(
                model,
                unit,
                f"dynamic int8 (MatMulInteger, per-{'channel' if channel else 'tensor'} weights, "
                "per-tensor activations)",
                storage="MatMulInteger",
                bytes_after=q.nbytes + scale.nbytes,
                snr=snr,
                granularity="channel" if channel else "tensor",
            )
        )
    return Emitted(tuple(changes), frozenset({"MatMulInteger"} if changes else set()), tuple(skipped))


def _rewrite(
    node: ir.Node,
    acts: _Activations,
    names: NameAuthority,
    q_value: ir.Value,
    s_value: ir.Value,
    scale: np.ndarray,
) -> None:
    graph = node.graph
    assert isinstance(graph, ir.Graph)
    x = node.inputs[0]
    assert x is not None
    xq, xs, xzp = acts.get(x, graph)
    base = node.name or node.op_type
    new: list[ir.Node] = []
    weight_scale = s_value
    alpha = _attr(node, "alpha", 1.0) if node.op_type == "Gemm" else 1.0
    if alpha != 1.0:
        weight_scale = _initializer(
            graph, names, f"{base}_alpha_scale", (scale * np.float32(alpha)).astype(np.float32)
        )
    scales = ir.Value(name=names.fresh(f"{base}_scales_mul"))
    new.append(
        ir.Node("", "Mul", [xs, weight_scale], outputs=[scales], name=names.fresh(f"{base}_scales_mul"))
    )
    acc = ir.Value(name=names.fresh(f"{base}_int32"))
    new.append(
        ir.Node(
            "",
            "MatMulInteger",
            [xq, q_value, xzp],
            outputs=[acc],
            name=names.fresh(f"{base}_MatMulInteger"),
        )
    )
    as_float = ir.Value(name=names.fresh(f"{base}_int32_float"))
    new.append(
        ir.Node(
            "",
            "Cast",
            [acc],
            [ir.AttrInt64("to", int(ir.DataType.FLOAT))],
            outputs=[as_float],
            name=names.fresh(f"{base}_Cast"),
        )
    )
    result = ir.Value(name=names.fresh(f"{base}_dequantized"))
    new.append(
        ir.Node("", "Mul", [as_float, scales], outputs=[result], name=names.fresh(f"{base}_output_scale_mul"))
    )
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    if bias is not None:
        beta = _attr(node, "beta", 1.0)
        if beta != 1.0:
            scaled = ir.Value(name=names.fresh(f"{base}_beta_c"))
            beta_value = _initializer(graph, names, f"{base}_beta", np.array(beta, np.float32))
            new.append(
                ir.Node("", "Mul", [bias, beta_value], outputs=[scaled], name=names.fresh(f"{base}_beta_mul"))
            )
            bias = scaled
        summed = ir.Value(name=names.fresh(f"{base}_bias"))
        new.append(ir.Node("", "Add", [result, bias], outputs=[summed], name=names.fresh(f"{base}_bias_add")))
        result = summed
    out = node.outputs[0]
    name = out.name
    result.type, result.shape = out.type, out.shape
    out.replace_all_uses_with(result, replace_graph_outputs=True)
    graph.insert_before(node, new)
    graph.remove(node, safe=True)
    result.name = name
