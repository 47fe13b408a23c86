"""The recipes ``auto`` tries: single commands and chains, each a list of steps.

A step is one command of the tool with its config; its command line is derived from the
config's fields (:func:`modelshrink.flags.to_argv`), so the recipe shown in the report is
exactly what ``auto`` ran. Each recipe says what it needs (``--data`` with enough rows to
train), how cheap it is (tiers: cheap ones run first), and a bound on what it could reach
(the smallest size it could have; whether it can run faster than the original), so a recipe
that cannot beat the best result found so far is skipped without running.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelshrink.techniques.distill.config import DistillConfig
from modelshrink.techniques.factorize.config import FactorizeConfig
from modelshrink.techniques.prune.config import PruneConfig
from modelshrink.techniques.quantize.config import QuantizeConfig

__all__ = ["MIN_TRAIN_SAMPLES", "Recipe", "Step", "Weights", "recipes"]

# Training candidates (distill, QAT) need at least this many calibration samples.
MIN_TRAIN_SAMPLES = 64


@dataclass(frozen=True)
class Weights:
    """What bounds a recipe's size: the model's bytes, and the weight bytes each technique can
    act on (``inspect``'s ``technique_bytes``)."""

    size: int
    quantizable: int
    prunable: int
    factorizable: int

    def ratio(self, acted_on: int, kept: float) -> float:
        """Size ratio if ``acted_on`` bytes keep ``kept`` of their size and the rest stays."""
        if self.size <= 0:
            return 1.0
        return max(0.0, (self.size - acted_on + acted_on * kept) / self.size)


@dataclass(frozen=True)
class Step:
    """One command of a recipe.

    Attributes:
        command: The technique's name (``quantize``, ``prune``, ...).
        config: Its config; the command line is rendered from it.
        calibrate: Give it the calibration samples of ``--data`` (``--data D --rows ...``).
        gated: Give it the fidelity gates, which drive its search (mixed precision,
            the channels or ranks that keep them).
        teacher: Distill from the original model (``--teacher``).
    """

    command: str
    config: Any
    calibrate: bool = True
    gated: bool = False
    teacher: bool = False


@dataclass(frozen=True)
class Recipe:
    """A candidate: steps run in order, each on the previous one's result.

    Attributes:
        name: Short name (the table's first column; ``--only`` takes it).
        steps: The commands.
        tier: Cost class: lower runs first.
        trains: Needs ``--data`` with at least :data:`MIN_TRAIN_SAMPLES` calibration samples.
        needs_data: Needs ``--data`` at all (static calibration).
        smallest: A lower bound of the size ratio it can reach (for skipping).
        can_be_faster: Whether it can run faster than the original on CPU.
        gpu_only: Worth trying for latency only on a GPU provider (fp16).
    """

    name: str
    steps: tuple[Step, ...]
    tier: int
    smallest: float
    trains: bool = False
    needs_data: bool = False
    can_be_faster: bool = True
    gpu_only: bool = False
    notes: tuple[str, ...] = field(default=())


def _quantize(name: str, tier: int, smallest: float, *, gated: bool = False, **kw: Any) -> Recipe:
    """A one-step quantize recipe: data-free weight formats keep compute as it is (not faster)."""
    config = QuantizeConfig(**kw)
    faster = config.mode in ("dynamic", "static", "int4")
    step = Step("quantize", config, gated=gated)
    return Recipe(
        name,
        (step,),
        tier,
        smallest,
        trains=config.qat,
        needs_data=config.mode == "static",
        can_be_faster=faster,
        gpu_only=config.mode == "fp16",
    )


def recipes(w: Weights, *, original: str, epochs: int) -> list[Recipe]:
    """Every recipe worth considering for this model, cheap first (the caller filters them).

    ``original`` is the teacher of the distillation steps (the model ``auto`` was given).
    """
    q = w.quantizable
    int8 = Step("quantize", QuantizeConfig())
    distill = Step("distill", DistillConfig(teacher=original, epochs=epochs), teacher=True)
    factorize = Step("factorize", FactorizeConfig(), gated=True)
    prune = Step("prune", PruneConfig(structured=True), gated=True)
    out = [
        _quantize("int8", 0, w.ratio(q, 0.25)),
        _quantize("bf16", 0, w.ratio(q, 0.5), mode="bf16"),
        _quantize("fp16", 0, w.ratio(q, 0.5), mode="fp16"),
        _quantize("dynamic", 1, w.ratio(q, 0.25), mode="dynamic"),
        _quantize("int4", 1, w.ratio(q, 0.125), gated=True, mode="int4"),
        # 6 and 5 bits: where 4 loses the gate on held-out rows, a width between it and int8 may
        # not (magika: 6 bits kept 99.2 % top-1 on held-out rows, 5 bits 98.3 %, 4 bits 96.7 %)
        *(_quantize(f"{b}bit", 1, w.ratio(q, b / 32), gated=True, bits=b) for b in (6, 5, 4, 3, 2)),
        _quantize("static", 2, w.ratio(q, 0.25), gated=True, mode="static"),
        Recipe("factorize", (factorize,), 2, w.ratio(w.factorizable, 0.05)),
        Recipe("factorize+int8", (factorize, int8), 3, w.ratio(w.factorizable, 0.05 * 0.25)),
        Recipe("prune-structured", (prune,), 3, w.ratio(w.prunable, 0.01)),
        Recipe("prune-structured+int8", (prune, int8), 3, w.ratio(w.prunable, 0.01 * 0.25)),
    ]
    for share in (0.25, 0.5):
        pruned = Step("prune", PruneConfig(structured=True, sparsity=share, search=False))
        kept = (1 - share) ** 2  # channels go on both sides of most weights
        smallest = w.ratio(w.prunable, kept * 0.25)
        out.append(
            Recipe(f"prune{int(share * 100)}+distill+int8", (pruned, distill, int8), 4, smallest, trains=True)
        )
    half_rank = Step("factorize", FactorizeConfig(rank_ratio=0.5))
    out.append(
        Recipe(
            "factorize50+distill+int8",
            (half_rank, distill, int8),
            4,
            w.ratio(w.factorizable, 0.0625),
            trains=True,
        )
    )
    out += [_quantize(f"qat-{b}bit", 4, w.ratio(q, b / 32), bits=b, qat=True, epochs=epochs) for b in (3, 2)]
    return sorted(out, key=lambda r: r.tier)
