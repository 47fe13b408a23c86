"""What a model costs: bytes on disk (raw and zlib), parameters, ops, and latency.

Latency is measured for several sessions *interleaved* in one process (A B B A A B ...), after
warm-up, on the same feed and session options, so machine noise and frequency drift hit every
side alike. The count of runs adapts to a time budget unless fixed with ``runs``.
"""

from __future__ import annotations

import gc
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from modelshrink.errors import ConfigError
from modelshrink.graph import all_nodes, dtype_name, op_histogram, weights

if TYPE_CHECKING:
    from modelshrink.runtime import Session

__all__ = [
    "LatencyStats",
    "ModelStats",
    "measure_latency",
    "model_stats",
    "zlib_size",
]

# zlib level 6 runs at ~30 MB/s here; above this the figure is skipped (reported as null).
ZLIB_MAX_BYTES = 128 * 1024 * 1024
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelStats:
    """Static facts about one model.

    Attributes:
        source: Path or ``<stdin>``/``<stdout>``, for the report.
        size_bytes: Model file plus external data.
        size_zlib_bytes: Size after zlib (level 6) compression; None when skipped.
        external_data_bytes: Bytes in external data files.
        params: Elements in all weights.
        params_by_dtype: Elements per element type.
        params_by_op: Elements per consuming op type (first consumer).
        weight_bytes: Bytes in all weights.
        nodes: Node count, subgraphs included.
        ops: Node count per op type.
        opsets: Opset imports.
    """

    source: str
    size_bytes: int
    size_zlib_bytes: int | None
    external_data_bytes: int
    params: int
    params_by_dtype: dict[str, int]
    params_by_op: dict[str, int]
    weight_bytes: int
    nodes: int
    ops: dict[str, int]
    opsets: dict[str, int] = field(default_factory=dict)


def zlib_size(parts: Iterable[Path | bytes], *, limit: int = ZLIB_MAX_BYTES) -> int | None:
    """Compressed size of the concatenated parts (files or bytes); None above ``limit``."""
    items = list(parts)
    total = sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in items)
    if total > limit:
        return None
    comp = zlib.compressobj(6)
    size = 0
    for part in items:
        if isinstance(part, Path):
            with part.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    size += len(comp.compress(chunk))
        else:
            view = memoryview(part)
            for start in range(0, len(view), _CHUNK):
                size += len(comp.compress(view[start : start + _CHUNK]))
    return size + len(comp.flush())


def model_stats(
    model: ir.Model,
    *,
    source: str,
    files: Sequence[Path] = (),
    raw: bytes | None = None,
    compress: bool = True,
) -> ModelStats:
    """Sizes, params and ops of ``model`` whose bytes are ``files`` (or ``raw`` from stdin)."""
    if raw is not None:
        size = len(raw)
        external = 0
        parts: list[Path | bytes] = [raw]
    else:
        size = sum(p.stat().st_size for p in files)
        external = sum(p.stat().st_size for p in files[1:])
        parts = list(files)
    by_dtype: Counter[str] = Counter()
    by_op: Counter[str] = Counter()
    params = 0
    weight_bytes = 0
    for w in weights(model):
        params += w.size
        weight_bytes += w.nbytes
        by_dtype[dtype_name(w.dtype)] += w.size
        ops = w.consumer_ops()
        by_op[ops[0] if ops else "(unused)"] += w.size
    return ModelStats(
        source=source,
        size_bytes=size,
        size_zlib_bytes=zlib_size(parts) if compress else None,
        external_data_bytes=external,
        params=params,
        params_by_dtype=dict(sorted(by_dtype.items())),
        params_by_op=dict(sorted(by_op.items())),
        weight_bytes=weight_bytes,
        nodes=sum(1 for _ in all_nodes(model)),
        ops=op_histogram(model),
        opsets=dict(sorted(model.opset_imports.items())),
    )


# --- latency ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyStats:
    """Per-run wall time of one session, in milliseconds."""

    p50_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int

    @classmethod
    def from_times(cls, seconds: Sequence[float]) -> LatencyStats:
        """Summarize run times given in seconds."""
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        return cls(
            p50_ms=float(np.percentile(ms, 50)),
            p90_ms=float(np.percentile(ms, 90)),
            mean_ms=float(ms.mean()),
            min_ms=float(ms.min()),
            runs=len(ms),
        )


ProgressFn = Callable[[int, int], None]

MIN_ROUNDS = 7
MAX_ROUNDS = 2000


def measure_latency(
    sessions: Sequence[Session],
    feed: Mapping[str, np.ndarray],
    *,
    runs: int | None = None,
    budget_s: float = 3.0,
    warmup: int = 3,
    on_progress: ProgressFn | None = None,
) -> list[LatencyStats]:
    """Time every session on ``feed``, interleaved round by round.

    Args:
        sessions: The sessions to compare (same options).
        feed: One input feed; each session takes the inputs it declares.
        runs: Exact number of timed runs per session; None adapts to ``budget_s``.
        budget_s: Target total seconds of timed runs (all sessions) when ``runs`` is None.
        warmup: Untimed runs per session first.
        on_progress: Called with (done, total) rounds.

    Returns:
        One :class:`LatencyStats` per session, in order.
    """
    if runs is not None and runs < 1:
        raise ConfigError(f"--latency-runs must be >= 1, got {runs}")
    feeds = [{name: feed[name] for name in s.input_names if name in feed} for s in sessions]
    for s, f in zip(sessions, feeds, strict=True):
        for _ in range(max(warmup, 1)):
            s.run(f)  # translated errors surface here, before timing
    if runs is None:
        start = time.perf_counter()
        for s, f in zip(sessions, feeds, strict=True):
            s.run_fast(f)
        per_round = max(time.perf_counter() - start, 1e-6)
        runs = int(min(max(budget_s / per_round, MIN_ROUNDS), MAX_ROUNDS))
    times: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    report_every = max(1, runs // 50)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(runs):
            for i in order if r % 2 == 0 else reversed(order):
                s, f = sessions[i], feeds[i]
                t0 = time.perf_counter()
                s.run_fast(f)
                times[i].append(time.perf_counter() - t0)
            if on_progress is not None and ((r + 1) % report_every == 0 or r + 1 == runs):
                on_progress(r + 1, runs)
    finally:
        if gc_was_enabled:
            gc.enable()
    return [LatencyStats.from_times(t) for t in times]
