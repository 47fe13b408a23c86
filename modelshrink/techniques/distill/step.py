"""The train step as one ONNX model: forward, loss, backward and optimizer update.

``build_step`` returns two models built from the student:

- the *step* model: inputs (batch, teacher targets, labels, parameters, optimizer state,
  BatchNormalization buffers, ``lr``, ``step``), outputs (loss, new parameters, new state,
  new buffers), run once per batch by a plain onnxruntime ``InferenceSession``;
- the *eval* model: the student's forward graph with parameters as inputs and the same loss,
  for validation without rebuilding anything.

The student's trainable weights (float32 initializers and ``Constant`` node values, those of
If/Loop/Scan bodies lifted to the main graph) become graph inputs of both; everything else in
the student stays as it is.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from modelshrink.graph import weights
from modelshrink.techniques.distill.autodiff import append_gradients
from modelshrink.techniques.distill.control import BodyWeights, lift_body_weights
from modelshrink.techniques.distill.grad import Builder, GradientError, TypeInfo, all_names, subgraphs
from modelshrink.techniques.distill.losses import LossTerms, emit_loss
from modelshrink.techniques.distill.optim import OptimizerSpec, SlotNames, emit_update
from modelshrink.techniques.distill.rules import RULES

__all__ = [
    "BnMode",
    "Parameter",
    "StepModels",
    "StudentGraph",
    "TargetSpec",
    "build_step",
    "prepare_student",
]

logger = logging.getLogger(__name__)

BnMode = Literal["frozen", "train"]
# Ops whose gradient rule emits ops of opset 16 (ScatterElements/ScatterND with reduction).
_NEEDS_OPSET_16 = {op for op, rule in RULES.items() if rule.min_opset >= 16}
# Before opset 11, Upsample and Resize map output to input coordinates as x / scale
# ("asymmetric") and pick the floor for nearest; onnx's version converter writes a Resize
# with the defaults (half_pixel, round_prefer_floor) instead, which computes another function.
_OLD_RESIZE_BEFORE = 11
_MIN_OPSET = 13


@dataclass(frozen=True)
class Parameter:
    """A trainable weight of the student.

    Attributes:
        name: Its value name (initializer name, or the Constant node's output).
        kind: ``initializer`` or ``constant``.
        value: Its initial value.
        op_type: The op of its first consumer (for the report).
        consumer: The name of its first consumer node.
    """

    name: str
    kind: Literal["initializer", "constant"]
    value: np.ndarray
    op_type: str
    consumer: str

    @property
    def decays(self) -> bool:
        """Weight decay applies to matrices/kernels/embeddings, not biases or scales."""
        return self.value.ndim >= 2


@dataclass
class StudentGraph:
    """The student's forward graph prepared for training.

    Attributes:
        proto: Forward model; trainable parameters (and buffers) are graph inputs.
        params: Trainable parameters, in a fixed order.
        buffers: BatchNormalization running statistics updated by ``--bn-mode train``.
        frozen: ``(weight name, consumer node, op type, reason)`` for weights left alone.
        notes: Facts for the report (e.g. an opset conversion of the step graph).
        opset: Default-domain opset of ``proto``.
    """

    proto: onnx.ModelProto
    params: list[Parameter]
    buffers: dict[str, np.ndarray]
    frozen: list[tuple[str, str, str, str]]
    notes: list[str] = field(default_factory=list)
    opset: int = 0


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _differentiable_use(node: ir.Node, index: int) -> bool | None:
    """True/False per the rule table; None when the op has no rule."""
    if node.domain not in ("", "ai.onnx"):
        return None
    rule = RULES.get(node.op_type)
    if rule is None:
        return None
    return rule.differentiable_input(index)


def _bn_stat_names(model: ir.Model) -> set[str]:
    names = set()
    for node in model.graph:
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
            for value in node.inputs[3:5]:
                if value is not None and value.name:
                    names.add(value.name)
    return names


def prepare_student(model: ir.Model, *, train: str = "all", bn_mode: BnMode = "frozen") -> StudentGraph:
    """Pick the trainable weights and turn them into graph inputs of a forward model.

    Raises:
        GradientError: The opset cannot be converted to one the gradient ops need.
    """
    frozen: list[tuple[str, str, str, str]] = []
    params: list[Parameter] = []
    buffers: dict[str, np.ndarray] = {}
    bn_stats = _bn_stat_names(model)
    body_weights = BodyWeights(model)
    for w in weights(model):
        uses = w.consumers()
        consumer = uses[0][0] if uses else None
        cname = (consumer.name or w.name) if consumer is not None else w.name
        cop = consumer.op_type if consumer is not None else "?"

        def freeze(reason: str, name: str = w.name, cname: str = cname, cop: str = cop) -> None:
            frozen.append((name, cname, cop, reason))

        if w.graph is not model.graph and (reason := body_weights.refusal(w.name, w.graph)) is not None:
            freeze(reason)
            continue
        if w.dtype != ir.DataType.FLOAT:
            if w.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE):
                freeze(f"{w.dtype.name.lower()} weights are not trained (only float32)")
            continue
        if w.is_graph_input:
            freeze("a graph input (callers can override it): not trained")
            continue
        if w.name in bn_stats:
            if bn_mode == "train":
                buffers[w.name] = np.array(w.numpy(), dtype=np.float32)
            continue
        if w.size <= 1:
            freeze("a scalar constant: kept as it is")
            continue
        if not uses:
            continue
        usable = [_differentiable_use(node, idx) for node, idx in uses]
        if not any(u is not False for u in usable):
            freeze("feeds no input that carries a gradient")
            continue
        if all(u is None for u in usable):
            ops = ", ".join(sorted({node.op_type for node, _ in uses}))
            freeze(f"feeds only ops without a gradient rule ({ops})")
            continue
        if train != "all" and not fnmatch.fnmatchcase(w.name, train):
            freeze(f"not matched by --train {train}: frozen")
            continue
        params.append(Parameter(w.name, w.kind, np.array(w.numpy(), dtype=np.float32), cop, cname))
    proto = ir.serde.serialize_model(model)
    notes: list[str] = []
    proto = _ensure_opset(proto, notes)
    _params_to_inputs(proto, [p.name for p in params] + list(buffers))
    return StudentGraph(proto, params, buffers, frozen, notes, _opset(proto))


def _ensure_opset(proto: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    opset = _opset(proto)
    ops = _op_types(proto.graph)
    target = _MIN_OPSET if opset < _MIN_OPSET else opset
    if target < 16 and ops & _NEEDS_OPSET_16:
        target = 16
    if target == opset:
        return proto
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as exc:  # the converter raises plain RuntimeErrors
        raise GradientError(
            f"the student uses opset {opset}; its train step needs opset {target} and the "
            f"onnx version converter failed: {exc}"
        ) from exc
    if opset < _OLD_RESIZE_BEFORE:  # every Resize now came from an Upsample or a Resize-10
        for node in converted.graph.node:
            if node.op_type == "Resize":
                _keep_old_resize_semantics(node)
    notes.append(
        f"the train step ran at opset {target} (the student uses {opset}); the output keeps opset {opset}"
    )
    return converted


def _op_types(graph: onnx.GraphProto) -> set[str]:
    """Op types of a graph and of its If/Loop/Scan bodies."""
    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for sub in subgraphs(node):
            ops |= _op_types(sub)
    return ops


def _keep_old_resize_semantics(node: onnx.NodeProto) -> None:
    """Give a converted Upsample / Resize-10 the coordinates it had: ``x / scale``, floor."""
    keep = [a for a in node.attribute if a.name not in ("coordinate_transformation_mode", "nearest_mode")]
    del node.attribute[:]
    node.attribute.extend(keep)
    node.attribute.append(helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
    node.attribute.append(helper.make_attribute("nearest_mode", "floor"))


def _params_to_inputs(proto: onnx.ModelProto, names: Sequence[str]) -> None:
    graph = proto.graph
    wanted = set(names)
    inputs: dict[str, onnx.ValueInfoProto] = {}
    keep_inits = []
    for init in graph.initializer:
        if init.name in wanted:
            inputs[init.name] = helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
        else:
            keep_inits.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    keep_nodes = []
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in wanted:
            t = node.attribute[0].t
            inputs[node.output[0]] = helper.make_tensor_value_info(node.output[0], t.data_type, list(t.dims))
        else:
            keep_nodes.append(node)
    del graph.node[:]
    graph.node.extend(keep_nodes)
    inputs.update((vi.name, vi) for vi in lift_body_weights(proto, [n for n in names if n not in inputs]))
    graph.input.extend(inputs[n] for n in names if n in inputs)


# --- BatchNormalization with batch statistics ------------------------------------------------


def _rewrite_bn_train(proto: onnx.ModelProto, info: TypeInfo, b: Builder) -> dict[str, str]:
    """Replace each BatchNormalization by batch-statistics ops; returns buffer -> updated value."""
    updates: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in proto.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        x, scale, bias, mean_in, var_in = node.input[:5]
        dims = info.dims.get(x)
        if dims is None:
            raise GradientError(f"BatchNormalization '{node.name}': input rank unknown")
        rank = len(dims)
        elem = info.elem.get(x, TensorProto.FLOAT)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        eps = float(attrs.get("epsilon", 1e-5))
        momentum = float(attrs.get("momentum", 0.9))
        axes = [0, *range(2, rank)]
        start = len(b.nodes)
        cshape = b.ints([-1] + [1] * (rank - 2))
        mean = b.reduce("ReduceMean", x, axes, keepdims=True)
        centered = b.op("Sub", [x, mean])
        var = b.reduce("ReduceMean", b.op("Mul", [centered, centered]), axes, keepdims=True)
        inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, b.scalar(eps, elem)])])])
        normed = b.op("Mul", [centered, inv])
        scaled = b.op("Mul", [normed, b.op("Reshape", [scale, cshape])])
        b.op("Add", [scaled, b.op("Reshape", [bias, cshape])])
        b.nodes[-1].output[0] = node.output[0]
        flat = b.ints([-1])
        keep = b.scalar(momentum, elem)
        take = b.scalar(1.0 - momentum, elem)
        for buf, stat in ((mean_in, mean), (var_in, var)):
            if buf in updates or not buf:
                continue
            updates[buf] = b.op(
                "Add", [b.op("Mul", [buf, keep]), b.op("Mul", [b.op("Reshape", [stat, flat]), take])]
            )
        new_nodes.extend(b.nodes[start:])
        del b.nodes[start:]
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes)
    return updates


# --- the step and eval models ----------------------------------------------------------------


@dataclass(frozen=True)
class TargetSpec:
    """Inputs the step needs besides the batch: teacher targets, labels, features.

    Attributes:
        outputs: ``(student output, kind, producer op, target dims)`` per distilled output.
        temperature: For ``kl``.
        labels: ``(class output, number of classes, producer op, label dims)`` or None.
        alpha: Weight of the label loss.
        matches: ``(student tensor, feature dims)`` per ``--match``.
    """

    outputs: tuple[tuple[str, Literal["kl", "mse"], str | None, tuple[int | str, ...]], ...]
    temperature: float = 1.0
    labels: tuple[str, int, str | None, tuple[int | str, ...]] | None = None
    alpha: float = 0.0
    matches: tuple[tuple[str, tuple[int | str, ...]], ...] = ()


@dataclass
class StepModels:
    """The built models and the names the trainer feeds and reads.

    Attributes:
        step: The train-step model.
        eval: Forward + loss, parameters as inputs (no gradients).
        target_inputs: Student output -> teacher target input name.
        labels_input: Labels input name, or None.
        match_inputs: Student tensor -> teacher feature input name.
        params: Parameters updated by the step, in the order of the flat vector.
        untrained: Parameters no gradient reaches (kept as they are, fed by name).
        flat: Names of the flat parameter vector and its optimizer state, in and out.
        buffer_outputs: Buffer -> output name holding its update.
        loss: Loss output name.
        lr: Learning-rate input name.
        step_input: Step-number input name.
        eval_outputs: Output names of the eval model (loss first, then the student outputs).
    """

    step: onnx.ModelProto
    eval: onnx.ModelProto
    target_inputs: dict[str, str]
    labels_input: str | None
    match_inputs: dict[str, str]
    params: list[Parameter]
    untrained: list[Parameter]
    flat: SlotNames
    buffer_outputs: dict[str, str]
    loss: str
    lr: str
    step_input: str
    eval_outputs: list[str]

    def flatten(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """The flat parameter vector from per-parameter arrays."""
        return np.concatenate([np.asarray(values[p.name], dtype=np.float32).ravel() for p in self.params])

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Per-parameter arrays from the flat vector."""
        out, offset = {}, 0
        for p in self.params:
            out[p.name] = flat[offset : offset + p.value.size].reshape(p.value.shape).copy()
            offset += p.value.size
        return out

    def initial_flat(self) -> np.ndarray:
        """The flat vector of the student's current values."""
        return self.flatten({p.name: p.value for p in self.params})


def _producers(proto: onnx.ModelProto) -> dict[str, str]:
    return {out: node.op_type for node in proto.graph.node for out in node.output}


def _add_loss(
    proto: onnx.ModelProto, spec: TargetSpec, b: Builder
) -> tuple[str, dict[str, str], str | None, dict[str, str]]:
    graph = proto.graph
    target_inputs: dict[str, str] = {}
    outputs = []
    for out, kind, producer, dims in spec.outputs:
        name = b.fresh(f"teacher_{out}")
        target_inputs[out] = name
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims)))
        outputs.append((out, name, kind, producer))
    labels_term = None
    labels_input = None
    if spec.labels is not None:
        out, classes, producer, dims = spec.labels
        labels_input = b.fresh("labels")
        graph.input.append(helper.make_tensor_value_info(labels_input, TensorProto.INT64, list(dims)))
        labels_term = (out, labels_input, classes, producer)
    match_inputs: dict[str, str] = {}
    matches = []
    for tensor, dims in spec.matches:
        name = b.fresh(f"teacher_feature_{tensor}")
        match_inputs[tensor] = name
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims)))
        matches.append((tensor, name))
    terms = LossTerms(tuple(outputs), spec.temperature, labels_term, spec.alpha, tuple(matches))
    loss, _ = emit_loss(b, terms)
    graph.node.extend(b.nodes)
    graph.initializer.extend(b.initializers)
    b.nodes.clear()
    b.initializers.clear()
    return loss, target_inputs, labels_input, match_inputs


