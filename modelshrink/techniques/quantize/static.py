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
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
from onnxruntime import __version__ as ort_version
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

from modelshrink.errors import ConfigError, UnsupportedModelError
from modelshrink.graph import NameAuthority, all_nodes, allow_plain_initializers, op_key
from modelshrink.runtime import runs_qdq
from modelshrink.techniques.base import Change, Skip, TechniqueContext
from modelshrink.techniques.quantize.config import QuantizeConfig
from modelshrink.techniques.quantize.opset import raise_opset
from modelshrink.techniques.quantize.plan import QUANTIZABLE_TYPES, excluded_by
from modelshrink.techniques.quantize.weightonly import default_opset

__all__ = ["quantize_static_qdq"]

logger = logging.getLogger(__name__)

# Per-channel (axis) QuantizeLinear/DequantizeLinear arrived in opset 13.
STATIC_OPSET = 13

_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


# onnxruntime's entropy calibrator defaults to 128 histogram bins for 128 quantized bins, which
# leaves its KL search nothing to choose (it returned minmax's ranges, byte for byte, on the
# sample CNN); 2048 bins is the usual setting (TensorRT's).
# quantize_static() does not pass bin counts through, so calibration runs here and hands the
# ranges over as a calibration cache file in the private temporary folder.
_CALIBRATION_OPTIONS: dict[str, dict[str, object]] = {
    "entropy": {"num_bins": 2048, "num_quantized_bins": 128}
}


class _Reader(CalibrationDataReader):
    def __init__(self, samples: Sequence[dict[str, np.ndarray]], names: Sequence[str]) -> None:
        self._samples = samples
        self._names = list(names)
        self._it: Iterator[dict[str, np.ndarray]] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter([{n: s[n] for n in self._names if n in s} for s in self._samples])


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


def quantize_static_qdq(
    model: ir.Model, config: QuantizeConfig, context: TechniqueContext
) -> tuple[ir.Model, list[Change], list[Skip], list[str]]:
    """Calibrate on ``context.feeds`` and return the QDQ model, changes, skips and notes.

    Raises:
        ConfigError: No real calibration data (``--data``).
        UnsupportedModelError: onnxruntime's quantizer fails on this model.
    """
    if not context.feeds.real:
        raise ConfigError(
            "--mode static calibrates activation ranges on real inputs: pass --data (e.g. a few "
            "hundred samples as .npz); use --mode dynamic or int8 without data"
        )
    work = _named(model)
    onnx_ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(work)
    allow_plain_initializers(work)  # the lifted Constants are not graph inputs
    exclude, skips = _exclusions(work, config)
    left = set(exclude)
    if not any(op_key(n) in config.ops and n.name not in left for _, n in all_nodes(work)):
        return (
            model.clone(),
            [],
            skips,
            [f"static: no {', '.join(config.ops)} node left to quantize; the model is unchanged"],
        )
    work, notes = _raised(work)
    if not runs_qdq(default_opset(work)):
        raise UnsupportedModelError(
            f"--mode static: onnxruntime {ort_version} has no QuantizeLinear/DequantizeLinear kernels at "
            f"opset {default_opset(work)}; use --mode int8 or --mode dynamic"
        )
    method = config.calibration or "minmax"
    inputs = [v.name for v in work.graph.inputs if v.name and not v.is_initializer()]
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
        logging.disable(logging.WARNING)  # the quantizer logs advice on the root logger (stderr)
        chatter = io.StringIO()  # and its calibrators print() progress to stdout
        try:
            with contextlib.redirect_stdout(chatter):
                calibrator = create_calibrator(
                    src,
                    list(config.ops),
                    augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                    calibrate_method=_METHODS[method],
                    use_external_data_format=big,
                    providers=["CPUExecutionProvider"],
                    extra_options=_CALIBRATION_OPTIONS.get(method, {}),
                )
                calibrator.collect_data(_Reader(context.feeds.samples, inputs))
                save_tensors_data(calibrator.compute_data(), Path(tmp) / "calibration.json")
                del calibrator
                quantize_static(
                    str(src),
                    str(dst),
                    None,
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(config.ops),
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=exclude,
                    use_external_data_format=big,
                    calibrate_method=_METHODS[method],
                    calibration_cache_path=str(Path(tmp) / "calibration.json"),
                )
        except Exception as exc:  # the quantizer raises plain exceptions of every kind
            raise UnsupportedModelError(
                f"onnxruntime's quantize_static failed on this model: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            logging.disable(logging.NOTSET)
            if chatter.getvalue().strip():
                logger.debug("quantize_static: %s", chatter.getvalue().strip())
        out = _load_quantized(dst)
    # the quantizer rebuilds the model: restore what it drops
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    out.doc_string, out.model_version = model.doc_string, model.model_version
    out.graph.doc_string = model.graph.doc_string
    out.metadata_props.clear()
    out.metadata_props.update(model.metadata_props)
    for domain, version in model.opset_imports.items():
        out.opset_imports.setdefault(domain, version)
    changes = _changes(out, config, method, left)
    notes += [
        f"static: activations uint8, calibrated with {method} on {len(context.feeds.samples)} sample(s) "
        f"from {context.feeds.source}; weights int8 per output channel; QuantizeLinear/DequantizeLinear "
        "pairs that onnxruntime fuses into integer kernels (onnxruntime's quantize_static)"
    ]
    return out, changes, skips, notes


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


def _load_quantized(path: Path) -> ir.Model:
    """Read onnxruntime's result (sorted, checked) into memory.

    Raises:
        UnsupportedModelError: The quantizer made an invalid model of this one.
    """
    proto = onnx.ModelProto()
    proto.ParseFromString(path.read_bytes())  # external data stays on disk until _inline
    _topologically_sorted(proto)
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


def _changes(model: ir.Model, config: QuantizeConfig, method: str, excluded: set[str]) -> list[Change]:
    """Every quantized node: int8 weight and activations, or activations only.

    An excluded node can still read a QDQ activation (its producer's output was quantized):
    it stays in the skipped list, not here.
    """
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
        changes.append(
            Change(
                node=node.name or f"<{node.op_type}>",
                op_type=op_key(node),
                what=what,
                params_before=size,
                params_after=size,
                details={"weight": q.name if q is not None and size else None, "storage": storage},
            )
        )
    return changes
