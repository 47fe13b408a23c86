"""Graph helpers shared by every technique: walk all graphs, find weights wherever they live.

A *weight* is a constant tensor that feeds computation: an initializer (of the main graph or
of an ``If``/``Loop``/``Scan`` body) or the ``value`` of a ``Constant`` node. Techniques use
:func:`weights` rather than hand-rolled traversals so no subgraph or Constant is forgotten.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

__all__ = [
    "FLOAT_PROTO_TYPES",
    "FLOAT_TYPES",
    "PLAIN_INITIALIZERS_IR_VERSION",
    "NameAuthority",
    "Weight",
    "all_nodes",
    "allow_plain_initializers",
    "dtype_name",
    "excluded_by",
    "graph_inputs",
    "in_subgraph",
    "op_histogram",
    "op_key",
    "release",
    "run_time_weights",
    "weights",
]

WeightKind = Literal["initializer", "constant"]

# The floating-point element types, as onnx-ir types and as TensorProto codes (the same numbers).
# A technique that handles fewer says which and why where it narrows this set.
FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
FLOAT_PROTO_TYPES = frozenset(int(t) for t in FLOAT_TYPES)


def dtype_name(dtype: ir.DataType) -> str:
    """numpy-style element type name: ``float32``, ``float16``, ``int8``, ``int4``, ``bfloat16``."""
    if dtype == ir.DataType.STRING:
        return "string"
    try:
        return str(np.dtype(dtype.numpy()).name)
    except (TypeError, ValueError):
        return dtype.name.lower()


def op_key(node: ir.Node) -> str:
    """``OpType`` for the default domain, ``domain::OpType`` otherwise."""
    domain = node.domain
    return node.op_type if domain in ("", "ai.onnx") else f"{domain}::{node.op_type}"


def all_nodes(model: ir.Model) -> Iterator[tuple[ir.Graph, ir.Node]]:
    """Every node of the model with the graph that holds it, subgraphs included."""
    for graph in model.graphs():
        for node in graph:
            yield graph, node


def op_histogram(model: ir.Model) -> dict[str, int]:
    """Node count per op type (``domain::Op`` outside the default domain), sorted by name."""
    counts = Counter(op_key(node) for _, node in all_nodes(model))
    return dict(sorted(counts.items()))


def excluded_by(patterns: Sequence[str], *names: str) -> str | None:
    """The first ``--exclude`` pattern (exact name or glob, case-sensitive) matching any name."""
    for pattern in patterns:
        for name in names:
            if name and fnmatch.fnmatchcase(name, pattern):
                return pattern
    return None


def graph_inputs(graph: ir.Graph) -> list[ir.Value]:
    """Inputs a caller must feed: graph inputs that have no initializer default."""
    return [v for v in graph.inputs if not v.is_initializer()]


@dataclass(frozen=True, eq=False)
class Weight:
    """A constant tensor and where it lives.

    Attributes:
        value: The IR value carrying it (initializer, or the Constant node's output).
        tensor: The tensor itself (possibly external, memory-mapped).
        kind: ``initializer`` or ``constant``.
        graph: The graph holding it.
        node: The Constant node, for ``kind == "constant"``.
    """

    value: ir.Value
    tensor: ir.TensorProtocol
    kind: WeightKind
    graph: ir.Graph
    node: ir.Node | None = None

    @property
    def name(self) -> str:
        """The value name (the Constant's output name for Constant nodes)."""
        return self.value.name or self.tensor.name or "<unnamed>"

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(self.tensor.size)

    @property
    def nbytes(self) -> int:
        """Bytes of storage."""
        return int(self.tensor.nbytes)

    @property
    def dtype(self) -> ir.DataType:
        """Element type."""
        return self.tensor.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """Static shape."""
        return tuple(int(d) for d in self.tensor.shape.numpy())

    @property
    def external(self) -> bool:
        """True when the bytes live in an external data file."""
        return isinstance(self.tensor, ir.ExternalTensor)

    @property
    def is_graph_input(self) -> bool:
        """An initializer that is also a graph input can be overridden at run time."""
        return self.value.is_graph_input()

    def consumers(self) -> list[tuple[ir.Node, int]]:
        """(node, input index) for every use, including uses inside subgraphs."""
        return [(use.node, use.idx) for use in self.value.uses()]

    def consumer_ops(self) -> list[str]:
        """Distinct consumer op types in first-use order."""
        return list(dict.fromkeys(op_key(node) for node, _ in self.consumers()))

    def numpy(self) -> np.ndarray:
        """The data as an array (memory-mapped for external tensors).

        NaNs come back quiet: a signaling NaN (a bit pattern a damaged or hostile file can hold)
        makes every arithmetic operation on it raise numpy's "invalid value" warning, which
        would reach the user's stderr. Only arrays holding NaN are copied.
        """
        array = self.tensor.numpy()
        if array.dtype.kind == "f" and np.isnan(array).any():
            array = np.where(np.isnan(array), np.array(np.nan, array.dtype), array)
        return array


def weights(model: ir.Model) -> list[Weight]:
    """Every weight in every graph, in a deterministic order (graph order, then name/node)."""
    found: list[Weight] = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                found.append(Weight(value, value.const_value, "initializer", graph))
        for node in graph:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                attr = node.attributes.get("value")
                if attr is not None and attr.type == ir.AttributeType.TENSOR and node.outputs:
                    found.append(Weight(node.outputs[0], attr.as_tensor(), "constant", graph, node))
    return found


# float32's smallest normal number: nonzero values below it are subnormal.
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def flush_subnormals(model: ir.Model) -> int:
    """Set every subnormal value of the float32 weights to zero, in place; how many there were.

    CPUs multiply subnormal floats many times slower than normal ones, and a weight that small
    moves no output a float32 can show: PP-OCRv5's detector holds 14,879 of them and runs 1.6x
    faster with them zeroed, its outputs bit-identical. Tensors computed on demand
    (``ir.LazyTensor``, pruned weights) are left alone: reading them would compute them twice.
    """
    flushed = 0
    for weight in weights(model):
        tensor = weight.tensor
        if isinstance(tensor, ir.LazyTensor):
            continue
        count = count_subnormals(tensor)
        if not count:
            continue
        array = np.asarray(tensor.numpy())
        flat = np.array(array, dtype=np.float32).reshape(-1)
        for start in range(0, flat.size, _SCAN_ELEMENTS):
            part = flat[start : start + _SCAN_ELEMENTS]
            part[_subnormal(part)] = 0
        new = ir.Tensor(flat.reshape(array.shape), name=tensor.name)
        if weight.node is None:
            weight.value.const_value = new
        else:
            weight.node.attributes["value"] = ir.AttrTensor("value", new)
        flushed += count
    return flushed


# Scan this many weight values at a time (no full-size temporaries: a structured prune's
# result is in memory whole when it is scanned).
_SCAN_ELEMENTS = 1 << 20


def _subnormal(part: np.ndarray) -> np.ndarray:
    """Where ``part`` (float32) is subnormal: exponent bits 0, mantissa not (as uint32)."""
    magnitude = part.view(np.uint32) & np.uint32(0x7FFFFFFF)
    return (magnitude - np.uint32(1)) < np.uint32(0x007FFFFF)


def count_subnormals(tensor: ir.TensorProtocol) -> int:
    """How many values of a float32 tensor are subnormal (0 for other types); an external
    tensor is unmapped again afterwards (no view of it is kept)."""
    if tensor.dtype != ir.DataType.FLOAT:
        return 0
    flat = np.asarray(tensor.numpy()).reshape(-1)
    count = sum(
        int(np.count_nonzero(_subnormal(flat[start : start + _SCAN_ELEMENTS])))
        for start in range(0, flat.size, _SCAN_ELEMENTS)
    )
    del flat
    release(tensor)
    return count


def release(tensor: ir.TensorProtocol) -> None:
    """Unmap an external tensor's pages once read: techniques that go tensor by tensor keep
    only what they wrote in memory (it maps itself again if read later)."""
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):  # an array still views it: leave it mapped
            tensor.release()


def in_subgraph(weight: Weight, model: ir.Model) -> bool:
    """True when the weight's graph is not the model's main graph."""
    return weight.graph is not model.graph


class NameAuthority:
    """Unique, deterministic names for new values and nodes (counters, never time or ids)."""

    def __init__(self, model: ir.Model) -> None:
        self._taken: set[str] = set()
        for graph in model.graphs():
            for value in itertools.chain(graph.inputs, graph.outputs, graph.initializers.values()):
                if value.name:
                    self._taken.add(value.name)
            for node in graph:
                if node.name:
                    self._taken.add(node.name)
                for out in node.outputs:
                    if out.name:
                        self._taken.add(out.name)
        self._counters: Counter[str] = Counter()

    def fresh(self, base: str) -> str:
        """``base`` if free, else ``base_1``, ``base_2``, ... ; the name is then taken."""
        name = base
        while name in self._taken:
            self._counters[base] += 1
            name = f"{base}_{self._counters[base]}"
        self._taken.add(name)
        return name


# Generated names keep at most this many characters of the name they are made from.
NAME_TAIL_CHARS = 48


def name_tail(name: str) -> str:
    """The end of ``name`` (its last :data:`NAME_TAIL_CHARS` characters, no leading separator), to
    name what is made from it: exporters' names run to 150 characters (tf2onnx's
    ``model_1/block/conv;model_1/block/conv2d_252``) and each repetition costs file bytes."""
    return name[-NAME_TAIL_CHARS:].lstrip("/;_") if len(name) > NAME_TAIL_CHARS else name


# The operands that hold weights, for the ops the techniques compress.
WEIGHT_OPERANDS: dict[str, tuple[int, ...]] = {
    "MatMul": (1,),
    "Gemm": (1,),
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gather": (0,),
    "LSTM": (1, 2),
    "GRU": (1, 2),
    "RNN": (1, 2),
}
# Ops without inputs whose output is not a constant.
_RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}
)
# How far back a weight operand is traced (nodes) before giving up.
_TRACE_LIMIT = 64


