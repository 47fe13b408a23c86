"""The training loop: batches, schedule, validation, best epoch, early stopping.

The step model does all the arithmetic; this loop only feeds it: for each batch it passes the
inputs, the teacher's targets for those rows (both from a :data:`Feeder`, which reads them
from disk batch by batch), the current parameters and optimizer state, the learning rate of
this step and the step number, and keeps what comes back. Shuffling is by row index with
``numpy.random.default_rng(seed)``; rows of different groups (different values of an input
without a batch axis) are never batched together, and with several groups the batches are
shuffled too. The same flags give the same weights, byte for byte (onnxruntime's CPU kernels
are deterministic for a fixed thread count).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from modelshrink.runtime import RuntimeOptions, Session
from modelshrink.techniques.base import Progress
from modelshrink.techniques.distill.step import StepModels

__all__ = [
    "EpochRecord",
    "Feeder",
    "LoopSettings",
    "TrainResult",
    "evaluate",
    "lr_at",
    "plan_batches",
    "train",
]

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
    # With labels alone (--alpha 1) the teacher is not learned from: its agreement says nothing
    # about which epoch is best, the loss does.
    by_loss: bool = False


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


Feeder = Callable[[np.ndarray], tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]
"""``rows -> (feed, teacher)``: what the step or eval model is fed for these rows besides the
parameters (inputs, teacher targets, features, labels), and the teacher's class-like outputs
(for top-1 agreement)."""


def _cut(rows: np.ndarray, size: int, *, drop_last: bool) -> list[np.ndarray]:
    count = len(rows) // size if drop_last else -(-len(rows) // size)
    return [rows[i * size : (i + 1) * size] for i in range(count)]


def plan_batches(
    rows: np.ndarray,
    groups: np.ndarray,
    size: int,
    *,
    drop_last: bool,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """``rows`` (in their order) cut into batches of ``size`` that never mix groups.

    ``groups[r]`` is row ``r``'s group. With one group this is plain consecutive cutting; with
    several, each group is cut on its own (in order of first appearance) and, given ``rng``, the
    batches are shuffled so training alternates between groups.
    """
    members = groups[rows]
    kinds = list(dict.fromkeys(members.tolist()))
    if len(kinds) <= 1:
        return _cut(rows, size, drop_last=drop_last)
    batches = [b for g in kinds for b in _cut(rows[members == g], size, drop_last=drop_last)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def evaluate(
    session: Session,
    models: StepModels,
    feeder: Feeder,
    params: Mapping[str, np.ndarray],
    buffers: Mapping[str, np.ndarray],
    batches: Sequence[np.ndarray],
    class_outputs: Sequence[str],
) -> tuple[float, float | None]:
    """Mean loss and top-1 agreement with the teacher (class-like outputs) over ``batches``."""
    total, count, agree, seen = 0.0, 0, 0, 0
    for batch in batches:
        feed, teacher = feeder(batch)
        feed.update(params)
        feed.update(buffers)
        outs = session.run(feed, models.eval_outputs)
        total += float(outs[0]) * len(batch)
        count += len(batch)
        by_name = dict(zip(models.eval_outputs[1:], outs[1:], strict=True))
        for name in class_outputs:
            s = np.argmax(by_name[name].reshape(-1, by_name[name].shape[-1]), axis=-1)
            t = np.argmax(teacher[name].reshape(-1, teacher[name].shape[-1]), axis=-1)
            agree += int((s == t).sum())
            seen += s.size
    return total / max(count, 1), (agree / seen if seen else None)


def _score(agreement: float | None, loss: float, settings: LoopSettings) -> tuple[float, float]:
    """An epoch's rank (lower is better): top-1 agreement with the teacher first, then the loss;
    the loss alone when only the labels are learned from."""
    if settings.by_loss or agreement is None:
        return (0.0, loss)
    return (-agreement, loss)


def train(
    models: StepModels,
    *,
    feeder: Feeder,
    groups: np.ndarray,
    buffers: Mapping[str, np.ndarray],
    train_rows: np.ndarray,
    val_batches: Sequence[np.ndarray],
    settings: LoopSettings,
    class_outputs: Sequence[str],
    runtime: RuntimeOptions,
    seed: int,
    progress: Progress,
) -> TrainResult:
    """Run the epochs; keep the parameters of the best validation epoch (the last without one).

    ``groups[r]`` is row ``r``'s group (a batch never mixes groups); ``val_batches`` are the
    validation rows, already cut into batches.
    """
    step_session = Session(models.step.SerializeToString(), runtime, label="distill train step")
    eval_session = (
        Session(models.eval.SerializeToString(), runtime, label="distill validation") if val_batches else None
    )
    rng = np.random.default_rng(seed)
    flat = models.initial_flat()
    state = {s: np.zeros_like(flat) for s in models.flat.state_in}
    bufs = {k: np.array(v, dtype=np.float32) for k, v in buffers.items()}
    frozen = {p.name: p.value for p in models.untrained}
    out_names = [models.loss, models.flat.param_out, *models.flat.state_out, *models.buffer_outputs.values()]
    per_epoch = len(plan_batches(train_rows, groups, settings.batch_size, drop_last=settings.fixed_batch))
    total_steps = per_epoch * settings.epochs
    history: list[EpochRecord] = []
    best: tuple[float, float] | None = None
    best_epoch = 0
    best_flat, best_bufs = flat, dict(bufs)
    since_best = 0
    step = 0
    stopped = False
    val_text = ""

    def validate() -> tuple[float, float | None]:
        """Loss and agreement of the current weights on the validation batches."""
        assert eval_session is not None
        return evaluate(
            eval_session,
            models,
            feeder,
            {**models.unflatten(flat), **frozen},
            bufs,
            val_batches,
            class_outputs,
        )

    if eval_session is not None:  # epoch 0: the student as it came is a candidate too
        loss0, agree0 = validate()
        best = _score(agree0, loss0, settings)
    for epoch in range(1, settings.epochs + 1):
        order = rng.permutation(train_rows) if settings.shuffle else train_rows
        losses = []
        lr = settings.lr
        started, seen = time.perf_counter(), 0
        for batch in plan_batches(
            order,
            groups,
            settings.batch_size,
            drop_last=settings.fixed_batch,
            rng=rng if settings.shuffle else None,
        ):
            lr = lr_at(settings, step, total_steps)
            step += 1
            feed: dict[str, Any] = feeder(batch)[0]
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
            seen += len(batch)
            rate = seen / max(time.perf_counter() - started, 1e-9)
            progress(
                f"distilling · epoch {epoch}/{settings.epochs} · loss {np.mean(losses):.4g} · "
                f"{rate:,.0f} rows/s{val_text}",
                step,
                total_steps,
            )
        val_loss = val_agree = None
        if eval_session is not None:
            val_loss, val_agree = validate()
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
        score = _score(val_agree, val_loss, settings)
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
