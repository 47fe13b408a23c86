"""``factorize``: replace weight matrices by two thinner low-rank factors (see :mod:`.technique`).

This front imports nothing heavy: the config, its flags and the spec; the technique function
``factorize`` is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelshrink.techniques.factorize.config import (
    DEFAULT_MIN_SAVING,
    DEFAULT_OP_TYPES,
    OP_TYPES,
    PANEL,
    FactorizeConfig,
)
from modelshrink.techniques.spec import TechniqueSpec

if TYPE_CHECKING:
    from modelshrink.techniques.factorize.technique import factorize

__all__ = [
    "DEFAULT_MIN_SAVING",
    "DEFAULT_OP_TYPES",
    "OP_TYPES",
    "PANEL",
    "SPEC",
    "FactorizeConfig",
    "factorize",
]

SPEC = TechniqueSpec(
    name="factorize",
    config=FactorizeConfig,
    entry="modelshrink.techniques.factorize.technique:factorize",
    help="""Replace weight matrices by two thinner low-rank factors (truncated SVD; fitted to real activations with --data).

A fidelity gate without a rank rule makes a sensitivity search pick the per-layer ranks. With
neither, factorize takes the smallest ranks that keep the fidelity floor (top-1 agreement >= 99%
on class-like outputs, else cosine >= 0.99), found in a few trial runs, and the report says what
it reached; if none keeps it, the model is left unchanged.""",
    examples=(
        "modelshrink factorize sample_models/digits_mlp.onnx -o small.onnx",
        "modelshrink factorize model.onnx -o small.onnx --rank-ratio 0.25 --data inputs.npz",
        "modelshrink factorize model.onnx -o small.onnx --min-cosine 0.999",
    ),
    op_types=DEFAULT_OP_TYPES,
)


def __getattr__(name: str) -> Any:
    if name == "factorize":
        return SPEC.technique()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