def _finish(proto: onnx.ModelProto, outputs: Sequence[tuple[str, int, list[int | str] | None]]) -> None:
    del proto.graph.output[:]
    for name, elem, dims in outputs:
        proto.graph.output.append(helper.make_tensor_value_info(name, elem, dims))
    del proto.graph.value_info[:]


def build_step(
    student: StudentGraph,
    spec: TargetSpec,
    optimizer: OptimizerSpec,
    *,
    bn_mode: BnMode = "frozen",
    keep_zeros: bool = True,
) -> StepModels:
    """Build the train-step and eval models.

    Raises:
        GradientError: An op on the gradient path has no rule, or a rule cannot handle it.
    """
    base = onnx.ModelProto()
    base.CopyFrom(student.proto)
    base_names = all_names(base.graph)
    producers = _producers(base)
    spec = _with_producers(spec, producers)

    # eval: forward (frozen BatchNormalization) + loss
    eval_model = onnx.ModelProto()
    eval_model.CopyFrom(base)
    eb = Builder(base_names, student.opset, "distill")
    loss, target_inputs, labels_input, match_inputs = _add_loss(eval_model, spec, eb)
    student_outs = [o for o, *_ in spec.outputs]
    _finish(
        eval_model, [(loss, TensorProto.FLOAT, [])] + [(o, TensorProto.FLOAT, None) for o in student_outs]
    )
    _fill_output_shapes(eval_model)

    # step: forward (BatchNormalization per bn_mode) + loss + gradients + update
    step_model = onnx.ModelProto()
    step_model.CopyFrom(base)
    sb = Builder(base_names, student.opset, "distill")
    buffer_outputs: dict[str, str] = {}
    if bn_mode == "train" and student.buffers:
        bb = Builder(base_names, student.opset, "bn")
        buffer_outputs = _rewrite_bn_train(step_model, TypeInfo.from_model(step_model), bb)
        step_model.graph.initializer.extend(bb.initializers)
    loss_s, target_s, labels_s, match_s = _add_loss(step_model, spec, sb)
    assert (loss_s, target_s, labels_s, match_s) == (loss, target_inputs, labels_input, match_inputs)
    one = sb.fresh("seed_one")
    step_model.graph.initializer.append(numpy_helper.from_array(np.asarray(1.0, dtype=np.float32), one))
    wrt = [p.name for p in student.params]
    grad_model, grads, _ = append_gradients(step_model, wrt=wrt, seeds={loss: one}, rules=RULES)
    ob = Builder(all_names(grad_model.graph), student.opset, "optim")
    lr = ob.fresh("lr")
    step_in = ob.fresh("step")
    grad_model.graph.input.append(helper.make_tensor_value_info(lr, TensorProto.FLOAT, []))
    grad_model.graph.input.append(helper.make_tensor_value_info(step_in, TensorProto.FLOAT, []))
    trained = [p for p in student.params if grads[p.name] is not None]
    untrained = [p for p in student.params if grads[p.name] is None]
    if not trained:
        raise GradientError("no trainable weight gets a gradient from the loss")
    flat = SlotNames(
        ob.fresh("params_flat"),
        ob.fresh("params_flat_out"),
        tuple(ob.fresh(f"{slot}_flat") for slot in optimizer.slots()),
        tuple(ob.fresh(f"{slot}_flat_out") for slot in optimizer.slots()),
    )
    total = int(sum(p.value.size for p in trained))
    _unflatten_params(grad_model, flat.param, trained, ob)
    for name in flat.state_in:
        grad_model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [total]))
    pieces = [ob.op("Reshape", [grads[p.name], ob.ints([-1])]) for p in trained]  # type: ignore[list-item]
    g_flat = pieces[0] if len(pieces) == 1 else ob.op("Concat", pieces, axis=0)
    if keep_zeros and any((p.value == 0).any() for p in trained):
        mask = np.concatenate([(p.value != 0).astype(np.float32).ravel() for p in trained])
        g_flat = ob.op("Mul", [g_flat, ob.const(mask, "keep_zeros_mask")])
    decay = None
    if optimizer.weight_decay and any(p.decays for p in trained):
        decay_mask = np.concatenate([np.full(p.value.size, float(p.decays), np.float32) for p in trained])
        decay = ob.const(decay_mask if not decay_mask.all() else np.asarray(1.0, np.float32), "decay_mask")
    emit_update(ob, optimizer, lr=lr, step=step_in, params=[(flat, g_flat, decay)])
    grad_model.graph.node.extend(ob.nodes)
    grad_model.graph.initializer.extend(ob.initializers)
    outs: list[tuple[str, int, list[int | str] | None]] = [(loss, TensorProto.FLOAT, [])]
    outs.append((flat.param_out, TensorProto.FLOAT, [total]))
    outs.extend((s, TensorProto.FLOAT, [total]) for s in flat.state_out)
    for buf, out in buffer_outputs.items():
        outs.append((out, TensorProto.FLOAT, list(student.buffers[buf].shape)))
    _finish(grad_model, outs)
    return StepModels(
        step=grad_model,
        eval=eval_model,
        target_inputs=target_inputs,
        labels_input=labels_input,
        match_inputs=match_inputs,
        params=trained,
        untrained=untrained,
        flat=flat,
        buffer_outputs=buffer_outputs,
        loss=loss,
        lr=lr,
        step_input=step_in,
        eval_outputs=[loss, *student_outs],
    )


