"""The version, in a module that imports nothing (the CLI prints it before loading anything)."""

__version__ = "0.1.0"
