"""Channel-dependency analysis for structured pruning.

A *channel space* is a set of channels that must be removed together: the output channels of
a Conv, the output units of a MatMul/Gemm. Walking the main graph in order, every activation
that carries channels gets a :class:`Layout`: which axis holds them and, along that axis, which
spaces in which order (``Concat`` puts several spaces side by side; ``Flatten`` turns a channel
into a block of consecutive features; a depthwise Conv with multiplier m turns it into m
consecutive channels). Spaces are merged (union-find) when an op ties them: a residual
``Add``/``Sub``/``Mul``, a depthwise Conv (its channels follow its input), a weight shared by
two layers. A space is *blocked*, with a reason, when anything about it cannot be followed
safely: it reaches a graph output, an op that mixes or reorders channels (Reshape splitting
the channel axis, Split/Slice/Gather on it, Softmax/normalization across it, grouped Conv),
an op this analysis does not know, a subgraph, a tensor that cannot be sliced, and so on.

The result lists, per weight, which axes to slice by which layout; which Reshape/Resize shape
constants to rewrite; and which activations change shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from modelshrink.graph import Weight, op_key, weights
from modelshrink.inputs import Dim
from modelshrink.techniques.prune.common import FLOAT_TYPES, excluded_by, node_label

__all__ = ["Analysis", "Layout", "Seg", "Spaces", "analyze"]

logger = logging.getLogger(__name__)


# One output per input element, channel axis unchanged; inputs other than 0 must not carry channels.
_UNARY = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "Gelu",
        "Elu",
        "Selu",
        "Celu",
        "HardSigmoid",
        "HardSwish",
        "Softplus",
        "Softsign",
        "Mish",
        "Erf",
        "Exp",
        "Log",
        "Abs",
        "Neg",
        "Sqrt",
        "Reciprocal",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "Sin",
        "Cos",
        "Identity",
        "Dropout",
        "Cast",
        "Clip",
        "ThresholdedRelu",
        "Not",
        "IsNaN",
        "IsInf",
        "Shrink",
        "Swish",
    }
)
# Element-wise with numpy broadcasting over all inputs.
_BROADCAST = frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Max",
        "Min",
        "Sum",
        "Mean",
        "PRelu",
        "Where",
        "And",
        "Or",
        "Xor",
        "Equal",
        "Greater",
        "Less",
        "GreaterOrEqual",
        "LessOrEqual",
        "Mod",
        "BitwiseAnd",
        "BitwiseOr",
        "BitwiseXor",
    }
)
_POOL = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
_REDUCE = frozenset(
    {
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceSumSquare",
    }
)
_SOFTMAX = frozenset({"Softmax", "LogSoftmax", "Hardmax"})
# Reduce ops whose ``axes`` moved from attribute to input at this opset.
_AXES_INPUT_OPSET = {"ReduceSum": 13, "Squeeze": 13, "Unsqueeze": 13}
_AXES_INPUT_OPSET_OTHER_REDUCE = 18
_SLICEABLE = FLOAT_TYPES | {ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL}
SOURCE_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


@dataclass(frozen=True)
class Seg:
    """A run of channels along a layout's axis.

    Attributes:
        space: Channel space id, or None for channels that can never be removed.
        channels: Number of channels.
        block: Consecutive positions per channel (``Flatten`` of ``[C, H, W]``: ``H*W``).
    """

    space: int | None
    channels: int
    block: int = 1

    @property
    def width(self) -> int:
        """Positions along the axis."""
        return self.channels * self.block


@dataclass(frozen=True)
class Layout:
    """Where channels sit in a tensor: a (negative) axis and the segments along it."""

    axis: int
    segs: tuple[Seg, ...]

    @property
    def width(self) -> int:
        """Size of the axis."""
        return sum(s.width for s in self.segs)

    def spaces(self) -> list[int]:
        """Space ids along the axis."""
        return [s.space for s in self.segs if s.space is not None]

    def scaled(self, factor: int) -> Layout:
        """Every channel spread over ``factor`` times as many consecutive positions."""
        return Layout(self.axis, tuple(Seg(s.space, s.channels, s.block * factor) for s in self.segs))

    def moved(self, axis: int) -> Layout:
        """The same segments on another axis."""
        return Layout(axis, self.segs)

    def indices(self, keep: Mapping[int, np.ndarray], find: Spaces) -> np.ndarray:
        """Positions kept along the axis when each space keeps ``keep[root]`` channels."""
        parts = []
        offset = 0
        for s in self.segs:
            root = find.find(s.space) if s.space is not None else None
            chans = keep.get(root, np.arange(s.channels)) if root is not None else np.arange(s.channels)
            pos = (chans[:, None] * s.block + np.arange(s.block)[None, :]).reshape(-1)
            parts.append(pos + offset)
            offset += s.width
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def new_width(self, keep: Mapping[int, np.ndarray], find: Spaces) -> int:
        """Size of the axis after pruning."""
        total = 0
        for s in self.segs:
            root = find.find(s.space) if s.space is not None else None
            n = len(keep[root]) if root is not None and root in keep else s.channels
            total += n * s.block
        return total


class Spaces:
    """Union-find over channel spaces, remembering why a space cannot be pruned."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self.channels: list[int] = []
        self.origin: list[str] = []
        self._blocked: dict[int, str] = {}

    def new(self, channels: int, origin: str) -> int:
        """A fresh space of ``channels`` channels created by node ``origin``."""
        self._parent.append(len(self._parent))
        self.channels.append(channels)
        self.origin.append(origin)
        return len(self._parent) - 1

    def find(self, i: int) -> int:
        """Root id."""
        root = i
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[i] != root:
            self._parent[i], i = root, self._parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        """Tie two spaces (they must have the same number of channels)."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra > rb:
            ra, rb = rb, ra
        if self.channels[ra] != self.channels[rb]:
            reason = (
                f"tied to channels of '{self.origin[rb]}' with a different count "
                f"({self.channels[ra]} vs {self.channels[rb]})"
            )
            self.block(ra, reason)
            self.block(rb, reason)
        self._parent[rb] = ra
        if rb in self._blocked and ra not in self._blocked:
            self._blocked[ra] = self._blocked[rb]

    def block(self, i: int, reason: str) -> None:
        """Mark a space (and everything tied to it) unprunable; the first reason wins."""
        self._blocked.setdefault(self.find(i), reason)

    def blocked(self, i: int) -> str | None:
        """Why the space cannot be pruned, or None."""
        return self._blocked.get(self.find(i))

    def roots(self) -> list[int]:
        """Root ids in creation order."""
        return [i for i in range(len(self._parent)) if self.find(i) == i]


@dataclass
class SliceSpec:
    """Slice one axis of a weight by a layout (the weight shrinks along it)."""

    axis: int
    layout: Layout
    role: str = "param"


@dataclass
class Producer:
    """A node that creates a channel space: its weight's output axis holds the channels."""

    node: ir.Node
    weight: Weight
    axis: int
    space: int


