"""Exceptions that carry an exit code and a one-line message meant for the user.

Library code raises these; only the CLI turns them into ``error: ...`` on stderr and an exit
code. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "EXIT_ERROR",
    "EXIT_GATE",
    "EXIT_OK",
    "EXIT_USAGE",
    "ConfigError",
    "DataError",
    "GateError",
    "InputGuessError",
    "InvalidModelError",
    "ModelshrinkError",
    "OutputError",
    "TargetError",
    "UnsupportedModelError",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_GATE = 3


class ModelshrinkError(Exception):
    """Base class: a problem the user can act on, with a one-line message."""

    exit_code: int = EXIT_ERROR

    def __init__(self, message: str) -> None:
        # One line, always: multi-line messages break CI log greps and our own contract.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        """The one-line message."""
        return str(self)


class InvalidModelError(ModelshrinkError):
    """The model file is unreadable, corrupt or fails the ONNX checker."""


class UnsupportedModelError(ModelshrinkError):
    """The model is valid ONNX but uses something this tool or onnxruntime cannot handle."""


class DataError(ModelshrinkError):
    """Input data (``--data``) is unreadable or does not match the model's inputs."""


class OutputError(ModelshrinkError):
    """The output cannot be written where asked (exists, is the input, is a terminal, ...)."""


class TargetError(OutputError):
    """A path the command would write is refused before any work: a usage error.

    It coincides with an input or another output, its folder is missing or not writable, it
    exists without ``--force``, or it is something that cannot be written (a directory, a
    block device, a terminal for model bytes).
    """

    exit_code = EXIT_USAGE


class ConfigError(ModelshrinkError):
    """Flags or configuration values that do not make sense: a usage error."""

    exit_code = EXIT_USAGE


class InputGuessError(ConfigError):
    """No synthetic input the original runs on was found: the user must give sizes, values or data."""


class GateError(ModelshrinkError):
    """A quality gate failed; the report says which and by how much."""

    exit_code = EXIT_GATE
