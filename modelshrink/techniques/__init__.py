"""Compression techniques: each a pure function ``(model, config, context) -> TechniqueResult``."""

from __future__ import annotations

from modelshrink.techniques.base import Change, Skip, Technique, TechniqueContext, TechniqueResult

# Imported under private names so that ``modelshrink.techniques.quantize`` stays the module.
from modelshrink.techniques.quantize import QuantizeConfig
from modelshrink.techniques.quantize import quantize as _quantize

__all__ = [
    "TECHNIQUES",
    "Change",
    "QuantizeConfig",
    "Skip",
    "TechniqueContext",
    "TechniqueResult",
]

TECHNIQUES: dict[str, Technique] = {
    "quantize": _quantize,
}
