"""``prune``: remove the weights that matter least (see :mod:`.technique` for the modes).

This front imports nothing heavy: the config, its flags and the spec; the technique function
``prune`` is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelshrink.techniques.prune.config import DEFAULT_OP_TYPES, PANEL, PruneConfig
from modelshrink.techniques.spec import TechniqueSpec

if TYPE_CHECKING:
    from modelshrink.techniques.prune.technique import prune

__all__ = ["DEFAULT_OP_TYPES", "PANEL", "SPEC", "PruneConfig", "prune"]

SPEC = TechniqueSpec(
    name="prune",
    config=PruneConfig,
    entry="modelshrink.techniques.prune.technique:prune",
    help="""Prune weights: zero the smallest (unstructured or N:M) or remove whole channels (--structured).

Unstructured and N:M sparsity give no speed-up in onnxruntime (dense kernels); they show in the
zlib-compressed size. --structured makes tensors smaller and faster.

With no --sparsity or --pattern and no fidelity gate, prune takes the largest sparsity that keeps
the fidelity floor (top-1 agreement >= 99% on class-like outputs, else cosine >= 0.99), found in a
few trial runs, and the report says what it reached; if none keeps it, the model is left
unchanged. An explicit amount is applied exactly as asked.""",
    examples=(
        "modelshrink prune sample_models/digits_cnn.onnx -o pruned.onnx",
        "modelshrink prune model.onnx -o pruned.onnx --sparsity 0.6",
        "modelshrink prune model.onnx -o small.onnx --structured --sparsity 0.25 --data inputs.npz",
    ),
    op_types=DEFAULT_OP_TYPES,
)


def __getattr__(name: str) -> Any:
    if name == "prune":
        return SPEC.technique()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
