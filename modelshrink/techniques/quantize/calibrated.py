"""``--method``: which weight-only rounding each planned weight gets, fitted to ``--data``.

``rtn`` rounds every weight to the nearest grid point (the data-free default). ``gptq`` and
``awq`` (see ``gptq.py``) fit the rounding to the layer's real inputs: the model runs on the
calibration rows with the layer inputs exposed (``layerwise.py``), and each layer's codes and
scales are chosen for its output error. GPTQ goes stage by stage, so each layer is fitted to
inputs that already carry the error of the layers quantized before it.

The result is a :class:`Fitting`: per weight, the codes and scales in the layout its storage
takes (int8 ``DequantizeLinear`` / ``Cast + Mul``, int4 ``MatMulNBits`` / block-wise
``DequantizeLinear``, packed ``--bits``), so files are exactly as small as round-to-nearest's;
and, for the weights left to round-to-nearest, why. Weights a data-aware method cannot fit
(Gather tables, weights inside subgraphs, ConvTranspose kernels, batched MatMul weights) are
rounded to nearest and the report says so per layer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from modelshrink.errors import ConfigError
from modelshrink.graph import NameAuthority, op_key
from modelshrink.techniques import layerwise
from modelshrink.techniques.base import Change, TechniqueContext
from modelshrink.techniques.quantize import gptq as solvers
from modelshrink.techniques.quantize.centered import row_offsets
from modelshrink.techniques.quantize.config import QuantizeConfig
from modelshrink.techniques.quantize.lowbit import (
    Codes,
    Grid,
    layout_of,
    packed_scale_dtype,
    round_to_nearest,
)
from modelshrink.techniques.quantize.plan import INT4_PACKED_KINDS, Unit
from modelshrink.techniques.quantize.weightonly import (
    Int8Weight,
    _dequant_int4,
    _initializer,
    _snr_db,
    block_int4,
    symmetric_int8,
)

__all__ = [
    "DEFAULT_DAMPING",
    "MAX_STAGES",
    "METHOD_MODES",
    "RTN_NOTE",
    "Fitted",
    "Fitting",
    "fit_weights",
    "insert_input_scales",
    "label_changes",
    "payloads",
    "resolve_method",
]

logger = logging.getLogger(__name__)

DEFAULT_DAMPING = 0.01
# Passes over the calibration rows GPTQ makes at most (the layers' depths are split into this
# many stages; each runs its own piece of the graph twice per feed: techniques/chain.py).
MAX_STAGES = 8
# Modes whose weights --method applies to.
METHOD_MODES = ("int8", "int4", "int2", "binary")


@dataclass(frozen=True)
class Fitted:
    """One weight's data-aware result, ready for its storage.

    Attributes:
        payload: What the storage writes: ``Int8Weight`` (int8), ``(q, scales)`` (int4),
            ``Codes`` (packed widths).
        details: For the report (``method`` and what it did).
        input_scale: AWQ: the layer's input is multiplied by this, per input channel (None:
            not scaled).
        snr_db: Signal-to-noise ratio of the weight as the layer sees it.
    """

    payload: object
    details: Mapping[str, object]
    input_scale: np.ndarray | None = None
    snr_db: float | None = None


@dataclass(frozen=True)
class Fitting:
    """What ``--method`` did to the planned weights.

    Attributes:
        method: ``gptq`` or ``awq``.
        fitted: Data-aware results by weight name.
        rounded: Weights left to round-to-nearest, by name, with the reason.
        rows: Calibration rows (largest over the layers).
        stages: GPTQ stages (0 for AWQ).
        damping: GPTQ damping asked for.
        act_order: GPTQ act-order.
    """

    method: str
    fitted: Mapping[str, Fitted] = field(default_factory=dict)
    rounded: Mapping[str, str] = field(default_factory=dict)
    rows: int = 0
    stages: int = 0
    damping: float = DEFAULT_DAMPING
    act_order: bool = True

    def notes(self, feeds_count: int) -> list[str]:
        """What the user should read about the method."""
        done = len(self.fitted)
        notes = []
        if self.method == "gptq":
            notes.append(
                f"--method gptq: {done} weight(s) rounded by GPTQ, fitted to {self.rows:,} rows of layer "
                "inputs "
                f"from {feeds_count} --data feed(s) in {self.stages} stage(s) (each stage fitted to inputs "
                "that carry the error of the layers quantized before it); damping "
                f"{self.damping:g}, act-order {'on' if self.act_order else 'off'}; same storage and size as "
                "round-to-nearest; details.method per layer in the changes"
            )
            scaled = sum(1 for f in self.fitted.values() if f.input_scale is not None)
            if scaled:
                notes.append(
                    f"{scaled} layer(s) whose input has outlier channels (largest channel RMS at least "
                    f"{solvers.OUTLIER_RATIO:g}x the median) had their input channels scaled first (AWQ's "
                    "search, then GPTQ): they read their input through a Mul by 1/s"
                )
        else:
            awq_muls = sum(1 for f in self.fitted.values() if f.input_scale is not None)
            notes.append(
                f"--method awq: {done} weight(s) rounded after activation-aware per-input-channel scaling "
                f"(alpha searched per layer on {self.rows:,} rows of layer inputs from {feeds_count} --data "
                f"feed(s)); {awq_muls} layer(s) read their input through a Mul by 1/s (alpha 0 needs none)"
            )
        if done:
            notes.append(
                "the fidelity figures are measured on the same --data rows the rounding was fitted to; "
                "score held-out rows with `modelshrink compare ORIGINAL RESULT --data HELD_OUT.npz`"
            )
        if self.rounded:
            reasons: dict[str, int] = {}
            for why in self.rounded.values():
                reasons[why] = reasons.get(why, 0) + 1
            listed = "; ".join(f"{n} x {why}" for why, n in reasons.items())
            notes.append(f"{len(self.rounded)} weight(s) rounded to nearest instead: {listed}")
        return notes


RTN_NOTE = (
    "rounding: to nearest (no --data); --data CALIB.npz fits the rounding to real activations "
    "(GPTQ, --method gptq): on the sample models its mean output error on held-out rows was "
    "0.16x-0.55x of round-to-nearest's at 4 and 3 bits, at the same file size"
)


def resolve_method(config: QuantizeConfig, context: TechniqueContext) -> str:
    """``rtn``, ``gptq`` or ``awq`` for this run (``--method``, else gptq with --data).

    Raises:
        ConfigError: A data-aware method without ``--data``.
    """
    if config.mode not in METHOD_MODES and config.width is None:
        return "rtn"
    if config.method is None:
        return "gptq" if context.feeds.real else "rtn"
    if config.method != "rtn" and not context.feeds.real:
        raise ConfigError(
            f"--method {config.method} fits the rounding to real activations: pass --data FILE "
            "(rows of real inputs), or use --method rtn"
        )
    return config.method


# --- per unit ------------------------------------------------------------------------------------


def _grid(config: QuantizeConfig) -> tuple[Grid, int | None]:
    if config.width is not None:
        return Grid(config.width), config.block_size
    if config.mode == "int4":
        return Grid(4), config.block
    return Grid(8), None


def _scale_dtype(unit: Unit, config: QuantizeConfig) -> np.dtype:
    if config.width is not None:
        layout = layout_of(unit, config.block_size)
        grid = Grid(config.width)
        return packed_scale_dtype(layout.rows(unit.weight.numpy()), layout, grid, unit.weight.name or "")
    return np.dtype(unit.weight.dtype.numpy())


def _why_not(unit: Unit, method: str, config: QuantizeConfig) -> str | None:
    kinds = {u.kind for u in unit.uses}
    if "gather" in kinds:
        return "embedding tables read by Gather (no layer input to fit to)"
    if "recurrent" in kinds:
        return "LSTM/GRU/RNN weights (not fitted: their inputs change at every time step)"
    if config.mode == "int4" and kinds & INT4_PACKED_KINDS:
        return "Conv weights under --mode int4 (stored as packed 4-bit codes, rounded to nearest)"
    if any(op_key(u.node) == "ConvTranspose" for u in unit.uses):
        return "ConvTranspose kernels (not fitted)"
    if unit.axis is None:
        return "rank-1 weights (one scale for the tensor)"
    if method == "awq":
        if len(unit.uses) > 1:
            return "weights read by several nodes (AWQ scales one input)"
        use = unit.uses[0]
        node = use.node
        op = op_key(node)
        if op == "Conv":
            attr = node.attributes.get("group")
            if attr is not None and attr.as_int() != 1:
                return "grouped Conv (AWQ scales whole input channels)"
        elif use.index != 1 or (op == "Gemm" and _attr_int(node, "transA")):
            return "weights in the first operand of MatMul/Gemm (AWQ scales the other input)"
    return None


def _attr_int(node: ir.Node, name: str) -> int:
    attr = node.attributes.get(name)
    return int(attr.as_int()) if attr is not None else 0


def _layers(
    model: ir.Model, units: Sequence[Unit], method: str, config: QuantizeConfig
) -> tuple[list[tuple[Unit, layerwise.Layer]], dict[str, str]]:
    layers: list[tuple[Unit, layerwise.Layer]] = []
    rounded: dict[str, str] = {}
    for unit in units:
        why = _why_not(unit, method, config)
        if why is None:
            got = layerwise.layer_of(unit.index, unit.weight, [(u.node, u.index) for u in unit.uses], model)
            if isinstance(got, str):
                why = got
            else:
                layers.append((unit, got))
                continue
        rounded[unit.weight.name] = why
    return layers, rounded


def _payload(
    unit: Unit, layer: layerwise.Layer, fit: solvers.Fit, config: QuantizeConfig
) -> tuple[object, np.ndarray]:
    """The storage's payload of ``fit`` and the weight the layer sees (weight layout, float64)."""
    grid, block = _grid(config)
    rows = fit.values(grid, block)
    if fit.column_scale is not None:
        rows = rows / fit.column_scale
    seen = layer.unrows(rows)
    if config.width is not None:
        return Codes((fit.codes.astype(np.int16) - grid.lo).astype(np.uint8), fit.scales), seen
    if config.mode == "int4":
        assert block is not None
        n, k = fit.codes.shape
        blocks = -(-k // block)
        q = np.zeros((n, blocks * block), np.int8)
        q[:, :k] = fit.codes
        return (q, fit.scales), seen
    q = layer.unrows(fit.codes)
    return Int8Weight(np.ascontiguousarray(q), fit.scales[:, 0].copy(), None), seen


def _rtn_values(unit: Unit, config: QuantizeConfig) -> np.ndarray | None:
    """What round-to-nearest makes of a weight the methods leave alone (for staged runs)."""
    w = unit.weight
    arr = w.numpy()
    if not np.isfinite(arr).all():
        return None
    dtype = np.dtype(w.dtype.numpy())
    if config.width is not None:
        layout = layout_of(unit, config.block_size)
        grid = Grid(config.width)
        rounded = round_to_nearest(layout.rows(arr), layout, grid, w.name or "", offsets=row_offsets(unit))
        return layout.unrows(rounded.restored(layout, grid)).astype(dtype)
    if config.mode == "int4":
        axis = unit.axis
        if axis is None or arr.ndim != 2:
            return None
        wt = arr.T if axis == 0 else arr
        q, scales = block_int4(wt, config.block, dtype)
        restored = _dequant_int4(q, scales, config.block, wt.shape[1])
        return (restored.T if axis == 0 else restored).astype(dtype)
    quantized = symmetric_int8(arr, unit.axis, dtype)
    shape = [-1 if i == unit.axis else 1 for i in range(arr.ndim)] if unit.axis is not None else []
    scale = quantized.scale.astype(np.float32).reshape(shape)
    return (quantized.q.astype(np.float32) * scale).astype(dtype)


def _fitted(
    unit: Unit, layer: layerwise.Layer, fit: solvers.Fit, config: QuantizeConfig, rows: np.ndarray
) -> tuple[Fitted, np.ndarray]:
    payload, seen = _payload(unit, layer, fit, config)
    input_scale = None
    if fit.column_scale is not None:
        per_channel = fit.column_scale[:: max(1, layer.width // layer.inputs)]
        input_scale = (1.0 / per_channel).astype(np.dtype(unit.weight.dtype.numpy()))
    snr = _snr_db(layer.unrows(rows), seen)
    details = {k: v for k, v in fit.details.items() if v is not None}
    return Fitted(payload, details, input_scale, snr), seen


def fit_weights(
    model: ir.Model, units: Sequence[Unit], config: QuantizeConfig, context: TechniqueContext, method: str
) -> Fitting:
    """Fit every unit of ``units`` (planned on ``model``) with ``method`` (gptq or awq)."""
    damping = config.damping if config.damping is not None else DEFAULT_DAMPING
    act_order = config.act_order if config.act_order is not None else True
    layers, rounded = _layers(model, units, method, config)
    fitted: dict[str, Fitted] = {}
    grid, block = _grid(config)
    unit_of = {layer.key: unit for unit, layer in layers}
    rows_seen = 0

    def weight_rows(layer: layerwise.Layer) -> np.ndarray:
        return layer.rows(layer.weight.numpy())

    if method == "gptq":

        def solve(layer: layerwise.Layer, stats: layerwise.Stats) -> np.ndarray | None:
            nonlocal rows_seen
            unit = unit_of[layer.key]
            rows = weight_rows(layer)
            if not stats.finite or not np.isfinite(rows).all() or stats.gram is None:
                rounded[unit.weight.name] = "non-finite weights or activations"
                return None
            rows_seen = max(rows_seen, stats.rows)
            dtype = _scale_dtype(unit, config)
            if layer.groups == 1 and stats.rows and _why_not(unit, "awq", config) is None:
                # a layer AWQ could scale: GPTQ scales its input channels first where they hold outliers
                repeat = layer.width // layer.inputs
                rms = np.sqrt(stats.squares[0].reshape(layer.inputs, repeat).mean(axis=1) / stats.rows)
                fit = solvers.scaled_gptq(
                    rows,
                    stats.gram[0],
                    grid,
                    block,
                    dtype,
                    damping=damping,
                    act_order=act_order,
                    cross=stats.cross[0] if stats.cross is not None else None,
                    channel_rms=rms,
                    repeat=repeat,
                )
            else:
                fit = _grouped(
                    layer,
                    rows,
                    stats,
                    lambda r, h, c: solvers.gptq(
                        r, h, grid, block, dtype, damping=damping, act_order=act_order, cross=c
                    ),
                )
            done, seen = _fitted(unit, layer, fit, config, rows)
            fitted[unit.weight.name] = done
            return seen.astype(np.dtype(unit.weight.dtype.numpy()))

        applied: dict[str, np.ndarray] = {}
        for unit in units:
            if (
                unit.weight.name in rounded
                and unit.weight.graph is model.graph
                and unit.weight.kind == "initializer"
            ):
                values = _rtn_values(unit, config)
                if values is not None:
                    applied[unit.weight.name] = values
        stages = (
            layerwise.solve_in_stages(
                model,
                [layer for _, layer in layers],
                context,
                solve,
                applied=applied,
                passes=MAX_STAGES,
            )
            if layers
            else 0
        )
        return Fitting("gptq", fitted, rounded, rows_seen, stages, damping, act_order)

    probe = layerwise.Probe(model, [layer for _, layer in layers], context.runtime) if layers else None
    stats_of = (
        layerwise.collect(
            probe, [layer for _, layer in layers], context.feeds, context.progress, channel_means=True
        )
        if probe is not None
        else {}
    )
    for unit, layer in layers:
        stats = stats_of[layer.key]
        rows = weight_rows(layer)
        mean = stats.channel_mean
        if not stats.finite or mean is None or stats.gram is None or not np.isfinite(rows).all():
            rounded[unit.weight.name] = "non-finite weights or activations"
            continue
        rows_seen = max(rows_seen, stats.rows)
        fit = solvers.awq(
            rows,
            stats.gram[0],
            mean,
            layer.width // layer.inputs,
            grid,
            block,
            _scale_dtype(unit, config),
        )
        fitted[unit.weight.name], _ = _fitted(unit, layer, fit, config, rows)
    return Fitting("awq", fitted, rounded, rows_seen, 0, damping, act_order)


def _grouped(layer: layerwise.Layer, rows: np.ndarray, stats: layerwise.Stats, solve: object) -> solvers.Fit:
    """Solve each group of a grouped Conv with its own statistics; one Fit for the whole."""
    assert stats.gram is not None and callable(solve)
    if layer.groups == 1:
        cross = stats.cross[0] if stats.cross is not None else None
        fit: solvers.Fit = solve(rows, stats.gram[0], cross)
        return fit
    parts = []
    for g in range(layer.groups):
        cross = stats.cross[g] if stats.cross is not None else None
        parts.append(solve(rows[layer.group_rows(g)], stats.gram[g], cross))
    details = dict(parts[0].details)
    details["scales_refitted_rows"] = sum(int(p.details.get("scales_refitted_rows", 0)) for p in parts)
    details["corrected_for_earlier_layers"] = any(
        p.details.get("corrected_for_earlier_layers") for p in parts
    )
    return solvers.Fit(
        np.concatenate([p.codes for p in parts]),
        np.concatenate([p.scales for p in parts]),
        details,
    )


# --- applying it ---------------------------------------------------------------------------------


def insert_input_scales(units: Sequence[Unit], fitting: Fitting | None, names: NameAuthority) -> int:
    """AWQ: put ``Mul(x, 1/s)`` in front of each scaled layer; returns how many."""
    if fitting is None:
        return 0
    count = 0
    for unit in units:
        fitted = fitting.fitted.get(unit.weight.name)
        if fitted is None or fitted.input_scale is None:
            continue
        (use,) = unit.uses
        node = use.node
        graph = node.graph
        assert graph is not None
        x = node.inputs[0]
        assert x is not None
        vector = fitted.input_scale
        if op_key(node) == "Conv":
            rank = len(unit.weight.shape)
            vector = vector.reshape((-1,) + (1,) * (rank - 2))
        const = _initializer(
            graph, names, f"{unit.weight.name}_awq_input_scale", np.ascontiguousarray(vector)
        )
        out = ir.Value(name=names.fresh(f"{x.name}_awq"), type=x.type, shape=x.shape)
        mul = ir.Node(
            "", "Mul", [x, const], outputs=[out], name=names.fresh(f"{node.name or 'node'}_awq_Mul")
        )
        graph.insert_before(node, [mul])
        node.replace_input_with(0, out)
        count += 1
    return count


def payloads(fitting: Fitting | None) -> dict[str, object]:
    """The storage payloads by weight name."""
    return {} if fitting is None else {name: f.payload for name, f in fitting.fitted.items()}


def label_changes(changes: Sequence[Change], fitting: Fitting | None, method: str) -> tuple[Change, ...]:
    """Every change says which method rounded its weight (``details.method``)."""
    out = []
    for change in changes:
        name = str(change.details.get("weight", ""))
        fitted = fitting.fitted.get(name) if fitting is not None else None
        if fitted is not None:
            extra: dict[str, object] = {**fitted.details, "weight_snr_db": fitted.snr_db}
            if fitted.input_scale is not None:
                extra["input_scaled_by"] = "Mul"
            what = f"{change.what}, {fitted.details.get('method')}"
        else:
            extra = {"method": "rtn"}
            if fitting is not None and name in fitting.rounded:
                extra["rtn_because"] = fitting.rounded[name]
            what = change.what if method == "rtn" else f"{change.what}, rtn"
        out.append(dataclasses.replace(change, what=what, details={**change.details, **extra}))
    return tuple(out)
