"""The teacher's outputs for any rows of the training data, without holding them all.

Two ways, the same numbers:

- *cached* (the default when every target has a batch axis): the teacher runs once over all
  rows, in chunks of rows in index order within each group of rows, and its outputs go to a
  row store in a temporary folder (:class:`modelshrink.dataset.RowStore`, in
  :func:`modelshrink.io.temporary_folder`, swept if the process is killed); a batch reads its
  rows back. One teacher pass for the whole run.
- *per batch*: the teacher runs on each batch as it is fed. Used when some target has no batch
  axis (its value cannot be split into rows), or when the cache would take more than half the
  free space of the temporary folder.

Both keep memory bounded by a batch (or a chunk), whatever the size of the data. Which is
faster depends on what dominates (``bench/bench_distill.py`` measures both): where the models'
arithmetic does (real models; the sample models), the cache, since the teacher's forward pass
is a third or more of a training step and it runs once instead of every epoch (per batch cost
10-20 % more CPU over 5 epochs on the samples); where reading the data does (a model that
costs next to nothing per row), per batch, since the cache's pass reads the data once more.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from modelshrink.dataset import Dataset, RowStore
from modelshrink.errors import DataError
from modelshrink.runtime import Session

__all__ = ["TeacherTargets", "group_chunks", "teacher_targets"]

logger = logging.getLogger(__name__)


def group_chunks(groups: np.ndarray, rows: int, size: int, *, whole: bool = False) -> list[np.ndarray]:
    """Rows ``0..rows-1`` in index order, cut into chunks of ``size`` within each group (groups
    in order of their first row); ``whole`` drops a last chunk shorter than ``size``."""
    out: list[np.ndarray] = []
    members = groups[:rows]
    for g in dict.fromkeys(members.tolist()):
        idx = np.flatnonzero(members == g)
        count = len(idx) // size if whole else -(-len(idx) // size)
        out.extend(idx[i * size : (i + 1) * size] for i in range(count))
    return out


def _batch_axis(name: str, value: np.ndarray, rows: int, declared: int | None) -> int | None:
    if declared is not None and declared < value.ndim and value.shape[declared] == rows:
        return declared
    sizes = [a for a, n in enumerate(value.shape) if n == rows]
    if not sizes:
        return None
    return 0 if 0 in sizes else sizes[0]


def _head(value: np.ndarray, axis: int | None, rows: int) -> np.ndarray:
    """The first ``rows`` rows of ``value`` along ``axis`` (padding rows dropped)."""
    if axis is None or value.shape[axis] == rows:
        return value
    return np.take(value, np.arange(rows), axis=axis)


class TeacherTargets:
    """The teacher's outputs (and ``--match`` features) for any rows.

    Attributes:
        names: The teacher tensors returned.
        axes: Each one's batch axis (None: it has none).
        sample: Each one's value on the first chunk (for shapes and dtypes).
        cached: True when computed once into a row store; False when per batch.
    """

    def __init__(
        self,
        session: Session,
        names: Sequence[str],
        data: Dataset,
        sample: Mapping[str, np.ndarray],
        axes: Mapping[str, int | None],
        stores: Mapping[str, RowStore] | None,
    ) -> None:
        self.names = list(names)
        self.axes = dict(axes)
        self.sample = dict(sample)
        self.cached = stores is not None
        self._session = session
        self._data = data
        self._stores = dict(stores or {})

    def get(self, rows: np.ndarray, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The teacher's outputs for ``rows`` (whose inputs are ``feed``), batch axes in place."""
        if not self.cached:
            return _run(self._session, feed, self.names, self.axes, len(rows))
        out = {}
        for name in self.names:
            axis = self.axes[name]
            assert axis is not None
            stored = self._stores[name].read(rows)
            out[name] = stored if axis == 0 else np.moveaxis(stored, 0, axis)
        return out


