"""Compression techniques: each a pure function ``(model, config, context) -> TechniqueResult``."""

from __future__ import annotations

from modelshrink.techniques.base import Change, Skip, TechniqueContext, TechniqueResult

__all__ = ["Change", "Skip", "TechniqueContext", "TechniqueResult"]
