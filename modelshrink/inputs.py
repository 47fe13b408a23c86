"""What a model's inputs are, and what synthetic inputs it will run on.

Verification without ``--data`` runs the original on synthetic inputs. Those are only worth
something if they are the kind of input the model was built for: a detector at 1x1 pixels
collapses every feature map and "verifies" nothing, an audio model with one sample fails in its
first ``Pad``, and a scalar ``sr`` drawn from ``{0, 1}`` takes the wrong ``If`` branch. So every
dynamic axis gets a *kind* and a short ladder of sizes, tried in order on the original:

- batch-like axes (axis 0 of inputs of rank >= 2, a symbol named like a batch or shared with
  one, the middle axis of a ``[layers, batch, hidden]`` recurrent state): 1
- image height and width (a 4-D float input with <= 4 channels, NCHW or NHWC): 224, 320, 640,
  then 128, 64, 32
- audio-like samples (the last axis of a 2-D or 3-D float input): 512, 1024, 16000, then 256,
  64, 16
- token sequences (integer inputs): 16, 64, 128, 512, 8; other sequence axes: 16, 64, 512, 8, 1
  (among them the time axis of an input read by an LSTM/GRU/RNN, axis 0 of a time-major
  ``[seq, batch, size]``: one step from a zero state would never reach the recurrence weights)

Axes that share a symbol share a size. A size the graph fixes wins over the ladder: an input
that feeds a ``Reshape`` to a constant shape has as many elements as that shape.

Small integer inputs the graph compares with constants (``Equal``, ``Less``, ``Greater``, ...,
directly or through casts, reshapes and element picks (``Gather``, ``Slice``), in subgraphs too)
try those constants, so an
``If (sr == 16000)`` takes the branch the model is built around; boolean inputs that are an
``If`` or ``Where`` condition try both values. ``--input-shape`` and ``--input-value`` replace
any guess. :func:`candidates` yields the combinations in the order they are worth trying:
the first step of every ladder with each value guess, then the next step, and so on.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from modelshrink.errors import ConfigError
from modelshrink.graph import graph_inputs
from modelshrink.options import Scalar, parse_input_values

__all__ = [
    "BatchAxis",
    "Candidate",
    "Dim",
    "InputPlan",
    "InputSpec",
    "Scalar",
    "batch_axes",
    "batch_symbol",
    "input_specs",
    "parse_input_values",
    "plan_inputs",
]

Dim = int | str | None

# How many candidate feeds a probe tries before giving up (each is one run of the original).
MAX_CANDIDATES = 24

LADDERS: dict[str, tuple[int, ...]] = {
    "batch": (1,),
    "spatial": (224, 320, 640, 128, 64, 32),
    "channels": (3, 1, 4),
    "samples": (512, 1024, 16000, 256, 64, 16),
    "tokens": (16, 64, 128, 512, 8),
    "sequence": (16, 64, 512, 8, 1),
    "other": (16, 1, 64, 512),
}
KIND_WORDS = {
    "batch": "batch",
    "spatial": "image size",
    "channels": "channels",
    "samples": "samples",
    "tokens": "sequence length",
    "sequence": "sequence length",
    "other": "size",
    "fixed": "fixed by the graph",
}
_BATCH_NAME = re.compile(r"^(n|b|bs|batch.*|.*_batch|.*batch_size.*|num_batch.*)$", re.IGNORECASE)
_PASS_THROUGH = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand"}
# Ops whose output holds some of their first input's values (not its shape): followed when what
# matters is the values, e.g. silero's op18 export reads ``sr`` as ``Gather(Reshape(sr, [-1]), 0)``
# before comparing it with 16000.
_VALUE_PASS_THROUGH = _PASS_THROUGH | {"Gather", "Slice"}
_COMPARISONS = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"}
# For "x OP c": values of x that make the comparison true first, then false.
_TRUE_FIRST: dict[str, tuple[int, ...]] = {
    "Equal": (0,),
    "Less": (-1, 0),
    "Greater": (1, 0),
    "LessOrEqual": (0, 1),
    "GreaterOrEqual": (0, -1),
}
_MIRROR = {
    "Less": "Greater",
    "Greater": "Less",
    "LessOrEqual": "GreaterOrEqual",
    "GreaterOrEqual": "LessOrEqual",
}


@dataclass(frozen=True)
class InputSpec:
    """A model input as declared.

    Attributes:
        name: Input name.
        dtype: numpy dtype (``None`` for types numpy cannot hold, e.g. strings, sequences).
        dims: Per-axis size: an int, a symbolic name, or None when unknown.
        type_name: Human-readable ONNX type.
        index_bound: For integer inputs used as ``Gather`` indices, the table size.
    """

    name: str
    dtype: np.dtype | None
    dims: tuple[Dim, ...] | None
    type_name: str
    index_bound: int | None = None

    def shape_text(self) -> str:
        """``[batch,1,16,16]``-style text; ``?`` for unknown dims."""
        if self.dims is None:
            return "[unknown rank]"
        return "[" + ",".join("?" if d is None else str(d) for d in self.dims) + "]"

    def dynamic_axes(self) -> list[int]:
        """Axes without a fixed positive size (symbolic, unknown, or Paddle's -1)."""
        if self.dims is None:
            return []
        return [a for a, d in enumerate(self.dims) if not (isinstance(d, int) and d > 0)]

    @property
    def is_float(self) -> bool:
        """Floating-point input (float16/bfloat16 included)."""
        return self.dtype is not None and (
            np.issubdtype(self.dtype, np.floating) or "float" in str(self.dtype)
        )

    @property
    def is_integer(self) -> bool:
        """Integer or boolean input."""
        return self.dtype is not None and (np.issubdtype(self.dtype, np.integer) or self.dtype == np.bool_)


def _dim(d: int | ir.SymbolicDim) -> Dim:
    if isinstance(d, int):
        return d
    return d.value if d.value else None


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs a caller must feed, with dtype, dims and index bounds."""
    bounds = _gather_index_bounds(model)
    specs = []
    for value in graph_inputs(model.graph):
        vtype = value.type
        dtype: np.dtype | None = None
        if isinstance(vtype, ir.TensorType):
            try:
                dtype = np.dtype(vtype.dtype.numpy())
            except (TypeError, ValueError):
                dtype = None
            if vtype.dtype == ir.DataType.STRING:
                dtype = np.dtype(object)  # onnxruntime takes str/bytes objects
        shape = value.shape
        dims = None if shape is None else tuple(_dim(d) for d in shape)
        specs.append(
            InputSpec(
                name=value.name or "",
                dtype=dtype,
                dims=dims,
                type_name=str(vtype) if vtype is not None else "unknown",
                index_bound=bounds.get(value.name or ""),
            )
        )
    return specs


def _forward(value: ir.Value, through: frozenset[str] | set[str] = _PASS_THROUGH) -> Iterator[Any]:
    """Uses of ``value`` and of what it becomes through ``through`` (casts and reshapes unless
    told; subgraphs included)."""
    frontier = [value]
    seen: set[int] = set()
    while frontier:
        v = frontier.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for use in v.uses():
            yield use
            if use.node.op_type in through and use.idx == 0:
                frontier.extend(use.node.outputs)


def _gather_index_bounds(model: ir.Model) -> dict[str, int]:
    """For each graph input whose values reach ``Gather``'s indices: table rows."""
    bounds: dict[str, int] = {}
    for value in graph_inputs(model.graph):
        for use in _forward(value, _VALUE_PASS_THROUGH):
            node = use.node
            if node.op_type in ("Gather", "GatherElements") and use.idx == 1:
                axis = node.attributes.get_int("axis", 0)
                table_shape = _static_shape(node.inputs[0])
                if table_shape and -len(table_shape) <= axis < len(table_shape):
                    size = table_shape[axis]
                    if isinstance(size, int):
                        prev = bounds.get(value.name or "")
                        bounds[value.name or ""] = size if prev is None else min(prev, size)
    return bounds


def _static_shape(value: ir.Value | None) -> tuple[int | ir.SymbolicDim, ...] | None:
    """Shape of a value: declared, or from its constant (initializer or Constant node)."""
    if value is None:
        return None
    if value.const_value is not None:
        return tuple(value.const_value.shape.numpy())
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant":
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return tuple(attr.as_tensor().shape.numpy())
    if value.shape is not None:
        return tuple(value.shape)
    return None


def _constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or ``Constant`` node output, if small; else None."""
    if value is None:
        return None
    tensor: ir.TensorProtocol | None = value.const_value
    if tensor is None:
        producer = value.producer()
        if producer is None or producer.op_type != "Constant":
            return None
        attr = producer.attributes.get("value")
        if attr is None or attr.type != ir.AttributeType.TENSOR:
            for name in ("value_int", "value_float", "value_ints", "value_floats"):
                other = producer.attributes.get(name)
                if other is not None:
                    return np.asarray(other.value)
            return None
        tensor = attr.as_tensor()
    if tensor.size > 1024:
        return None
    try:
        return np.asarray(tensor.numpy())
    except Exception:  # exotic dtypes: no guess from them
        return None


# --- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisGuess:
    """One group of dynamic axes that share a size.

    Attributes:
        axes: ``(input, axis)`` pairs (several when they share a symbol).
        kind: Key of :data:`LADDERS`, or ``fixed`` when the graph fixes the size.
        ladder: Sizes to try, in order.
        why: How the size was decided, for the report.
    """

    axes: tuple[tuple[str, int], ...]
    kind: str
    ladder: tuple[int, ...]
    why: str = ""


@dataclass(frozen=True)
class ValueGuess:
    """Values to try for a small integer or boolean input the graph tests.

    ``None`` in ``values`` means "draw at random as usual".
    """

    name: str
    values: tuple[Scalar | None, ...]
    why: str


@dataclass(frozen=True)
class Candidate:
    """One complete guess: a shape for every input and the fixed values of some."""

    shapes: Mapping[str, tuple[int, ...]]
    values: Mapping[str, Scalar]

    def describe(self, names: Sequence[str] | None = None) -> str:
        """``x 1x3x224x224, sr=16000``."""
        parts = []
        for name, shape in self.shapes.items():
            if names is not None and name not in names:
                continue
            text = "x".join(map(str, shape)) if shape else "scalar"
            value = self.values.get(name)
            parts.append(f"'{name}' {text}" + (f" = {value}" if value is not None else ""))
        return ", ".join(parts)


@dataclass(frozen=True)
class InputPlan:
    """How synthetic inputs are shaped and valued, and what of it is a guess.

    Attributes:
        specs: The model's inputs.
        fixed: Shapes given with ``--input-shape`` or fully declared.
        axes: The dynamic-axis groups that need a size.
        values: Integer/boolean inputs with values to try (guessed or ``--input-value``).
        user_values: Values given with ``--input-value``.
    """

    specs: tuple[InputSpec, ...]
    fixed: Mapping[str, tuple[int, ...]]
    axes: tuple[AxisGuess, ...]
    values: tuple[ValueGuess, ...]
    user_values: Mapping[str, Scalar] = field(default_factory=dict)

    @property
    def guessed(self) -> bool:
        """True when something has to be tried on the model (a dynamic size or a value)."""
        return bool(self.axes) or any(v.name not in self.user_values for v in self.values)

    def candidates(self) -> Iterator[Candidate]:
        """Combinations in the order worth trying, without repeats, at most MAX_CANDIDATES."""
        steps = max((len(g.ladder) for g in self.axes), default=1)
        value_lists = [v.values for v in self.values]
        seen: set[tuple] = set()
        count = 0
        for step in range(steps):
            sizes = {axis: g.ladder[min(step, len(g.ladder) - 1)] for g in self.axes for axis in g.axes}
            shapes = {}
            for spec in self.specs:
                if spec.name in self.fixed:
                    shapes[spec.name] = self.fixed[spec.name]
                elif spec.dims is not None:
                    shapes[spec.name] = tuple(
                        d if isinstance(d, int) and d > 0 else sizes[(spec.name, a)]
                        for a, d in enumerate(spec.dims)
                    )
            for combo in itertools.product(*value_lists):
                values = {v.name: x for v, x in zip(self.values, combo, strict=True) if x is not None}
                key = (tuple(sorted(shapes.items())), tuple(sorted(values.items())))
                if key in seen:
                    continue
                seen.add(key)
                yield Candidate(shapes, values)
                count += 1
                if count >= MAX_CANDIDATES:
                    return

    def first(self) -> Candidate:
        """The first candidate (what is used when nothing can be tried on the model)."""
        return next(self.candidates())

    @property
    def guessed_beyond_batch(self) -> bool:
        """True when a guess other than a batch size of 1 was made (worth a warning)."""
        return any(g.kind != "batch" for g in self.axes) or any(
            v.name not in self.user_values for v in self.values
        )

    def describe_guesses(self, chosen: Candidate) -> str:
        """What was guessed and how: ``'x' 1x3x224x224 (axis 2, 3: image size)``; batch axes unsaid."""
        by_input: dict[str, list[str]] = {}
        for g in self.axes:
            if g.kind == "batch":
                continue
            for name, axis in g.axes:
                word = KIND_WORDS.get(g.kind, g.kind)
                by_input.setdefault(name, []).append(f"axis {axis}: {word}" + (f", {g.why}" if g.why else ""))
        parts = []
        for spec in self.specs:
            shape = chosen.shapes.get(spec.name)
            if spec.name in by_input and shape is not None:
                text = "x".join(map(str, shape)) if shape else "scalar"
                parts.append(f"'{spec.name}' {text} ({'; '.join(by_input[spec.name])})")
        for v in self.values:
            if v.name in self.user_values:
                continue
            value = chosen.values.get(v.name)
            shown = "random" if value is None else str(value)
            parts.append(f"'{v.name}' = {shown} ({v.why})")
        return ", ".join(parts)

    def flag_hint(self, chosen: Candidate | None = None) -> str:
        """The flags that would make the guess explicit (or fix it)."""
        flags = []
        guessed_inputs = {name for g in self.axes for name, _ in g.axes}
        for spec in self.specs:
            if spec.name in guessed_inputs:
                shape = chosen.shapes.get(spec.name) if chosen else None
                dims = "x".join(map(str, shape)) if shape is not None else "DIMS"
                flags.append(f"--input-shape {spec.name}:{dims}")
        for v in self.values:
            if v.name not in self.user_values:
                value = chosen.values.get(v.name) if chosen else None
                flags.append(f"--input-value {v.name}={'VALUE' if value is None else value}")
        return " ".join(flags)

    def tried_text(self, tried: Sequence[Candidate]) -> str:
        """Per input, the shapes/values tried: ``'x' [N,3,H,W] as 1x3x224x224, 1x3x320x320``."""
        parts = []
        guessed_inputs = {name for g in self.axes for name, _ in g.axes}
        for spec in self.specs:
            if spec.name in guessed_inputs:
                shapes = list(dict.fromkeys("x".join(map(str, c.shapes[spec.name])) for c in tried))
                parts.append(f"'{spec.name}' {spec.shape_text()} as {', '.join(shapes)}")
        for v in self.values:
            if v.name in self.user_values:
                continue
            shown = list(dict.fromkeys(str(c.values.get(v.name, "random")) for c in tried))
            parts.append(f"'{v.name}' = {', '.join(shown)}")
        return "; ".join(parts)


_RECURRENT = frozenset({"LSTM", "GRU", "RNN"})


def _recurrent_time_axes(model: ir.Model) -> dict[str, int]:
    """Inputs read (through casts and reshapes) as the sequence X of an LSTM/GRU/RNN: their time
    axis (0, or 1 for ``layout=1``)."""
    found: dict[str, int] = {}
    for value in graph_inputs(model.graph):
        for use in _forward(value):
            node = use.node
            if node.op_type in _RECURRENT and node.domain in ("", "ai.onnx") and use.idx == 0:
                layout = node.attributes.get("layout")
                found[value.name or ""] = 1 if layout is not None and layout.as_int() == 1 else 0
                break
    return found


def _batch_symbols(specs: Sequence[InputSpec]) -> set[str]:
    symbols: set[str] = set()
    for spec in specs:
        if not spec.dims:
            continue
        for axis, d in enumerate(spec.dims):
            if isinstance(d, str) and ((axis == 0 and len(spec.dims) >= 2) or _BATCH_NAME.match(d)):
                symbols.add(d)
    return symbols


# --- batch axes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchAxis:
    """Where an input stacks the rows of a batch.

    Attributes:
        name: Input name.
        axis: The batch axis, or None: the input has none and is fed as it is, one value for a
            whole batch (so rows whose values differ go to different batches).
        why: How it was found, for the report (``the dimension 'batch' it shares with 'input'``).
    """

    name: str
    axis: int | None
    why: str


def _static(d: Dim) -> bool:
    return isinstance(d, int) and d > 0


# Names exporters give a dimension they know nothing about: two of them are not the same size
# (paddle2onnx declares ``x [-1, 3, ?, ?]``: the ``?`` are height and width, not a batch).
_ANONYMOUS = frozenset({"?", "", "unk", "None"})


def batch_symbol(specs: Sequence[InputSpec]) -> str | None:
    """The symbolic dimension that is the batch, or None when no input has one.

    Among the symbols of inputs of rank >= 2 (and rank-1 symbols named like a batch), the one
    named like a batch (``batch``, ``N``, ``batch_size``, ...) wins, then the one shared by the
    most inputs, then the one most often on axis 0, then the first declared. Anonymous names
    (``?``) are not symbols, nor is a symbol that no input has on axis 0 unless it is named like
    a batch: ``x [1, 1, 64, image_width]`` (a fixed batch of one, a dynamic width) has no batch
    symbol. ``input [batch, samples]`` and ``state [2, batch, 128]`` give ``batch``; ``x [n, 3,
    h, w]`` gives ``n``.
    """
    leading = {s.dims[0] for s in specs if s.dims and len(s.dims) >= 2 and isinstance(s.dims[0], str)}
    scores: dict[str, list[int]] = {}
    for spec in specs:
        if not spec.dims:
            continue
        rank = len(spec.dims)
        for d in dict.fromkeys(spec.dims):
            if not isinstance(d, str) or d in _ANONYMOUS:
                continue
            named = bool(_BATCH_NAME.match(d))
            if not named and (rank < 2 or d not in leading):
                continue
            score = scores.setdefault(d, [int(named), 0, 0, -len(scores)])
            score[1] += 1
            score[2] += spec.dims.index(d) == 0
    if not scores:
        return None
    return max(scores, key=lambda s: tuple(scores[s]))


def batch_axes(
    specs: Sequence[InputSpec], overrides: Mapping[str, int | None] | None = None
) -> dict[str, BatchAxis]:
    """Each input's batch axis, found from the declared dims (``--batch-axis`` overrides).

    - an input holding the batch symbol (:func:`batch_symbol`): that axis (``state [2, batch,
      128]``: axis 1);
    - a ``[layers, ?, hidden]`` recurrent state (static outer axes): axis 1;
    - an input of rank >= 2 whose axis 0 is dynamic: axis 0;
    - in a model without any symbol (fixed shapes): axis 0 of inputs of rank >= 2, axis 1 of a
      ``[layers, B, hidden]`` state where the other inputs start with ``B``;
    - an input of unknown rank: axis 0 (assumed, said);
    - anything else (a scalar such as ``sr``, a fixed-size input of a model with a batch
      symbol, a rank-1 input whose symbol is not named like a batch): no batch axis; such an
      input is fed as it is, one value per batch.

    Raises:
        ConfigError: An override names an unknown input or an axis the input does not have.
    """
    overrides = dict(overrides or {})
    by_name = {s.name: s for s in specs}
    for name, axis in overrides.items():
        spec = by_name.get(name)
        if spec is None:
            known = ", ".join(sorted(by_name)) or "none"
            raise ConfigError(f"--batch-axis {name}: the model has no such input (inputs: {known})")
        if axis is not None and spec.dims is not None and not 0 <= axis < len(spec.dims):
            raise ConfigError(
                f"--batch-axis {name}:{axis}: the input has {len(spec.dims)} axes {spec.shape_text()}"
            )
    symbol = batch_symbol(specs)
    holders = [s.name for s in specs if s.dims and symbol in s.dims]
    leading = {
        s.dims[0]
        for s in specs
        if s.dims and len(s.dims) >= 2 and _static(s.dims[0]) and s.name not in holders
    }
    out: dict[str, BatchAxis] = {}
    for spec in specs:
        name, dims = spec.name, spec.dims
        if name in overrides:
            out[name] = BatchAxis(name, overrides[name], "--batch-axis")
        elif dims is None:
            out[name] = BatchAxis(name, 0, "its rank is not declared: axis 0 assumed")
        elif not dims:
            out[name] = BatchAxis(name, None, "a scalar")
        elif symbol is not None and symbol in dims:
            others = [h for h in holders if h != name]
            shared = f" it shares with {', '.join(repr(h) for h in others[:3])}" if others else ""
            out[name] = BatchAxis(name, dims.index(symbol), f"the dimension '{symbol}'{shared}")
        elif len(dims) == 3 and _static(dims[0]) and _static(dims[2]) and not _static(dims[1]):
            out[name] = BatchAxis(name, 1, "the middle axis of a [layers, batch, hidden] state")
        elif len(dims) >= 2 and not _static(dims[0]):
            out[name] = BatchAxis(name, 0, "its first axis is dynamic")
        elif (
            symbol is None
            and len(dims) == 3
            and len(leading) == 1
            and dims[0] not in leading
            and (dims[1] in leading)
        ):
            out[name] = BatchAxis(name, 1, "the middle axis of a [layers, batch, hidden] state")
        elif symbol is None and len(dims) >= 2:
            fixed = all(_static(d) for d in dims)
            why = "the model's shapes are fixed" if fixed else "no dimension is named or placed like a batch"
            out[name] = BatchAxis(name, 0, f"axis 0 ({why})")
        else:
            why = f"does not have the batch dimension '{symbol}'" if symbol else "fixed size"
            out[name] = BatchAxis(name, None, f"no batch axis ({why})")
    return out


def _layout(spec: InputSpec) -> str | None:
    """``nchw`` / ``nhwc`` for a 4-D float input that looks like an image batch, else None."""
    dims = spec.dims
    if dims is None or len(dims) != 4 or not spec.is_float:
        return None

    def small(d: Dim) -> bool:
        return isinstance(d, int) and 0 < d <= 4

    if small(dims[1]):
        return "nchw"
    if small(dims[3]):
        return "nhwc"
    if not (isinstance(dims[1], int) and dims[1] > 0):
        return "nchw"  # channels unknown too: the usual layout
    return None


def _axis_kind(spec: InputSpec, axis: int, batch_symbols: set[str]) -> str:
    assert spec.dims is not None
    dims = spec.dims
    rank = len(dims)
    d = dims[axis]
    symbol = d if isinstance(d, str) else None
    if symbol is not None and (symbol in batch_symbols or _BATCH_NAME.match(symbol)):
        return "batch"
    if rank >= 2 and axis == 0:
        return "batch"
    layout = _layout(spec)
    if layout == "nchw":
        return "spatial" if axis in (2, 3) else "channels"
    if layout == "nhwc":
        return "spatial" if axis in (1, 2) else "channels"

    def static(d: Dim) -> bool:
        return isinstance(d, int) and d > 0

    if rank == 3 and axis == 1 and static(dims[0]) and static(dims[2]):
        return "batch"  # [layers x directions, batch, hidden]: a recurrent state
    if spec.is_integer:
        return "tokens"
    if spec.is_float and axis == rank - 1 and rank in (2, 3):
        return "samples"
    if rank == 1:
        return "other"
    return "sequence"


def _reshape_sizes(model: ir.Model) -> dict[str, int]:
    """Inputs that feed a ``Reshape`` to a constant, fully positive shape: their element count."""
    sizes: dict[str, int] = {}
    for value in graph_inputs(model.graph):
        for use in _forward(value):
            if use.node.op_type == "Reshape" and use.idx == 0:
                target = _constant_array(use.node.inputs[1] if len(use.node.inputs) > 1 else None)
                if target is not None and target.size and (target > 0).all():
                    sizes[value.name or ""] = int(np.prod(target.astype(np.int64)))
                    break
    return sizes


def _value_guesses(model: ir.Model, specs: Sequence[InputSpec]) -> dict[str, ValueGuess]:
    """Values to try for small integer/boolean inputs the graph compares or branches on."""
    out: dict[str, ValueGuess] = {}
    by_name = {s.name: s for s in specs}
    for value in graph_inputs(model.graph):
        spec = by_name.get(value.name or "")
        if spec is None or not spec.is_integer or spec.dims is None:
            continue
        small = all(isinstance(d, int) and 0 < d <= 4 for d in spec.dims) or len(spec.dims) == 0
        small = small or (len(spec.dims) == 1 and not isinstance(spec.dims[0], int))
        if not small:
            continue
        found: list[Scalar] = []
        why = ""
        for use in _forward(value, _VALUE_PASS_THROUGH):
            node = use.node
            if node.op_type in _COMPARISONS and len(node.inputs) == 2:
                other = _constant_array(node.inputs[1 - use.idx])
                if other is None or other.size != 1:
                    continue
                c = other.reshape(()).item()
                op = node.op_type if use.idx == 0 else _MIRROR.get(node.op_type, node.op_type)
                if not why:
                    why = f"compared with {c:g} by {node.op_type} '{node.name or '?'}'"
                for delta in _TRUE_FIRST[op]:
                    found.append(c + delta if spec.dtype != np.bool_ else bool(c))
            elif node.op_type in ("If", "Where") and use.idx == 0 and spec.dtype == np.bool_:
                found.extend([True, False])
                why = why or f"the condition of {node.op_type} '{node.name or '?'}'"
        if found:
            if spec.dtype is not None and spec.dtype != np.bool_:
                found = [int(v) if float(v).is_integer() else v for v in found]
            unique = tuple(dict.fromkeys(found))
            out[spec.name] = ValueGuess(spec.name, (*unique, None), why)
    return out


def check_value(spec: InputSpec, value: Scalar) -> None:
    """Refuse a ``--input-value`` the input's type cannot hold exactly.

    Raises:
        ConfigError: Non-numeric input, a fraction for an integer input, or out of range.
    """
    dtype = spec.dtype
    if dtype is None or (dtype.kind not in "biuf" and "float" not in str(dtype)):
        raise ConfigError(f"--input-value {spec.name}: the input has type {spec.type_name}, not a number")
    if dtype.kind in "iu":
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"--input-value {spec.name}={value}: the input is {dtype}, give an integer")
        info = np.iinfo(dtype)
        if not info.min <= int(value) <= info.max:
            raise ConfigError(
                f"--input-value {spec.name}={value}: out of range for {dtype} ({info.min}..{info.max})"
            )


def plan_inputs(
    model: ir.Model,
    specs: Sequence[InputSpec],
    *,
    input_shapes: Mapping[str, tuple[int, ...]],
    input_values: Mapping[str, Scalar],
) -> InputPlan:
    """Decide, per input, what is given, what the graph fixes, and what must be guessed."""
    time_axes = _recurrent_time_axes(model)
    time_symbols = {
        d
        for spec in specs
        if spec.name in time_axes and spec.dims is not None and len(spec.dims) > time_axes[spec.name]
        for d in [spec.dims[time_axes[spec.name]]]
        if isinstance(d, str)
    }
    batch_symbols = _batch_symbols(specs) - time_symbols
    reshaped = _reshape_sizes(model)
    groups: dict[object, list[tuple[str, int]]] = {}
    kinds: dict[object, str] = {}
    fixed: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name in input_shapes:
            fixed[spec.name] = input_shapes[spec.name]
            continue
        if spec.dims is None:
            continue
        dynamic = spec.dynamic_axes()
        if not dynamic:
            fixed[spec.name] = tuple(d for d in spec.dims if isinstance(d, int))  # all static here
            continue
        for axis in dynamic:
            d = spec.dims[axis]
            key: object = d if isinstance(d, str) else (spec.name, axis)
            groups.setdefault(key, []).append((spec.name, axis))
            if time_axes.get(spec.name) == axis or d in time_symbols:
                kind = "sequence"
            else:
                kind = _axis_kind(spec, axis, batch_symbols)
            if key not in kinds or kind == "batch":
                kinds[key] = kind
    axes = []
    for key, members in groups.items():
        kind = kinds[key]
        axes.append(AxisGuess(tuple(members), kind, LADDERS[kind]))
    axes = _fix_by_reshape(specs, axes, reshaped)
    values = _value_guesses(model, specs)
    for name, value in input_values.items():
        values[name] = ValueGuess(name, (value,), "--input-value")
    return InputPlan(
        specs=tuple(specs),
        fixed=fixed,
        axes=tuple(axes),
        values=tuple(values.values()),
        user_values=dict(input_values),
    )


def _fix_by_reshape(
    specs: Sequence[InputSpec], axes: list[AxisGuess], reshaped: Mapping[str, int]
) -> list[AxisGuess]:
    """An input reshaped to a constant shape with one non-batch dynamic axis: that axis is fixed."""
    by_name = {s.name: s for s in specs}
    out = list(axes)
    for name, total in reshaped.items():
        spec = by_name.get(name)
        if spec is None or spec.dims is None:
            continue
        mine = [g for g in out if any(n == name for n, _ in g.axes)]
        open_groups = [g for g in mine if g.kind != "batch"]
        if len(open_groups) != 1 or len(open_groups[0].axes) != 1:
            continue
        known = 1
        for d in spec.dims:
            if isinstance(d, int) and d > 0:
                known *= d
        if known <= 0 or total % known:
            continue
        size = total // known  # batch axes are 1
        g = open_groups[0]
        out[out.index(g)] = AxisGuess(g.axes, "fixed", (size,), "its Reshape to a constant shape")
    return out
