"""Signals: SIGINT and SIGTERM unwind a run and end it with 130 / 143 and one line, never a traceback.

SIGINT and SIGTERM unwind a run like an exception, so staged files are removed on the way
out, and end it with exit code 130 or 143 and one line on stderr; never a traceback, at any
moment. That includes the second or more spent importing onnx, onnxruntime and numpy, which is
why this module imports nothing heavy before its handlers are in place. (A signal during the
interpreter's own start-up, before any of this code runs, gets Python's default behaviour.)
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, NoReturn

__all__ = ["Interrupted", "after_exit", "caught_signal", "exit_interrupted", "install_signal_handlers"]

_WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
_caught: list[int] = []


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: unwind (removing staged files), then exit 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


def _on_signal(signum: int, frame: Any) -> None:
    if _caught:
        return  # already unwinding from the first one: let the clean-up finish
    _caught.append(signum)
    raise Interrupted(signum)


def after_exit(signum: int, frame: Any) -> None:
    # The run is over (files committed or cleaned up, output flushed): a late signal only
    # changes the exit code, without unwinding through interpreter shutdown.
    if not _caught:
        os._exit(128 + signum)


def caught_signal() -> int | None:
    """The signal this process is unwinding from, if any."""
    return _caught[0] if _caught else None


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` (the first one; later ones wait for it).

    A signal ignored when the process started stays ignored (a shell starts background jobs
    with SIGINT ignored, so that Ctrl-C does not reach them).
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _on_signal)


def exit_interrupted(exc: BaseException | None) -> NoReturn:
    """End the process for an interrupt: ``error: interrupted`` on stderr, exit 128 + signal.

    Args:
        exc: The :class:`Interrupted` (or a bare KeyboardInterrupt, taken as SIGINT).
    """
    signum = exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT)
    try:
        sys.stderr.write(f"error: {_WORDS.get(signal.Signals(signum), 'interrupted')}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    sys.exit(128 + signum)
