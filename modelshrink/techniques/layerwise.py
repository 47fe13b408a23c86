"""Layer-wise statistics of real activations: what the data-aware weight methods fit to.

A *layer* is one weight (a MatMul/Gemm operand or a Conv kernel) with the nodes that read it.
Its weight is seen as rows ``W[C, K]``: C output channels, K the reduction dimension in the
order the activations meet it (MatMul ``W[K, N]`` -> ``Wᵀ``; Gemm as ``transB`` says; Conv
``W[O, I/g, *k]`` -> ``[O, I/g * prod(k)]``, each of the ``g`` groups with its own block of
rows and its own statistics), and its inputs as rows ``X[n, K]`` (Conv inputs unfolded into
patches with the layer's stride, padding and dilation). Accumulated batch by batch over the
calibration feeds, in float64::

    H = Σ x̃ x̃ᵀ        the Hessian of the layer's squared output error (GPTQ, SparseGPT, AWQ)
    C = Σ x x̃ᵀ         staged runs: x from the original model, x̃ from the model whose earlier
                       layers are already compressed (their outputs carry that error)
    Σ x_j²             per reduction column (Wanda's ‖X_j‖)
    Σ |x_c|            per input channel (AWQ's scales)

The model runs in onnxruntime with the inputs of the layers exposed as extra outputs; the
layers are taken in passes whose matrices fit :data:`PASS_BYTES`, so no more than one pass
worth of statistics, and one feed's activations, is held at a time. Staged runs (see
:func:`solve_in_stages`) run each stage's piece of the graph with the weights already solved
baked in (``chain.py``); where the graph cannot be cut, they feed those weights as run-time
overrides of their initializers to one session of the whole model, which without overrides
gives the original's activations.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from modelshrink.feeds import Feeds
from modelshrink.graph import Weight, op_key
from modelshrink.options import RuntimeOptions
from modelshrink.sessions import session_for_model
from modelshrink.techniques import chain
from modelshrink.techniques.base import Progress, TechniqueContext

__all__ = [
    "PASS_BYTES",
    "Layer",
    "Probe",
    "Read",
    "Stats",
    "act_order_of",
    "collect",
    "conv_patches",
    "corrected_rows",
    "damped",
    "inverse_factor",
    "layer_of",
    "solve_in_stages",
    "stage_levels",
]

logger = logging.getLogger(__name__)

# Rows multiplied at a time when accumulating (float32 products, float64 sums).
_CHUNK_ROWS = 8192
# Bytes of float64 matrices accumulated in one pass over the feeds.
PASS_BYTES = 1 << 29


# --- Conv patches ------------------------------------------------------------------------------


def _ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [int(v) for v in attr.as_ints()]


def _int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return int(attr.as_int()) if attr is not None else default


def _conv_pads(node: ir.Node, in_shape: Sequence[int], kernel: Sequence[int]) -> list[int]:
    nd = len(kernel)
    strides = _ints(node, "strides") or [1] * nd
    dilations = _ints(node, "dilations") or [1] * nd
    attr = node.attributes.get("auto_pad")
    mode = attr.as_string() if attr is not None else "NOTSET"
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(in_shape, kernel, strides, dilations, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            begins.append(small if mode == "SAME_UPPER" else total - small)
            ends.append(total - begins[-1])
        return begins + ends
    if mode == "VALID":
        return [0] * (2 * nd)
    return _ints(node, "pads") or [0] * (2 * nd)


def conv_patches(x: np.ndarray, node: ir.Node, kernel: Sequence[int]) -> np.ndarray:
    """Unfold a Conv input ``[N, I, *spatial]`` into rows ``[N * out_positions, I * prod(kernel)]``.

    The column order is ``(i, k_1, k_2, ...)``, matching ``W.reshape(O, -1)``.
    """
    nd = len(kernel)
    strides = _ints(node, "strides") or [1] * nd
    dilations = _ints(node, "dilations") or [1] * nd
    pads = _conv_pads(node, x.shape[2:], kernel)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[a], pads[a + nd]) for a in range(nd)])
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilations, strict=True)]
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + nd)))
    index = (
        slice(None),
        slice(None),
        *(slice(None, None, s) for s in strides),
        *(slice(None, None, d) for d in dilations),
    )
    win = win[index]
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    channels = x.shape[1]
    return win.transpose(perm).reshape(-1, channels * int(np.prod(kernel)))


# --- layers --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Read:
    """One node reading a layer's weight in input ``slot``; its activations are the other operand."""

    node: ir.Node
    slot: int

    @property
    def data_slot(self) -> int:
        """The input slot of the activations."""
        return 0 if self.node.op_type == "Conv" or self.slot == 1 else 1

    @property
    def data(self) -> ir.Value | None:
        """The activations' value."""
        inputs = self.node.inputs
        return inputs[self.data_slot] if len(inputs) > self.data_slot else None

    def signature(self) -> tuple[object, ...]:
        """Reads with equal signatures see identical rows (their statistics are shared)."""
        node = self.node
        attrs = tuple(
            (name, repr(node.attributes[name].value))
            for name in sorted(node.attributes)
            if name not in ("alpha", "beta")
        )
        return (self.data.name if self.data is not None else None, node.op_type, self.slot, attrs)


