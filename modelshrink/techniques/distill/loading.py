"""Load what a :class:`DistillConfig` names: the teacher model, and ``--data`` opened for reading
batch by batch (:func:`modelshrink.dataset.open_run_dataset`; nothing is loaded whole).

Called by the API before the run (the technique reads no files). Also the errors a user can
act on before any work: no ``--data``, a teacher from stdin.
"""

from __future__ import annotations

import dataclasses

from modelshrink import io
from modelshrink.dataset import open_run_dataset
from modelshrink.errors import ConfigError
from modelshrink.options import RunOptions
from modelshrink.techniques.distill.config import DistillConfig
from modelshrink.techniques.distill.data import Teacher

__all__ = ["load_distill_data"]


def load_distill_data(config: DistillConfig, source: str, options: RunOptions) -> DistillConfig:
    """``config`` with ``teacher_model`` and ``training`` loaded (left as given when set).

    Raises:
        ConfigError: No ``--data``, or the teacher from stdin.
        ModelshrinkError: An unreadable teacher or data file.
    """
    if config.teacher_model is not None and config.training is not None:
        return config
    if options.data is None:
        raise ConfigError(
            "distill needs --data: the student learns to copy the teacher on these inputs, so "
            "they must be representative of what the model will see; random inputs would "
            "teach it nothing useful"
        )
    if config.teacher == io.STDIO:
        raise ConfigError("--teacher must be a path (stdin is for the student, if anything)")
    loaded = io.load_model(config.teacher)
    training = open_run_dataset(loaded.model, options, labels=config.labels)
    return dataclasses.replace(config, teacher_model=Teacher(loaded.model, loaded.label), training=training)
