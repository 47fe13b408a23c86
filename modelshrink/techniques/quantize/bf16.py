"""``--mode bf16``: weights stored in bfloat16, computed in float32.

bfloat16 keeps float32's 8-bit exponent and 7 of its 23 mantissa bits, so every float32
weight fits (no overflow, unlike float16) with about 3 significant decimal digits::

    w' = bfloat16(w)   (round to nearest even)   then   Cast(w', float32) in front of the readers

onnxruntime 1.32's CPU provider has bfloat16 kernels only for data movement (Cast, Identity,
Transpose, Reshape, Flatten, Concat) and LayerNormalization: no MatMul, Gemm, Conv, Add or
activation runs in bfloat16 on CPU. So this mode is storage only: the Cast has a constant input
and onnxruntime folds it when it loads the model, giving half the file, float32 weights in
memory and float32 compute (the float model's speed). For 16-bit compute on CPU use ``--mode
fp16`` (few float16 CPU kernels either); bfloat16 compute is a GPU matter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir

from modelshrink.graph import NameAuthority
from modelshrink.techniques.base import Change
from modelshrink.techniques.quantize.plan import Unit
from modelshrink.techniques.quantize.weightonly import (
    Emitted,
    _release,
    _retire,
    _snr_db,
    _store_quantized,
    _Writer,
    weight_change,
)

__all__ = ["BF16_NOTES", "store_bf16"]

logger = logging.getLogger(__name__)

BF16_NOTES = (
    "bfloat16 storage: weights are stored in bfloat16 and cast back to float32 when onnxruntime "
    "loads the model (the Cast has a constant input and is folded): half the bytes in the file, "
    "float32 weights in memory and float32 compute, so no speed-up",
    "onnxruntime's CPU provider has bfloat16 kernels only for data movement (Cast, Identity, "
    "Transpose, Reshape, Flatten, Concat) and LayerNormalization, none for MatMul, Gemm, Conv, "
    "Add or activations: bfloat16 compute is not possible there (it is on GPUs)",
)


def store_bf16(model: ir.Model, units: Sequence[Unit], names: NameAuthority) -> Emitted:
    """Store the float32 weights of ``units`` in bfloat16 behind a Cast to float32, in place."""
    writer = _Writer()
    changes: list[Change] = []
    for unit in units:
        w = unit.weight
        arr = np.asarray(w.numpy(), np.float32)
        half = arr.astype(ml_dtypes.bfloat16)
        _release(w.tensor)
        snr = _snr_db(arr, half.astype(np.float32))
        stored, const_node = _store_quantized(unit, names, half, writer)
        out = ir.Value(
            name=names.fresh(f"{w.name}_float"), type=ir.TensorType(w.dtype), shape=ir.Shape(list(w.shape))
        )
        cast = ir.Node(
            "",
            "Cast",
            [stored],
            [ir.AttrInt64("to", int(ir.DataType.FLOAT))],
            outputs=[out],
            name=names.fresh(f"{w.name}_Cast"),
        )
        writer.place(w.graph, [cast], after=const_node)
        _retire(unit, out)
        changes.append(
            weight_change(
                model,
                unit,
                "bfloat16 weight (Cast to float32, folded at load)",
                storage="bfloat16+Cast",
                bytes_after=half.nbytes,
                snr=snr,
            )
        )
        logger.debug("bf16 %s (%s)", w.name, unit.layer)
    return Emitted(tuple(changes), frozenset({"bfloat16+Cast"} if changes else ()))
