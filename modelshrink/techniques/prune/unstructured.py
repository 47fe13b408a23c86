"""Unstructured (magnitude) and N:M pruning over the eligible weights of a model."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from modelshrink.graph import in_subgraph, op_key, release, weights
from modelshrink.techniques.base import Change, Skip
from modelshrink.techniques.prune.common import (
    FLOAT_TYPES,
    Eligible,
    excluded_by,
    node_label,
    set_weight,
    weight_uses,
)
from modelshrink.techniques.prune.config import PruneConfig
from modelshrink.techniques.prune.magnitude import (
    ReductionView,
    magnitude,
    nm_prune,
    prune_smallest,
    reduction_view,
    select_smallest,
)

if TYPE_CHECKING:
    from modelshrink.techniques.prune.calibrated import Ranker

__all__ = ["Outcome", "Target", "apply_global", "apply_layer_sparsities", "apply_nm", "find_targets", "run"]

logger = logging.getLogger(__name__)

NO_SPEEDUP_NOTE = (
    "unstructured sparsity keeps every weight stored densely: onnxruntime's dense kernels do "
    "the same work, so expect no speed-up; the gain shows in the zlib-compressed size "
    "(size_zlib in the report){storage}. Use --structured to make tensors smaller and faster"
)


@dataclass(frozen=True)
class Target:
    """An eligible weight with what N:M needs to know about it."""

    eligible: Eligible
    view: ReductionView | None = None
    subgraph: str | None = None

    @property
    def name(self) -> str:
        """The weight's name."""
        return self.eligible.weight.name

    @property
    def size(self) -> int:
        """Elements."""
        return self.eligible.weight.size


@dataclass
class Outcome:
    """What a pruning run did (changes, skips, per-layer table)."""

    changed: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    zeros: int = 0
    elements: int = 0

    @property
    def sparsity(self) -> float:
        """Zeros / elements over the pruned tensors."""
        return self.zeros / self.elements if self.elements else 0.0


def find_targets(model: ir.Model, config: PruneConfig) -> tuple[list[Target], list[Skip]]:
    """Eligible weights (deterministic order) and a skip, with a reason, for every other candidate."""
    targets: list[Target] = []
    skipped: list[Skip] = []
    n_m = config.n_m
    for w in weights(model):
        wanted, other = weight_uses(w, config.op_types)
        if not wanted:
            continue
        node = wanted[0][0]
        label, op = node_label(node), op_key(node)
        names = [w.name]
        for n, _ in wanted:
            names += [node_label(n), op_key(n)]
        pattern = excluded_by(config.exclude, *names)
        reason: str | None = None
        if pattern is not None:
            reason = f"excluded by --exclude '{pattern}'"
        elif w.dtype not in FLOAT_TYPES:
            reason = f"weight '{w.name}' is {w.dtype.name.lower()}, not a float tensor"
        elif w.is_graph_input:
            reason = (
                f"weight '{w.name}' is also a graph input (callers may replace it at run time); "
                "remove it from the graph inputs to prune it"
            )
        elif other:
            n2, idx = other[0]
            reason = (
                f"weight '{w.name}' is also used by {op_key(n2)} '{node_label(n2)}' (input {idx}), "
                "which pruning would change too; add that op to --op-types or leave it"
            )
        elif w.size < config.min_elements:
            reason = (
                f"weight '{w.name}' has {w.size} elements, fewer than --min-elements {config.min_elements}"
            )
        if reason is not None:
            skipped.append(Skip(label, op, reason))
            continue
        view: ReductionView | None = None
        if n_m is not None:
            got = _common_view(w.shape, wanted, n_m[1])
            if isinstance(got, str):
                skipped.append(Skip(label, op, f"weight '{w.name}': {got}"))
                continue
            view = got
        sub = (w.graph.name or "<subgraph>") if in_subgraph(w, model) else None
        targets.append(Target(Eligible(w, tuple(wanted)), view, sub))
    return targets, skipped


def _common_view(shape: tuple[int, ...], uses: Sequence[tuple[ir.Node, int]], m: int) -> ReductionView | str:
    views = []
    for node, idx in uses:
        view = reduction_view(node, idx, shape)
        if isinstance(view, str):
            return f"{view} (N:M needs it)"
        views.append(view)
    first = views[0]
    for (node, _), view in zip(uses[1:], views[1:], strict=True):
        if view != first:
            return (
                f"its uses reduce along different dimensions ({first.describe} for "
                f"'{node_label(uses[0][0])}', {view.describe} for '{node_label(node)}')"
            )
    if first.size % m:
        return (
            f"reduction dimension {first.describe} is not a multiple of M={m}; N:M needs whole "
            "groups (this tool does not pad)"
        )
    return first


