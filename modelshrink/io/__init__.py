"""Model files in and out: reading and validating models, and writing models and reports.

Loading validates everything a user can get wrong before any work starts (missing file, not
ONNX, checker failures, external data that is missing, short or outside the model's folder).
Where results may go is decided beforehand by :mod:`modelshrink.io.targets`. Saving is staged:
the candidate is written into a private folder next to the destination, checked and verified
from there, and only then moved into place, together with its external data and the report,
as one unit (:mod:`modelshrink.io.staging`). A failure or an interrupt leaves nothing behind,
and an existing file is never touched unless ``force`` is given.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from modelshrink.errors import InvalidModelError, OutputError
from modelshrink.graph import allow_plain_initializers
from modelshrink.io.staging import Move, Staging, commit_moves, write_stream
from modelshrink.io.targets import STDIO, OutputTarget, ReportTarget, Sink, plan_writes

__all__ = [
    "EXTERNAL_DATA_AUTO_BYTES",
    "SERIALIZE_WHOLE_BYTES",
    "SPARSE_STORAGE_KEY",
    "SPARSE_STORAGE_VALUE",
    "STDIO",
    "LoadedModel",
    "OutputTarget",
    "StagedModel",
    "StagedReport",
    "check_output_target",
    "checker_message",
    "commit",
    "external_files",
    "files_read",
    "load_model",
    "load_staged",
    "stage_model",
    "stage_report",
    "total_tensor_bytes",
]

logger = logging.getLogger(__name__)

# Protobuf cannot serialize a message of 2 GiB or more; keep a margin for the graph itself.
EXTERNAL_DATA_AUTO_BYTES = 1_800_000_000
# Model files up to this size are parsed before any work to name their external data files.
_PEEK_MAX_BYTES = 16 << 20
# Tensors at least this large go to the external data file when one is written.
_EXTERNAL_THRESHOLD_BYTES = 1024
# Models with fewer tensor bytes than this are serialized whole in memory; larger one-file
# results are written by _write_streamed, and larger models for onnxruntime sessions go
# through a temporary file with external data (serializing held 2-3x the tensors).
SERIALIZE_WHOLE_BYTES = 64 << 20
# A Constant whose tensor carries this metadata entry is written as an ONNX sparse tensor
# (``sparse_value``) when that is smaller. Sparse tensors read from a model become dense ones
# (onnx-ir has no sparse tensors) carrying the entry, so sparse Constants are written back
# sparse; sparse initializers come back as dense initializers.
SPARSE_STORAGE_KEY = "modelshrink.storage"
# A sparse tensor is densified when read: refused when its dense form would pass 2 GiB (one
# protobuf could not hold it anyway), or 256 MiB and 1000x the bytes it stores (a tiny file
# declaring huge dims must not become a multi-GB allocation).
_MAX_DENSE_BYTES = 1 << 31
_SMALL_DENSE_BYTES = 1 << 28
_MAX_DENSE_RATIO = 1000
SPARSE_STORAGE_VALUE = "sparse"


@dataclass
class LoadedModel:
    """A model as read from the user's file or stdin.

    Attributes:
        model: The in-memory IR. External tensors stay memory-mapped until read.
        source: What the user passed (``-`` or a path), for messages and the report.
        path: The model file, or None when read from stdin.
        raw: The model bytes when read from stdin (onnxruntime loads them directly).
        file_bytes: Size of the ``.onnx`` file (or of the stdin bytes).
        external_files: External data files the model references, resolved.
    """

    model: ir.Model
    source: str
    path: Path | None
    raw: bytes | None
    file_bytes: int
    external_files: tuple[Path, ...] = ()

    @property
    def external_bytes(self) -> int:
        """Total size of the external data files."""
        return sum(p.stat().st_size for p in self.external_files)

    @property
    def size_bytes(self) -> int:
        """Model file plus external data."""
        return self.file_bytes + self.external_bytes

    @property
    def label(self) -> str:
        """Short name for messages: the path or ``<stdin>``."""
        return "<stdin>" if self.path is None else self.source

    def files(self) -> tuple[Path, ...]:
        """Every file that makes up the model on disk (empty for stdin)."""
        return () if self.path is None else (self.path, *self.external_files)


def load_model(source: str, *, stdin: BinaryIO | None = None, check: bool = True) -> LoadedModel:
    """Load a model from a path or ``-`` (stdin), validating it.

    Args:
        source: A path, or ``-`` for standard input.
        stdin: Stream to read for ``-`` (default ``sys.stdin.buffer``); for tests.
        check: Run the ONNX checker on the model.

    Returns:
        The loaded model.

    Raises:
        InvalidModelError: The file is missing, empty, not ONNX, fails the checker, or its
            external data is missing, short, or outside the model's folder.
    """
    if source == STDIO:
        raw = _read_stdin(stdin)
        proto = _parse(raw, "<stdin>")
        if refs := _external_refs(proto):
            raise InvalidModelError(
                f"<stdin>: the model keeps tensor '{refs[0][0]}' in external file "
                f"'{refs[0][1]}', which cannot be found from stdin; pass the model by path"
            )
        _validate_proto(proto, "<stdin>", check=check)
        model = _deserialize(proto, "<stdin>")
        return LoadedModel(model, source, None, raw, len(raw))

    path = Path(source)
    label = source
    if not path.exists():
        raise InvalidModelError(f"{label}: no such file")
    if path.is_dir():
        raise InvalidModelError(f"{label}: is a directory; pass the .onnx file inside it")
    size = path.stat().st_size
    if size == 0:
        raise InvalidModelError(f"{label}: the file is empty (0 bytes)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidModelError(f"{label}: cannot read: {exc.strerror}") from exc
    proto = _parse(raw, label)
    del raw
    externals = _validate_external_data(proto, path, label)
    # With external data the checker must resolve files next to the model: give it the path.
    _validate_proto(proto, label, check=check, path=path if externals else None)
    model = _deserialize(proto, label)
    ir.external_data.set_base_dir(model.graph, str(path.parent.resolve()))
    return LoadedModel(model, source, path, None, size, externals)


def _read_stdin(stdin: BinaryIO | None) -> bytes:
    stream = stdin if stdin is not None else sys.stdin.buffer
    if stdin is None and sys.stdin.isatty():
        raise InvalidModelError("<stdin>: no model piped in; pass a path or pipe a model into '-'")
    raw = stream.read()
    if not raw:
        raise InvalidModelError("<stdin>: no bytes received; pipe a model or pass a path")
    return raw


def _parse(raw: bytes, label: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidModelError(
            f"{label}: not a readable ONNX model (truncated, corrupt or another format)"
        ) from exc
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise InvalidModelError(f"{label}: not an ONNX model (no graph or IR version; is it another format?)")
    return proto


def _graph_texts(graph: onnx.GraphProto) -> Iterator[object]:
    yield graph.name
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        yield value.name
    for node in graph.node:
        yield from (node.name, node.op_type, node.domain, *node.input, *node.output)
        for attr in node.attribute:
            yield attr.name
            if attr.HasField("g"):
                yield from _graph_texts(attr.g)
            for sub in attr.graphs:
                yield from _graph_texts(sub)


def _check_text(proto: onnx.ModelProto, label: str) -> None:
    """Protobuf (proto2) hands back invalid UTF-8 strings as bytes: refuse such files up front."""
    texts = [proto.producer_name, proto.producer_version, proto.domain, proto.doc_string]
    texts += [t for p in proto.metadata_props for t in (p.key, p.value)]
    texts += [o.domain for o in proto.opset_import]
    for text in (*texts, *_graph_texts(proto.graph)):
        if not isinstance(text, str):
            raise InvalidModelError(f"{label}: corrupt file: a name or string field is not valid UTF-8")


def _validate_proto(proto: onnx.ModelProto, label: str, *, check: bool, path: Path | None = None) -> None:
    _check_text(proto, label)
    if not proto.opset_import and proto.ir_version >= 3:
        raise InvalidModelError(f"{label}: the model declares no opset_import")
    if not proto.graph.output:
        raise InvalidModelError(f"{label}: the graph declares no outputs")
    if not check:
        return
    try:
        onnx.checker.check_model(str(path) if path is not None else proto)
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(f"{label}: fails the ONNX checker: {checker_message(exc)}") from exc
    except (ValueError, RuntimeError) as exc:  # e.g. protobuf over 2 GB, odd IR versions
        raise InvalidModelError(f"{label}: fails the ONNX checker: {exc}") from exc


def checker_message(exc: Exception) -> str:
    """Fold an ``onnx.checker`` message (several lines with context) into one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(line.removeprefix("==> Context: ") for line in lines)


