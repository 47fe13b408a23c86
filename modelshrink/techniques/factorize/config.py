"""``FactorizeConfig``: every flag of ``modelshrink factorize``, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from modelshrink.errors import ConfigError
from modelshrink.flags import exclude_flag, flag, min_elements_flag

__all__ = ["DEFAULT_MIN_SAVING", "DEFAULT_OP_TYPES", "OP_TYPES", "PANEL", "FactorizeConfig"]

PANEL = "Factorize"
OP_TYPES = ("Conv", "Gather", "Gemm", "MatMul")
# Gather is opt-in: a factorized lookup saves parameters but adds a MatMul per token, so it
# never saves time.
DEFAULT_OP_TYPES = ("Conv", "Gemm", "MatMul")
DEFAULT_MIN_SAVING = 0.2
ConvMode = Literal["channel", "spatial"]
Method = Literal["auto", "svd", "data"]


@dataclass(frozen=True)
class FactorizeConfig:
    """Settings of ``modelshrink factorize``.

    Attributes:
        rank_ratio: ``r = ratio · min(m, n)`` per layer (``--rank-ratio``).
        energy: Smallest ``r`` keeping this share of the squared singular values (``--energy``).
        target_ratio: Model parameters at most this share of the original (``--target-ratio``).
        rank_multiple: Ranks are rounded up to a multiple of this (``--rank-multiple``).
        min_saving: A layer is factorized only when it saves at least this share of its
            parameters (``--min-saving``; -1 allows even full rank, for checks).
        op_types: Op types to factorize (``--op-types``; Gather only when asked for).
        exclude: Node names, op types or weight names (globs) to leave alone (``--exclude``).
        min_elements: Weights with fewer elements are left alone (``--min-elements``).
        conv: Conv split: ``channel`` or ``spatial`` (``--conv``).
        method: ``auto`` (data-aware when ``--data`` is given), ``svd``, or ``data``
            (require ``--data``) (``--method``).
    """

    rank_ratio: float | None = flag(
        None,
        "Rank r = ratio x min(m, n) per layer (one rule of three; with none and no fidelity gate, the "
        "smallest ranks that keep the fidelity floor are searched).",
        panel=PANEL,
        show_default=False,
    )
    energy: float | None = flag(
        None,
        "Smallest rank keeping this share of the squared singular values.",
        panel=PANEL,
        show_default=False,
    )
    target_ratio: float | None = flag(
        None,
        "Model parameters at most this share of the original, ranks spread by least error per parameter saved.",
        panel=PANEL,
        show_default=False,
    )
    rank_multiple: int = flag(8, "Round ranks up to a multiple of this.", panel=PANEL)
    min_saving: float = flag(
        DEFAULT_MIN_SAVING,
        "Factorize a layer only if it saves at least this share of its parameters.",
        panel=PANEL,
    )
    op_types: tuple[str, ...] = flag(
        DEFAULT_OP_TYPES,
        "Op types to factorize, of MatMul, Gemm, Conv, Gather (repeatable or comma-separated; default "
        "MatMul,Gemm,Conv).",
        panel=PANEL,
        show_default=False,
    )
    exclude: tuple[str, ...] = exclude_flag(PANEL)
    min_elements: int = min_elements_flag(PANEL)
    conv: ConvMode = flag(
        "channel",
        "Conv split: channel (k x k to r channels, then 1 x 1) or spatial (k x 1, then 1 x k).",
        panel=PANEL,
    )
    method: Method = flag("auto", "auto (data-aware with --data), svd, or data (needs --data).", panel=PANEL)

    def __post_init__(self) -> None:
        rules = [
            f"--{n}"
            for n, v in (
                ("rank-ratio", self.rank_ratio),
                ("energy", self.energy),
                ("target-ratio", self.target_ratio),
            )
            if v is not None
        ]
        if len(rules) > 1:
            raise ConfigError(f"{' and '.join(rules)} are alternatives; give at most one")
        for name, value in (
            ("--rank-ratio", self.rank_ratio),
            ("--energy", self.energy),
            ("--target-ratio", self.target_ratio),
        ):
            if value is not None and not (0.0 < value <= 1.0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be in (0, 1], got {value}")
        if self.rank_multiple < 1:
            raise ConfigError(f"--rank-multiple must be >= 1, got {self.rank_multiple}")
        if not -1.0 <= self.min_saving < 1.0:
            raise ConfigError(f"--min-saving must be in [-1, 1), got {self.min_saving}")
        if self.min_elements < 0:
            raise ConfigError(f"--min-elements must be >= 0, got {self.min_elements}")
        unknown = [t for t in self.op_types if t not in OP_TYPES]
        if unknown or not self.op_types:
            raise ConfigError(
                f"--op-types: {', '.join(unknown) or 'none given'}; choose from {', '.join(OP_TYPES)}"
            )
        object.__setattr__(self, "op_types", tuple(sorted(set(self.op_types))))
        if self.conv not in ("channel", "spatial"):
            raise ConfigError(f"--conv must be channel or spatial, got {self.conv}")
        if self.method not in ("auto", "svd", "data"):
            raise ConfigError(f"--method must be auto, svd or data, got {self.method}")
