"""modelshrink: make ONNX models smaller and faster, with an honest report of what changed.

from modelshrink import quantize, QuantizeConfig
report = quantize("model.onnx", "model.int8.onnx", QuantizeConfig())
"""

from __future__ import annotations

__version__ = "0.1.0"

from modelshrink.api import (
    compare,
    distill,
    distill_config,
    factorize,
    inspect,
    prune,
    qat_settings,
    quantize,
)
from modelshrink.errors import ModelshrinkError
from modelshrink.gates import Gates
from modelshrink.pipeline import RunOptions
from modelshrink.report import Report
from modelshrink.runtime import RuntimeOptions
from modelshrink.techniques import DistillConfig, FactorizeConfig, PruneConfig, QuantizeConfig

__all__ = [
    "DistillConfig",
    "FactorizeConfig",
    "Gates",
    "ModelshrinkError",
    "PruneConfig",
    "QuantizeConfig",
    "Report",
    "RunOptions",
    "RuntimeOptions",
    "__version__",
    "compare",
    "distill",
    "distill_config",
    "factorize",
    "inspect",
    "prune",
    "qat_settings",
    "quantize",
]
