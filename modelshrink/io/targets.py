"""Where a command writes: every path it will write is decided and checked here, before any work.

A command writes up to three things: the model (``-o``), the model's external data
(``OUTPUT.data``, when tensors go to a side file) and the report (``--report``).
:func:`plan_writes` resolves each of them and refuses, with one line and exit code 2, when

- two of them are the same file, or one is a file the command reads (the input model, its
  external data, ``--data``, a teacher): compared by device and inode, so symbolic and hard
  links are seen through;
- a folder is missing, is not a folder, or entries cannot be created in it (tried, not guessed
  from permission bits);
- a file exists and ``--force`` was not given;
- the path is something that cannot be written: a directory, a block device, a socket, a
  dangling or looping symbolic link, or a terminal for model bytes.

What each kind of path becomes:

- a regular file, or a path that does not exist yet: written to a staging folder beside it and
  renamed into place (see :mod:`modelshrink.io.staging`);
- a symbolic link to a regular file: the link stays, its *target* is replaced the same way;
- a character device (``/dev/null``), a FIFO, ``/dev/stdout`` or ``/proc/self/fd/N``, or a link
  to one: written through as a stream, like ``-o -``, never replaced and needing no ``--force``.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from modelshrink.errors import ConfigError, TargetError
from modelshrink.io.staging import probe_writable, sweep_stale

__all__ = [
    "STDIO",
    "OutputTarget",
    "ReportTarget",
    "Sink",
    "WritePlan",
    "plan_writes",
]

STDIO = "-"
_FD_FOLDER = re.compile(r"/proc/(self|thread-self|\d+)(/task/\d+)?/fd")
_MAX_LINKS = 40
_READ_FOLDER_DEPTH = 2


@dataclass(frozen=True)
class Sink:
    """A destination written through as a byte stream, never created or replaced.

    Attributes:
        label: How messages name it.
        fd: A descriptor of this process to write to (``/proc/self/fd/N``); 1 is stdout.
        path: A character device or FIFO, opened for writing when the bytes are ready.
        identity: ``(st_dev, st_ino)`` of what it writes to, when known.
        char_device: Whether it is a character device (``/dev/null``, a terminal).
    """

    label: str
    fd: int | None = None
    path: Path | None = None
    identity: tuple[int, int] | None = None
    char_device: bool = False

    @property
    def is_stdout(self) -> bool:
        """Whether it writes to this process's stdout."""
        return self.fd == 1 or (self.fd is None and self.path is None)


STDOUT = Sink("<stdout>")


@dataclass(frozen=True)
class OutputTarget:
    """Where a result model goes: a file replaced atomically, or a stream.

    Attributes:
        dest: The regular file to create or replace (a symbolic link's target), or None when
            the model is streamed (to ``sink``, or stdout).
        force: Replace existing files (the model and its external data).
        external_data: Write tensors to ``<name>.data``: True, False, or None for "when
            the model is too large for one protobuf, or the input kept its tensors so".
        input_external: An input model kept its tensors in external data files.
        sink: Where a streamed model goes (None: stdout).
        shown: The path as the user gave it.
        durable: Flush a file to disk before it replaces an existing one (user outputs; not the
            temporary copies made for onnxruntime).
    """

    dest: Path | None
    force: bool = False
    external_data: bool | None = None
    input_external: bool = False
    sink: Sink | None = None
    shown: str | None = None
    durable: bool = False

    @property
    def label(self) -> str:
        """How the user named it."""
        if self.shown is not None:
            return self.shown
        return "<stdout>" if self.dest is None else str(self.dest)

    def data_path(self) -> Path | None:
        """The external data file this output would write next to itself."""
        return None if self.dest is None else self.dest.with_name(self.dest.name + ".data")


@dataclass(frozen=True)
class ReportTarget:
    """Where the JSON report goes: a file replaced atomically, or a stream.

    Attributes:
        shown: The path as the user gave it.
        dest: The regular file to create or replace, or None when streamed to ``sink``.
        sink: The stream, when ``dest`` is None.
        force: Replace an existing file.
    """

    shown: str
    dest: Path | None
    sink: Sink | None = None
    force: bool = False

    @property
    def label(self) -> str:
        """How the user named it."""
        return self.shown


@dataclass(frozen=True)
class WritePlan:
    """Every path a command will write, checked.

    Attributes:
        output: The model's target, or None for commands that write no model.
        report: The report's target, or None without ``--report``.
        files: Other files a command writes, by flag (``--plot``), planned like the report.
        swept: Staging folders of dead processes removed from the folders written to.
    """

    output: OutputTarget | None = None
    report: ReportTarget | None = None
    files: Mapping[str, ReportTarget] = field(default_factory=dict)
    swept: tuple[Path, ...] = field(default=(), repr=False)


