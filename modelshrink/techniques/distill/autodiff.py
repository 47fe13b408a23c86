"""Reverse-mode automatic differentiation over an ONNX graph, emitting standard ONNX ops.

Given the nodes of a forward graph (topologically ordered, as ONNX requires), the names of
the values to differentiate with respect to (``wrt``, typically the trainable parameters)
and, for some outputs, the name of a value holding ``dL/doutput`` (the *seed*), this module
emits the nodes that compute ``dL/dw`` for every ``w`` in ``wrt``:

- A value *requires grad* when it is in ``wrt`` or is a float output of a node with a
  differentiable input that requires grad. A value *reaches the loss* when a seed depends
  on it. Nodes with an output in both sets are on the *gradient path*; every other node runs
  forward only and costs nothing extra.
- Walking the gradient path backwards, each node's rule (one op family per function in
  :mod:`.rules`) turns the gradients of its outputs into contributions to its inputs. A
  value used by several nodes (fan-out, tied parameters) gets the ``Sum`` of its
  contributions; broadcasting is undone by ``ReduceSum`` over the broadcast axes.
- A node on the gradient path whose op has no rule is an error naming the node and op type.

Every emitted node is a standard ``ai.onnx`` op, so the result runs on stock onnxruntime
(and, in float64, on ``onnx.reference`` for finite-difference tests).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelshrink.errors import UnsupportedModelError

__all__ = [
    "FLOAT_TYPES",
    "Builder",
    "GradientError",
    "Rule",
    "RuleContext",
    "TypeInfo",
    "append_gradients",
    "constant_values",
    "differentiate",
    "gradient_path",
    "outer_references",
]

logger = logging.getLogger(__name__)

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16})
Dim = int | str | None


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
        graph = inferred.graph
        for vi in [*graph.input, *graph.output, *graph.value_info]:
            info.add_value_info(vi)
        for init in graph.initializer:
            info.elem[init.name] = init.data_type
            info.dims[init.name] = tuple(int(d) for d in init.dims)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value":
                        info.elem[node.output[0]] = attr.t.data_type
                        info.dims[node.output[0]] = tuple(int(d) for d in attr.t.dims)
        return info

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
    """Values of initializers and ``Constant`` node outputs, by name."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.attribute:
            attr = node.attribute[0]
            if attr.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_int") or attr.name in ("value_floats", "value_ints"):
                values[node.output[0]] = np.asarray(helper.get_attribute_value(attr))
    return values


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
        takes_input = op_type == "ReduceSum" or self.opset >= 18
        if takes_input:
            return self.op(op_type, [x, self.ints(axes)], keepdims=int(keepdims))
        return self.op(op_type, [x], axes=list(axes), keepdims=int(keepdims))


# --- rules -----------------------------------------------------------------------------------


