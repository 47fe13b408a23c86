"""Training rows from ``--data``, read batch by batch, never loaded whole.

A *row* is one element of a batch: ``input[i]`` of ``input [batch, samples]`` and
``state[:, i]`` of ``state [2, batch, 128]`` are the same row. Each input stacks rows along its
own batch axis (found from the declared dims by :func:`modelshrink.inputs.batch_axes`, or set
with ``--batch-axis``). An input without one (a scalar ``sr``, a fixed-size input) is fed as it
is, one value per batch: rows are grouped by the values of those inputs, and a batch never
mixes groups.

:func:`open_dataset` reads the formats of :mod:`modelshrink.feeds` (the same meaning, all rows
instead of the first 128 feeds):

- ``.npz``, ``.npy``, a folder of ``NAME.npy``: memory-mapped (``savez_compressed`` members
  are read whole); a batch reads only its rows, and the pages read are dropped from the process
  after each batch (:meth:`feeds.DataArrays.release`), so memory does not grow with the data;
- a folder of ``.npz`` files (or ``.npy`` for a one-input model), one row or one batch per
  file: the files' headers are read once (row counts, values of inputs without a batch axis,
  labels), and a batch reads the files holding its rows;
- ONNX ``test_data_set_*`` folders, one feed each, read when a batch needs them;
- feeds already in memory (:func:`dataset_from_feeds`, for the Python API).

Shuffling is the caller's (:mod:`modelshrink.techniques.distill.trainer`): this module only
answers "these rows, please", the same bytes for the same rows whatever the source.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from modelshrink.errors import DataError
from modelshrink.feeds import (
    DataArrays,
    Feed,
    Feeds,
    check_flags,
    check_names,
    check_shape,
    data_files,
    data_layouts,
    describe_rows,
    file_feed,
    fill_values,
    find_test_data_sets,
    input_dtype,
    load_npy,
    read_data_arrays,
    read_test_data_set,
    take_rows,
)
from modelshrink.inputs import BatchAxis, InputSpec, Scalar, input_specs
from modelshrink.inputs import batch_axes as find_batch_axes
from modelshrink.options import RunOptions, parse_rows

__all__ = ["Dataset", "RowStore", "dataset_from_feeds", "open_dataset", "open_run_dataset"]

logger = logging.getLogger(__name__)


def _key(values: Mapping[str, np.ndarray]) -> tuple[Any, ...]:
    return tuple((k, v.dtype.str, v.shape, v.tobytes()) for k, v in sorted(values.items()))


def _shown(value: np.ndarray) -> str:
    return str(value.item()) if value.size == 1 else f"array {list(value.shape)}"


class Dataset:
    """The rows of ``--data``, any of them as one feed (:meth:`batch`).

    Attributes:
        source: Where the rows come from, for the report.
        rows: How many rows.
        axes: Each input's batch axis and how it was found.
        labels: ``--labels``: one integer array entry per row, or None.
        labels_name: The name of the labels array.
        warnings: Things the user should know (casts, ignored arrays).
        groups: Group of each row (rows of one group have the same values in the inputs without
            a batch axis); ``group_values[g]`` holds those values.
    """

    def __init__(
        self,
        source: str,
        *,
        rows: int,
        axes: Mapping[str, BatchAxis],
        read: Callable[[np.ndarray], dict[str, np.ndarray]],
        groups: np.ndarray,
        group_values: Sequence[Mapping[str, np.ndarray]],
        labels: np.ndarray | None = None,
        labels_name: str | None = None,
        warnings: Sequence[str] = (),
        release: Callable[[], None] | None = None,
    ) -> None:
        if rows < 1:
            raise DataError(f"--data {source}: no rows")
        if labels is not None:
            labels = np.asarray(labels)
            if len(labels) != rows:
                raise DataError(
                    f"--labels {labels_name}: {len(labels)} labels for {rows} input rows in {source}"
                )
            if labels.dtype.kind not in "iu":
                raise DataError(f"--labels {labels_name}: labels must be integers, got {labels.dtype}")
            labels = labels.astype(np.int64)
        self.source = source
        self.rows = rows
        self.axes = dict(axes)
        self.labels = labels
        self.labels_name = labels_name
        self.warnings = tuple(dict.fromkeys(warnings))
        self.groups = groups
        self.group_values = tuple(dict(v) for v in group_values)
        self._read = read
        self._release = release

    @property
    def batched(self) -> bool:
        """True when some input has a batch axis (else every batch is one row)."""
        return any(a.axis is not None for a in self.axes.values())

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The inputs of ``rows`` (all of one group), each stacked along its batch axis.

        Raises:
            ValueError: The rows span several groups (a caller's bug).
        """
        rows = np.asarray(rows, dtype=np.int64)
        group = 0
        if len(self.group_values) > 1:
            groups = np.unique(self.groups[rows])
            if len(groups) != 1:
                raise ValueError(f"a batch spans {len(groups)} groups of rows")
            group = int(groups[0])
        feed = self._read(rows)
        for name, value in self.group_values[group].items():
            feed.setdefault(name, value)
        return feed

    def release(self) -> None:
        """Drop the pages of memory-mapped data read so far (call between batches)."""
        if self._release is not None:
            self._release()

    def describe(self) -> list[dict[str, Any]]:
        """Per input: its batch axis, how it was found, and for inputs without one how many
        values (groups of rows) the data holds."""
        out = []
        for name, axis in self.axes.items():
            entry: dict[str, Any] = {"input": name, "batch_axis": axis.axis, "why": axis.why}
            if axis.axis is None:
                entry["values"] = len({_key({name: v[name]}) for v in self.group_values if name in v})
            out.append(entry)
        return out

    def batching_text(self) -> str:
        """One line for the report: ``input: axis 0 ...; state: axis 1 ...; sr: no batch axis
        (a scalar), 2 values``."""
        parts = []
        for entry in self.describe():
            if entry["batch_axis"] is None:
                parts.append(f"'{entry['input']}' fed as it is ({entry['why']}), {entry['values']} value(s)")
            else:
                parts.append(f"'{entry['input']}' along axis {entry['batch_axis']} ({entry['why']})")
        text = "; ".join(parts)
        count = len(self.group_values)
        if count > 1:
            sizes = np.bincount(self.groups, minlength=count)
            shown = ", ".join(
                f"{' '.join(f'{k}={_shown(v)}' for k, v in self.group_values[g].items())}: {int(sizes[g])} rows"
                for g in range(min(count, 4))
            )
            more = f", ... ({count} groups)" if count > 4 else ""
            text += f"; rows grouped by those values, a batch never mixes groups ({shown}{more})"
        return text

    def select(self, rows: str) -> Dataset:
        """The rows ``--rows`` keeps (:func:`options.parse_rows`), renumbered from 0.

        Raises:
            DataError: It keeps none.
        """
        keep = parse_rows(rows)
        kept = np.asarray([i for i in range(self.rows) if keep(i, self.rows)], dtype=np.int64)
        if not len(kept):
            raise DataError(f"--data {self.source}: --rows {rows} selects none of its {self.rows} rows")
        read = self._read
        return Dataset(
            f"{self.source}, --rows {rows}",
            rows=len(kept),
            axes=self.axes,
            read=lambda picked: read(kept[np.asarray(picked, dtype=np.int64)]),
            groups=self.groups[kept],
            group_values=self.group_values,
            labels=self.labels[kept] if self.labels is not None else None,
            labels_name=self.labels_name,
            warnings=self.warnings,
            release=self._release,
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> Dataset:
        return self

    def __repr__(self) -> str:
        labels = f", labels '{self.labels_name}'" if self.labels_name else ""
        return f"{self.source}: {self.rows} rows{labels}"


# --- arrays ------------------------------------------------------------------------------------


def _group_ids(columns: Sequence[np.ndarray], items: int) -> tuple[np.ndarray, list[int]]:
    """Group of each item from its values (one array per input, items on axis 0), numbered in
    order of first appearance; and the first item of each group."""
    if not columns:
        return np.zeros(items, np.int64), [0]
    codes = []
    for column in columns:
        if column.dtype.kind == "O":  # strings: no fixed-width bytes to compare
            keys: dict[Any, int] = {}
            codes.append(np.array([keys.setdefault(repr(np.asarray(v).tolist()), len(keys)) for v in column]))
            continue
        flat = np.ascontiguousarray(column).reshape(items, -1)
        width = flat.dtype.itemsize * flat.shape[1]
        as_bytes = flat.view(np.dtype((np.void, width))).reshape(items)
        codes.append(np.unique(as_bytes, return_inverse=True)[1].reshape(items))
    _, first, inverse = np.unique(np.stack(codes, axis=1), axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank[inverse.reshape(items)], [int(first[i]) for i in order]


def _from_arrays(
    data: DataArrays,
    label: str,
    specs: Sequence[InputSpec],
    axes: Mapping[str, BatchAxis],
    input_shapes: Mapping[str, tuple[int, ...]],
    input_values: Mapping[str, Scalar],
    labels_name: str | None,
) -> Dataset:
    warnings: list[str] = []
    arrays = data.arrays
    check_names(arrays, specs, input_values, label, warnings, extra_ok=[labels_name] if labels_name else [])
    by_name = {s.name: s for s in specs}
    fed = [s for s in specs if s.name not in input_values]
    dtypes = {s.name: input_dtype(s.name, arrays[s.name].dtype, s, label, warnings) for s in fed}
    layouts, items = data_layouts(
        {s.name: arrays[s.name] for s in fed},
        specs,
        {k: a.axis for k, a in axes.items()},
        input_shapes,
        label,
    )
    batched = {n: r for n, r in layouts.items() if r.axis is not None}
    per_item = sorted({r.item_rows for r in batched.values()})
    if len(per_item) > 1:
        raise DataError(
            f"--data {label}: inputs have different numbers of rows ({describe_rows(batched, specs)}); "
            "each array holds its input's rows along the input's batch axis; if an input's batch "
            "axis is not the one shown, pass --batch-axis NAME:AXIS"
        )
    item_rows = per_item[0] if per_item else 1
    rows = items * item_rows
    for name, layout in layouts.items():
        if by_name[name].dims is not None:
            check_shape(name, np.asarray(layout.item(0)).shape, by_name[name], label)
    constant = {n: np.asarray(r.array, dtype=dtypes[n]) for n, r in layouts.items() if r.items is None}
    varying = {n: r for n, r in layouts.items() if r.axis is None and r.items is not None}
    names = sorted(varying)
    item_groups, firsts = _group_ids([np.asarray(varying[n].array)[:items] for n in names], items)
    group_values = [
        {**constant, **{n: np.array(varying[n].item(i), dtype=dtypes[n]) for n in names}} for i in firsts
    ]
    groups = (
        np.repeat(item_groups.astype(np.int32), item_rows) if item_rows > 1 else item_groups.astype(np.int32)
    )
    labels = np.array(arrays[labels_name]) if labels_name is not None else None

    def read(picked: np.ndarray) -> dict[str, np.ndarray]:
        feed = {n: np.asarray(r.rows(picked), dtype=dtypes[n]) for n, r in batched.items()}
        return _filled(feed, specs, axes, input_shapes, input_values, len(picked))

    source = f"{label} ({rows} rows)"
    # Kept on purpose (a duplicates pair with the other Dataset(...) in this module): the same
    # fields from two sources, files read lazily here and feeds in memory there; a helper would
    # only pass the same names through.
    return Dataset(
        source,
        rows=rows,
        axes=axes,
        read=read,
        groups=groups,
        group_values=group_values,
        labels=labels,
        labels_name=labels_name,
        warnings=warnings,
        release=data.release,
    )


def _filled(
    feed: dict[str, np.ndarray],
    specs: Sequence[InputSpec],
    axes: Mapping[str, BatchAxis],
    input_shapes: Mapping[str, tuple[int, ...]],
    input_values: Mapping[str, Scalar],
    count: int,
) -> dict[str, np.ndarray]:
    """``feed`` plus the inputs ``--input-value`` fills, with ``count`` rows on their batch axis."""
    if not input_values:
        return feed
    shapes = {}
    for name, shape in input_shapes.items():
        axis = axes[name].axis
        shapes[name] = tuple(count if a == axis else d for a, d in enumerate(shape))
    return fill_values(feed, specs, shapes, input_values, {name: a.axis for name, a in axes.items()})


# --- items: files, test data sets, feeds -------------------------------------------------------


class _Items:
    """Rows held by a sequence of feeds (files or in-memory), each one row or one batch."""

    def __init__(
        self,
        load: Callable[[int], Feed],
        counts: np.ndarray,
        axes: Mapping[str, BatchAxis],
        specs: Sequence[InputSpec],
        input_shapes: Mapping[str, tuple[int, ...]],
        input_values: Mapping[str, Scalar],
    ) -> None:
        self._load = load
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._axes = axes
        self._specs = specs
        self._shapes = input_shapes
        self._values = input_values

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        items = np.searchsorted(self._starts, rows, side="right") - 1
        within = rows - self._starts[items]
        axes = {n: a.axis for n, a in self._axes.items() if a.axis is not None and n not in self._values}
        feed: dict[str, np.ndarray] = {}
        for item in dict.fromkeys(items.tolist()):
            where = np.flatnonzero(items == item)
            source = self._load(item)  # files: memory-mapped, only the rows taken are read
            for n, axis in axes.items():
                part = take_rows(source[n], within[where], axis)
                if len(where) == len(rows):
                    feed[n] = part
                    continue
                if n not in feed:
                    shape = list(part.shape)
                    shape[axis] = len(rows)
                    feed[n] = np.empty(shape, dtype=part.dtype)
                index: tuple[Any, ...] = (*([slice(None)] * axis), where)
                feed[n][index] = part
        return _filled(feed, self._specs, self._axes, self._shapes, self._values, len(rows))


def _scan_items(
    count: int,
    load: Callable[[int], Feed],
    name_of: Callable[[int], str],
    axes: Mapping[str, BatchAxis],
    input_values: Mapping[str, Scalar],
    labels_name: str | None,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, np.ndarray]], np.ndarray | None]:
    """Rows per item, group of each item, the values of each group, and the labels."""
    batched = {n: a.axis for n, a in axes.items() if a.axis is not None and n not in input_values}
    plain = [n for n, a in axes.items() if a.axis is None and n not in input_values]
    counts = np.zeros(count, np.int64)
    item_groups = np.zeros(count, np.int32)
    keys: dict[tuple[Any, ...], int] = {}
    values: list[dict[str, np.ndarray]] = []
    labels: list[np.ndarray] = []
    for i in range(count):
        feed = load(i)
        sizes = {n: int(feed[n].shape[axis]) for n, axis in batched.items()}
        if len(set(sizes.values())) > 1:
            detail = ", ".join(f"{n}: {k} on axis {batched[n]}" for n, k in sizes.items())
            raise DataError(
                f"--data {name_of(i)}: inputs have different numbers of rows along their batch axes "
                f"({detail}); if an axis is wrong, pass --batch-axis NAME:AXIS"
            )
        counts[i] = next(iter(sizes.values()), 1)
        own = {n: np.array(feed[n]) for n in plain}
        key = _key(own)
        if key not in keys:
            keys[key] = len(values)
            values.append(own)
        item_groups[i] = keys[key]
        if labels_name is not None:
            if labels_name not in feed:
                raise DataError(f"--labels {labels_name}: {name_of(i)} has no array '{labels_name}'")
            lab = (
                np.asarray(feed[labels_name]).reshape(-1)
                if feed[labels_name].ndim == 0
                else feed[labels_name]
            )
            if len(lab) != counts[i]:
                raise DataError(
                    f"--labels {labels_name}: {len(lab)} labels for {counts[i]} rows in {name_of(i)}"
                )
            labels.append(np.asarray(lab))
    joined = np.concatenate(labels) if labels else None
    return counts, item_groups, values, joined


