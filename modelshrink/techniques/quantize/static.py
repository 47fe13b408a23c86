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
import onnx_ir as ir
import onnx_ir.passes.common
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

from modelshrink.errors import ConfigError, UnsupportedModelError
from modelshrink.graph import all_nodes, op_key
from modelshrink.techniques.base import Change, Skip, TechniqueContext
from modelshrink.techniques.quantize.config import QuantizeConfig
from modelshrink.techniques.quantize.plan import FLOAT_TYPES, excluded_by

__all__ = ["quantize_static_qdq"]

logger = logging.getLogger(__name__)

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
    for _, node in all_nodes(model):
        op = op_key(node)
        if op not in wanted:
            continue
        label = node.name or f"<{op}>"
        w = _weight_of(node)
        reason = None
        pattern = excluded_by(config.exclude, node.name or "", op, (w.name or "") if w is not None else "")
        if pattern is not None:
            reason = f"excluded by --exclude {pattern}"
        elif w is not None and w.const_value is not None and w.const_value.dtype not in FLOAT_TYPES:
            reason = "weight is not float"
        elif w is not None and w.const_value is not None and w.const_value.size < config.min_elements:
            reason = (
                f"'{w.name}': {w.const_value.size} elements, fewer than --min-elements {config.min_elements}"
            )
        if reason is not None:
            if not node.name:
                raise UnsupportedModelError(
                    f"a {op} node has no name, so it cannot be excluded from --mode static"
                )
            names.append(node.name)
            skips.append(Skip(label, op, reason))
    return names, skips


def _inline(model: ir.Model) -> None:
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                value.const_value = ir.Tensor(np.array(tensor.numpy()), dtype=tensor.dtype, name=tensor.name)


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
    work = model.clone()
    onnx_ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(work)
    exclude, skips = _exclusions(work, config)
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
        out = ir.load(dst)
        _inline(out)
    # the quantizer rebuilds the model: restore what it drops
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    out.doc_string, out.model_version = model.doc_string, model.model_version
    out.graph.doc_string = model.graph.doc_string
    out.metadata_props.clear()
    out.metadata_props.update(model.metadata_props)
    for domain, version in model.opset_imports.items():
        out.opset_imports.setdefault(domain, version)
    changes = _changes(out, config, method)
    notes = [
        f"static: activations uint8, calibrated with {method} on {len(context.feeds.samples)} sample(s) "
        f"from {context.feeds.source}; weights int8 per output channel; QuantizeLinear/DequantizeLinear "
        "pairs that onnxruntime fuses into integer kernels (onnxruntime's quantize_static)"
    ]
    return out, changes, skips, notes


def _changes(model: ir.Model, config: QuantizeConfig, method: str) -> list[Change]:
    changes = []
    for _, node in all_nodes(model):
        if op_key(node) not in config.ops or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        producer = node.inputs[1].producer()
        if producer is None or producer.op_type != "DequantizeLinear":
            continue
        q = producer.inputs[0]
        size = int(q.const_value.size) if q is not None and q.const_value is not None else 0
        changes.append(
            Change(
                node=node.name or f"<{node.op_type}>",
                op_type=op_key(node),
                what=f"static QDQ int8 (activations calibrated by {method})",
                params_before=size,
                params_after=size,
                details={"weight": q.name if q is not None else None, "storage": "QDQ"},
            )
        )
    return changes
