"""What distillation trains with: the teacher model, the training rows, and ``--labels``.

These are loaded by the API (:mod:`.loading`) from the files the config names; the technique
itself opens no file: the training rows are a :class:`modelshrink.dataset.Dataset`, which reads
``--data`` batch by batch.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from modelshrink.dataset import Dataset, dataset_from_feeds
from modelshrink.errors import DataError
from modelshrink.feeds import Feeds

__all__ = ["Teacher", "TrainingData", "read_labels", "training_data_from_feeds"]


class Teacher:
    """The teacher model (loaded by the CLI). ``deepcopy`` returns it as is and ``str`` is a
    short label, so the report can list the configuration without copying a model."""

    def __init__(self, model: ir.Model, label: str) -> None:
        self.model = model
        self.label = label

    def __deepcopy__(self, memo: dict[int, Any]) -> Teacher:
        return self

    def __repr__(self) -> str:
        return self.label


TrainingData = Dataset
"""The training rows: a :class:`modelshrink.dataset.Dataset` (read batch by batch)."""


def training_data_from_feeds(
    feeds: Feeds, *, labels: np.ndarray | None = None, labels_name: str | None = None
) -> TrainingData:
    """Training rows from feeds in memory (each feed one row or one batch along its inputs'
    batch axes)."""
    return dataset_from_feeds(feeds, labels=labels, labels_name=labels_name)


def read_labels(data: str, name: str) -> np.ndarray:
    """The array ``name`` of an ``.npz`` file, or ``name.npy`` in a data folder.

    Raises:
        DataError: The file or array is missing or unreadable.
    """
    path = Path(data)
    try:
        if path.is_dir():
            file = path / f"{name}.npy"
            if not file.exists():
                raise DataError(f"--labels {name}: no {name}.npy in --data folder {data}")
            return np.load(file, allow_pickle=False)
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                if name not in npz.files:
                    raise DataError(
                        f"--labels {name}: --data {data} has no array '{name}' (it has: {', '.join(npz.files)})"
                    )
                return npz[name]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"--labels {name}: cannot read it from --data {data} ({exc})") from exc
    raise DataError(f"--labels {name}: labels are read from an .npz file or a folder of .npy files")
