"""The training loop: batches, schedule, validation, best epoch, early stopping.

The step model does all the arithmetic; this loop only feeds it: for each batch it passes the
inputs, the teacher's targets for those rows, the current parameters and optimizer state, the
learning rate of this step and the step number, and keeps what comes back. Shuffling uses
``numpy.random.default_rng(seed)``, so the same flags give the same weights, byte for byte
(onnxruntime's CPU kernels are deterministic for a fixed thread count).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from modelshrink.runtime import RuntimeOptions, Session
from modelshrink.techniques.base import Progress
from modelshrink.techniques.distill.step import StepModels

__all__ = ["EpochRecord", "LoopSettings", "TrainResult", "evaluate", "lr_at", "train"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs from the config."""

    epochs: int
    batch_size: int
    lr: float
    schedule: Literal["cosine", "constant"]
    patience: int | None
    shuffle: bool = True
    fixed_batch: bool = False


@dataclass(frozen=True)
class EpochRecord:
    """One epoch: mean training loss, validation loss and top-1 agreement with the teacher."""

    epoch: int
    train_loss: float
    val_loss: float | None
    val_agreement: float | None
    lr: float


@dataclass
class TrainResult:
    """Trained values and the history."""

    params: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray]
    history: list[EpochRecord]
    best_epoch: int
    stopped_early: bool
    steps: int
    extra: dict[str, Any] = field(default_factory=dict)


def lr_at(settings: LoopSettings, step: int, total: int) -> float:
    """Learning rate for 0-based ``step`` of ``total``: constant, or cosine decay to 0."""
    if settings.schedule == "constant" or total <= 1:
        return settings.lr
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


def _batches(rows: np.ndarray, size: int, *, drop_last: bool) -> list[np.ndarray]:
    count = len(rows) // size if drop_last else -(-len(rows) // size)
    return [rows[i * size : (i + 1) * size] for i in range(count)]


def _feed(
    arrays: Mapping[str, np.ndarray], names: Mapping[str, str], rows: np.ndarray
) -> dict[str, np.ndarray]:
    return {name: arrays[key][rows] for key, name in names.items()}


def evaluate(
    session: Session,
    models: StepModels,
    inputs: Mapping[str, np.ndarray],
    targets: Mapping[str, np.ndarray],
    labels: np.ndarray | None,
    features: Mapping[str, np.ndarray],
    params: Mapping[str, np.ndarray],
    buffers: Mapping[str, np.ndarray],
    rows: np.ndarray,
    batch_size: int,
    class_outputs: Sequence[str],
) -> tuple[float, float | None]:
    """Mean loss and top-1 agreement with the teacher (class-like outputs) over ``rows``."""
    total, count, agree, seen = 0.0, 0, 0, 0
    for batch in _batches(rows, batch_size, drop_last=False):
        feed = {k: v[batch] for k, v in inputs.items()}
        feed.update(_feed(targets, models.target_inputs, batch))
        feed.update(_feed(features, models.match_inputs, batch))
        if models.labels_input is not None and labels is not None:
            feed[models.labels_input] = labels[batch]
        feed.update(params)
        feed.update(buffers)
        outs = session.run(feed, models.eval_outputs)
        total += float(outs[0]) * len(batch)
        count += len(batch)
        by_name = dict(zip(models.eval_outputs[1:], outs[1:], strict=True))
        for name in class_outputs:
            s = np.argmax(by_name[name].reshape(-1, by_name[name].shape[-1]), axis=-1)
            t = np.argmax(targets[name][batch].reshape(-1, targets[name].shape[-1]), axis=-1)
            agree += int((s == t).sum())
            seen += s.size
    return total / max(count, 1), (agree / seen if seen else None)