# --- resolving one path ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Resolved:
    """What a path the user gave turns out to be."""

    flag: str
    shown: str
    file: Path | None = None  # regular file (existing or not) to replace atomically
    exists: bool = False
    sink: Sink | None = None
    via_link: bool = False  # reached through a symbolic link (``file`` is the final target)


def _fail(flag: str, shown: str, why: str) -> TargetError:
    return TargetError(f"{flag} {shown}: {why}")


def _raise(error: Exception) -> None:
    raise error


def _fd_of_link(path: str) -> int | None:
    """N when ``path`` is ``/proc/<this process>/fd/N`` (also via ``/dev/fd``, ``/proc/self``)."""
    folder, name = os.path.split(path)
    match = _FD_FOLDER.fullmatch(os.path.realpath(folder))
    if match is None or not name.isdigit():
        return None
    who = match.group(1)
    if who in ("self", "thread-self") or int(who) == os.getpid():
        return int(name)
    return None


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _resolve(flag: str, shown: str) -> _Resolved:
    """Follow ``shown`` through symbolic links to what will be written."""
    if not shown:
        raise ConfigError(f"{flag}: the path is empty")
    hop = shown
    via_link = False
    for _ in range(_MAX_LINKS):
        fd = _fd_of_link(os.path.abspath(hop))
        if fd is not None:
            return _fd_sink(flag, shown, fd)
        try:
            st = os.lstat(hop)
        except FileNotFoundError:
            if via_link:
                raise _fail(
                    flag,
                    shown,
                    f"a symbolic link to '{hop}', which does not exist; create it or pass another path",
                ) from None
            return _Resolved(flag, shown, file=Path(shown))
        except OSError as exc:
            raise _fail(flag, shown, f"cannot be examined: {exc.strerror or exc}") from None
        if not stat.S_ISLNK(st.st_mode):
            final = Path(os.path.realpath(hop)) if via_link else Path(hop)
            return _classify(flag, shown, final, st, via_link=via_link)
        target = os.readlink(hop)
        hop = os.path.join(os.path.dirname(hop), target)
        via_link = True
    raise _fail(flag, shown, "too many levels of symbolic links")


def _fd_sink(flag: str, shown: str, fd: int) -> _Resolved:
    try:
        st = os.fstat(fd)
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        raise _fail(flag, shown, f"descriptor {fd} is not open in this process") from None
    if access not in (os.O_WRONLY, os.O_RDWR):
        raise _fail(flag, shown, f"descriptor {fd} is not open for writing")
    sink = Sink(shown, fd=fd, identity=(st.st_dev, st.st_ino), char_device=stat.S_ISCHR(st.st_mode))
    return _Resolved(flag, shown, sink=sink, via_link=True)


def _classify(flag: str, shown: str, path: Path, st: os.stat_result, *, via_link: bool) -> _Resolved:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return _Resolved(flag, shown, file=path, exists=True, via_link=via_link)
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        if not os.access(path, os.W_OK):
            raise _fail(flag, shown, f"{_kind(mode)} this process may not write to")
        sink = Sink(shown, path=path, identity=(st.st_dev, st.st_ino), char_device=stat.S_ISCHR(mode))
        return _Resolved(flag, shown, sink=sink, via_link=via_link)
    if stat.S_ISDIR(mode):
        example = Path(shown) / ("model.onnx" if flag == "-o" else "report.json")
        raise _fail(flag, shown, f"is a directory; name the file, e.g. {example}")
    raise _fail(flag, shown, f"is {_kind(mode)}; refusing to write to it")


# --- identities --------------------------------------------------------------------------------


def _identity(path: Path) -> tuple[object, ...]:
    """Device and inode when the file exists (links seen through), else its resolved path."""
    try:
        st = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    return ("inode", st.st_dev, st.st_ino)


def _same(a: Path, b: Path) -> bool:
    return _identity(a) == _identity(b) or os.path.realpath(a) == os.path.realpath(b)


def _read_files(reads: Iterable[str | os.PathLike[str] | None]) -> Iterator[Path]:
    """Every file read: the paths themselves, and the files inside folders (``--data``)."""
    for item in reads:
        if item is None or str(item) in ("", STDIO):
            continue
        path = Path(item)
        if path.is_dir():
            yield from _files_in(path, _READ_FOLDER_DEPTH)
        else:
            yield path


def _files_in(folder: Path, depth: int) -> Iterator[Path]:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_dir():
                if depth > 1:
                    yield from _files_in(Path(entry.path), depth - 1)
            else:
                yield Path(entry.path)
        except OSError:
            continue


def _stdout_identity() -> tuple[int, int] | None:
    try:
        st = os.fstat(1)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