def _computed_from_constants(value: ir.Value) -> bool:
    """True when ``value`` is computed at run time from constants only (no input reaches it)."""
    stack, seen, visited = [value], {id(value)}, 0
    while stack:
        v = stack.pop()
        if v.is_initializer() and v.const_value is not None:
            continue  # a stored constant (IR < 4 lists every initializer as an input too)
        if v.is_graph_input():
            return False
        node = v.producer()
        if node is None:
            return False
        if node.op_type in _RANDOM_OPS or any(
            a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()
        ):
            return False
        visited += 1
        if visited > _TRACE_LIMIT:
            return False
        for inp in node.inputs:
            if inp is not None and id(inp) not in seen:
                seen.add(id(inp))
                stack.append(inp)
    return True


def run_time_weights(
    model: ir.Model, op_types: Sequence[str], exclude: Sequence[str] = ()
) -> list[tuple[ir.Node, str]]:
    """Nodes of ``op_types`` whose weight operand is computed at run time from constants only.

    Such a weight is not stored as a tensor (the ``light`` models of the ONNX model zoo make
    every weight with ``ConstantOfShape``; old exporters put a ``Transpose`` between an
    initializer and its ``MatMul``), so no technique sees it. Returns ``(node, reason)`` for
    each, the reason saying why it is left alone and what to do; nodes matched by an
    ``exclude`` pattern (node name, op type or weight name) are left out.
    """
    found: list[tuple[ir.Node, str]] = []
    wanted = set(op_types)
    for _, node in all_nodes(model):
        key = op_key(node)
        if key not in wanted:
            continue
        for slot in WEIGHT_OPERANDS.get(key, ()):
            value = node.inputs[slot] if len(node.inputs) > slot else None
            producer = value.producer() if value is not None else None
            if value is None or producer is None or producer.op_type == "Constant":
                continue  # an input, an initializer or a Constant: a weight, or not one
            name = value.name or "<unnamed>"
            if excluded_by(exclude, node.name or "", key, name) is not None or not _computed_from_constants(
                value
            ):
                continue
            found.append((node, _run_time_reason(name, producer)))
    return found