def _from_items(
    label: str,
    count: int,
    load: Callable[[int], Feed],
    name_of: Callable[[int], str],
    specs: Sequence[InputSpec],
    axes: Mapping[str, BatchAxis],
    input_shapes: Mapping[str, tuple[int, ...]],
    input_values: Mapping[str, Scalar],
    labels_name: str | None,
    warnings: Sequence[str],
    unit: str,
) -> Dataset:
    if count < 1:
        raise DataError(f"--data {label}: no {unit}")
    counts, item_groups, values, labels = _scan_items(count, load, name_of, axes, input_values, labels_name)
    groups = np.repeat(item_groups, counts)
    items = _Items(load, counts, axes, specs, input_shapes, input_values)
    rows = int(counts.sum())
    return Dataset(
        f"{label} ({rows} rows in {count} {unit})",
        rows=rows,
        axes=axes,
        read=items.read,
        groups=groups,
        group_values=values,
        labels=labels,
        labels_name=labels_name,
        warnings=warnings,
    )


def dataset_from_feeds(
    feeds: Feeds,
    *,
    labels: np.ndarray | None = None,
    labels_name: str | None = None,
    axes: Mapping[str, BatchAxis] | None = None,
) -> Dataset:
    """The rows of feeds already in memory (each feed one row or one batch).

    Args:
        feeds: Feeds from :func:`modelshrink.feeds.load_feeds`.
        labels: One label per row, or None.
        labels_name: The labels' name, for messages.
        axes: Batch axes (default: those the feeds were loaded with; axis 0 when unknown).

    Raises:
        DataError: No feeds, or feeds whose inputs disagree on their rows.
    """
    if not feeds.samples:
        raise DataError(f"--data {feeds.source}: no samples")
    if axes is None:
        first = feeds.samples[0]
        axes = {
            name: BatchAxis(
                name,
                feeds.batch_axes.get(name, 0 if np.ndim(first[name]) else None),
                "as the feeds were loaded",
            )
            for name in first
        }
    samples = feeds.samples
    counts, item_groups, values, _ = _scan_items(
        len(samples), lambda i: samples[i], lambda i: f"{feeds.source} sample {i}", axes, {}, None
    )
    groups = np.repeat(item_groups, counts)
    items = _Items(lambda i: samples[i], counts, axes, [], {}, {})
    # Kept on purpose (a duplicates pair with the other Dataset(...) in this module): the same
    # fields from two sources, files read lazily here and feeds in memory there; a helper would
    # only pass the same names through.
    return Dataset(
        feeds.source,
        rows=int(counts.sum()),
        axes=axes,
        read=items.read,
        groups=groups,
        group_values=values,
        labels=labels,
        labels_name=labels_name,
        warnings=feeds.warnings,
    )


