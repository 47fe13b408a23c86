"""What the rest of the tool needs to know about a technique, without importing it.

Each technique package declares one :class:`TechniqueSpec` in its ``__init__.py`` and the
registry (:data:`modelshrink.techniques.TECHNIQUES`) lists them. From a spec the CLI builds the
command (its flags come from the config's fields), the API runs it, ``inspect`` counts the
weights it can act on, and the docs test checks it is documented. The technique itself (and
numpy, onnx, onnxruntime with it) is imported only when a spec is run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelshrink.techniques.base import Technique

__all__ = ["TechniqueSpec"]


def _resolve(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class TechniqueSpec:
    """One technique, as the CLI, the API, ``inspect`` and the docs see it.

    Attributes:
        name: The command name (``prune``).
        config: Its config dataclass; every field declared with :func:`modelshrink.flags.flag`
            is a command-line flag.
        entry: ``"module:function"`` of the technique, ``(model, config, context) -> result``.
        help: The command's help: a summary line, then paragraphs.
        examples: Command lines shown at the end of ``--help`` (and run by the docs tests).
        op_types: Op types whose weights it acts on by default (``inspect``'s table); empty
            for every float weight.
        prepare: ``"module:function"`` that loads files the config names (a teacher, training
            rows) before the run: ``(config, source, options) -> config``; None when the config
            is complete as given.
    """

    name: str
    config: type
    entry: str
    help: str
    examples: tuple[str, ...]
    op_types: tuple[str, ...] = ()
    prepare: str | None = None

    @property
    def summary(self) -> str:
        """The first line of the help."""
        return self.help.strip().splitlines()[0]

    def technique(self) -> Technique:
        """The technique function (imported now)."""
        fn: Technique = _resolve(self.entry)
        return fn

    def preparer(self) -> Callable[..., Any] | None:
        """The loading step, if the config names files (imported now)."""
        return _resolve(self.prepare) if self.prepare is not None else None
