"""What distillation trains with: the teacher model, the training rows, and ``--labels``.

These are loaded by the API (:mod:`.loading`) from the files the config names; the technique
itself reads no files.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

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


class TrainingData:
    """Training inputs (batch-major arrays, one per model input) and optional labels.

    Like :class:`Teacher`, copies are the object itself and ``str`` is a summary.
    """

    def __init__(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        source: str,
        labels: np.ndarray | None = None,
        labels_name: str | None = None,
        warnings: Sequence[str] = (),
    ) -> None:
        rows = {len(v) for v in inputs.values()}
        if len(rows) != 1:
            raise DataError(f"--data {source}: inputs have different numbers of rows")
        self.inputs = dict(inputs)
        self.rows = rows.pop()
        if labels is not None and len(labels) != self.rows:
            raise DataError(
                f"--labels {labels_name}: {len(labels)} labels for {self.rows} input rows in {source}"
            )
        self.labels = labels
        self.labels_name = labels_name
        self.source = source
        self.warnings = tuple(warnings)

    def __deepcopy__(self, memo: dict[int, Any]) -> TrainingData:
        return self

    def __repr__(self) -> str:
        labels = f", labels '{self.labels_name}'" if self.labels_name else ""
        return f"{self.source}: {self.rows} rows{labels}"


def training_data_from_feeds(
    feeds: Feeds, *, labels: np.ndarray | None = None, labels_name: str | None = None
) -> TrainingData:
    """Join feeds (each a batch along axis 0) into one array per input."""
    if not feeds.samples:
        raise DataError(f"--data {feeds.source}: no samples")
    names = list(feeds.samples[0])
    arrays = {}
    for name in names:
        parts = [np.asarray(s[name]) for s in feeds.samples]
        if len({p.shape[1:] for p in parts}) != 1 or parts[0].ndim == 0:
            raise DataError(
                f"--data {feeds.source}: '{name}' has samples of different shapes; distillation "
                "batches rows along the first axis, so every row must have the same shape"
            )
        arrays[name] = np.concatenate(parts, axis=0)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu":
            raise DataError(f"--labels {labels_name}: labels must be integers, got {labels.dtype}")
        labels = labels.astype(np.int64)
    return TrainingData(
        arrays, source=feeds.source, labels=labels, labels_name=labels_name, warnings=feeds.warnings
    )


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
