"""Unstructured magnitude pruning and N:M semi-structured pruning: masks and their application.

Unstructured: zero the ``k = round(s * n)`` weights of smallest ``|w|`` (per tensor), or the
``k = round(s * N)`` smallest over all eligible tensors together (global scope). Ties at the
threshold are broken by position (tensor order, then flat index), so the count is exact and
the result deterministic.

N:M: view the weight as rows of its reduction dimension K (the dimension a consumer sums
over: ``W[K, N]`` of MatMul along K, Gemm's ``B`` along K whichever way ``transB`` stores it,
Conv ``W[Cout, Cin/g, kh, kw]`` along the flattened ``Cin/g x kh x kw``), cut every row into
groups of M consecutive weights and keep the N largest ``|w|`` of each group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = [
    "ReductionView",
    "count_kept_per_group",
    "magnitude",
    "nm_prune",
    "prune_smallest",
    "reduction_view",
    "select_smallest",
]


def magnitude(array: np.ndarray) -> np.ndarray:
    """``|w|`` as float32/float64 (float16/bfloat16 widened so comparisons are exact)."""
    a = np.asarray(array)
    if a.dtype == np.float64:
        return np.abs(a)
    return np.abs(a.astype(np.float32))


def select_smallest(mags: Sequence[np.ndarray], k: int) -> list[np.ndarray]:
    """Flat boolean masks selecting exactly the ``k`` smallest values across ``mags``.

    Ties at the threshold are taken in order (array order, then flat index).
    """
    flats = [m.ravel() for m in mags]
    total = sum(f.size for f in flats)
    k = max(0, min(int(k), total))
    if k == 0:
        return [np.zeros(f.size, dtype=bool) for f in flats]
    if k == total:
        return [np.ones(f.size, dtype=bool) for f in flats]
    joined = flats[0] if len(flats) == 1 else np.concatenate(flats)
    threshold = np.partition(joined, k - 1)[k - 1]
    del joined
    masks = [f < threshold for f in flats]
    need = k - sum(int(m.sum()) for m in masks)
    for f, m in zip(flats, masks, strict=True):
        if need <= 0:
            break
        ties = np.flatnonzero(f == threshold)[:need]
        m[ties] = True
        need -= ties.size
    return masks


def prune_smallest(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of ``array`` with the flat positions in ``mask`` set to zero."""
    out = np.array(array, copy=True, order="C")
    np.copyto(out.reshape(-1), np.zeros((), dtype=out.dtype), where=mask)
    return out


@dataclass(frozen=True)
class ReductionView:
    """How to see a weight as ``rows x K`` with K its reduction dimension.

    Attributes:
        axis: The reduction axis, or None for "flatten every axis from 1" (Conv).
        size: K.
        describe: Human text, e.g. ``axis 0 (K=64)`` or ``Cin x kh x kw (K=144)``.
    """

    axis: int | None
    size: int
    describe: str

    def rows(self, array: np.ndarray) -> np.ndarray:
        """The ``[rows, K]`` view (a copy when the axis is not last)."""
        if self.axis is None:
            return array.reshape(array.shape[0], -1)
        return np.moveaxis(array, self.axis, -1).reshape(-1, self.size)

    def unrows(self, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of :meth:`rows`."""
        if self.axis is None:
            return rows.reshape(shape)
        moved = list(shape)
        moved.append(moved.pop(self.axis))
        return np.moveaxis(rows.reshape(moved), -1, self.axis)


def reduction_view(node: ir.Node, index: int, shape: tuple[int, ...]) -> ReductionView | str:
    """The reduction dimension of input ``index`` of ``node``, or why there is none."""
    rank = len(shape)
    op = node.op_type
    if rank == 0:
        return "a scalar has no reduction dimension"
    if op == "MatMul":
        axis = rank - 1 if index == 0 else max(rank - 2, 0)
        return ReductionView(axis, shape[axis], f"axis {axis} (K={shape[axis]})")
    if op == "Gemm":
        if rank != 2:
            return f"Gemm input of rank {rank}"
        if index == 0:
            axis = 0 if node.attributes.get_int("transA", 0) else 1
        else:
            axis = 1 if node.attributes.get_int("transB", 0) else 0
        return ReductionView(axis, shape[axis], f"axis {axis} (K={shape[axis]})")
    if op == "Conv" and index == 1:
        if rank < 3:
            return f"Conv weight of rank {rank}"
        size = int(np.prod(shape[1:]))
        dims = " x ".join(str(d) for d in shape[1:])
        return ReductionView(None, size, f"Cin/group x kernel ({dims}, K={size})")
    return f"the reduction dimension of {op} input {index} is not known"


def nm_prune(array: np.ndarray, view: ReductionView, n: int, m: int) -> np.ndarray:
    """Keep the N largest ``|w|`` in every M consecutive weights along the reduction dim.

    Ties are broken by position (the earlier weight is kept).
    """
    rows = view.rows(array)
    groups = rows.reshape(rows.shape[0], view.size // m, m)
    mags = magnitude(groups)
    # stable sort of -|w|: largest first, earlier position first among equals
    order = np.argsort(-mags, axis=-1, kind="stable")
    drop = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(drop, order[..., n:], True, axis=-1)
    pruned = np.where(drop, np.zeros((), dtype=groups.dtype), groups)
    return np.ascontiguousarray(view.unrows(pruned.reshape(rows.shape), array.shape))


def count_kept_per_group(array: np.ndarray, view: ReductionView, m: int) -> np.ndarray:
    """Non-zeros in each group of M along the reduction dimension (for checks and tests)."""
    rows = view.rows(array)
    groups = rows.reshape(rows.shape[0], view.size // m, m)
    return np.count_nonzero(groups, axis=-1)