Backward = Callable[["RuleContext", onnx.NodeProto, list[str | None]], list[str | None]]


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
    """

    backward: Backward
    inputs: tuple[int, ...] | None = None
    outputs: tuple[int, ...] | None = None
    prepare: Callable[[onnx.NodeProto, Builder], onnx.NodeProto] | None = None
    min_opset: int = 13

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
    ) -> None:
        self.b = builder
        self.info = info
        self.constants = constants
        self.requires = requires
        self._shape_cache: dict[str, str] = {}

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


def _accumulate(builder: Builder, parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else builder.op("Sum", parts)


def _rule_for(node: onnx.NodeProto, rules: Mapping[str, Rule]) -> Rule | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    return rules.get(node.op_type)


def _describe(node: onnx.NodeProto) -> str:
    domain = "" if node.domain in ("", "ai.onnx") else f"{node.domain}::"
    return f"node '{node.name or node.output[0]}' ({domain}{node.op_type})"


def requires_grad(
    nodes: Sequence[onnx.NodeProto],
    wrt: Iterable[str],
    info: TypeInfo,
    rules: Mapping[str, Rule],
) -> set[str]:
    """Values that depend differentiably on ``wrt``."""
    req = set(wrt)
    for node in nodes:
        rule = _rule_for(node, rules)
        inputs = list(node.input)
        hit = any(
            name in req
            for i, name in enumerate(inputs)
            if name and (rule is None or rule.differentiable_input(i))
        )
        if not hit and rule is None:
            hit = any(name in req for name in outer_references(node))
        if not hit:
            continue
        for j, out in enumerate(node.output):
            if not out or info.elem.get(out, TensorProto.FLOAT) not in FLOAT_TYPES:
                continue
            if rule is None or rule.differentiable_output(j):
                req.add(out)
    return req


def differentiate(
    nodes: Sequence[onnx.NodeProto],
    *,
    wrt: Sequence[str],
    seeds: Mapping[str, str],
    info: TypeInfo,
    builder: Builder,
    constants: Mapping[str, np.ndarray],
    rules: Mapping[str, Rule] | None = None,
) -> dict[str, str | None]:
    """Emit the gradient of the seeded outputs with respect to ``wrt``.

    Args:
        nodes: Forward nodes in topological order (already prepared, see :func:`prepare_nodes`).
        wrt: Values to differentiate with respect to.
        seeds: ``{output value: name of the value holding dL/doutput}``.
        info: Types and shapes of the forward values.
        builder: Where gradient nodes go.
        constants: Constant values of initializers and Constant nodes.
        rules: The rule table (default: :data:`.rules.RULES`).

    Returns:
        ``{w: gradient value name}``; None for a ``w`` no gradient reaches.

    Raises:
        GradientError: A node on the gradient path has no rule, or a rule cannot handle it.
    """
    rules = _default_rules(rules)
    req = requires_grad(nodes, wrt, info, rules)
    path = gradient_path(nodes, wrt, seeds, info, rules)
    for node in path:
        if _rule_for(node, rules) is None:
            raise GradientError(
                f"{_describe(node)} is on the gradient path and has no gradient rule; freeze the "
                "parameters before it with --train PATTERN, or ask for a rule for this op"
            )
    contributions: dict[str, list[str]] = {out: [seed] for out, seed in seeds.items()}
    ctx = RuleContext(builder, info, constants, req)
    for node in reversed(path):
        rule = _rule_for(node, rules)
        assert rule is not None
        dys: list[str | None] = []
        for out in node.output:
            parts = contributions.get(out) if out in req else None
            dys.append(_accumulate(builder, parts) if parts else None)
        if all(dy is None for dy in dys):
            continue
        try:
            grads = rule.backward(ctx, node, dys)
        except GradientError as exc:
            raise GradientError(f"{_describe(node)}: {exc.message}") from exc
        for i, grad in enumerate(grads):
            if grad is None or not ctx.needs(node, i):
                continue
            contributions.setdefault(node.input[i], []).append(grad)
    return {w: (_accumulate(builder, contributions[w]) if contributions.get(w) else None) for w in wrt}


def gradient_path(
    nodes: Sequence[onnx.NodeProto],
    wrt: Iterable[str],
    seeds: Iterable[str],
    info: TypeInfo,
    rules: Mapping[str, Rule] | None = None,
) -> list[onnx.NodeProto]:
    """The nodes that need a gradient rule (an output requires grad and reaches a seed)."""
    rules = _default_rules(rules)
    req = requires_grad(nodes, wrt, info, rules)
    reach = set(seeds)
    for node in reversed(nodes):
        if any(o in reach for o in node.output):
            reach.update(i for i in node.input if i)
            reach.update(outer_references(node))
    return [n for n in nodes if any(o in req and o in reach for o in n.output)]


def _default_rules(rules: Mapping[str, Rule] | None) -> Mapping[str, Rule]:
    if rules is not None:
        return rules
    from modelshrink.techniques.distill.rules import RULES

    return RULES


def append_gradients(
    model: onnx.ModelProto,
    *,
    wrt: Sequence[str],
    seeds: Mapping[str, str],
    rules: Mapping[str, Rule] | None = None,
    prefix: str = "grad",
) -> tuple[onnx.ModelProto, dict[str, str | None], TypeInfo]:
    """A copy of ``model`` with the nodes computing ``dL/dw`` for every ``w`` in ``wrt`` appended.

    ``seeds`` maps output values to values (graph inputs, initializers or node outputs of
    ``model``) holding ``dL/doutput``. Nodes on the gradient path are first *prepared* (e.g.
    MaxPool is asked for its Indices); nothing else in the forward graph changes. The
    gradients are not made graph outputs: the caller decides what to do with them.

    Returns:
        The new model, ``{w: gradient name or None}``, and the type info of its values.

    Raises:
        GradientError: See :func:`differentiate`.
    """
    rules = _default_rules(rules)
    model = _copy(model)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    taken = _all_names(graph)
    builder = Builder(taken, opset, prefix)
    info = TypeInfo.from_model(model)
    nodes = list(graph.node)
    on_path = {id(n) for n in gradient_path(nodes, wrt, seeds, info, rules)}
    prepared = []
    changed = False
    for node in nodes:
        rule = _rule_for(node, rules)
        if id(node) in on_path and rule is not None and rule.prepare is not None:
            new = rule.prepare(node, builder)
            changed = changed or new is not node
            prepared.append(new)
        else:
            prepared.append(node)
    if changed:
        del graph.node[:]
        graph.node.extend(prepared)
        info = TypeInfo.from_model(model)
    grads = differentiate(
        list(graph.node),
        wrt=wrt,
        seeds=seeds,
        info=info,
        builder=builder,
        constants=constant_values(graph),
        rules=rules,
    )
    graph.node.extend(builder.nodes)
    graph.initializer.extend(builder.initializers)
    return model, grads, info


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in [*graph.input, *graph.output, *graph.value_info]}
    names.update(i.name for i in graph.initializer)
    for node in graph.node:
        names.update(node.output)
        names.update(node.input)
        names.add(node.name)
    return names
