"""Load what a :class:`DistillConfig` names: the teacher model and every row of ``--data``.

Called by the API before the run (the technique reads no files). Also the errors a user can
act on before any work: no ``--data``, a teacher from stdin.
"""

from __future__ import annotations

import dataclasses

from modelshrink import io
from modelshrink.errors import ConfigError
from modelshrink.feeds import load_feeds
from modelshrink.options import RunOptions
from modelshrink.techniques.distill.config import DistillConfig
from modelshrink.techniques.distill.data import Teacher, read_labels, training_data_from_feeds

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
    feeds = load_feeds(
        loaded.model, data=options.data, input_shapes=options.input_shapes, samples=1 << 62, rows=options.rows
    )
    labels = read_labels(options.data, config.labels) if config.labels else None
    return dataclasses.replace(
        config,
        teacher_model=Teacher(loaded.model, loaded.label),
        training=training_data_from_feeds(feeds, labels=labels, labels_name=config.labels),
    )
