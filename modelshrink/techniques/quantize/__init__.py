"""``quantize``: store weights (and optionally compute) in fewer bits (see :mod:`.technique`).

This front imports nothing heavy: the config, its flags and the spec; the technique function
``quantize`` is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelshrink.techniques.quantize.config import MODE_OPS, PANEL, QatData, QuantizeConfig
from modelshrink.techniques.spec import TechniqueSpec

if TYPE_CHECKING:
    from modelshrink.techniques.quantize.technique import quantize

__all__ = ["PANEL", "SPEC", "QatData", "QuantizeConfig", "quantize"]

SPEC = TechniqueSpec(
    name="quantize",
    config=QuantizeConfig,
    entry="modelshrink.techniques.quantize.technique:quantize",
    help="""Quantize weights to int8 (default), 8..1 bits (--bits, --qat), 16-bit floats, or int8 compute.

int8 is weight-only: about 4x smaller, compute in float, stored so that the provider in use runs
it at the original's speed (the report says which storage and why). With a fidelity gate, the
layers that hurt most are kept in float until the gates pass.""",
    examples=(
        "modelshrink quantize sample_models/digits_cnn.onnx -o digits_cnn.int8.onnx",
        "modelshrink quantize model.onnx -o model.int4.onnx --mode int4 --min-cosine 0.99",
        "modelshrink quantize model.onnx -o model.2bit.onnx --bits 2 --qat --data train.npz",
    ),
    op_types=MODE_OPS["int8"],
    prepare="modelshrink.techniques.quantize.loading:load_qat_data",
)


def __getattr__(name: str) -> Any:
    if name == "quantize":
        return SPEC.technique()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