def _run(
    session: Session,
    feed: Mapping[str, np.ndarray],
    names: Sequence[str],
    axes: Mapping[str, int | None],
    rows: int,
) -> dict[str, np.ndarray]:
    values = session.run({k: v for k, v in feed.items() if k in session.input_names}, list(names))
    out = {n: np.asarray(v) for n, v in zip(names, values, strict=True)}
    for name, value in out.items():
        axis = axes.get(name)
        if axis is not None and (axis >= value.ndim or value.shape[axis] != rows):
            raise DataError(
                f"the teacher's output '{name}' has shape {list(value.shape)} for a batch of {rows} "
                f"rows: its batch axis {axis} does not follow the batch"
            )
    return out


@contextlib.contextmanager
def teacher_targets(
    session: Session,
    names: Sequence[str],
    data: Dataset,
    *,
    rows: int,
    chunk: int,
    pad_to: int | None = None,
    declared: Mapping[str, int | None],
    folder: Callable[[], contextlib.AbstractContextManager[Path]] | None,
    progress: Callable[[int, int], None],
) -> Iterator[TeacherTargets]:
    """The teacher's outputs for rows ``0..rows-1`` of ``data``.

    Args:
        session: The teacher.
        names: Its tensors to return.
        data: The training rows.
        rows: How many of them are used.
        chunk: Rows per teacher run when caching (per group).
        pad_to: A fixed batch size: a shorter chunk is padded with copies of its last row
            (and the copies' outputs dropped).
        declared: Each tensor's batch axis from the teacher's declared output dims, if known.
        folder: A temporary folder for the cache (None: per batch).
        progress: ``progress(done, total)`` while the cache fills.
    """
    chunks = group_chunks(data.groups, rows, chunk)

    def padded(part: np.ndarray) -> np.ndarray:
        if pad_to is None or len(part) >= pad_to:
            return part
        return np.concatenate([part, np.repeat(part[-1:], pad_to - len(part))])

    first = padded(chunks[0])
    sample = _run(session, data.batch(first), names, {}, len(first))
    axes = {n: _batch_axis(n, v, len(first), declared.get(n)) for n, v in sample.items()}
    sample = {n: _head(v, axes[n], len(chunks[0])) for n, v in sample.items()}
    if folder is None or any(a is None for a in axes.values()):
        if folder is not None:
            missing = ", ".join(n for n, a in axes.items() if a is None)
            logger.info("teacher outputs without a batch axis (%s): computed per batch", missing)
        data.release()
        yield TeacherTargets(session, names, data, sample, axes, None)
        return
    with folder() as where:
        need = rows * sum(v.nbytes // max(len(chunks[0]), 1) for v in sample.values())
        free = shutil.disk_usage(where).free
        if need > free // 2:
            logger.info(
                "the teacher's outputs would take %d MB of the temporary folder's %d MB free: "
                "computed per batch",
                need >> 20,
                free >> 20,
            )
            yield TeacherTargets(session, names, data, sample, axes, None)
            return
        stores: dict[str, RowStore] = {}
        try:
            for i, name in enumerate(names):
                value = sample[name]
                axis = axes[name]
                assert axis is not None
                row_shape = tuple(np.delete(np.asarray(value.shape), axis).tolist())
                stores[name] = RowStore(where, f"teacher_{i}", rows, row_shape, value.dtype)
            for done, part in enumerate(chunks):
                outputs = sample
                if done:
                    full = padded(part)
                    outputs = _run(session, data.batch(full), names, axes, len(full))
                    outputs = {n: _head(v, axes[n], len(part)) for n, v in outputs.items()}
                data.release()
                for name, value in outputs.items():
                    axis = axes[name]
                    assert axis is not None
                    stores[name].write(part, np.moveaxis(value, axis, 0))
                progress(done + 1, len(chunks))
            yield TeacherTargets(session, names, data, sample, axes, stores)
        finally:
            for store in stores.values():
                store.close()
