"""External data: the files a model's tensors live in, checked, named, counted, brought into memory.

A model may keep its tensors in files next to it (ONNX external data: each tensor names a
``location``, an ``offset`` and a ``length``). Before any work, :func:`validate_external_data`
checks every reference of a model being read: the file exists, lies inside the model's folder,
and holds the bytes asked for. A model not loaded yet is only peeked at to name its files
(:func:`peek_external_files`), so that outputs are checked against them before anything runs.

In memory, onnx-ir keeps such tensors memory-mapped (``ir.ExternalTensor``) until read:
:func:`inline_external` brings them into memory where a write needs them there, and
:func:`total_tensor_bytes` tells whether a model fits in one protobuf at all. Writing external
data is :mod:`modelshrink.io.writing`'s.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from modelshrink.errors import InvalidModelError

__all__ = [
    "EXTERNAL_DATA_AUTO_BYTES",
    "EXTERNAL_THRESHOLD_BYTES",
    "all_tensors",
    "external_files",
    "external_refs",
    "in_memory",
    "inline_external",
    "peek_external_files",
    "total_tensor_bytes",
    "validate_external_data",
]

# Protobuf cannot serialize a message of 2 GiB or more; keep a margin for the graph itself.
EXTERNAL_DATA_AUTO_BYTES = 1_800_000_000
# Model files up to this size are parsed before any work to name their external data files.
_PEEK_MAX_BYTES = 16 << 20
# Tensors at least this large go to the external data file when one is written.
EXTERNAL_THRESHOLD_BYTES = 1024


# --- references in a model file --------------------------------------------------------------


def _iter_tensor_protos(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _iter_tensor_protos(attr.g)
            for sub in attr.graphs:
                yield from _iter_tensor_protos(sub)


def _iter_model_tensor_protos(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _iter_tensor_protos(proto.graph)
    for function in proto.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def external_refs(proto: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(tensor name, location)`` of every tensor the model keeps in external data."""
    return [
        (t.name, _external_info(t).get("location", ""))
        for t in _iter_model_tensor_protos(proto)
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]


def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    dtype = ir.DataType(tensor.data_type)
    numel = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    return (numel * dtype.bitwidth + 7) // 8


def validate_external_data(proto: onnx.ModelProto, path: Path, label: str) -> tuple[Path, ...]:
    """Check every external reference of the model read from ``path``; return the files, resolved.

    Raises:
        InvalidModelError: A reference names no file, an absolute path or one outside the
            model's folder, a file that does not exist, or bytes past the end of its file.
    """
    base = path.parent.resolve()
    files: dict[Path, int] = {}
    for tensor in _iter_model_tensor_protos(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = _external_info(tensor)
        location = info.get("location", "")
        where = f"{label}: tensor '{tensor.name}'"
        if not location:
            raise InvalidModelError(f"{where} is external but names no location")
        if os.path.isabs(location) or location.startswith(("/", "\\")):
            raise InvalidModelError(
                f"{where} points to absolute path '{location}'; external data must live in the model's folder"
            )
        target = (base / location).resolve()
        if not target.is_relative_to(base):
            raise InvalidModelError(
                f"{where} points to '{location}', outside the model's folder; refusing to read it"
            )
        if not target.is_file():
            raise InvalidModelError(f"{where}: external data file '{location}' not found next to the model")
        try:
            offset = int(info.get("offset", "0") or 0)
            length = int(info.get("length", "0") or 0) or _tensor_nbytes(tensor)
        except ValueError as exc:
            raise InvalidModelError(f"{where} has a non-numeric offset/length") from exc
        if offset < 0 or length < 0:
            raise InvalidModelError(f"{where} has a negative offset/length")
        size = files.setdefault(target, target.stat().st_size)
        if offset + length > size:
            raise InvalidModelError(
                f"{where} needs bytes {offset}..{offset + length} of '{location}', "
                f"but the file has only {size} bytes (truncated?)"
            )
    return tuple(sorted(files))


def peek_external_files(path: Path) -> tuple[Path, ...]:
    """The external data files a model file names, when it is small enough to parse up front.

    Empty for a large file (its tensors are inside it), and for anything unreadable: loading
    it says what is wrong.
    """
    try:
        if not path.is_file() or path.stat().st_size > _PEEK_MAX_BYTES:
            return ()
        proto = onnx.ModelProto()
        proto.ParseFromString(path.read_bytes())
    except (OSError, DecodeError, RuntimeError, ValueError):
        return ()  # loading it says what is wrong
    base = path.parent
    return tuple(sorted({base / location for _, location in external_refs(proto) if location}))


# --- tensors of an in-memory model -----------------------------------------------------------


def external_files(model: ir.Model) -> tuple[Path, ...]:
    """The external data files an in-memory model's tensors are mapped from."""
    files = {
        Path(tensor.path).resolve()
        for _, tensor in all_tensors(model)
        if isinstance(tensor, ir.ExternalTensor) and tensor.base_dir
    }
    return tuple(sorted(files))


def total_tensor_bytes(model: ir.Model) -> int:
    """Bytes held by every tensor (initializers and tensor attributes, all graphs)."""
    return sum(t.nbytes for _, t in all_tensors(model))


def all_tensors(model: ir.Model) -> Iterator[tuple[ir.Value | tuple[ir.Node, str], ir.TensorProtocol]]:
    """Every tensor with its owner: an initializer's value, or ``(node, attribute name)``."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value, value.const_value
        for node in graph:
            for name, attr in node.attributes.items():
                if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                    yield (node, name), attr.value


def in_memory(tensor: ir.ExternalTensor) -> ir.Tensor:
    """A copy of a memory-mapped tensor held in memory."""
    return ir.Tensor(np.array(tensor.numpy()), dtype=tensor.dtype, name=tensor.name)


def inline_external(model: ir.Model, *, keep_large: bool) -> None:
    """Replace memory-mapped external tensors by in-memory ones (all, or only small ones)."""
    for owner, tensor in list(all_tensors(model)):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        if keep_large and isinstance(owner, ir.Value) and tensor.nbytes >= EXTERNAL_THRESHOLD_BYTES:
            continue  # ir.save rewrites it into the new external data file
        loaded = in_memory(tensor)
        if isinstance(owner, ir.Value):
            owner.const_value = loaded
        else:
            node, name = owner
            node.attributes[name] = ir.AttrTensor(name, loaded)
