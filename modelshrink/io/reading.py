"""Reading models: from a path or stdin, validated before any work starts.

Loading checks everything a user can get wrong, and says it in one line naming the file:
a missing, empty or unreadable file, a folder, bytes that are not ONNX, names that are not
valid UTF-8, a model without opset imports or outputs, one the ONNX checker refuses, external
data that is missing, short or outside the model's folder (:mod:`modelshrink.io.external`),
a sparse tensor too large to densify (:mod:`modelshrink.io.sparse`). Tensors kept in external
data stay memory-mapped by onnx-ir until read.

:func:`files_read` names every file behind the inputs, so that no output can overwrite one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from modelshrink.errors import InvalidModelError
from modelshrink.io.external import external_refs, peek_external_files, validate_external_data
from modelshrink.io.sparse import from_sparse_storage
from modelshrink.io.targets import STDIO

__all__ = [
    "LoadedModel",
    "checker_message",
    "deserialize",
    "files_read",
    "load_model",
]


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
        if refs := external_refs(proto):
            raise InvalidModelError(
                f"<stdin>: the model keeps tensor '{refs[0][0]}' in external file "
                f"'{refs[0][1]}', which cannot be found from stdin; pass the model by path"
            )
        _validate_proto(proto, "<stdin>", check=check)
        model = deserialize(proto, "<stdin>")
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
    externals = validate_external_data(proto, path, label)
    # With external data the checker must resolve files next to the model: give it the path.
    _validate_proto(proto, label, check=check, path=path if externals else None)
    model = deserialize(proto, label)
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


def deserialize(proto: onnx.ModelProto, label: str) -> ir.Model:
    """The in-memory IR of a parsed model (sparse tensors made dense, see :mod:`modelshrink.io.sparse`).

    Raises:
        InvalidModelError: onnx-ir cannot read the graph.
    """
    from_sparse_storage(proto, label)
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx-ir raises plain exceptions for malformed protos
        root: BaseException = exc
        while root.__cause__ is not None:  # SerdeError wraps the useful message
            root = root.__cause__
        raise InvalidModelError(f"{label}: cannot read the graph: {root}") from exc


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
            files.extend([item, *peek_external_files(Path(item))])
    return tuple(files)