def _record(
    outcome: Outcome,
    target: Target,
    before: np.ndarray,
    after: np.ndarray,
    what: str,
    ranked: dict[str, object] | None = None,
) -> None:
    w = target.eligible.weight
    zeros = int(after.size - np.count_nonzero(after))
    nonzero_before = int(np.count_nonzero(before))
    outcome.zeros += zeros
    outcome.elements += int(after.size)
    sparsity = zeros / after.size if after.size else 0.0
    nodes = [node_label(n) for n, _ in target.eligible.uses]
    row: dict[str, Any] = {
        "weight": w.name,
        "node": target.eligible.label,
        "op_type": target.eligible.op_type,
        "elements": int(after.size),
        "zeros": zeros,
        "sparsity": round(sparsity, 6),
        "storage": w.kind,
    }
    if ranked is not None:
        row.update(ranked)
        if ranked.get("importance") != "magnitude":
            what = f"{what}, {ranked['importance']}"
    if len(nodes) > 1:
        row["shared_by"] = nodes
    if target.subgraph is not None:
        row["subgraph"] = target.subgraph
    outcome.layers.append(row)
    details = {k: v for k, v in row.items() if k not in ("node", "op_type")}
    outcome.changed.append(
        Change(
            target.eligible.label,
            target.eligible.op_type,
            f"{100 * sparsity:.1f}% zeros ({what})",
            params_before=nonzero_before,
            params_after=int(after.size) - zeros,
            details=details,
        )
    )


def apply_layer_sparsities(
    targets: Sequence[Target], sparsities: Sequence[float], ranker: Ranker | None = None
) -> Outcome:
    """Zero exactly ``round(s * n)`` weights of each target (its own ``s``): the smallest |w|, or
    the least important by ``ranker`` (target ``i`` of ``targets`` is its target ``i``)."""
    outcome = Outcome()
    for i, (target, s) in enumerate(zip(targets, sparsities, strict=True)):
        if s <= 0:
            continue
        w = target.eligible.weight
        old = w.tensor
        before = w.numpy()
        if ranker is None:
            (mask,) = select_smallest([magnitude(before)], round(s * before.size))
            after = prune_smallest(before, mask)
            del mask
        else:
            after = ranker.prune(i, before, s)
        set_weight(w, after)
        ranked = ranker.details(i) if ranker is not None else None
        _record(outcome, target, before, after, f"layer, asked {100 * s:.1f}%", ranked)
        del before
        release(old)
    return outcome


def apply_global(targets: Sequence[Target], sparsity: float) -> Outcome:
    """Zero the ``round(sparsity * N)`` smallest-|w| weights over all targets (one threshold)."""
    arrays = [t.eligible.weight.numpy() for t in targets]
    total = sum(a.size for a in arrays)
    masks = select_smallest([magnitude(a) for a in arrays], round(sparsity * total))
    outcome = Outcome()
    for target, before, mask in zip(targets, arrays, masks, strict=True):
        after = prune_smallest(before, mask)
        set_weight(target.eligible.weight, after)
        _record(outcome, target, before, after, "global threshold")
    return outcome


def apply_nm(
    targets: Sequence[Target], n: int, m: int, ranker: Ranker | None = None, keys: Sequence[int] | None = None
) -> Outcome:
    """N:M on every target: by magnitude, or by ``ranker`` (``keys[j]`` is target ``j``'s index there)."""
    outcome = Outcome()
    for j, target in enumerate(targets):
        assert target.view is not None
        old = target.eligible.weight.tensor
        before = target.eligible.weight.numpy()
        key = keys[j] if keys is not None else j
        if ranker is None:
            after = nm_prune(before, target.view, n, m)
        else:
            after = ranker.nm(key, before, target.view, n, m)
        set_weight(target.eligible.weight, after)
        ranked = ranker.details(key) if ranker is not None else None
        _record(outcome, target, before, after, f"{n}:{m} along {target.view.describe}", ranked)
        del before
        release(old)
    return outcome


def run(
    model: ir.Model, config: PruneConfig, targets: list[Target], skipped: list[Skip], ranker: Ranker | None
) -> Outcome:
    """Prune ``targets`` of ``model`` in place as ``config`` says (unstructured or N:M, uniform)."""
    if config.n_m is not None:
        n, m = config.n_m
        outcome = apply_nm(targets, n, m, ranker)
    elif config.scope == "global":
        outcome = apply_global(targets, config.target_sparsity)
    else:
        outcome = apply_layer_sparsities(targets, [config.target_sparsity] * len(targets), ranker)
    outcome.skipped = skipped + outcome.skipped
    logger.info("pruned %d tensors to %.2f%% zeros", len(outcome.changed), 100 * outcome.sparsity)
    return outcome