def train(
    models: StepModels,
    *,
    inputs: Mapping[str, np.ndarray],
    targets: Mapping[str, np.ndarray],
    labels: np.ndarray | None,
    features: Mapping[str, np.ndarray],
    buffers: Mapping[str, np.ndarray],
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    settings: LoopSettings,
    class_outputs: Sequence[str],
    runtime: RuntimeOptions,
    seed: int,
    progress: Progress,
) -> TrainResult:
    """Run the epochs; keep the parameters of the best validation epoch (the last without one)."""
    step_session = Session(models.step.SerializeToString(), runtime, label="distill train step")
    eval_session = (
        Session(models.eval.SerializeToString(), runtime, label="distill validation")
        if len(val_rows)
        else None
    )
    rng = np.random.default_rng(seed)
    flat = models.initial_flat()
    state = {s: np.zeros_like(flat) for s in models.flat.state_in}
    bufs = {k: np.array(v, dtype=np.float32) for k, v in buffers.items()}
    frozen = {p.name: p.value for p in models.untrained}
    out_names = [models.loss, models.flat.param_out, *models.flat.state_out, *models.buffer_outputs.values()]
    per_epoch = len(_batches(train_rows, settings.batch_size, drop_last=settings.fixed_batch))
    total_steps = per_epoch * settings.epochs
    history: list[EpochRecord] = []
    best: tuple[float, float] | None = None
    best_epoch = 0
    best_flat, best_bufs = flat, dict(bufs)
    since_best = 0
    step = 0
    stopped = False
    val_text = ""
    if eval_session is not None:  # epoch 0: the student as it came is a candidate too
        loss0, agree0 = evaluate(
            eval_session,
            models,
            inputs,
            targets,
            labels,
            features,
            {**models.unflatten(flat), **frozen},
            bufs,
            val_rows,
            settings.batch_size,
            class_outputs,
        )
        best = (-(agree0 if agree0 is not None else 0.0), loss0)
    for epoch in range(1, settings.epochs + 1):
        order = rng.permutation(train_rows) if settings.shuffle else train_rows
        losses = []
        lr = settings.lr
        for batch in _batches(order, settings.batch_size, drop_last=settings.fixed_batch):
            lr = lr_at(settings, step, total_steps)
            step += 1
            feed: dict[str, Any] = {k: v[batch] for k, v in inputs.items()}
            feed.update(_feed(targets, models.target_inputs, batch))
            feed.update(_feed(features, models.match_inputs, batch))
            if models.labels_input is not None and labels is not None:
                feed[models.labels_input] = labels[batch]
            feed[models.flat.param] = flat
            feed.update(state)
            feed.update(bufs)
            feed.update(frozen)
            feed[models.lr] = np.asarray(lr, dtype=np.float32)
            feed[models.step_input] = np.asarray(step, dtype=np.float32)
            outs = step_session.run(feed, out_names)
            loss = float(outs[0])
            if not math.isfinite(loss):
                raise _diverged(epoch, step, settings.lr)
            losses.append(loss)
            flat = outs[1]
            i = 2
            for s in models.flat.state_in:
                state[s] = outs[i]
                i += 1
            for buf in models.buffer_outputs:
                bufs[buf] = outs[i]
                i += 1
            progress(
                f"distilling · epoch {epoch}/{settings.epochs} · loss {np.mean(losses):.4g}{val_text}",
                step,
                total_steps,
            )
        val_loss = val_agree = None
        if eval_session is not None:
            val_loss, val_agree = evaluate(
                eval_session,
                models,
                inputs,
                targets,
                labels,
                features,
                {**models.unflatten(flat), **frozen},
                bufs,
                val_rows,
                settings.batch_size,
                class_outputs,
            )
            val_text = f" · val loss {val_loss:.4g}" + (
                f" · agreement {val_agree:.1%}" if val_agree is not None else ""
            )
        history.append(
            EpochRecord(epoch, float(np.mean(losses)) if losses else math.nan, val_loss, val_agree, lr)
        )
        logger.info("epoch %s: train loss %s%s", epoch, history[-1].train_loss, val_text)
        if val_loss is None:
            best_epoch, best_flat, best_bufs = epoch, flat, dict(bufs)
            continue
        score = (-(val_agree if val_agree is not None else 0.0), val_loss)
        if best is None or score < best:
            best, best_epoch, best_flat, best_bufs = score, epoch, flat, dict(bufs)
            since_best = 0
        else:
            since_best += 1
            if settings.patience is not None and since_best >= settings.patience:
                stopped = epoch < settings.epochs
                break
    progress(f"distilling · done, best epoch {best_epoch}{val_text}", total_steps, total_steps)
    return TrainResult(models.unflatten(best_flat), best_bufs, history, best_epoch, stopped, step)


def _diverged(epoch: int, step: int, lr: float) -> Exception:
    from modelshrink.errors import ModelshrinkError

    return ModelshrinkError(
        f"training diverged: the loss became non-finite at epoch {epoch}, step {step}; "
        f"lower --lr (now {lr:g})"
    )
