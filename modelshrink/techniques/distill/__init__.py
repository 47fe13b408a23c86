"""``distill``: train a student to reproduce a teacher on stock onnxruntime (see :mod:`.technique`).

:mod:`.grad`, :mod:`.autodiff` and :mod:`.rules` differentiate ONNX graphs (the default rule set
is :data:`.rules.RULES`); :mod:`.losses`, :mod:`.optim` and :mod:`.step` build the train-step
model; :mod:`.trainer` runs it; :mod:`.loading` loads the teacher and data a config names.

This front imports nothing heavy: the config, its flags and the spec; the technique and the
data objects are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from modelshrink.techniques.distill.config import PANEL, DistillConfig
from modelshrink.techniques.spec import TechniqueSpec

if TYPE_CHECKING:
    from modelshrink.techniques.distill.data import (
        Teacher,
        TrainingData,
        read_labels,
        training_data_from_feeds,
    )
    from modelshrink.techniques.distill.technique import distill

__all__ = [
    "PANEL",
    "SPEC",
    "DistillConfig",
    "Teacher",
    "TrainingData",
    "distill",
    "read_labels",
    "training_data_from_feeds",
]

SPEC = TechniqueSpec(
    name="distill",
    config=DistillConfig,
    entry="modelshrink.techniques.distill.technique:distill",
    help="""Train the student (SRC) to reproduce --teacher on --data; the training step runs on onnxruntime.

The student is usually a compressed copy of the teacher (pruned or factorized): distillation wins
back what compression cost. The training step (forward, backward, optimizer update) is itself an
ONNX graph, so no PyTorch is needed.""",
    examples=(
        "modelshrink distill pruned.onnx --teacher model.onnx --data train.npz -o recovered.onnx",
        "modelshrink distill small.onnx --teacher model.onnx --data train.npz -o out.onnx --epochs 30 --labels labels",
    ),
    prepare="modelshrink.techniques.distill.loading:load_distill_data",
)

_LAZY = {
    "distill": "modelshrink.techniques.distill.technique",
    "Teacher": "modelshrink.techniques.distill.data",
    "TrainingData": "modelshrink.techniques.distill.data",
    "read_labels": "modelshrink.techniques.distill.data",
    "training_data_from_feeds": "modelshrink.techniques.distill.data",
}


def __getattr__(name: str) -> Any:
    home = _LAZY.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
