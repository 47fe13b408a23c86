"""Load what ``--qat`` trains on: ``--data`` opened for reading batch by batch (the same
:func:`modelshrink.dataset.open_run_dataset` as ``distill``), and the teacher (or the model itself).

Called by the API before the run (the technique reads no files).
"""

from __future__ import annotations

import dataclasses

from modelshrink import io
from modelshrink.dataset import open_run_dataset
from modelshrink.errors import ConfigError
from modelshrink.options import RunOptions
from modelshrink.techniques.distill.data import Teacher
from modelshrink.techniques.quantize.config import QatData, QuantizeConfig

__all__ = ["load_qat_data"]


def load_qat_data(config: QuantizeConfig, source: str, options: RunOptions) -> QuantizeConfig:
    """``config`` with ``qat_data`` loaded when ``--qat`` is on (left as given otherwise).

    ``--data`` is read against the teacher's inputs, or the model's (``source``) when no
    teacher is given (then the input model is its own teacher).

    Raises:
        ConfigError: No data, or the model on stdin without a teacher.
    """
    if not config.qat or config.qat_data is not None:
        return config
    if options.data is None:
        raise ConfigError(
            "--qat needs --data: the quantized model is trained to copy the float model on these "
            "inputs, so they must be representative of what the model will see"
        )
    if config.teacher == io.STDIO:
        raise ConfigError("--teacher must be a path (stdin is for the model, if anything)")
    if config.teacher is None and source == io.STDIO:
        raise ConfigError(
            "--qat with the model on stdin needs --teacher PATH (the float model to copy): stdin "
            "cannot be read twice"
        )
    loaded = io.load_model(config.teacher if config.teacher is not None else source)
    training = open_run_dataset(loaded.model, options)
    teacher = Teacher(loaded.model, loaded.label) if config.teacher is not None else None
    return dataclasses.replace(config, qat_data=QatData(training, teacher))