@dataclass(frozen=True, eq=False)
class Layer:
    """A weight seen as rows ``[C, K]``, with the nodes that read it.

    Attributes:
        key: The caller's identifier (a unit or target index).
        weight: The weight.
        reads: Every node reading it (all with the same orientation).
        transposed: Rank-2 weights stored ``[K, C]``.
        groups: Conv groups (1 otherwise): group ``g`` is rows ``g*C/groups ...`` with its own
            statistics.
        kernel: Conv kernel size (empty otherwise).
    """

    key: int
    weight: Weight
    reads: tuple[Read, ...]
    transposed: bool = False
    groups: int = 1
    kernel: tuple[int, ...] = ()

    @property
    def channels(self) -> int:
        """C: output channels."""
        shape = self.weight.shape
        return shape[1] if self.transposed else shape[0]

    @property
    def width(self) -> int:
        """K: the reduction dimension of one group."""
        shape = self.weight.shape
        return shape[0] if self.transposed else int(np.prod(shape[1:]))

    @property
    def inputs(self) -> int:
        """Input channels (of all groups): K for MatMul/Gemm, ``I`` for Conv."""
        if not self.kernel:
            return self.width
        return self.weight.shape[1] * self.groups

    def rows(self, array: np.ndarray) -> np.ndarray:
        """The weight as float64 rows ``[C, K]``."""
        a = np.asarray(array, dtype=np.float64)
        return np.ascontiguousarray(a.T) if self.transposed else a.reshape(a.shape[0], -1)

    def unrows(self, rows: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`rows` (same dtype as ``rows``)."""
        return np.ascontiguousarray(rows.T) if self.transposed else rows.reshape(self.weight.shape)

    def group_rows(self, g: int) -> slice:
        """The rows of group ``g``."""
        per = self.channels // self.groups
        return slice(g * per, (g + 1) * per)


def _orientation(read: Read, shape: tuple[int, ...]) -> tuple[bool, int, tuple[int, ...]] | str:
    """(transposed, groups, kernel) of a weight read this way, or why it has no row form here."""
    node, op = read.node, op_key(read.node)
    if op == "Conv":
        if read.slot != 1 or len(shape) < 3:
            return "Conv input that is not a kernel"
        return False, _int(node, "group", 1), tuple(shape[2:])
    if len(shape) != 2:
        return f"{op} weight of rank {len(shape)} (batched)"
    if op == "MatMul":
        return (read.slot == 1), 1, ()
    if op == "Gemm":
        if read.slot == 1:
            return (not _int(node, "transB", 0)), 1, ()
        if read.slot == 0:
            return bool(_int(node, "transA", 0)), 1, ()
        return "bias (C) of Gemm"
    return f"{op} weights are not read as a matrix product"


def layer_of(key: int, weight: Weight, reads: Sequence[tuple[ir.Node, int]], model: ir.Model) -> Layer | str:
    """The layer of ``weight`` read by ``reads``, or why its activations cannot be used."""
    if not reads:
        return "no reader"
    forms = []
    for node, slot in reads:
        if node.graph is not model.graph:
            return "inside a subgraph, where activations are not collected"
        read = Read(node, slot)
        form = _orientation(read, weight.shape)
        if isinstance(form, str):
            return form
        data = read.data
        if data is None or not data.name:
            return f"{op_key(node)} '{node.name}' has no named activation input"
        producer = data.producer()
        if data.const_value is not None or (producer is not None and producer.op_type == "Constant"):
            return f"the other input of {op_key(node)} '{node.name}' is a constant too"
        forms.append(form)
    if len(set(forms)) > 1:
        return "read in different orientations by its nodes"
    transposed, groups, kernel = forms[0]
    layer = Layer(key, weight, tuple(Read(n, s) for n, s in reads), transposed, groups, kernel)
    if groups < 1 or layer.channels % groups:
        return f"{groups} groups do not divide {layer.channels} output channels"
    return layer


def _data_rows(read: Read, layer: Layer, x: np.ndarray) -> np.ndarray:
    """The activations ``x`` of one read as float32 rows ``[n, groups, K]``."""
    node, k = read.node, layer.width
    x = np.asarray(x)
    if layer.kernel:
        patches = conv_patches(x.astype(np.float32, copy=False), node, layer.kernel)
        return patches.reshape(patches.shape[0], layer.groups, k)
    op = node.op_type
    if op == "MatMul":
        rows = x if read.slot == 1 else np.swapaxes(x, -1, -2)
    elif read.slot == 1:  # Gemm A is the activation
        rows = x.T if _int(node, "transA", 0) else x
    else:  # Gemm B is the activation
        rows = x if _int(node, "transB", 0) else x.T
    return np.asarray(rows, dtype=np.float32).reshape(-1, 1, k)


def _channel_abs(layer: Layer, x: np.ndarray) -> np.ndarray:
    """Σ |x| per input channel of one batch (channel axis 1 for Conv, last for MatMul/Gemm)."""
    a = np.abs(np.asarray(x, dtype=np.float64))
    if layer.kernel:
        return a.sum(axis=tuple(i for i in range(a.ndim) if i != 1))
    return a.reshape(-1, layer.width).sum(axis=0)


# --- statistics ----------------------------------------------------------------------------------


@dataclass
class Stats:
    """What the feeds showed a layer's input (see the module docstring).

    Attributes:
        gram: ``[G, K, K]`` Σ x̃ x̃ᵀ, or None when only the diagonal was asked for.
        squares: ``[G, K]`` Σ x̃_j².
        cross: ``[G, K, K]`` Σ x x̃ᵀ in staged runs once earlier layers changed, else None.
        rows: Rows seen.
        channel_abs: Σ |x| per input channel (asked for by AWQ), else None.
        channel_count: Values summed into each entry of ``channel_abs``.
        finite: False when some activation was NaN or infinite (nothing is fitted to them).
    """

    gram: np.ndarray | None
    squares: np.ndarray
    cross: np.ndarray | None = None
    rows: int = 0
    channel_abs: np.ndarray | None = None
    channel_count: int = 0
    finite: bool = True

    @property
    def channel_mean(self) -> np.ndarray | None:
        """Mean |x| per input channel."""
        if self.channel_abs is None or not self.channel_count:
            return None
        return self.channel_abs / self.channel_count


class Probe:
    """A session of the model with every layer's input exposed as an output.

    The weights named in ``overridable`` (initializers of the main graph) become graph inputs
    with their values as defaults, so a run can replace them (staged runs).
    """

    def __init__(
        self,
        model: ir.Model,
        layers: Sequence[Layer],
        runtime: RuntimeOptions,
        *,
        overridable: Sequence[str] = (),
    ) -> None:
        probe = model.clone()
        by_name: dict[str, ir.Value] = {v.name: v for n in probe.graph for v in n.outputs if v.name}
        inputs = {v.name for v in probe.graph.inputs}
        outputs = {v.name for v in probe.graph.outputs}
        dtypes = {}
        for layer in layers:
            for read in layer.reads:
                data = read.data
                assert data is not None and data.name
                dtypes[data.name] = layer.weight.dtype
        for name, dtype in dtypes.items():
            if name in inputs or name in outputs:
                continue
            value = by_name[name]
            if value.dtype is None:
                value.dtype = dtype
            probe.graph.outputs.append(value)
            outputs.add(name)
        self.overridable: set[str] = set()
        for name in overridable:
            init = probe.graph.initializers.get(name)
            if init is not None and name not in inputs:
                probe.graph.inputs.append(init)
                self.overridable.add(name)
        self.session = session_for_model(probe, runtime, label="activation probe")
        self.inputs = [n for n in self.session.input_names if n not in self.overridable]

    def run(
        self, feed: Mapping[str, np.ndarray], names: Sequence[str], overrides: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The named activations on one feed (graph inputs come from the feed itself)."""
        given = {k: v for k, v in feed.items() if k in self.inputs}
        given.update({k: v for k, v in overrides.items() if k in self.overridable})
        wanted = [n for n in names if n not in feed]
        values = dict(zip(wanted, self.session.run(given, wanted), strict=True)) if wanted else {}
        values.update({n: np.asarray(feed[n]) for n in names if n in feed})
        return values


def _matrix_bytes(layer: Layer, gram: bool, cross: bool) -> int:
    per = layer.groups * layer.width * (layer.width if gram else 1) * 8
    return per * (2 if cross else 1)


def _products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``aᵀ b`` per group of ``[G, n, K]`` arrays (BLAS for wide groups, einsum for narrow ones)."""
    if a.shape[2] <= 16:
        return np.einsum("gnk,gnl->gkl", a, b)
    return np.stack([a[g].T @ b[g] for g in range(a.shape[0])])


class _Pending:
    """Rows of one read waiting to be added to its statistics (feeds of a few rows are batched)."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.rows: list[np.ndarray] = []
        self.references: list[np.ndarray] = []
        self.count = 0

    def add(self, rows: np.ndarray, reference: np.ndarray | None, *, gram: bool) -> None:
        if not np.isfinite(rows).all() or (reference is not None and not np.isfinite(reference).all()):
            self.stats.finite = False
            return
        self.rows.append(rows)
        if reference is not None:
            self.references.append(reference)
        self.count += rows.shape[0]
        if self.count >= _CHUNK_ROWS:
            self.flush(gram=gram)

    def flush(self, *, gram: bool) -> None:
        if not self.rows:
            return
        rows = np.concatenate(self.rows) if len(self.rows) > 1 else self.rows[0]
        refs = None
        if self.references:
            refs = np.concatenate(self.references) if len(self.references) > 1 else self.references[0]
        self.rows, self.references, self.count = [], [], 0
        _accumulate(self.stats, rows, refs, gram=gram)


def _accumulate(stats: Stats, rows: np.ndarray, reference: np.ndarray | None, *, gram: bool) -> None:
    """Add ``rows`` ``[n, G, K]`` (and the original's rows ``reference``) to ``stats``."""
    for start in range(0, rows.shape[0], _CHUNK_ROWS):
        grouped = np.ascontiguousarray(rows[start : start + _CHUNK_ROWS].transpose(1, 0, 2))  # [G, n, K]
        stats.squares += np.einsum("gnk,gnk->gk", grouped, grouped).astype(np.float64)
        if gram:
            assert stats.gram is not None
            stats.gram += _products(grouped, grouped)
        if reference is not None:
            assert stats.cross is not None
            ref = np.ascontiguousarray(reference[start : start + _CHUNK_ROWS].transpose(1, 0, 2))
            stats.cross += _products(ref, grouped)
    stats.rows += int(rows.shape[0])


def _passes(layers: Sequence[Layer], gram: bool, cross: bool) -> list[list[Layer]]:
    """Layers in passes whose matrices fit PASS_BYTES (layers sharing an input go together)."""
    by_input: dict[tuple[object, ...], list[Layer]] = {}
    for layer in layers:
        by_input.setdefault(layer.reads[0].signature(), []).append(layer)
    passes: list[list[Layer]] = []
    budget = 0
    for group in by_input.values():
        size = _matrix_bytes(group[0], gram, cross)
        if not passes or budget + size > PASS_BYTES:
            passes.append([])
            budget = 0
        passes[-1].extend(group)
        budget += size
    return passes


def collect(
    probe: Probe,
    layers: Sequence[Layer],
    feeds: Feeds,
    progress: Progress,
    *,
    gram: bool = True,
    channel_means: bool = False,
    overrides: Mapping[str, np.ndarray] | None = None,
    label: str = "collecting activations",
) -> dict[int, Stats]:
    """Statistics of every layer's input over ``feeds`` (by layer key).

    Args:
        probe: A probe built for (at least) these layers.
        layers: The layers.
        feeds: Calibration feeds.
        progress: Progress sink.
        gram: Accumulate ``XᵀX`` (else only its diagonal).
        channel_means: Also Σ |x| per input channel (AWQ).
        overrides: Weights to run with instead of the model's own (staged runs); when given,
            the original's activations are collected too and ``cross`` is filled.
        label: Progress description.
    """
    overrides = dict(overrides or {})
    staged = bool(overrides)

    def run(index: int, feed: Mapping[str, np.ndarray], names: Sequence[str]) -> _Pair:
        del index
        return probe.run(feed, names, overrides), (probe.run(feed, names, {}) if staged else None)

    return _collect(
        run, layers, feeds, progress, gram=gram, channel_means=channel_means, staged=staged, label=label
    )


# (values in the model being solved, values in the original or None while they are the same)
_Pair = tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]