def _run_time_reason(name: str, producer: ir.Node) -> str:
    if producer.op_type == "ConstantOfShape":
        return (
            f"weight '{name}' is made at run time by ConstantOfShape: one value repeated, no "
            "stored weights to compress (folding it would write every value and make the "
            "file larger)"
        )
    return (
        f"weight '{name}' is computed at run time from constants by {producer.op_type} "
        f"'{producer.name or producer.op_type}'; fold constants first (e.g. with onnxslim) "
        "so that it is stored as a weight"
    )


# IR version 3 requires every initializer to be listed as a graph input; IR 4 lifted that.
PLAIN_INITIALIZERS_IR_VERSION = 4


def allow_plain_initializers(model: ir.Model) -> bool:
    """Raise an IR 3 model to IR 4 when it has initializers that are not graph inputs.

    Techniques add initializers (quantized weights, scales, factors) without listing them as
    graph inputs, which would make them overridable; IR 3 forbids that, IR 4 (a superset)
    allows it. Returns True when the version was raised.
    """
    if model.ir_version >= PLAIN_INITIALIZERS_IR_VERSION:
        return False
    for graph in model.graphs():
        listed = {id(v) for v in graph.inputs}
        if any(id(v) not in listed for v in graph.initializers.values()):
            model.ir_version = PLAIN_INITIALIZERS_IR_VERSION
            return True
    return False
