"""``quantize``: store weights (and optionally compute) in fewer bits.

Modes:

- ``int8`` (default), weight-only, symmetric per output channel::

      s_c = max|W_c| / 127,  q = clip(round(W / s_c), -127, 127),  W' = q * s_c

  The channel axis is the consumer's output axis: MatMul ``W[K, N]`` -> 1, Gemm -> 0 or 1 by
  ``transB``, Conv -> 0, ConvTranspose -> 1, Gather tables -> one scale per row, LSTM/GRU/RNN
  ``W`` and ``R`` -> one scale per direction and gate row (biases stay float). ``q`` is
  stored as int8 and a standard ``DequantizeLinear`` rebuilds ``W'`` in front of the
  consumer (``Cast + Mul`` on opsets without per-axis DequantizeLinear, < 13). About 4x
  smaller; compute stays in float, so no speed-up is expected.
- ``int4``: block-wise weight-only for MatMul/Gemm/Gather (see ``weightonly.py``); Conv,
  ConvTranspose and LSTM/GRU/RNN weights as packed 4-bit codes, blocks along each output
  channel, rebuilt by ops onnxruntime folds at load (see ``lowbit.py``).
- ``int2``, ``binary`` and ``--bits N`` (1..8): weight-only at that width, packed at that
  width in the file and rebuilt by standard ops that onnxruntime folds at load (see
  ``lowbit.py``); with ``--qat`` the model is first trained for the grid (see ``qat.py``).
- ``fp16``: weights and compute in float16 with float32 inputs/outputs (see ``fp16.py``).
- ``bf16``: weights stored in bfloat16, compute in float32 (see ``bf16.py``).
- ``dynamic``: int8 weights and activations quantized at run time (``DynamicQuantizeLinear`` +
  ``MatMulInteger``, see ``dynamic.py``; LSTM: ``DynamicQuantizeLSTM``, see ``recurrent.py``).
- ``static``: int8 activations too, through onnxruntime's quantizer.

Applies to float weights (float32/float16/bfloat16) of at least ``--min-elements`` elements
read by the ops above, wherever they live: initializers, ``Constant`` nodes and
``If``/``Loop``/``Scan`` bodies. A weight read by several nodes is quantized once along an
axis that suits all of them, or left alone with a reason.

With fidelity gates (``--max-error``/``--min-cosine``/``--min-agreement``), a sensitivity
pass quantizes one layer at a time, measures each against the original, and keeps the most
damaging layers in float until the gates pass (see ``search.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir
from onnxruntime import __version__ as ort_version

from modelshrink.errors import UnsupportedModelError
from modelshrink.gates import holds
from modelshrink.graph import NameAuthority
from modelshrink.runtime import executes_qdq, runs_qdq
from modelshrink.sessions import session_for_model
from modelshrink.techniques.base import Skip, TechniqueContext, TechniqueResult
from modelshrink.techniques.quantize.bf16 import BF16_NOTES, store_bf16
from modelshrink.techniques.quantize.calibrated import (
    METHOD_MODES,
    RTN_NOTE,
    Fitting,
    fit_weights,
    insert_input_scales,
    label_changes,
    payloads,
    resolve_method,
)
from modelshrink.techniques.quantize.config import RECURRENT_OPS, QuantizeConfig
from modelshrink.techniques.quantize.dynamic import quantize_dynamic
from modelshrink.techniques.quantize.fp16 import ACTIVATION_LIMIT, FLOAT32_OPS, activation_peaks, convert_fp16
from modelshrink.techniques.quantize.lowbit import Codes, packed_notes, quantize_packed, summarize
from modelshrink.techniques.quantize.opset import prepare
from modelshrink.techniques.quantize.plan import INT4_PACKED_KINDS, Plan, Unit, make_plan
from modelshrink.techniques.quantize.recurrent import DYNAMIC_LSTM, quantize_dynamic_lstm
from modelshrink.techniques.quantize.search import (
    Scored,
    Search,
    check_agreement_gate,
    fallback_search,
    format_table,
    score_units,
)
from modelshrink.techniques.quantize.static import StaticQdq, quantize_static_qdq, to_float
from modelshrink.techniques.quantize.weightonly import (
    Emitted,
    Int8Weight,
    default_opset,
    quantize_int4,
    quantize_int8,
)

__all__ = ["quantize"]

logger = logging.getLogger(__name__)


# MatMulNBits accuracy_level: 4 quantizes activations to int8 per block inside the kernel
# (onnxruntime's fast CPU path). See the README for the measured fidelity/latency trade-off.
INT4_ACCURACY_LEVEL = 4


def _default_format(config: QuantizeConfig, context: TechniqueContext) -> tuple[QuantizeConfig, list[str]]:
    """int8 without --format: the storage that runs at the original's speed on the provider in use."""
    if config.mode != "int8" or config.width is not None or config.format is not None:
        return config, []
    provider = context.runtime.provider_name
    if executes_qdq(context.runtime):
        return dataclasses.replace(config, format="qdq"), [
            f"storage: DequantizeLinear (--format qdq), because {provider} runs QDQ weights with int8 "
            "kernels; --format cast stores the same bytes behind Cast + Mul"
        ]
    return dataclasses.replace(config, format="cast"), [
        f"storage: Cast + Mul (--format cast), which {provider} folds once when it loads the model, so "
        "the result runs at the original's speed; DequantizeLinear (--format qdq, same file size) is "
        "computed on every call there, 1.2x-2.3x slower on the real models we measured: use it for "
        "runtimes that execute int8 weights (TensorRT, OpenVINO, QNN), or to keep int8 in memory "
        "(with Cast + Mul onnxruntime holds the weights in float32 at run time, and its folding "
        "peaks near 2.4x their float size while the model loads)"
    ]


