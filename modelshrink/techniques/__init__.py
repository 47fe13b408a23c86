"""Compression techniques: each a pure function ``(model, config, context) -> TechniqueResult``."""

from __future__ import annotations

from modelshrink.techniques.base import Change, Skip, Technique, TechniqueContext, TechniqueResult
from modelshrink.techniques.factorize import FactorizeConfig, factorize

__all__ = [
    "TECHNIQUES",
    "Change",
    "FactorizeConfig",
    "Skip",
    "TechniqueContext",
    "TechniqueResult",
    "factorize",
]

TECHNIQUES: dict[str, Technique] = {
    "factorize": factorize,
}