@dataclass
class ShapeFix:
    """A shape-like constant input (Reshape ``shape``, Resize ``sizes``) to rewrite."""

    node: ir.Node
    index: int
    values: np.ndarray
    position: int
    layout: Layout


@dataclass
class Analysis:
    """What the analysis found.

    Attributes:
        spaces: The channel spaces (union-find).
        producers: Nodes creating spaces, in graph order.
        slices: Per weight value: which axes shrink by which layout.
        weights: Weight object per sliced value.
        uses: Per weight value: the (node, input) pairs the slicing accounts for.
        layouts: Every activation that carries channels.
        observations: Activations read by channel-consuming layers (activation statistics).
        fixes: Shape constants to rewrite.
        group_fixes: Depthwise Convs whose ``group`` follows their input's channel count.
        skipped_nodes: (node, reason) for layers left out of the analysis on their own.
    """

    spaces: Spaces = field(default_factory=Spaces)
    producers: list[Producer] = field(default_factory=list)
    slices: dict[ir.Value, list[SliceSpec]] = field(default_factory=dict)
    weights: dict[ir.Value, Weight] = field(default_factory=dict)
    uses: dict[ir.Value, set[tuple[int, int]]] = field(default_factory=dict)
    layouts: dict[ir.Value, Layout] = field(default_factory=dict)
    observations: list[tuple[ir.Value, Layout]] = field(default_factory=list)
    fixes: list[ShapeFix] = field(default_factory=list)
    group_fixes: list[tuple[ir.Node, Layout]] = field(default_factory=list)
    skipped_nodes: list[tuple[ir.Node, str]] = field(default_factory=list)

    def block_layout(self, layout: Layout | None, reason: str) -> None:
        """Block every space along a layout."""
        if layout is None:
            return
        for s in layout.spaces():
            self.spaces.block(s, reason)


