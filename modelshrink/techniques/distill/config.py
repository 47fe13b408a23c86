"""``DistillConfig``: every flag of ``modelshrink distill``, validated once.

The teacher and the training rows are named here (paths) and loaded by the API
(:mod:`.loading`) into ``teacher_model`` and ``training``; the technique reads no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from modelshrink.errors import ConfigError
from modelshrink.flags import flag

if TYPE_CHECKING:
    from modelshrink.techniques.distill.data import Teacher, TrainingData

__all__ = ["PANEL", "DistillConfig"]

PANEL = "Distillation"
LossChoice = Literal["auto", "kl", "mse"]
Optimizer = Literal["adamw", "sgd"]
Schedule = Literal["cosine", "constant"]
BnMode = Literal["frozen", "train"]


@dataclass(frozen=True)
class DistillConfig:
    """Settings of ``modelshrink distill``.

    Attributes:
        teacher: The teacher model's path.
        loss: ``auto`` (KL for class-like outputs, MSE otherwise), ``kl`` or ``mse``.
        temperature: Softening temperature of the KL loss (``--temperature``).
        labels: Name of the array in ``--data`` holding integer class labels, or None.
        alpha: Weight of the cross-entropy with labels (default 0.5 when labels are given).
        matches: ``STUDENT_TENSOR=TEACHER_TENSOR`` pairs for feature matching.
        optimizer: ``adamw`` or ``sgd`` (with momentum).
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay (AdamW) or L2 (SGD), on rank >= 2 weights.
        momentum: SGD momentum.
        schedule: ``cosine`` (decay to 0 over all steps) or ``constant``.
        epochs: Passes over the training rows.
        batch_size: Rows per step.
        train: ``all`` or a glob on weight names; the rest stays frozen.
        bn_mode: ``frozen`` (running statistics, eval behaviour) or ``train`` (batch statistics,
            running statistics updated).
        val_split: Share of rows held out for validation (0 disables it).
        patience: Stop after this many epochs without a better validation score (None: never).
        keep_zeros: Weights that are exactly zero stay zero (keeps pruned models pruned).
        teacher_model: The loaded teacher (the API loads it from ``teacher``).
        training: The loaded training rows and labels (the API loads them from ``--data``).
    """

    teacher: str = flag(help="The teacher model (.onnx path).", panel=PANEL, show_default=False)
    loss: LossChoice = flag("auto", "auto (KL for class scores, MSE otherwise), kl or mse.", panel=PANEL)
    temperature: float = flag(2.0, "Softening temperature of the KL loss (scaled by T²).", panel=PANEL)
    labels: str | None = flag(
        None,
        "Array in --data holding integer class labels (adds cross-entropy).",
        panel=PANEL,
        show_default=False,
    )
    alpha: float | None = flag(
        None, "Weight of the label loss, 0..1 (default 0.5 with --labels).", panel=PANEL, show_default=False
    )
    matches: tuple[str, ...] = flag(
        (),
        "Feature matching STUDENT_TENSOR=TEACHER_TENSOR (repeatable).",
        names=("--match",),
        panel=PANEL,
        show_default=False,
    )
    optimizer: Optimizer = flag("adamw", "adamw or sgd (with momentum).", panel=PANEL)
    lr: float = flag(1e-3, "Peak learning rate.", panel=PANEL)
    weight_decay: float = flag(0.01, "Weight decay on matrices/kernels.", panel=PANEL)
    momentum: float = flag(0.9, "SGD momentum.", panel=PANEL)
    schedule: Schedule = flag("cosine", "cosine or constant learning rate.", panel=PANEL)
    epochs: int = flag(10, "Passes over the training rows.", panel=PANEL)
    batch_size: int = flag(32, "Rows per training step.", panel=PANEL)
    train: str = flag("all", "'all' or a glob on weight names to train; the rest stays frozen.", panel=PANEL)
    bn_mode: BnMode = flag(
        "frozen", "BatchNormalization: frozen (running stats) or train (batch stats).", panel=PANEL
    )
    val_split: float = flag(0.1, "Share of rows held out to pick the best epoch.", panel=PANEL)
    patience: int | None = flag(
        None, "Stop after N epochs without a better validation score.", panel=PANEL, show_default=False
    )
    keep_zeros: bool = flag(
        True,
        "Weights that are exactly zero stay zero (pruned models stay pruned).",
        negative="--no-keep-zeros",
        panel=PANEL,
    )
    teacher_model: Teacher | None = field(default=None, repr=False, compare=False)
    training: TrainingData | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        checks = [
            (self.loss in ("auto", "kl", "mse"), f"--loss must be auto, kl or mse, got {self.loss!r}"),
            (
                self.temperature > 0 and math.isfinite(self.temperature),
                f"--temperature must be > 0, got {self.temperature}",
            ),
            (self.alpha is None or 0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1], got {self.alpha}"),
            (
                self.alpha is None or self.labels is not None,
                "--alpha mixes in the label loss; it needs --labels NAME",
            ),
            (self.optimizer in ("adamw", "sgd"), f"--optimizer must be adamw or sgd, got {self.optimizer!r}"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0.0 <= self.momentum < 1.0, f"--momentum must be in [0, 1), got {self.momentum}"),
            (
                self.schedule in ("cosine", "constant"),
                f"--schedule must be cosine or constant, got {self.schedule!r}",
            ),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (bool(self.train), "--train needs 'all' or a glob pattern on weight names"),
            (self.bn_mode in ("frozen", "train"), f"--bn-mode must be frozen or train, got {self.bn_mode!r}"),
            (0.0 <= self.val_split < 1.0, f"--val-split must be in [0, 1), got {self.val_split}"),
            (self.patience is None or self.patience >= 1, f"--patience must be >= 1, got {self.patience}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for item in self.matches:
            student_tensor, sep, teacher_tensor = item.partition("=")
            if not sep or not student_tensor or not teacher_tensor:
                raise ConfigError(f"--match '{item}': expected STUDENT_TENSOR=TEACHER_TENSOR")
        if self.patience is not None and self.val_split == 0:
            raise ConfigError("--patience needs validation rows; set --val-split above 0")
        if self.training is None:
            return
        rows = self.training.rows
        if self.val_split > 0 and round(rows * self.val_split) < 1:
            raise ConfigError(
                f"--val-split {self.val_split}: {rows} rows leave no validation row; "
                "use more data or --val-split 0"
            )
        if self.val_split > 0 and rows - round(rows * self.val_split) < 1:
            raise ConfigError(f"--val-split {self.val_split} leaves no training row")

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """``matches`` as ``(student tensor, teacher tensor)`` pairs."""
        return tuple((s, t) for s, _, t in (m.partition("=") for m in self.matches))

    def loaded(self) -> tuple[Teacher, TrainingData]:
        """The loaded teacher and training rows.

        Raises:
            ConfigError: They were not loaded (the API loads them; see :mod:`.loading`).
        """
        if self.teacher_model is None or self.training is None:
            raise ConfigError(
                "distill needs its teacher and training rows loaded: run it through modelshrink.api "
                "(or the CLI), which loads --teacher and --data into DistillConfig"
            )
        return self.teacher_model, self.training

    @property
    def label_weight(self) -> float:
        """Weight of the label loss."""
        if self.training is None or self.training.labels is None:
            return 0.0
        return 0.5 if self.alpha is None else self.alpha