def _apply_units(
    model: ir.Model, config: QuantizeConfig, keep: frozenset[int] | None, fitting: Fitting | None = None
) -> tuple[ir.Model, Plan, Emitted]:
    """A clone of ``model`` with the planned units quantized (all, or only those in ``keep``).

    ``fitting`` holds the codes and scales a data-aware ``--method`` chose (by weight name);
    the other weights are rounded to nearest.
    """
    model = model.clone()
    plan = make_plan(model, config)
    units: list[Unit] = [u for u in plan.units if keep is None or u.index in keep]
    names = NameAuthority(model)
    insert_input_scales(units, fitting, names)
    fixed = payloads(fitting)
    if config.mode == "dynamic":
        # MatMul/Gemm compute in int8; LSTM becomes DynamicQuantizeLSTM where it can; Gather
        # tables are gathered in int8; Conv, GRU and RNN weights (and LSTMs that cannot be
        # rewritten) are stored in int8 behind Cast + Mul, which onnxruntime folds at load.
        dense = quantize_dynamic(model, [u for u in units if u.uses[0].kind == "matmul"], names)
        lstm = quantize_dynamic_lstm(model, [u for u in units if u.uses[0].kind == "recurrent"], names)
        rows = quantize_int8(model, [u for u in units if u.uses[0].kind == "gather"], names)
        convs = quantize_int8(
            model,
            [u for u in units if u.uses[0].kind == "conv"] + [u for u, _ in lstm.weight_only],
            names,
            cast=True,
        )
        convs = _with_reasons(convs, {u.weight.name: why for u, why in lstm.weight_only})
        emitted = _merged(units, dense, lstm.emitted, rows, convs)
    elif config.width is not None:
        emitted = quantize_packed(
            model,
            units,
            names,
            bits=config.width,
            block=config.block_size,
            fixed={k: v for k, v in fixed.items() if isinstance(v, Codes)},
        )
    elif config.mode == "bf16":
        emitted = store_bf16(model, units, names)
    elif config.mode == "int4":
        # MatMulNBits / GatherBlockQuantized; Conv and recurrent weights (no int4 kernel takes
        # them) as packed 4-bit codes that onnxruntime unpacks when it loads the model
        packed = [u for u in units if u.uses[0].kind in INT4_PACKED_KINDS]
        blocks = quantize_int4(
            model,
            [u for u in units if u.uses[0].kind not in INT4_PACKED_KINDS],
            names,
            block_size=config.block,
            fmt=config.storage,
            accuracy_level=INT4_ACCURACY_LEVEL,
            fixed={k: v for k, v in fixed.items() if isinstance(v, tuple)},
        )
        emitted = _merged(units, blocks, quantize_packed(model, packed, names, bits=4, block=config.block))
    else:
        emitted = quantize_int8(
            model,
            units,
            names,
            cast=config.storage == "cast",
            fixed={k: v for k, v in fixed.items() if isinstance(v, Int8Weight)},
        )
    if config.mode in METHOD_MODES or config.width is not None:
        method = fitting.method if fitting is not None else "rtn"
        emitted = dataclasses.replace(emitted, changes=label_changes(emitted.changes, fitting, method))
    return model, plan, emitted


