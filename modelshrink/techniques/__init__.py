"""Compression techniques: each a pure function ``(model, config, context) -> TechniqueResult``."""

from __future__ import annotations

from modelshrink.techniques.base import Change, Skip, Technique, TechniqueContext, TechniqueResult
from modelshrink.techniques.quantize import QuantizeConfig, quantize

__all__ = [
    "TECHNIQUES",
    "Change",
    "QuantizeConfig",
    "Skip",
    "TechniqueContext",
    "TechniqueResult",
    "quantize",
]

TECHNIQUES: dict[str, Technique] = {
    "quantize": quantize,
}
