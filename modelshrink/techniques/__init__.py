"""Compression techniques: each a pure function ``(model, config, context) -> TechniqueResult``."""

from __future__ import annotations

from modelshrink.techniques.base import Change, Skip, Technique, TechniqueContext, TechniqueResult

# Imported under private names so that ``modelshrink.techniques.<name>`` stays the module.
from modelshrink.techniques.distill import DistillConfig
from modelshrink.techniques.distill import distill as _distill
from modelshrink.techniques.factorize import FactorizeConfig
from modelshrink.techniques.factorize import factorize as _factorize
from modelshrink.techniques.prune import PruneConfig
from modelshrink.techniques.prune import prune as _prune
from modelshrink.techniques.quantize import QuantizeConfig
from modelshrink.techniques.quantize import quantize as _quantize

__all__ = [
    "TECHNIQUES",
    "Change",
    "DistillConfig",
    "FactorizeConfig",
    "PruneConfig",
    "QuantizeConfig",
    "Skip",
    "TechniqueContext",
    "TechniqueResult",
]

TECHNIQUES: dict[str, Technique] = {
    "distill": _distill,
    "factorize": _factorize,
    "prune": _prune,
    "quantize": _quantize,
}
