"""The opset a mode needs: raise a model's ai.onnx opset with onnx's version converter, keeping
what it would drop, and decide per mode whether to (:func:`prepare`)."""

from __future__ import annotations

import logging

import onnx
import onnx.version_converter
import onnx_ir as ir
from onnxruntime import __version__ as ort_version

from modelshrink.errors import UnsupportedModelError
from modelshrink.runtime import runs_qdq
from modelshrink.techniques.quantize.config import QuantizeConfig
from modelshrink.techniques.quantize.lowbit import UNPACK_MIN_OPSET
from modelshrink.techniques.quantize.plan import INT4_PACKED_KINDS, make_plan
from modelshrink.techniques.quantize.weightonly import default_opset

__all__ = ["MIN_OPSET", "QDQ_INT4_OPSET", "prepare", "raise_opset"]

logger = logging.getLogger(__name__)


def _base_dir(model: ir.Model) -> str | None:
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                return str(tensor.base_dir)
    return None


def raise_opset(model: ir.Model, target: int, *, why: str) -> ir.Model:
    """``model`` converted to ai.onnx opset ``target`` (a new model; weights are not copied).

    External tensors stay external: the converter only sees their references.

    Raises:
        UnsupportedModelError: The converter fails on this model.
    """
    base_dir = _base_dir(model)
    proto = ir.serde.serialize_model(model)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as exc:  # the converter raises bare RuntimeErrors/ValidationErrors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"{why} needs opset {target}, and onnx's version converter cannot convert this model "
            f"from opset {proto.opset_import[0].version if proto.opset_import else '?'}: {first}"
        ) from exc
    converted.ir_version = max(converted.ir_version, 10)
    result = ir.serde.deserialize_model(converted)
    if base_dir is not None:
        ir.external_data.set_base_dir(result.graph, base_dir)
    logger.info("converted the model to opset %d", target)
    return result


QDQ_INT4_OPSET = 21
# The lowest ai.onnx opset at which onnxruntime has kernels for every op a mode emits:
# onnxruntime implements ai.onnx from opset 7 (an opset-6 Mul or Add has no kernel, so Cast +
# Mul rebuilding an int8 weight would not load), and DynamicQuantizeLinear arrived in opset 11.
MIN_OPSET = {"int8": 7, "int4": 7, "dynamic": 11, "bf16": 13}
_MIN_OPSET_WHY = {
    "int8": "onnxruntime has no opset-{opset} kernel for the Mul that rebuilds int8 weights",
    "int4": "onnxruntime has no opset-{opset} kernel for the Add that applies Gemm biases",
    "dynamic": "DynamicQuantizeLinear, which quantizes activations at run time, needs it",
    "bf16": "the Cast from bfloat16 that rebuilds the weights needs it",
}


def prepare(model: ir.Model, config: QuantizeConfig) -> tuple[ir.Model, list[str]]:
    """The model every candidate starts from (opset raised where the mode needs it), and notes."""
    opset = default_opset(model)
    if config.width is not None and opset < UNPACK_MIN_OPSET and make_plan(model, config).units:
        why = f"{config.width}-bit packed weights (BitShift)"
        raised = raise_opset(model, UNPACK_MIN_OPSET, why=why)
        return raised, [
            f"raised the opset from {opset} to {UNPACK_MIN_OPSET} with onnx's version converter: the "
            "BitShift that unpacks the weights needs it"
        ]
    if config.mode == "int4" and config.storage == "qdq" and not runs_qdq(max(opset, QDQ_INT4_OPSET)):
        raise UnsupportedModelError(
            f"--mode int4 --format qdq: onnxruntime {ort_version} has no DequantizeLinear kernel at opset "
            f"{opset}; use --format nbits"
        )
    if (
        config.mode == "int4"
        and config.storage == "qdq"
        and opset < QDQ_INT4_OPSET
        and make_plan(model, config).units
    ):
        why = "--mode int4 --format qdq (block-wise int4 DequantizeLinear)"
        raised = raise_opset(model, QDQ_INT4_OPSET, why=why)
        return raised, [
            f"raised the opset from {opset} to {QDQ_INT4_OPSET} with onnx's version converter: block-wise "
            "int4 DequantizeLinear needs it (and IR version 10)"
        ]
    if config.mode == "int4" and opset < UNPACK_MIN_OPSET:
        packed = [u for u in make_plan(model, config).units if u.uses[0].kind in INT4_PACKED_KINDS]
        if packed:
            raised = raise_opset(model, UNPACK_MIN_OPSET, why="--mode int4 on Conv/LSTM weights (BitShift)")
            return raised, [
                f"raised the opset from {opset} to {UNPACK_MIN_OPSET} with onnx's version converter: the "
                f"BitShift that unpacks the 4-bit {packed[0].op_type} weights needs it"
            ]
    target = MIN_OPSET.get(config.mode, 0)
    if opset < target and make_plan(model, config).units:
        raised = raise_opset(model, target, why=f"--mode {config.mode}")
        why = _MIN_OPSET_WHY[config.mode].format(opset=opset)
        return raised, [f"raised the opset from {opset} to {target} with onnx's version converter: {why}"]
    return model, []