# --- the plan --------------------------------------------------------------------------------


@dataclass
class _Write:
    """One planned write, for the cross checks."""

    label: str  # "-o out.onnx", "--report r.json", "external data out.onnx.data"
    file: Path | None = None
    sink: Sink | None = None


def plan_writes(
    *,
    output: str | None = None,
    report: str | os.PathLike[str] | None = None,
    reads: Iterable[str | os.PathLike[str] | None] = (),
    force: bool = False,
    external_data: bool | None = None,
    input_external: bool = False,
    json_stdout: bool = False,
    stdout_isatty: bool | None = None,
    files: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> WritePlan:
    """Decide and check every path a command will write, before it reads or computes anything.

    Args:
        output: ``-o``: a path or ``-``; None for commands that write no model.
        report: ``--report``: a path, or ``-`` for stdout.
        reads: Every file the command reads (input models, their external data, ``--data``,
            a teacher); folders stand for the files inside them.
        force: ``--force``: existing files may be replaced.
        external_data: ``--external-data`` / ``--no-external-data`` / None (automatic).
        input_external: The input model keeps its tensors in external data (known once it is
            loaded): then the output does too, unless ``--no-external-data``.
        json_stdout: ``--json``: stdout carries the report.
        stdout_isatty: Override terminal detection (tests).
        files: Other files written, by flag (``{"--plot": "pareto.png"}``; None values skipped):
            checked like the report (folder, existing file, collisions).

    Returns:
        The plan: where the model and the report go.

    Raises:
        TargetError: A path is refused (see the module docstring); exit code 2.
        ConfigError: Contradictory flags (external data on a stream).
    """
    writes: list[_Write] = []
    later: list[Callable[[], None]] = []  # checks that matter only if the paths do not collide
    out_target = None
    if output is not None:
        out_target = _plan_output(output, force, external_data, input_external, stdout_isatty, writes, later)
    report_target = None
    if report is not None:
        report_target = _plan_report(str(report), force, writes, later)
    extra = {
        flag: _plan_report(str(path), force, writes, later, flag=flag)
        for flag, path in (files or {}).items()
        if path is not None
    }
    if json_stdout:
        writes.append(_Write("--json", sink=STDOUT))
    _check_reads(writes, list(_read_files(reads)))
    _check_pairs(writes)
    for check in later:
        check()
    swept: list[Path] = []
    folders = {w.file.parent for w in writes if w.file is not None}
    if out_target is not None and out_target.dest is None:
        folders.add(Path(tempfile.gettempdir()))  # streamed models are staged there
    for folder in sorted(folders, key=str):
        swept.extend(sweep_stale(folder))
    return WritePlan(out_target, report_target, extra, tuple(swept))


def _check_folder(flag: str, shown: str, file: Path) -> None:
    folder = file.parent
    if not folder.exists():
        raise _fail(flag, shown, f"folder '{folder}' does not exist; create it first")
    if not folder.is_dir():
        raise _fail(flag, shown, f"'{folder}' is not a folder")
    error = probe_writable(folder)
    if error is not None:
        raise _fail(flag, shown, f"folder '{folder}' is not writable ({error.strerror or error})")


def _plan_output(
    output: str,
    force: bool,
    external_data: bool | None,
    input_external: bool,
    stdout_isatty: bool | None,
    writes: list[_Write],
    later: list[Callable[[], None]],
) -> OutputTarget:
    if output == STDIO:
        isatty = sys.stdout.isatty() if stdout_isatty is None else stdout_isatty
        if isatty:
            raise TargetError("refusing to write an ONNX model to a terminal; use -o FILE or redirect stdout")
        if external_data:
            raise ConfigError("--external-data needs an output path, not '-o -'")
        writes.append(_Write("-o -", sink=STDOUT))
        return OutputTarget(None, force, external_data, input_external, shown="<stdout>", durable=True)
    resolved = _resolve("-o", output)
    if resolved.sink is not None:
        sink = resolved.sink
        if sink.is_stdout:
            isatty = sys.stdout.isatty() if stdout_isatty is None else stdout_isatty
        else:
            isatty = _is_terminal(sink)
        if isatty:
            raise _fail("-o", output, "is a terminal; refusing to write an ONNX model to it")
        if external_data:
            raise ConfigError(
                f"--external-data needs a file to write next to; -o {output} is {_sink_kind(sink)}"
            )
        writes.append(_Write(f"-o {output}", sink=sink))
        return OutputTarget(None, force, external_data, input_external, sink=sink, shown=output, durable=True)
    assert resolved.file is not None
    dest = resolved.file
    _check_folder("-o", output, dest)
    if resolved.exists and not force:
        later.append(lambda: _raise(_fail("-o", output, "already exists; pass --force to overwrite it")))
    writes.append(_Write(f"-o {output}", file=dest))
    target = OutputTarget(dest, force, external_data, input_external, shown=output, durable=True)
    data = target.data_path()
    if data is not None and external_data is not False:
        certain = bool(external_data) or input_external
        writes.append(_Write(f"-o {output} (its external data '{data}')", file=data))
        if certain:
            link_folder = Path(output).parent if resolved.via_link else None
            later.append(lambda: _check_sidecar(output, data, force, link_folder=link_folder))
    return target


def _check_sidecar(output: str, data: Path, force: bool, *, link_folder: Path | None) -> None:
    """The external data file that will be written next to the model."""
    if link_folder is not None and os.path.realpath(link_folder) != os.path.realpath(data.parent):
        raise _fail(
            "-o",
            output,
            f"is a symbolic link into another folder ('{data.parent}'); the model's "
            "external data would be looked for next to the link by some tools and next to its "
            "target by others; pass the target's path, or --no-external-data",
        )
    try:
        st = os.lstat(data)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _fail("-o", output, f"its external data '{data}' cannot be examined: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else _kind(st.st_mode)
        raise _fail(
            "-o",
            output,
            f"its external data would replace '{data}', which is {what}; remove it or choose another output",
        )
    if not force:
        raise _fail(
            "-o",
            output,
            f"its external data file '{data}' already exists; pass --force to "
            "overwrite it, or choose another output",
        )


def _plan_report(
    report: str,
    force: bool,
    writes: list[_Write],
    later: list[Callable[[], None]],
    *,
    flag: str = "--report",
) -> ReportTarget:
    if report == STDIO:
        writes.append(_Write(f"{flag} -", sink=STDOUT))
        return ReportTarget("<stdout>", None, STDOUT, force)
    resolved = _resolve(flag, report)
    if resolved.sink is not None:
        writes.append(_Write(f"{flag} {report}", sink=resolved.sink))
        return ReportTarget(report, None, resolved.sink, force)
    assert resolved.file is not None
    _check_folder(flag, report, resolved.file)
    if resolved.exists and not force:
        later.append(lambda: _raise(_fail(flag, report, "already exists; pass --force to overwrite it")))
    writes.append(_Write(f"{flag} {report}", file=resolved.file))
    return ReportTarget(report, resolved.file, None, force)


def _is_terminal(sink: Sink) -> bool:
    if not sink.char_device or (sink.path is None and sink.fd is None):
        return False
    if sink.fd is not None:
        return os.isatty(sink.fd)
    assert sink.path is not None
    try:
        fd = os.open(sink.path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.isatty(fd)
    finally:
        os.close(fd)


def _sink_kind(sink: Sink) -> str:
    if sink.fd is not None:
        return f"descriptor {sink.fd}"
    return "a character device" if sink.char_device else "a FIFO"


def _sink_identity(sink: Sink) -> tuple[int, int] | None:
    return _stdout_identity() if sink.is_stdout and sink.identity is None else sink.identity


def _check_reads(writes: list[_Write], reads: list[Path]) -> None:
    """No write may land on a file the command reads."""
    if not reads:
        return
    read_ids = {_identity(p): p for p in reads}
    read_real = {os.path.realpath(p): p for p in reads}
    for write in writes:
        if write.file is not None:
            hit = read_ids.get(_identity(write.file)) or read_real.get(os.path.realpath(write.file))
        elif write.sink is not None and not write.sink.char_device:
            ident = _sink_identity(write.sink)
            hit = read_ids.get(("inode", *ident)) if ident is not None else None
        else:
            hit = None
        if hit is not None:
            raise TargetError(
                f"{write.label}: would overwrite the input '{hit}' (this command reads it); choose another path"
            )


def _check_pairs(writes: list[_Write]) -> None:
    """No two writes may land on the same file or stream."""
    for i, a in enumerate(writes):
        for b in writes[i + 1 :]:
            if _collide(a, b):
                raise TargetError(
                    f"{a.label} and {b.label} would write to the same file; choose different paths"
                )


def _collide(a: _Write, b: _Write) -> bool:
    if a.file is not None and b.file is not None:
        return _same(a.file, b.file)
    if a.sink is not None and b.sink is not None:
        if a.sink.char_device and b.sink.char_device:
            return False  # /dev/null twice, or a terminal: nothing is lost
        ia, ib = _sink_identity(a.sink), _sink_identity(b.sink)
        return (a.sink.is_stdout and b.sink.is_stdout) or (ia is not None and ia == ib)
    file, sink = (a.file, b.sink) if a.file is not None else (b.file, a.sink)
    assert file is not None and sink is not None
    ident = _sink_identity(sink)
    return ident is not None and not sink.char_device and _identity(file) == ("inode", *ident)