def _merged(units: list[Unit], *parts: Emitted) -> Emitted:
    """Several emitters' results as one, the changes in plan order."""
    changes = {c.details["weight"]: c for part in parts for c in part.changes}
    return Emitted(
        tuple(changes[u.weight.name] for u in units if u.weight.name in changes),
        frozenset().union(*(part.storages for part in parts)),
        tuple(s for part in parts for s in part.skipped),
    )


def _with_reasons(emitted: Emitted, reasons: dict[str, str]) -> Emitted:
    """Say in each change of a weight named in ``reasons`` why it got this storage."""
    changes = tuple(
        dataclasses.replace(
            c,
            what=f"{c.what}; float compute: {reasons[c.details['weight']]}",
            details={**c.details, "why_weight_only": reasons[c.details["weight"]]},
        )
        if c.details["weight"] in reasons
        else c
        for c in emitted.changes
    )
    return dataclasses.replace(emitted, changes=changes)


def _weight_only_notes(model: ir.Model, config: QuantizeConfig, emitted: Emitted) -> list[str]:
    notes: list[str] = []
    if not emitted.changes:
        notes.append("nothing was quantized: see the skipped list for why each weight was left alone")
        return notes
    if config.width is not None:
        notes.extend(packed_notes(summarize(config.width, emitted.changes), qat=config.qat))
        return notes
    if config.mode == "bf16":
        notes.extend(BF16_NOTES)
        return notes
    if config.mode == "int4":
        notes.extend(_int4_notes(config, emitted))
        return notes
    if config.mode == "dynamic":
        notes.append(
            "dynamic: weights are int8 per output channel; each MatMul/Gemm input is quantized to "
            "uint8 per tensor at run time (DynamicQuantizeLinear + MatMulInteger, fused by onnxruntime); "
            "Gather tables are gathered in int8 and scaled per row; Conv weights are stored in int8 "
            "but Conv computes in float: they are rebuilt by Cast + Mul, which onnxruntime folds at "
            "load (its ConvInteger is generally slower than float Conv on CPU: quantize_dynamic's "
            "ConvInteger made the sample CNN 4x slower)"
        )
        notes.extend(_recurrent_dynamic_notes(emitted))
        return notes
    notes.append(
        "weight-only int8: weights are stored in int8 and turned back into float at run time, so "
        "compute stays in float; expect a smaller file, not a faster model (--mode dynamic "
        "quantizes activations for int8 compute on CPU)"
    )
    if "DequantizeLinear" in emitted.storages:
        notes.append(
            "onnxruntime's CPU provider does not fold DequantizeLinear: it dequantizes weights on every "
            "call (or fuses a MatMul into MatMulNBits with int8 activations), which can cost latency; "
            "--format cast stores the same int8 weights behind Cast + Mul, which onnxruntime folds "
            "once at load: no run-time cost, float-sized weights in memory at run time"
        )
    opset = default_opset(model)
    if "Cast+Mul" in emitted.storages and config.storage != "cast" and not runs_qdq(opset):
        notes.append(
            f"onnxruntime {ort_version} has no DequantizeLinear kernel at opset {opset}: weights are "
            "rebuilt with Cast + Mul, which gives the same values"
        )
    elif "Cast+Mul" in emitted.storages and config.storage != "cast":
        notes.append(
            f"opset {opset} has no per-channel DequantizeLinear for these weights "
            "(it needs opset 13, or 19 for float16/bfloat16 scales): they are rebuilt with Cast + "
            "Mul, which gives the same values; the opset was not raised"
        )
    if "Gather+Cast+Mul" in emitted.storages:
        notes.append(
            "embedding tables read only by Gather stay int8: rows are gathered first and only "
            "those rows are scaled (Gather -> Cast -> Mul), so the whole table is never dequantized"
        )
    return notes


