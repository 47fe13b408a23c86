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
  tensor as an ONNX sparse tensor where that is smaller.
* **N:M** (``pattern="2:4"``): in every group of M consecutive weights along the reduction
  dimension K of the consumer (MatMul ``W[K, N]`` along K; Gemm ``B`` along K as ``transB``
  says; Conv ``W[Cout, Cin/g, kh, kw]`` along the flattened ``Cin/g x kh x kw``), keep the N
  largest ``|w|``. K must be a multiple of M, else the weight is skipped (no padding).
* **Structured** (``structured=True``): see :mod:`._structured`.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from modelshrink.techniques.base import TechniqueContext, TechniqueResult
from modelshrink.techniques.prune import _sparse, _structured, _unstructured
from modelshrink.techniques.prune._config import DEFAULT_OP_TYPES, PruneConfig

__all__ = ["DEFAULT_OP_TYPES", "PruneConfig", "prune"]

logger = logging.getLogger(__name__)


def prune(model: ir.Model, config: PruneConfig, context: TechniqueContext) -> TechniqueResult:
    """Prune a copy of ``model`` as ``config`` says; the input is never modified."""
    model = model.clone()
    if config.structured:
        return _structured_result(model, config, context)
    outcome, targets = _unstructured.run(model, config)
    mode = f"{config.n_m[0]}:{config.n_m[1]}" if config.n_m else "unstructured"
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
    notes = [_unstructured.NO_SPEEDUP_NOTE.format(storage=storage)]
    if outcome.elements:
        notes.insert(
            0,
            f"{mode}: {100 * outcome.sparsity:.2f}% of {outcome.elements:,} weights in "
            f"{len(outcome.changed)} tensor(s) are now zero (asked {100 * config.target_sparsity:.1f}%, "
            f"scope {config.scope})",
        )
    else:
        notes.insert(0, f"{mode}: no weight was eligible; see the skipped list")
    details = {
        "mode": mode,
        "scope": config.scope,
        "requested_sparsity": config.target_sparsity,
        "achieved_sparsity": round(outcome.sparsity, 6),
        "pruned_elements": outcome.elements,
        "zeros": outcome.zeros,
        "layers": outcome.layers,
    }
    return TechniqueResult(model, tuple(outcome.changed), tuple(outcome.skipped), tuple(notes), details)


def _structured_result(model: ir.Model, config: PruneConfig, context: TechniqueContext) -> TechniqueResult:
    the_plan, applied = _structured.run(model, config, context)
    prunable = the_plan.prunable
    notes = [
        f"structured: removed {applied.channels_removed} channel(s) in {len(prunable)} group(s) "
        f"(asked {100 * config.target_sparsity:.1f}% of each, importance {the_plan.importance}); "
        f"pruned tensors {applied.params_before:,} → {applied.params_after:,} parameters"
    ]
    blocked = len(the_plan.groups) - len(prunable)
    if blocked:
        notes.append(f"{blocked} channel group(s) left whole; the skipped list says why")
    details = {
        "mode": "structured",
        "requested_sparsity": config.target_sparsity,
        "importance": the_plan.importance,
        "channels_removed": applied.channels_removed,
        "groups": applied.groups,
    }
    return TechniqueResult(model, tuple(applied.changed), tuple(the_plan.skipped), tuple(notes), details)
