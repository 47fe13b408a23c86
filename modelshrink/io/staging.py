"""Staged, atomic writes: private staging folders, and commits of several files as one unit.

Every file the tool writes to a path (a model, its external data, a report) is first written
into a staging folder next to its destination, ``.modelshrink-<pid>-<random>``, which holds a
``.lock`` file locked (``flock``) for as long as the process that made it lives. Then
:func:`commit_moves` moves the files into place:

- under an exclusive ``flock`` on every destination folder, so runs writing the same files
  commit one after the other, never interleaved. Whether a destination exists (when it may not
  be replaced) is checked again under that lock: a run that loses a race changes nothing;
- with SIGINT and SIGTERM held back until the last rename, so an interrupt never splits the
  unit (it is acted on right after);
- keeping each replaced file (a hard link in the staging folder) until every file is in place,
  so a failure half way puts the old files back.

A staging folder whose lock can be taken *and* whose creator's pid (in its name) is gone belongs
to a process killed before it could clean up: :func:`sweep_stale` removes it, and every run
sweeps the folders it writes to. The lock alone is not enough: a process creates the lock file
and then locks it, and a sweep that ran in between (three runs writing one folder on a loaded
machine: about once in 140 of the concurrency test's rounds) took the lock of a live run and
removed its folder while it was writing there.
Files that are never committed (a copy of a model written only for onnxruntime to read) go to
a :func:`temporary_folder` in the system temp folder, a staging folder like the others: one a
killed process left there is removed by the next.

What remains: a reader that does not take the folder lock can open a model between the
renames of its external data and of the model itself (microseconds) and see the new data
with the old graph; and a process killed with SIGKILL, or a power cut, exactly between those
renames leaves that pair. Nothing else can mix files of two runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from modelshrink.errors import OutputError

__all__ = [
    "STAGING_PREFIX",
    "Move",
    "Staging",
    "commit_moves",
    "fsync_path",
    "probe_writable",
    "signals_deferred",
    "sweep_stale",
    "temporary_folder",
    "write_stream",
]

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".modelshrink-"
_LOCK_NAME = ".lock"
# A staging folder without a lock file is being created (microseconds) or was left by a process
# killed right then: it is stale once its pid is gone and it is older than this.
_UNLOCKED_STALE_AFTER_S = 60.0
_STAGING_RE = re.compile(re.escape(STAGING_PREFIX) + r"(\d+)-")
_COPY_CHUNK = 1 << 20
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What link() fails with where a file system has no hard links (FAT, some network shares).
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK})


# --- signals ---------------------------------------------------------------------------------


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back inside the block; deliver the first one after it.

    Python runs signal handlers in the main thread between bytecodes, so a handler that raises
    (Ctrl-C's KeyboardInterrupt) could otherwise land between two renames that belong
    together. Outside the main thread this does nothing (handlers cannot be changed there).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        pending.append(signum)

    previous: dict[signal.Signals, Any] = {}
    for sig in _SIGNALS:
        handler = signal.getsignal(sig)
        if handler is None or handler == signal.SIG_IGN:
            continue  # installed outside Python, or ignored: leave it as it is
        previous[sig] = signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])


# --- staging folders -------------------------------------------------------------------------


class Staging:
    """A private folder next to a destination, locked for the life of this process.

    Attributes:
        folder: The folder (``.modelshrink-<pid>-<random>``).
    """

    def __init__(self, parent: Path | None) -> None:
        """Create the folder in ``parent`` (the system temp folder when None).

        Raises:
            OSError: The folder cannot be created there.
        """
        self.folder = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=parent))
        self._lock_fd: int | None = None
        try:
            self._lock_fd = os.open(
                self.folder / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if self._lock_fd is None:
                self.remove()
                raise
            # File systems without locks: the folder is still private; only a later run
            # cannot tell that this process is alive, and leaves the folder alone.
            logger.debug("cannot lock staging folder %s: %s", self.folder, exc)

    def remove(self) -> None:
        """Remove the folder and everything in it; safe to call twice."""
        with signals_deferred():
            shutil.rmtree(self.folder, ignore_errors=True)
            if self._lock_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._lock_fd)
                self._lock_fd = None


def probe_writable(folder: Path) -> OSError | None:
    """Whether entries can be created in ``folder``, by creating one (and removing it).

    ``os.access`` is not enough: root without CAP_DAC_OVERRIDE is told yes and then refused.
    """
    try:
        probe = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-probe-", dir=folder)
    except OSError as exc:
        return exc
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def _is_stale(path: Path) -> bool:
    """Whether a staging folder belongs to a process that is gone: its lock free, its pid dead."""
    match = _STAGING_RE.match(path.name)
    if match is None:
        return False
    try:
        fd = os.open(path / _LOCK_NAME, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            age = time.time() - path.lstat().st_mtime
        except OSError:
            return False
        return age > _UNLOCKED_STALE_AFTER_S and not _pid_alive(int(match.group(1)))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False  # locked: its process is alive (or locks are not supported here)
    if _pid_alive(int(match.group(1))):
        os.close(fd)  # not locked yet: its process made the lock file and is about to lock it
        return False
    os.close(fd)  # the lock goes with it; the folder is removed right after
    return True


def sweep_stale(folder: Path) -> list[Path]:
    """Remove staging folders in ``folder`` left by processes that are gone.

    Returns:
        The folders removed.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(STAGING_PREFIX):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        path = Path(entry.path)
        if _is_stale(path):
            logger.info("removing %s, left by a process that is gone", path)
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
    return removed


