"""Which layers can be factorized, their matrices, and the graph rewrite.

Every weight is viewed as a stored matrix ``S`` (``rows x cols``) factorized as ``S ~ P Q``
with ``P`` ``rows x r`` and ``Q`` ``r x cols``. Each consumer uses ``S`` either as is
(its input side is the rows) or transposed (its input side is the columns):

| consumer | ``S`` | input side | rewrite |
|---|---|---|---|
| ``MatMul(X, W)`` | ``W`` | rows | ``MatMul(MatMul(X, P), Q)`` |
| ``Gemm(X, W)`` transB=0 | ``W`` | rows | ``Gemm(Gemm(X, P, transA), Q, C, alpha, beta)`` |
| ``Gemm(X, W)`` transB=1 | ``W`` ``[N, K]`` | cols | ``Gemm(Gemm(X, Q, transA, transB=1), P, C, transB=1, alpha, beta)`` |
| ``Gather(W, ids)`` axis 0 | ``W`` ``[vocab, d]`` | rows | ``MatMul(Gather(P, ids), Q)`` |
| ``Conv`` channel | ``W.reshape(O, I*k...)`` | cols | ``Conv_1x1(Conv_k(X, Q as [r, I, k...]), P as [O, r, 1...], bias)`` |
| ``Conv`` spatial | ``W[o,i,y,x]`` as ``[(i,y), (o,x)]`` | rows | ``Conv_1xkw(Conv_khx1(X, P as [r,I,kh,1]), Q as [O,r,1,kw], bias)`` |

A weight used by several consumers is factorized once and every consumer gets the same two
factor tensors, so sharing is kept; this works whenever every consumer is one of the above.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from modelshrink.graph import (
    FLOAT_TYPES,
    NameAuthority,
    Weight,
    excluded_by,
    op_key,
    run_time_weights,
    weights,
)

__all__ = ["Consumer", "Discovery", "Group", "discover", "node_label", "rewrite_group"]

logger = logging.getLogger(__name__)

Kind = Literal["matmul", "gemm", "gather", "conv"]
Mode = Literal["matrix", "channel", "spatial"]

# bfloat16 weights are left alone: numpy has no bfloat16 linear algebra, and factors written
# back in bfloat16 would lose the precision the SVD spent.
FACTORIZABLE_TYPES = FLOAT_TYPES - {ir.DataType.BFLOAT16}
# The operand index that holds the weight, per op type.
_WEIGHT_INDEX = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Gather": 0}
# Operands that are never factorized and need no reason: biases and Gather's indices.
_NOT_WEIGHT_OPERANDS = {("Gemm", 2), ("Conv", 2), ("Gather", 1)}
GEMM_OPTIONAL_C_OPSET = 11


@dataclass
class Consumer:
    """One node using a weight, and how it sees the weight's matrix.

    Attributes:
        node: The node.
        kind: Its kind.
        transposed: True when the node's input side is the columns of ``S``.
        data: The node's activation input (for data-aware factors), None if it has none.
    """

    node: ir.Node
    kind: Kind
    transposed: bool
    data: ir.Value | None


@dataclass
class Group:
    """A weight and all the nodes that consume it: factorized together or not at all.

    Attributes:
        weight: The weight.
        consumers: Its consumers (all supported).
        mode: ``matrix`` (MatMul/Gemm/Gather), ``channel`` or ``spatial`` (Conv).
        label: Name used in reports (the first consumer's node name).
        mode_note: Why a Conv fell back from spatial to channel, if it did.
    """

    weight: Weight
    consumers: list[Consumer]
    mode: Mode
    label: str
    mode_note: str = ""

    @property
    def rows(self) -> int:
        """Rows of ``S``."""
        shape = self.weight.shape
        return shape[0] if self.mode != "spatial" else shape[1] * shape[2]

    @property
    def cols(self) -> int:
        """Columns of ``S``."""
        shape = self.weight.shape
        if self.mode == "matrix":
            return shape[1]
        if self.mode == "channel":
            return int(np.prod(shape[1:]))
        return shape[0] * shape[3]

    def matrix(self) -> np.ndarray:
        """``S`` as float64 (reads the weight)."""
        return _stored_matrix(self.weight, self.mode)

    @property
    def orientation(self) -> bool | None:
        """The consumers' common ``transposed`` flag, or None when they differ."""
        flags = {c.transposed for c in self.consumers}
        return flags.pop() if len(flags) == 1 else None


@dataclass
class Discovery:
    """Groups found in a model, and the nodes left alone with a reason."""

    groups: list[Group] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (node, op, reason)


def node_label(node: ir.Node) -> str:
    """The node's name, or ``OpType#index`` for unnamed nodes."""
    if node.name:
        return node.name
    graph = node.graph
    index = list(graph).index(node) if isinstance(graph, ir.Graph) else 0
    return f"{node.op_type}#{index}"


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def _attr_ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [int(v) for v in attr.as_ints()]


def _matches(patterns: Sequence[str], *names: str) -> bool:
    return excluded_by(patterns, *names) is not None


def _consumer(node: ir.Node, index: int, weight: Weight, model_opset: int) -> Consumer | str:
    """A supported consumer, or the reason it is not supported."""
    op = op_key(node)
    ndim = len(weight.shape)
    if op == "MatMul":
        if index != 1:
            return f"weight '{weight.name}' is the left operand of MatMul (W·X); only X·W is factorized"
        if ndim != 2:
            return f"weight '{weight.name}' is {ndim}-D (batched MatMul); only 2-D weights are factorized"
        return Consumer(node, "matmul", False, node.inputs[0])
    if op == "Gemm":
        if index != 1:
            return f"weight '{weight.name}' is Gemm's input {index} (A or C); only B is factorized"
        if model_opset < GEMM_OPTIONAL_C_OPSET:
            return (
                f"Gemm needs a bias input before opset {GEMM_OPTIONAL_C_OPSET} (model has "
                f"{model_opset}); convert the model to opset {GEMM_OPTIONAL_C_OPSET}+"
            )
        return Consumer(node, "gemm", bool(_attr_int(node, "transB", 0)), node.inputs[0])
    if op == "Gather":
        if index != 0:
            return f"weight '{weight.name}' holds Gather's indices, not its table"
        if ndim != 2:
            return f"Gather table '{weight.name}' is {ndim}-D; only 2-D embedding tables are factorized"
        axis = _attr_int(node, "axis", 0)
        if axis not in (0, -2):
            return f"Gather on axis {axis} of '{weight.name}'; only row lookups (axis 0) are factorized"
        return Consumer(node, "gather", False, node.inputs[1])
    if op == "Conv":
        if index != 1:
            return f"weight '{weight.name}' is Conv's input {index}, not its kernel"
        group = _attr_int(node, "group", 1)
        if group != 1:
            kind = "depthwise" if weight.shape[1] == 1 else "grouped"
            return (
                f"{kind} Conv (group={group}): each group has only {weight.shape[1]} input "
                "channel(s), too few for a low-rank split to save anything"
            )
        if ndim < 3:
            return f"Conv kernel '{weight.name}' is {ndim}-D"
        return Consumer(node, "conv", True, node.inputs[0])
    return f"{op} does not take factors"


def _stored_matrix(weight: Weight, mode: Mode) -> np.ndarray:
    w = np.asarray(weight.numpy()).astype(np.float64)
    if mode == "matrix":
        return w
    if mode == "channel":
        return w.reshape(w.shape[0], -1)
    # spatial: S[(i, y), (o, x)] = W[o, i, y, x]
    o, i, kh, kw = w.shape
    return w.transpose(1, 2, 0, 3).reshape(i * kh, o * kw)


def _conv_mode(weight: Weight, wanted: str) -> tuple[Mode, str]:
    if wanted != "spatial":
        return "channel", ""
    shape = weight.shape
    if len(shape) != 4:
        return "channel", f"{len(shape) - 2}-D kernel: spatial split needs a 2-D kernel; channel split used"
    if shape[2] < 2 or shape[3] < 2:
        return (
            "channel",
            f"{shape[2]}x{shape[3]} kernel: spatial split needs both sides > 1; channel split used",
        )
    return "spatial", ""


def _weight_skip_reason(weight: Weight, min_elements: int) -> str | None:
    if weight.is_graph_input:
        return (
            f"weight '{weight.name}' is also a graph input (it can be replaced at run time); "
            "make it a plain initializer first"
        )
    if weight.value.is_graph_output():
        return f"weight '{weight.name}' is also a graph output"
    if weight.dtype not in FACTORIZABLE_TYPES:
        return (
            f"weight '{weight.name}' is {weight.dtype.name.lower()}; only float32/float16/float64 "
            "weights are factorized"
        )
    if weight.size < min_elements:
        return f"weight '{weight.name}' has {weight.size} elements, fewer than --min-elements {min_elements}"
    return None


def discover(
    model: ir.Model,
    *,
    op_types: Sequence[str],
    exclude: Sequence[str],
    min_elements: int,
    conv_mode: str,
) -> Discovery:
    """Find every weight that can be factorized, in a deterministic order.

    Nodes whose op type is not in ``op_types`` are ignored silently (the user left them
    out); every other MatMul/Gemm/Conv/Gather with a constant weight operand is either in a
    group or in ``skipped`` with a reason.
    """
    found = Discovery()
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    for computed, why in run_time_weights(model, [op for op in op_types if op in _WEIGHT_INDEX], exclude):
        found.skipped.append((node_label(computed), op_key(computed), why))
    for weight in weights(model):
        uses = weight.consumers()
        relevant = [
            (node, idx)
            for node, idx in uses
            if op_key(node) in _WEIGHT_INDEX and (op_key(node), idx) not in _NOT_WEIGHT_OPERANDS
        ]
        if not relevant:
            continue
        selected = [(n, i) for n, i in relevant if op_key(n) in op_types]
        if not selected:
            continue

        def skip_all(reason: str, nodes: list[tuple[ir.Node, int]] = selected) -> None:
            for node, _ in nodes:
                found.skipped.append((node_label(node), op_key(node), reason))

        excluded = [n for n, _ in selected if _matches(exclude, n.name or "", n.op_type, weight.name)]
        if excluded:
            shared = "" if len(excluded) == len(uses) else f" (weight '{weight.name}' is shared with it)"
            skip_all(f"excluded by --exclude {node_label(excluded[0])}{shared}")
            continue
        reason = _weight_skip_reason(weight, min_elements)
        if reason is not None:
            skip_all(reason)
            continue
        others = [(n, i) for n, i in uses if (n, i) not in selected]
        if others:
            node, _ = others[0]
            filtered = op_key(node) in _WEIGHT_INDEX and op_key(node) not in op_types
            why = "which --op-types leaves out" if filtered else "which cannot take factors"
            skip_all(f"weight '{weight.name}' is also used by {node_label(node)} ({op_key(node)}), {why}")
            continue
        consumers: list[Consumer] = []
        failure = None
        for node, idx in selected:
            made = _consumer(node, idx, weight, opset)
            if isinstance(made, str):
                failure = (node, made)
                break
            consumers.append(made)
        if failure is not None:
            node, why = failure
            if len(selected) > 1:
                why = f"{why} (weight '{weight.name}' is shared with {len(selected) - 1} other node(s))"
            skip_all(why)
            continue
        kinds = {c.kind == "conv" for c in consumers}
        if len(kinds) > 1:
            skip_all(f"weight '{weight.name}' is used both by Conv and by matrix ops")
            continue
        mode: Mode = "matrix"
        note = ""
        if consumers[0].kind == "conv":
            mode, note = _conv_mode(weight, conv_mode)
            if mode == "spatial":
                for c in consumers:
                    c.transposed = False
        found.groups.append(
            Group(
                weight=weight,
                consumers=consumers,
                mode=mode,
                label=node_label(consumers[0].node),
                mode_note=note,
            )
        )
    return found


# --- rewrite --------------------------------------------------------------------------------


def _factor_tensors(group: Group, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stored tensors for ``P`` and ``Q`` in the shape the consumers need."""
    if group.mode == "matrix":
        return p, q
    shape = group.weight.shape
    rank = p.shape[1]
    if group.mode == "channel":
        # S = W.reshape(O, -1): P [O, r] -> 1x1 Conv [O, r, 1...]; Q [r, I*k] -> Conv [r, I, k...]
        ones = (1,) * (len(shape) - 2)
        return p.reshape(shape[0], rank, *ones), q.reshape(rank, *shape[1:])
    o, i, kh, kw = shape
    # P [(i, y), r] -> first conv [r, I, kh, 1]; Q [r, (o, x)] -> second conv [O, r, 1, kw]
    first = p.T.reshape(rank, i, kh)[..., None]
    second = q.reshape(rank, o, kw).transpose(1, 0, 2)[:, :, None, :]
    return first, second


def _factor_shapes(group: Group, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes :func:`_factor_tensors` gives ``P`` and ``Q`` at ``rank``."""
    if group.mode == "matrix":
        return (group.rows, rank), (rank, group.cols)
    shape = tuple(group.weight.shape)
    if group.mode == "channel":
        return (shape[0], rank, *(1,) * (len(shape) - 2)), (rank, *shape[1:])
    o, i, kh, kw = shape
    return (rank, i, kh, 1), (o, rank, 1, kw)


def _add_constant(
    group: Group,
    names: NameAuthority,
    base: str,
    array: np.ndarray | tuple[Callable[[], np.ndarray], tuple[int, ...]],
    dtype: np.dtype,
) -> ir.Value:
    weight = group.weight
    name = names.fresh(base)
    tensor: ir.TensorProtocol
    if isinstance(array, tuple):
        make, shape = array

        def evaluate() -> ir.Tensor:
            return ir.Tensor(np.ascontiguousarray(make().astype(dtype)))

        tensor = ir.LazyTensor(evaluate, dtype=weight.dtype, shape=ir.Shape(shape), name=name)
    else:
        tensor = ir.Tensor(np.ascontiguousarray(array.astype(dtype)), name=name)
    if weight.kind == "initializer":
        value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=tensor.shape)
        weight.graph.register_initializer(value)
        return value
    assert weight.node is not None
    node = ir.node("Constant", [], {"value": tensor}, name=names.fresh(f"{base}_const"))
    node.outputs[0].name = name
    node.outputs[0].type = ir.TensorType(tensor.dtype)
    node.outputs[0].shape = tensor.shape
    weight.graph.insert_after(weight.node, node)
    return node.outputs[0]


def _copy_attrs(node: ir.Node, keep: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in keep:
        attr = node.attributes.get(name)
        if attr is not None:
            out[name] = attr.value
    return out


def _replace(node: ir.Node, new_nodes: list[ir.Node]) -> None:
    graph = node.graph
    assert graph is not None
    old = node.outputs[0]
    new = new_nodes[-1].outputs[0]
    new.type = old.type
    new.shape = old.shape
    name = old.name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    graph.insert_before(node, new_nodes)
    graph.remove(node, safe=True)
    new.name = name


def _rewrite_consumer(
    c: Consumer, group: Group, first_w: ir.Value, second_w: ir.Value, names: NameAuthority
) -> None:
    node = c.node
    base = node.name or f"{node.op_type.lower()}_{group.weight.name}"
    mid = ir.Value(name=names.fresh(f"{base}_lowrank_out"), type=node.outputs[0].type)
    first_name = names.fresh(f"{base}_lowrank")
    x = node.inputs[0] if c.kind != "gather" else node.inputs[1]
    if c.kind == "matmul":
        n1 = ir.node("MatMul", [x, first_w], outputs=[mid], name=first_name)
        n2 = ir.node("MatMul", [mid, second_w], name=node.name or None)
    elif c.kind == "gemm":
        trans_a = _attr_int(node, "transA", 0)
        trans_b = 1 if c.transposed else 0
        n1 = ir.node(
            "Gemm", [x, first_w], {"transA": trans_a, "transB": trans_b}, outputs=[mid], name=first_name
        )
        inputs = [mid, second_w] + ([node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] else [])
        attrs = {"transB": trans_b, **_copy_attrs(node, ("alpha", "beta"))}
        n2 = ir.node("Gemm", inputs, attrs, name=node.name or None)
    elif c.kind == "gather":
        n1 = ir.node("Gather", [first_w, node.inputs[1]], {"axis": 0}, outputs=[mid], name=first_name)
        n2 = ir.node("MatMul", [mid, second_w], name=node.name or None)
    else:
        bias = [node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] is not None else []
        spatial_rank = len(group.weight.shape) - 2
        if group.mode == "channel":
            attrs1 = _copy_attrs(node, ("auto_pad", "dilations", "kernel_shape", "pads", "strides"))
            attrs2: dict[str, Any] = {"kernel_shape": [1] * spatial_rank}
        else:
            attrs1, attrs2 = _spatial_attrs(node, group.weight.shape)
        n1 = ir.node("Conv", [x, first_w], attrs1, outputs=[mid], name=first_name)
        n2 = ir.node("Conv", [mid, second_w, *bias], attrs2, name=node.name or None)
    _replace(node, [n1, n2])


def _spatial_attrs(node: ir.Node, shape: tuple[int, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """kh x 1 Conv (height stride/pad/dilation), then 1 x kw Conv (width ones)."""
    kh, kw = shape[2], shape[3]
    strides = _attr_ints(node, "strides") or [1, 1]
    dilations = _attr_ints(node, "dilations") or [1, 1]
    auto_pad = node.attributes.get("auto_pad")
    first: dict[str, Any] = {
        "kernel_shape": [kh, 1],
        "strides": [strides[0], 1],
        "dilations": [dilations[0], 1],
    }
    second: dict[str, Any] = {
        "kernel_shape": [1, kw],
        "strides": [1, strides[1]],
        "dilations": [1, dilations[1]],
    }
    mode = auto_pad.as_string() if auto_pad is not None else "NOTSET"
    if mode not in ("", "NOTSET"):
        # SAME_*/VALID: a side of kernel 1 and stride 1 gets no padding either way
        first["auto_pad"] = mode
        second["auto_pad"] = mode
    else:
        pads = _attr_ints(node, "pads") or [0, 0, 0, 0]
        first["pads"] = [pads[0], 0, pads[2], 0]
        second["pads"] = [0, pads[1], 0, pads[3]]
    return first, second


def rewrite_group(
    group: Group,
    factors: tuple[np.ndarray, np.ndarray] | tuple[Callable[[], tuple[np.ndarray, np.ndarray]], int],
    names: NameAuthority,
) -> list[str]:
    """Replace the weight by factors ``P`` and ``Q`` in every consumer; return factor names.

    ``factors`` is ``(P, Q)``, or ``(make, rank)`` for factors computed each time they are read
    and never held (trial candidates of a search: one tensor of memory at a time when written).
    """
    weight = group.weight
    dtype = np.dtype(weight.dtype.numpy())  # from the type: reading the data would map it again
    first_factor, second_factor = factors
    if callable(first_factor):
        assert isinstance(second_factor, int)
        make = first_factor
        p_shape, q_shape = _factor_shapes(group, second_factor)
        p_t: Any = (lambda: _factor_tensors(group, *make())[0], p_shape)
        q_t: Any = (lambda: _factor_tensors(group, *make())[1], q_shape)
    else:
        assert isinstance(second_factor, np.ndarray)
        p_t, q_t = _factor_tensors(group, first_factor, second_factor)
    p_value = _add_constant(group, names, f"{weight.name}_U", p_t, dtype)
    q_value = _add_constant(group, names, f"{weight.name}_V", q_t, dtype)
    for c in group.consumers:
        if c.transposed:
            first, second = q_value, p_value
        else:
            first, second = p_value, q_value
        _rewrite_consumer(c, group, first, second, names)
    if not weight.value.uses():
        if weight.kind == "initializer":
            name = weight.value.name
            if name is not None and name in weight.graph.initializers:
                weight.graph.initializers.pop(name)
        elif weight.node is not None:
            weight.graph.remove(weight.node, safe=True)
    return [p_value.name or "", q_value.name or ""]
