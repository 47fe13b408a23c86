"""Weight-only quantization at any width from 1 to 8 bits, packed at its true width.

Grids, per output channel ``c`` (or per block of ``B`` values of a channel), with scale ``s``::

    bits >= 3, mid-tread (zero is a level):  q = clip(round(w / s), -2^(b-1), 2^(b-1) - 1)
                                             w' = s * q
    bits <= 2, mid-rise (no zero level):     q = clip(round(w / s - 1/2), -2^(b-1), 2^(b-1) - 1)
                                             w' = s * (q + 1/2)

so 1 bit is ``sign(w) * s/2`` (``sign(0) = +1``) and 2 bits are ``{±1/2, ±3/2} * s``: with
only 2 or 4 levels, a zero level would waste one (the measured 2-bit digits MLP keeps 98 % top-1
agreement on the mid-rise grid, 52 % on the mid-tread one). Scales: 1 bit takes the L2-optimal
``s/2 = mean|w|``; wider grids take, per channel or block, the scale with the least squared
error out of a ladder of clipping ratios of ``max|w|`` (both signs for the mid-tread grid, so its
extra negative level can serve the side of the largest magnitude, as onnxruntime's int4 does).

Storage: the unsigned codes ``u = q + 2^(b-1)`` in ``[0, 2^b)``, taken channel by channel,
form one little-endian bit stream (code ``i`` in bits ``[i*b, (i+1)*b)``), padded to whole
bytes: ``ceil(n*b/8)`` bytes (plus at most a few bytes of padding to the group of codes that
fills whole bytes) in a uint8 tensor; for 4 and 2 bits this is the byte layout of ONNX INT4/INT2
tensors. The scales (one per channel, or per block with ``--block-size``) are stored in float16
when every scale of the weight is a float16 normal number (see :func:`packed_scale_dtype`; the
search then scores the float16 values it will store, and the codes are rounded with them), else
in float32: a block of 32 4-bit codes is 16 bytes, so a float32 scale adds 25 % and a float16 one
12.5 %. When the model loads, a small graph of standard ops with constant inputs rebuilds the
float weight:

    b in {1, 2, 4}:    BitShift left, then right, lifts each code out of its byte
    b in {3, 5, 6, 7}: BitShift lifts out every bit; Mul by [1, 2, 4, ...] + ReduceSum add up codes
    b = 8:             the bytes are the codes
    then Cast -> Add (grid offset) -> Mul (scale, Cast to float32 first when stored in float16)
    -> Reshape / Transpose to the weight's layout

onnxruntime folds that graph once when it creates the session (it runs every node whose
inputs are all constant), so the session holds float weights and runs at the float model's
speed: only the file is small. Model opsets below 11 (no BitShift) are raised to 11.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from modelshrink.graph import NameAuthority
from modelshrink.techniques.base import Change, Skip
from modelshrink.techniques.quantize.centered import row_offsets
from modelshrink.techniques.quantize.plan import Unit
from modelshrink.techniques.quantize.weightonly import (
    NON_FINITE_REASON,
    Emitted,
    _constant,
    _initializer,
    _release,
    _retire,
    _snr_db,
    _store_quantized,
    _Writer,
    default_opset,
    weight_change,
)

__all__ = [
    "MIDRISE_MAX_BITS",
    "UNPACK_MIN_OPSET",
    "Codes",
    "Grid",
    "Layout",
    "PackingSummary",
    "cast_scales",
    "fake_quant",
    "fit_scales",
    "layout_of",
    "pack_codes",
    "packed_bytes",
    "packed_notes",
    "packed_scale_dtype",
    "quantize_packed",
    "round_to_nearest",
    "summarize",
    "to_codes",
    "unpack_codes",
]

logger = logging.getLogger(__name__)

# The detail of a table whose rows were offset for the LayerNorm after them (centered.py).
ROW_OFFSETS_DETAIL = "each row offset by what a LayerNorm after it removes"
# Widths up to this use the mid-rise grid (no zero level).
MIDRISE_MAX_BITS = 2
# BitShift needs opset 11.
UNPACK_MIN_OPSET = 11
_FLOAT32 = np.dtype(np.float32)
# Bytes of a Cast node besides the three mentions of its weight's name (measured: 50-54).
_CAST_NODE_BYTES = 64
# Clipping ratios of max|w| tried by the scale search (wider grids).
_RATIOS = np.linspace(1.0, 0.3, 15, dtype=np.float32)
# The clipping ratios tried for an offset row (round_to_nearest's offsets): its best ratio is
# near max|w| (the same centered error as all of _RATIOS on the tiny transformer's table at 3
# and 4 bits, in half the time).
_OFFSET_RATIOS = _RATIOS[_RATIOS >= 0.69]
# Work on at most this many elements at a time (scale search, packing).
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Grid:
    """The integer grid of a width: codes ``q`` in ``[lo, hi]``, values ``s * (q + offset)``."""

    bits: int

    @property
    def lo(self) -> int:
        """Smallest code."""
        return -(1 << (self.bits - 1))

    @property
    def hi(self) -> int:
        """Largest code."""
        return (1 << (self.bits - 1)) - 1

    @property
    def offset(self) -> float:
        """0.5 for the mid-rise grid (no zero level), 0 for the mid-tread grid."""
        return 0.5 if self.bits <= MIDRISE_MAX_BITS else 0.0

    @property
    def peak(self) -> float:
        """The largest ``|q + offset|`` on the grid: a block's scale is about ``max|w| / peak``."""
        return float(self.hi + self.offset) if self.offset else float(-self.lo)

    @property
    def name(self) -> str:
        """``mid-rise`` or ``mid-tread``."""
        return "mid-rise" if self.offset else "mid-tread"


