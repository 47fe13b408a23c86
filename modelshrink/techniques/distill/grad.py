"""The vocabulary of gradients: types, the node builder and the rule contract.

:mod:`.autodiff` walks a graph and calls rules; :mod:`.rules` holds one rule per op family.
Both import what they share from here, so neither imports the other; the default rule set
is :data:`.rules.RULES`, passed in by whoever builds a training step (:mod:`.step`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from modelshrink.errors import UnsupportedModelError
from modelshrink.graph import FLOAT_PROTO_TYPES as FLOAT_TYPES
from modelshrink.inputs import Dim

__all__ = [
    "FLOAT_TYPES",
    "BodyGradients",
    "Builder",
    "Dim",
    "GradientError",
    "Rule",
    "RuleContext",
    "TypeInfo",
    "all_names",
    "constant_values",
    "outer_references",
    "subgraphs",
]

logger = logging.getLogger(__name__)


class GradientError(UnsupportedModelError):
    """The student cannot be differentiated: an op without a rule, or a shape a rule needs."""


# --- type and shape information -------------------------------------------------------------


@dataclass
class TypeInfo:
    """Element type and dims of every value of a graph (from ONNX shape inference).

    Dims are ints when static, strings for symbolic dims, None when unknown; ``dims`` is None
    when even the rank is unknown.
    """

    elem: dict[str, int] = field(default_factory=dict)
    dims: dict[str, tuple[Dim, ...] | None] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> TypeInfo:
        """Run shape inference (with data propagation) and collect every value's type."""
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception as exc:  # onnx raises InferenceError and plain RuntimeErrors
            logger.debug("shape inference failed (%s); using declared types only", exc)
            inferred = model
        info = cls()
        info.add_graph(inferred.graph)
        return info

    def add_graph(self, graph: onnx.GraphProto) -> None:
        """Record the values of ``graph`` and of its subgraphs (If/Loop/Scan bodies: value
        names are unique across nested scopes, so one table serves them all)."""
        for vi in [*graph.input, *graph.output, *graph.value_info]:
            self.add_value_info(vi)
        for init in graph.initializer:
            self.elem[init.name] = init.data_type
            self.dims[init.name] = tuple(int(d) for d in init.dims)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value":
                        self.elem[node.output[0]] = attr.t.data_type
                        self.dims[node.output[0]] = tuple(int(d) for d in attr.t.dims)
            for sub in subgraphs(node):
                self.add_graph(sub)

    def add_value_info(self, vi: onnx.ValueInfoProto) -> None:
        """Record one ``ValueInfoProto`` (tensor types only)."""
        if not vi.type.HasField("tensor_type"):
            return
        tt = vi.type.tensor_type
        if tt.elem_type:
            self.elem[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            dims: list[Dim] = []
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                elif d.HasField("dim_param") and d.dim_param:
                    dims.append(d.dim_param)
                else:
                    dims.append(None)
            self.dims[vi.name] = tuple(dims)
        elif vi.name not in self.dims:
            self.dims[vi.name] = None

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape when every dim is a known int."""
        dims = self.dims.get(name)
        if dims is None or not all(isinstance(d, int) for d in dims):
            return None
        return tuple(int(d) for d in dims)  # type: ignore[arg-type]


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of initializers and ``Constant`` node outputs, by name (subgraphs included)."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.attribute:
            attr = node.attribute[0]
            if attr.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_int") or attr.name in ("value_floats", "value_ints"):
                values[node.output[0]] = np.asarray(helper.get_attribute_value(attr))
        for sub in subgraphs(node):
            values.update(constant_values(sub))
    return values


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held by a node's attributes (If branches, Loop and Scan bodies)."""
    found: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend(attr.graphs)
    return found


def outer_references(node: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    names: list[str] = []
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            defined = {i.name for i in g.input} | {i.name for i in g.initializer}
            for inner in g.node:
                defined.update(inner.output)
            for inner in g.node:
                names.extend(n for n in inner.input if n and n not in defined)
                names.extend(n for n in outer_references(inner) if n not in defined)
            names.extend(o.name for o in g.output if o.name not in defined)
    return list(dict.fromkeys(names))


# --- emitting nodes --------------------------------------------------------------------------


class Builder:
    """Emits nodes and constant initializers with deterministic, collision-free names."""

    def __init__(self, taken: Iterable[str], opset: int, prefix: str = "grad") -> None:
        self.taken = set(taken)
        self.opset = opset
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = 0
        self._consts: dict[tuple[Any, ...], str] = {}

    def child(self) -> Builder:
        """A builder for the nodes of a subgraph (a Scan or If body): its own nodes and
        constants, names unique together with this builder's (one set of taken names)."""
        sub = Builder((), self.opset, self.prefix)
        sub.taken = self.taken
        sub._counter = self._counter
        return sub

    def fresh(self, base: str) -> str:
        """A new unique name built from ``base`` and a counter."""
        while True:
            self._counter += 1
            name = f"{self.prefix}/{base}_{self._counter}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def op(self, op_type: str, inputs: Sequence[str], *, outputs: int = 1, **attrs: Any) -> Any:
        """Emit one node; returns its output name, or a list of names when ``outputs > 1``."""
        names = [self.fresh(op_type) for _ in range(outputs)]
        clean = {k: v for k, v in attrs.items() if v is not None}
        node = helper.make_node(op_type, list(inputs), names, name=self.fresh(f"{op_type}_node"), **clean)
        self.nodes.append(node)
        return names[0] if outputs == 1 else names

    def const(self, array: np.ndarray, base: str = "const") -> str:
        """An initializer holding ``array`` (identical arrays share one initializer)."""
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        name = self._consts.get(key)
        if name is None:
            name = self.fresh(base)
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return name

    def ints(self, values: Sequence[int]) -> str:
        """A 1-D int64 constant."""
        return self.const(np.asarray(list(values), dtype=np.int64), "ints")

    def scalar(self, value: float, elem_type: int) -> str:
        """A scalar constant of ONNX element type ``elem_type``."""
        return self.const(np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(elem_type)), "scalar")

    def reduce(self, op_type: str, x: str, axes: Sequence[int], *, keepdims: bool) -> str:
        """``ReduceSum``/``ReduceMean``/... over ``axes`` in the form this opset wants."""
        takes_input = (op_type == "ReduceSum" and self.opset >= 13) or self.opset >= 18
        if takes_input:
            return self.op(op_type, [x, self.ints(axes)], keepdims=int(keepdims))
        return self.op(op_type, [x], axes=list(axes), keepdims=int(keepdims))


# --- rules -----------------------------------------------------------------------------------


Backward = Callable[["RuleContext", onnx.NodeProto, list[str | None]], list[str | None]]
# (nodes, wrt, seeds, builder) -> {w: gradient or None}: differentiates a subgraph's nodes
BodyGradients = Callable[
    [Sequence[onnx.NodeProto], Sequence[str], Mapping[str, str], "Builder"], dict[str, str | None]
]


@dataclass(frozen=True)
class Rule:
    """How one op type is differentiated.

    Attributes:
        backward: ``(ctx, node, output_grads) -> input_grads`` (None where no gradient).
        inputs: Indices of differentiable inputs (None: all).
        outputs: Indices of differentiable outputs (None: all float outputs).
        prepare: Optional rewrite of the forward node before differentiation (e.g. ask
            MaxPool for its Indices output); returns the node to use.
        min_opset: Lowest opset the emitted gradient ops need.
        outer: The op holds subgraphs (If, Loop, Scan) whose outer-scope references carry
            gradients too: ``backward`` then returns one gradient per input followed by one
            per name of :func:`outer_references`, and the walk prepares the nodes of its
            bodies like those of the main graph.
    """

    backward: Backward
    inputs: tuple[int, ...] | None = None
    outputs: tuple[int, ...] | None = None
    prepare: Callable[[onnx.NodeProto, Builder], onnx.NodeProto] | None = None
    min_opset: int = 13
    outer: bool = False

    def differentiable_input(self, index: int) -> bool:
        """Whether input ``index`` can carry a gradient."""
        return self.inputs is None or index in self.inputs

    def differentiable_output(self, index: int) -> bool:
        """Whether output ``index`` can carry a gradient."""
        return self.outputs is None or index in self.outputs


class RuleContext:
    """What a rule sees: the builder, type info, constants, and shared helpers."""

    def __init__(
        self,
        builder: Builder,
        info: TypeInfo,
        constants: Mapping[str, np.ndarray],
        requires: set[str],
        body: BodyGradients | None = None,
    ) -> None:
        self.b = builder
        self.info = info
        self.constants = constants
        self.requires = requires
        self.body = body
        self._shape_cache: dict[str, str] = {}

    def differentiate_body(
        self,
        nodes: Sequence[onnx.NodeProto],
        *,
        wrt: Sequence[str],
        seeds: Mapping[str, str],
        builder: Builder,
    ) -> dict[str, str | None]:
        """The gradients of a subgraph's nodes (same rules, types and constants), emitted into
        ``builder``: what the If/Loop/Scan rules put into the bodies of their backward."""
        if self.body is None:
            raise GradientError("subgraphs cannot be differentiated here")
        return self.body(nodes, wrt, seeds, builder)

    # facts about forward values

    def needs(self, node: onnx.NodeProto, index: int) -> bool:
        """Whether input ``index`` of ``node`` needs a gradient."""
        return index < len(node.input) and bool(node.input[index]) and node.input[index] in self.requires

    def elem(self, name: str) -> int:
        """ONNX element type of a forward value."""
        elem = self.info.elem.get(name)
        if elem is None:
            raise GradientError(f"value '{name}': element type unknown after shape inference")
        return elem

    def dims(self, name: str) -> tuple[Dim, ...]:
        """Dims of a forward value (rank must be known)."""
        dims = self.info.dims.get(name)
        if dims is None:
            raise GradientError(
                f"value '{name}': its rank is unknown after shape inference; give the student "
                "declared input shapes"
            )
        return dims

    def rank(self, name: str) -> int:
        """Rank of a forward value."""
        return len(self.dims(name))

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        """Shape when fully static."""
        return self.info.static_shape(name)

    def const_value(self, name: str) -> np.ndarray | None:
        """The value of a constant input (initializer or Constant node), else None."""
        if not name:
            return None
        return self.constants.get(name)

    # emitting helpers

    def op(self, op_type: str, inputs: Sequence[str], **attrs: Any) -> Any:
        """Emit a node (see :meth:`Builder.op`)."""
        return self.b.op(op_type, inputs, **attrs)

    def scalar(self, value: float, like: str) -> str:
        """A scalar constant with the element type of ``like``."""
        return self.b.scalar(value, self.elem(like))

    def shape_of(self, name: str) -> str:
        """``Shape(name)`` (a constant when static), emitted once per value."""
        cached = self._shape_cache.get(name)
        if cached is None:
            static = self.static_shape(name)
            cached = self.b.ints(static) if static is not None else self.b.op("Shape", [name])
            self._shape_cache[name] = cached
        return cached

    def reshape_like(self, grad: str, like: str) -> str:
        """Reshape ``grad`` to the shape of the forward value ``like``."""
        return self.op("Reshape", [grad, self.shape_of(like)])

    def zeros_like(self, name: str) -> str:
        """Zeros with the shape and type of ``name``."""
        value = numpy_helper.from_array(np.zeros(1, dtype=helper.tensor_dtype_to_np_dtype(self.elem(name))))
        return self.op("ConstantOfShape", [self.shape_of(name)], value=value)

    def count(self, big: str, small: str) -> str:
        """``size(big) / size(small)`` as a scalar of ``big``'s type (static when possible)."""
        sb, ss = self.static_shape(big), self.static_shape(small)
        if sb is not None and ss is not None:
            return self.scalar(math.prod(sb) / max(math.prod(ss), 1), big)
        dtype = self.elem(big)
        nb = self.op("Cast", [self.op("Size", [big])], to=dtype)
        ns = self.op("Cast", [self.op("Size", [small])], to=dtype)
        return self.op("Div", [nb, ns])

    def reduce_to(self, grad: str, grad_dims: tuple[Dim, ...], target: str) -> str:
        """Sum ``grad`` (of dims ``grad_dims``) over the axes broadcasting added to ``target``."""
        tdims = self.dims(target)
        if len(tdims) > len(grad_dims):
            raise GradientError(f"value '{target}': broadcast to a lower rank, which ONNX does not do")
        lead = len(grad_dims) - len(tdims)
        axes = list(range(lead))
        dynamic = False
        for i, td in enumerate(tdims):
            gd = grad_dims[lead + i]
            if td == gd and td is not None:
                continue
            if td == 1:
                if gd != 1:
                    axes.append(lead + i)
                continue
            if isinstance(td, int) and isinstance(gd, int):
                raise GradientError(f"value '{target}': dim {td} cannot broadcast to {gd}")
            dynamic = True
        if dynamic:
            return self._reduce_to_dynamic(grad, len(grad_dims), target)
        if not axes:
            return grad
        summed = self.b.reduce("ReduceSum", grad, axes, keepdims=True)
        if lead:
            summed = self.reshape_like(summed, target)
        return summed

    def _reduce_to_dynamic(self, grad: str, grad_rank: int, target: str) -> str:
        trank = self.rank(target)
        tshape = self.op("Shape", [target])
        if grad_rank > trank:
            tshape_padded = self.op("Concat", [self.b.ints([1] * (grad_rank - trank)), tshape], axis=0)
        else:
            tshape_padded = tshape
        differs = self.op("Not", [self.op("Equal", [tshape_padded, self.op("Shape", [grad])])])
        axes = self.op("Reshape", [self.op("NonZero", [differs]), self.b.ints([-1])])
        summed = self.op("ReduceSum", [grad, axes], keepdims=1, noop_with_empty_axes=1)
        return self.op("Reshape", [summed, tshape])


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every value, initializer and node name in the graph and its subgraphs (to keep new
    names unique)."""
    names = {v.name for v in [*graph.input, *graph.output, *graph.value_info]}
    names.update(i.name for i in graph.initializer)
    for node in graph.node:
        names.update(node.output)
        names.update(node.input)
        names.add(node.name)
        for sub in subgraphs(node):
            names.update(all_names(sub))
    return names