# --- opening -----------------------------------------------------------------------------------


def open_dataset(
    model: ir.Model,
    data: str,
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    input_values: Mapping[str, Scalar] | None = None,
    batch_axes: Mapping[str, int | None] | None = None,
    labels: str | None = None,
    rows: str | None = None,
) -> Dataset:
    """Every row of ``data`` for ``model``'s inputs (those ``rows`` keeps), read lazily.

    Args:
        model: The model whose inputs the rows feed.
        data: The ``--data`` path.
        input_shapes: ``--input-shape``: the rows per feed of arrays batched along their batch
            axis (as verification cuts them; it matters where an input without a batch axis
            holds one value per feed), and sizes for ``--input-value`` fills.
        input_values: ``--input-value``: inputs the data does not hold, one value for all rows.
        batch_axes: ``--batch-axis`` overrides.
        labels: ``--labels``: the name of an integer array in the data, one entry per row.
        rows: ``--rows``: which rows to keep (:func:`options.parse_rows`), renumbered from 0.

    Raises:
        DataError: Unreadable data, or data that does not match the inputs.
        ConfigError: Flags that name unknown inputs or contradict them.
    """
    dataset = _open(model, data, input_shapes, input_values, batch_axes, labels)
    return dataset.select(rows) if rows is not None else dataset


