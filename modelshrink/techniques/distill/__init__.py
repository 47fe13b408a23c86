"""Knowledge distillation on stock onnxruntime: the train step is itself an ONNX graph.

``distill`` and ``DistillConfig`` are the technique (:mod:`.technique`); :mod:`.autodiff` and
:mod:`.rules` differentiate ONNX graphs; :mod:`.losses`, :mod:`.optim` and :mod:`.step` build
the train-step model; :mod:`.trainer` runs it.
"""

from __future__ import annotations

from modelshrink.techniques.distill.data import read_labels
from modelshrink.techniques.distill.technique import (
    DistillConfig,
    Teacher,
    TrainingData,
    distill,
    training_data_from_feeds,
)

__all__ = ["DistillConfig", "Teacher", "TrainingData", "distill", "read_labels", "training_data_from_feeds"]
