"""``AutoConfig``: every flag of ``modelshrink auto``, validated once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from modelshrink.errors import ConfigError
from modelshrink.flags import flag

__all__ = ["PANEL", "AutoConfig", "Goal", "parse_duration"]

PANEL = "Search"
Goal = Literal["size", "latency"]
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``90s``, ``10m``, ``1.5h`` or plain seconds, in seconds.

    Raises:
        ConfigError: Not a positive duration.
    """
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"--time-budget '{text}': expected a duration like 90s, 10m or 1h")
    seconds = float(match.group(1)) * _UNIT_S[(match.group(2) or "s").lower()]
    if seconds <= 0:
        raise ConfigError(f"--time-budget '{text}': must be more than 0")
    return seconds


@dataclass(frozen=True)
class AutoConfig:
    """Settings of ``modelshrink auto``.

    Attributes:
        goal: ``size``: the smallest result that passes every gate; ``latency``: the fastest
            (p50 on the provider in use).
        time_budget: No candidate starts after this long; one still running past it by a
            twentieth is abandoned.
        keep_best: On Ctrl-C or SIGTERM, write the best result found so far (else nothing).
        plot: Draw every candidate (size or latency against fidelity), the frontier and the
            gates to this PNG file (needs matplotlib).
        holdout: With ``--data``: one sample in ``holdout`` is held out for scoring; no
            candidate calibrates or trains on those.
        only: Try only these candidates (by name).
        epochs: Distillation epochs of candidates that win accuracy back by training.
    """

    goal: Goal = flag(
        "size",
        "size: the smallest result that passes every gate; latency: the fastest (p50, provider in use).",
        panel=PANEL,
    )
    time_budget: str = flag(
        "10m",
        "Start no candidate after this long (e.g. 90s, 10m, 1h); one still running is abandoned soon after.",
        panel=PANEL,
    )
    keep_best: bool = flag(
        False, "On Ctrl-C (or SIGTERM), write the best result found so far instead of nothing.", panel=PANEL
    )
    plot: str | None = flag(
        None,
        "Draw size (or latency) against fidelity for every candidate, the frontier and the gates, to this "
        "PNG file (needs matplotlib: pip install 'modelshrink[plot]').",
        panel=PANEL,
        show_default=False,
    )
    holdout: int = flag(
        5,
        "With --data: hold out one sample in K for scoring; no candidate calibrates or trains on them.",
        panel=PANEL,
    )
    only: tuple[str, ...] = flag(
        (),
        "Try only these candidates, by the names in the table (repeatable or comma-separated).",
        panel=PANEL,
        show_default=False,
    )
    epochs: int = flag(
        20, "Distillation epochs of candidates that win accuracy back by training.", panel=PANEL
    )

    def __post_init__(self) -> None:
        parse_duration(self.time_budget)
        if self.holdout < 2:
            raise ConfigError(f"--holdout must be >= 2 (one sample in K is held out), got {self.holdout}")
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.plot is not None and not self.plot.lower().endswith(".png"):
            raise ConfigError(f"--plot {self.plot}: the plot is a PNG file; name it *.png")

    @property
    def budget_s(self) -> float:
        """``time_budget`` in seconds."""
        return parse_duration(self.time_budget)

    @property
    def calibration_rows(self) -> str:
        """``--rows`` of the samples candidates calibrate and train on."""
        return f"%{self.holdout}!={self.holdout - 1}"

    @property
    def heldout_rows(self) -> str:
        """``--rows`` of the samples every candidate is scored on."""
        return f"%{self.holdout}={self.holdout - 1}"