def open_run_dataset(model: ir.Model, options: RunOptions, labels: str | None = None) -> Dataset:
    """:func:`open_dataset` with the data flags of ``options`` (``--data`` must be set)."""
    assert options.data is not None
    return open_dataset(
        model,
        options.data,
        input_shapes=options.input_shapes,
        input_values=options.input_values,
        batch_axes=options.batch_axes,
        rows=options.rows,
        labels=labels,
    )


def _open(
    model: ir.Model,
    data: str,
    input_shapes: Mapping[str, tuple[int, ...]] | None,
    input_values: Mapping[str, Scalar] | None,
    batch_axes: Mapping[str, int | None] | None,
    labels: str | None,
) -> Dataset:
    """The rows of ``data`` before ``--rows`` (see :func:`open_dataset`)."""
    input_shapes = dict(input_shapes or {})
    input_values = dict(input_values or {})
    specs = input_specs(model)
    check_flags(specs, input_shapes, input_values)
    axes = find_batch_axes(specs, batch_axes)
    path = Path(data)
    if not path.exists():
        raise DataError(f"--data {data}: no such file or folder")
    sets = find_test_data_sets(path)
    if sets is not None:
        if labels is not None:
            raise DataError(
                f"--labels {labels}: labels are read from .npz/.npy data, not test_data_set folders"
            )
        if input_values:
            from modelshrink.errors import ConfigError

            raise ConfigError("--input-value fills inputs of .npz/.npy data, not of test_data_set folders")
        return _from_items(
            data,
            len(sets),
            lambda i: read_test_data_set(sets[i], specs),
            lambda i: str(sets[i]),
            specs,
            axes,
            input_shapes,
            {},
            None,
            [],
            "test data sets",
        )
    files = data_files(path, specs)
    if files is not None:
        warnings: list[str] = []
        extra = [labels] if labels else []

        plain_axes = {k: a.axis for k, a in axes.items()}

        def load(i: int) -> Feed:
            return file_feed(files[i], specs, plain_axes, input_values, warnings, extra_ok=extra, maps=[])

        dataset = _from_items(
            data,
            len(files),
            load,
            lambda i: str(files[i]),
            specs,
            axes,
            input_shapes,
            input_values,
            labels,
            warnings,
            "files",
        )
        return _checked(dataset, specs)
    arrays = read_data_arrays(path, specs)
    return _checked(_open_arrays(arrays, data, path, specs, axes, input_shapes, input_values, labels), specs)


