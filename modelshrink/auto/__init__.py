"""``modelshrink auto``: search every technique for the smallest or fastest model that passes.

The front is light (the config and its flags); :func:`auto` is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelshrink.auto.config import PANEL, AutoConfig

if TYPE_CHECKING:
    from modelshrink.auto.search import auto

__all__ = ["PANEL", "AutoConfig", "auto"]


def __getattr__(name: str) -> Any:
    if name == "auto":
        from modelshrink.auto.search import auto

        return auto
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