class _Walker:
    """One forward pass over the main graph assigning layouts and collecting what to slice."""

    def __init__(
        self,
        model: ir.Model,
        shapes: dict[str, tuple[Dim, ...]],
        *,
        source_ops: Sequence[str],
        exclude: Sequence[str],
        min_elements: int,
    ) -> None:
        self.model = model
        self.graph = model.graph
        self.shapes = shapes
        self.source_ops = source_ops
        self.exclude = exclude
        self.min_elements = min_elements
        self.a = Analysis()
        self.opset = model.opset_imports.get("", model.graph.opset_imports.get("", 1))
        self.consts: dict[ir.Value, Weight] = {w.value: w for w in weights(model) if w.graph is model.graph}

    # --- facts about values ---------------------------------------------------------------

    def const(self, value: ir.Value | None) -> Weight | None:
        return None if value is None else self.consts.get(value)

    def dims(self, value: ir.Value | None) -> tuple[Dim, ...] | None:
        if value is None:
            return None
        w = self.const(value)
        if w is not None:
            return w.shape
        if value.name and value.name in self.shapes:
            return self.shapes[value.name]
        if value.shape is not None:
            return tuple(d if isinstance(d, int) else (d.value or None) for d in value.shape)
        return None

    def rank(self, value: ir.Value | None) -> int | None:
        d = self.dims(value)
        return None if d is None else len(d)

    def ints(self, value: ir.Value | None) -> list[int] | None:
        w = self.const(value)
        if w is None or w.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
            return None
        return [int(x) for x in np.asarray(w.numpy()).reshape(-1)]

    def floats(self, value: ir.Value | None) -> list[float] | None:
        w = self.const(value)
        if w is None or w.dtype not in FLOAT_TYPES:
            return None
        return [float(x) for x in np.asarray(w.numpy(), dtype=np.float64).reshape(-1)]

    def layout(self, value: ir.Value | None) -> Layout | None:
        return None if value is None else self.a.layouts.get(value)

    def set_layout(self, value: ir.Value, layout: Layout) -> None:
        self.a.layouts[value] = layout
        if value.is_graph_output():
            self.a.block_layout(
                layout, f"its channels reach graph output '{value.name}' (output shapes never change)"
            )
        for use in value.uses():
            if use.node.graph is not self.graph:
                self.a.block_layout(
                    layout,
                    f"its channels are read inside a subgraph ({op_key(use.node)} '{node_label(use.node)}')",
                )

    # --- registration -------------------------------------------------------------------------

    def add_slice(
        self, weight: Weight, axis: int, layout: Layout, node: ir.Node, index: int, role: str = "param"
    ) -> None:
        value = weight.value
        self.a.weights[value] = weight
        self.a.uses.setdefault(value, set()).add((id(node), index))
        specs = self.a.slices.setdefault(value, [])
        for spec in specs:
            if spec.axis == axis:
                self.unify(
                    spec.layout, layout, f"weight '{weight.name}' is shared by layers with different channels"
                )
                return
        specs.append(SliceSpec(axis, layout, role))

    def observe(self, value: ir.Value | None, layout: Layout) -> None:
        if value is not None:
            self.a.observations.append((value, layout))

    def unify(self, one: Layout, two: Layout, reason: str) -> bool:
        same = one.axis == two.axis and len(one.segs) == len(two.segs)
        if same:
            for x, y in zip(one.segs, two.segs, strict=True):
                if x.channels != y.channels or x.block != y.block or (x.space is None) != (y.space is None):
                    same = False
                    break
        if not same:
            self.a.block_layout(one, reason)
            self.a.block_layout(two, reason)
            return False
        for x, y in zip(one.segs, two.segs, strict=True):
            if x.space is not None and y.space is not None:
                self.a.spaces.union(x.space, y.space)
        return True

    def block_inputs(self, node: ir.Node, reason: str) -> None:
        for value in node.inputs:
            self.a.block_layout(self.layout(value), reason)

    def known(self, node: ir.Node, label: str) -> tuple[Layout, int] | None:
        """The layout and rank of a node's first input; None (its inputs blocked) if either is unknown."""
        lx, r = self.layout(node.inputs[0]), self.rank(node.inputs[0])
        if lx is None or r is None:
            self.block_inputs(node, f"{label}: unknown rank")
            return None
        return lx, r

    def pos(self, layout: Layout, rank: int) -> int:
        return rank + layout.axis

    # --- the walk -----------------------------------------------------------------------------

    def run(self) -> Analysis:
        for node in self.graph:
            self.visit(node)
        self.check_weight_uses()
        return self.a

    def visit(self, node: ir.Node) -> None:
        op = node.op_type if node.domain in ("", "ai.onnx") else op_key(node)
        source = _SOURCE_HANDLERS.get(op)
        if source is not None:
            source(self, node)
            return
        if not any(v is not None and v in self.a.layouts for v in node.inputs):
            return
        label = f"{op} '{node_label(node)}'"
        handler = _HANDLERS.get(op)
        if handler is not None:
            handler(self, node, label)
        else:
            self.block_inputs(node, f"its channels reach {label}, which the channel analysis does not follow")

    # --- layers that create spaces ------------------------------------------------------------

    def eligible_source(self, node: ir.Node, weight: Weight | None) -> str | None:
        """Why a node cannot have its output channels pruned, or None."""
        if weight is None:
            return "its weight is not a constant"
        if node.op_type not in self.source_ops:
            return f"{node.op_type} is not in --op-types"
        pattern = excluded_by(self.exclude, node_label(node), node.op_type, weight.name)
        if pattern is not None:
            return f"excluded by --exclude '{pattern}'"
        if weight.dtype not in FLOAT_TYPES:
            return f"weight '{weight.name}' is {weight.dtype.name.lower()}, not a float tensor"
        if weight.is_graph_input:
            return f"weight '{weight.name}' is a graph input (callers may replace it at run time)"
        if weight.size < self.min_elements:
            return f"weight '{weight.name}' has {weight.size} elements, fewer than --min-elements {self.min_elements}"
        return None

    def new_space(
        self, node: ir.Node, weight: Weight | None, axis: int, channels: int
    ) -> tuple[int, str | None]:
        space = self.a.spaces.new(channels, node_label(node))
        reason = self.eligible_source(node, weight)
        if reason is not None:
            self.a.spaces.block(space, reason)
        elif weight is not None:
            self.a.producers.append(Producer(node, weight, axis, space))
        return space, reason

    def op_conv(self, node: ir.Node) -> None:
        x = node.inputs[0]
        w = self.const(node.inputs[1] if len(node.inputs) > 1 else None)
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        bias = self.const(bias_value)
        lx = self.layout(x)
        label = f"Conv '{node_label(node)}'"
        if w is None or len(w.shape) < 3:
            self.a.block_layout(lx, f"{label} has no constant weight")
            return
        rank = len(w.shape)
        chan_axis = 1 - rank  # axis 1 of [N, C, spatial...]
        group = node.attributes.get_int("group", 1)
        cout, cin_g = w.shape[0], w.shape[1]
        out = node.outputs[0]
        if lx is not None and lx.axis != chan_axis:
            self.a.block_layout(lx, f"{label} reads channels on axis 1, they are on axis {lx.axis}")
            lx = None
        if group == 1:
            if lx is not None:
                self.add_slice(w, 1, lx, node, 1, "in")
                self.observe(x, lx)
            space, _ = self.new_space(node, w, 0, cout)
            layout = Layout(chan_axis, (Seg(space, cout),))
            self.add_slice(w, 0, layout, node, 1, "out")
            if bias_value is not None:
                if bias is None:
                    self.a.spaces.block(space, f"{label} has a bias that is not a constant")
                else:
                    self.add_slice(bias, 0, layout, node, 2)
            self.set_layout(out, layout)
            return
        if cin_g == 1 and cout % group == 0 and (lx is None or lx.width == group):
            # depthwise (multiplier cout/group): output channels follow the input's
            if lx is None:
                self.a.skipped_nodes.append(
                    (node, "depthwise Conv: its channels follow its input, which cannot be pruned here")
                )
                return
            layout = lx.scaled(cout // group)
            self.add_slice(w, 0, layout, node, 1, "out")
            self.a.group_fixes.append((node, lx))
            if bias_value is not None:
                if bias is None:
                    self.a.block_layout(layout, f"{label} has a bias that is not a constant")
                else:
                    self.add_slice(bias, 0, layout, node, 2)
            self.set_layout(out, layout)
            return
        reason = f"grouped Conv (group={group}) ties channels within groups; its channels are not pruned"
        self.a.block_layout(lx, f"its channels reach {label}: {reason}")
        self.a.skipped_nodes.append((node, reason))

    def op_convtranspose(self, node: ir.Node) -> None:
        x = node.inputs[0]
        w = self.const(node.inputs[1] if len(node.inputs) > 1 else None)
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        bias = self.const(bias_value)
        lx = self.layout(x)
        label = f"ConvTranspose '{node_label(node)}'"
        group = node.attributes.get_int("group", 1)
        if (
            w is None
            or len(w.shape) < 3
            or group != 1
            or node.attributes.get_ints("output_shape") is not None
        ):
            self.a.block_layout(
                lx, f"its channels reach {label} (grouped, explicit output_shape or no constant weight)"
            )
            return
        rank = len(w.shape)
        chan_axis = 1 - rank
        if lx is not None:
            if lx.axis != chan_axis:
                self.a.block_layout(lx, f"{label} reads channels on axis 1, they are on axis {lx.axis}")
            else:
                self.add_slice(w, 0, lx, node, 1, "in")
                self.observe(x, lx)
        cout = w.shape[1]
        space, _ = self.new_space(node, w, 1, cout)
        layout = Layout(chan_axis, (Seg(space, cout),))
        self.add_slice(w, 1, layout, node, 1, "out")
        if bias_value is not None:
            if bias is None:
                self.a.spaces.block(space, f"{label} has a bias that is not a constant")
            else:
                self.add_slice(bias, 0, layout, node, 2)
        self.set_layout(node.outputs[0], layout)

    def op_matmul(self, node: ir.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        la, lb = self.layout(a), self.layout(b)
        wa, wb = self.const(a), self.const(b)
        label = f"MatMul '{node_label(node)}'"
        self.a.block_layout(lb, f"its channels reach {label} as the right operand")
        if wb is None or len(wb.shape) != 2 or wa is not None:
            self.a.block_layout(la, f"{label} has no constant 2-D weight")
            return
        if la is not None:
            if la.axis != -1:
                self.a.block_layout(
                    la, f"{label} reduces over the last axis, the channels are on axis {la.axis}"
                )
            else:
                self.add_slice(wb, 0, la, node, 1, "in")
                self.observe(a, la)
        n = wb.shape[1]
        space, _ = self.new_space(node, wb, 1, n)
        layout = Layout(-1, (Seg(space, n),))
        self.add_slice(wb, 1, layout, node, 1, "out")
        self.set_layout(node.outputs[0], layout)

    def op_gemm(self, node: ir.Node) -> None:
        a = node.inputs[0]
        b = node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        la = self.layout(a)
        wb = self.const(b)
        label = f"Gemm '{node_label(node)}'"
        self.a.block_layout(self.layout(b), f"its channels reach {label} as operand B")
        self.a.block_layout(self.layout(c), f"its channels reach {label} as operand C")
        trans_a = node.attributes.get_int("transA", 0)
        trans_b = node.attributes.get_int("transB", 0)
        if wb is None or len(wb.shape) != 2:
            self.a.block_layout(la, f"{label} has no constant weight")
            return
        if la is not None:
            if trans_a or la.axis != -1:
                self.a.block_layout(la, f"{label} reads its input transposed")
            else:
                self.add_slice(wb, 1 if trans_b else 0, la, node, 1, "in")
                self.observe(a, la)
        n = wb.shape[0] if trans_b else wb.shape[1]
        space, _ = self.new_space(node, wb, 0 if trans_b else 1, n)
        layout = Layout(-1, (Seg(space, n),))
        self.add_slice(wb, 0 if trans_b else 1, layout, node, 1, "out")
        if c is not None:
            wc = self.const(c)
            if wc is None:
                self.a.spaces.block(space, f"{label} has a bias C that is not a constant")
            elif wc.shape and wc.shape[-1] == n and n != 1:
                if len(wc.shape) == 2 and wc.shape[0] != 1:
                    self.a.spaces.block(space, f"{label} has a 2-D bias C")
                else:
                    self.add_slice(wc, len(wc.shape) - 1, layout, node, 2)
        self.set_layout(node.outputs[0], layout)

    # --- layers that pass channels through ----------------------------------------------------

    def op_unary(self, node: ir.Node, label: str) -> None:
        lx = self.layout(node.inputs[0])
        for value in node.inputs[1:]:
            self.a.block_layout(self.layout(value), f"its channels reach {label} as a parameter")
        if lx is None:
            return
        self.set_layout(node.outputs[0], lx)
        for extra in node.outputs[1:]:
            if extra.uses() or extra.is_graph_output():
                self.a.block_layout(lx, f"{label}'s extra output '{extra.name}' is used")

    def op_broadcast(self, node: ir.Node, label: str) -> None:
        inputs = [v for v in node.inputs if v is not None]
        tracked = [(v, self.layout(v)) for v in inputs if self.layout(v) is not None]
        first = tracked[0][1]
        assert first is not None
        reason = f"{label} ties them to channels that cannot be pruned"
        ok = True
        for _, other in tracked[1:]:
            assert other is not None
            ok = self.unify(first, other, f"{label} combines tensors with different channel layouts") and ok
        if not ok:
            return
        for v in inputs:
            if v in self.a.layouts:
                continue
            r = self.rank(v)
            if r is None:
                self.a.block_layout(first, f"{label}: the shape of '{v.name}' is unknown")
                return
            p = r + first.axis
            if p < 0:
                continue  # broadcast along the channel axis
            dim = self.dims(v)
            assert dim is not None
            if dim[p] == 1:
                continue
            w = self.const(v)
            if dim[p] == first.width and w is not None and w.dtype in _SLICEABLE:
                idx = next(i for i, x in enumerate(node.inputs) if x is v)
                self.add_slice(w, p, first, node, idx)
                continue
            if dim[p] == first.width and self.reshaped_constant(v, p, first):
                continue
            self.a.block_layout(first, f"{reason} ('{v.name}')")
            return
        self.set_layout(node.outputs[0], first)

    def reshaped_constant(self, value: ir.Value, p: int, layout: Layout) -> bool:
        """``Reshape``/``Unsqueeze`` of a per-channel constant (e.g. a bias [C] -> [1, C, 1, 1]).

        Slices the constant itself and rewrites the Reshape target; only when the reshaped value
        is used once and only adds size-1 axes.
        """
        node = value.producer()
        if node is None or node.op_type not in ("Reshape", "Unsqueeze") or len(value.uses()) != 1:
            return False
        src = self.const(node.inputs[0])
        dims = self.dims(value)
        if src is None or src.dtype not in _SLICEABLE or dims is None or value.is_graph_output():
            return False
        big = [i for i, d in enumerate(src.shape) if d != 1]
        if (
            len(big) != 1
            or src.shape[big[0]] != layout.width
            or [d for d in dims if d != 1] != [layout.width]
        ):
            return False
        rank = len(dims)
        if node.op_type == "Reshape":
            spec = self.ints(node.inputs[1])
            if spec is None or len(spec) != rank or spec[p] == 0:
                return False
            if spec[p] > 0:
                self.a.fixes.append(
                    ShapeFix(node, 1, np.array(spec, dtype=np.int64), p, layout.moved(p - rank))
                )
        self.add_slice(src, big[0], layout.moved(big[0] - len(src.shape)), node, 0)
        self.a.layouts[value] = layout.moved(p - rank)
        return True

    def op_shape_reader(self, node: ir.Node, label: str) -> None:
        """``Shape`` is harmless unless the channel count it reads is used: then block.

        Safe when the channel axis is outside ``start:end``, or when every use of the result
        is a ``Gather`` of constant indices that skip it (e.g. the batch size for a Reshape).
        """
        x = node.inputs[0]
        lx, r = self.layout(x), self.rank(x)
        if lx is None or r is None:
            self.block_inputs(node, f"its channel count is read by {label} at run time")
            return
        p = self.pos(lx, r)
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", r)
        start, end = (start + r if start < 0 else start), (end + r if end < 0 else end)
        start, end = max(0, min(start, r)), max(0, min(end, r))
        if not start <= p < end:
            return
        for use in node.outputs[0].uses():
            user = use.node
            indices = self.ints(user.inputs[1]) if user.op_type == "Gather" and use.idx == 0 else None
            if indices is None or user.attributes.get_int("axis", 0) != 0:
                self.block_inputs(node, f"its channel count is read by {label} at run time")
                return
            n = end - start
            if p - start in [i + n if i < 0 else i for i in indices]:
                self.block_inputs(node, f"its channel count is read by {label} at run time")
                return

    def op_batchnormalization(self, node: ir.Node, label: str) -> None:
        self.per_channel_params(node, label, range(1, 5))

    def op_instancenormalization(self, node: ir.Node, label: str) -> None:
        self.per_channel_params(node, label, range(1, 3))

    def per_channel_params(self, node: ir.Node, label: str, params: Iterable[int]) -> None:
        lx = self.layout(node.inputs[0])
        r = self.rank(node.inputs[0])
        if lx is None or r is None or self.pos(lx, r) != 1:
            self.block_inputs(node, f"{label} needs its channels on axis 1")
            return
        for i in params:
            v = node.inputs[i] if i < len(node.inputs) else None
            if v is None:
                continue
            w = self.const(v)
            if w is None or len(w.shape) != 1:
                self.a.block_layout(lx, f"{label}: parameter '{v.name}' is not a constant vector")
                return
            self.add_slice(w, 0, lx, node, i)
        for extra in node.outputs[1:]:
            if extra.uses() or extra.is_graph_output():
                self.a.block_layout(lx, f"{label} is in training mode (extra outputs used)")
                return
        self.set_layout(node.outputs[0], lx)

    def op_layernormalization(self, node: ir.Node, label: str) -> None:
        known = self.known(node, label)
        if known is None:
            return
        lx, r = known
        axis = node.attributes.get_int("axis", -1)
        axis = axis + r if axis < 0 else axis
        if self.pos(lx, r) >= axis:
            self.block_inputs(node, f"{label} normalizes across the channels")
            return
        self.op_unary(node, label)

    def op_pool(self, node: ir.Node, label: str) -> None:
        lx = self.layout(node.inputs[0])
        r = self.rank(node.inputs[0])
        if lx is None or r is None or self.pos(lx, r) != 1:
            self.block_inputs(node, f"{label} needs its channels on axis 1")
            return
        self.op_unary(node, label)

    def axes_of(self, node: ir.Node, index: int, attr_opset: int) -> list[int] | str | None:
        """``axes`` from the attribute (older opsets) or a constant input; "dynamic" if unknown."""
        if self.opset < attr_opset:
            got = node.attributes.get_ints("axes")
            return None if got is None else list(got)
        if len(node.inputs) <= index or node.inputs[index] is None:
            return None
        got_input = self.ints(node.inputs[index])
        return "dynamic" if got_input is None else got_input

    def op_reduce(self, node: ir.Node, label: str) -> None:
        known = self.known(node, label)
        if known is None:
            return
        lx, r = known
        p = self.pos(lx, r)
        keepdims = node.attributes.get_int("keepdims", 1)
        if node.op_type in ("ArgMax", "ArgMin"):
            axes: list[int] | str | None = [node.attributes.get_int("axis", 0)]
        else:
            first = _AXES_INPUT_OPSET.get(node.op_type, _AXES_INPUT_OPSET_OTHER_REDUCE)
            axes = self.axes_of(node, 1, first)
        if axes == "dynamic":
            self.block_inputs(node, f"{label}: axes are computed at run time")
            return
        if axes is None or axes == []:
            if node.attributes.get_int("noop_with_empty_axes", 0):
                self.set_layout(node.outputs[0], lx)
                return
            axes = list(range(r))
        assert isinstance(axes, list)
        norm = sorted(a + r if a < 0 else a for a in axes)
        if p in norm:
            self.block_inputs(node, f"{label} reduces over the channels")
            return
        new_p = p if keepdims else p - sum(1 for a in norm if a < p)
        new_r = r if keepdims else r - len(norm)
        self.set_layout(node.outputs[0], lx.moved(new_p - new_r))

    def op_softmax(self, node: ir.Node, label: str) -> None:
        known = self.known(node, label)
        if known is None:
            return
        lx, r = known
        axis = node.attributes.get_int("axis", -1 if self.opset >= 13 else 1)
        axis = axis + r if axis < 0 else axis
        p = self.pos(lx, r)
        if p == axis or (self.opset < 13 and p >= axis):
            self.block_inputs(node, f"{label} normalizes across the channels")
            return
        self.set_layout(node.outputs[0], lx)

    def op_transpose(self, node: ir.Node, label: str) -> None:
        known = self.known(node, label)
        if known is None:
            return
        lx, r = known
        perm = node.attributes.get_ints("perm")
        perm_list = list(perm) if perm is not None else list(range(r))[::-1]
        new_p = perm_list.index(self.pos(lx, r))
        self.set_layout(node.outputs[0], lx.moved(new_p - r))

    def op_squeeze(self, node: ir.Node, label: str) -> None:
        self.squeeze_like(node, label, squeeze=True)

    def op_unsqueeze(self, node: ir.Node, label: str) -> None:
        self.squeeze_like(node, label, squeeze=False)

    def squeeze_like(self, node: ir.Node, label: str, *, squeeze: bool) -> None:
        x = node.inputs[0]
        lx, r, out_r = self.layout(x), self.rank(x), self.rank(node.outputs[0])
        axes = self.axes_of(node, 1, 13)
        if lx is None or r is None or out_r is None or axes == "dynamic" or (axes is None and not squeeze):
            self.block_inputs(node, f"{label}: axes or ranks unknown")
            return
        p = self.pos(lx, r)
        if squeeze:
            dims = self.dims(x) or ()
            if isinstance(axes, list):
                squeezed = sorted(a + r if a < 0 else a for a in axes)
            else:
                squeezed = [i for i, d in enumerate(dims) if d == 1]
            if p in squeezed:
                self.block_inputs(node, f"{label} squeezes the channel axis")
                return
            new_p = p - sum(1 for a in squeezed if a < p)
        else:
            assert isinstance(axes, list)
            inserted = sorted(a + out_r if a < 0 else a for a in axes)
            new_p = p
            for a in inserted:
                if a <= new_p:
                    new_p += 1
        self.set_layout(node.outputs[0], lx.moved(new_p - out_r))

    def op_flatten(self, node: ir.Node, label: str) -> None:
        x = node.inputs[0]
        lx, dims = self.layout(x), self.dims(x)
        if lx is None or dims is None:
            self.block_inputs(node, f"{label}: input shape unknown")
            return
        r = len(dims)
        axis = node.attributes.get_int("axis", 1)
        axis = axis + r if axis < 0 else axis
        p = self.pos(lx, r)
        inner = dims[p + 1 :]
        if p != axis or not all(isinstance(d, int) for d in inner):
            self.block_inputs(
                node, f"{label} does not flatten from the channel axis with known trailing sizes"
            )
            return
        self.set_layout(node.outputs[0], lx.scaled(_prod([int(d) for d in inner if d is not None])).moved(-1))

    def op_reshape(self, node: ir.Node, label: str) -> None:
        x, shape_value = node.inputs[0], node.inputs[1]
        lx, in_dims, out_dims = self.layout(x), self.dims(x), self.dims(node.outputs[0])
        self.a.block_layout(self.layout(shape_value), f"its channels reach {label} as a shape")
        spec = self.ints(shape_value)
        if (
            lx is None
            or in_dims is None
            or spec is None
            or (out_dims is not None and len(spec) != len(out_dims))
        ):
            self.block_inputs(node, f"{label}: target shape or input shape unknown (computed at run time?)")
            return
        r, out_r = len(in_dims), len(spec)
        p = self.pos(lx, r)
        tail = in_dims[p:]
        if not all(isinstance(d, int) for d in tail):
            self.block_inputs(node, f"{label}: sizes from the channel axis on are unknown")
            return
        tail_ints = [int(d) for d in tail if d is not None]
        total = _prod(tail_ints)
        # resolved output dims: inferred where static, else the literal target size
        out: list[int | None] = []
        for j in range(out_r):
            d = out_dims[j] if out_dims is not None else None
            out.append(d if isinstance(d, int) else (spec[j] if spec[j] > 0 else None))
        # find q with out[q:] covering exactly in[p:], and out[q] = prod(in[p:k]) (channel first)
        for q in range(out_r):
            rest = out[q:]
            if any(d is None for d in rest):
                continue
            rest_ints = [int(d) for d in rest if d is not None]
            if _prod(rest_ints) != total:
                continue
            for k in range(p + 1, r + 1):
                if _prod(tail_ints[: k - p]) == rest_ints[0] and _prod(tail_ints[k - p :]) == _prod(
                    rest_ints[1:]
                ):
                    if any(s == 0 and j == p and j != q for j, s in enumerate(spec)) or (
                        spec[q] == 0 and q != p
                    ):
                        break
                    out_layout = lx.scaled(_prod(tail_ints[1 : k - p])).moved(q - out_r)
                    if spec[q] > 0:
                        self.a.fixes.append(ShapeFix(node, 1, np.array(spec, dtype=np.int64), q, out_layout))
                    self.set_layout(node.outputs[0], out_layout)
                    return
            break
        shown = list(out_dims) if out_dims is not None else spec
        self.block_inputs(
            node,
            f"{label} splits or moves the channel axis ({list(in_dims)} -> {shown}, e.g. attention heads)",
        )

    def op_concat(self, node: ir.Node, label: str) -> None:
        out_r = self.rank(node.outputs[0])
        if out_r is None:
            self.block_inputs(node, f"{label}: unknown rank")
            return
        axis = node.attributes.get_int("axis", 0)
        axis = axis - out_r if axis >= 0 else axis
        layouts = [self.layout(v) for v in node.inputs]
        tracked = [lay for lay in layouts if lay is not None]
        if all(lay.axis == axis for lay in tracked):
            segs: list[Seg] = []
            for v, lay in zip(node.inputs, layouts, strict=True):
                if lay is not None:
                    segs.extend(lay.segs)
                    continue
                d = self.dims(v)
                size = d[out_r + axis] if d is not None and len(d) == out_r else None
                if not isinstance(size, int):
                    self.block_inputs(node, f"{label}: size of input '{v.name if v else ''}' unknown")
                    return
                segs.append(Seg(None, size))
            self.set_layout(node.outputs[0], Layout(axis, tuple(segs)))
            return
        if any(lay.axis == axis for lay in tracked):
            self.block_inputs(node, f"{label} mixes channel layouts")
            return
        self.op_broadcast(node, label)

    def op_split(self, node: ir.Node, label: str) -> None:
        lx, r = self.layout(node.inputs[0]), self.rank(node.inputs[0])
        axis = node.attributes.get_int("axis", 0)
        if lx is None or r is None or (axis + r if axis < 0 else axis) == self.pos(lx, r):
            self.block_inputs(node, f"{label} splits the channels")
            return
        for out in node.outputs:
            self.set_layout(out, lx)

    def op_slice(self, node: ir.Node, label: str) -> None:
        lx, r = self.layout(node.inputs[0]), self.rank(node.inputs[0])
        axes = self.ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if lx is None or r is None or axes is None or len(node.inputs) < 3:
            self.block_inputs(node, f"{label} may slice the channels (axes not constant)")
            return
        if self.pos(lx, r) in [a + r if a < 0 else a for a in axes]:
            self.block_inputs(node, f"{label} slices the channels")
            return
        for v in node.inputs[1:]:
            self.a.block_layout(self.layout(v), f"its channels reach {label} as an index")
        self.set_layout(node.outputs[0], lx)

    def op_resize(self, node: ir.Node, label: str) -> None:
        known = self.known(node, label)
        if known is None:
            return
        lx, r = known
        p = self.pos(lx, r)
        scales = self.floats(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        sizes_value = node.inputs[3] if len(node.inputs) > 3 else None
        sizes = self.ints(sizes_value) if sizes_value is not None else None
        if node.attributes.get_ints("axes") is not None:
            self.block_inputs(node, f"{label} uses 'axes'")
            return
        if scales:
            if len(scales) != r or scales[p] != 1.0:
                self.block_inputs(node, f"{label} scales the channel axis")
                return
        elif sizes:
            if len(sizes) != r or sizes[p] != lx.width:
                self.block_inputs(node, f"{label} resizes the channel axis")
                return
            self.a.fixes.append(ShapeFix(node, 3, np.array(sizes, dtype=np.int64), p, lx.moved(p - r)))
        else:
            self.block_inputs(node, f"{label}: scales/sizes not constant")
            return
        self.set_layout(node.outputs[0], lx)

    def op_upsample(self, node: ir.Node, label: str) -> None:
        lx, r = self.layout(node.inputs[0]), self.rank(node.inputs[0])
        scales = self.floats(node.inputs[1]) if len(node.inputs) > 1 else None
        if lx is None or r is None or not scales or len(scales) != r or scales[self.pos(lx, r)] != 1.0:
            self.block_inputs(node, f"{label} may scale the channel axis")
            return
        self.set_layout(node.outputs[0], lx)

    def op_pad(self, node: ir.Node, label: str) -> None:
        known = self.known(node, label)
        if known is None:
            return
        lx, r = known
        p = self.pos(lx, r)
        if self.opset < 11:
            pads: list[int] | None = list(node.attributes.get_ints("pads") or [])
            axes = list(range(r))
        else:
            pads = self.ints(node.inputs[1]) if len(node.inputs) > 1 else None
            axes_in = node.inputs[3] if len(node.inputs) > 3 else None
            got = self.ints(axes_in) if axes_in is not None else list(range(r))
            axes = [a + r if a < 0 else a for a in got] if got is not None else []
            if axes_in is not None and got is None:
                pads = None
        if pads is None or len(pads) != 2 * len(axes):
            self.block_inputs(node, f"{label}: pads not constant")
            return
        for i, a in enumerate(axes):
            if a == p and (pads[i] or pads[i + len(axes)]):
                self.block_inputs(node, f"{label} pads the channel axis")
                return
        for v in node.inputs[1:]:
            self.a.block_layout(self.layout(v), f"its channels reach {label} as a parameter")
        self.set_layout(node.outputs[0], lx)

    # --- final checks -------------------------------------------------------------------------

    def check_weight_uses(self) -> None:
        for value, specs in self.a.slices.items():
            weight = self.a.weights[value]
            accounted = self.a.uses.get(value, set())
            reason = None
            if weight.is_graph_input:
                reason = f"weight '{weight.name}' is a graph input (callers may replace it at run time)"
            else:
                for use in value.uses():
                    if (id(use.node), use.idx) not in accounted:
                        reason = (
                            f"weight '{weight.name}' is also used by {op_key(use.node)} "
                            f"'{node_label(use.node)}', which would need the same channels"
                        )
                        break
            if reason is not None:
                for spec in specs:
                    self.a.block_layout(spec.layout, reason)


# How the walk follows each op (the same table dispatch as distill's gradient rules): layers
# that own channels, then the ops whose output channels follow their inputs'.
_SOURCE_HANDLERS: dict[str, Callable[[_Walker, ir.Node], None]] = {
    "Conv": _Walker.op_conv,
    "ConvTranspose": _Walker.op_convtranspose,
    "MatMul": _Walker.op_matmul,
    "Gemm": _Walker.op_gemm,
}
_HANDLERS: dict[str, Callable[[_Walker, ir.Node, str], None]] = {
    **dict.fromkeys(_UNARY, _Walker.op_unary),
    **dict.fromkeys(_BROADCAST, _Walker.op_broadcast),
    **dict.fromkeys(_POOL, _Walker.op_pool),
    **dict.fromkeys((*_REDUCE, "ArgMax", "ArgMin"), _Walker.op_reduce),
    **dict.fromkeys(_SOFTMAX, _Walker.op_softmax),
    "Shape": _Walker.op_shape_reader,
    "BatchNormalization": _Walker.op_batchnormalization,
    "InstanceNormalization": _Walker.op_instancenormalization,
    "LayerNormalization": _Walker.op_layernormalization,
    "Transpose": _Walker.op_transpose,
    "Squeeze": _Walker.op_squeeze,
    "Unsqueeze": _Walker.op_unsqueeze,
    "Flatten": _Walker.op_flatten,
    "Reshape": _Walker.op_reshape,
    "Concat": _Walker.op_concat,
    "Split": _Walker.op_split,
    "Slice": _Walker.op_slice,
    "Resize": _Walker.op_resize,
    "Upsample": _Walker.op_upsample,
    "Pad": _Walker.op_pad,
}


def _prod(values: Sequence[int]) -> int:
    return int(np.prod(list(values), dtype=np.int64))


def analyze(
    model: ir.Model,
    shapes: dict[str, tuple[Dim, ...]],
    *,
    source_ops: Sequence[str],
    exclude: Sequence[str],
    min_elements: int,
) -> Analysis:
    """Channel spaces, ties and blocks of ``model``'s main graph."""
    walker = _Walker(model, shapes, source_ops=source_ops, exclude=exclude, min_elements=min_elements)
    return walker.run()