def _open_arrays(
    arrays: DataArrays,
    data: str,
    path: Path,
    specs: Sequence[InputSpec],
    axes: Mapping[str, BatchAxis],
    input_shapes: Mapping[str, tuple[int, ...]],
    input_values: Mapping[str, Scalar],
    labels: str | None,
) -> Dataset:
    if labels is not None and labels not in arrays.arrays:
        if path.is_dir():
            raise DataError(f"--labels {labels}: no {labels}.npy in --data folder {data}")
        if path.suffix.lower() == ".npz":
            have = ", ".join(arrays.arrays)
            raise DataError(f"--labels {labels}: --data {data} has no array '{labels}' (it has: {have})")
        raise DataError(f"--labels {labels}: labels are read from an .npz file or a folder of .npy files")
    return _from_arrays(arrays, data, specs, axes, input_shapes, input_values, labels)


def _checked(dataset: Dataset, specs: Sequence[InputSpec]) -> Dataset:
    """Refuse an input found without a batch axis whose value differs in most rows: its batch
    axis was most likely not found, and every batch would hold one row.

    Raises:
        DataError: Naming the input and the flag to pass.
    """
    if not dataset.batched or dataset.rows < 8:
        return dataset
    shapes = {s.name: s.shape_text() for s in specs}
    for entry in dataset.describe():
        name = entry["input"]
        if entry["batch_axis"] is None and entry["values"] > dataset.rows // 2:
            if dataset.axes[name].why == "--batch-axis":
                continue
            raise DataError(
                f"--data {dataset.source}: '{name}' {shapes.get(name, '')} has no batch axis the model "
                f"declares ({dataset.axes[name].why}) but {entry['values']} different values in "
                f"{dataset.rows} rows, so every batch would hold one row; pass --batch-axis "
                f"{name}:AXIS for the axis that holds its rows (or --batch-axis {name}:none to train so)"
            )
    return dataset


