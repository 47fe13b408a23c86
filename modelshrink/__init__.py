"""modelshrink: make ONNX models smaller and faster, with an honest report of what changed.

from modelshrink import quantize, QuantizeConfig
report = quantize("model.onnx", "model.int8.onnx", QuantizeConfig())

The public names are imported on first use: ``import modelshrink`` itself loads nothing
heavy, so the command can install its signal handlers before onnx, onnxruntime and numpy load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from modelshrink._version import __version__

if TYPE_CHECKING:
    from modelshrink.api import compare, distill, factorize, inspect, prune, quantize, run
    from modelshrink.auto import AutoConfig, auto
    from modelshrink.errors import ModelshrinkError
    from modelshrink.gates import Gates
    from modelshrink.options import RunOptions, RuntimeOptions
    from modelshrink.report import Report
    from modelshrink.techniques import DistillConfig, FactorizeConfig, PruneConfig, QuantizeConfig

_HOMES = {
    "auto": "modelshrink.auto",
    "AutoConfig": "modelshrink.auto",
    "compare": "modelshrink.api",
    "distill": "modelshrink.api",
    "factorize": "modelshrink.api",
    "inspect": "modelshrink.api",
    "prune": "modelshrink.api",
    "run": "modelshrink.api",
    "quantize": "modelshrink.api",
    "ModelshrinkError": "modelshrink.errors",
    "Gates": "modelshrink.gates",
    "RunOptions": "modelshrink.options",
    "Report": "modelshrink.report",
    "RuntimeOptions": "modelshrink.options",
    "DistillConfig": "modelshrink.techniques",
    "FactorizeConfig": "modelshrink.techniques",
    "PruneConfig": "modelshrink.techniques",
    "QuantizeConfig": "modelshrink.techniques",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'modelshrink' has no attribute '{name}'")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


__all__ = [
    "AutoConfig",
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
    "auto",
    "compare",
    "distill",
    "factorize",
    "inspect",
    "prune",
    "quantize",
    "run",
]