def _deserialize(proto: onnx.ModelProto, label: str) -> ir.Model:
    _from_sparse_storage(proto, label)
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx-ir raises plain exceptions for malformed protos
        root: BaseException = exc
        while root.__cause__ is not None:  # SerdeError wraps the useful message
            root = root.__cause__
        raise InvalidModelError(f"{label}: cannot read the graph: {root}") from exc


# --- sparse tensors ----------------------------------------------------------------------------


def _proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _proto_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _proto_graphs(sub)


def _is_constant(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


def _check_dense_size(sparse: onnx.SparseTensorProto, where: str) -> None:
    """Refuse a sparse tensor whose declared dense form would be a huge allocation from little data."""
    try:
        itemsize = ir.DataType(sparse.values.data_type).itemsize
    except ValueError as exc:
        raise InvalidModelError(
            f"{where}: sparse tensor '{sparse.values.name}' has unknown data type {sparse.values.data_type}"
        ) from exc
    dense = float(np.prod(list(sparse.dims), dtype=np.float64)) * itemsize
    stored = sparse.values.ByteSize() + sparse.indices.ByteSize()
    if dense > _MAX_DENSE_BYTES or (dense > _SMALL_DENSE_BYTES and dense > _MAX_DENSE_RATIO * stored):
        raise InvalidModelError(
            f"{where}: sparse tensor '{sparse.values.name}' declares dims {list(sparse.dims)} "
            f"({dense / 1e9:.3g} GB dense) for {stored} bytes of values; refusing to densify it"
        )


def _dense_of(sparse: onnx.SparseTensorProto) -> onnx.TensorProto:
    values = onnx.numpy_helper.to_array(sparse.values)
    indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
    dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
    if indices.ndim == 1:
        dense.reshape(-1)[indices] = values
    else:
        dense[tuple(indices.T)] = values
    tensor = onnx.numpy_helper.from_array(dense, sparse.values.name)
    tensor.metadata_props.add(key=SPARSE_STORAGE_KEY, value=SPARSE_STORAGE_VALUE)
    return tensor


def _from_sparse_storage(proto: onnx.ModelProto, label: str) -> None:
    """Sparse initializers and ``sparse_value`` Constants -> dense ones carrying the mark."""
    for graph in _proto_graphs(proto.graph):
        for sparse in graph.sparse_initializer:
            _check_dense_size(sparse, label)
            graph.initializer.append(_dense_of(sparse))
        del graph.sparse_initializer[:]
        for node in graph.node:
            if not _is_constant(node):
                continue
            for attr in node.attribute:
                if attr.name == "sparse_value" and attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    _check_dense_size(attr.sparse_tensor, label)
                    dense = _dense_of(attr.sparse_tensor)
                    attr.Clear()
                    attr.CopyFrom(onnx.helper.make_attribute("value", dense))


def _pop_mark(tensor: onnx.TensorProto) -> bool:
    """Remove every sparse-storage entry (serialization may repeat it); True if one asked for it."""
    keep = [(e.key, e.value) for e in tensor.metadata_props if e.key != SPARSE_STORAGE_KEY]
    marked = any(
        e.key == SPARSE_STORAGE_KEY and e.value == SPARSE_STORAGE_VALUE for e in tensor.metadata_props
    )
    if len(keep) != len(tensor.metadata_props):
        del tensor.metadata_props[:]
        for key, value in keep:
            tensor.metadata_props.add(key=key, value=value)
    return marked


def _sparse_of(tensor: onnx.TensorProto) -> onnx.SparseTensorProto | None:
    """The sparse form (flat int64 indices) of a tensor when it is smaller, else None."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    dense = onnx.numpy_helper.to_array(tensor)
    flat = dense.reshape(-1)
    nonzero = np.flatnonzero(flat)
    values = onnx.numpy_helper.from_array(flat[nonzero], tensor.name)
    indices = onnx.numpy_helper.from_array(nonzero.astype(np.int64), "")
    sparse = onnx.helper.make_sparse_tensor(values, indices, list(tensor.dims))
    return sparse if sparse.ByteSize() < tensor.ByteSize() else None


def _to_sparse_storage(proto: onnx.ModelProto) -> None:
    """Marked Constant tensors -> ``sparse_value`` where smaller; every mark removed."""
    for graph in _proto_graphs(proto.graph):
        for tensor in graph.initializer:
            _pop_mark(tensor)
        for node in graph.node:
            if not _is_constant(node):
                continue
            for attr in node.attribute:
                if attr.name != "value" or attr.type != onnx.AttributeProto.TENSOR or not _pop_mark(attr.t):
                    continue
                sparse = _sparse_of(attr.t)
                if sparse is not None:
                    attr.Clear()
                    attr.CopyFrom(onnx.helper.make_attribute("sparse_value", sparse))


def _has_sparse_marks(model: ir.Model) -> bool:
    return any(t.metadata_props.get(SPARSE_STORAGE_KEY) for _, t in _all_tensors(model))


def _serialized(model: ir.Model) -> onnx.ModelProto:
    proto = ir.serde.serialize_model(model)
    _to_sparse_storage(proto)
    return proto


# --- external data ---------------------------------------------------------------------------


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


def _external_refs(proto: onnx.ModelProto) -> list[tuple[str, str]]:
    return [
        (t.name, _external_info(t).get("location", ""))
        for t in _iter_model_tensor_protos(proto)
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]


def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    dtype = ir.DataType(tensor.data_type)
    numel = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    return (numel * dtype.bitwidth + 7) // 8


def _validate_external_data(proto: onnx.ModelProto, path: Path, label: str) -> tuple[Path, ...]:
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


# --- output ----------------------------------------------------------------------------------


def check_output_target(
    output: str,
    *,
    force: bool = False,
    external_data: bool | None = None,
    inputs: tuple[LoadedModel | str, ...] = (),
    stdout_isatty: bool | None = None,
) -> OutputTarget:
    """Validate a model output before work starts (see :func:`modelshrink.io.targets.plan_writes`).

    Args:
        output: A path or ``-`` for stdout.
        force: Allow replacing an existing file.
        external_data: See :class:`OutputTarget`.
        inputs: The models (or raw source strings) being read: never overwritten.
        stdout_isatty: Override terminal detection (tests).

    Returns:
        The validated target.

    Raises:
        TargetError: The output is refused (a terminal, an input, an existing file without
            ``force``, a directory, a folder that does not exist or is not writable).
        ConfigError: External data requested on a stream.
    """
    plan = plan_writes(
        output=output,
        reads=files_read(*inputs),
        force=force,
        external_data=external_data,
        input_external=any(isinstance(item, LoadedModel) and item.external_files for item in inputs),
        stdout_isatty=stdout_isatty,
    )
    assert plan.output is not None
    return plan.output


def files_read(*inputs: LoadedModel | str | None) -> tuple[str | Path, ...]:
    """Every file behind these models: the model files and their external data.

    A model not loaded yet (a path) is read just far enough to name its external data files
    when its ``.onnx`` file is small (as it is when the tensors live in external data), so that
    outputs are checked against them before any work; otherwise they are known after loading.
    """
    files: list[str | Path] = []
    for item in inputs:
        if isinstance(item, LoadedModel):
            files.extend(item.files())
        elif item is not None and item != STDIO:
            files.extend([item, *_peek_external_files(Path(item))])
    return tuple(files)


def _peek_external_files(path: Path) -> tuple[Path, ...]:
    try:
        if not path.is_file() or path.stat().st_size > _PEEK_MAX_BYTES:
            return ()
        proto = onnx.ModelProto()
        proto.ParseFromString(path.read_bytes())
    except (OSError, DecodeError, RuntimeError, ValueError):
        return ()  # loading it says what is wrong
    base = path.parent
    return tuple(sorted({base / location for _, location in _external_refs(proto) if location}))


def external_files(model: ir.Model) -> tuple[Path, ...]:
    """The external data files an in-memory model's tensors are mapped from."""
    files = {
        Path(tensor.path).resolve()
        for _, tensor in _all_tensors(model)
        if isinstance(tensor, ir.ExternalTensor) and tensor.base_dir
    }
    return tuple(sorted(files))


def total_tensor_bytes(model: ir.Model) -> int:
    """Bytes held by every tensor (initializers and tensor attributes, all graphs)."""
    return sum(t.nbytes for _, t in _all_tensors(model))


def _all_tensors(model: ir.Model) -> Iterator[tuple[ir.Value | tuple[ir.Node, str], ir.TensorProtocol]]:
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value, value.const_value
        for node in graph:
            for name, attr in node.attributes.items():
                if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                    yield (node, name), attr.value


def _in_memory(tensor: ir.ExternalTensor) -> ir.Tensor:
    return ir.Tensor(np.array(tensor.numpy()), dtype=tensor.dtype, name=tensor.name)


def _inline_external(model: ir.Model, *, keep_large: bool) -> None:
    """Replace memory-mapped external tensors by in-memory ones (all, or only small ones)."""
    for owner, tensor in list(_all_tensors(model)):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        if keep_large and isinstance(owner, ir.Value) and tensor.nbytes >= _EXTERNAL_THRESHOLD_BYTES:
            continue  # ir.save rewrites it into the new external data file
        loaded = _in_memory(tensor)
        if isinstance(owner, ir.Value):
            owner.const_value = loaded
        else:
            node, name = owner
            node.attributes[name] = ir.AttrTensor(name, loaded)


@dataclass
class StagedModel:
    """A candidate written to a private temporary folder, waiting to be committed or discarded.

    Attributes:
        target: Where it goes on commit.
        folder: The temporary folder holding it.
        path: The staged model file (its final name, inside ``folder``).
        data_path: The staged external data file, if any.
    """

    target: OutputTarget
    folder: Path
    path: Path
    data_path: Path | None
    _staging: Staging | None = field(default=None, repr=False)
    _done: bool = field(default=False, repr=False)

    @property
    def size_bytes(self) -> int:
        """Model file plus external data."""
        return sum(p.stat().st_size for p in self.files())

    def files(self) -> tuple[Path, ...]:
        """The staged files."""
        return (self.path,) if self.data_path is None else (self.path, self.data_path)

    def moves(self) -> list[Move]:
        """The renames that put it in place: external data first, the model that reads it last."""
        dest = self.target.dest
        assert dest is not None
        moves = []
        if self.data_path is not None:
            data_dest = self.target.data_path()
            assert data_dest is not None
            moves.append(
                Move(
                    self.data_path,
                    data_dest,
                    self.target.force,
                    f"{self.target.label} (external data '{data_dest}')",
                )
            )
        moves.append(Move(self.path, dest, self.target.force, self.target.label))
        return moves

    def commit(self, stdout: BinaryIO | None = None) -> None:
        """Move the staged files into place (or stream them), then clean up."""
        commit(self, None, stdout=stdout)

    def discard(self) -> None:
        """Remove the staged files; safe to call twice."""
        if not self._done:
            self._done = True
            if self._staging is not None:
                self._staging.remove()
            else:
                shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class StagedReport:
    """A report written next to its destination (or held for a stream), waiting for commit."""

    target: ReportTarget
    text: str
    path: Path | None = None
    _staging: Staging | None = field(default=None, repr=False)

    def discard(self) -> None:
        """Remove the staged file; safe to call twice."""
        if self._staging is not None:
            self._staging.remove()
            self._staging = None


def stage_report(target: ReportTarget, text: str) -> StagedReport:
    """Write the report into a staging folder beside its destination (streams: keep the text).

    The file gets the usual permissions (0666 less the umask); one that replaces an existing
    report keeps that file's permissions.

    Raises:
        OutputError: The write failed (nothing is left behind).
    """
    if target.dest is None:
        return StagedReport(target, text)
    try:
        place = Staging(target.dest.parent)
    except OSError as exc:
        raise OutputError(f"--report {target.label}: cannot write: {exc.strerror or exc}") from exc
    path = place.folder / target.dest.name
    staged_report = StagedReport(target, text, path, place)
    try:
        with path.open("x", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        staged_report.discard()
        raise OutputError(f"--report {target.label}: cannot write: {exc.strerror or exc}") from exc
    except BaseException:
        staged_report.discard()
        raise
    return staged_report


def _write_sink(sink: Sink | None, source: Path | bytes, label: str, stdout: BinaryIO | None) -> None:
    try:
        if sink is None or sink.is_stdout:  # through sys.stdout, after what it holds already
            if stdout is None and callable(flush := getattr(sys.stdout, "flush", None)):
                flush()  # text already in sys.stdout goes first
            write_stream(source, stream=stdout if stdout is not None else sys.stdout.buffer)
        else:
            write_stream(source, fd=sink.fd, path=sink.path)
    except OSError as exc:
        raise OutputError(f"{label}: cannot write: {exc.strerror or exc}") from exc


def commit(
    model: StagedModel | None,
    report: StagedReport | None,
    *,
    stdout: BinaryIO | None = None,
) -> None:
    """Put a staged model and a staged report in place, as one unit, then clean up.

    A streamed model is written first; then every file (external data, model, report) is
    renamed into place under the folder locks with signals held back (see
    :mod:`modelshrink.io.staging`): either all of them are in place or none is changed.

    Raises:
        OutputError: A file that may not be replaced appeared meanwhile, or a write failed.
    """
    try:
        moves: list[Move] = []
        if model is not None:
            if model.target.dest is None:
                _write_sink(model.target.sink, model.path, model.target.label, stdout)
            else:
                moves.extend(model.moves())
        if report is not None and report.path is not None:
            dest = report.target.dest
            assert dest is not None
            moves.append(Move(report.path, dest, report.target.force, f"--report {report.target.label}"))
        commit_moves(moves, durable=model is None or model.target.durable or model.target.dest is None)
        if report is not None and report.path is None:
            _write_sink(report.target.sink, report.text.encode(), f"--report {report.target.label}", stdout)
    finally:
        if model is not None:
            model.discard()
        if report is not None:
            report.discard()


def stage_model(model: ir.Model, target: OutputTarget) -> StagedModel:
    """Write ``model`` into a staging folder beside the destination (or in the temp dir).

    The model is not modified. External data is written when ``target.external_data`` is
    True, or when it is None and the tensors exceed what one protobuf can hold or the input
    kept its tensors in external data (and the target is a file).

    Raises:
        OutputError: The model needs external data but the target is a stream, or the disk
            write failed.
    """
    total = total_tensor_bytes(model)
    sparse_marks = _has_sparse_marks(model)
    external = target.external_data
    if external is None:
        # Like the input: one file of a model that came with external data is read whole by
        # the checker and every loader, and serializing it holds two more copies of its tensors
        # (4x a 1.5 GB model at peak), where external data is written and mapped tensor by
        # tensor. Sparse storage exists only inline (see _serialized): it keeps one file.
        external = total >= EXTERNAL_DATA_AUTO_BYTES or (
            target.input_external and target.dest is not None and not sparse_marks
        )
    if external and target.dest is None:
        raise OutputError(
            f"the result holds {total / 1e9:.1f} GB of tensors and needs an external data file; "
            f"write it with -o FILE instead of -o {target.label if target.sink is not None else '-'}"
        )
    parent = target.dest.parent if target.dest is not None else None
    name = target.dest.name if target.dest is not None else "model.onnx"
    try:
        place = Staging(parent)
    except OSError as exc:
        raise OutputError(f"{target.label}: cannot write: {exc.strerror or exc}") from exc
    staged = StagedModel(target, place.folder, place.folder / name, None, place)
    try:
        copy = model.clone()
        allow_plain_initializers(copy)
        data_name = name + ".data" if external else None
        sparse = not external and sparse_marks
        if not external and not sparse and total >= SERIALIZE_WHOLE_BYTES:
            _write_streamed(copy, staged.path)
        elif sparse:
            _inline_external(copy, keep_large=False)
            staged.path.write_bytes(_serialized(copy).SerializeToString())
        else:
            _inline_external(copy, keep_large=external)
            ir.save(
                copy,
                staged.path,
                external_data=data_name,
                size_threshold_bytes=_EXTERNAL_THRESHOLD_BYTES,
            )
        if data_name is not None and (place.folder / data_name).exists():
            staged.data_path = place.folder / data_name
    except OSError as exc:
        staged.discard()
        raise OutputError(f"{target.label}: cannot write: {exc.strerror or exc}") from exc
    except BaseException:
        staged.discard()
        raise
    return staged


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_GRAPH_KEY = _varint(7 << 3 | 2)  # ModelProto.graph, length-delimited
_INITIALIZER_KEY = _varint(5 << 3 | 2)  # GraphProto.initializer, length-delimited


def _initializer_proto(name: str | None, tensor: ir.TensorProtocol) -> onnx.TensorProto:
    if isinstance(tensor, ir.ExternalTensor):
        tensor = _in_memory(tensor)
    proto = ir.serde.serialize_tensor(tensor)
    proto.name = name or ""
    return proto


def _write_streamed(model: ir.Model, path: Path) -> None:
    """Write ``model`` as one protobuf file without a serialized copy of all its tensors.

    Serializing the model whole held two more copies of every tensor (a proto, then its bytes):
    4x a 1.5 GB result at peak. Here everything but the main graph's initializer tensors is
    serialized as usual, and the one ``graph`` field is written with those tensors appended
    to it one at a time (a repeated field may follow the graph's other fields; ``onnx.load``
    reads back the same model). ``model`` is a private copy: its external tensors in
    attributes and subgraphs are brought into memory.
    """
    values = [v for v in model.graph.initializers.values() if v.const_value is not None]
    tensors = [t for v in values if (t := v.const_value) is not None]
    serde_log = logging.getLogger("onnx_ir.serde")
    level = serde_log.level
    try:
        for value in values:
            value.const_value = None  # serialized below, one at a time
        _inline_external(model, keep_large=False)
        serde_log.setLevel(logging.ERROR)  # it warns about each initializer left without data
        proto = ir.serde.serialize_model(model)
    finally:
        serde_log.setLevel(level)
        for value, tensor in zip(values, tensors, strict=True):
            value.const_value = tensor
    graph = proto.graph.SerializeToString()
    proto.ClearField("graph")
    head = proto.SerializeToString()
    del proto
    # The graph's length comes first: measure every tensor's record, then write them.
    sizes = [_initializer_proto(v.name, t).ByteSize() for v, t in zip(values, tensors, strict=True)]
    body = len(graph) + sum(len(_INITIALIZER_KEY) + len(_varint(n)) + n for n in sizes)
    with path.open("wb") as f:
        f.write(head + _GRAPH_KEY + _varint(body))
        f.write(graph)
        for value, tensor, size in zip(values, tensors, sizes, strict=True):
            record = _initializer_proto(value.name, tensor).SerializeToString()
            if len(record) != size:
                raise AssertionError(
                    f"initializer '{value.name}' serialized to {len(record)} bytes, not {size}"
                )
            f.write(_INITIALIZER_KEY + _varint(size))
            f.write(record)
            del record


def load_staged(staged_model: StagedModel) -> ir.Model:
    """The staged model read back with its tensors memory-mapped from the staged data file.

    After staging with external data, this lets the in-memory copies a technique made go
    before onnxruntime loads its own (holding both took twice the model's size). The mapping
    survives the move into place (same inode) and the removal of the temporary folder.
    """
    proto = onnx.ModelProto()
    proto.ParseFromString(staged_model.path.read_bytes())
    model = _deserialize(proto, staged_model.target.label)
    ir.external_data.set_base_dir(model.graph, str(staged_model.folder.resolve()))
    return model


@contextlib.contextmanager
def staged(model: ir.Model, target: OutputTarget) -> Iterator[StagedModel]:
    """Stage ``model``; discard it on exit unless it was committed."""
    s = stage_model(model, target)
    try:
        yield s
    finally:
        s.discard()


def model_bytes(model: ir.Model) -> bytes:
    """Serialize a model whose tensors all fit in one protobuf (for onnxruntime sessions)."""
    copy = model.clone()
    allow_plain_initializers(copy)
    _inline_external(copy, keep_large=False)
    if _has_sparse_marks(copy):
        return _serialized(copy).SerializeToString()
    return ir.serde.serialize_model(copy).SerializeToString()
