"""Raise a model's ai.onnx opset with onnx's version converter, keeping what it would drop."""

from __future__ import annotations

import logging

import onnx
import onnx.version_converter
import onnx_ir as ir

from modelshrink.errors import UnsupportedModelError

__all__ = ["raise_opset"]

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
