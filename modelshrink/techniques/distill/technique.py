"""Knowledge distillation: train the student to reproduce the teacher on the user's data.

The student's trainable weights ``w`` minimise, over batches of the training data ``x``,

    L(w) = (1 - alpha) * sum_o D_o(student_o(x; w), teacher_o(x)) + alpha * CE(student(x; w), y)
           + sum_(s, t) mean((student_s(x; w) - teacher_t(x))^2)

where ``D_o`` is the temperature-softened KL divergence (times ``T^2``) for class-like outputs
and the mean squared error otherwise, ``CE`` is the cross-entropy with labels ``y`` (only with
``--labels``) and the last sum is feature matching (``--match``). The gradient comes from
reverse-mode differentiation of the student's own ONNX graph (:mod:`.autodiff`), and each
step (forward, loss, backward, AdamW or SGD update) is one ONNX model run by onnxruntime
(:mod:`.step`). The trained values are written back into the student's graph by name, so the
result is the student with new weights: same nodes, names, opsets and metadata.

It applies when a student (a compressed copy, or any smaller model with the same inputs and
outputs) should win back agreement with a teacher, and representative inputs are available:
the data decides what the student learns, so random inputs would teach it nothing useful.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from modelshrink import io
from modelshrink.errors import ConfigError, DataError, UnsupportedModelError
from modelshrink.graph import graph_inputs
from modelshrink.inputs import batch_symbol, input_specs
from modelshrink.runtime import RuntimeOptions, Session
from modelshrink.techniques.base import Change, Judged, Skip, TechniqueContext, TechniqueResult
from modelshrink.techniques.distill.config import DistillConfig
from modelshrink.techniques.distill.data import Teacher, TrainingData
from modelshrink.techniques.distill.optim import OptimizerSpec
from modelshrink.techniques.distill.step import TargetSpec, build_step, prepare_student
from modelshrink.techniques.distill.targets import TeacherTargets, teacher_targets
from modelshrink.techniques.distill.trainer import LoopSettings, evaluate, plan_batches, train
from modelshrink.verify import class_like_outputs

__all__ = ["distill"]

logger = logging.getLogger(__name__)


# --- the technique ---------------------------------------------------------------------------


def _teacher_session(teacher: Teacher, extra_outputs: Sequence[str], runtime: RuntimeOptions) -> Session:
    proto = ir.serde.serialize_model(teacher.model)
    existing = {o.name for o in proto.graph.output}
    produced = {o for n in proto.graph.node for o in n.output}
    for name in extra_outputs:
        if name in existing:
            continue
        if name not in produced:
            raise ConfigError(f"--match: the teacher has no tensor named '{name}'")
        proto.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return Session(proto.SerializeToString(), runtime, label=f"teacher {teacher.label}")


def _check_inputs(student: ir.Model, teacher: Teacher, data: TrainingData) -> list[str]:
    s_inputs = [v.name or "" for v in graph_inputs(student.graph)]
    t_inputs = {v.name for v in graph_inputs(teacher.model.graph)}
    for name in s_inputs:
        if name not in t_inputs:
            raise UnsupportedModelError(
                f"the student's input '{name}' is not an input of the teacher {teacher.label}; "
                "distillation feeds both the same batch"
            )
        if name not in data.axes:
            raise DataError(f"--data {data.source}: no array for the student's input '{name}'")
    return s_inputs


def _fixed_batch(student: ir.Model, data: TrainingData) -> int | None:
    """The student's static size on an input's batch axis (it trains at that size), if any."""
    for v in graph_inputs(student.graph):
        axis = data.axes.get(v.name or "")
        if axis is None or axis.axis is None or v.shape is None or axis.axis >= len(v.shape):
            continue
        d = v.shape[axis.axis]
        if isinstance(d, int) and d > 0:
            return d
    return None


def _pinned_to_rows(
    model: ir.Model, data: TrainingData, names: Sequence[str]
) -> tuple[ir.Model, dict[str, tuple[int | None, ...]]]:
    """A copy of the student whose inputs' dynamic sizes, other than the batch axis, are those
    of the ``--data`` rows, and each pinned input's row shape (None on its batch axis).

    The training step is built for the sizes it is fed, so the gradient rules that need static
    sizes (ConvTranspose, Conv with auto_pad SAME, Resize to a size) apply to a detector declared
    ``x [N, 3, H, W]``. Only the step graph is pinned: the written model keeps its declared dims.
    """
    first = data.batch(np.zeros(1, np.int64))
    data.release()
    pinned = model.clone()
    sizes: dict[str, tuple[int | None, ...]] = {}
    for v in graph_inputs(pinned.graph):
        name = v.name or ""
        axis = data.axes[name].axis if name in data.axes else None
        if name not in names or axis is None or v.shape is None or name not in first:
            continue
        row = first[name].shape
        if len(row) != len(v.shape):
            continue
        if any(not isinstance(d, int) for a, d in enumerate(v.shape) if a != axis):
            v.shape = ir.Shape([d if a == axis else int(row[a]) for a, d in enumerate(v.shape)])
            sizes[name] = tuple(None if a == axis else int(n) for a, n in enumerate(row))
    return pinned, sizes


def _check_sizes(feed: Mapping[str, np.ndarray], sizes: Mapping[str, tuple[int | None, ...]]) -> None:
    for name, want in sizes.items():
        got = feed[name].shape
        if any(w is not None and w != g for w, g in zip(want, got, strict=False)):
            shown = ["*" if w is None else w for w in want]
            raise DataError(
                f"--data: input '{name}' has rows of shape {list(got)} and others of {shown}; "
                "distill trains at one size per input (the size of its first row)"
            )


def _declared_axes(teacher: Teacher, names: Sequence[str]) -> dict[str, int | None]:
    """Batch axes of the teacher's outputs from their declared dims (the inputs' batch symbol)."""
    symbol = batch_symbol(input_specs(teacher.model))
    out: dict[str, int | None] = {}
    for v in teacher.model.graph.outputs:
        if v.name and v.name in names and v.shape is not None and symbol is not None:
            dims = [d.value if isinstance(d, ir.SymbolicDim) else d for d in v.shape]
            out[v.name] = dims.index(symbol) if symbol in dims else None
    return out


def _producer_ops(model: ir.Model) -> dict[str, str]:
    return {v.name or "": node.op_type for node in model.graph for v in node.outputs}


def _dims_with_batch(arr: np.ndarray, axis: int | None) -> tuple[int | str, ...]:
    return tuple("batch" if a == axis else int(d) for a, d in enumerate(arr.shape))


def _plan_outputs(
    config: DistillConfig,
    student: ir.Model,
    targets: Mapping[str, np.ndarray],
    axes: Mapping[str, int | None],
) -> tuple[tuple[tuple[str, Literal["kl", "mse"], str | None, tuple[int | str, ...]], ...], list[str]]:
    producers = _producer_ops(student)
    plan: list[tuple[str, Literal["kl", "mse"], str | None, tuple[int | str, ...]]] = []
    class_outputs = []
    classes = class_like_outputs([(n, a.shape, a.dtype, producers.get(n)) for n, a in targets.items()])
    for (name, arr), class_like in zip(targets.items(), classes, strict=True):
        if config.loss == "auto":
            kind: Literal["kl", "mse"] = "kl" if class_like else "mse"
        else:
            kind = config.loss
        if kind == "kl" and (arr.ndim < 1 or arr.shape[-1] < 2):
            raise ConfigError(
                f"--loss kl: output '{name}' of shape {list(arr.shape)} has no class axis; use --loss mse"
            )
        plan.append((name, kind, producers.get(name), _dims_with_batch(arr, axes[name])))
        if class_like:
            class_outputs.append(name)
    return tuple(plan), class_outputs


def _float_outputs(student: ir.Model, teacher: Teacher) -> list[str]:
    t_out = {v.name for v in teacher.model.graph.outputs}
    shared = []
    for v in student.graph.outputs:
        dtype = v.dtype
        if v.name in t_out and (dtype is None or dtype == ir.DataType.FLOAT):
            shared.append(v.name or "")
    if not shared:
        names = ", ".join(v.name or "?" for v in student.graph.outputs)
        raise UnsupportedModelError(
            f"the student and the teacher share no float32 output by name (student outputs: {names}); "
            "distillation compares outputs of the same name"
        )
    return shared


def _write_back(model: ir.Model, values: Mapping[str, np.ndarray]) -> None:
    """Replace the trained weights' values in the student's own graphs (If/Loop/Scan bodies
    too), by name."""
    for key, graph_value in [i for g in model.graphs() for i in g.initializers.items()]:
        if key in values:
            old = graph_value.const_value
            name = old.name if old is not None else key
            graph_value.const_value = ir.Tensor(
                np.ascontiguousarray(values[key], dtype=np.float32), name=name
            )
    for node in model.graph.all_nodes():
        out_name = node.outputs[0].name if node.outputs else None
        if node.op_type == "Constant" and out_name is not None and out_name in values:
            attr = node.attributes.get("value")
            old_name = attr.as_tensor().name if attr is not None else None
            tensor = ir.Tensor(np.ascontiguousarray(values[out_name], dtype=np.float32), name=old_name)
            node.attributes["value"] = ir.AttrTensor("value", tensor)


def _fidelity_dict(loss: float, agreement: float | None, rows: int, where: str) -> dict[str, Any]:
    return {"loss": loss, "top1_agreement": agreement, "rows": rows, "rows_from": where}


def distill(model: ir.Model, config: DistillConfig, context: TechniqueContext) -> TechniqueResult:
    """Train ``model`` (the student) to match ``config.teacher`` on ``config.data``.

    Raises:
        ConfigError: Flags that contradict the models or data.
        UnsupportedModelError: Models that cannot be distilled (no shared output, an op on the
            gradient path without a rule, ...).
    """
    model = model.clone()
    teacher, data = config.loaded()
    student_inputs = _check_inputs(model, teacher, data)
    shared = _float_outputs(model, teacher)
    teacher_features = [t for _, t in config.pairs]
    produced = {v.name for node in model.graph for v in node.outputs} | {v.name for v in model.graph.inputs}
    for s, _ in config.pairs:
        if s not in produced:
            raise ConfigError(f"--match: the student has no tensor named '{s}'")
    session = _teacher_session(teacher, teacher_features, context.runtime)
    fixed = _fixed_batch(model, data)
    batch_size = fixed if fixed is not None else (config.batch_size if data.batched else 1)
    rows = _usable_rows(data.rows, fixed)
    names = list(dict.fromkeys([*shared, *teacher_features]))
    with teacher_targets(
        session,
        names,
        data,
        rows=rows,
        chunk=fixed if fixed is not None else max(batch_size, 64),
        pad_to=fixed,
        declared=_declared_axes(teacher, names),
        folder=io.temporary_folder if _CACHE_TEACHER else None,
        progress=lambda done, total: context.progress("distilling · running the teacher", done, total),
    ) as targets:
        return _train(
            model, config, context, teacher, data, targets, shared, student_inputs, fixed, batch_size, rows
        )


# The teacher's outputs are computed once into a temporary file (False: per batch); see .targets.
_CACHE_TEACHER = True


def _train(
    model: ir.Model,
    config: DistillConfig,
    context: TechniqueContext,
    teacher: Teacher,
    data: TrainingData,
    targets: TeacherTargets,
    shared: Sequence[str],
    student_inputs: Sequence[str],
    fixed: int | None,
    batch_size: int,
    rows: int,
) -> TechniqueResult:
    sample = targets.sample
    plan, class_outputs = _plan_outputs(config, model, {k: sample[k] for k in shared}, targets.axes)
    labels_spec: tuple[str, int, str | None, tuple[int | str, ...]] | None = None
    labels_axis = 0
    if data.labels is not None:
        if not class_outputs:
            raise ConfigError("--labels: no student output looks like class scores to apply labels to")
        out = class_outputs[0]
        classes = sample[out].shape[-1]
        if data.labels.min() < 0 or data.labels.max() >= classes:
            raise DataError(
                f"--labels {data.labels_name}: values must be in [0, {classes}) for output '{out}'"
            )
        labels_axis = targets.axes[out] or 0
        label_dims: tuple[int | str, ...] = ("batch", *[int(d) for d in data.labels.shape[1:]])
        label_dims = (*label_dims[1 : labels_axis + 1], "batch", *label_dims[labels_axis + 1 :])
        labels_spec = (out, int(classes), None, label_dims)
    spec = TargetSpec(
        outputs=plan,
        temperature=config.temperature,
        labels=labels_spec,
        alpha=config.label_weight,
        matches=tuple((s, _dims_with_batch(sample[t], targets.axes[t])) for s, t in config.pairs),
    )
    pinned, sizes = _pinned_to_rows(model, data, student_inputs)
    student = prepare_student(pinned, train=config.train, bn_mode=config.bn_mode)
    if not student.params:
        raise ConfigError(
            f"--train {config.train}: no trainable weight (float32, non-scalar) matches"
            if config.train != "all"
            else "the student has no trainable float32 weight"
        )
    optimizer = OptimizerSpec(
        kind=config.optimizer, weight_decay=config.weight_decay, momentum=config.momentum
    )
    models = build_step(student, spec, optimizer, bn_mode=config.bn_mode, keep_zeros=config.keep_zeros)

    rng = np.random.default_rng(context.seed)
    order = rng.permutation(rows)
    n_val = round(rows * config.val_split) if config.val_split > 0 else 0
    if fixed is not None and n_val:  # whole batches only
        n_val = min(max(fixed, round(n_val / fixed) * fixed), rows - fixed)
    val_rows, train_rows = np.sort(order[:n_val]), np.sort(order[n_val:])
    labels = data.labels
    features = dict(config.pairs)

    def feeder(batch: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        inputs = data.batch(batch)
        outputs = targets.get(batch, inputs)
        data.release()
        _check_sizes(inputs, sizes)
        feed = {k: inputs[k] for k in student_inputs}
        feed.update({name: outputs[out] for out, name in models.target_inputs.items()})
        feed.update({name: outputs[features[s]] for s, name in models.match_inputs.items()})
        if models.labels_input is not None and labels is not None:
            feed[models.labels_input] = np.moveaxis(labels[batch], 0, labels_axis)
        return feed, {o: outputs[o] for o in class_outputs}

    settings = LoopSettings(
        epochs=config.epochs,
        batch_size=batch_size,
        lr=config.lr,
        schedule=config.schedule,
        patience=config.patience,
        fixed_batch=fixed is not None,
        by_loss=config.label_weight >= 1.0,
    )
    eval_session = Session(models.eval.SerializeToString(), context.runtime, label="distill validation")
    check_rows = val_rows if len(val_rows) else train_rows
    where = "validation split" if len(val_rows) else "training rows (no --val-split)"
    check_batches = plan_batches(check_rows, data.groups, batch_size, drop_last=fixed is not None)
    checked = int(sum(len(b) for b in check_batches))
    frozen_values = {p.name: p.value for p in models.untrained}
    before = evaluate(
        eval_session,
        models,
        feeder,
        {**{p.name: p.value for p in models.params}, **frozen_values},
        student.buffers,
        check_batches,
        class_outputs,
    )
    result = train(
        models,
        feeder=feeder,
        groups=data.groups,
        buffers=student.buffers,
        train_rows=train_rows,
        val_batches=plan_batches(val_rows, data.groups, batch_size, drop_last=fixed is not None),
        settings=settings,
        class_outputs=class_outputs,
        runtime=context.runtime,
        seed=context.seed,
        progress=context.progress,
    )
    after = evaluate(
        eval_session,
        models,
        feeder,
        {**result.params, **frozen_values},
        result.buffers,
        check_batches,
        class_outputs,
    )
    _write_back(model, {**result.params, **result.buffers})
    if fixed is not None and fixed != config.batch_size:
        student.notes.append(
            f"the student's batch dimension is fixed at {fixed}: trained with batches of {fixed}, "
            f"not --batch-size {config.batch_size}"
        )
    if not data.batched:
        student.notes.append("no input has a batch axis: every row was fed on its own (batches of 1)")
    student.notes.append(f"batched: {data.batching_text()}")
    if sizes:
        shown = "; ".join(
            f"{k} [{', '.join('batch' if d is None else str(d) for d in v)}]" for k, v in sizes.items()
        )
        student.notes.append(
            f"trained at the size of the --data rows ({shown}); the written model keeps its declared dims"
        )
    return _result(
        model,
        config,
        student,
        models,
        result,
        before,
        after,
        where,
        checked,
        len(train_rows),
        class_outputs,
        plan,
        targets,
    )


def _usable_rows(rows: int, fixed: int | None) -> int:
    if fixed is None:
        return rows
    return rows - rows % fixed


def _result(
    model: ir.Model,
    config: DistillConfig,
    student: Any,
    models: Any,
    result: Any,
    before: tuple[float, float | None],
    after: tuple[float, float | None],
    where: str,
    check_count: int,
    train_count: int,
    class_outputs: Sequence[str],
    plan: Sequence[tuple[str, str, str | None, Any]],
    targets: TeacherTargets,
) -> TechniqueResult:
    changed = []
    for p in models.params:
        new = result.params[p.name]
        if np.array_equal(new, p.value):
            continue
        delta = float(np.linalg.norm(new - p.value) / max(float(np.linalg.norm(p.value)), 1e-12))
        changed.append(
            Change(
                p.consumer,
                p.op_type,
                f"trained {p.name}",
                p.value.size,
                p.value.size,
                {"weight": p.name, "relative_change": delta},
            )
        )
    for name in student.buffers:
        if np.array_equal(result.buffers[name], student.buffers[name]):
            continue
        changed.append(
            Change(name, "BatchNormalization", f"running statistics {name} updated", 0, 0, {"weight": name})
        )
    skipped = [Skip(cname, op, f"{name}: {reason}") for name, cname, op, reason in student.frozen]
    skipped += [
        Skip(p.consumer, p.op_type, f"{p.name}: no gradient reaches it from the loss")
        for p in models.untrained
    ]
    notes = list(student.notes)
    b_loss, b_agree = before
    a_loss, a_agree = after
    # KL and MSE are never negative: float rounding makes a KL of identical outputs -4e-08
    b_loss, a_loss = max(b_loss, 0.0), max(a_loss, 0.0)
    if result.best_epoch == 0:
        notes.append(
            "no epoch did better on the validation rows than the student as it came: its weights "
            "are kept unchanged (try another --lr, more --epochs or more data)"
        )
    if b_agree is not None and a_agree is not None:
        notes.append(
            f"top-1 agreement with the teacher on {check_count} {where}: {b_agree:.1%} before, "
            f"{a_agree:.1%} after (best epoch {result.best_epoch} of {len(result.history)})"
        )
    notes.append(
        f"distillation loss against the teacher on {check_count} {where}: {b_loss:.4g} before, {a_loss:.4g} after"
    )
    notes.append(
        "the fidelity table above compares the result with the student before training, not with the teacher"
    )
    if result.stopped_early:
        notes.append(f"stopped early after epoch {len(result.history)} (--patience {config.patience})")
    data = config.loaded()[1]
    details = {
        "teacher": config.loaded()[0].label,
        "data": {
            "source": data.source,
            "rows": data.rows,
            "train_rows": train_count,
            "check_rows": check_count,
            "check_rows_from": where,
            "batching": data.describe(),
            "groups": len(data.group_values),
            "teacher_outputs": "computed once, kept in a temporary file"
            if targets.cached
            else "computed per batch",
        },
        "losses": [{"output": o, "loss": k} for o, k, *_ in plan],
        "class_outputs": list(class_outputs),
        "teacher_fidelity": {
            "before": _fidelity_dict(b_loss, b_agree, check_count, where),
            "after": _fidelity_dict(a_loss, a_agree, check_count, where),
        },
        "history": [
            {
                "epoch": h.epoch,
                "train_loss": h.train_loss,
                "val_loss": h.val_loss,
                "val_top1_agreement": h.val_agreement,
                "lr": h.lr,
            }
            for h in result.history
        ],
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "steps": result.steps,
        "trained_weights": len(models.params),
        "trained_params": int(sum(p.value.size for p in models.params)),
    }
    judged = Judged(
        against=f"the teacher {config.loaded()[0].label}", agreement=a_agree, rows=check_count, where=where
    )
    return TechniqueResult(model, tuple(changed), tuple(skipped), tuple(notes), details, judged=judged)
