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
* **Default** (no ``sparsity``, no ``pattern``, no fidelity gate): the largest sparsity that
  keeps the fidelity floor (``context.floor``), found in a few runs
  (:mod:`modelshrink.techniques.floor`): per-layer steps taken where the weight error they
  add per weight removed is smallest, and the same level on every layer, each by bisection.
  With ``structured`` the same over channel shares (the proxy: the share of a group's channel
  importance removed); with ``scope="global"`` a bisection over the one threshold. If no
  amount keeps the floor, the model is returned unchanged and the notes say so.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import onnx_ir as ir

from modelshrink.errors import ConfigError
from modelshrink.graph import FLOAT32_TINY, count_subnormals, op_key, release, run_time_weights, weights
from modelshrink.techniques import floor_search
from modelshrink.techniques.base import Skip, TechniqueContext, TechniqueResult
from modelshrink.techniques.prune import search, sparse, structured, unstructured
from modelshrink.techniques.prune.calibrated import MAGNITUDE_NOTE, Ranker, make_ranker
from modelshrink.techniques.prune.calibrated import notes as importance_notes
from modelshrink.techniques.prune.common import node_label, set_weight
from modelshrink.techniques.prune.config import DEFAULT_OP_TYPES, PruneConfig

__all__ = ["DEFAULT_OP_TYPES", "PruneConfig", "prune"]

logger = logging.getLogger(__name__)

# Levels the sensitivity search tries (plus the target itself).
UNSTRUCTURED_LEVELS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
UNSTRUCTURED_CAP = 0.95
# One threshold over all weights (--scope global with no --sparsity): levels tried.
GLOBAL_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20))
STRUCTURED_LEVELS = (0.0625, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
STRUCTURED_CAP = 0.9
NOTHING_KEPT = "no sparsity tried keeps the fidelity floor; the model is unchanged"


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


def _wants_default(config: PruneConfig, context: TechniqueContext) -> bool:
    """No amount and no fidelity gate: search the largest amount that keeps the floor."""
    if config.amount_given or context.gates.fidelity_gates:
        return False
    if config.search is False:
        raise ConfigError(
            "--no-search with no --sparsity and no fidelity gate leaves nothing to say how much to "
            "prune; give --sparsity, or drop --no-search (the default prunes the most that keeps "
            "the fidelity floor)"
        )
    return True


def prune(model: ir.Model, config: PruneConfig, context: TechniqueContext) -> TechniqueResult:
    """Prune a copy of ``model`` as ``config`` says; the input is never modified."""
    model = model.clone()
    searching = _wants_search(config, context)
    default = _wants_default(config, context)
    computed = [
        Skip(node_label(n), op_key(n), why)
        for n, why in run_time_weights(model, config.op_types, config.exclude)
    ]
    if config.structured:
        result = _structured_result(model, config, context, searching, default)
    else:
        result = _unstructured_result(model, config, context, searching, default)
    named = {s.node for s in result.skipped}
    extra = tuple(s for s in computed if s.node not in named)
    return dataclasses.replace(result, skipped=result.skipped + extra) if extra else result


# --- unstructured and N:M -----------------------------------------------------------------


def _subnormals(targets: Sequence[unstructured.Target]) -> dict[str, int]:
    """Subnormal float32 values per target weight that holds some, as stored now."""
    counts = {}
    for target in targets:
        weight = target.eligible.weight
        count = count_subnormals(weight.value.const_value or weight.tensor)
        if count:
            counts[target.name] = count
    return counts


def _unstructured_result(
    model: ir.Model, config: PruneConfig, context: TechniqueContext, searching: bool, default: bool
) -> TechniqueResult:
    mode = f"{config.n_m[0]}:{config.n_m[1]}" if config.n_m else "unstructured"
    search_details: dict[str, Any] | None = None
    default_details: dict[str, Any] | None = None
    notes: list[str] = []
    asked = f"asked {100 * config.target_sparsity:.1f}%"
    targets, skipped = unstructured.find_targets(model, config)
    subnormal_before = _subnormals(targets)
    ranker = make_ranker(
        model,
        targets,
        config,
        context,
        uniform=not searching and not default and (config.n_m is not None or config.scope == "layer"),
    )
    if searching:
        outcome, found = _unstructured_search(model, config, context, targets, skipped, ranker)
        search_details = _search_details(found)
        notes.append(search.describe(found, "eligible weights"))
    elif default:
        outcome, floor = _unstructured_default(model, config, context, targets, skipped, ranker)
        default_details = floor_search.details(floor, context.floor, reached=round(floor.achieved, 6))
        notes.append(search.describe_default(floor, context.floor, "sparsity", "of the eligible weights"))
        asked = "no --sparsity: the most that keeps the fidelity floor"
    else:
        outcome = unstructured.run(model, config, targets, skipped, ranker)
    notes += importance_notes(ranker, len(context.feeds.samples), len(targets))
    if ranker.importance == "magnitude" and targets and not context.feeds.real:
        notes.append(MAGNITUDE_NOTE)
    storage = ""
    if config.sparse_storage:
        pruned = {row["weight"] for row in outcome.layers}
        stored = sparse.store_sparse(model, [t for t in targets if t.name in pruned])
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
            f"{len(outcome.changed)} pruned tensor(s) are now zero ({asked}, scope {config.scope})",
        )
    elif not default:
        notes.insert(0, f"{mode}: nothing was pruned; see the skipped list")
    notes.append(unstructured.NO_SPEEDUP_NOTE.format(storage=storage))
    # only the weights that held some are read again (a pruned weight is computed when read)
    left = _subnormals([t for t in targets if t.name in subnormal_before])
    flushed = sum(subnormal_before.values()) - sum(left.values())
    if flushed > 0:
        notes.append(
            f"{flushed:,} of the zeroed weights were subnormal floats (nonzero, below {FLOAT32_TINY:.3g} in "
            "magnitude), which CPUs multiply many times slower than normal ones: removing them, not "
            "the sparsity, is what can make this result faster than the original"
        )
    eligible = sum(t.size for t in targets)
    details: dict[str, Any] = {
        "mode": mode,
        "importance": ranker.importance,
        "scope": config.scope,
        "requested_sparsity": None if default else config.target_sparsity,
        "achieved_sparsity": round(outcome.sparsity, 6),
        "eligible_elements": eligible,
        "pruned_elements": outcome.elements,
        "zeros": outcome.zeros,
        "layers": outcome.layers,
    }
    if search_details is not None:
        details["search"] = search_details
    if default_details is not None:
        details["default_search"] = default_details
    return TechniqueResult(model, tuple(outcome.changed), tuple(outcome.skipped), tuple(notes), details)