def _collect(
    run: Callable[[int, Mapping[str, np.ndarray], Sequence[str]], _Pair],
    layers: Sequence[Layer],
    feeds: Feeds,
    progress: Progress,
    *,
    gram: bool,
    channel_means: bool,
    staged: bool,
    label: str,
) -> dict[int, Stats]:
    """:func:`collect` with the activations of feed ``i`` from ``run(i, feed, names)``."""
    result: dict[int, Stats] = {}
    passes = _passes(layers, gram, staged)
    total = len(passes) * len(feeds.samples)
    done = 0
    for group in passes:
        shared: dict[tuple[object, ...], Stats] = {}
        reads: list[tuple[Read, Layer, Stats]] = []
        pending: dict[int, _Pending] = {}
        for layer in group:
            for read in layer.reads:
                sig = read.signature()
                if sig not in shared:
                    g, k = layer.groups, layer.width
                    shared[sig] = Stats(
                        gram=np.zeros((g, k, k)) if gram else None,
                        squares=np.zeros((g, k)),
                        cross=np.zeros((g, k, k)) if staged else None,
                        channel_abs=np.zeros(layer.inputs) if channel_means else None,
                    )
                    reads.append((read, layer, shared[sig]))
        names = _targets(group)
        for index, feed in enumerate(feeds.samples):
            values, originals = run(index, feed, names)
            for read, layer, stats in reads:
                assert read.data is not None and read.data.name
                x = values[read.data.name]
                rows = _data_rows(read, layer, x)
                ref = _data_rows(read, layer, originals[read.data.name]) if originals is not None else None
                pending.setdefault(id(stats), _Pending(stats)).add(rows, ref, gram=gram)
                if stats.channel_abs is not None and stats.finite:
                    stats.channel_abs += _channel_abs(layer, x)
                    stats.channel_count += int(np.asarray(x).size // max(layer.inputs, 1))
            done += 1
            progress(label, done, total)
        for queue in pending.values():
            queue.flush(gram=gram)
        for layer in group:
            sigs = [r.signature() for r in layer.reads]
            parts = [shared[s] for s in dict.fromkeys(sigs)]
            result[layer.key] = parts[0] if len(parts) == 1 else _summed(parts)
    return result


def _summed(parts: Sequence[Stats]) -> Stats:
    """One layer read by several nodes on different inputs: their statistics add up."""
    first = parts[0]

    def total(get: Callable[[Stats], np.ndarray | None]) -> np.ndarray | None:
        arrays = [a for a in (get(p) for p in parts) if a is not None]
        return None if len(arrays) < len(parts) else np.sum(arrays, axis=0)

    return Stats(
        gram=total(lambda s: s.gram),
        squares=np.sum([p.squares for p in parts], axis=0),
        cross=total(lambda s: s.cross),
        rows=sum(p.rows for p in parts),
        channel_abs=total(lambda s: s.channel_abs),
        channel_count=sum(p.channel_count for p in parts),
        finite=all(p.finite for p in parts) and first.finite,
    )


# --- damping -------------------------------------------------------------------------------------


def damped(hessian: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """``H`` with dead columns made harmless and ``damping * mean(diag H)`` added to its diagonal.

    A column no activation reached (``H_jj = 0``) gets ``H_jj = 1``: its weight's error then
    affects nothing else, and nothing is charged to it.

    Returns:
        The damped matrix and the mask of dead columns.
    """
    h = np.array(hessian, dtype=np.float64, copy=True)
    diag = np.arange(h.shape[0])
    dead = h[diag, diag] <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1.0
    mean = float(np.mean(h[diag, diag])) if h.size else 1.0
    h[diag, diag] += max(damping * mean, 1e-12)
    return h, dead


def act_order_of(hessian: np.ndarray) -> np.ndarray:
    """Columns by decreasing diagonal of :func:`damped`'s ``H`` (a dead column's entry is 1
    there), without building it: GPTQ's act order."""
    diagonal = np.diag(hessian)
    return np.argsort(-np.where(diagonal <= 0, 1.0, diagonal), kind="stable")


# Damping is raised this many times (x10 each) when H + λI is still not positive definite.
_DAMPING_RETRIES = 6


def _inverse_upper(h: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``h⁻¹`` with rows and columns in ``order`` (``h⁻¹ = UᵀU``);
    LinAlgError if ``h`` is not positive definite."""
    # With L the lower Cholesky factor of the reversed matrix, R = L reversed is upper with
    # h = R Rᵀ, so h⁻¹ = R⁻ᵀ R⁻¹ and U = R⁻¹ = L⁻¹ reversed: one factorization with its
    # inverse instead of factoring h and then h⁻¹. The reversal and the order are one gather.
    if order is None:
        scratch = np.ascontiguousarray(h[::-1, ::-1])
    else:
        back = np.asarray(order)[::-1]
        scratch = h[np.ix_(back, back)]
    out = np.zeros_like(scratch)
    _cholesky_inverse(scratch, out)
    return out[::-1, ::-1]


# Below this size a block is factored by LAPACK and its factor inverted by the general inverse.
_CHOLESKY_LEAF = 256


def _cholesky_inverse(h: np.ndarray, out: np.ndarray) -> None:
    """``out = L⁻¹`` for the lower Cholesky factor of ``h`` (``h = L Lᵀ``), by blocks; ``h`` is
    overwritten and ``out`` zero above its diagonal on entry.

    numpy has neither a triangular inverse (LAPACK's trtri) nor a triangular solve, and its
    Cholesky runs at a fraction of its matrix product's speed here; with
    ``h = [[A, Bᵀ], [B, C]]``: ``L₁₁ = chol(A)``, ``L₂₁ = B L₁₁⁻ᵀ``, ``L₂₂ = chol(C - L₂₁L₂₁ᵀ)``
    and ``L⁻¹ = [[L₁₁⁻¹, 0], [-L₂₂⁻¹ L₂₁ L₁₁⁻¹, L₂₂⁻¹]]``: all but the leaves in matrix
    products (a 4096-wide ``h``: 1.2 s instead of 1.7 s for LAPACK's Cholesky and a blocked
    triangular inverse on this shared 2-core machine).
    """
    n = h.shape[0]
    if n <= _CHOLESKY_LEAF:
        out[...] = np.tril(np.linalg.inv(np.linalg.cholesky(h)))
        return
    m = n // 2
    _cholesky_inverse(h[:m, :m], out[:m, :m])
    i11 = out[:m, :m]
    l21 = h[m:, :m] @ i11.T
    schur = h[m:, m:]
    schur -= l21 @ l21.T
    _cholesky_inverse(schur, out[m:, m:])
    out[m:, :m] = -(out[m:, m:] @ l21) @ i11


def inverse_factor(
    hessian: np.ndarray, damping: float, order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """The damped ``H``, the upper Cholesky factor ``U`` of its inverse, and the damping used.

    ``U`` factors ``H`` with its rows and columns in ``order`` (default: as they are); the
    damped ``H`` keeps the original order. The damping is raised (x10 at a time) until
    ``H + λI`` is positive definite; past that, the off-diagonal part is dropped.
    """
    for _ in range(_DAMPING_RETRIES):
        h, _ = damped(hessian, damping)
        try:
            return h, _inverse_upper(h, order), damping
        except np.linalg.LinAlgError:
            damping *= 10
    h, _ = damped(np.diag(np.diag(hessian)), damping)
    return h, _inverse_upper(h, order), damping


# The cross-layer correction W (C - H)(H + λI)⁻¹ is dropped when it would move the weights by
# more than this share of their norm (too few rows to trust it).
MAX_CORRECTION = 0.5


def corrected_rows(
    rows: np.ndarray,
    hessian: np.ndarray,
    cross: np.ndarray,
    upper: np.ndarray,
    order: np.ndarray | None = None,
) -> np.ndarray | None:
    """The rows that best redo the original layer on inputs carrying earlier layers' error.

    With ``x`` the original's inputs and ``x̃`` those of the model whose earlier layers are
    compressed (``H = Σ x̃x̃ᵀ``, ``C = Σ x x̃ᵀ``), ``min |W x - W' x̃|²`` is solved by
    ``W' = W + W (C - H)(H + λI)⁻¹``, with ``(H + λI)⁻¹ = UᵀU`` from :func:`inverse_factor`
    (``upper`` in ``order``): two products with the factor instead of a K x K solve. None when
    the shift is not finite or larger than :data:`MAX_CORRECTION` of the rows' norm.
    """
    dead = np.diag(hessian) <= 0
    diff = np.asarray(cross, dtype=np.float64) - hessian
    diff[dead, :] = 0
    diff[:, dead] = 0
    c, k = rows.shape
    permuted = diff if order is None else diff[:, order]
    # where K < C, (W D) U^T U as W (D U^T U): 2K^3 + CK^2 multiply-adds instead of 3CK^2
    shifted = rows @ (permuted @ upper.T @ upper) if k < c else rows @ permuted @ upper.T @ upper
    if order is None:
        shift = shifted
    else:
        shift = np.empty_like(shifted)
        shift[:, order] = shifted
    size = float(np.linalg.norm(rows))
    if not np.isfinite(shift).all() or float(np.linalg.norm(shift)) > MAX_CORRECTION * max(size, 1e-30):
        return None
    return rows + shift


# --- staged solving ------------------------------------------------------------------------------


def stage_levels(model: ir.Model, layers: Sequence[Layer]) -> dict[int, int]:
    """How many layers of ``layers`` lie on the deepest path into each layer's input, plus one.

    Layers with the same level depend on none of each other and can be solved together.
    """
    readers: dict[int, list[int]] = {}
    for layer in layers:
        for read in layer.reads:
            readers.setdefault(id(read.node), []).append(layer.key)
    depth_of: dict[int, int] = {}
    value_depth: dict[int, int] = {}
    for node in model.graph:
        d = max((value_depth.get(id(v), 0) for v in node.inputs if v is not None), default=0)
        out = d
        keys = readers.get(id(node))
        if keys:
            for key in keys:
                depth_of[key] = max(depth_of.get(key, 0), d + 1)
            out = max(depth_of[key] for key in keys)
        for v in node.outputs:
            value_depth[id(v)] = out
    return {layer.key: depth_of.get(layer.key, 1) for layer in layers}


def _stages(model: ir.Model, layers: Sequence[Layer], passes: int) -> list[list[Layer]]:
    levels = stage_levels(model, layers)
    distinct = sorted(set(levels.values()))
    count = max(1, min(passes, len(distinct)))
    # consecutive levels in `count` chunks of about the same number of layers
    per_level = {lv: [layer for layer in layers if levels[layer.key] == lv] for lv in distinct}
    total = len(layers)
    stages: list[list[Layer]] = [[]]
    seen = 0
    for lv in distinct:
        if stages[-1] and seen >= total * len(stages) / count and len(stages) < count:
            stages.append([])
        stages[-1].extend(per_level[lv])
        seen += len(per_level[lv])
    return stages


def _targets(stage: Sequence[Layer]) -> list[str]:
    """The values a stage's layers read."""
    return list(
        dict.fromkeys(
            r.data.name for layer in stage for r in layer.reads if r.data is not None and r.data.name
        )
    )


def solve_in_stages(
    model: ir.Model,
    layers: Sequence[Layer],
    context: TechniqueContext,
    solve: Callable[[Layer, Stats], np.ndarray | None],
    *,
    applied: dict[str, np.ndarray],
    passes: int,
) -> int:
    """Solve ``layers`` stage by stage, each fitted to inputs that carry the earlier stages' error.

    Stage ``s`` sees its inputs in the model whose weights of ``applied`` (given, plus those of
    stages ``< s``) are replaced: ``solve(layer, stats)`` gets ``H = Σ x̃x̃ᵀ`` from that model and
    ``C = Σ x x̃ᵀ`` with the original's ``x`` (``cross`` is None while nothing was replaced), and
    returns the layer's new weight (its float values, weight layout) or None to leave it.

    Returns:
        The number of stages.
    """
    feeds, runtime, progress = context.feeds, context.runtime, context.progress
    stages = _stages(model, layers, passes)
    targets = [_targets(stage) for stage in stages]
    pieces = chain.plan(model, targets, [[layer.weight.name for layer in stage] for stage in stages])
    runs = None
    if isinstance(pieces, str) or not feeds.samples:
        names = [layer.weight.name for layer in layers] + list(applied)
        probe = Probe(model, layers, runtime, overridable=names)
        logger.info("staged runs use the whole model: %s", pieces if isinstance(pieces, str) else "no feeds")
    else:
        runs = chain.Chain(model, targets, pieces, len(feeds.samples), runtime)
    for i, stage in enumerate(stages):
        label = f"activations, stage {i + 1} of {len(stages)}"
        if runs is None:
            stats = collect(probe, stage, feeds, progress, overrides=applied, label=label)
        else:
            runs.start(i, applied, feeds.samples[0])
            stats = _collect(
                runs.run,
                stage,
                feeds,
                progress,
                gram=True,
                channel_means=False,
                staged=bool(applied),
                label=label,
            )
            runs.finish()
        for layer in stage:
            new = solve(layer, stats[layer.key])
            if new is not None:
                applied[layer.weight.name] = new
    return len(stages)
