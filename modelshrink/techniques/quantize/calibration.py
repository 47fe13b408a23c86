"""Activation ranges for ``--mode static``: per tensor, the method with the least measured error.

Each activation that the QDQ model quantizes (every float input and output of a Conv, MatMul or
Gemm that is not a weight) gets one uint8 range ``[lo, hi]`` (0 always inside it)::

    s = (hi - lo) / 255,  zp = round(-lo / s),  x' = s (clip(round(x / s) + zp, 0, 255) - zp)

Three candidate ranges come from one histogram of the tensor's values on the calibration rows
(2048 bins, symmetric about 0, doubled in width whenever a larger value arrives; at most
``MAX_VALUES_PER_SAMPLE`` evenly spaced values of each row are counted, the extremes always):

- ``minmax``: the smallest and largest value seen;
- ``percentile``: the 0.0005 % and 99.9995 % quantiles (99.999 % of the values inside);
- ``entropy``: the threshold whose 128-level quantized histogram is closest to the original in
  KL divergence (TensorRT's calibration), clipped to the values seen.

Their error is measured on the same histogram: the mean squared difference between ``x`` and
``x'``, i.e. ``s^2 / 12`` for every value inside the range plus ``(x - bound)^2`` for every value
clipped. The range with the least error wins (ties go to the earlier method in the list above);
``--calibration METHOD`` uses one method for every tensor instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from modelshrink.graph import op_key
from modelshrink.runtime import RuntimeOptions
from modelshrink.sessions import session_for_model

__all__ = ["RANGE_METHODS", "Range", "calibrate", "quantization_mse", "stream_values", "tensors_to_calibrate"]

RANGE_METHODS = ("minmax", "percentile", "entropy")
NUM_BINS = 2048
NUM_QUANTIZED_BINS = 128
PERCENTILE = 99.999
MAX_VALUES_PER_SAMPLE = 1 << 18


class _Histogram:
    """Counts of one tensor's values in NUM_BINS bins over ``[-limit, limit]``, and its extremes."""

    def __init__(self) -> None:
        self.counts = np.zeros(NUM_BINS, np.float64)
        self.limit = 0.0
        self.low = np.inf
        self.high = -np.inf

    def add(self, array: np.ndarray) -> None:
        values = array.reshape(-1)
        if not np.isfinite(values).all():
            values = values[np.isfinite(values)]
        if not values.size:
            return
        low, high = float(values.min()), float(values.max())
        self.low, self.high = min(self.low, low), max(self.high, high)
        peak = max(-low, high)
        if self.limit == 0.0:
            self.limit = peak if peak > 0 else 1e-8
        while peak > self.limit:  # double the width: pairs of bins merge into the middle half
            merged = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.zeros(NUM_BINS, np.float64)
            self.counts[NUM_BINS // 4 : NUM_BINS // 4 + merged.size] = merged
            self.limit *= 2
        step = max(1, values.size // MAX_VALUES_PER_SAMPLE)
        sample = values[::step].astype(np.float64)
        index = np.clip(
            ((sample + self.limit) * (NUM_BINS / (2 * self.limit))).astype(np.int64), 0, NUM_BINS - 1
        )
        self.counts += np.bincount(index, minlength=NUM_BINS)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.limit, self.limit, NUM_BINS + 1)


@dataclass(frozen=True)
class Range:
    """One activation's chosen range, the method that gave it, and each candidate's error."""

    low: float
    high: float
    method: str
    errors: Mapping[str, float]

    def details(self) -> dict[str, object]:
        """JSON for ``changes[].details``."""
        return {
            "method": self.method,
            "range": [self.low, self.high],
            "mse": {k: float(f"{v:.6g}") for k, v in self.errors.items()},
        }


def tensors_to_calibrate(model: ir.Model, ops: Sequence[str]) -> list[str]:
    """Names of every non-constant input and output of the main graph's ``ops`` nodes, in order."""
    names: dict[str, None] = {}
    for node in model.graph:
        if op_key(node) not in ops:
            continue
        for value in (*node.inputs, *node.outputs):
            if value is None or not value.name or value.const_value is not None:
                continue
            if value.producer() is not None and value.producer().op_type == "Constant":  # type: ignore[union-attr]
                continue
            names[value.name] = None
    return list(names)


def stream_values(
    model: ir.Model,
    names: Sequence[str],
    samples: Sequence[Mapping[str, np.ndarray]],
    runtime: RuntimeOptions,
    *,
    label: str,
) -> Iterator[dict[str, np.ndarray]]:
    """Run ``model`` on each sample with ``names`` exposed; yield one ``{name: array}`` per sample.

    One sample's values are in memory at a time. Graph inputs are read from the sample itself.
    """
    probe = model.clone()
    inputs = {v.name for v in probe.graph.inputs}
    present = {v.name for v in probe.graph.outputs}
    values = {out.name: out for node in probe.graph for out in node.outputs if out.name}
    for name in names:
        if name in values and name not in present and name not in inputs:
            probe.graph.outputs.append(values[name])
            present.add(name)
    session = session_for_model(probe, runtime, label=label)
    wanted = [n for n in names if n in present and n not in inputs]
    for feed in samples:
        feed_in = {k: v for k, v in feed.items() if k in session.input_names}
        got = dict(zip(wanted, session.run(feed_in, wanted), strict=True)) if wanted else {}
        got.update({n: np.asarray(feed[n]) for n in names if n in inputs and n in feed})
        yield got


def quantization_mse(hist: np.ndarray, edges: np.ndarray, low: float, high: float) -> float:
    """Mean squared uint8 quantization error of the values in a histogram, for range [low, high]."""
    total = hist.sum()
    if total == 0:
        return 0.0
    lo, hi = min(float(low), 0.0), max(float(high), 0.0)
    if hi - lo <= 0:
        centers = (edges[:-1] + edges[1:]) / 2
        return float((hist * centers.astype(np.float64) ** 2).sum() / total)
    scale = (hi - lo) / 255
    zp = round(-lo / scale)
    first, last = (0 - zp) * scale, (255 - zp) * scale
    centers = ((edges[:-1] + edges[1:]) / 2).astype(np.float64)
    clipped = np.clip(centers, first, last)
    inside = centers == clipped
    error = np.where(inside, scale * scale / 12, (centers - clipped) ** 2)
    return float((hist * error).sum() / total)


def _smoothed(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    zeros = p == 0
    n_zeros, n_nonzeros = int(zeros.sum()), int(p.size - zeros.sum())
    if n_nonzeros == 0:
        return None
    eps1 = eps * n_zeros / n_nonzeros
    if eps1 >= 1.0:
        return None
    out = p.astype(np.float64) + eps * zeros - eps1 * ~zeros
    return out if (out > 0).all() else None


def _kl(h: np.ndarray, cum: np.ndarray, zero: int, i: int, quantized_bins: int) -> float:
    """KL divergence between the histogram cut at ``zero +- i`` bins and its quantized copy."""
    nbins = h.size
    start, end = zero - i, min(zero + i + 1, nbins)
    sliced = h[start:end]
    p = sliced.copy()
    p[0] += cum[start]
    p[-1] += cum[nbins] - cum[end]
    nonzero = p != 0
    merged = max(1, sliced.size // quantized_bins)
    which = np.minimum(np.arange(sliced.size) // merged, quantized_bins - 1)
    counts = np.bincount(which, sliced, quantized_bins)
    norm = np.bincount(which, nonzero.astype(np.float64), quantized_bins)
    q = np.where(nonzero, (counts / np.maximum(norm, 1))[which], 0.0)
    ps, qs = _smoothed(p), _smoothed(q)
    if ps is None or qs is None:
        return np.inf
    ps, qs = ps / ps.sum(), qs / qs.sum()
    return float((ps * np.log(ps / qs)).sum())


# The KL search tries every ENTROPY_STRIDE-th threshold, then every one around the best.
ENTROPY_STRIDE = 16


def _entropy_range(
    hist: np.ndarray, edges: np.ndarray, quantized_bins: int = NUM_QUANTIZED_BINS
) -> tuple[float, float]:
    """TensorRT's KL-divergence threshold on a histogram symmetric about 0.

    The threshold is searched coarse to fine (every ``ENTROPY_STRIDE``-th bin, then each bin
    around the best), which finds the same minimum as trying every bin on smooth histograms
    at a tenth of the cost.
    """
    nbins = hist.size
    zero, half = nbins // 2, quantized_bins // 2
    h = hist.astype(np.float64)
    cum = np.concatenate([[0.0], np.cumsum(h)])
    coarse = list(range(half, zero + 1, ENTROPY_STRIDE))
    if coarse[-1] != zero:
        coarse.append(zero)
    scores = {i: _kl(h, cum, zero, i, quantized_bins) for i in coarse}
    best = min(scores, key=lambda i: (scores[i], i))
    for i in range(max(half, best - ENTROPY_STRIDE + 1), min(zero, best + ENTROPY_STRIDE - 1) + 1):
        if i not in scores:
            scores[i] = _kl(h, cum, zero, i, quantized_bins)
    best = min(scores, key=lambda i: (scores[i], i))
    if not np.isfinite(scores[best]):
        return float(edges[0]), float(edges[-1])
    return float(edges[zero - best]), float(edges[min(zero + best + 1, nbins)])


def _percentile_range(hist: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
    cdf = np.cumsum(hist) / max(hist.sum(), 1)
    cut = (100.0 - PERCENTILE) / 200.0
    left = int(np.searchsorted(cdf, cut))
    right = int(np.searchsorted(cdf, 1.0 - cut))
    return float(edges[left]), float(edges[min(right + 1, edges.size - 1)])


def calibrate(
    model: ir.Model,
    names: Sequence[str],
    samples: Sequence[Mapping[str, np.ndarray]],
    runtime: RuntimeOptions,
    *,
    method: str | None,
) -> dict[str, Range]:
    """The range of every tensor in ``names`` on ``samples`` (``method`` None: the least error).

    Tensors that never took a float value on the samples are left out (the quantizer then
    leaves them alone).
    """
    histograms: dict[str, _Histogram] = {}
    for values in stream_values(model, names, samples, runtime, label="static calibration"):
        for name, array in values.items():
            if array.dtype in (np.float32, np.float16) and array.size:
                histograms.setdefault(name, _Histogram()).add(array)
    ranges: dict[str, Range] = {}
    for name, histogram in histograms.items():
        if not np.isfinite(histogram.low):
            continue
        hist, edges, vmin, vmax = histogram.counts, histogram.edges, histogram.low, histogram.high
        candidates = {"minmax": (vmin, vmax)}
        if method in (None, "percentile"):
            lo, hi = _percentile_range(hist, edges)
            candidates["percentile"] = (max(lo, vmin), min(hi, vmax))
        if method in (None, "entropy"):
            lo, hi = _entropy_range(hist, edges)
            candidates["entropy"] = (max(lo, vmin), min(hi, vmax))
        errors = {k: quantization_mse(hist, edges, lo, hi) for k, (lo, hi) in candidates.items()}
        chosen = method if method is not None else min(RANGE_METHODS, key=lambda k: errors.get(k, np.inf))
        lo, hi = candidates[chosen]
        ranges[name] = Range(float(np.float32(lo)), float(np.float32(hi)), chosen, errors)
    return ranges
