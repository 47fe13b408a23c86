"""Model files in and out: the only layer that touches files and stdin/stdout bytes.

Callers use this front (``from modelshrink import io``; ``io.load_model(...)``); each concern
lives in its own module, and dependencies inside the package point one way (down this list):

- :mod:`~modelshrink.io.writing`: staging a model or a report beside its destination and
  committing them as one unit; the streamed writer for one-file models too large to
  serialize whole; serialized bytes for onnxruntime sessions.
- :mod:`~modelshrink.io.reading`: loading a model from a path or stdin, validated before any
  work (checker, UTF-8 names, opsets); naming every file behind the inputs.
- :mod:`~modelshrink.io.sparse`: sparse tensors, made dense when read and written back sparse
  where marked and smaller.
- :mod:`~modelshrink.io.external`: external data: references checked (inside the model's
  folder, long enough), files named, memory-mapped tensors brought into memory, byte counts.
- :mod:`~modelshrink.io.targets`: where a command writes: every path decided and checked
  before any work.
- :mod:`~modelshrink.io.staging`: staging folders, locks, atomic commits of several files,
  stale folders of killed runs swept; temporary folders for files never committed.

(``writing`` uses all of the others; ``reading`` uses ``sparse``, ``external`` and ``targets``;
``sparse`` uses ``external``; ``targets`` uses ``staging``; ``external`` and ``staging`` use
none.) ``onnx.load``/``onnx.save`` are banned everywhere else (ruff ``banned-api``).
"""

from __future__ import annotations

from modelshrink.io.external import external_files, total_tensor_bytes
from modelshrink.io.reading import LoadedModel, checker_message, files_read, load_model
from modelshrink.io.sparse import SPARSE_STORAGE_KEY, SPARSE_STORAGE_VALUE
from modelshrink.io.staging import temporary_folder
from modelshrink.io.targets import STDIO, OutputTarget, WritePlan, plan_writes
from modelshrink.io.writing import (
    SERIALIZE_WHOLE_BYTES,
    StagedModel,
    StagedReport,
    check_output_target,
    commit,
    load_staged,
    model_bytes,
    stage_copy,
    stage_model,
    stage_report,
)

__all__ = [
    "SERIALIZE_WHOLE_BYTES",
    "SPARSE_STORAGE_KEY",
    "SPARSE_STORAGE_VALUE",
    "STDIO",
    "LoadedModel",
    "OutputTarget",
    "StagedModel",
    "StagedReport",
    "WritePlan",
    "check_output_target",
    "checker_message",
    "commit",
    "external_files",
    "files_read",
    "load_model",
    "load_staged",
    "model_bytes",
    "plan_writes",
    "stage_copy",
    "stage_model",
    "stage_report",
    "temporary_folder",
    "total_tensor_bytes",
]
