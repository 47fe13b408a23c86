"""``--mode static``: QDQ int8 weights and activations, calibrated on ``--data``.

onnxruntime's ``quantize_static`` does the work (it is the best implementation of calibration
and QDQ placement): activations uint8 with ranges from the calibration feeds
(``--calibration minmax | percentile | entropy``), weights int8 symmetric per output channel,
``QuantizeLinear``/``DequantizeLinear`` pairs around Conv/MatMul/Gemm that onnxruntime fuses
into integer kernels. It works on files, so the model goes through a private temporary folder
that is removed before returning; nothing is written anywhere the user can see.

Before handing the model over, weights held in ``Constant`` nodes are lifted to initializers
(the quantizer only sees initializers). Model metadata, doc strings and producer are restored
afterwards.

Where a float ``Relu`` feeds a ``MaxPool`` whose output is quantized (the first int8 layer after
float ones: a stem Conv under ``--min-elements``, or one the fallback put back in float), the two
swap places (``max(relu(x)) = relu(max(x))``, the same values): onnxruntime moves a
``QuantizeLinear`` up past a ``MaxPool`` to the first node that is not one (its
``QDQPropagationTransformer``), and a ``MaxPool`` left on uint8 there runs onnxruntime's generic
NCHW kernel, not its NHWC one (537 us against the float pool's 11 us on the sample CNN at batch
32: the whole int8 model ran at 2.0x the float latency, 0.62x with the swap). With the ``Relu``
last, the ``QuantizeLinear`` stops at it and onnxruntime folds the ``Relu`` into it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
from onnxruntime import __version__ as ort_version
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

from modelshrink.errors import ConfigError, UnsupportedModelError
from modelshrink.graph import NameAuthority, all_nodes, allow_plain_initializers, name_tail, op_key
from modelshrink.runtime import runs_qdq
from modelshrink.techniques.base import Change, Skip, TechniqueContext
from modelshrink.techniques.quantize.biascorrect import correct_biases
from modelshrink.techniques.quantize.calibration import RANGE_METHODS, Range, calibrate, tensors_to_calibrate
from modelshrink.techniques.quantize.config import QuantizeConfig
from modelshrink.techniques.quantize.opset import raise_opset
from modelshrink.techniques.quantize.plan import QUANTIZABLE_TYPES, excluded_by
from modelshrink.techniques.quantize.staticprep import (
    SMOOTH_MIN_GAIN,
    _only_user,
    add_zero_biases,
    fold_affine,
    fuse_hard_swish,
    own_biases,
    smooth_quant,
)
from modelshrink.techniques.quantize.weightonly import default_opset

__all__ = ["StaticQdq", "StaticUnit", "StaticWeight", "quantize_static_qdq", "to_float"]

logger = logging.getLogger(__name__)

# Per-channel (axis) QuantizeLinear/DequantizeLinear arrived in opset 13.
STATIC_OPSET = 13
# Ops quantized beside the layers, so that the tensors between two int8 layers stay int8: a
# Relu/Clip after a quantized layer is kept in the file (QDQKeepRemovableActivations: a layer put
# back in float keeps its activation) and onnxruntime folds it into the QuantizeLinear; a MaxPool
# between int8 layers runs onnxruntime's NHWC uint8 pool on its input's scale. They are not
# layers: never counted, ranked or put back in float on their own. Measured on the sample CNN
# (1 thread): batch 32 0.62x -> 0.52x the float latency, batch 1 1.08x -> 0.96x, cosine
# 0.99996 -> 0.99998.
FOLLOWERS = ("Relu", "Clip", "MaxPool")


def _weight_of(node: ir.Node) -> ir.Value | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].const_value is not None:
        return node.inputs[1]
    return None


def _exclusions(model: ir.Model, config: QuantizeConfig) -> tuple[list[str], list[Skip]]:
    """Nodes to leave in float (by --exclude, --min-elements, dtype), with the reasons."""
    names: list[str] = []
    skips: list[Skip] = []
    wanted = set(config.ops)
    for graph, node in all_nodes(model):
        op = op_key(node)
        if op not in wanted:
            continue
        label = node.name or f"<{op}>"
        w = _weight_of(node)
        reason = None
        pattern = excluded_by(config.exclude, node.name or "", op, (w.name or "") if w is not None else "")
        if pattern is not None:
            reason = f"excluded by --exclude {pattern}"
        elif w is not None and w.is_graph_input():
            reason = (
                f"'{w.name}': is a graph input, so it can be overridden at run time; make it a plain "
                "initializer first"
            )
        elif graph is not model.graph:
            reason = (
                "inside an If/Loop/Scan body: onnxruntime's quantize_static quantizes the main graph only"
            )
        elif w is not None and any(use.node.graph is not graph for use in w.uses()):
            reason = (
                f"'{w.name}' is also read inside an If/Loop/Scan body, which onnxruntime's "
                "quantize_static does not follow (the body would lose the weight); left in float"
            )
        elif w is not None and w.const_value is not None and w.const_value.dtype not in QUANTIZABLE_TYPES:
            reason = "weight is not float"
        elif w is not None and w.const_value is not None and w.const_value.size < config.min_elements:
            reason = (
                f"'{w.name}': {w.const_value.size} elements, fewer than --min-elements {config.min_elements}"
            )
        if reason is not None:
            names.append(node.name or label)
            skips.append(Skip(label, op, reason))
    return names, skips


def _inline(model: ir.Model) -> None:
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                value.const_value = ir.Tensor(np.array(tensor.numpy()), dtype=tensor.dtype, name=tensor.name)


def _named(model: ir.Model) -> ir.Model:
    """A copy in which every node has a name (deterministic), so ``nodes_to_exclude`` can name it."""
    work = model.clone()
    names = NameAuthority(work)
    for _, node in all_nodes(work):
        if not node.name:
            node.name = names.fresh(f"{node.op_type}_node")
    return work


def _raised(work: ir.Model) -> tuple[ir.Model, list[str]]:
    """``work`` at opset 13 or newer, and a note when it had to be converted.

    Per-channel QuantizeLinear/DequantizeLinear need opset 13. Below it, onnxruntime's quantizer
    only stamps a newer opset on the model without converting its ops (an invalid model), and
    its calibration graph breaks IR version 3 models (initializers that are not graph inputs):
    the onnx version converter does both properly.
    """
    opset = default_opset(work)
    if opset >= STATIC_OPSET:
        return work, []
    raised = raise_opset(
        work, STATIC_OPSET, why="--mode static (per-channel QuantizeLinear/DequantizeLinear)"
    )
    return raised, [
        f"raised the opset from {opset} to {STATIC_OPSET} with onnx's version converter: per-channel "
        "QuantizeLinear/DequantizeLinear need it"
    ]


@dataclass(frozen=True)
class StaticWeight:
    """The weight a static unit quantizes (``name`` empty for activation-only units)."""

    name: str
    size: int


@dataclass(frozen=True)
class StaticUnit:
    """A node the QDQ model computes in int8; the fallback can put it back in float."""

    index: int
    layer: str
    op_type: str
    weight: StaticWeight


@dataclass(frozen=True)
class StaticQdq:
    """Every unit quantized: the QDQ model, the float model it came from, and what changed.

    Attributes:
        model: The QDQ model.
        work: The float model as quantized (named, constants lifted, opset raised, affine ops
            folded, SmoothQuant applied, zero biases added): a unit put back in float reads
            its weights from here.
        changes: One per unit, in unit order.
        skips: Nodes left in float and why.
        notes: What was done, in words.
        units: The nodes in int8.
        details: Machine-readable figures (ranges, bias shifts, smoothing).
    """

    model: ir.Model
    work: ir.Model
    changes: tuple[Change, ...]
    skips: tuple[Skip, ...]
    notes: tuple[str, ...]
    units: tuple[StaticUnit, ...]
    details: dict[str, object]


def _unchanged(model: ir.Model, skips: list[Skip], config: QuantizeConfig) -> StaticQdq:
    return StaticQdq(
        model.clone(),
        model,
        (),
        tuple(skips),
        (f"static: no {', '.join(config.ops)} node left to quantize with int8 kernels",),
        (),
        {},
    )


def _prepare(
    model: ir.Model, config: QuantizeConfig, context: TechniqueContext
) -> tuple[ir.Model, list[str], list[Skip], list[str], dict[str, object]] | list[Skip]:
    """The float model to quantize, the nodes left alone (and why), notes and details.

    Only the nodes left alone (and why) when none is left to quantize.
    """
    work = _named(model)
    onnx_ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(work)
    allow_plain_initializers(work)  # the lifted Constants are not graph inputs
    exclude, skips = _exclusions(work, config)
    left = set(exclude)
    if not any(op_key(n) in config.ops and n.name not in left for _, n in all_nodes(work)):
        return skips
    work, notes = _raised(work)
    if not runs_qdq(default_opset(work)):
        raise UnsupportedModelError(
            f"--mode static: onnxruntime {ort_version} has no QuantizeLinear/DequantizeLinear kernels at "
            f"opset {default_opset(work)}; use --mode int8 or --mode dynamic"
        )
    names = NameAuthority(work)
    details: dict[str, object] = {}
    folded = fold_affine(work, names)
    if folded:
        details["folded_affine"] = folded
        notes.append(
            f"folded the per-channel Mul/Add that follow {len(folded)} Conv(s) into their weights and "
            "biases before quantizing (onnxruntime folds them in the float model, but not across a "
            "QuantizeLinear: left alone, they would run in float on every call)"
        )
    swishes = fuse_hard_swish(work, names)
    if swishes:
        details["hard_swish"] = swishes
        notes.append(
            f"rewrote {swishes} hard-swish(es) written out as x * Clip(x + 3, 0, 6) / 6 as x * "
            "HardSigmoid(x): the same values in two passes over the activation instead of four (they run "
            "in float between the int8 layers)"
        )
    exclude, skips = _exclusions(work, config)
    left = set(exclude)
    own_biases(work, config.ops, names, excluded=left)
    if config.bias_correction:
        add_zero_biases(work, config.ops, names, excluded=left)
    if config.smooth is not None:
        smooth = smooth_quant(
            work,
            config.smooth,
            ops=config.ops,
            excluded=left,
            samples=context.feeds.samples,
            runtime=context.runtime,
            names=names,
        )
        details["smooth"] = smooth
        applied = sorted(n for n, d in smooth.items() if d["applied"])
        notes.append(
            f"--smooth {config.smooth:g}: SmoothQuant applied to {len(applied)} of {len(smooth)} MatMul/Gemm "
            "node(s) (where it cut the measured error of the layer's output by at least "
            f"{SMOOTH_MIN_GAIN:.0%}; details.smooth has each layer's error ratio)"
            + (f": {', '.join(applied)}" if applied else "")
        )
    return work, exclude, skips, notes, details


def quantize_static_qdq(model: ir.Model, config: QuantizeConfig, context: TechniqueContext) -> StaticQdq:
    """Calibrate on ``context.feeds`` and quantize every unit it can.

    Raises:
        ConfigError: No real calibration data (``--data``).
        UnsupportedModelError: onnxruntime's quantizer fails on this model.
    """
    if not context.feeds.real:
        raise ConfigError(
            "--mode static calibrates activation ranges on real inputs: pass --data (e.g. a few "
            "hundred samples as .npz); use --mode dynamic or int8 without data"
        )
    prepared = _prepare(model, config, context)
    if isinstance(prepared, list):  # the weights read from Constant nodes are judged once lifted
        return _unchanged(model, prepared, config)
    work, exclude, skips, notes, details = prepared
    left = set(exclude)
    samples = context.feeds.samples
    ranges = calibrate(
        work,
        tensors_to_calibrate(work, (*config.ops, *FOLLOWERS)),
        samples,
        context.runtime,
        method=config.calibration,
    )
    out = _run_quantizer(work, config, ranges, exclude)
    _pools_before_activations(out)
    # the quantizer rebuilds the model: restore what it drops
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    out.doc_string, out.model_version = model.doc_string, model.model_version
    out.graph.doc_string = model.graph.doc_string
    out.metadata_props.clear()
    out.metadata_props.update(model.metadata_props)
    for domain, version in model.opset_imports.items():
        out.opset_imports.setdefault(domain, version)
    method = config.calibration or "per tensor"
    quantized = {n.name or "" for n in out.graph if op_key(n) in config.ops and n.name not in left}
    shifts: dict[str, dict[str, float]] = {}
    if config.bias_correction:
        shifts = correct_biases(out, work, quantized, samples, context.runtime)
    changes = _changes(out, config, method, left, ranges=ranges, shifts=shifts, details=details)
    units = tuple(
        StaticUnit(
            i,
            c.node,
            c.op_type,
            StaticWeight(str(c.details.get("weight") or ""), c.params_before),
        )
        for i, c in enumerate(changes)
    )
    chosen = Counter(r.method for r in ranges.values())
    how = (
        f"calibrated with {config.calibration}"
        if config.calibration is not None
        else "ranges chosen per tensor by the least quantization error on the rows ("
        + ", ".join(f"{m} {chosen[m]}" for m in RANGE_METHODS if chosen[m])
        + ")"
    )
    notes.append(
        f"static: activations uint8, {how} on {len(samples)} sample(s) from {context.feeds.source}; "
        "weights int8 per output channel; QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses "
        "into integer kernels (onnxruntime's quantize_static)"
    )
    if config.bias_correction:
        notes.append(
            f"bias correction: {len(shifts)} Conv/Gemm bias(es) shifted by the mean error their "
            "quantization adds to the output on the calibration rows (--no-bias-correction turns it off)"
        )
        details["bias_correction"] = shifts
    details["ranges"] = {name: r.details() for name, r in ranges.items()}
    _shorter_qdq_names(out, work)
    return StaticQdq(out, work, tuple(changes), tuple(skips), tuple(notes), units, details)


def _shorter_qdq_names(out: ir.Model, work: ir.Model) -> None:
    """Shorten the long names onnxruntime's quantizer gave the QDQ nodes it added, their
    outputs and their scales and zero points (not graph outputs, not the quantized weights,
    whose names the report gives).

    It names them after the tensor (``NAME_QuantizeLinear_Output``, ...): tf2onnx's
    150-character names made basic-pitch's static file 1.11x the float one. They keep the end
    (:func:`modelshrink.graph.name_tail`: the op and the end of the tensor's name).
    """
    names = NameAuthority(out)
    before = {n.name for n in work.graph} | {v.name for n in work.graph for v in n.outputs}
    before |= set(work.graph.initializers)

    def shorten(name: str | None) -> str | None:
        if not name or name in before or name_tail(name) == name:
            return None
        return names.fresh(name_tail(name))

    for node in out.graph:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in ("", "ai.onnx"):
            continue
        if (new := shorten(node.name)) is not None:
            node.name = new
        for value in [*node.outputs, *node.inputs[1:]]:
            if value is None or value.is_graph_output() or value.is_graph_input():
                continue
            if (new := shorten(value.name)) is not None:
                value.name = new


def _run_quantizer(
    work: ir.Model, config: QuantizeConfig, ranges: dict[str, Range], exclude: list[str]
) -> ir.Model:
    """onnxruntime's quantize_static on a private copy of ``work``, with ``ranges`` as its cache."""
    big = (
        sum(v.const_value.nbytes for v in work.graph.initializers.values() if v.const_value is not None)
        > 1_500_000_000
    )
    with tempfile.TemporaryDirectory(prefix="modelshrink-static-") as tmp:
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "quantized.onnx"
        copy = work.clone()
        _inline(copy)
        ir.save(copy, src, external_data="model.onnx.data" if big else None)
        del copy
        cache = Path(tmp) / "calibration.json"
        data = {
            name: TensorData(lowest=np.array(r.low, np.float32), highest=np.array(r.high, np.float32))
            for name, r in ranges.items()
        }
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
        logging.disable(logging.WARNING)  # the quantizer logs advice on the root logger (stderr)
        chatter = io.StringIO()  # and may print() progress to stdout
        try:
            with contextlib.redirect_stdout(chatter):
                quantize_static(
                    str(src),
                    str(dst),
                    None,
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=[*config.ops, *FOLLOWERS],
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=exclude,
                    use_external_data_format=big,
                    calibrate_method=CalibrationMethod.MinMax,
                    calibration_cache_path=str(cache),
                    extra_options={"QDQKeepRemovableActivations": True},
                )
        except Exception as exc:  # the quantizer raises plain exceptions of every kind
            raise UnsupportedModelError(
                f"onnxruntime's quantize_static failed on this model: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            logging.disable(logging.NOTSET)
            if chatter.getvalue().strip():
                logger.debug("quantize_static: %s", chatter.getvalue().strip())
        annotated = {v.name for n in work.graph for v in n.outputs if v.name and (v.type or v.shape)}
        return _load_quantized(dst, annotated)


def to_float(qdq: StaticQdq, keep: frozenset[int]) -> tuple[ir.Model, tuple[Change, ...]]:
    """``qdq.model`` with every unit not in ``keep`` (indices) computed in float again.

    A unit put back in float reads its float weight and bias from ``qdq.work`` and its
    activations before their QuantizeLinear; a QuantizeLinear/DequantizeLinear pair that no int8
    node reads or writes any more is removed, so float runs of layers stay float end to end.
    """
    out = qdq.model.clone()
    floats = {n.name: n for n in qdq.work.graph if n.name}
    by_name = {n.name: n for n in out.graph if n.name}
    kept = {qdq.units[i].layer for i in keep}
    reverted = [by_name[u.layer] for u in qdq.units if u.layer not in kept and u.layer in by_name]
    for node in reverted:
        original = floats[node.name or ""]
        for i, value in enumerate(node.inputs):
            dq = _dequantized(value)
            source = dq.inputs[0] if dq is not None else None
            if source is None:
                continue
            if source.const_value is not None:
                weight = original.inputs[i] if i < len(original.inputs) else None
                if weight is None or weight.const_value is None or not weight.name:
                    continue
                restored = out.graph.initializers.get(weight.name)
                if restored is None:
                    restored = ir.Value(name=weight.name, const_value=weight.const_value)
                    out.graph.register_initializer(restored)
                node.replace_input_with(i, restored)
            else:
                q = source.producer()
                if q is not None and q.op_type == "QuantizeLinear" and q.inputs[0] is not None:
                    node.replace_input_with(i, q.inputs[0])
    int8 = {id(by_name[name]) for name in kept if name in by_name}
    for q in [n for n in out.graph if n.op_type == "QuantizeLinear"]:
        tensor = q.inputs[0]
        if tensor is None or tensor.const_value is not None:
            continue
        producer = tensor.producer()
        dqs = [use.node for use in q.outputs[0].uses() if use.node.op_type == "DequantizeLinear"]
        readers = [use.node for dq in dqs for use in dq.outputs[0].uses()]
        if (producer is not None and id(producer) in int8) or any(id(r) in int8 for r in readers):
            continue
        if any(dq.outputs[0].is_graph_output() for dq in dqs):
            continue
        for dq in dqs:
            ir.convenience.replace_all_uses_with(dq.outputs[0], tensor)
            out.graph.remove(dq, safe=True)
        if not list(q.outputs[0].uses()):
            out.graph.remove(q, safe=True)
    onnx_ir.passes.common.RemoveUnusedNodesPass()(out)
    _pools_before_activations(out)
    changes = tuple(c for u, c in zip(qdq.units, qdq.changes, strict=True) if u.layer in kept)
    return out, changes


def _producer_if_only_reader(value: ir.Value | None, reader: ir.Node, op: str) -> ir.Node | None:
    """The ``op`` node that makes ``value``, when ``reader`` is the only node reading it."""
    if value is None:
        return None
    user = _only_user(value)
    node = value.producer()
    if user is None or user[0] is not reader or node is None or op_key(node) != op:
        return None
    return node


def _pools_before_activations(model: ir.Model) -> int:
    """``Relu -> MaxPool -> QuantizeLinear`` on a float tensor becomes ``MaxPool -> Relu -> QuantizeLinear``.

    See the module docstring: onnxruntime would otherwise run the ``MaxPool`` on uint8 in its
    slow NCHW kernel. Only where the ``Relu`` reads a float tensor (not a
    ``DequantizeLinear``'s output: between int8 layers onnxruntime's NHWC pool is fast) and
    each of the three nodes is the only reader of the one before it. Returns how many swapped.
    """
    swapped = 0
    graph = model.graph
    for q in [n for n in graph if op_key(n) == "QuantizeLinear"]:
        pool = _producer_if_only_reader(q.inputs[0], q, "MaxPool")
        if pool is None or len([o for o in pool.outputs if o.uses()]) != 1:  # its Indices unread
            continue
        act = _producer_if_only_reader(pool.inputs[0], pool, "Relu")
        source = act.inputs[0] if act is not None else None
        if act is None or source is None or act.graph is not graph:
            continue
        feeder = source.producer()
        if feeder is not None and feeder.op_type == "DequantizeLinear":
            continue
        pooled, act_out = pool.outputs[0], act.outputs[0]
        pool.replace_input_with(0, source)
        act.replace_input_with(0, pooled)
        q.replace_input_with(0, act_out)
        act_out.shape = pooled.shape
        graph.remove(act)
        graph.insert_after(pool, act)
        swapped += 1
    if swapped:
        logger.debug("static: %d Relu(s) moved after the MaxPool they fed", swapped)
    return swapped


def _captured(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from the enclosing scopes."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in (attr.g, *attr.graphs) if attr.HasField("g") else attr.graphs:
                used |= _captured(sub)
        defined.update(node.output)
    return used - defined - {""}


def _topologically_sorted(proto: onnx.ModelProto) -> None:
    """Order the main graph so that every node follows the producers of what it reads.

    onnxruntime's quantizer orders nodes by their explicit inputs only, so an ``If`` whose
    branches read a value computed in the main graph can land before that value's producer.
    """
    graph = proto.graph
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    needs = {
        id(n): set(n.input) | set().union(*(_captured(a.g) for a in n.attribute if a.HasField("g")))
        for n in pending
    }
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = next((n for n in pending if needs[id(n)] <= available), None)
        if ready is None:
            ordered.extend(pending)  # a cycle or a dangling name: the checker names it
            break
        pending.remove(ready)
        ordered.append(ready)
        available.update(ready.output)
    kept = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(kept, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(kept)


def _load_quantized(path: Path, annotated: set[str]) -> ir.Model:
    """Read onnxruntime's result (sorted, checked) into memory.

    Its ``value_info`` keeps only the tensors the float model had one for (``annotated``): the
    quantizer adds one per tensor, 30 KB of basic-pitch's 204 KB static file.

    Raises:
        UnsupportedModelError: The quantizer made an invalid model of this one.
    """
    proto = onnx.ModelProto()
    proto.ParseFromString(path.read_bytes())  # external data stays on disk until _inline
    _topologically_sorted(proto)
    kept = [info for info in proto.graph.value_info if info.name in annotated]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UnsupportedModelError(
            f"onnxruntime's quantize_static made an invalid model of this one ({first}); "
            "use --mode int8 or --mode dynamic"
        ) from exc
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    _inline(model)  # before the temporary folder holding the data goes
    return model


def _dequantized(value: ir.Value | None) -> ir.Node | None:
    producer = value.producer() if value is not None else None
    return producer if producer is not None and producer.op_type == "DequantizeLinear" else None


def _changes(
    model: ir.Model,
    config: QuantizeConfig,
    method: str,
    excluded: set[str],
    *,
    ranges: Mapping[str, Range],
    shifts: Mapping[str, Mapping[str, float]],
    details: Mapping[str, object],
) -> list[Change]:
    """Every quantized node: int8 weight and activations, or activations only.

    An excluded node can still read a QDQ activation (its producer's output was quantized):
    it stays in the skipped list, not here. Each change's details name the range method of
    every activation it reads or writes, the bias shift and the SmoothQuant figures.
    """
    smooth = details.get("smooth", {})
    assert isinstance(smooth, dict)
    changes = []
    for _, node in all_nodes(model):
        if op_key(node) not in config.ops or not node.inputs or node.name in excluded:
            continue
        weight_dq = _dequantized(node.inputs[1]) if len(node.inputs) > 1 else None
        q = weight_dq.inputs[0] if weight_dq is not None else None
        if q is None or q.const_value is None:
            if not any(_dequantized(v) is not None for v in node.inputs):
                continue
            what, size, storage = (
                f"static QDQ: activations only, calibrated by {method}",
                0,
                "QDQ activations",
            )
        else:
            what, size, storage = (
                f"static QDQ int8 (activations calibrated by {method})",
                int(q.const_value.size),
                "QDQ",
            )
        extra: dict[str, object] = {}
        touched = [_source(v) for v in (*node.inputs, *node.outputs)]
        activations = {t: ranges[t].details() for t in touched if t is not None and t in ranges}
        if activations:
            extra["activation_ranges"] = activations
        if node.name in shifts:
            extra["bias_correction"] = dict(shifts[node.name or ""])
        if node.name in smooth:
            extra["smooth"] = smooth[node.name]
        changes.append(
            Change(
                node=node.name or f"<{node.op_type}>",
                op_type=op_key(node),
                what=what,
                params_before=size,
                params_after=size,
                details={"weight": q.name if q is not None and size else None, "storage": storage, **extra},
            )
        )
    return changes


def _source(value: ir.Value | None) -> str | None:
    """The float tensor a QDQ value stands for (the name its range was calibrated under).

    An input read through DequantizeLinear stands for the input of its QuantizeLinear; an output
    that is also a graph output was renamed by the quantizer, and the graph output (the
    DequantizeLinear after it) keeps the name.
    """
    if value is None:
        return None
    dq = _dequantized(value)
    if dq is not None:
        q = dq.inputs[0].producer() if dq.inputs[0] is not None else None
        if q is not None and q.op_type == "QuantizeLinear" and q.inputs[0] is not None:
            return q.inputs[0].name
        return None
    for use in value.uses():
        if use.node.op_type == "QuantizeLinear":
            for after in use.node.outputs[0].uses():
                if after.node.op_type == "DequantizeLinear" and after.node.outputs[0].is_graph_output():
                    return after.node.outputs[0].name
    return value.name