# --- a row store for what is computed per row ---------------------------------------------------


class RowStore:
    """One array per row, written once (in any order) and read back by rows, kept in a file.

    Rows are stored along axis 0 of an ``.npy`` file in ``folder``; reads are memory-mapped
    and their pages dropped after each read, so the process's memory does not grow with it.
    """

    def __init__(
        self, folder: Path, name: str, rows: int, row_shape: tuple[int, ...], dtype: np.dtype
    ) -> None:
        self.path = folder / f"{name}.npy"
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self._row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (rows, *row_shape),
        }
        with self.path.open("wb") as f:
            np.lib.format.write_array_header_2_0(f, header)
            self._offset = f.tell()
            f.truncate(self._offset + rows * self._row_bytes)
        self._file = self.path.open("r+b")
        self._maps: list[mmap.mmap] = []
        self._release = DataArrays({}, self._maps)
        self._array: np.ndarray | None = None

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Store ``values[i]`` as row ``rows[i]``."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        rows = np.asarray(rows, dtype=np.int64)
        start = 0
        while start < len(rows):  # runs of consecutive rows: one write each
            end = start + 1
            while end < len(rows) and rows[end] == rows[end - 1] + 1:
                end += 1
            self._file.seek(self._offset + int(rows[start]) * self._row_bytes)
            self._file.write(values[start:end].tobytes())
            start = end

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows``, stacked on axis 0 (a copy)."""
        if self._array is None:
            self._file.flush()
            self._array = load_npy(self.path, self._maps)
        out = take_rows(self._array, rows, 0)
        self._release.release()
        return out

    def close(self) -> None:
        """Close the file (the folder's owner removes it)."""
        self._array = None
        self._maps.clear()
        self._file.close()