def _recurrent_dynamic_notes(emitted: Emitted) -> list[str]:
    notes: list[str] = []
    if DYNAMIC_LSTM in emitted.storages:
        notes.append(
            f"LSTM: onnxruntime's com.microsoft {DYNAMIC_LSTM}: W and R in int8 (one scale per "
            "direction and gate row, stored transposed as the kernel reads them); at every step the "
            "kernel quantizes the input and the hidden state to uint8 and runs the gate products in "
            "integers; biases and initial states stay float"
        )
    weight_only = sorted(
        {c.op_type for c in emitted.changes if "why_weight_only" in c.details and c.op_type in RECURRENT_OPS}
    )
    if weight_only:
        notes.append(
            f"{', '.join(weight_only)}: weights stored in int8 (one scale per direction and gate row) "
            "behind Cast + Mul, folded at load, with float compute: onnxruntime has an integer kernel "
            "for LSTM only (each change says why its layer got this storage)"
        )
    return notes


def _int4_notes(config: QuantizeConfig, emitted: Emitted) -> list[str]:
    notes: list[str] = []
    if emitted.storages - {"4-bit packed (BitShift+Cast+Mul)"}:
        if config.storage == "nbits":
            notes.append(
                "int4 uses onnxruntime's com.microsoft MatMulNBits / GatherBlockQuantized kernels "
                f"(accuracy_level {INT4_ACCURACY_LEVEL}: activations are quantized to int8 per block inside "
                "the kernel); runtimes other than onnxruntime may not have them: --format qdq is portable"
            )
        else:
            notes.append(
                "int4 weights are rebuilt by block-wise DequantizeLinear in front of each reader "
                "(onnxruntime may fuse DequantizeLinear + MatMul into MatMulNBits when it loads the model); "
                "Gather tables are dequantized whole on every call in this format"
            )
    packed = sorted(
        {c.op_type for c in emitted.changes if str(c.details["storage"]).startswith("4-bit packed")}
    )
    if packed:
        notes.append(
            f"{', '.join(packed)} weights: 4-bit codes packed two per byte, one scale (float16 where it fits) per "
            f"{config.block} values along each output channel (or gate row), rebuilt by standard ops "
            "(BitShift, Cast, Mul, Reshape) that onnxruntime folds once when it loads the model: "
            "those layers compute in float at the original's speed with float weights in memory; "
            "only the file is small (no runtime has an int4 Conv or LSTM kernel to feed)"
        )
    return notes


def _static(model: ir.Model, config: QuantizeConfig, context: TechniqueContext) -> TechniqueResult:
    qdq = quantize_static_qdq(model, config, context)
    every = TechniqueResult(qdq.model, qdq.changes, qdq.skips, qdq.notes, qdq.details)
    if not qdq.units:
        return _static_weight_only(every, config, context)
    if config.sensitivity:
        ranked = score_units(qdq.units, lambda keep: to_float(qdq, keep)[0], context)
        table = format_table(ranked, with_cost=context.gates.fidelity_gates)
        notes = (
            "--sensitivity: each layer alone in int8 (the others in float), most damaging first; the "
            "report's figures are for every layer in int8; nothing is written\n" + table,
            *qdq.notes,
        )
        details = {**qdq.details, "sensitivity": _table_rows(ranked)}
        measured = dataclasses.replace(every, notes=notes, details=details)
        measured = _static_weight_only(measured, config, context)  # the figures are a real run's
        return dataclasses.replace(measured, changed=(), write=False)
    done = _static_fallback(qdq, context) if context.gates.fidelity_gates and config.fallback else every
    done = _static_weight_only(done, config, context)
    return _check_speed(model, done, context) if done.changed else done