def _builder(
    model: ir.Model, config: PruneConfig, targets: list[unstructured.Target], ranker: Ranker
) -> Callable[[dict[int, float]], ir.Model]:
    """Builds a copy of ``model`` with target ``i`` pruned at ``assignment[i]``."""
    all_weights = weights(model)
    position = {id(w.value): i for i, w in enumerate(all_weights)}
    slots = [position[id(t.eligible.weight.value)] for t in targets]
    n_m = config.n_m

    def pruned(i: int, level: float) -> Any:
        weight = targets[i].eligible.weight
        array = weight.numpy()
        if n_m is not None:
            view = targets[i].view
            assert view is not None
            out = ranker.nm(i, array, view, *n_m)
        else:
            out = ranker.prune(i, array, level)
        del array
        release(weight.tensor)  # the original's pages: read again for the next candidate
        return out

    def build(assignment: dict[int, float]) -> ir.Model:
        candidate = model.clone()
        found = weights(candidate)
        for i, level in assignment.items():
            if level > 0:  # computed when the candidate is written out, one tensor at a time
                set_weight(found[slots[i]], functools.partial(pruned, i, level))
        return candidate

    return build


# Kept on purpose (a duplicates pair with _unstructured_search/_unstructured_default): the
# same parameters, the explicit --sparsity search and the default floor search.
def _unstructured_search(
    model: ir.Model,
    config: PruneConfig,
    context: TechniqueContext,
    targets: list[unstructured.Target],
    skipped: list[Skip],
    ranker: Ranker,
) -> tuple[unstructured.Outcome, search.SearchResult]:
    build = _builder(model, config, targets, ranker)
    n_m = config.n_m
    target = config.target_sparsity
    if n_m is not None:
        levels: tuple[float, ...] = (target,)
    else:
        levels = search.levels_for(target, UNSTRUCTURED_LEVELS, UNSTRUCTURED_CAP)
    units = [
        search.Unit(
            key=i,
            label=t.eligible.label,
            op_type=t.eligible.op_type,
            size=t.size,
            levels=levels,
            removed=functools.partial(_elements_removed, t.size),
        )
        for i, t in enumerate(targets)
    ]
    found = search.search(units, build, context, target)
    chosen = [found.assignment.get(i, 0.0) for i in range(len(targets))]
    if n_m is not None:
        keys = [i for i, c in enumerate(chosen) if c > 0]
        outcome = unstructured.apply_nm([targets[i] for i in keys], *n_m, ranker, keys)
    else:
        outcome = unstructured.apply_layer_sparsities(targets, chosen, ranker)
    outcome.skipped = skipped + [
        Skip(t.eligible.label, t.eligible.op_type, "the sensitivity search left it whole to keep the gates")
        for t, c in zip(targets, chosen, strict=True)
        if c <= 0
    ]
    return outcome, found


