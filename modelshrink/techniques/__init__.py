"""Compression techniques: each a pure function ``(model, config, context) -> TechniqueResult``."""

from __future__ import annotations

from modelshrink.techniques.base import Change, Skip, Technique, TechniqueContext, TechniqueResult
from modelshrink.techniques.distill import DistillConfig, distill

__all__ = ["TECHNIQUES", "Change", "DistillConfig", "Skip", "TechniqueContext", "TechniqueResult", "distill"]

TECHNIQUES: dict[str, Technique] = {
    "distill": distill,
}
