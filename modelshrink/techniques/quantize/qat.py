"""``--qat``: quantization-aware training, then the same packed weights as post-training.

1. *Fake quantization.* Every weight the packed width would quantize (planned exactly as
   post-training quantization plans it) is read through the grid of ``lowbit.py``::

       y = s * (round(clip(w / s - offset, lo, hi)) + offset)        (Div, Sub, Clip, Round, Add, Mul)

   ``w`` stays the trainable float weight ("shadow weight"); ``s`` is a trainable float32
   vector with one scale per output channel (or per block), reshaped, expanded and transposed
   to ``w``'s layout. It starts at the post-training scale, so training starts from exactly the
   post-training quantized model. Where post-training stores a weight's scales in float16, the
   graph reads ``s`` through ``Cast`` to float16 and back (the gradient passes both unchanged),
   so the packed file stores the same float16 scales: the same size as post-training's, and
   weights exactly those the training graph computed.
2. *Training.* The distill engine (:mod:`modelshrink.techniques.distill`) trains the fake-
   quantized model to copy the teacher (the float input model unless ``--teacher`` is given) on
   ``--data``: KL divergence on class scores, MSE otherwise, AdamW with a cosine schedule, the
   best validation epoch kept (epoch 0, the post-training result, included). Rounding has no
   useful derivative (0 almost everywhere), so ``Round`` passes its gradient straight through
   (the straight-through estimator, ``dX = dY``, see ``distill/rules.py``); ``Clip`` zeroes it
   outside the grid. The scales are *learned* (LSQ-style, Esser et al. 2020): through ``w / s``
   and ``s * (q + offset)`` the same rules give ``dy/ds = (q + offset) - w / s`` inside the grid
   and ``lo + offset`` / ``hi + offset`` outside it. No weight decay.
3. *Export.* The trained ``w`` and ``s`` give the codes ``round(clip(w / s - offset)) - lo`` with
   the same float32 operations as the training graph, and those codes and scales are packed as
   post-training quantization packs its own: the deployed weights are bit for bit the ones the
   training graph computed. Biases, normalization parameters and any other float32 weight of
   the main graph are trained too and kept in float.

Applies to float32 weights of the main graph; weights inside ``If``/``Loop``/``Scan`` bodies or
in other float types are quantized post-training (the report says which).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from modelshrink.errors import ConfigError
from modelshrink.graph import NameAuthority
from modelshrink.techniques.base import Skip, TechniqueContext, TechniqueResult
from modelshrink.techniques.distill import DistillConfig, Teacher
from modelshrink.techniques.distill import distill as run_distill
from modelshrink.techniques.quantize.config import QatData, QuantizeConfig
from modelshrink.techniques.quantize.lowbit import (
    Codes,
    Grid,
    Layout,
    cast_scales,
    fit_scales,
    int_attr_node,
    layout_of,
    packed_notes,
    packed_scale_dtype,
    quantize_packed,
    summarize,
)
from modelshrink.techniques.quantize.opset import prepare
from modelshrink.techniques.quantize.plan import Plan, make_plan
from modelshrink.techniques.quantize.weightonly import Emitted

__all__ = ["FakeQuant", "FakeQuantModel", "export", "fake_quantize", "quantize_aware"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FakeQuant:
    """One fake-quantized weight: its name, its scale parameter, and what was added for it."""

    weight: str
    scale: str
    layout: Layout
    output: str  # the fake-quantized value the readers now read
    nodes: tuple[str, ...]  # names of the added nodes
    constants: tuple[str, ...]  # names of the added initializers (the scale included)
    scale_dtype: str = "float32"  # how the packed file stores the scales (the graph rounds to it)


@dataclass(frozen=True)
class FakeQuantModel:
    """A model whose planned weights are read through fake quantization."""

    model: ir.Model
    plan: Plan
    fakes: tuple[FakeQuant, ...]
    post_training: tuple[Skip, ...]  # planned weights left to post-training quantization, and why


class _Builder:
    def __init__(self, graph: ir.Graph, names: NameAuthority, base: str) -> None:
        self.graph, self.names, self.base = graph, names, base
        self.nodes: list[ir.Node] = []
        self.constants: list[str] = []

    def const(self, suffix: str, array: np.ndarray) -> ir.Value:
        name = self.names.fresh(f"{self.base}_{suffix}")
        value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
        self.graph.register_initializer(value)
        self.constants.append(name)
        return value

    def ints(self, suffix: str, values: Sequence[int]) -> ir.Value:
        return self.const(suffix, np.asarray(list(values), np.int64))

    def op(self, op_type: str, inputs: Sequence[ir.Value], suffix: str, **attrs: int | list[int]) -> ir.Value:
        node = int_attr_node(self.names, self.base, op_type, inputs, suffix, **attrs)
        self.nodes.append(node)
        return node.outputs[0]


def _per_value_scale(b: _Builder, scale: ir.Value, layout: Layout) -> ir.Value:
    """The scale vector ``[channels * blocks]`` broadcast (or expanded) to the weight's layout."""
    c, nb, bl, r = layout.channels, layout.blocks, layout.block_len, layout.row
    rank = len(layout.shape)
    if nb == 1:
        shape = [1] * rank
        if layout.axis is not None:
            shape[layout.axis] = c
        return b.op("Reshape", [scale, b.ints("scale_shape", shape)], "scale_w")
    blocks = b.op("Reshape", [scale, b.ints("scale_blocks", [c, nb, 1])], "scale_b")
    expanded = b.op("Expand", [blocks, b.ints("scale_expand", [c, nb, bl])], "scale_e")
    rows = b.op("Reshape", [expanded, b.ints("scale_rows", [c, nb * bl])], "scale_r")
    if nb * bl != r:
        rows = b.op(
            "Slice",
            [rows, b.ints("scale_start", [0]), b.ints("scale_stop", [r]), b.ints("scale_axis", [1])],
            "scale_v",
        )
    moved = b.op("Reshape", [rows, b.ints("scale_moved", list(layout.moved_shape))], "scale_m")
    if layout.perm == tuple(range(rank)):
        return moved
    return b.op("Transpose", [moved], "scale_w", perm=[int(i) for i in np.argsort(layout.perm)])


