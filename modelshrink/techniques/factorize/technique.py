"""Low-rank factorization: replace a weight matrix by two thinner ones.

Math. A layer's weight, viewed as a matrix ``S`` (``m x n``), is replaced by ``P`` (``m x r``)
and ``Q`` (``r x n``) from its truncated SVD ``S = U Σ Vᵀ``: ``P = U_r Σ_r^½``,
``Q = Σ_r^½ V_rᵀ`` (Eckart-Young: the best rank-r approximation in Frobenius norm; the
singular values are split as square roots so both factors have the same scale). With
``--data`` the factors instead minimise the error of the layer's *output* on the real
activations ``X``: the SVD of the whitened matrix ``(XᵀX + λI)^½ S`` mapped back (see
``_decompose``). Parameters and multiply-adds go from ``m n`` to ``r (m + n)``.

Where it applies (``_layers`` has the table):
- ``MatMul(X, W)`` and ``Gemm`` with a constant ``B`` (any transA/transB, alpha/beta, bias C)
  become two MatMul / two Gemm (bias, alpha and beta on the second).
- ``Conv`` (group 1): channel split, a ``k x k`` Conv to ``r`` channels (same stride, pads,
  dilation, auto_pad) then a ``1 x 1`` Conv to the outputs with the bias; or with
  ``conv="spatial"`` a ``kh x 1`` Conv to ``r`` channels then a ``1 x kw`` Conv (SVD of the
  kernel viewed as ``[I·kh, O·kw]``, the scheme of Tai et al. 2016).
- ``Gather`` embedding tables (axis 0), only when asked for in ``op_types``:
  ``Gather(P, ids)`` then ``MatMul(·, Q)`` (fewer parameters, but never faster).

A layer is factorized only where ``r (m + n) <= (1 - min_saving) m n``: by default it must
save at least 20% of its parameters (and of its multiply-adds), otherwise it is left alone
with a reason. Ranks are rounded up to ``rank_multiple``. Weights in ``Constant`` nodes and
in ``If``/``Loop``/``Scan`` bodies are handled; a weight shared by several nodes gets one pair
of factors used by all of them (or is skipped with a reason when a user cannot take factors).

Rank rules (one of): ``rank_ratio`` (``r = ratio · min(m, n)``), ``energy`` (smallest ``r``
keeping that share of ``Σ s_i²``), ``target_ratio`` (model parameters ≤ ratio × original,
distributed greedily by least energy lost per parameter saved), or, when fidelity gates are
given and no rule is, a sensitivity search for the smallest ranks that pass the gates
(``_search``). With neither a rule nor a gate, the smallest ranks that keep the fidelity floor
(``context.floor``), found in a few runs (``search.floor_ranks``): the same share of energy
in every layer by bisection, then further rank steps where they lose the least energy per
parameter saved. If no factorization keeps the floor, the model is returned unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from modelshrink.errors import ConfigError
from modelshrink.graph import NameAuthority, op_key, release, weights
from modelshrink.techniques import floor_search
from modelshrink.techniques.base import Change, Skip, TechniqueContext, TechniqueResult
from modelshrink.techniques.factorize.activations import collect_grams
from modelshrink.techniques.factorize.config import FactorizeConfig
from modelshrink.techniques.factorize.decompose import Decomposition, decompose
from modelshrink.techniques.factorize.layers import Discovery, Group, discover, node_label, rewrite_group
from modelshrink.techniques.factorize.ranks import (
    Spectrum,
    allowed_ranks,
    budget_ranks,
    max_saving_rank,
    rank_for_energy,
    rank_for_ratio,
)
from modelshrink.techniques.factorize.search import FLOOR_ENERGIES, SearchResult, floor_ranks, search_ranks

__all__ = ["factorize"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Rule:
    kind: Literal["rank-ratio", "energy", "target-ratio", "search", "floor"]
    value: float | None

    def describe(self) -> str:
        if self.kind == "search":
            return "sensitivity search against the fidelity gates"
        if self.kind == "floor":
            return "no rank rule and no gate: the smallest ranks that keep the fidelity floor"
        return f"--{self.kind} {self.value:g}"


def _rule(config: FactorizeConfig, context: TechniqueContext) -> _Rule:
    if config.rank_ratio is not None:
        return _Rule("rank-ratio", config.rank_ratio)
    if config.energy is not None:
        return _Rule("energy", config.energy)
    if config.target_ratio is not None:
        return _Rule("target-ratio", config.target_ratio)
    if context.gates.fidelity_gates:
        return _Rule("search", None)
    return _Rule("floor", None)


def _discover(model: ir.Model, config: FactorizeConfig) -> Discovery:
    return discover(
        model,
        op_types=config.op_types,
        exclude=config.exclude,
        min_elements=config.min_elements,
        conv_mode=config.conv,
    )


def _build(
    source: ir.Model,
    config: FactorizeConfig,
    ranks: Mapping[int, int],
    decomps: Sequence[Decomposition],
    *,
    trial: bool = False,
) -> tuple[ir.Model, dict[int, list[str]]]:
    """A clone of ``source`` with group ``i`` factorized at ``ranks[i]``; factor names per group.

    ``trial``: a search's candidate, whose factors are computed when it is written out and
    never held (a candidate of a big model at high ranks held most of the model's size again).
    """
    model = source.clone()
    groups = _discover(model, config).groups
    names = NameAuthority(model)
    factor_names: dict[int, list[str]] = {}
    for i, group in enumerate(groups):
        if i in ranks:
            if trial:
                make = functools.partial(decomps[i].factors, ranks[i])
                factor_names[i] = rewrite_group(group, (make, ranks[i]), names)
            else:
                factor_names[i] = rewrite_group(group, decomps[i].factors(ranks[i]), names)
    return model, factor_names


def _too_small_reason(group: Group, rank: int, config: FactorizeConfig, rule: _Rule) -> str:
    m, n = group.rows, group.cols
    after = rank * (m + n)
    saving = 1 - after / (m * n)
    hint = {
        "rank-ratio": "lower --rank-ratio",
        "energy": "lower --energy",
    }.get(rule.kind, "")
    extra = f"; {hint} or --rank-multiple" if hint else ""
    return (
        f"rank {rank} of {min(m, n)} would keep {after} of {m * n} params (saves {saving:.0%}, "
        f"needs ≥ {config.min_saving:.0%}){extra}"
    )


def _usable_rank(rule: _Rule, spectrum: Spectrum, config: FactorizeConfig) -> int:
    """The largest rank a later step may ask of a layer with this spectrum (0: none)."""
    allowed = allowed_ranks(spectrum, config.rank_multiple, config.min_saving)
    if not allowed:
        return 0
    limit = max_saving_rank(spectrum.rows, spectrum.cols, config.min_saving)
    if rule.kind in ("rank-ratio", "energy"):
        assert rule.value is not None
        if rule.kind == "rank-ratio":
            r = rank_for_ratio(rule.value, spectrum.max_rank, config.rank_multiple)
        else:
            r = rank_for_energy(spectrum, rule.value, config.rank_multiple)
        return r if r <= limit else 0
    if rule.kind == "floor":
        # ranks keeping more energy than the most the default search tries are never better
        # than the one keeping that much: the search goes no higher (nor does its memory)
        top = rank_for_energy(spectrum, FLOOR_ENERGIES[0], config.rank_multiple)
        return max([r for r in allowed if r <= top], default=min(allowed))
    return max(allowed)  # a budget or a search picks among the allowed ranks


def _truncated(d: Decomposition, rank: int, *, compact: bool = False) -> Decomposition:
    """``d`` with the singular vectors up to ``rank`` only (copies, so the rest is freed).

    ``compact`` keeps them in float32: the default search holds every layer's vectors up to its
    largest allowed rank while it tries candidates (in float64 that was 1.6x the model's size
    for a model of 512 x 2048 layers); factors are stored in the weight's type anyway.
    """
    # copies (ascontiguousarray would return views of row slices, keeping the full arrays)
    dtype = np.float32 if compact else d.u.dtype
    return dataclasses.replace(d, u=d.u[:, :rank].astype(dtype), vt=d.vt[:rank].astype(dtype))


def _method(config: FactorizeConfig, context: TechniqueContext) -> Literal["svd", "data"]:
    if config.method == "data" and not context.feeds.real:
        raise ConfigError("--method data needs real activations: pass --data")
    if config.method == "svd" or not context.feeds.real:
        return "svd"
    return "data"


def factorize(model: ir.Model, config: FactorizeConfig, context: TechniqueContext) -> TechniqueResult:
    """Replace eligible weights by low-rank factor pairs (see the module docstring)."""
    source = model
    work = model.clone()
    found = _discover(work, config)
    groups = found.groups
    skipped = [Skip(node, op, reason) for node, op, reason in found.skipped]
    notes: list[str] = []
    rule = _rule(config, context)
    method = _method(config, context)

    grams: dict[int, Any] = {}
    fallback: dict[int, str] = {}
    if method == "data" and groups:
        grams, fallback = collect_grams(work, groups, context.feeds, context.runtime, context.progress)
    decomps: list[Decomposition] = []
    non_finite: set[int] = set()  # NaN/inf weights: no SVD (it would not converge), left as is
    for i, group in enumerate(groups):
        matrix = group.matrix()
        release(group.weight.tensor)
        if np.isfinite(matrix).all():
            # keep only the singular vectors a rank can use: all of them for every group at once
            # took 2 x 8 bytes x n^2 per n x n weight (5.6x the model's size in memory)
            d = decompose(matrix, grams.get(i))
            decomps.append(
                _truncated(d, _usable_rank(rule, d.spectrum, config), compact=rule.kind == "floor")
            )
            del d
        else:
            non_finite.add(i)
            empty = Spectrum(np.zeros(0), group.rows, group.cols)
            decomps.append(Decomposition(empty, "svd", np.zeros((group.rows, 0)), np.zeros((0, group.cols))))
        del matrix
        context.progress("decomposing weights", i + 1, len(groups))
    allowed = [
        []
        if i in non_finite
        else [
            r
            for r in allowed_ranks(d.spectrum, config.rank_multiple, config.min_saving)
            if rule.kind != "floor" or r <= d.u.shape[1]
        ]
        for i, d in enumerate(decomps)
    ]

    ranks: list[int | None] = [None] * len(groups)
    reasons: dict[int, str] = {
        i: _too_small_reason(group, min(config.rank_multiple, group.rows, group.cols), config, rule)
        for i, group in enumerate(groups)
        if not allowed[i]
    }
    for i in non_finite:
        reasons[i] = (
            f"weight '{groups[i].weight.name}' has NaN or infinite values, which no factorization holds"
        )
    search: SearchResult | None = None
    default_details: dict[str, Any] | None = None
    if rule.kind != "search" and context.gates.fidelity_gates:
        notes.append(
            f"ranks follow {rule.describe()}; the fidelity gates are checked on the result but do not "
            "steer the ranks (drop the rule to let a sensitivity search pick ranks that meet them)"
        )
    if rule.kind in ("rank-ratio", "energy"):
        assert rule.value is not None
        for i, (group, d) in enumerate(zip(groups, decomps, strict=True)):
            if i in non_finite:
                continue
            if rule.kind == "rank-ratio":
                r = rank_for_ratio(rule.value, d.spectrum.max_rank, config.rank_multiple)
            else:
                r = rank_for_energy(d.spectrum, rule.value, config.rank_multiple)
            if r <= max_saving_rank(group.rows, group.cols, config.min_saving):
                ranks[i] = r
                reasons.pop(i, None)
            else:
                reasons[i] = _too_small_reason(group, r, config, rule)
    elif rule.kind == "target-ratio":
        assert rule.value is not None
        total = sum(w.size for w in weights(work))
        budget = math.floor(rule.value * total)
        chosen = budget_ranks([d.spectrum for d in decomps], allowed, total - budget)
        reachable = total - sum(
            d.spectrum.dense_params - d.spectrum.params(min(a))
            for d, a in zip(decomps, allowed, strict=True)
            if a
        )
        if reachable > budget:
            notes.append(
                f"--target-ratio {rule.value:g} is out of reach: at the smallest allowed ranks the "
                f"model keeps {reachable} of {total} params ({reachable / total:.1%}); that is what "
                "was produced"
            )
        for i, picked in enumerate(chosen):
            ranks[i] = picked
            if picked is None and i not in reasons:
                reasons[i] = (
                    "kept dense: the parameter budget was met by layers losing less energy per "
                    "parameter saved"
                )
    elif rule.kind == "floor":

        def build_floor(assignment: Mapping[int, int]) -> ir.Model:
            return _build(source, config, assignment, decomps, trial=True)[0]

        total = sum(w.size for w in weights(work))
        ranks, floor = floor_ranks(
            build_floor,
            [d.spectrum for d in decomps],
            allowed,
            config.rank_multiple,
            context,
            total=total,
            budget=floor_search.budget_for(source),
        )
        why = (
            "kept dense by the default search: factorizing it too broke the fidelity floor, or "
            "cost more error per parameter saved than the layers that were"
            if floor.assignment
            else "kept dense: no factorization tried keeps the fidelity floor, so the model is unchanged"
        )
        for i in range(len(groups)):
            if ranks[i] is None and i not in reasons:
                reasons[i] = why
        default_details = floor_search.details(
            floor,
            context.floor,
            reached=round(floor.achieved, 6),
            params_kept_ratio=round(1.0 - floor.achieved, 6),
        )
        notes.append(_describe_default(floor, context))
    else:

        def build(assignment: Mapping[int, int]) -> ir.Model:
            return _build(source, config, assignment, decomps)[0]

        search = search_ranks(build, [d.spectrum for d in decomps], allowed, config.rank_multiple, context)
        ranks = list(search.ranks)
        for i in range(len(groups)):
            if ranks[i] is None and i not in reasons:
                table = search.single[i]
                if table:
                    best = max(table)
                    fig = table[best]
                    alone = f"max |err| {fig['max_abs_error']:.3g}, cosine {fig['cosine']:.6f}" + (
                        "" if fig["top1_agreement"] is None else f", top-1 {fig['top1_agreement']:.2%}"
                    )
                    if fig["gate_usage"] > 1:
                        reasons[i] = (
                            f"kept dense by the sensitivity search: even alone at rank {best} of "
                            f"{decomps[i].spectrum.max_rank} it breaks the gates ({alone})"
                        )
                    else:
                        reasons[i] = (
                            "kept dense by the sensitivity search: it did not fit the gates together "
                            f"with the layers that cost less error (alone at rank {best}: {alone})"
                        )

    chosen_ranks = {i: r for i, r in enumerate(ranks) if r is not None}
    result_model, factor_names = _build(source, config, chosen_ranks, decomps)

    changes: list[Change] = []
    layers: list[dict[str, Any]] = []
    for i, (group, d) in enumerate(zip(groups, decomps, strict=True)):
        method_used = d.method
        row = _layer_row(group, d, ranks[i], fallback.get(i), method, search, i)
        layers.append(row)
        if ranks[i] is None:
            for c in group.consumers:
                skipped.append(Skip(node_label(c.node), op_key(c.node), reasons[i]))
            continue
        rank = ranks[i]
        assert rank is not None
        spectrum = d.spectrum
        change_details = {**row, "factors": factor_names.get(i, [])}
        what = f"rank {rank} of {spectrum.max_rank}, {method_used}, energy {spectrum.energy_kept(rank):.1%}"
        if group.mode != "matrix":
            what = f"{group.mode} split, {what}"
        for j, c in enumerate(group.consumers):
            if j == 0:
                changes.append(
                    Change(
                        node_label(c.node),
                        op_key(c.node),
                        what,
                        spectrum.dense_params,
                        spectrum.params(rank),
                        change_details,
                    )
                )
            else:
                changes.append(
                    Change(
                        node_label(c.node),
                        op_key(c.node),
                        f"{what} (factors of '{group.weight.name}' shared with {group.label})",
                        0,
                        0,
                        {**change_details, "shared_with": group.label},
                    )
                )

    if any(c.op_type == "Gather" for c in changes):
        notes.append(
            "factorized embedding lookups (Gather) save parameters but add a MatMul per token: "
            "they make the model smaller, not faster"
        )
    if method == "data":
        notes.append(
            f"data-aware factors: each layer's output error is minimised on {len(context.feeds)} "
            "--data samples (activation-whitened SVD); see changes[].details.method per layer"
        )
    elif groups and config.method == "auto":
        notes.append("plain SVD of the weights: pass --data for factors fitted to real activations")
    details: dict[str, Any] = {
        "rule": rule.describe(),
        "method": "data-aware" if method == "data" else "svd",
        "min_saving": config.min_saving,
        "rank_multiple": config.rank_multiple,
        "layers": layers,
    }
    if default_details is not None:
        details["default_search"] = default_details
    if search is not None:
        details["search"] = {
            "evaluations": search.evaluations,
            "threshold_gate_usage": search.threshold,
            "combined": search.combined,
            "refined": search.refined,
        }
        notes.append(
            f"sensitivity search: {search.evaluations} candidate models scored; "
            f"{len(chosen_ranks)} of {len(groups)} layers factorized within the gates"
        )
    return TechniqueResult(result_model, tuple(changes), tuple(skipped), notes=tuple(notes), details=details)


def _describe_default(found: floor_search.FloorResult, context: TechniqueContext) -> str:
    """The note saying what the default search did, or that nothing kept the floor."""
    bar = floor_search.describe_floor(context.floor)
    runs = f"{found.evaluations} candidate models run"
    flags = "no --rank-ratio, --energy or --target-ratio and no gate"
    if found.assignment:
        spent = "; the run budget ended the search" if found.budget_spent else ""
        return (
            f"{flags}: the smallest ranks that keep the fidelity floor ({bar}) were searched: the "
            f"model keeps {100 * (1 - found.achieved):.1f}% of its parameters ({runs}{spent}); give a "
            "rank rule for an exact amount, or a gate (--min-cosine, --min-agreement, --max-error) "
            "to choose the bar; details.default_search has the runs"
        )
    return (
        f"{flags}: no factorization tried keeps the fidelity floor ({bar}{floor_search.least_tried(found, 'of the parameters removed')}), so "
        f"nothing was factorized and the model is unchanged ({runs}); give a rank rule (e.g. "
        "--energy 0.99) to factorize anyway (the report then shows the damage), or --data so the floor "
        "is measured on real inputs"
    )


def _layer_row(
    group: Group,
    d: Decomposition,
    rank: int | None,
    fallback: str | None,
    method: str,
    search: SearchResult | None,
    index: int,
) -> dict[str, Any]:
    spectrum = d.spectrum
    row: dict[str, Any] = {
        "weight": group.weight.name,
        "nodes": [node_label(c.node) for c in group.consumers],
        "mode": group.mode,
        "shape": list(group.weight.shape),
        "matrix": [group.rows, group.cols],
        "max_rank": spectrum.max_rank,
        "rank": rank,
        "method": d.method,
        "error_of": "layer output on --data" if d.method == "data-aware" else "weight",
        "energy_kept": None if rank is None else spectrum.energy_kept(rank),
        "rel_error": None if rank is None else spectrum.rel_error(rank),
        "params_before": spectrum.dense_params,
        "params_after": spectrum.dense_params if rank is None else spectrum.params(rank),
    }
    if group.mode_note:
        row["mode_note"] = group.mode_note
    if method == "data" and fallback:
        row["method_reason"] = f"plain SVD: {fallback}"
    if search is not None:
        table = search.single[index]
        row["sensitivity"] = {str(r): fig for r, fig in sorted(table.items())}
        if rank is not None and rank in table:
            row["error_alone"] = table[rank]
    return row
