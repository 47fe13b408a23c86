"""Compression techniques: each a pure function ``(model, config, context) -> TechniqueResult``."""

from __future__ import annotations

from modelshrink.techniques.base import Change, Skip, Technique, TechniqueContext, TechniqueResult
from modelshrink.techniques.prune import prune

__all__ = ["TECHNIQUES", "Change", "Skip", "TechniqueContext", "TechniqueResult"]

TECHNIQUES: dict[str, Technique] = {
    "prune": prune,
}