def fake_quantize(model: ir.Model, config: QuantizeConfig) -> FakeQuantModel:
    """A clone of ``model`` whose planned float32 main-graph weights are read through fake quantization.

    The scales start at the post-training scales, so the returned model computes exactly what
    post-training quantization would give.
    """
    assert config.width is not None
    model = model.clone()
    plan = make_plan(model, config)
    grid = Grid(config.width)
    names = NameAuthority(model)
    fakes: list[FakeQuant] = []
    post: list[Skip] = []
    for unit in plan.units:
        w = unit.weight
        if unit.merged_rows:
            post.append(
                Skip(
                    unit.layer,
                    unit.op_type,
                    f"'{w.name}': the training engine has no gradient rule for {unit.op_type}: not trained, "
                    "quantized post-training",
                )
            )
            continue
        if w.graph is not model.graph or w.kind != "initializer" or w.dtype != ir.DataType.FLOAT:
            where = (
                "inside an If/Loop/Scan body"
                if w.graph is not model.graph
                else ("a Constant node" if w.kind != "initializer" else f"{w.dtype.name.lower()}")
            )
            post.append(
                Skip(unit.layer, unit.op_type, f"'{w.name}': {where}: not trained, quantized post-training")
            )
            continue
        readers = list(w.value.uses())
        layout = layout_of(unit, config.block_size)
        rows = layout.rows(w.numpy())
        stored = packed_scale_dtype(rows, layout, grid, w.name or "")
        scales = fit_scales(rows, layout, grid, stored).astype(np.float32)
        del rows
        b = _Builder(model.graph, names, f"{w.name}_qat")
        scale = b.const("scale", scales.reshape(-1))
        used = scale
        if stored == np.float16:
            # the forward pass reads the scale as the file will store it; the gradient passes
            # both Casts unchanged (dX = Cast(dY)), so the float32 scale trains as before
            half = b.op("Cast", [scale], "scale_f16", to=int(ir.DataType.FLOAT16))
            used = b.op("Cast", [half], "scale_f32", to=int(ir.DataType.FLOAT))
        s_w = _per_value_scale(b, used, layout)
        x = b.op("Div", [w.value, s_w], "div")
        if grid.offset:
            x = b.op("Sub", [x, b.const("offset", np.asarray(grid.offset, np.float32))], "sub")
        x = b.op(
            "Clip",
            [
                x,
                b.const("lo", np.asarray(grid.lo, np.float32)),
                b.const("hi", np.asarray(grid.hi, np.float32)),
            ],
            "clip",
        )
        x = b.op("Round", [x], "round")
        if grid.offset:
            x = b.op("Add", [x, b.const("offset_back", np.asarray(grid.offset, np.float32))], "add")
        y = b.op("Mul", [x, s_w], "fq")
        y.type = ir.TensorType(w.dtype)
        y.shape = ir.Shape(list(w.shape))
        for node, index in readers:
            node.replace_input_with(index, y)
        first = next(iter(model.graph), None)
        if first is None:
            model.graph.extend(b.nodes)
        else:
            model.graph.insert_before(first, b.nodes)
        fakes.append(
            FakeQuant(
                w.name,
                scale.name or "",
                layout,
                y.name or "",
                tuple(n.name or "" for n in b.nodes),
                tuple(b.constants),
                str(stored),
            )
        )
    return FakeQuantModel(model, plan, tuple(fakes), tuple(post))