# Weights static's QDQ kernels do not reach, stored in int8 all the same (weight-only).
STATIC_WEIGHT_ONLY = ("Gather", *RECURRENT_OPS)


def _static_weight_only(
    done: TechniqueResult, config: QuantizeConfig, context: TechniqueContext
) -> TechniqueResult:
    """LSTM/GRU/RNN weights and Gather tables in int8 behind Cast + Mul, as ``--mode int8`` stores them.

    onnxruntime has no QDQ kernel for them, so ``quantize_static`` leaves them in float (a
    CRNN-style OCR model, ddddocr's, stayed at 0.487x its size; 0.255x with them). Recurrent
    weights are folded at load (float compute at the float speed); a table is gathered in int8
    and only the rows read are scaled. Kept only where the fidelity gates still hold with them
    (one whole-model check); otherwise left in float, said in a note.
    """
    wanted = tuple(op for op in STATIC_WEIGHT_ONLY if config.op_types is None or op in config.op_types)
    if not wanted:
        return done
    rest = QuantizeConfig(
        mode="int8", format="cast", op_types=wanted, exclude=config.exclude, min_elements=config.min_elements
    )
    try:
        base, raised = prepare(done.model, rest)  # an old opset: Mul needs 7
    except UnsupportedModelError as exc:
        note = f"LSTM/GRU/RNN weights and Gather tables left in float: {exc.message}"
        return dataclasses.replace(done, notes=(*done.notes, note))
    model, _, emitted = _apply_units(base, rest, None)
    if not emitted.changes:
        return done
    before = sum(c.details.get("bytes_before", 0) for c in emitted.changes)
    after = sum(c.details.get("bytes_after", 0) for c in emitted.changes)
    unit, div = ("MB", 1e6) if before >= 1e6 else ("KB", 1e3)
    kinds = {c.op_type for c in emitted.changes}
    ops = ", ".join(sorted(kinds))
    what = (
        f"{len(emitted.changes)} weight(s) of {ops} (no integer kernel for them in static QDQ), "
        f"{before / div:.2f} {unit}"
    )
    if context.gates.fidelity_gates and not holds(context.evaluate(model), context.gates):
        note = (
            f"left in float: {what}; in int8 behind Cast + Mul they fail the fidelity gates "
            "(--mode int8 stores them so when the gates allow)"
        )
        return dataclasses.replace(done, notes=(*done.notes, note))
    how = []
    if kinds & set(RECURRENT_OPS):
        how.append(
            "recurrent weights behind Cast + Mul, which onnxruntime folds at load (float compute, at the float speed)"
        )
    if "Gather" in kinds:
        how.append("tables read in int8, only the gathered rows scaled (Gather -> Cast -> Mul)")
    note = f"weight-only int8 for {what} -> {after / div:.2f} {unit}: {'; '.join(how)}"
    return dataclasses.replace(
        done,
        model=model,
        changed=(*done.changed, *emitted.changes),
        skipped=(*done.skipped, *emitted.skipped),
        notes=(*done.notes, *raised, note),
    )


def _static_fallback(qdq: StaticQdq, context: TechniqueContext) -> TechniqueResult:
    """Put the most damaging int8 nodes back in float until the fidelity gates pass.

    The same search as the weight-only modes: every node scored alone (only it in int8),
    ranked by its share of the gates' allowance, then the fewest most costly kept in float
    (binary search, each step checking the whole model).
    """
    notes = list(qdq.notes)
    full = context.evaluate(qdq.model)
    check_agreement_gate(full, context.gates)
    if holds(full, context.gates):
        notes.append("every layer in int8 passes the fidelity gates: no layer had to stay in float")
        return TechniqueResult(qdq.model, qdq.changes, qdq.skips, tuple(notes), qdq.details)

    def build(keep: frozenset[int]) -> ir.Model:
        return to_float(qdq, keep)[0]

    ranked = score_units(qdq.units, build, context)
    search = fallback_search(ranked, build, context, full)
    details = _fallback_details(ranked, search, qdq.details)
    table = format_table(ranked, with_cost=True)
    if not search.met:
        notes.insert(
            0,
            "the fidelity gates cannot be met by keeping layers in float: even with only the least "
            f"damaging layer ('{ranked[-1].unit.layer}') in int8 the model fails them; the result below "
            "quantizes every layer (--mode int8 or dynamic keep activations in float). Per-layer cost (each "
            "layer alone in int8):\n" + table,
        )
        return TechniqueResult(qdq.model, qdq.changes, qdq.skips, tuple(notes), details)
    every = frozenset(u.index for u in qdq.units)
    chosen, changes = to_float(qdq, every - {s.unit.index for s in search.kept})
    skips = [*qdq.skips, *(_kept_in_float(s, "", "alone in int8") for s in search.kept)]
    notes.insert(
        0,
        f"tolerance search: {len(search.kept)} of {len(ranked)} layer(s) kept in float to pass the "
        f"fidelity gates: {', '.join(s.unit.layer for s in search.kept)}; the latency in this report is "
        "the model's with them in float. Per-layer cost (each layer alone in int8):\n" + table,
    )
    return TechniqueResult(chosen, changes, tuple(skips), tuple(notes), details)


