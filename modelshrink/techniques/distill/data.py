"""Reading ``--labels`` from the ``--data`` file: called by the CLI, never by the technique."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from modelshrink.errors import DataError

__all__ = ["read_labels"]


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