def _initializer_values(model: ir.Model, names: Sequence[str]) -> dict[str, np.ndarray]:
    inits = model.graph.initializers
    return {name: np.asarray(inits[name].const_value.numpy(), np.float32) for name in names}  # type: ignore[union-attr]


def export(trained: ir.Model, fakes: Sequence[FakeQuant], config: QuantizeConfig) -> tuple[ir.Model, Emitted]:
    """The packed model from a (trained) fake-quantized model: codes from its weights and scales.

    Returns:
        The packed model (``trained`` is not modified) and what :func:`quantize_packed` emitted.
    """
    assert config.width is not None
    grid = Grid(config.width)
    model = trained.clone()
    values = _initializer_values(model, [n for f in fakes for n in (f.weight, f.scale)])
    fixed: dict[str, Codes] = {}
    for f in fakes:
        layout = f.layout
        learned = values[f.scale].reshape(layout.channels, layout.blocks)
        scales = cast_scales(learned, np.dtype(f.scale_dtype))  # what the training graph read
        rows = layout.rows(values[f.weight])
        fixed[f.weight] = Codes.of(rows, layout, grid, scales)
    _strip(model, fakes)
    plan = make_plan(model, config)
    names = NameAuthority(model)
    emitted = quantize_packed(
        model, plan.units, names, bits=config.width, block=config.block_size, fixed=fixed
    )
    return model, emitted


def _strip(model: ir.Model, fakes: Sequence[FakeQuant]) -> None:
    """Readers read the float weights again; the fake-quantization nodes and constants go."""
    graph = model.graph
    produced = {out.name: out for node in graph for out in node.outputs}
    doomed = {n for f in fakes for n in f.nodes}
    for f in fakes:
        out = produced[f.output]
        out.replace_all_uses_with(graph.initializers[f.weight])
    for node in [n for n in graph if n.name in doomed][::-1]:
        graph.remove(node, safe=True)
    for f in fakes:
        for name in f.constants:
            graph.initializers.pop(name, None)


def _qat_data(config: QuantizeConfig) -> QatData:
    if config.qat_data is None:
        raise ConfigError(
            "--qat needs its training rows loaded: run it through modelshrink.api (or the CLI), which "
            "loads --data and --teacher into QuantizeConfig.qat_data"
        )
    return config.qat_data


def _teacher(model: ir.Model, config: QuantizeConfig) -> Teacher:
    loaded = _qat_data(config).teacher
    return loaded if loaded is not None else Teacher(model, "the input model")