@contextlib.contextmanager
def temporary_folder() -> Iterator[Path]:
    """A private folder in the system temp folder, removed on exit, for files never committed.

    It is a :class:`Staging` folder (``.modelshrink-<pid>-<random>``, locked while this process
    lives), so one left behind by a process killed before it could clean up (SIGKILL, a power
    cut) is removed by the next call here, as by any run that stages a streamed model in the
    temp folder (:func:`sweep_stale`).

    Raises:
        OSError: The folder cannot be created.
    """
    sweep_stale(Path(tempfile.gettempdir()))
    place = Staging(None)
    try:
        yield place.folder
    finally:
        place.remove()


# --- committing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Move:
    """One staged file and where it goes.

    Attributes:
        src: The staged file (inside a staging folder).
        dest: Its destination.
        replace: Whether an existing destination may be replaced (``--force``).
        label: How messages name it (the path as the user gave it).
    """

    src: Path
    dest: Path
    replace: bool
    label: str


def fsync_path(path: Path) -> None:
    """Flush a file (or folder) to disk; a no-op where the file system cannot."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EROFS):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def _folder_locks(folders: Iterable[Path]) -> Iterator[None]:
    """Exclusive ``flock`` on each folder, taken in one order so two runs cannot deadlock."""
    fds: list[int] = []
    seen: set[tuple[int, int]] = set()
    try:
        for folder in sorted({os.path.realpath(f) for f in folders}):
            try:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                logger.debug("cannot open %s to lock it: %s", folder, exc)
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                os.close(fd)
                continue
            seen.add((st.st_dev, st.st_ino))
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:  # e.g. NFS emulating flock on a read-only descriptor
                logger.debug("cannot lock %s: %s", folder, exc)
        yield
    finally:
        for fd in reversed(fds):
            os.close(fd)  # releases its lock


def _keep_mode(src: Path, old: os.stat_result) -> None:
    """Give the staged file the permissions (and, as root, the owner) of the file it replaces."""
    with contextlib.suppress(OSError):
        os.chmod(src, stat.S_IMODE(old.st_mode))
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            os.chown(src, old.st_uid, old.st_gid)


@dataclass
class _Placed:
    move: Move
    backup: Path | None  # the file it replaced, kept until the unit is complete


def _place(move: Move) -> _Placed:
    try:
        old = os.lstat(move.dest)
    except FileNotFoundError:
        old = None
    if old is not None and not move.replace:
        raise OutputError(f"{move.label}: appeared while working; pass --force to overwrite it")
    backup = None
    if old is not None:
        _keep_mode(move.src, old)
        candidate = move.src.with_name(move.src.name + ".replaced")
        try:
            os.link(move.dest, candidate, follow_symlinks=False)
            backup = candidate
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            backup = None  # a file system without hard links: a later failure cannot restore it
    if move.replace:
        os.replace(move.src, move.dest)
    else:
        try:  # link() never replaces: a file that appeared from a writer without the lock stays
            os.link(move.src, move.dest)
        except FileExistsError as exc:
            raise OutputError(f"{move.label}: appeared while working; pass --force to overwrite it") from exc
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            if os.path.lexists(move.dest):
                raise OutputError(
                    f"{move.label}: appeared while working; pass --force to overwrite it"
                ) from None
            os.replace(move.src, move.dest)
    return _Placed(move, backup)


def _undo(placed: Sequence[_Placed]) -> None:
    """Put back what a half-done commit replaced (best effort: it is already failing)."""
    for item in reversed(placed):
        try:
            if item.backup is not None:
                os.replace(item.backup, item.move.dest)
            else:
                os.unlink(item.move.dest)
        except OSError as exc:
            logger.warning("could not restore %s: %s", item.move.dest, exc)


def commit_moves(moves: Sequence[Move], *, durable: bool = False) -> None:
    """Move staged files into place as one unit (see the module docstring).

    Args:
        moves: The files, in the order they are put in place (a file that others read, such
            as external data, before the file that reads it).
        durable: Flush a staged file to disk before it replaces an existing one, so that a crash
            right after cannot leave an empty file where the user's was. (New files are not
            flushed: a crash can only lose them. Flushing every output cost the test suite a
            third more time on a busy disk.)

    Raises:
        OutputError: A destination that may not be replaced appeared meanwhile (nothing was
            changed), or the file system refused a rename or a flush (what was replaced is put
            back).
    """
    if not moves:
        return
    if durable:
        for move in moves:
            if os.path.lexists(move.dest):
                try:
                    fsync_path(move.src)
                except OSError as exc:
                    raise OutputError(f"{move.label}: cannot write: {exc.strerror or exc}") from exc
    with _folder_locks(m.dest.parent for m in moves), signals_deferred():
        for move in moves:  # checked again under the lock: a refusal changes nothing
            if not move.replace and os.path.lexists(move.dest):
                raise OutputError(f"{move.label}: appeared while working; pass --force to overwrite it")
        placed: list[_Placed] = []
        current = moves[0]
        try:
            for move in moves:
                current = move
                placed.append(_place(move))
        except OutputError:
            _undo(placed)
            raise
        except OSError as exc:
            _undo(placed)
            raise OutputError(f"{current.label}: cannot write: {exc.strerror or exc}") from exc
        except BaseException:
            _undo(placed)
            raise


# --- streams ---------------------------------------------------------------------------------


def write_stream(
    source: Path | bytes, *, stream: BinaryIO | None = None, fd: int | None = None, path: Path | None = None
) -> None:
    """Write a staged file (or bytes) through to a stream: an open stream, a descriptor of
    this process, or a character device / FIFO opened by path (never created or replaced).

    Raises:
        OSError: The write failed.
    """
    if stream is not None:
        _copy(source, stream.write)
        stream.flush()
        return
    if fd is not None:
        _copy(source, lambda chunk: _write_all(fd, chunk))
        return
    assert path is not None
    out = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        _copy(source, lambda chunk: _write_all(out, chunk))
    finally:
        os.close(out)


def _write_all(fd: int, chunk: bytes) -> None:
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view) :]


def _copy(source: Path | bytes, write: Any) -> None:
    if isinstance(source, bytes):
        write(source)
        return
    with source.open("rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            write(chunk)