def _unflatten_params(model: onnx.ModelProto, flat: str, params: Sequence[Parameter], b: Builder) -> None:
    """Make the trained parameters slices of one flat input (emitted before every other node)."""
    graph = model.graph
    total = int(sum(p.value.size for p in params))
    names = {p.name for p in params}
    kept = [vi for vi in graph.input if vi.name not in names]
    del graph.input[:]
    graph.input.extend(kept)
    graph.input.append(helper.make_tensor_value_info(flat, TensorProto.FLOAT, [total]))
    pre = Builder(b.taken, b.opset, "flat")
    if len(params) == 1:
        pieces = [flat]
    else:
        pieces = pre.op(
            "Split", [flat, pre.ints([p.value.size for p in params])], axis=0, outputs=len(params)
        )
    for piece, p in zip(pieces, params, strict=True):
        pre.op("Reshape", [piece, pre.ints(list(p.value.shape))])
        pre.nodes[-1].output[0] = p.name
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*pre.nodes, *nodes])
    graph.initializer.extend(pre.initializers)


def _with_producers(spec: TargetSpec, producers: Mapping[str, str]) -> TargetSpec:
    outputs = tuple((o, k, producers.get(o), d) for o, k, _, d in spec.outputs)
    labels = None
    if spec.labels is not None:
        o, c, _, d = spec.labels
        labels = (o, c, producers.get(o), d)
    return TargetSpec(outputs, spec.temperature, labels, spec.alpha, spec.matches)


def _fill_output_shapes(proto: onnx.ModelProto) -> None:
    """Give outputs without a shape the inferred one (the checker wants a shape)."""
    info = TypeInfo.from_model(proto)
    for vi in proto.graph.output:
        if vi.type.tensor_type.HasField("shape"):
            continue
        dims = info.dims.get(vi.name)
        if dims is not None:
            new = helper.make_tensor_value_info(
                vi.name, vi.type.tensor_type.elem_type, [d if d is not None else "?" for d in dims]
            )
            vi.CopyFrom(new)