def quantize_aware(model: ir.Model, config: QuantizeConfig, context: TechniqueContext) -> TechniqueResult:
    """Train ``model`` for the packed grid of ``config`` on ``config.qat_data``, then pack it."""
    qat = _qat_data(config)
    assert config.width is not None
    base, notes = prepare(model, config)
    fq = fake_quantize(base, config)
    if not fq.fakes:
        packed, emitted = export(fq.model, (), config)
        notes.append("--qat: no weight to train (see the skipped list); quantized post-training")
        return TechniqueResult(packed, emitted.changes, (*fq.plan.skipped, *fq.post_training), tuple(notes))
    teacher = _teacher(model, config)
    distill_config = DistillConfig(
        teacher=teacher.label,
        teacher_model=teacher,
        training=qat.data,
        epochs=config.epochs,
        lr=config.lr_for(config.width),
        batch_size=config.batch_size,
        weight_decay=0.0,
    )
    trained = run_distill(fq.model, distill_config, context)
    packed, emitted = export(trained.model, fq.fakes, config)
    if context.gates.fidelity_gates and config.fallback:
        notes.append(
            "--qat: the per-layer fallback search does not run on a trained model; the gates still "
            "apply to the result (without --qat, --fallback keeps the most damaging layers in float)"
        )
    details: dict[str, Any] = dict(trained.details)
    return TechniqueResult(
        packed,
        emitted.changes,
        (*fq.plan.skipped, *fq.post_training),
        tuple(notes + _qat_notes(config, teacher, trained, emitted.changes, len(fq.fakes))),
        {
            "packing": summarize(config.width, emitted.changes).as_dict(),
            "qat": {**_qat_details(details), "lr": config.lr_for(config.width)},
        },
    )


def _qat_details(details: Mapping[str, Any]) -> dict[str, Any]:
    keep = (
        "teacher",
        "data",
        "losses",
        "teacher_fidelity",
        "history",
        "best_epoch",
        "steps",
        "trained_weights",
        "trained_params",
    )
    return {k: details[k] for k in keep if k in details} | {
        "scales": "learned (LSQ-style), one float32 per output channel or block",
        "rounding_gradient": "straight-through (Round: dX = dY; Clip: zero outside the grid)",
    }


def _qat_notes(
    config: QuantizeConfig, teacher: Teacher, trained: TechniqueResult, changes: Sequence[Any], fakes: int
) -> list[str]:
    assert config.width is not None
    d = trained.details
    before = d["teacher_fidelity"]["before"]
    after = d["teacher_fidelity"]["after"]
    where = f"{before['rows']} {before['rows_from']}"
    notes = []
    if before["top1_agreement"] is not None:
        notes.append(
            f"quantization-aware training: top-1 agreement with {teacher.label} on {where}: "
            f"{before['top1_agreement']:.1%} after post-training quantization (epoch 0), "
            f"{after['top1_agreement']:.1%} after training (best epoch {d['best_epoch']} of {len(d['history'])})"
        )
    notes.append(
        f"quantization-aware training: distillation loss against {teacher.label} on {where}: "
        f"{before['loss']:.4g} after post-training quantization, {after['loss']:.4g} after training"
    )
    if d["best_epoch"] == 0:
        notes.append(
            "no epoch beat post-training quantization on the validation rows: the result is the "
            "post-training one (try more --epochs, another --lr, or more --data)"
        )
    notes.append(
        f"{fakes} weight(s) trained through {config.width}-bit fake quantization with learned scales "
        "(straight-through gradient for the rounding); biases and other float32 weights were trained "
        "too; the packed weights are exactly those the training graph computed"
    )
    if config.teacher is not None:
        notes.append(
            f"trained to copy {teacher.label}; the fidelity table compares the result with the input model"
        )
    notes.append(
        "the training rows are --data, which the fidelity table also uses by default: measure on "
        "held-out data with 'modelshrink compare' for an unbiased figure"
    )
    notes.extend(packed_notes(summarize(config.width, changes), qat=True))
    return notes