def _fp16(model: ir.Model, config: QuantizeConfig, context: TechniqueContext) -> TechniqueResult:
    unmeasured: str | None = None
    try:
        peaks = activation_peaks(model, context.feeds.samples, context.runtime)
    except UnsupportedModelError as exc:  # exposing every value can trip onnxruntime
        peaks, unmeasured = {}, exc.message
    model = model.clone()
    done = convert_fp16(model, config, peaks)
    kept = ", ".join(f"{op} x{n}" for op, n in sorted(done.float32_nodes.items()))
    notes = [
        f"{done.float16_nodes} node(s) run in float16; model inputs and outputs stay float32; "
        f"{done.casts} Cast(s) at float32/float16 boundaries"
        + (f"; kept in float32: {kept}" if kept else ""),
        "onnxruntime's CPU provider has few float16 kernels and runs the rest in float32 behind "
        "Casts it inserts, so expect no speed-up on CPU: float16 pays off on GPUs",
        f"activations beyond float16's range were looked for on {len(context.feeds.samples)} "
        f"{'real' if context.feeds.real else 'synthetic'} input(s); nodes touching one past "
        f"{ACTIVATION_LIMIT:g} stay float32"
        if unmeasured is None
        else f"activation ranges could not be measured ({unmeasured}); only weights were range-checked",
    ]
    details = {
        "float16_nodes": done.float16_nodes,
        "float32_nodes": dict(sorted(done.float32_nodes.items())),
        "casts": done.casts,
        "float32_ops": sorted(FLOAT32_OPS),
    }
    return TechniqueResult(model, tuple(done.changes), tuple(done.skipped), tuple(notes), details)


def quantize(model: ir.Model, config: QuantizeConfig, context: TechniqueContext) -> TechniqueResult:
    """Quantize ``model`` as ``config`` says; the input model is never modified.

    Args:
        model: The model (not modified).
        config: The settings.
        context: Feeds, evaluation and gates from the pipeline.

    Returns:
        The quantized model with what changed, what was skipped and why, and notes.
    """
    if config.mode == "fp16":
        return _fp16(model, config, context)
    if config.mode == "static":
        return _static(model, config, context)
    if config.qat:
        from modelshrink.techniques.quantize.qat import quantize_aware  # imports the training engine

        return quantize_aware(model, config, context)
    config, format_notes = _default_format(config, context)
    method = resolve_method(config, context)
    base, notes = prepare(model, config)
    notes = format_notes + notes
    fitting = None
    if method != "rtn":
        units = make_plan(base, config).units
        fitting = fit_weights(base, units, config, context, method)
    result, plan, emitted = _apply_units(base, config, None, fitting)
    notes += _weight_only_notes(base, config, emitted)
    if config.mode in METHOD_MODES or config.width is not None:
        if fitting is not None:
            notes += fitting.notes(len(context.feeds.samples))
        elif emitted.changes and not context.feeds.real:
            notes.append(RTN_NOTE)
    quantized = _Quantized(base, result, plan, emitted, fitting)
    if config.sensitivity:
        return _sensitivity_only(quantized, config, context, notes)
    if config.fallback and context.gates.fidelity_gates and plan.units:
        done = _with_fallback(quantized, config, context, notes)
    else:
        done = TechniqueResult(
            model=result, changed=emitted.changes, skipped=plan.skipped + emitted.skipped, notes=tuple(notes)
        )
    if config.mode == "dynamic" and done.changed:
        done = _check_speed(model, done, context)
    if config.width is not None and done.changed:
        done = _packed_result(done, config, context)
    return done


