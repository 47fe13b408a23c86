"""The ``modelshrink`` command's entry point: signal handlers first, the heavy imports after.

See :mod:`modelshrink.signals`: a signal during the second or more spent importing onnx,
onnxruntime and numpy must end in one line too, which is why the handlers go in before the CLI
(and everything under it) is imported. The top of the layering: it imports the CLI.
"""

from __future__ import annotations

import signal
import sys
from typing import NoReturn

from modelshrink.signals import Interrupted, after_exit, exit_interrupted, install_signal_handlers

__all__ = ["main"]


def main() -> NoReturn:
    """Console-script entry point."""
    try:
        install_signal_handlers()
        from modelshrink.cli import app

        app()
    except Interrupted as exc:
        exit_interrupted(exc)
    except KeyboardInterrupt as exc:
        exit_interrupted(exc)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, after_exit)
    sys.exit(0)  # app() always exits; this is for type checkers
