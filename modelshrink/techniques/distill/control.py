"""Gradient rules for control flow: ``If``, ``Scan`` and ``Loop``, whose bodies read weights from
the enclosing scope (the weights of a body are lifted to the main graph to be trained, see
:func:`lift_body_weights`).

Each rule differentiates the body's nodes with the same rule table (through
:meth:`RuleContext.differentiate_body`) and puts that backward into a body of its own, next to
a copy of the forward body (recomputed there: a body's intermediate values never leave it):

- ``If``: the gradient is an ``If`` on the same condition. Each branch holds its body's forward
  and backward and outputs one gradient per outer value that needs one (zeros where that
  branch does not use it), so only the branch the batch takes runs, forward and backward.
- ``Scan``: the forward Scan is asked (prepare) for one more scan output per state, the state
  before each step. The gradient is a ``Scan`` over the steps in the opposite order, whose body
  recomputes the step from the stored state and the step's inputs, then carries the state
  gradients back one step and accumulates the gradients of the outer values (shared weights);
  its scan outputs are the gradients of the scan inputs.
- ``Loop``: the same, with the iteration numbers and the states before each iteration as the
  stored sequences (the number of iterations need not be known: it is the stored length, so
  a Loop that stops on its condition works too); gradients reach the initial loop-carried
  values and the outer values (a Loop has no scan inputs).

Scan inputs and outputs along other axes than 0 are refused, naming the node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from modelshrink.techniques.distill.grad import (
    FLOAT_TYPES,
    Builder,
    GradientError,
    Rule,
    RuleContext,
    outer_references,
    subgraphs,
)

__all__ = ["CONTROL_RULES", "BodyWeights", "lift_body_weights"]

Grads = list[str | None]


def _graph_attr(node: onnx.NodeProto, name: str) -> onnx.GraphProto:
    for a in node.attribute:
        if a.name == name and a.type == onnx.AttributeProto.GRAPH:
            return a.g
    raise GradientError(f"no '{name}' graph")


def _ints_attr(node: onnx.NodeProto, name: str, count: int) -> list[int]:
    for a in node.attribute:
        if a.name == name:
            values = [int(v) for v in a.ints]
            return values + [0] * (count - len(values))
    return [0] * count


# --- copying a body under new names ------------------------------------------------------------


def _defined(graph: onnx.GraphProto) -> list[str]:
    """Every value name a graph defines, its subgraphs included."""
    names = [i.name for i in graph.input] + [i.name for i in graph.initializer]
    for node in graph.node:
        names.extend(o for o in node.output if o)
        for sub in subgraphs(node):
            names.extend(_defined(sub))
    return names


def _renamed_graph(graph: onnx.GraphProto, mapping: Mapping[str, str], b: Builder) -> onnx.GraphProto:
    new = onnx.GraphProto()
    new.CopyFrom(graph)
    new.name = b.fresh(graph.name or "body")
    for vi in [*new.input, *new.output, *new.value_info]:
        vi.name = mapping.get(vi.name, vi.name)
    for init in new.initializer:
        init.name = mapping.get(init.name, init.name)
    nodes = _renamed_nodes(list(new.node), mapping, b)
    del new.node[:]
    new.node.extend(nodes)
    return new


def _renamed_nodes(
    nodes: Iterable[onnx.NodeProto], mapping: Mapping[str, str], b: Builder
) -> list[onnx.NodeProto]:
    """Copies of ``nodes`` with value names mapped (in their subgraphs too) and fresh node names."""
    out = []
    for node in nodes:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for i, name in enumerate(new.input):
            new.input[i] = mapping.get(name, name)
        for i, name in enumerate(new.output):
            new.output[i] = mapping.get(name, name)
        new.name = b.fresh(f"{node.name or node.op_type}_copy")
        for attr in new.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                attr.g.CopyFrom(_renamed_graph(attr.g, mapping, b))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    g.CopyFrom(_renamed_graph(g, mapping, b))
        out.append(new)
    return out


def _live(nodes: Sequence[onnx.NodeProto], outputs: Iterable[str]) -> list[onnx.NodeProto]:
    """The nodes some output depends on, in their order."""
    needed = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed.update(outer_references(node))
    return list(reversed(keep))


def _value_info(ctx: RuleContext, name: str, like: str) -> onnx.ValueInfoProto:
    """A value info for ``name`` with the type of the forward value ``like``."""
    elem = ctx.elem(like)
    dims = ctx.info.dims.get(like)
    if dims is None:
        return helper.make_tensor_value_info(name, elem, None)
    return helper.make_tensor_value_info(name, elem, [None] * len(dims))


def _zeros_like(b: Builder, ctx: RuleContext, name: str) -> str:
    value = helper.make_tensor("zero", ctx.elem(name), [1], [0])
    zeros: str = b.op("ConstantOfShape", [b.op("Shape", [name])], value=value)
    return zeros


def _seed(b: Builder, seeds: dict[str, str], out: str, dy: str) -> None:
    seeds[out] = b.op("Sum", [seeds[out], dy]) if out in seeds else dy


def _body_graph(
    ctx: RuleContext,
    *,
    b: Builder,
    forward: onnx.GraphProto,
    mapping: dict[str, str],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[tuple[str, str]],
) -> onnx.GraphProto:
    """A body holding the (renamed) forward nodes the backward in ``b`` needs, then the backward.

    ``mapping`` gives the names of some forward values in the new body (its inputs); every other
    value the forward defines gets a fresh name. ``outputs`` are (value, forward value whose type
    it has).
    """
    for name in _defined(forward):
        if name not in mapping:
            mapping[name] = b.fresh(name)
    out_names = [mapping.get(n, n) for n, _ in outputs]
    nodes = _renamed_nodes([*forward.node, *b.nodes], mapping, b)
    produced = {o for n in nodes for o in n.output}
    final = []
    for name in out_names:
        if name not in produced or name in final:  # an input, an outer value, or a repeat
            ident = b.fresh("out")
            nodes.append(helper.make_node("Identity", [name], [ident], name=b.fresh("Identity_node")))
            name = ident
        final.append(name)
    nodes = _live(nodes, final)
    kept_inits = {i for n in nodes for i in [*n.input, *_outer_of(n)]}
    inits = [_renamed_init(t, mapping) for t in forward.initializer]
    inits = [t for t in [*inits, *b.initializers] if t.name in kept_inits]
    return helper.make_graph(
        nodes,
        b.fresh("backward_body"),
        list(inputs),
        [_value_info(ctx, name, like) for name, (_, like) in zip(final, outputs, strict=True)],
        inits,
    )


def _outer_of(node: onnx.NodeProto) -> list[str]:
    return outer_references(node) if subgraphs(node) else []


def _renamed_init(t: onnx.TensorProto, mapping: Mapping[str, str]) -> onnx.TensorProto:
    new = onnx.TensorProto()
    new.CopyFrom(t)
    new.name = mapping.get(t.name, t.name)
    return new


def _sub_builder(ctx: RuleContext) -> Builder:
    return ctx.b.child()


# --- If ------------------------------------------------------------------------------------------


def _if(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """If: dOuter = If(cond, backward of then_branch, backward of else_branch)."""
    outer = outer_references(node)
    need = [n for n in outer if n in ctx.requires]
    if not need:
        nothing: Grads = [None] * (len(node.input) + len(outer))
        return nothing
    branches = {}
    for attr in ("then_branch", "else_branch"):
        body = _graph_attr(node, attr)
        b = _sub_builder(ctx)
        seeds: dict[str, str] = {}
        for j, out in enumerate(body.output):
            dy = dys[j] if j < len(dys) else None
            if dy is not None:
                _seed(b, seeds, out.name, dy)
        grads = ctx.differentiate_body(list(body.node), wrt=need, seeds=seeds, builder=b)
        outs = [(grads[n] or _zeros_like(b, ctx, n), n) for n in need]
        branches[attr] = _body_graph(ctx, b=b, forward=body, mapping={}, inputs=[], outputs=outs)
    results = ctx.b.op("If", [node.input[0]], outputs=len(need), **branches)
    results = [results] if isinstance(results, str) else list(results)
    by_name = dict(zip(need, results, strict=True))
    none: Grads = [None] * len(node.input)
    return none + [by_name.get(n) for n in outer]


# --- Scan and Loop: stored states, and a reverse Scan over the steps ----------------------------


def _store_states(
    node: onnx.NodeProto, b: Builder, *, first: int, count: int, extra: Sequence[int] = ()
) -> onnx.NodeProto:
    """A copy of ``node`` whose body also outputs, as scan outputs, its inputs ``extra`` and
    ``first .. first + count`` as they were before each step."""
    new = onnx.NodeProto()
    new.CopyFrom(node)
    body = _graph_attr(new, "body")
    for j in [*extra, *range(first, first + count)]:
        src = body.input[j]
        out = b.fresh(f"{src.name}_before")
        body.node.append(helper.make_node("Identity", [src.name], [out], name=b.fresh("store_state")))
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(src)
        vi.name = out
        body.output.append(vi)
        new.output.append(b.fresh(f"{node.name or node.op_type}_states"))
    for attr in new.attribute:
        if attr.name in ("scan_output_directions", "scan_output_axes"):
            attr.ints.extend([0] * (len(extra) + count))
    return new


def _reverse_scan(
    ctx: RuleContext,
    node: onnx.NodeProto,
    *,
    body: onnx.GraphProto,
    sequences: Sequence[tuple[str, int, str]],
    bound: Mapping[str, str],
    states: Sequence[tuple[int, int, str | None, str]],
    seeded_outputs: Sequence[tuple[int, str, int]],
    input_grads: Sequence[tuple[int, int]],
) -> tuple[dict[int, str], dict[str, str], list[str]]:
    """The backward of a Scan or Loop body, as one Scan over the steps in reverse.

    Args:
        body: The forward body.
        sequences: ``(outer value, direction, forward body input it feeds)``: what the
            backward Scan reads one step of (stored states, scan inputs, iteration numbers).
        bound: Forward body input -> value it takes in the recomputation (constants).
        states: ``(body input index, body output index, initial gradient or None, forward
            value of that state)`` for each float state.
        seeded_outputs: ``(body output index, outer gradient [steps, ...], direction)``.
        input_grads: ``(body input index, direction)`` of the scan inputs whose gradients are
            wanted (as scan outputs).

    Returns:
        Gradient of each state's initial value (by body input index), of each outer value, and
        of each wanted scan input (in ``input_grads`` order).
    """
    outer = outer_references(node)
    need_outer = [n for n in outer if n in ctx.requires]
    b = _sub_builder(ctx)
    mapping: dict[str, str] = dict(bound)
    body_inputs: list[onnx.ValueInfoProto] = []
    scan_inputs: list[str] = []
    carry_inits: list[str] = []
    seq_inputs: list[onnx.ValueInfoProto] = []
    in_dirs: list[int] = []
    # carries: one gradient per float state, then one accumulator per outer value
    seeds: dict[str, str] = {}
    for j_in, j_out, init, like in states:
        name = b.fresh("d_state")
        body_inputs.append(_value_info(ctx, name, body.input[j_in].name))
        carry_inits.append(init if init is not None else _zeros_like(ctx.b, ctx, like))
        _seed(b, seeds, body.output[j_out].name, name)
    accumulators = []
    for p in need_outer:
        name = b.fresh("d_outer")
        body_inputs.append(_value_info(ctx, name, p))
        carry_inits.append(_zeros_like(ctx.b, ctx, p))
        accumulators.append(name)
    for outer_value, direction, feeds in sequences:
        name = b.fresh("step")
        mapping[feeds] = name
        seq_inputs.append(_value_info(ctx, name, feeds))
        scan_inputs.append(outer_value)
        in_dirs.append(direction)
    for k_out, dy, direction in seeded_outputs:
        name = b.fresh("d_step")
        seq_inputs.append(_value_info(ctx, name, body.output[k_out].name))
        scan_inputs.append(dy)
        in_dirs.append(direction)
        _seed(b, seeds, body.output[k_out].name, name)
    wrt = [body.input[j].name for j, *_ in states]
    wrt += [body.input[i].name for i, _ in input_grads if body.input[i].name not in wrt]
    wrt += need_outer
    grads = ctx.differentiate_body(list(body.node), wrt=wrt, seeds=seeds, builder=b)
    outs: list[tuple[str, str]] = []
    for j_in, *_ in states:
        src = body.input[j_in].name
        outs.append((grads[src] or _zeros_like(b, ctx, src), src))
    for p, acc in zip(need_outer, accumulators, strict=True):
        g = grads[p]
        outs.append((b.op("Add", [acc, g]) if g is not None else acc, p))
    for i, _ in input_grads:
        src = body.input[i].name
        outs.append((grads[src] or _zeros_like(b, ctx, src), src))
    graph = _body_graph(
        ctx, b=b, forward=body, mapping=mapping, inputs=[*body_inputs, *seq_inputs], outputs=outs
    )
    results = ctx.b.op(
        "Scan",
        [*carry_inits, *scan_inputs],
        outputs=len(outs),
        body=graph,
        num_scan_inputs=len(scan_inputs),
        scan_input_directions=in_dirs,
        scan_output_directions=[1 - d for _, d in input_grads] or None,
    )
    results = [results] if isinstance(results, str) else list(results)
    n_states = len(states)
    state_grads = {j_in: results[k] for k, (j_in, *_) in enumerate(states)}
    outer_grads = dict(zip(need_outer, results[n_states : n_states + len(need_outer)], strict=True))
    return state_grads, outer_grads, results[n_states + len(need_outer) :]


def _float(ctx: RuleContext, name: str) -> bool:
    return ctx.info.elem.get(name) in FLOAT_TYPES


def _prepare_scan(node: onnx.NodeProto, b: Builder) -> onnx.NodeProto:
    """Ask the Scan for the state before each step (one more scan output per state)."""
    m = next(int(a.i) for a in node.attribute if a.name == "num_scan_inputs")
    n_state = len(node.input) - m
    body = _graph_attr(node, "body")
    k = len(body.output) - n_state
    node = _pad_outputs(node, n_state + k, b)
    return _store_states(node, b, first=0, count=n_state)


def _pad_outputs(node: onnx.NodeProto, count: int, b: Builder) -> onnx.NodeProto:
    if len(node.output) >= count:
        return node
    new = onnx.NodeProto()
    new.CopyFrom(node)
    while len(new.output) < count:
        new.output.append(b.fresh(f"{node.name or node.op_type}_unused"))
    return new


def _scan(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Scan: a reverse Scan over the steps (see the module docstring)."""
    body = _graph_attr(node, "body")
    m = next(int(a.i) for a in node.attribute if a.name == "num_scan_inputs")
    n_state = len(node.input) - m
    k = len(body.output) - 2 * n_state  # the prepared Scan stores its states
    if k < 0 or len(node.output) != n_state + k + n_state:
        raise GradientError("the Scan was not prepared (its stored states are missing)")
    if any(_ints_attr(node, "scan_input_axes", m)) or any(_ints_attr(node, "scan_output_axes", k)):
        raise GradientError("scan axes other than 0 have no gradient rule; transpose around the Scan")
    in_dirs = _ints_attr(node, "scan_input_directions", m)
    out_dirs = _ints_attr(node, "scan_output_directions", k)
    stored = node.output[n_state + k :]
    states = [
        (j, j, dys[j] if j < len(dys) else None, node.input[j])
        for j in range(n_state)
        if _float(ctx, body.input[j].name)
    ]
    sequences = [(stored[j], 1, body.input[j].name) for j in range(n_state)]
    sequences += [(node.input[n_state + i], 1 - in_dirs[i], body.input[n_state + i].name) for i in range(m)]
    seeded = [
        (n_state + q, dy, 1 - out_dirs[q])
        for q in range(k)
        if (dy := (dys[n_state + q] if n_state + q < len(dys) else None)) is not None
    ]
    wanted = [(n_state + i, in_dirs[i]) for i in range(m) if ctx.needs(node, n_state + i)]
    state_grads, outer_grads, input_grads = _reverse_scan(
        ctx,
        node,
        body=body,
        sequences=sequences,
        bound={},
        states=states,
        seeded_outputs=seeded,
        input_grads=wanted,
    )
    grads: Grads = [None] * len(node.input)
    for j, g in state_grads.items():
        grads[j] = g
    for (i, _), g in zip(wanted, input_grads, strict=True):
        grads[i] = g
    return grads + [outer_grads.get(n) for n in outer_references(node)]