# Post-training quantization at 3-4 bits "lost accuracy" below these (then the report suggests --qat).
POOR_COSINE = 0.995
POOR_AGREEMENT = 0.99


def _packed_result(
    done: TechniqueResult, config: QuantizeConfig, context: TechniqueContext
) -> TechniqueResult:
    """Packing figures in the details; at 3-4 bits, a measured word on fidelity and --qat."""
    assert config.width is not None
    details = {**done.details, "packing": summarize(config.width, done.changed).as_dict()}
    notes = list(done.notes)
    if 3 <= config.width <= 4 and not context.gates.fidelity_gates:
        f = context.evaluate(done.model)
        poor = f.cosine < POOR_COSINE or (f.top1_agreement is not None and f.top1_agreement < POOR_AGREEMENT)
        if poor:
            top1 = f", top-1 agreement {f.top1_agreement:.1%}" if f.top1_agreement is not None else ""
            notes.insert(
                0,
                f"post-training quantization to {config.width} bits lost accuracy here (cosine "
                f"{f.cosine:.4f}{top1} on the feeds): --qat --data TRAIN.npz trains the model for this grid",
            )
    return dataclasses.replace(done, notes=tuple(notes), details=details)


# Interleaved timed runs of original and result when dynamic quantization is chosen; a short
# budget, enough to tell "slower" from "faster" on a model where it matters.
SPEED_CHECK_BUDGET_S = 1.0
# Below this speedup the check calls the result slower (the rest is machine noise).
SLOWER_BELOW = 0.97
_MODE_WORDS = {"dynamic": "dynamic quantization", "static": "static quantization"}


def done_mode(done: TechniqueResult) -> str:
    """``static`` when the result came from the QDQ path, else ``dynamic``."""
    return (
        "static"
        if any(str(c.details.get("storage", "")).startswith("QDQ") for c in done.changed)
        else "dynamic"
    )


def _check_speed(original: ir.Model, done: TechniqueResult, context: TechniqueContext) -> TechniqueResult:
    """Time original and result once; say so in a note when the result is slower."""
    from modelshrink.measure import measure_latency

    sessions = [
        session_for_model(original, context.runtime, label="original"),
        session_for_model(done.model, context.runtime, label=f"{done_mode(done)} candidate"),
    ]
    stats = measure_latency(sessions, context.feeds.samples[0], budget_s=SPEED_CHECK_BUDGET_S)
    speedup = stats[0].p50_ms / stats[1].p50_ms if stats[1].p50_ms > 0 else float("inf")
    notes = list(done.notes)
    if speedup < SLOWER_BELOW:
        notes.insert(
            0,
            f"{_MODE_WORDS[done_mode(done)]} made this model slower here ({1 / speedup:.2f}x the original's latency "
            f"in a {SPEED_CHECK_BUDGET_S:g} s check): quantizing activations at run time costs more "
            "than small layers save; --mode int8 shrinks the file without run-time cost, and "
            "--min-speedup turns slowness into a failure",
        )
    details = {**done.details, "speed_check": {"speedup": round(speedup, 4), "runs": stats[0].runs}}
    return dataclasses.replace(done, notes=tuple(notes), details=details)


def _builder(
    base: ir.Model, config: QuantizeConfig, fitting: Fitting | None
) -> Callable[[frozenset[int]], ir.Model]:
    def build(keep: frozenset[int]) -> ir.Model:
        return _apply_units(base, config, keep, fitting)[0]

    return build


def _table_rows(ranked: list[Scored]) -> list[dict[str, object]]:
    return [s.row() for s in ranked]


