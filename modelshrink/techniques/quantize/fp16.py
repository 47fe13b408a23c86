"""``--mode fp16``: weights and compute in float16; model inputs and outputs stay float32.

Every node whose float32 type parameters all accept float16 (by its ONNX schema at the model's
opset) runs in float16, except the ops in :data:`FLOAT32_OPS`, which lose accuracy or
overflow in float16 (reductions, softmax, normalizations, exp-like functions, index and box
arithmetic). A ``Cast`` is inserted wherever a float32 value meets a float16 node or the
other way round, once per value, in the graph that owns the value. Float32 weights read only
by float16 nodes are stored in float16 (half the bytes); a weight also read in float32 keeps
its type and gets a Cast, which onnxruntime folds at load.

Control flow (``If``/``Loop``/``Scan``) keeps float32 at its boundary: each body is converted
on its own, with its inputs and outputs in float32, so branch and loop-carried types always
match. This is where onnxruntime's and onnxconverter-common's converters produce models
that do not load.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx.defs
import onnx_ir as ir
import onnx_ir.passes.common

from modelshrink.graph import NameAuthority, Weight, op_key, weights
from modelshrink.runtime import RuntimeOptions
from modelshrink.sessions import session_for_model
from modelshrink.techniques.base import Change, Skip
from modelshrink.techniques.quantize.config import QuantizeConfig
from modelshrink.techniques.quantize.plan import excluded_by

__all__ = ["FLOAT32_OPS", "Fp16Result", "convert_fp16"]

logger = logging.getLogger(__name__)

FLOAT16_MAX = 65504.0
# An activation whose magnitude on the verification inputs passes this keeps its producer and
# readers in float32: other inputs (and float16 rounding on the way) can take it further, and
# past 65504 it becomes inf.
ACTIVATION_LIMIT = FLOAT16_MAX / 2

# Ops kept in float32, with the reason a user sees.
FLOAT32_OPS: dict[str, str] = {
    **dict.fromkeys(
        ("Softmax", "LogSoftmax"), "exp overflows and the normalizing sum loses precision in float16"
    ),
    **dict.fromkeys(
        (
            "ReduceMean",
            "ReduceSum",
            "ReduceProd",
            "ReduceSumSquare",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceL1",
            "ReduceL2",
            "CumSum",
        ),
        "long sums overflow or lose precision in float16",
    ),
    **dict.fromkeys(
        (
            "LayerNormalization",
            "InstanceNormalization",
            "GroupNormalization",
            "RMSNormalization",
            "LpNormalization",
            "MeanVarianceNormalization",
        ),
        "variance and its inverse square root lose precision in float16",
    ),
    **dict.fromkeys(("Exp", "Log", "Pow", "Softplus"), "exp-like functions overflow float16 (max 65504)"),
    **dict.fromkeys(
        ("Range", "NonMaxSuppression", "RoiAlign", "TopK"),
        "index and box arithmetic needs float32 precision",
    ),
}
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_F32, _F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16


def _retype(value: ir.Value, dtype: ir.DataType) -> None:
    """Give ``value`` a new tensor type: ``value.dtype = ...`` would mutate a type object that
    ``Model.clone()`` shares with the caller's model."""
    value.type = ir.TensorType(dtype)


@dataclass
class Fp16Result:
    """What the conversion did."""

    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    float16_nodes: int = 0
    float32_nodes: Counter[str] = field(default_factory=Counter)
    casts: int = 0


@dataclass(frozen=True)
class _Binding:
    """How a node's inputs/outputs map to its schema's type parameters."""

    inputs: tuple[str | None, ...]  # type param per input (None: fixed type)
    outputs: tuple[str | None, ...]
    allowed: dict[str, frozenset[str]]


def _binding(node: ir.Node, opset: int) -> _Binding | None:
    domain = node.domain or ""
    if domain not in ("", "ai.onnx"):
        return None
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return None
    allowed = {t.type_param_str: frozenset(t.allowed_type_strs) for t in schema.type_constraints}

    def params(formal: Sequence[onnx.defs.OpSchema.FormalParameter], count: int) -> tuple[str | None, ...]:
        out: list[str | None] = []
        for i in range(count):
            if not formal:
                out.append(None)
                continue
            p = formal[min(i, len(formal) - 1)]
            out.append(p.type_str if p.type_str in allowed else None)
        return tuple(out)

    return _Binding(
        params(schema.inputs, len(node.inputs)), params(schema.outputs, len(node.outputs)), allowed
    )


