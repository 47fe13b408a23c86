"""onnxruntime sessions for in-memory models: what techniques and the pipeline score candidates with.

Small models are serialized to bytes; bigger ones go through a temporary file with external
data, written tensor by tensor (from memory-mapped inputs without a copy) and memory-mapped
by onnxruntime. As bytes, every probe and speed check of a 1 GB model serialized it whole in
memory: ``--mode dynamic`` on the 1 GB bench model took 22.5 s at a 5.43 GB peak, now 11.9 s
at 1.65 GB. It sits below the techniques and the pipeline, so both import it downward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

from modelshrink import io
from modelshrink.runtime import RuntimeOptions, Session

__all__ = ["saved_for_runtime", "session_for_model"]


@contextlib.contextmanager
def saved_for_runtime(model: ir.Model) -> Iterator[Path | bytes]:
    """The model as bytes, or as a temporary file with external data (see the module docstring)."""
    if io.total_tensor_bytes(model) < io.SERIALIZE_WHOLE_BYTES:
        yield io.model_bytes(model)
        return
    # a folder a killed run leaves behind is swept by the next run that makes one
    with io.temporary_folder() as folder:
        target = io.OutputTarget(folder / "candidate.onnx", force=True, external_data=True)
        io.stage_model(model, target).commit()
        yield folder / "candidate.onnx"


def session_for_model(model: ir.Model, runtime: RuntimeOptions, *, label: str = "candidate") -> Session:
    """An onnxruntime session for an in-memory model (techniques' trial candidates)."""
    with saved_for_runtime(model) as source:
        return Session(source, runtime, label=label)