def _prepare_loop(node: onnx.NodeProto, b: Builder) -> onnx.NodeProto:
    """Ask the Loop for its iteration numbers and the states before each iteration."""
    body = _graph_attr(node, "body")
    n_state = len(body.input) - 2
    k = len(body.output) - 1 - n_state
    node = _pad_outputs(node, n_state + k, b)
    return _store_states(node, b, first=2, count=n_state, extra=[0])


def _loop(ctx: RuleContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    """Loop: a reverse Scan over the stored iterations (see the module docstring)."""
    body = _graph_attr(node, "body")
    n_state = len(body.input) - 2
    k = len(body.output) - 1 - n_state - (n_state + 1)
    if k < 0 or len(node.output) != n_state + k + 1 + n_state:
        raise GradientError("the Loop was not prepared (its stored states are missing)")
    iters = node.output[n_state + k]
    stored = node.output[n_state + k + 1 :]
    b = ctx.b
    true = b.const(np.asarray(True), "true")
    states = [
        (2 + j, 1 + j, dys[j] if j < len(dys) else None, node.input[2 + j])
        for j in range(n_state)
        if _float(ctx, body.input[2 + j].name)
    ]
    sequences = [(iters, 1, body.input[0].name)]
    sequences += [(stored[j], 1, body.input[2 + j].name) for j in range(n_state)]
    seeded = [
        (1 + n_state + q, dy, 1)
        for q in range(k)
        if (dy := (dys[n_state + q] if n_state + q < len(dys) else None)) is not None
    ]
    state_grads, outer_grads, _ = _reverse_scan(
        ctx,
        node,
        body=body,
        sequences=sequences,
        bound={body.input[1].name: true},
        states=states,
        seeded_outputs=seeded,
        input_grads=[],
    )
    grads: Grads = [None] * len(node.input)
    for j, g in state_grads.items():
        grads[j] = g
    return grads + [outer_grads.get(n) for n in outer_references(node)]


CONTROL_RULES: dict[str, Rule] = {
    "If": Rule(_if, inputs=(), outer=True),
    "Scan": Rule(_scan, prepare=_prepare_scan, outer=True),
    "Loop": Rule(_loop, prepare=_prepare_loop, outer=True),
}


# --- weights of bodies -------------------------------------------------------------------------


_CONTROL_OPS = ("If", "Loop", "Scan")


class BodyWeights:
    """Which weights of If/Loop/Scan bodies can be trained: those of bodies nested only in
    If/Loop/Scan nodes, whose names no other graph of the model defines (lifted to the main
    graph, a weight is read by name from every scope)."""

    def __init__(self, model: ir.Model) -> None:
        self._owner: dict[int, ir.Node] = {}
        self._count: dict[str, int] = {}
        for graph in model.graphs():
            for value in [*graph.inputs, *graph.initializers.values()]:
                self._add(value.name)
            for node in graph:
                for value in node.outputs:
                    self._add(value.name)
                for attr in node.attributes.values():
                    if attr.type == ir.AttributeType.GRAPH:
                        self._owner[id(attr.as_graph())] = node
                    elif attr.type == ir.AttributeType.GRAPHS:
                        for g in attr.as_graphs():
                            self._owner[id(g)] = node
        self._main = model.graph

    def _add(self, name: str | None) -> None:
        if name:
            self._count[name] = self._count.get(name, 0) + 1

    def refusal(self, name: str, graph: ir.Graph) -> str | None:
        """Why the weight ``name`` of ``graph`` (a body) cannot be trained, or None."""
        current: ir.Graph | None = graph
        while current is not None and current is not self._main:
            owner = self._owner.get(id(current))
            if owner is None:
                return "inside a subgraph of unknown owner: not trained"
            if owner.op_type not in _CONTROL_OPS or owner.domain not in ("", "ai.onnx"):
                return f"inside a subgraph of {owner.op_type} '{owner.name}': not trained (only If/Loop/Scan bodies)"
            current = owner.graph
        if self._count.get(name, 0) > 1:
            return f"its name '{name}' is defined in more than one graph of the model: not trained"
        return None


def lift_body_weights(proto: onnx.ModelProto, names: Iterable[str]) -> list[onnx.ValueInfoProto]:
    """Remove the weights ``names`` (initializers or Constant nodes of If/Loop/Scan bodies) from
    their bodies; the bodies then read them from the enclosing scope. Returns a value info per
    lifted weight, for the caller to make them inputs of the main graph."""
    wanted = set(names)
    found: dict[str, onnx.ValueInfoProto] = {}

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for sub in subgraphs(node):
                keep = []
                for init in sub.initializer:
                    if init.name in wanted:
                        found[init.name] = helper.make_tensor_value_info(
                            init.name, init.data_type, list(init.dims)
                        )
                    else:
                        keep.append(init)
                del sub.initializer[:]
                sub.initializer.extend(keep)
                kept_nodes = []
                for inner in sub.node:
                    if inner.op_type == "Constant" and inner.output and inner.output[0] in wanted:
                        t = inner.attribute[0].t
                        found[inner.output[0]] = helper.make_tensor_value_info(
                            inner.output[0], t.data_type, list(t.dims)
                        )
                    else:
                        kept_nodes.append(inner)
                del sub.node[:]
                sub.node.extend(kept_nodes)
                visit(sub)

    visit(proto.graph)
    return [found[n] for n in names if n in found]