def _elements_removed(size: int, level: float) -> int:
    return round(level * size)


def _error_curve(
    ranker: Ranker, i: int, target: unstructured.Target, levels: tuple[float, ...]
) -> tuple[float, ...]:
    weight = target.eligible.weight
    curve = ranker.error_curve(i, weight.numpy(), levels)
    release(weight.tensor)
    return curve


# Kept on purpose (a duplicates pair with _unstructured_search/_unstructured_default): the
# same parameters, the explicit --sparsity search and the default floor search.
def _unstructured_default(
    model: ir.Model,
    config: PruneConfig,
    context: TechniqueContext,
    targets: list[unstructured.Target],
    skipped: list[Skip],
    ranker: Ranker,
) -> tuple[unstructured.Outcome, floor_search.FloorResult]:
    """The largest sparsity that keeps the floor (per layer, or one threshold with global scope)."""
    levels = search.levels_for(0.0, UNSTRUCTURED_LEVELS, UNSTRUCTURED_CAP)
    if config.scope == "global":
        grid = search.levels_for(0.0, GLOBAL_LEVELS, UNSTRUCTURED_CAP)
        total = sum(t.size for t in targets)
        ladders = [floor_search.Ladder(0, (0, *(round(s * total) for s in grid)), (0.0, *grid))]

        def evaluate_global(assignment: dict[int, int]) -> Any:
            candidate = model.clone()
            found, _ = unstructured.find_targets(candidate, config)
            unstructured.apply_global(found, grid[assignment[0] - 1])
            return context.evaluate(candidate)

        floor = floor_search.largest_keeping_floor(
            ladders if targets else [],
            [{0: j} for j in range(1, len(grid) + 1)] if targets else [],
            evaluate_global,
            context,
            total=total,
            budget=floor_search.budget_for(model),
            steps=False,
        )
        if floor.assignment:
            outcome = unstructured.apply_global(targets, grid[floor.assignment[0] - 1])
        else:
            outcome = unstructured.Outcome()
            outcome.skipped = [Skip(t.eligible.label, t.eligible.op_type, NOTHING_KEPT) for t in targets]
        outcome.skipped = skipped + outcome.skipped
        return outcome, floor
    build = _builder(model, config, targets, ranker)
    ladders = [
        floor_search.Ladder(
            i,
            (0, *(_elements_removed(t.size, s) for s in levels)),
            (0.0, *_error_curve(ranker, i, t, levels)),
        )
        for i, t in enumerate(targets)
    ]

    def as_levels(assignment: dict[int, int]) -> dict[int, float]:
        return {i: levels[j - 1] for i, j in assignment.items() if j > 0}

    floor = floor_search.largest_keeping_floor(
        ladders,
        [dict.fromkeys(range(len(targets)), j) for j in range(1, len(levels) + 1)] if targets else [],
        lambda a: context.evaluate(build(as_levels(a))),
        context,
        total=sum(t.size for t in targets),
        budget=floor_search.budget_for(model),
    )
    chosen = as_levels(floor.assignment)
    sparsities = [chosen.get(i, 0.0) for i in range(len(targets))]
    outcome = unstructured.apply_layer_sparsities(targets, sparsities, ranker)
    why = "the default search left it whole to keep the fidelity floor" if floor.assignment else NOTHING_KEPT
    outcome.skipped = skipped + [
        Skip(t.eligible.label, t.eligible.op_type, why)
        for t, c in zip(targets, sparsities, strict=True)
        if c <= 0
    ]
    return outcome, floor