def _fallback_details(ranked: list[Scored], search: Search, details: dict[str, object]) -> dict[str, object]:
    """``details`` with the per-layer table and what the tolerance search kept in float."""
    return {
        **details,
        "sensitivity": _table_rows(ranked),
        "fallback": {
            "target_met": search.met,
            "kept_in_float": [s.unit.layer for s in search.kept],
            "evaluations": len(ranked) + search.evaluations + 1,
        },
    }


def _kept_in_float(s: Scored, prefix: str, alone: str) -> Skip:
    """The skip of a layer the tolerance search kept in float, with what it cost quantized alone."""
    f = s.fidelity
    top1 = f", top-1 {f.top1_agreement:.2%}" if f.top1_agreement is not None else ""
    return Skip(
        s.unit.layer,
        s.unit.op_type,
        f"{prefix}kept in float by the tolerance search ({alone}: max |err| {f.max_abs_error:.4g}, "
        f"cosine {f.cosine:.6f}{top1}; cost {s.cost:.3g} of the gates' allowance)",
    )


@dataclass(frozen=True)
class _Quantized:
    """Every layer quantized: the model it started from, the result, its plan and what it emitted."""

    base: ir.Model
    result: ir.Model
    plan: Plan
    emitted: Emitted
    fitting: Fitting | None = None


def _sensitivity_only(
    done: _Quantized, config: QuantizeConfig, context: TechniqueContext, notes: list[str]
) -> TechniqueResult:
    """Score every layer alone; report the full quantization's figures; write nothing."""
    base, result, plan, emitted = done.base, done.result, done.plan, done.emitted
    ranked = score_units(plan.units, _builder(base, config, done.fitting), context)
    table = format_table(ranked, with_cost=context.gates.fidelity_gates)
    notes = [
        "--sensitivity: each layer quantized alone, most damaging first; the report's figures are "
        "for every layer quantized; nothing is written\n" + table,
        *notes,
    ]
    # the table lists every layer; the report's figures are the full quantization's
    return TechniqueResult(
        model=result,
        skipped=plan.skipped + emitted.skipped,
        notes=tuple(notes),
        details={"sensitivity": _table_rows(ranked)},
        write=False,
    )


def _with_fallback(
    done: _Quantized, config: QuantizeConfig, context: TechniqueContext, notes: list[str]
) -> TechniqueResult:
    """Keep the most damaging layers in float until the fidelity gates pass."""
    base, result, plan, emitted = done.base, done.result, done.plan, done.emitted
    full = context.evaluate(result)
    check_agreement_gate(full, context.gates)
    if holds(full, context.gates):
        notes.append("every layer quantized passes the fidelity gates: no layer had to stay in float")
        return TechniqueResult(result, emitted.changes, plan.skipped + emitted.skipped, tuple(notes))
    build = _builder(base, config, done.fitting)
    ranked = score_units(plan.units, build, context)
    search = fallback_search(ranked, build, context, full)
    details = _fallback_details(ranked, search, {})
    table = format_table(ranked, with_cost=True)
    if not search.met:
        notes.insert(
            0,
            "the fidelity gates cannot be met by keeping layers in float: even with only the least "
            f"damaging layer ('{ranked[-1].unit.layer}') quantized the model fails them; the result "
            "below quantizes every layer. Per-layer cost (each layer quantized alone):\n" + table,
        )
        return TechniqueResult(result, emitted.changes, plan.skipped + emitted.skipped, tuple(notes), details)
    kept = {s.unit.index for s in search.kept}
    chosen, _, chosen_emitted = _apply_units(
        base, config, frozenset(u.index for u in plan.units) - kept, done.fitting
    )
    skips = [
        *plan.skipped,
        *chosen_emitted.skipped,
        *(_kept_in_float(s, f"'{s.unit.weight.name}': ", "quantized alone") for s in search.kept),
    ]
    notes.insert(
        0,
        f"tolerance search: {len(search.kept)} of {len(ranked)} layer(s) kept in float to pass the "
        f"fidelity gates: {', '.join(s.unit.layer for s in search.kept)}. Per-layer cost (each layer "
        "quantized alone):\n" + table,
    )
    return TechniqueResult(chosen, chosen_emitted.changes, tuple(skips), tuple(notes), details)
