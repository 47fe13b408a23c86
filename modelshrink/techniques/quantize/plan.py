"""Which weights a weight-only mode quantizes, along which axis, and why the others are left alone.

A *unit* is one weight tensor with every node that reads it. A weight read by several nodes
is one unit: it is quantized once, along one axis that suits every reader, or skipped with a
reason. Units are numbered by their position in :func:`modelshrink.graph.weights`, which is
the same for a model and its clones, so a search can plan once and build many candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from modelshrink.graph import FLOAT_TYPES, Weight, excluded_by, op_key, run_time_weights, weights
from modelshrink.techniques.base import Skip
from modelshrink.techniques.quantize.config import MODE_OPS, RECURRENT_OPS, QuantizeConfig

__all__ = [
    "CANDIDATE_OPS",
    "INT4_PACKED_KINDS",
    "QUANTIZABLE_TYPES",
    "Plan",
    "Unit",
    "Use",
    "excluded_by",
    "make_plan",
]

# float64 weights are left alone: DequantizeLinear has no float64 output before opset 19 and
# onnxruntime's kernels take float32/float16 scales only.
QUANTIZABLE_TYPES = FLOAT_TYPES - {ir.DataType.DOUBLE}
# Ops whose weights some weight-only mode can quantize: a weight read by one of these is a
# candidate, and the report says what happened to it.
CANDIDATE_OPS = frozenset(MODE_OPS["int8"])
# Kinds of weight that --mode int4 stores as packed 4-bit codes (lowbit.py) rather than in
# MatMulNBits / GatherBlockQuantized (no int4 Conv or LSTM kernel exists to take them).
INT4_PACKED_KINDS = frozenset({"conv", "recurrent"})


@dataclass(frozen=True, eq=False)
class Use:
    """One node reading a weight.

    Attributes:
        node: The consumer.
        index: Its input slot.
        axis: int8: the per-channel (output) axis; int4: the block (reduction) axis (Conv and
            recurrent weights: the output axis, as int8). None for a per-tensor scale (rank-1
            weights). For ``recurrent`` weights, axis 1 together with axis 0: one scale per
            direction and gate row.
        kind: ``matmul`` (MatMul/Gemm weight), ``conv``, ``gather`` or ``recurrent`` (W or R of
            LSTM/GRU/RNN, ``[directions, gates x hidden, input or hidden]``).
    """

    node: ir.Node
    index: int
    axis: int | None
    kind: str


@dataclass(frozen=True, eq=False)
class Unit:
    """A weight that will be quantized, with every node that reads it."""

    index: int
    weight: Weight
    uses: tuple[Use, ...]

    @property
    def axis(self) -> int | None:
        """The axis every use agrees on."""
        return self.uses[0].axis

    @property
    def merged_rows(self) -> bool:
        """True when the channels span axes 0 and 1 (recurrent ``[directions, gates x hidden, K]``):
        the weight is quantized as ``[directions x gates x hidden, K]`` rows."""
        return self.uses[0].kind == "recurrent"

    @property
    def layer(self) -> str:
        """The consumer node name(s), for the report."""
        return ", ".join(dict.fromkeys(_node_name(u.node) for u in self.uses))

    @property
    def op_type(self) -> str:
        """The consumer op type(s)."""
        return ", ".join(dict.fromkeys(op_key(u.node) for u in self.uses))


@dataclass(frozen=True)
class Plan:
    """Units to quantize and weights left alone."""

    units: tuple[Unit, ...]
    skipped: tuple[Skip, ...]


def _node_name(node: ir.Node) -> str:
    return node.name or f"<unnamed {node.op_type}>"


_RECURRENT_INPUTS = {3: "bias B", 5: "initial_h", 6: "initial_c", 7: "peepholes P"}


def _role_recurrent(node: ir.Node, index: int, rank: int) -> Use | str:
    """LSTM/GRU/RNN: W (slot 1) and R (slot 2) get one scale per direction and gate row."""
    op = op_key(node)
    if index not in (1, 2):
        return f"{_RECURRENT_INPUTS.get(index, f'input {index}')} of {op}: kept in float"
    if rank != 3:
        name = "W" if index == 1 else "R"
        return f"{op} {name} of rank {rank}: expected [directions, gates x hidden, size]"
    return Use(node, index, 1, "recurrent")


def _role_int8(node: ir.Node, index: int, rank: int) -> Use | str:
    """int8: the output-channel axis of a weight in this slot, or why the slot is not a weight."""
    op = op_key(node)
    if op in RECURRENT_OPS:
        return _role_recurrent(node, index, rank)
    per_tensor = rank < 2
    if op == "MatMul":
        if index == 1:
            return Use(node, index, None if per_tensor else rank - 1, "matmul")
        return Use(node, index, None if per_tensor else rank - 2, "matmul")
    if op == "Gemm":
        if index == 2:
            return "bias (C) of Gemm: kept in float"
        trans = node.attributes.get_int("transA" if index == 0 else "transB", 0)
        axis = (0 if not trans else 1) if index == 0 else (1 if not trans else 0)
        return Use(node, index, None if per_tensor else axis, "matmul")
    if op in ("Conv", "ConvTranspose"):
        if index != 1:
            return f"bias of {op}: kept in float"
        return Use(node, index, (0 if op == "Conv" else 1) if not per_tensor else None, "conv")
    if op == "Gather":
        if index != 0:
            return "indices of Gather"
        axis = node.attributes.get_int("axis", 0)
        axis = axis + rank if axis < 0 else axis
        return Use(node, index, None if per_tensor else axis, "gather")
    return f"{op} is not quantized by this mode"


def _role_int4(node: ir.Node, index: int, shape: tuple[int, ...], config: QuantizeConfig) -> Use | str:
    """int4: the block (reduction) axis of a weight in this slot, or why it cannot be int4."""
    op = op_key(node)
    if op in ("Conv", "ConvTranspose", *RECURRENT_OPS):  # packed 4-bit codes, per output channel
        return _role_int8(node, index, len(shape))
    nbits = config.storage == "nbits"
    if len(shape) != 2:
        return f"{op} weight of rank {len(shape)}: int4 block quantization needs a 2-D weight"
    if op == "MatMul":
        if index != 1:
            return "MatMul with a constant first input: int4 quantizes the second input (B) only"
        return Use(node, index, 0, "matmul")
    if op == "Gemm":
        if index == 2:
            return "bias (C) of Gemm: kept in float"
        if index == 0:
            return "Gemm with a constant first input: int4 quantizes the second input (B) only"
        if nbits:
            if node.attributes.get_int("transA", 0):
                return "Gemm with transA=1: MatMulNBits cannot express it (try --format qdq)"
            if node.attributes.get_float("alpha", 1.0) != 1.0:
                return "Gemm with alpha != 1: MatMulNBits cannot express it (try --format qdq)"
            if (
                len(node.inputs) > 2
                and node.inputs[2] is not None
                and node.attributes.get_float("beta", 1.0) != 1.0
            ):
                return "Gemm with beta != 1: MatMulNBits cannot express it (try --format qdq)"
        return Use(node, index, 1 if node.attributes.get_int("transB", 0) else 0, "matmul")
    if op == "Gather":
        if index != 0:
            return "indices of Gather"
        axis = node.attributes.get_int("axis", 0)
        if axis not in (0, -2):
            return "Gather along axis 1: int4 quantizes embedding tables gathered by row"
        if nbits and shape[1] % 2:
            return f"table rows of odd length {shape[1]}: GatherBlockQuantized needs even rows (try --format qdq)"
        return Use(node, index, 1, "gather")
    return f"{op} is not quantized by --mode int4"


def _role_dynamic(node: ir.Node, index: int, shape: tuple[int, ...]) -> Use | str:
    """dynamic: MatMul/Gemm second input, 2-D; the axis is the output-channel axis N."""
    op = op_key(node)
    # weight-only int8 as --mode int8 does (LSTM then becomes DynamicQuantizeLSTM where it can)
    if op in ("Gather", "Conv", "ConvTranspose", *RECURRENT_OPS):
        return _role_int8(node, index, len(shape))
    if op == "Gemm" and index == 2:
        return "bias (C) of Gemm: kept in float"
    if index != 1:
        return f"{op} with a constant first input: dynamic quantization handles constant second inputs"
    if len(shape) != 2:
        return f"{op} weight of rank {len(shape)}: dynamic quantization handles 2-D weights"
    if op == "Gemm":
        if node.attributes.get_int("transA", 0):
            return "Gemm with transA=1: not handled by dynamic quantization"
        return Use(node, index, 0 if node.attributes.get_int("transB", 0) else 1, "matmul")
    return Use(node, index, 1, "matmul")


def _uses(w: Weight, relevant: list[tuple[ir.Node, int]], config: QuantizeConfig) -> list[Use] | str:
    if config.mode == "int4" and w.dtype == ir.DataType.BFLOAT16:
        return "bfloat16 weights: int4 handles float32 and float16 weights (use --mode int8)"
    if config.mode == "bf16" and w.dtype != ir.DataType.FLOAT:
        return f"{w.dtype.name.lower()} weights are already 16-bit"
    if config.mode == "dynamic" and w.dtype != ir.DataType.FLOAT:
        return f"{w.dtype.name.lower()} weights: dynamic quantization needs float32 (DynamicQuantizeLinear)"
    uses: list[Use] = []
    for node, slot in relevant:
        if config.mode == "int4":
            role = _role_int4(node, slot, w.shape, config)
        elif config.mode == "dynamic":
            role = _role_dynamic(node, slot, w.shape)
        else:
            role = _role_int8(node, slot, len(w.shape))
        if isinstance(role, str):
            return role
        uses.append(role)
    if len({u.axis for u in uses}) > 1:
        a, b = uses[0], next(u for u in uses if u.axis != uses[0].axis)
        return (
            f"shared by {_node_name(a.node)} (axis {a.axis}) and {_node_name(b.node)} "
            f"(axis {b.axis}): no one quantization axis suits both readers"
        )
    kinds = {u.kind for u in uses}
    if config.mode in ("int4", "dynamic") and len(kinds) > 1:
        readers = " and ".join(sorted(dict.fromkeys(op_key(u.node) for u in uses)))
        return f"shared by {readers}, which need different {config.mode} layouts"
    return uses


def _decide(w: Weight, relevant: list[tuple[ir.Node, int]], config: QuantizeConfig) -> list[Use] | str | None:
    """The uses of a weight to quantize, a reason to leave it alone, or None (not a weight)."""
    if w.dtype not in QUANTIZABLE_TYPES:
        return "float64 weights are not quantized" if w.dtype == ir.DataType.DOUBLE else None
    if w.size < config.min_elements:
        return f"{w.size} elements, fewer than --min-elements {config.min_elements}"
    if w.is_graph_input:
        return "is a graph input, so it can be overridden at run time; make it a plain initializer first"
    if w.value.is_graph_output():
        return "is also a graph output; left in float so the output keeps its values"
    consumers = w.consumers()
    pattern = excluded_by(config.exclude, w.name, *(n.name or "" for n, _ in consumers)) or excluded_by(
        config.exclude, *(op_key(n) for n, _ in consumers)
    )
    if pattern is not None:
        return f"excluded by --exclude {pattern}"
    handled = MODE_OPS[config.mode]
    foreign = [n for n, _ in relevant if op_key(n) not in handled]
    if foreign:
        return (
            f"{op_key(foreign[0])} is not quantized by --mode {config.mode} (it handles {', '.join(handled)})"
        )
    others = [n for n, _ in consumers if op_key(n) not in CANDIDATE_OPS]
    if others:
        return (
            f"also read by {op_key(others[0])} '{_node_name(others[0])}', which --mode {config.mode} does "
            "not quantize; left in float so every reader sees the same values"
        )
    unwanted = [n for n, _ in relevant if op_key(n) not in config.ops]
    if unwanted:
        return f"{op_key(unwanted[0])} is not in --op-types ({', '.join(config.ops)})"
    return _uses(w, relevant, config)


def make_plan(model: ir.Model, config: QuantizeConfig) -> Plan:
    """Decide, for every weight read by an op some mode handles, whether and how to quantize it."""
    units: list[Unit] = []
    skipped: list[Skip] = []
    for index, w in enumerate(weights(model)):
        relevant = [(n, i) for n, i in w.consumers() if op_key(n) in CANDIDATE_OPS]
        if not relevant:
            continue  # LayerNorm scales, Add biases, shapes: not a candidate
        decision = _decide(w, relevant, config)
        if decision is None:
            continue
        if isinstance(decision, str):
            label = ", ".join(dict.fromkeys(_node_name(n) for n, _ in relevant))
            op = ", ".join(dict.fromkeys(op_key(n) for n, _ in relevant))
            skipped.append(Skip(label, op, f"'{w.name}': {decision}"))
            continue
        units.append(Unit(index, w, tuple(decision)))
    for node, reason in run_time_weights(
        model, [op for op in config.ops if op in CANDIDATE_OPS], config.exclude
    ):
        skipped.append(Skip(_node_name(node), op_key(node), reason))
    return Plan(tuple(units), tuple(skipped))
