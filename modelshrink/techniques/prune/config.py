"""``PruneConfig``: every flag of ``modelshrink prune``, validated once."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, get_args

from modelshrink.errors import ConfigError
from modelshrink.flags import exclude_flag, flag, min_elements_flag

__all__ = [
    "DEFAULT_OP_TYPES",
    "DEFAULT_SPARSITY",
    "IMPORTANCES",
    "PANEL",
    "SCOPES",
    "STRUCTURED_IMPORTANCES",
    "WEIGHT_IMPORTANCES",
    "PruneConfig",
]

PANEL = "Pruning"
DEFAULT_OP_TYPES: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
DEFAULT_SPARSITY = 0.5
Scope = Literal["layer", "global"]
Importance = Literal["auto", "l1", "l2", "activation", "magnitude", "wanda", "sparsegpt"]
SCOPES: tuple[str, ...] = get_args(Scope)
IMPORTANCES: tuple[str, ...] = get_args(Importance)
# Rankings of whole channels (--structured) and of single weights (unstructured and N:M).
STRUCTURED_IMPORTANCES: tuple[str, ...] = ("auto", "l1", "l2", "activation")
WEIGHT_IMPORTANCES: tuple[str, ...] = ("auto", "magnitude", "wanda", "sparsegpt")
_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class PruneConfig:
    """How to prune.

    Attributes:
        sparsity: Fraction to remove: of the weights (unstructured), or of the channels of
            each prunable channel group (``structured``). None: with a fidelity gate the
            search aims at 0.5; with no gate, the largest amount that keeps the fidelity floor
            is searched. With ``pattern`` it must stay None (the pattern fixes it at
            ``1 - N/M``).
        scope: ``layer`` (each tensor loses exactly ``sparsity`` of its weights) or
            ``global`` (one magnitude threshold across all eligible tensors).
        pattern: ``"N:M"``: at most N non-zeros in every M consecutive weights along the
            reduction (input) dimension.
        structured: Remove whole channels / hidden units so tensors physically shrink.
        importance: Channel ranking for ``structured``: ``l1``/``l2`` weight norms,
            ``activation`` statistics on ``--data``, or ``auto`` (activation with real
            data, else l1). Weight ranking for unstructured and N:M: ``magnitude``,
            ``wanda`` or ``sparsegpt`` (both fitted to ``--data``; see ``calibrated.py``), or
            ``auto`` (sparsegpt with real data and per-layer scope, else magnitude).
        op_types: Op types whose weights are pruned.
        exclude: Node names, op types or weight names (globs) to leave alone.
        min_elements: Weights with fewer elements are left alone.
        channel_multiple: With ``structured``, groups of at least twice this many channels keep
            a multiple of it (CPU kernels' channel blocks); 1: exactly ``sparsity``.
        sparse_storage: Store a pruned tensor as an ONNX sparse tensor where smaller.
        search: Per-layer sensitivity search under the fidelity gates; None means "when a
            fidelity gate (--max-error/--min-cosine/--min-agreement) is given". False also
            turns off the default search, so it needs an amount.
    """

    sparsity: float | None = flag(
        None,
        "Fraction to remove: of the weights, or of each channel group with --structured. Default: the "
        "largest that keeps the fidelity floor (top-1 agreement >= 99% on class-like outputs, else cosine "
        ">= 0.99), searched in a few trial runs; with a fidelity gate, up to 0.5 as the gate allows.",
        panel=PANEL,
        show_default=False,
    )
    scope: Scope = flag(
        "layer",
        "layer: each tensor loses exactly --sparsity; global: one magnitude threshold over all.",
        panel=PANEL,
    )
    pattern: str | None = flag(
        None,
        "N:M, e.g. 2:4: at most N non-zeros in every M weights along the input dimension.",
        panel=PANEL,
        show_default=False,
    )
    structured: bool = flag(
        False, "Remove whole channels / hidden units so tensors shrink (and run faster).", panel=PANEL
    )
    importance: Importance = flag(
        "auto",
        "Which weights go. --structured ranks channels: auto (activation with --data, else l1), l1, l2, "
        "activation. Unstructured and --pattern rank weights: auto (sparsegpt with --data, else magnitude), "
        "magnitude, wanda (|w| x the norm of its input on --data), sparsegpt (second-order, the weights "
        "that stay are corrected on --data).",
        panel=PANEL,
    )
    channel_multiple: int = flag(
        16,
        "With --structured, a group of at least 2N channels keeps a multiple of N (the nearest to what "
        "--sparsity keeps): CPU kernels compute channels in blocks of 8 or 16, so 250 channels run as "
        "slowly as 256. 1 keeps exactly --sparsity.",
        panel=PANEL,
    )
    op_types: tuple[str, ...] = flag(
        DEFAULT_OP_TYPES,
        "Op types whose weights are pruned (repeatable or comma-separated; default MatMul,Gemm,Conv).",
        panel=PANEL,
        show_default=False,
    )
    exclude: tuple[str, ...] = exclude_flag(PANEL)
    min_elements: int = min_elements_flag(PANEL)
    sparse_storage: bool = flag(
        False, "Store pruned tensors as ONNX sparse tensors where smaller (file size only).", panel=PANEL
    )
    search: bool | None = flag(
        None,
        "Per-layer sensitivity search under the fidelity gates (default: on when --max-error, --min-cosine "
        "or --min-agreement is given).",
        negative="--no-search",
        panel=PANEL,
        show_default=False,
    )

    def __post_init__(self) -> None:
        if self.sparsity is not None and not (math.isfinite(self.sparsity) and 0.0 <= self.sparsity < 1.0):
            raise ConfigError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.scope not in SCOPES:
            raise ConfigError(f"--scope must be one of {', '.join(SCOPES)}, got '{self.scope}'")
        if self.importance not in IMPORTANCES:
            raise ConfigError(
                f"--importance must be one of {', '.join(IMPORTANCES)}, got '{self.importance}'"
            )
        if self.min_elements < 0:
            raise ConfigError(f"--min-elements must be >= 0, got {self.min_elements}")
        if self.channel_multiple < 1:
            raise ConfigError(f"--channel-multiple must be >= 1, got {self.channel_multiple}")
        if not self.op_types or any(not op.strip() for op in self.op_types):
            raise ConfigError("--op-types needs at least one op type, e.g. --op-types MatMul,Gemm")
        if any(not p.strip() for p in self.exclude):
            raise ConfigError("--exclude needs a node name, op type or glob, e.g. --exclude 'head*'")
        if self.pattern is not None:
            self.n_m  # validates  # noqa: B018
            if self.sparsity is not None:
                raise ConfigError("--pattern fixes the sparsity at 1 - N/M; drop --sparsity")
            if self.structured:
                raise ConfigError("--pattern and --structured exclude each other")
            if self.scope != "layer":
                raise ConfigError("--pattern applies per group of M weights; drop --scope global")
        if self.structured and self.scope != "layer":
            raise ConfigError(
                "--structured prunes each channel group by its own ranking; drop --scope global"
            )
        self._check_importance()
        if self.sparse_storage and self.structured:
            raise ConfigError("--sparse-storage stores zeroed weights; --structured removes them instead")

    def _check_importance(self) -> None:
        if self.structured and self.importance not in STRUCTURED_IMPORTANCES:
            raise ConfigError(
                f"--importance {self.importance} ranks single weights; --structured ranks channels by "
                f"{', '.join(STRUCTURED_IMPORTANCES[1:])}"
            )
        if not self.structured and self.importance not in WEIGHT_IMPORTANCES:
            raise ConfigError(
                f"--importance {self.importance} ranks channels for --structured; unstructured pruning "
                f"ranks weights by {', '.join(WEIGHT_IMPORTANCES[1:])}"
            )
        if self.scope == "global" and self.importance in ("wanda", "sparsegpt"):
            raise ConfigError(
                f"--importance {self.importance} prunes each tensor by its own inputs; drop --scope global"
            )

    @property
    def n_m(self) -> tuple[int, int] | None:
        """``(N, M)`` from ``pattern``, or None.

        Raises:
            ConfigError: Malformed pattern.
        """
        if self.pattern is None:
            return None
        match = _PATTERN.match(self.pattern)
        if not match:
            raise ConfigError(f"--pattern must look like N:M (e.g. 2:4), got '{self.pattern}'")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 <= n < m or m > 1024:
            raise ConfigError(f"--pattern N:M needs 0 <= N < M <= 1024, got {n}:{m}")
        return n, m

    @property
    def amount_given(self) -> bool:
        """Whether the user said how much to prune (``sparsity`` or ``pattern``)."""
        return self.sparsity is not None or self.pattern is not None

    @property
    def target_sparsity(self) -> float:
        """The fraction to remove: ``sparsity``, ``1 - N/M`` for a pattern, else 0.5 (what a
        gate-driven search aims at)."""
        if self.n_m is not None:
            n, m = self.n_m
            return 1.0 - n / m
        return DEFAULT_SPARSITY if self.sparsity is None else self.sparsity