def _search_details(found: search.SearchResult) -> dict[str, Any]:
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
    model: ir.Model, config: PruneConfig, context: TechniqueContext, searching: bool, default: bool
) -> TechniqueResult:
    notes: list[str] = []
    search_details: dict[str, Any] | None = None
    default_details: dict[str, Any] | None = None
    asked = f"asked {100 * config.target_sparsity:.1f}%"
    if default:
        the_plan, applied, floor = _structured_default(model, config, context)
        default_details = floor_search.details(floor, context.floor, reached=round(floor.achieved, 6))
        notes.append(search.describe_default(floor, context.floor, "sparsity", "of the prunable channels"))
        asked = "no --sparsity: the most that keeps the fidelity floor"
    elif searching:
        the_plan = structured.plan(model, config, context)
        units = [
            search.Unit(
                key=g.root,
                label=", ".join(g.producers),
                op_type=g.producer_ops[0],
                size=g.channels,
                levels=search.levels_for(config.target_sparsity, STRUCTURED_LEVELS, STRUCTURED_CAP),
                removed=functools.partial(
                    structured.removed_channels, g.channels, multiple=the_plan.multiple
                ),
            )
            for g in the_plan.prunable
        ]

        def build(assignment: dict[int, float]) -> ir.Model:
            candidate = model.clone()
            structured.apply_plan(
                candidate, structured.replan(candidate, the_plan, config, context), assignment
            )
            return candidate

        found = search.search(units, build, context, config.target_sparsity)
        applied = structured.apply_plan(model, the_plan, found.assignment)
        search_details = _search_details(found)
        notes.append(search.describe(found, "channels"))
    else:
        the_plan, applied = structured.run(model, config, context)
    prunable = the_plan.prunable
    total = sum(g.channels for g in prunable)
    notes.insert(
        0,
        f"structured: removed {applied.channels_removed} of {total} channel(s) in {len(prunable)} prunable "
        f"group(s) ({asked}, importance {the_plan.importance}); "
        f"pruned tensors {applied.params_before:,} → {applied.params_after:,} parameters",
    )
    blocked = len(the_plan.groups) - len(prunable)
    if blocked:
        notes.append(f"{blocked} channel group(s) left whole; the skipped list says why")
    details: dict[str, Any] = {
        "mode": "structured",
        "requested_sparsity": None if default else config.target_sparsity,
        "importance": the_plan.importance,
        "channels_removed": applied.channels_removed,
        "channels_prunable": total,
        "groups": applied.groups,
    }
    if search_details is not None:
        details["search"] = search_details
    if default_details is not None:
        details["default_search"] = default_details
    return TechniqueResult(model, tuple(applied.changed), tuple(the_plan.skipped), tuple(notes), details)


def _structured_default(
    model: ir.Model, config: PruneConfig, context: TechniqueContext
) -> tuple[structured.Plan, structured.Applied, floor_search.FloorResult]:
    """The largest share of channels whose removal keeps the floor."""
    the_plan = structured.plan(model, config, context)
    levels = search.levels_for(0.0, STRUCTURED_LEVELS, STRUCTURED_CAP)
    groups = the_plan.prunable
    ladders = []
    for g in groups:
        removed = [structured.removed_channels(g.channels, s, the_plan.multiple) for s in levels]
        assert g.scores is not None
        ladders.append(
            floor_search.Ladder(g.root, (0, *removed), (0.0, *search.score_share(g.scores, removed)))
        )

    def as_ratios(assignment: dict[int, int]) -> dict[int, float]:
        return {root: levels[j - 1] for root, j in assignment.items() if j > 0}

    def evaluate(assignment: dict[int, int]) -> Any:
        candidate = model.clone()
        structured.apply_plan(
            candidate, structured.replan(candidate, the_plan, config, context), as_ratios(assignment)
        )
        return context.evaluate(candidate)

    floor = floor_search.largest_keeping_floor(
        ladders,
        [{g.root: j for g in groups} for j in range(1, len(levels) + 1)] if groups else [],
        evaluate,
        context,
        total=sum(g.channels for g in groups),
        budget=floor_search.budget_for(model),
    )
    applied = structured.apply_plan(model, the_plan, as_ratios(floor.assignment))
    return the_plan, applied, floor
