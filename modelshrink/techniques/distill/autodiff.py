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
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto

from modelshrink.techniques.distill.grad import (
    FLOAT_TYPES,
    Builder,
    GradientError,
    Rule,
    RuleContext,
    TypeInfo,
    all_names,
    constant_values,
    outer_references,
)

__all__ = [
    "append_gradients",
    "differentiate",
    "gradient_path",
    "prepare_nodes",
    "requires_grad",
]

logger = logging.getLogger(__name__)


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
        if not hit and (rule is None or rule.outer):
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
    rules: Mapping[str, Rule],
) -> dict[str, str | None]:
    """Emit the gradient of the seeded outputs with respect to ``wrt``.

    Args:
        nodes: Forward nodes in topological order (already prepared, see :func:`prepare_nodes`).
        wrt: Values to differentiate with respect to.
        seeds: ``{output value: name of the value holding dL/doutput}``.
        info: Types and shapes of the forward values.
        builder: Where gradient nodes go.
        constants: Constant values of initializers and Constant nodes.
        rules: The rule table (:data:`.rules.RULES` for the default set).

    Returns:
        ``{w: gradient value name}``; None for a ``w`` no gradient reaches.

    Raises:
        GradientError: A node on the gradient path has no rule, or a rule cannot handle it.
    """
    req = requires_grad(nodes, wrt, info, rules)
    path = gradient_path(nodes, wrt, seeds, info, rules)
    for node in path:
        if _rule_for(node, rules) is None:
            raise GradientError(
                f"{_describe(node)} is on the gradient path and has no gradient rule; freeze the "
                "parameters before it with --train PATTERN, or ask for a rule for this op"
            )
    contributions: dict[str, list[str]] = {out: [seed] for out, seed in seeds.items()}

    def body(
        inner: Sequence[onnx.NodeProto], inner_wrt: Sequence[str], inner_seeds: Mapping[str, str], b: Builder
    ) -> dict[str, str | None]:
        return differentiate(
            inner, wrt=inner_wrt, seeds=inner_seeds, info=info, builder=b, constants=constants, rules=rules
        )

    ctx = RuleContext(builder, info, constants, req, body)
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
        operands = list(node.input) + (outer_references(node) if rule.outer else [])
        for i, grad in enumerate(grads):
            if grad is None or i >= len(operands) or not operands[i] or operands[i] not in req:
                continue
            contributions.setdefault(operands[i], []).append(grad)
    return {w: (_accumulate(builder, contributions[w]) if contributions.get(w) else None) for w in wrt}


def gradient_path(
    nodes: Sequence[onnx.NodeProto],
    wrt: Iterable[str],
    seeds: Iterable[str],
    info: TypeInfo,
    rules: Mapping[str, Rule],
) -> list[onnx.NodeProto]:
    """The nodes that need a gradient rule (an output requires grad and reaches a seed)."""
    req = requires_grad(nodes, wrt, info, rules)
    reach = set(seeds)
    for node in reversed(nodes):
        if any(o in reach for o in node.output):
            reach.update(i for i in node.input if i)
            reach.update(outer_references(node))
    return [n for n in nodes if any(o in req and o in reach for o in n.output)]


def append_gradients(
    model: onnx.ModelProto,
    *,
    wrt: Sequence[str],
    seeds: Mapping[str, str],
    rules: Mapping[str, Rule],
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
    model = _copy(model)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    taken = all_names(graph)
    builder = Builder(taken, opset, prefix)
    info = TypeInfo.from_model(model)
    prepared, changed = prepare_nodes(list(graph.node), wrt, seeds, info, rules, builder)
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


def prepare_nodes(
    nodes: Sequence[onnx.NodeProto],
    wrt: Iterable[str],
    seeds: Iterable[str],
    info: TypeInfo,
    rules: Mapping[str, Rule],
    builder: Builder,
) -> tuple[list[onnx.NodeProto], bool]:
    """Apply each rule's ``prepare`` to the nodes on the gradient path, and, inside the bodies of
    If/Loop/Scan nodes on it, to the body nodes on the body's path (outer values that require
    a gradient and every float body input count as differentiated; every body output as seeded).

    Returns the nodes (prepared ones are new protos; the rest are the given ones) and whether
    any changed.
    """
    wrt = list(wrt)
    req = requires_grad(nodes, wrt, info, rules)
    on_path = {id(n) for n in gradient_path(nodes, wrt, seeds, info, rules)}
    out: list[onnx.NodeProto] = []
    changed = False
    for node in nodes:
        rule = _rule_for(node, rules)
        new = node
        if id(node) in on_path and rule is not None:
            if rule.outer:
                new = _prepare_bodies(node, req, info, rules, builder)
            if rule.prepare is not None:
                new = rule.prepare(new, builder)
        changed = changed or new is not node
        out.append(new)
    return out, changed


def _prepare_bodies(
    node: onnx.NodeProto, req: set[str], info: TypeInfo, rules: Mapping[str, Rule], builder: Builder
) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    changed = False
    for attr in copy.attribute:
        if attr.type != onnx.AttributeProto.GRAPH:
            continue
        body = attr.g
        inner_wrt = [n for n in outer_references(node) if n in req]
        inner_wrt += [i.name for i in body.input if info.elem.get(i.name) in FLOAT_TYPES]
        nodes, body_changed = prepare_nodes(
            list(body.node), inner_wrt, [o.name for o in body.output], info, rules, builder
        )
        if body_changed:
            del body.node[:]
            body.node.extend(nodes)
            changed = True
    return copy if changed else node


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