@dataclass(frozen=True)
class Layout:
    """How a weight maps to rows of scales: one row per output channel, blocks along the row.

    Attributes:
        shape: The weight's shape.
        axis: The output-channel axis (None: the whole tensor is one row).
        block: Values per scale along a row (None: one scale per row).
        merged: The channels are every axis up to ``axis`` (recurrent weights ``[directions,
            gates x hidden, K]`` with ``axis`` 1: one row per direction and gate row).
    """

    shape: tuple[int, ...]
    axis: int | None
    block: int | None = None
    merged: bool = False

    @property
    def channels(self) -> int:
        """Rows (output channels)."""
        if self.axis is None:
            return 1
        return math.prod(self.shape[: self.axis + 1]) if self.merged else self.shape[self.axis]

    @property
    def size(self) -> int:
        """Elements of the weight."""
        return math.prod(self.shape)

    @property
    def row(self) -> int:
        """Values per row."""
        return self.size // max(self.channels, 1)

    @property
    def block_len(self) -> int:
        """Values per scale."""
        return min(self.block, self.row) if self.block is not None else self.row

    @property
    def blocks(self) -> int:
        """Scales per row."""
        return -(-self.row // max(self.block_len, 1))

    @property
    def perm(self) -> tuple[int, ...]:
        """Axes order that puts the channel axis first."""
        dims = range(len(self.shape))
        if self.axis is None or self.merged:
            return tuple(dims)
        return (self.axis, *(d for d in dims if d != self.axis))

    @property
    def moved_shape(self) -> tuple[int, ...]:
        """The weight's shape with the channel axis first."""
        return tuple(self.shape[p] for p in self.perm)

    def rows(self, w: np.ndarray) -> np.ndarray:
        """``w`` as ``[channels, row]`` float32 (channel axis first)."""
        return np.ascontiguousarray(np.transpose(np.asarray(w, np.float32), self.perm)).reshape(
            self.channels, self.row
        )

    def unrows(self, rows: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`rows`."""
        moved = rows.reshape(self.moved_shape)
        return np.transpose(moved, np.argsort(self.perm))

    def expand(self, scales: np.ndarray) -> np.ndarray:
        """Per-value scales ``[channels, row]`` from ``[channels, blocks]``."""
        return np.repeat(scales, self.block_len, axis=1)[:, : self.row]


def fake_quant(rows: np.ndarray, scale: np.ndarray, grid: Grid) -> np.ndarray:
    """``s * (clip(round(w / s - offset), lo, hi) + offset)`` in float32, op by op as the graph does.

    ``rows`` and ``scale`` broadcast (e.g. ``[C, R]`` and ``[C, R]``); the arithmetic is the
    same sequence of float32 operations as the fake-quantization graph of ``--qat`` (Div, Sub,
    Clip, Round half to even, Add, Mul), so both give identical bits.
    """
    q = _rounded(rows, scale, grid)
    if grid.offset:
        q = q + np.float32(grid.offset)
    return (q * scale).astype(np.float32)


def _rounded(rows: np.ndarray, scale: np.ndarray, grid: Grid) -> np.ndarray:
    x = np.asarray(rows, np.float32) / np.asarray(scale, np.float32)
    if grid.offset:
        x = x - np.float32(grid.offset)
    return np.rint(np.clip(x, np.float32(grid.lo), np.float32(grid.hi)))


def to_codes(rows: np.ndarray, scale: np.ndarray, grid: Grid) -> np.ndarray:
    """Unsigned codes ``q - lo`` (uint8) of ``rows`` on the grid with per-value ``scale``."""
    return (_rounded(rows, scale, grid) - np.float32(grid.lo)).astype(np.uint8)


def _safe_scale(s: np.ndarray, grid: Grid) -> np.ndarray:
    """Scales of all-zero rows/blocks: exact zeros on the mid-tread grid, +-tiny on mid-rise."""
    fill = np.finfo(np.float32).tiny if grid.offset else np.float32(1)
    return np.where(s == 0, np.float32(fill), s).astype(np.float32)


def cast_scales(scales: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Scales in the storage dtype, never rounded to zero or infinity."""
    out = np.asarray(scales).astype(dtype)
    info = np.finfo(dtype)
    tiny = np.asarray(info.smallest_subnormal, dtype)
    out = np.where(out == 0, np.where(np.asarray(scales) < 0, -tiny, tiny), out)
    return np.clip(out, -info.max, info.max).astype(dtype)


def packed_scale_dtype(rows: np.ndarray, layout: Layout, grid: Grid, name: str) -> np.dtype:
    """float16 when every block's grid scale of ``rows`` fits float16, else float32.

    The scale of a block is within a small factor of ``max|w| / 2^(b-1)`` (the search tries
    ratios down to 0.3; a fitted refit stays near); float16 normals (``2^-14`` to 65504, with a
    margin of 4 at both ends) round it by at most ``2^-11`` of itself, which moves a weight by at
    most 0.4 % of a grid step. A block whose largest value is below ``2^-20`` of the weight's
    largest (a dead channel: 1e-13 in the sample MLP) may fall below that range: float16 then
    rebuilds it within ``2^(b-1) * 2^-24`` (5e-7 at 4 bits) of its values, far below the
    weight's own grid step. Weights with a block outside that, and weights with too few scales
    to pay for the ``Cast`` node float16 needs (it names the weight ``name`` three times: ~80
    bytes for a 10-character name), keep float32 scales.
    """
    if 2 * layout.channels * layout.blocks <= 3 * len(name.encode()) + _CAST_NODE_BYTES:
        return _FLOAT32
    top = grid.peak
    lo_ok, hi_ok = 4 * 2.0**-14 * top, float(np.finfo(np.float16).max) / 4 * top
    amax = np.empty((rows.shape[0], layout.blocks), np.float32)
    for part, blocks in _blocks(rows, layout):
        amax[part] = np.abs(blocks).max(axis=2)
    largest = float(amax.max()) if amax.size else 0.0
    if largest > hi_ok:
        return _FLOAT32
    small = amax[(amax > 0) & (amax < lo_ok)]
    if small.size and float(small.max()) > largest * 2.0**-20:
        return _FLOAT32
    return np.dtype(np.float16)


def fit_scales(
    rows: np.ndarray,
    layout: Layout,
    grid: Grid,
    dtype: np.dtype = _FLOAT32,
    ratios: np.ndarray | None = None,
) -> np.ndarray:
    """Scales ``[channels, blocks]`` in ``dtype`` for ``rows`` ``[channels, row]`` (module docstring).

    Each candidate is rounded to ``dtype`` before it is scored, so the search picks among the
    values that will be stored. ``ratios``: the clipping ratios to try (default ``_RATIOS``).
    """
    nb, bl = layout.blocks, layout.block_len
    out = np.empty((rows.shape[0], nb), dtype)
    valid = np.zeros(nb * bl, np.float32)
    valid[: rows.shape[1]] = 1
    mask = valid.reshape(nb, bl)
    for part, blocks in _blocks(rows, layout):
        out[part] = _fit_blocks(blocks, mask, grid, dtype, _RATIOS if ratios is None else ratios)
    return out


def _blocks(rows: np.ndarray, layout: Layout) -> Iterator[tuple[slice, np.ndarray]]:
    """``rows`` ``[C, row]`` a few channels at a time, as float32 ``[n, blocks, block_len]``
    (the last block zero-padded), with the channels' slice."""
    c, r = rows.shape
    nb, bl = layout.blocks, layout.block_len
    step = max(1, _CHUNK_ELEMENTS // max(1, nb * bl))
    for start in range(0, c, step):
        part = rows[start : start + step]
        padded = np.zeros((part.shape[0], nb * bl), np.float32)
        padded[:, :r] = part
        yield slice(start, start + part.shape[0]), padded.reshape(part.shape[0], nb, bl)


def _fit_blocks(
    blocks: np.ndarray, mask: np.ndarray, grid: Grid, dtype: np.dtype, ratios: np.ndarray
) -> np.ndarray:
    """Best scale per block of ``blocks`` ``[C, nb, B]``; ``mask`` ``[nb, B]`` marks real values."""
    count = np.maximum(mask.sum(axis=1), 1)
    if grid.bits == 1:
        # in float64: the sum of weights near float32's limit overflows float32
        mean = 2 * np.abs(blocks).sum(axis=2, dtype=np.float64) / count
        return cast_scales(
            _safe_scale(np.minimum(mean, np.finfo(np.float32).max).astype(np.float32), grid), dtype
        )
    amax = np.abs(blocks).max(axis=2)
    base = amax / np.float32(grid.peak)
    signs = (1.0,) if grid.offset else (1.0, -1.0)
    best_err = np.full(amax.shape, np.inf, np.float32)
    best = cast_scales(_safe_scale(base, grid), dtype).astype(np.float32)
    for ratio in ratios:
        for sign in signs:
            s = _safe_scale((base * np.float32(ratio * sign)).astype(np.float32), grid)
            s = cast_scales(s, dtype).astype(np.float32)
            with np.errstate(over="ignore"):  # weights near float32's limit: inf error, not chosen
                err = (((fake_quant(blocks, s[..., None], grid) - blocks) * mask) ** 2).sum(axis=2)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best = np.where(better, s, best)
    return best.astype(dtype)


# --- packing -------------------------------------------------------------------------------------


def _group(bits: int) -> tuple[int, int]:
    """``(codes, bytes)`` of the smallest run of codes that fills whole bytes."""
    lcm = bits * 8 // math.gcd(bits, 8)
    return lcm // bits, lcm // 8


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` take (whole groups of codes)."""
    codes, nbytes = _group(bits)
    return -(-count // codes) * nbytes


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (uint8, each < 2^bits) as a little-endian bit stream in uint8 bytes."""
    flat = np.asarray(codes, np.uint8).reshape(-1)
    if bits == 8:
        return flat.copy()
    group, _ = _group(bits)
    padded_count = -(-flat.size // group) * group
    out = np.empty(packed_bytes(flat.size, bits), np.uint8)
    # chunks of whole groups, so every chunk starts on a byte boundary
    step = max(group * 8, (_CHUNK_ELEMENTS // group) * group)
    shifts = np.arange(bits, dtype=np.uint8)
    for start in range(0, padded_count, step):
        part = np.zeros(min(step, padded_count - start), np.uint8)
        real = flat[start : start + part.size]
        part[: real.size] = real
        stream = ((part[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
        packed = np.packbits(stream, bitorder="little")
        first = start * bits // 8
        out[first : first + packed.size] = packed
    return out


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes` (numpy reference of the unpacking graph)."""
    data = np.asarray(packed, np.uint8).reshape(-1)
    if bits == 8:
        return data[:count].copy()
    stream = np.unpackbits(data, bitorder="little")[: count * bits].reshape(count, bits)
    return (stream.astype(np.uint16) << np.arange(bits, dtype=np.uint16)).sum(axis=1).astype(np.uint8)


# --- the graph -----------------------------------------------------------------------------------


def int_attr_node(
    names: NameAuthority,
    base: str,
    op_type: str,
    inputs: Sequence[ir.Value],
    suffix: str,
    **attrs: int | list[int],
) -> ir.Node:
    """A default-domain node with integer attributes, named after ``base``; one fresh output."""
    out = ir.Value(name=names.fresh(f"{base}_{suffix}"))
    attributes = [
        ir.AttrInt64s(k, v) if isinstance(v, list) else ir.AttrInt64(k, v) for k, v in attrs.items()
    ]
    return ir.Node(
        "", op_type, list(inputs), attributes, outputs=[out], name=names.fresh(f"{base}_{op_type}")
    )


class _Emitter:
    """Builds one weight's unpacking nodes next to where the weight lived.

    Small constants that do not depend on the weight (shift amounts, place values) are shared
    by every weight of a graph through ``shared``.
    """

    def __init__(self, unit: Unit, names: NameAuthority, shared: dict[tuple[object, ...], ir.Value]) -> None:
        self.unit = unit
        self.names = names
        self.shared = shared
        self.nodes: list[ir.Node] = []
        self.const_node: ir.Node | None = None
        self.base = unit.weight.name

    def const(self, suffix: str, array: np.ndarray) -> ir.Value:
        w = self.unit.weight
        if self.const_node is not None:
            node, value = _constant(self.names, f"{self.base}_{suffix}", array)
            self.nodes.append(node)
            return value
        return _initializer(w.graph, self.names, f"{self.base}_{suffix}", array)

    def common(self, suffix: str, array: np.ndarray) -> ir.Value:
        """A constant shared by the weights of this graph (an initializer), else :meth:`const`."""
        if self.const_node is not None:
            return self.const(suffix, array)
        graph = self.unit.weight.graph
        key = (id(graph), array.dtype.str, array.shape, array.tobytes())
        value = self.shared.get(key)
        if value is None:
            value = _initializer(graph, self.names, f"lowbit_{suffix}", array)
            self.shared[key] = value
        return value

    def op(self, op_type: str, inputs: Sequence[ir.Value], suffix: str, **attrs: int | list[int]) -> ir.Value:
        node = int_attr_node(self.names, self.base, op_type, inputs, suffix, **attrs)
        self.nodes.append(node)
        return node.outputs[0]

    def head(self, x: ir.Value, stop: int, axis: int, suffix: str, stop_suffix: str) -> ir.Value:
        """``x[..., :stop]`` along ``axis`` (0 or 1)."""
        return self.op(
            "Slice",
            [
                x,
                self.common("zero", np.asarray([0], np.int64)),
                self.ints(stop_suffix, [stop]),
                self.common("zero" if axis == 0 else "one", np.asarray([axis], np.int64)),
            ],
            suffix,
        )

    def shift(self, x: ir.Value, amounts: np.ndarray, direction: str, suffix: str) -> ir.Value:
        out = ir.Value(name=self.names.fresh(f"{self.base}_{suffix}"))
        self.nodes.append(
            ir.Node(
                "",
                "BitShift",
                [x, self.common(f"{suffix}_by", amounts.astype(np.uint8))],
                [ir.AttrString("direction", direction)],
                outputs=[out],
                name=self.names.fresh(f"{self.base}_BitShift"),
            )
        )
        return out

    def ints(self, suffix: str, values: Sequence[int]) -> ir.Value:
        """A 1-D int64 constant (shapes, slice ends), shared by weights that need the same one."""
        return self.common(suffix, np.asarray(list(values), dtype=np.int64))


def _emit_packed(
    unit: Unit,
    names: NameAuthority,
    writer: _Writer,
    packed: np.ndarray,
    scales: np.ndarray,
    layout: Layout,
    grid: Grid,
    shared: dict[tuple[object, ...], ir.Value],
    opset: int,
) -> str:
    """The packed bytes and scales, and the nodes that rebuild the float weight from them."""
    w = unit.weight
    bits, n = grid.bits, layout.size
    e = _Emitter(unit, names, shared)
    stored = packed if bits == 8 else packed.reshape(-1, 1)
    data, e.const_node = _store_quantized(unit, names, stored, writer)
    if bits == 8:
        codes, count = data, packed.size
        storage = "8-bit (Cast+Mul)"
    elif 8 % bits == 0:
        per = 8 // bits
        left = np.asarray([8 - bits - j * bits for j in range(per)])
        lifted = e.shift(data, left, "LEFT", "shl")
        codes = e.shift(lifted, np.asarray([8 - bits]), "RIGHT", "shr")
        count = packed.size * per
        if count != n:  # flat, for the Slice below; else the Reshape to rows does it
            codes = e.op("Reshape", [codes, e.common("flat", np.asarray([-1], np.int64))], "codes")
        storage = f"{bits}-bit packed (BitShift+Cast+Mul)"
    else:
        # every bit of every byte, LSB first: row m of [bytes, 8] is byte m's bits; the stream
        # is code-contiguous, so rows of `bits` consecutive bits are the codes
        lifted = e.shift(data, np.asarray([7 - j for j in range(8)]), "LEFT", "shl")
        bit_values = e.shift(lifted, np.asarray([7]), "RIGHT", "shr")
        per_code = e.op(
            "Reshape", [bit_values, e.common("per_code", np.asarray([-1, bits], np.int64))], "bits"
        )
        as_float = e.op("Cast", [per_code], "bits_f", to=int(ir.DataType.FLOAT))
        place = np.asarray([float(1 << j) for j in range(bits)], np.float32)
        weighted = e.op("Mul", [as_float, e.common(f"place_values{bits}", place)], "bits_w")
        # (a MatMul with the place values is the same sum, 3x slower to fold in onnxruntime)
        if opset >= 13:
            codes = e.op(
                "ReduceSum", [weighted, e.common("last", np.asarray([-1], np.int64))], "codes", keepdims=0
            )
        else:
            codes = e.op("ReduceSum", [weighted], "codes", axes=[-1], keepdims=0)
        count = packed.size * 8 // bits
        storage = f"{bits}-bit packed (BitShift+ReduceSum+Mul)"
    if count != n:
        codes = e.head(codes, n, 0, "codes_n", "stop")
    if bits == 8 or 8 % bits == 0:
        codes = e.op("Cast", [codes], "codes_f", to=int(ir.DataType.FLOAT))
    shifted = e.op(
        "Add", [codes, e.common(f"offset{bits}", np.asarray(grid.lo + grid.offset, np.float32))], "q"
    )
    c, r, nb, bl = layout.channels, layout.row, layout.blocks, layout.block_len
    scale = e.const("scale", scales.reshape(c, nb, 1) if nb > 1 else scales.reshape(c, 1))
    if scales.dtype != np.float32:
        scale = e.op("Cast", [scale], "scale_f", to=int(ir.DataType.FLOAT))
    rows_shape: tuple[int, ...] = (c, r)
    if nb == 1:
        rows = e.op("Reshape", [shifted, e.ints("rows", [c, r])], "rows")
        scaled = e.op("Mul", [rows, scale], "scaled")
    elif nb * bl == r:
        rows = e.op("Reshape", [shifted, e.ints("rows", [c, nb, bl])], "rows")
        scaled = e.op("Mul", [rows, scale], "scaled")
        rows_shape = (c, nb, bl)
    else:
        rows = e.op("Reshape", [shifted, e.ints("rows", [c, r])], "rows")
        expanded = e.op("Expand", [scale, e.ints("blocks", [c, nb, bl])], "scale_b")
        flat_scale = e.op("Reshape", [expanded, e.ints("scale_rows", [c, nb * bl])], "scale_r")
        per_value = e.head(flat_scale, r, 1, "scale_v", "scale_stop")
        scaled = e.op("Mul", [rows, per_value], "scaled")
    result = scaled
    if rows_shape != layout.moved_shape:
        result = e.op("Reshape", [scaled, e.ints("moved", list(layout.moved_shape))], "moved")
    if layout.perm != tuple(range(len(layout.shape))):
        inverse = [int(i) for i in np.argsort(layout.perm)]
        out = ir.Value(name=names.fresh(f"{e.base}_t"))
        e.nodes.append(
            ir.Node(
                "",
                "Transpose",
                [result],
                [ir.AttrInt64s("perm", inverse)],
                outputs=[out],
                name=names.fresh(f"{e.base}_Transpose"),
            )
        )
        result = out
    if w.dtype != ir.DataType.FLOAT:
        result = e.op("Cast", [result], "cast", to=int(w.dtype))
    result.type = ir.TensorType(w.dtype)
    result.shape = ir.Shape(list(w.shape))
    writer.place(w.graph, e.nodes, after=e.const_node)
    _retire(unit, result)
    return storage


# --- quantizing units ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Codes:
    """A weight's codes and scales, ready to pack (from the scale search, or from ``--qat``)."""

    codes: np.ndarray  # uint8 [channels, row]
    scales: np.ndarray  # float16 or float32 [channels, blocks], stored as they are

    @classmethod
    def of(cls, rows: np.ndarray, layout: Layout, grid: Grid, scales: np.ndarray) -> Codes:
        """``rows`` rounded to the grid with ``scales`` (as stored: float16 ones are widened)."""
        return cls(to_codes(rows, layout.expand(scales.astype(np.float32)), grid), scales)

    def restored(self, layout: Layout, grid: Grid) -> np.ndarray:
        """The float32 rows the packed weight is rebuilt as."""
        q = self.codes.astype(np.float32) + np.float32(grid.lo + grid.offset)
        return q * layout.expand(self.scales.astype(np.float32))


def round_to_nearest(
    rows: np.ndarray, layout: Layout, grid: Grid, name: str, *, offsets: Sequence[float] = ()
) -> Codes:
    """Round-to-nearest on the grid with searched scales, in the dtype they will be stored in.

    ``offsets`` (fractions of each row's grid step, ``max|row| / peak``): also try ``row + c``
    for each and keep, per row, what leaves the least error once centered. Only for rows a
    centering removes the offset from again (:mod:`modelshrink.techniques.quantize.centered`).
    """
    dtype = packed_scale_dtype(rows, layout, grid, name)
    best = Codes.of(rows, layout, grid, fit_scales(rows, layout, grid, dtype))
    if not offsets:
        return best
    best_err = _centered_error(best.restored(layout, grid), rows)
    step = np.abs(rows).max(axis=1, keepdims=True) / np.float32(grid.peak)
    for fraction in offsets:
        shifted = (rows + np.float32(fraction) * step).astype(np.float32)
        cand = Codes.of(shifted, layout, grid, fit_scales(shifted, layout, grid, dtype, _OFFSET_RATIOS))
        err = _centered_error(cand.restored(layout, grid), rows)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best.codes[better] = cand.codes[better]
        best.scales[better] = cand.scales[better]
    return best


def _centered_error(restored: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per row, the squared error left after removing its mean (what a LayerNorm sees)."""
    err = restored[:, : rows.shape[1]] - rows
    err -= err.mean(axis=1, keepdims=True)
    return np.einsum("ij,ij->i", err, err)


@dataclass(frozen=True)
class PackingSummary:
    """Bytes of the packed weights against the physical limit of their width."""

    bits: int
    params: int
    code_bytes: int
    scale_bytes: int
    offset_tables: int = 0

    @property
    def limit_bytes(self) -> float:
        """``bits * params / 8 + scale bytes``."""
        return self.bits * self.params / 8 + self.scale_bytes

    @property
    def stored_bytes(self) -> int:
        """Codes and scales as stored."""
        return self.code_bytes + self.scale_bytes

    def as_dict(self) -> dict[str, object]:
        """JSON-native figures."""
        return {
            "bits": self.bits,
            "params": self.params,
            "code_bytes": self.code_bytes,
            "scale_bytes": self.scale_bytes,
            "physical_limit_bytes": round(self.limit_bytes, 1),
            "stored_over_limit": round(self.stored_bytes / self.limit_bytes, 4) if self.limit_bytes else None,
        }


def layout_of(unit: Unit, block: int | None) -> Layout:
    """The layout of a unit's weight: rows along its output-channel axis, optional blocks."""
    return Layout(tuple(unit.weight.shape), unit.axis, block, merged=unit.merged_rows)


def quantize_packed(
    model: ir.Model,
    units: Sequence[Unit],
    names: NameAuthority,
    *,
    bits: int,
    block: int | None,
    fixed: Mapping[str, Codes] | None = None,
) -> Emitted:
    """Quantize ``units`` (planned on this very model) to ``bits`` and pack them, in place.

    Args:
        model: The model the units were planned on (modified).
        units: What to quantize.
        names: Fresh names.
        bits: Width, 1..8.
        block: Values per scale along each output channel (None: one scale per channel).
        fixed: Codes and scales to use instead of searching, by weight name (``--qat``).
    """
    grid = Grid(bits)
    opset = default_opset(model)
    writer = _Writer()
    shared: dict[tuple[object, ...], ir.Value] = {}
    changes: list[Change] = []
    skipped: list[Skip] = []
    for unit in units:
        w = unit.weight
        layout = layout_of(unit, block)
        rows = layout.rows(w.numpy())
        _release(w.tensor)
        if not np.isfinite(rows).all():
            skipped.append(Skip(unit.layer, unit.op_type, f"'{w.name}': {NON_FINITE_REASON}"))
            del rows
            continue
        given = fixed.get(w.name) if fixed is not None else None
        offsets = row_offsets(unit) if given is None else ()
        rounded = (
            given
            if given is not None
            else round_to_nearest(rows, layout, grid, w.name or "", offsets=offsets)
        )
        scales, codes = rounded.scales, rounded.codes
        restored = rounded.restored(layout, grid)
        snr = _snr_db(rows, restored)
        packed = pack_codes(codes, bits)
        del rows, restored
        storage = _emit_packed(unit, names, writer, packed, scales, layout, grid, shared, opset)
        granularity = (
            "per-tensor"
            if unit.axis is None
            else ("per direction and gate row" if layout.merged else f"per-channel axis {unit.axis}")
            + (f", blocks of {layout.block_len}" if layout.blocks > 1 else "")
        )
        change = weight_change(
            model,
            unit,
            f"{storage}, {granularity}",
            storage=storage,
            bytes_after=packed.nbytes + scales.nbytes,
            snr=snr,
            axis=unit.axis,
            bits=bits,
            grid=grid.name,
            block_size=layout.block_len if layout.blocks > 1 else None,
            code_bytes=int(packed.nbytes),
            scale_bytes=int(scales.nbytes),
            scale_dtype=str(scales.dtype),
            physical_limit_bytes=round(bits * layout.size / 8 + scales.nbytes, 1),
        )
        if offsets:
            change = dataclasses.replace(
                change, details={**change.details, "row_offsets": ROW_OFFSETS_DETAIL}
            )
        changes.append(change)
        logger.debug("%d-bit %s (%s): %d bytes", bits, w.name, unit.layer, packed.nbytes)
    storages = frozenset(str(c.details["storage"]) for c in changes)
    return Emitted(tuple(changes), storages, tuple(skipped))


def summarize(bits: int, changes: Sequence[Change]) -> PackingSummary:
    """The packing figures of the changes :func:`quantize_packed` made."""
    return PackingSummary(
        bits,
        sum(c.params_before for c in changes),
        sum(int(c.details["code_bytes"]) for c in changes),
        sum(int(c.details["scale_bytes"]) for c in changes),
        sum("row_offsets" in c.details for c in changes),
    )


def packed_notes(summary: PackingSummary, *, qat: bool) -> list[str]:
    """What the user must know about packed weights: size against the limit, speed, accuracy."""
    bits = summary.bits
    grid = Grid(bits)
    notes = [
        f"{bits}-bit weights ({grid.name} grid, {1 << bits} levels): {summary.params:,} parameters in "
        f"{summary.code_bytes:,} bytes of packed codes + {summary.scale_bytes:,} bytes of scales "
        "(float16 where every scale of a weight is a float16 normal number, else float32); "
        f"the physical limit ({bits} x {summary.params:,} / 8 + scales) is {summary.limit_bytes:,.0f} bytes, "
        f"so they are stored in {summary.stored_bytes / summary.limit_bytes:.3f}x the limit",
        "the packed weights are rebuilt by standard ops (BitShift, Cast, Mul, Reshape) that onnxruntime "
        "folds once when it loads the model: the file is small, but the session holds float weights "
        "and runs at the float model's speed (no low-bit kernels)",
    ]
    if summary.offset_tables:
        notes.append(
            f"{summary.offset_tables} embedding table(s) read only through LayerNorms: each row was rounded "
            "with the offset (not stored) that leaves the least error once the LayerNorm subtracts the "
            "row's mean, which it does exactly (details.row_offsets)"
        )
    if bits <= MIDRISE_MAX_BITS and not qat:
        notes.insert(
            0,
            f"post-training quantization to {bits} bit{'s' if bits > 1 else ''} loses accuracy: each weight "
            f"takes one of {1 << bits} values per channel (see the fidelity table); --qat --data TRAIN.npz "
            "trains the model for this grid (quantization-aware training)",
        )
    return notes
