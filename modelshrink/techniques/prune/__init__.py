"""Pruning: remove the weights that matter least.

Modes (``PruneConfig``):

* **Unstructured** (default): zero the fraction ``s`` of weights with the smallest ``|w|``,
  exactly ``round(s * n)`` per tensor (``scope="layer"``), or the ``round(s * N)`` smallest
  over all eligible tensors at once (``scope="global"``, one threshold; layers with small
  weights lose more). Eligible: float weights (initializers, ``Constant`` nodes, and those of
  ``If``/``Loop``/``Scan`` bodies) that are weight inputs of ``op_types`` (MatMul/Gemm/Conv by
  default), have at least ``min_elements`` elements, are not graph inputs, are not excluded,
  and are used by nothing else. Tensors keep their dense shape: onnxruntime does the same work,
  so there is no speed-up; the file compresses better (zlib), and ``sparse_storage`` stores a
  tensor as an ONNX sparse tensor where that is smaller (:mod:`._sparse`).
* **N:M** (``pattern="2:4"``): in every group of M consecutive weights along the reduction
  dimension K of the consumer (MatMul ``W[K, N]`` along K; Gemm ``B`` along K as ``transB``
  says; Conv ``W[Cout, Cin/g, kh, kw]`` along the flattened ``Cin/g x kh x kw``), keep the N
  largest ``|w|``. K must be a multiple of M, else the weight is skipped (no padding).
* **Structured** (``structured=True``): remove whole channels so tensors shrink
  (:mod:`._structured`, dependency analysis in :mod:`._channels`).
* **Tolerance-driven**: with a fidelity gate (``--max-error``/``--min-cosine``/
  ``--min-agreement``) a per-layer sensitivity search picks each layer's level so the whole
  model reaches ``sparsity`` (or as much as the gates allow) while keeping the gates
  (:mod:`._search`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import onnx_ir as ir

from modelshrink.errors import ConfigError
from modelshrink.graph import op_key, run_time_weights, weights
from modelshrink.techniques.base import Skip, TechniqueContext, TechniqueResult
from modelshrink.techniques.prune import _search, _sparse, _structured, _unstructured
from modelshrink.techniques.prune._common import node_label, set_weight
from modelshrink.techniques.prune._config import DEFAULT_OP_TYPES, PruneConfig
from modelshrink.techniques.prune._magnitude import magnitude, nm_prune, prune_smallest, select_smallest

__all__ = ["DEFAULT_OP_TYPES", "PruneConfig", "prune"]

logger = logging.getLogger(__name__)

# Levels the sensitivity search tries (plus the target itself).
UNSTRUCTURED_LEVELS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
UNSTRUCTURED_CAP = 0.95
STRUCTURED_LEVELS = (0.0625, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
STRUCTURED_CAP = 0.9


def _wants_search(config: PruneConfig, context: TechniqueContext) -> bool:
    gated = context.gates.fidelity_gates
    if config.search and not gated:
        raise ConfigError("--search needs a fidelity gate: --max-error, --min-cosine or --min-agreement")
    wanted = gated if config.search is None else config.search
    if wanted and config.scope == "global":
        raise ConfigError(
            "a fidelity gate drives a per-layer search; drop --scope global or pass --no-search"
        )
    return wanted


def prune(model: ir.Model, config: PruneConfig, context: TechniqueContext) -> TechniqueResult:
    """Prune a copy of ``model`` as ``config`` says; the input is never modified."""
    model = model.clone()
    searching = _wants_search(config, context)
    computed = [
        Skip(node_label(n), op_key(n), why)
        for n, why in run_time_weights(model, config.op_types, config.exclude)
    ]
    if config.structured:
        result = _structured_result(model, config, context, searching)
    else:
        result = _unstructured_result(model, config, context, searching)
    named = {s.node for s in result.skipped}
    extra = tuple(s for s in computed if s.node not in named)
    return dataclasses.replace(result, skipped=result.skipped + extra) if extra else result


# --- unstructured and N:M -----------------------------------------------------------------


def _unstructured_result(
    model: ir.Model, config: PruneConfig, context: TechniqueContext, searching: bool
) -> TechniqueResult:
    mode = f"{config.n_m[0]}:{config.n_m[1]}" if config.n_m else "unstructured"
    search_details: dict[str, Any] | None = None
    notes: list[str] = []
    if searching:
        outcome, targets, found = _unstructured_search(model, config, context)
        search_details = _search_details(found)
        notes.append(_search.describe(found, "eligible weights"))
    else:
        outcome, targets = _unstructured.run(model, config)
    storage = ""
    if config.sparse_storage:
        pruned = {row["weight"] for row in outcome.layers}
        stored = _sparse.store_sparse(model, [t for t in targets if t.name in pruned])
        for row in outcome.layers:
            row["stored"] = "sparse" if row["weight"] in stored.stored else "dense"
            if row["weight"] in stored.dense:
                row["stored_dense_because"] = stored.dense[row["weight"]]
        storage = (
            f" and, with --sparse-storage, in the file: {len(stored.stored)} tensor(s) stored as ONNX "
            f"sparse tensors, {len(stored.dense)} kept dense (see details.layers)"
        )
    if outcome.elements:
        notes.insert(
            0,
            f"{mode}: {100 * outcome.sparsity:.2f}% of {outcome.elements:,} weights in "
            f"{len(outcome.changed)} pruned tensor(s) are now zero (asked "
            f"{100 * config.target_sparsity:.1f}%, scope {config.scope})",
        )
    else:
        notes.insert(0, f"{mode}: nothing was pruned; see the skipped list")
    notes.append(_unstructured.NO_SPEEDUP_NOTE.format(storage=storage))
    eligible = sum(t.size for t in targets)
    details: dict[str, Any] = {
        "mode": mode,
        "scope": config.scope,
        "requested_sparsity": config.target_sparsity,
        "achieved_sparsity": round(outcome.sparsity, 6),
        "eligible_elements": eligible,
        "pruned_elements": outcome.elements,
        "zeros": outcome.zeros,
        "layers": outcome.layers,
    }
    if search_details is not None:
        details["search"] = search_details
    return TechniqueResult(model, tuple(outcome.changed), tuple(outcome.skipped), tuple(notes), details)


def _unstructured_search(
    model: ir.Model, config: PruneConfig, context: TechniqueContext
) -> tuple[_unstructured.Outcome, list[_unstructured.Target], _search.SearchResult]:
    targets, skipped = _unstructured.find_targets(model, config)
    all_weights = weights(model)
    position = {id(w.value): i for i, w in enumerate(all_weights)}
    slots = [position[id(t.eligible.weight.value)] for t in targets]
    n_m = config.n_m

    def pruned(i: int, level: float) -> Any:
        array = targets[i].eligible.weight.numpy()
        if n_m is not None:
            view = targets[i].view
            assert view is not None
            return nm_prune(array, view, *n_m)
        (mask,) = select_smallest([magnitude(array)], round(level * array.size))
        return prune_smallest(array, mask)

    def build(assignment: dict[int, float]) -> ir.Model:
        candidate = model.clone()
        found = weights(candidate)
        for i, level in assignment.items():
            if level > 0:
                set_weight(found[slots[i]], pruned(i, level))
        return candidate

    target = config.target_sparsity
    if n_m is not None:
        levels: tuple[float, ...] = (target,)
    else:
        levels = _search.levels_for(target, UNSTRUCTURED_LEVELS, UNSTRUCTURED_CAP)
    units = [
        _search.Unit(
            key=i,
            label=t.eligible.label,
            op_type=t.eligible.op_type,
            size=t.size,
            levels=levels,
            removed=functools.partial(_elements_removed, t.size),
        )
        for i, t in enumerate(targets)
    ]
    found = _search.search(units, build, context, target)
    chosen = [found.assignment.get(i, 0.0) for i in range(len(targets))]
    if n_m is not None:
        outcome = _unstructured.apply_nm([t for t, c in zip(targets, chosen, strict=True) if c > 0], *n_m)
    else:
        outcome = _unstructured.apply_layer_sparsities(targets, chosen)
    outcome.skipped = skipped + [
        Skip(t.eligible.label, t.eligible.op_type, "the sensitivity search left it whole to keep the gates")
        for t, c in zip(targets, chosen, strict=True)
        if c <= 0
    ]
    return outcome, targets, found


def _elements_removed(size: int, level: float) -> int:
    return round(level * size)


def _search_details(found: _search.SearchResult) -> dict[str, Any]:
    fidelity = found.fidelity
    return {
        "target": found.target,
        "achieved": round(found.achieved, 6),
        "limited_by_gates": found.limited_by_gates,
        "evaluations": found.evaluations,
        "layers": found.table,
        "checked": None
        if fidelity is None
        else {
            "max_abs_error": fidelity.max_abs_error,
            "cosine": fidelity.cosine,
            "top1_agreement": fidelity.top1_agreement,
        },
    }


# --- structured -----------------------------------------------------------------------------


def _structured_result(
    model: ir.Model, config: PruneConfig, context: TechniqueContext, searching: bool
) -> TechniqueResult:
    notes: list[str] = []
    search_details: dict[str, Any] | None = None
    if searching:
        the_plan = _structured.plan(model, config, context)
        units = [
            _search.Unit(
                key=g.root,
                label=", ".join(g.producers),
                op_type=g.producer_ops[0],
                size=g.channels,
                levels=_search.levels_for(config.target_sparsity, STRUCTURED_LEVELS, STRUCTURED_CAP),
                removed=functools.partial(_structured.removed_channels, g.channels),
            )
            for g in the_plan.prunable
        ]

        def build(assignment: dict[int, float]) -> ir.Model:
            candidate = model.clone()
            _structured.apply_plan(
                candidate, _structured.replan(candidate, the_plan, config, context), assignment
            )
            return candidate

        found = _search.search(units, build, context, config.target_sparsity)
        applied = _structured.apply_plan(model, the_plan, found.assignment)
        search_details = _search_details(found)
        notes.append(_search.describe(found, "channels"))
    else:
        the_plan, applied = _structured.run(model, config, context)
    prunable = the_plan.prunable
    total = sum(g.channels for g in prunable)
    notes.insert(
        0,
        f"structured: removed {applied.channels_removed} of {total} channel(s) in {len(prunable)} prunable "
        f"group(s) (asked {100 * config.target_sparsity:.1f}%, importance {the_plan.importance}); "
        f"pruned tensors {applied.params_before:,} → {applied.params_after:,} parameters",
    )
    blocked = len(the_plan.groups) - len(prunable)
    if blocked:
        notes.append(f"{blocked} channel group(s) left whole; the skipped list says why")
    details: dict[str, Any] = {
        "mode": "structured",
        "requested_sparsity": config.target_sparsity,
        "importance": the_plan.importance,
        "channels_removed": applied.channels_removed,
        "channels_prunable": total,
        "groups": applied.groups,
    }
    if search_details is not None:
        details["search"] = search_details
    return TechniqueResult(model, tuple(applied.changed), tuple(the_plan.skipped), tuple(notes), details)
