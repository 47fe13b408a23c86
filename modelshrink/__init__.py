"""modelshrink: make ONNX models smaller and faster, with an honest report of what changed."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
