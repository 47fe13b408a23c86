"""Compression techniques: each a pure function ``(model, config, context) -> TechniqueResult``.

:data:`TECHNIQUES` is the registry: one :class:`~modelshrink.techniques.spec.TechniqueSpec` per
technique, declared in the technique package's ``__init__.py``. The CLI derives one command per
entry (flags from the config's fields), the API runs them, ``inspect`` counts the weights each
can act on. Adding a technique: a package with ``config.py`` (the config dataclass, fields
declared with :func:`modelshrink.flags.flag`), ``technique.py`` (the function), ``search.py``
(how it picks an amount), and ``__init__.py`` (its ``SPEC``); one line below; its tests; its
docs page. Importing this module loads no technique (and no numpy, onnx or onnxruntime).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from modelshrink.techniques import distill, factorize, prune, quantize
from modelshrink.techniques.distill import DistillConfig
from modelshrink.techniques.factorize import FactorizeConfig
from modelshrink.techniques.prune import PruneConfig
from modelshrink.techniques.quantize import QuantizeConfig
from modelshrink.techniques.spec import TechniqueSpec

if TYPE_CHECKING:
    from modelshrink.techniques.base import Change, Skip, Technique, TechniqueContext, TechniqueResult

__all__ = [
    "TECHNIQUES",
    "Change",
    "DistillConfig",
    "FactorizeConfig",
    "PruneConfig",
    "QuantizeConfig",
    "Skip",
    "Technique",
    "TechniqueContext",
    "TechniqueResult",
    "TechniqueSpec",
]

# The registry, in the order commands are listed.
TECHNIQUES: dict[str, TechniqueSpec] = {
    spec.name: spec for spec in (quantize.SPEC, prune.SPEC, factorize.SPEC, distill.SPEC)
}

_BASE = {"Change", "Skip", "Technique", "TechniqueContext", "TechniqueResult"}


def __getattr__(name: str) -> Any:
    if name in _BASE:
        return getattr(importlib.import_module("modelshrink.techniques.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