def _infer_types(model: ir.Model) -> dict[str, ir.DataType]:
    """Element type of every named value, from onnx shape inference on a clone."""
    clone = model.clone()
    onnx_ir.passes.common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(clone)
    types: dict[str, ir.DataType] = {}
    for graph in clone.graphs():
        values: Iterable[ir.Value] = [
            *graph.inputs,
            *graph.outputs,
            *graph.initializers.values(),
            *(out for node in graph for out in node.outputs),
        ]
        for v in values:
            if v.name and v.dtype is not None:
                types[v.name] = v.dtype
    return types


class _Converter:
    def __init__(
        self, model: ir.Model, config: QuantizeConfig, peaks: Mapping[str, float] | None = None
    ) -> None:
        self.model = model
        self.config = config
        self.peaks = peaks or {}
        self.opset = int(model.opset_imports.get("", 1))
        self.names = NameAuthority(model)
        self.types = _infer_types(model)
        self.half: set[int] = set()  # ids of values that now hold float16
        self.casts: dict[tuple[int, ir.DataType], ir.Value] = {}
        self.mode: dict[int, str] = {}  # id(node) -> "half" | "keep" | "neutral"
        self.params: dict[int, frozenset[str]] = {}  # id(node) -> switched type params
        self.forced: dict[int, str] = {}  # id(node) -> reason to keep float32 (its weights)
        self.hot: dict[int, str] = {}  # id(node) -> reason to keep float32 (its activations)
        self.beyond_range: set[int] = set()  # ids of float32 weight values past float16's range
        self.anchors: dict[int, ir.Node | None] = {}
        self.result = Fp16Result()

    def dtype(self, value: ir.Value | None) -> ir.DataType | None:
        if value is None:
            return None
        if id(value) in self.half:
            return _F16
        if value.dtype is not None:
            return value.dtype
        return self.types.get(value.name or "")

    # --- phase 1: decide ---------------------------------------------------------------------

    def decide(self, node: ir.Node) -> tuple[str, str | None]:
        """``(mode, reason)``: half / neutral / keep (with the reason), or skip (no float32)."""
        binding = _binding(node, self.opset)
        values = [*node.inputs, *node.outputs]
        has_float = any(self.dtype(v) == _F32 for v in values if v is not None)
        op = op_key(node)
        if node.op_type in _CONTROL_FLOW:
            return "keep", None  # boundary; bodies are converted on their own
        if not has_float:
            return "skip", None
        if node.op_type == "Constant":
            return "keep", None  # weights are handled separately
        if id(node) in self.forced:
            return "keep", self.forced[id(node)]
        pattern = excluded_by(self.config.exclude, node.name or "", op)
        if pattern is not None:
            return "keep", f"excluded by --exclude {pattern}"
        if node.op_type in FLOAT32_OPS and node.domain in ("", "ai.onnx"):
            return "keep", f"kept in float32: {FLOAT32_OPS[node.op_type]}"
        if id(node) in self.hot:
            return "keep", self.hot[id(node)]
        if self.config.op_types is not None and node.op_type not in self.config.op_types:
            return "keep", f"{op} is not in --op-types ({', '.join(self.config.op_types)})"
        if binding is None:
            return "keep", f"{op}: no ONNX schema to check float16 support; kept in float32"
        if node.op_type == "Cast":
            return "half", None
        float_params = {
            p
            for v, p in zip([*node.inputs, *node.outputs], [*binding.inputs, *binding.outputs], strict=True)
            if p is not None and self.dtype(v) == _F32
        }
        if not float_params:
            return "keep", None  # float32 only in fixed-type slots (e.g. Resize scales)
        blocked = [p for p in float_params if "tensor(float16)" not in binding.allowed[p]]
        if blocked:
            return "keep", f"{op} has no float16 type for {blocked[0]} in opset {self.opset}"
        input_params = {p for p in binding.inputs if p is not None}
        if any(p in float_params and p not in input_params for p in binding.outputs):
            return "keep", f"{op}: its output type is set by an attribute; kept in float32"
        self.params[id(node)] = frozenset(float_params)
        if not any(p in float_params for p in binding.outputs):
            return "neutral", None
        return "half", None

    def decide_all(self) -> None:
        graph = self.model.graph
        main = {v.name: v for v in graph.inputs} | {out.name: out for node in graph for out in node.outputs}
        for name, peak in sorted(self.peaks.items()):
            value = main.get(name)
            if not peak > ACTIVATION_LIMIT or value is None:
                continue
            producer = value.producer()
            why = (
                f"{'reads' if producer is None else 'touches'} activation '{name}', which "
                f"reaches {peak:.4g} on the verification inputs (float16 holds up to 65504)"
            )
            for node in [*([producer] if producer is not None else []), *(u.node for u in value.uses())]:
                self.hot.setdefault(id(node), why)
        for w in weights(self.model):
            if w.dtype != _F32:
                continue
            peak = _peak(w)
            if peak > FLOAT16_MAX:
                self.beyond_range.add(id(w.value))
                for node, _ in w.consumers():
                    self.forced[id(node)] = (
                        f"reads weight '{w.name}' with values beyond float16's range (max |w| = {peak:.4g})"
                    )
        for graph in self.model.graphs():
            for node in graph:
                mode, reason = self.decide(node)
                self.mode[id(node)] = mode
                if mode == "keep" and reason is not None:
                    self.result.skipped.append(Skip(node.name or f"<{node.op_type}>", op_key(node), reason))
                    self.result.float32_nodes[op_key(node)] += 1
                elif mode == "half":
                    self.result.float16_nodes += 1

    # --- phase 2: weights --------------------------------------------------------------------

    def _half_slot(self, node: ir.Node, index: int) -> bool:
        if self.mode.get(id(node)) != "half" or node.op_type == "Cast":
            return False
        binding = _binding(node, self.opset)
        if binding is None:
            return False
        param = binding.inputs[index] if index < len(binding.inputs) else None
        return param is not None and param in self.params.get(id(node), frozenset())

    def convert_weights(self) -> None:
        for w in weights(self.model):
            if w.dtype != _F32 or w.is_graph_input or w.value.is_graph_output():
                continue
            uses = w.consumers()
            if not uses or not all(self._half_slot(node, i) for node, i in uses):
                continue
            if id(w.value) in self.beyond_range:
                continue
            half = ir.Tensor(np.asarray(w.numpy(), dtype=np.float32).astype(np.float16), name=w.tensor.name)
            if w.kind == "initializer":
                w.value.const_value = half
            else:
                assert w.node is not None
                w.node.attributes["value"] = ir.AttrTensor("value", half)
            _retype(w.value, _F16)
            self.half.add(id(w.value))
            readers = ", ".join(dict.fromkeys(n.name or n.op_type for n, _ in uses))
            self.result.changes.append(
                Change(
                    node=readers,
                    op_type=", ".join(dict.fromkeys(op_key(n) for n, _ in uses)),
                    what="float16 weight",
                    params_before=w.size,
                    params_after=w.size,
                    details={"weight": w.name, "bytes_before": w.nbytes, "bytes_after": half.nbytes},
                )
            )

    # --- phase 3: rewrite ----------------------------------------------------------------------

    def _owner(self, value: ir.Value) -> ir.Graph:
        producer = value.producer()
        if producer is not None and producer.graph is not None:
            assert isinstance(producer.graph, ir.Graph)
            return producer.graph
        graph = value.graph
        assert isinstance(graph, ir.Graph)
        return graph

    def cast(self, value: ir.Value, to: ir.DataType) -> ir.Value:
        """``value`` cast to ``to`` (one Cast per value and type, placed where the value lives)."""
        key = (id(value), to)
        if key in self.casts:
            return self.casts[key]
        graph = self._owner(value)
        suffix = "fp16" if to == _F16 else "fp32"
        out = ir.Value(
            name=self.names.fresh(f"{value.name}_{suffix}"), type=ir.TensorType(to), shape=value.shape
        )
        node = ir.Node(
            "",
            "Cast",
            [value],
            [ir.AttrInt64("to", int(to))],
            outputs=[out],
            name=self.names.fresh(f"{value.name}_Cast_{suffix}"),
        )
        producer = value.producer()
        if producer is not None and producer.graph is graph:
            graph.insert_after(producer, [node])
        else:
            anchor = self.anchors.get(id(graph))
            if anchor is None:
                anchor = self.anchors[id(graph)] = graph.node(0) if len(graph) else None
            if anchor is None:
                graph.append(node)
            else:
                graph.insert_before(anchor, [node])
        if to == _F16:
            self.half.add(id(out))
        self.casts[key] = out
        self.result.casts += 1
        return out

    def rewrite_graph(self, graph: ir.Graph) -> None:
        for node in list(graph):
            mode = self.mode.get(id(node), "skip")
            if mode == "skip":
                continue
            if mode == "half" and node.op_type == "Cast":
                self._half_cast(node)
            elif mode == "half":
                self._half_node(node)
            elif mode == "neutral":
                self._neutral_node(node)
            else:
                self._keep_node(node)
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    self.rewrite_body(attr.as_graph())
                elif attr.type == ir.AttributeType.GRAPHS:
                    for sub in attr.as_graphs():
                        self.rewrite_body(sub)

    def rewrite_body(self, graph: ir.Graph) -> None:
        self.rewrite_graph(graph)
        self.restore_outputs(graph)

    def restore_outputs(self, graph: ir.Graph) -> None:
        """Graph outputs keep their float32 type."""
        for i, out in enumerate(list(graph.outputs)):
            if id(out) not in self.half:
                continue
            name = out.name
            back = self.cast(out, _F32)
            if out.is_graph_input() or out.producer() is None:
                graph.outputs[i] = back
                continue
            out.name = self.names.fresh(f"{name}_fp16")
            back.name = name
            graph.outputs[i] = back

    def _half_cast(self, node: ir.Node) -> None:
        to = node.attributes.get("to")
        if to is not None and to.as_int() == int(_F32):
            node.attributes["to"] = ir.AttrInt64("to", int(_F16))
            out = node.outputs[0]
            _retype(out, _F16)
            self.half.add(id(out))

    def _half_node(self, node: ir.Node) -> None:
        binding = _binding(node, self.opset)
        assert binding is not None
        switched = self.params[id(node)]
        for i, value in enumerate(node.inputs):
            if value is None or binding.inputs[i] not in switched:
                continue
            if self.dtype(value) == _F32:
                node.replace_input_with(i, self.cast(value, _F16))
        for out, param in zip(node.outputs, binding.outputs, strict=True):
            if param in switched:
                _retype(out, _F16)
                self.half.add(id(out))

    def _neutral_node(self, node: ir.Node) -> None:
        """Float32 only in inputs (comparisons, Shape, ...): follow the inputs' majority type."""
        binding = _binding(node, self.opset)
        assert binding is not None
        for param in self.params[id(node)]:
            slots = [i for i, p in enumerate(binding.inputs) if p == param and node.inputs[i] is not None]
            kinds = {self.dtype(node.inputs[i]) for i in slots}
            if kinds <= {_F32, None} or kinds <= {_F16, None}:
                continue
            for i in slots:
                value = node.inputs[i]
                if value is not None and self.dtype(value) == _F32:
                    node.replace_input_with(i, self.cast(value, _F16))

    def _keep_node(self, node: ir.Node) -> None:
        for i, value in enumerate(node.inputs):
            if value is not None and id(value) in self.half:
                node.replace_input_with(i, self.cast(value, _F32))
        # outer-scope values read inside bodies are handled by the body's own nodes

    def run(self) -> Fp16Result:
        self.decide_all()
        self.convert_weights()
        self.rewrite_graph(self.model.graph)
        self.restore_outputs(self.model.graph)
        return self.result


