"""Writing models and reports: staged beside the destination, checked there, committed as one unit.

Where results may go is decided beforehand by :mod:`modelshrink.io.targets`
(:func:`check_output_target` for a model alone). Saving is staged: the candidate is written
into a private folder next to the destination (:func:`stage_model`), checked and verified from
there, and only then moved into place, together with its external data and the report, as one
unit (:func:`commit`, through :mod:`modelshrink.io.staging`). A failure or an interrupt leaves
nothing behind, and an existing file is never touched unless ``force`` is given.

A model is written in one of three ways:

- with external data (``<name>.data``) when asked, when its tensors pass what one protobuf can
  hold, or when the input kept its tensors so: ``ir.save`` writes tensor by tensor, from
  memory-mapped inputs without a copy;
- with marked Constants in sparse form (:mod:`modelshrink.io.sparse`): serialized whole;
- otherwise serialized whole when small (``SERIALIZE_WHOLE_BYTES``), else by a hand-written
  protobuf writer that appends the initializers one at a time (:func:`_write_streamed`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import onnx
import onnx_ir as ir

from modelshrink.errors import OutputError
from modelshrink.graph import allow_plain_initializers
from modelshrink.io.external import (
    EXTERNAL_DATA_AUTO_BYTES,
    EXTERNAL_THRESHOLD_BYTES,
    in_memory,
    inline_external,
    total_tensor_bytes,
)
from modelshrink.io.reading import LoadedModel, deserialize, files_read, load_model
from modelshrink.io.sparse import has_sparse_marks, serialized
from modelshrink.io.staging import Move, Staging, commit_moves, write_stream
from modelshrink.io.targets import OutputTarget, ReportTarget, Sink, plan_writes

__all__ = [
    "SERIALIZE_WHOLE_BYTES",
    "StagedModel",
    "StagedReport",
    "check_output_target",
    "commit",
    "load_staged",
    "model_bytes",
    "stage_model",
    "stage_report",
]

# Models with fewer tensor bytes than this are serialized whole in memory; larger one-file
# results are written by _write_streamed, and larger models for onnxruntime sessions go
# through a temporary file with external data (serializing held 2-3x the tensors).
SERIALIZE_WHOLE_BYTES = 64 << 20


# --- where the model goes --------------------------------------------------------------------


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


# --- staging and committing ------------------------------------------------------------------


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
    text: str | bytes
    path: Path | None = None
    _staging: Staging | None = field(default=None, repr=False)
    flag: str = "--report"

    def discard(self) -> None:
        """Remove the staged file; safe to call twice."""
        if self._staging is not None:
            self._staging.remove()
            self._staging = None


def stage_report(target: ReportTarget, text: str | bytes, *, flag: str = "--report") -> StagedReport:
    """Write the report (or another small file: a plot) into a staging folder beside its
    destination (streams: keep the content).

    The file gets the usual permissions (0666 less the umask); one that replaces an existing
    report keeps that file's permissions.

    Raises:
        OutputError: The write failed (nothing is left behind).
    """
    if target.dest is None:
        return StagedReport(target, text, flag=flag)
    try:
        place = Staging(target.dest.parent)
    except OSError as exc:
        raise OutputError(f"{flag} {target.label}: cannot write: {exc.strerror or exc}") from exc
    path = place.folder / target.dest.name
    staged_report = StagedReport(target, text, path, place, flag=flag)
    try:
        with path.open("xb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
    except OSError as exc:
        staged_report.discard()
        raise OutputError(f"{flag} {target.label}: cannot write: {exc.strerror or exc}") from exc
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
    others: tuple[StagedReport, ...] = (),
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
        files = [r for r in (report, *others) if r is not None]
        for staged_file in files:
            if staged_file.path is not None:
                dest = staged_file.target.dest
                assert dest is not None
                label = f"{staged_file.flag} {staged_file.target.label}"
                moves.append(Move(staged_file.path, dest, staged_file.target.force, label))
        commit_moves(moves, durable=model is None or model.target.durable or model.target.dest is None)
        for staged_file in files:
            if staged_file.path is None:
                content = staged_file.text
                data = content.encode() if isinstance(content, str) else content
                _write_sink(
                    staged_file.target.sink, data, f"{staged_file.flag} {staged_file.target.label}", stdout
                )
    finally:
        if model is not None:
            model.discard()
        for leftover in (report, *others):
            if leftover is not None:
                leftover.discard()


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
    sparse_marks = has_sparse_marks(model)
    external = target.external_data
    if external is None:
        # Like the input: one file of a model that came with external data is read whole by
        # the checker and every loader, and serializing it holds two more copies of its tensors
        # (4x a 1.5 GB model at peak), where external data is written and mapped tensor by
        # tensor. Sparse storage exists only inline (see modelshrink.io.sparse): it keeps one file.
        external = total >= EXTERNAL_DATA_AUTO_BYTES or (
            target.input_external and target.dest is not None and not sparse_marks
        )
    if external and target.dest is None:
        raise OutputError(
            f"the result holds {total / 1e9:.1f} GB of tensors and needs an external data file; "
            f"write it with -o FILE instead of -o {target.label if target.sink is not None else '-'}"
        )
    staged = _new_stage(target)
    name = staged.path.name
    with _discarded_on_failure(staged):
        copy = model.clone()
        allow_plain_initializers(copy)
        _untyped_initializers(copy)
        data_name = name + ".data" if external else None
        sparse = not external and sparse_marks
        if not external and not sparse and total >= SERIALIZE_WHOLE_BYTES:
            _write_streamed(copy, staged.path)
        elif sparse:
            inline_external(copy, keep_large=False)
            staged.path.write_bytes(serialized(copy).SerializeToString())
        else:
            inline_external(copy, keep_large=external)
            ir.save(
                copy,
                staged.path,
                external_data=data_name,
                size_threshold_bytes=EXTERNAL_THRESHOLD_BYTES,
            )
        if data_name is not None and (staged.folder / data_name).exists():
            staged.data_path = staged.folder / data_name
    return staged


def _new_stage(target: OutputTarget) -> StagedModel:
    """An empty stage for ``target``: a private folder next to it, the file under its name.

    Raises:
        OutputError: The folder cannot be made.
    """
    parent = target.dest.parent if target.dest is not None else None
    name = target.dest.name if target.dest is not None else "model.onnx"
    try:
        place = Staging(parent)
    except OSError as exc:
        raise OutputError(f"{target.label}: cannot write: {exc.strerror or exc}") from exc
    return StagedModel(target, place.folder, place.folder / name, None, place)


@contextlib.contextmanager
def _discarded_on_failure(staged: StagedModel) -> Iterator[None]:
    """Discard ``staged`` if the block fails; an OSError becomes a one-line OutputError."""
    try:
        yield
    except OSError as exc:
        staged.discard()
        raise OutputError(f"{staged.target.label}: cannot write: {exc.strerror or exc}") from exc
    except BaseException:
        staged.discard()
        raise


def stage_copy(source: Path, target: OutputTarget) -> StagedModel:
    """Stage a model file written earlier, byte for byte, for ``target`` (``auto``'s choice).

    A model with external data is loaded and staged again instead: the data file's name is
    written inside the model, and it follows the output's name.

    Raises:
        OutputError: The copy failed (nothing is left behind).
    """
    if source.with_name(source.name + ".data").exists():
        return stage_model(load_model(str(source)).model, target)
    staged = _new_stage(target)
    with _discarded_on_failure(staged):
        shutil.copyfile(source, staged.path)
    return staged


def load_staged(staged_model: StagedModel) -> ir.Model:
    """The staged model read back with its tensors memory-mapped from the staged data file.

    After staging with external data, this lets the in-memory copies a technique made go
    before onnxruntime loads its own (holding both took twice the model's size). The mapping
    survives the move into place (same inode) and the removal of the temporary folder.
    """
    proto = onnx.ModelProto()
    proto.ParseFromString(staged_model.path.read_bytes())
    model = deserialize(proto, staged_model.target.label)
    ir.external_data.set_base_dir(model.graph, str(staged_model.folder.resolve()))
    return model


def _untyped_initializers(model: ir.Model) -> None:
    """Drop the type and shape of initializers that are not graph inputs (a private copy).

    onnx_ir writes them into ``value_info`` as well, where the tensor already says both: 4.6 KB
    (2 %) of value_info that basic-pitch's 230 KB model did not have, on every result.
    """
    for graph in model.graphs():
        listed = {id(v) for v in graph.inputs}
        for value in graph.initializers.values():
            if id(value) not in listed and value.const_value is not None:
                value.type = None
                value.shape = None


def model_bytes(model: ir.Model) -> bytes:
    """Serialize a model whose tensors all fit in one protobuf (for onnxruntime sessions)."""
    copy = model.clone()
    allow_plain_initializers(copy)
    inline_external(copy, keep_large=False)
    if has_sparse_marks(copy):
        return serialized(copy).SerializeToString()
    return ir.serde.serialize_model(copy).SerializeToString()


# --- the streamed writer ---------------------------------------------------------------------


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
        tensor = in_memory(tensor)
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
        inline_external(model, keep_large=False)
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