def _peak(w: Weight) -> float:
    """Largest magnitude in a weight, ignoring NaN (which float16 holds; a NaN must not hide a
    value beyond float16's range next to it); inf for a weight holding inf."""
    return float(np.nanmax(np.abs(np.asarray(w.numpy(), dtype=np.float32)), initial=0))


def convert_fp16(
    model: ir.Model, config: QuantizeConfig, peaks: Mapping[str, float] | None = None
) -> Fp16Result:
    """Convert ``model`` (a clone the caller owns) to float16 in place.

    ``peaks`` (from :func:`activation_peaks`): largest finite magnitude of each main-graph
    float32 value on the verification inputs; nodes producing or reading one beyond
    :data:`ACTIVATION_LIMIT` stay in float32.
    """
    return _Converter(model, config, peaks).run()


def activation_peaks(
    model: ir.Model, samples: Sequence[Mapping[str, np.ndarray]], runtime: RuntimeOptions
) -> dict[str, float]:
    """Largest finite magnitude of every float32 graph input and main-graph node output.

    Runs a copy of ``model`` with every named node output exposed as a graph output, on each
    sample (values inside If/Loop/Scan bodies are not seen).
    """

    probe = model.clone()
    present = {v.name for v in probe.graph.outputs}
    for node in probe.graph:
        for out in node.outputs:
            if out.name and out.name not in present and not out.is_graph_output():
                probe.graph.outputs.append(out)
                present.add(out.name)
    session = session_for_model(probe, runtime, label="fp16 activation probe")
    names = list(session.output_names)
    peaks: dict[str, float] = {}

    def note(name: str, array: object) -> None:
        if not isinstance(array, np.ndarray) or array.dtype != np.float32 or not array.size:
            return  # sequences, maps, other types
        finite = np.abs(array[np.isfinite(array)])
        peak = float(finite.max(initial=0))
        peaks[name] = max(peaks.get(name, 0.0), peak)

    for feed in samples:
        feed_in = {k: v for k, v in feed.items() if k in session.input_names}
        for name, array in feed_in.items():
            note(name, array)
        for name, array in zip(names, session.run(feed_in, names), strict=True):
            note(name, array)
    return peaks
