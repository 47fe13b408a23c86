"""Inputs for verification, calibration and latency: real data from ``--data`` or synthetic.

Accepted ``--data``:
- ``file.npz``: one array per model input, keyed by input name.
- a folder of ``NAME.npy`` files, one per model input.
- ``file.npy``: the single input of a one-input model.
- an ONNX test-data folder: ``test_data_set_*/input_*.pb`` (each set is one feed), or a
  single set folder holding ``input_*.pb``.

For ``.npz``/``.npy`` an array's first axis indexes samples. When the array has the same rank
as the model input, axis 0 *is* the input's batch axis and is cut into batches (the input's
static batch size, the size given by ``--input-shape``, or 1). When it has one more axis,
each ``array[i]`` is one complete input. Values are cast only where no information is lost
in kind (float64 -> float32, int32 -> int64); anything else is an error naming the input.

Without ``--data``, inputs are drawn from the declared shapes and types with ``--seed``:
normal floats, integers in ``[0, n)`` where ``n`` is the size of the table an input indexes
through ``Gather`` (else ``[0, 2)``), ones for inputs named like masks. Dynamic dimensions
come from ``--input-shape NAME:1x3x224x224`` or default to 1 with a warning naming them.
"""

from __future__ import annotations

import logging
import re
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from modelshrink.errors import ConfigError, DataError, UnsupportedModelError
from modelshrink.graph import graph_inputs

__all__ = [
    "Feed",
    "Feeds",
    "InputSpec",
    "input_specs",
    "load_feeds",
    "parse_input_shapes",
]

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
Dim = int | str | None
# Synthetic inputs follow the declared shapes, which a hostile or careless model can make huge:
# a feed (all inputs of one sample) over _MAX_FEED_BYTES is refused, and fewer samples than
# asked are drawn when together they would pass _MAX_SYNTHETIC_BYTES (a warning says so).
# Values are drawn in chunks straight into the input's dtype (no float64 copy of the whole).
_MAX_FEED_BYTES = 1 << 28
_MAX_SYNTHETIC_BYTES = 1 << 29
_DRAW_CHUNK = 1 << 20
DEFAULT_SYNTHETIC_SAMPLES = 8
DEFAULT_MAX_REAL_SAMPLES = 128


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


@dataclass(frozen=True)
class Feeds:
    """Input feeds with their provenance.

    Attributes:
        samples: One dict per inference.
        real: True when from ``--data``.
        source: Where they came from (for the report).
        warnings: Things the user should know (defaulted dims, ignored keys, casts).
    """

    samples: tuple[Feed, ...]
    real: bool
    source: str
    warnings: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.samples)


def parse_input_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``NAME:1x3x224x224`` (or ``NAME:1,3,224,224``) items.

    Raises:
        ConfigError: Malformed item.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        if not sep or not name or not dims:
            raise ConfigError(f"--input-shape '{item}': expected NAME:DIMS like input:1x3x224x224")
        parts = re.split(r"[x,]", dims.strip())
        if not all(p.strip().isdigit() for p in parts):
            raise ConfigError(
                f"--input-shape '{item}': dimensions must be positive integers like 1x3x224x224"
            )
        values = tuple(int(p) for p in parts)
        if any(v <= 0 for v in values):
            raise ConfigError(f"--input-shape '{item}': dimensions must be >= 1")
        shapes[name] = values
    return shapes


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


_PASS_THROUGH = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand"}


def _gather_index_bounds(model: ir.Model) -> dict[str, int]:
    """For each graph input reaching ``Gather``'s indices (through casts/reshapes): table rows."""
    bounds: dict[str, int] = {}
    for value in graph_inputs(model.graph):
        frontier = [value]
        seen: set[int] = set()
        while frontier:
            v = frontier.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            for use in v.uses():
                node = use.node
                if node.op_type in ("Gather", "GatherElements") and use.idx == 1:
                    axis = node.attributes.get_int("axis", 0)
                    table_shape = _static_shape(node.inputs[0])
                    if table_shape:
                        size = table_shape[axis]
                        if isinstance(size, int):
                            prev = bounds.get(value.name or "")
                            bounds[value.name or ""] = size if prev is None else min(prev, size)
                elif node.op_type in _PASS_THROUGH and use.idx == 0:
                    frontier.extend(node.outputs)
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


# --- synthetic ------------------------------------------------------------------------------


def _resolve_dims(spec: InputSpec, override: tuple[int, ...] | None, warnings: list[str]) -> tuple[int, ...]:
    if override is not None:
        if spec.dims is not None and len(override) != len(spec.dims):
            raise ConfigError(
                f"--input-shape {spec.name}: gives {len(override)} dims, the input has "
                f"{len(spec.dims)} {spec.shape_text()}"
            )
        if spec.dims is not None:
            for axis, (want, got) in enumerate(zip(spec.dims, override, strict=True)):
                if isinstance(want, int) and want > 0 and want != got:  # -1: dynamic (Paddle)
                    raise ConfigError(
                        f"--input-shape {spec.name}: axis {axis} is fixed at {want} in the model, got {got}"
                    )
        return override
    if spec.dims is None:
        raise UnsupportedModelError(
            f"input '{spec.name}' has no declared shape; give one with --input-shape "
            f"{spec.name}:DIMS or pass --data"
        )
    dims = []
    dynamic = []
    for axis, d in enumerate(spec.dims):
        if isinstance(d, int) and d > 0:
            dims.append(d)
        else:
            dynamic.append(f"{axis} ('{d}')" if isinstance(d, str) else str(axis))
            dims.append(1)
    if dynamic:
        axes = ", ".join(dynamic)
        warnings.append(
            f"input '{spec.name}' has dynamic axis {axes}: using 1; set real sizes with "
            f"--input-shape {spec.name}:{'x'.join(map(str, dims))} (edited) or pass --data"
        )
    return tuple(dims)


def _synthetic_array(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    assert spec.dtype is not None
    # np.asarray: for rank-0 inputs numpy returns scalars, which onnxruntime rejects
    return np.asarray(_draw(spec, spec.dtype, shape, rng), dtype=spec.dtype)


def _chunked(shape: tuple[int, ...], dtype: np.dtype, draw: Any) -> np.ndarray:
    """``draw(n)`` called on consecutive chunks, written into one array of ``dtype``.

    The generator's stream is the same as one ``draw(size)`` call, without a full-size
    temporary in the draw's own dtype (float64 for normals: twice a float32 input).
    """
    out = np.empty(shape, dtype=dtype)
    flat = out.reshape(-1)
    for start in range(0, flat.size, _DRAW_CHUNK):
        n = min(_DRAW_CHUNK, flat.size - start)
        flat[start : start + n] = draw(n)
    return out


def _draw(spec: InputSpec, dtype: np.dtype, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if dtype == np.bool_:
        return _chunked(shape, dtype, lambda n: rng.random(n) < 0.5)
    if np.issubdtype(dtype, np.integer):
        if spec.index_bound is not None:
            high = max(spec.index_bound, 1)
        elif "mask" in spec.name.lower():
            return np.ones(shape, dtype=dtype)
        elif dtype in (np.uint8,):
            high = 256
        else:
            high = 2
        return _chunked(shape, dtype, lambda n: rng.integers(0, high, size=n))
    if np.issubdtype(dtype, np.floating) or dtype.kind == "V" or "float" in str(dtype):
        return _chunked(shape, dtype, lambda n: np.asarray(rng.standard_normal(n)).astype(dtype))
    raise UnsupportedModelError(
        f"input '{spec.name}' has type {spec.type_name}, which cannot be generated; pass --data"
    )


def _feed_bytes(specs: Sequence[InputSpec], shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Bytes of one synthetic feed; refuses one that is too big to draw."""
    total = 0
    for spec in specs:
        shape = shapes[spec.name]
        assert spec.dtype is not None
        count = float(np.prod(shape, dtype=np.float64))
        nbytes = count * spec.dtype.itemsize
        if nbytes > _MAX_FEED_BYTES:
            raise DataError(
                f"input '{spec.name}' of shape {list(shape)} has {count:.3g} elements ({nbytes / 1e6:,.0f} MB), "
                f"too many for a test feed (at most {_MAX_FEED_BYTES / 1e6:,.0f} MB); set a smaller "
                "--input-shape or pass --data"
            )
        total += int(nbytes)
    if total > _MAX_FEED_BYTES:
        raise DataError(
            f"the inputs of one feed take {total / 1e6:,.0f} MB, too many for a test feed (at most "
            f"{_MAX_FEED_BYTES / 1e6:,.0f} MB); set smaller --input-shape values or pass --data"
        )
    return total


def synthetic_feeds(
    specs: Sequence[InputSpec],
    *,
    input_shapes: Mapping[str, tuple[int, ...]],
    seed: int,
    samples: int,
) -> Feeds:
    """``samples`` feeds drawn from the declared shapes and types."""
    warnings: list[str] = []
    shapes = {}
    for spec in specs:
        if spec.dtype is None:
            raise UnsupportedModelError(
                f"input '{spec.name}' has type {spec.type_name}, which cannot be generated; pass --data"
            )
        shapes[spec.name] = _resolve_dims(spec, input_shapes.get(spec.name), warnings)
    per_feed = _feed_bytes(specs, shapes)
    fit = max(1, _MAX_SYNTHETIC_BYTES // max(per_feed, 1))
    if samples > fit:
        warnings.append(
            f"synthetic feeds of {per_feed / 1e6:,.0f} MB each: drawing {fit} instead of {samples} to stay "
            f"under {_MAX_SYNTHETIC_BYTES / 1e6:,.0f} MB (pass --data for more)"
        )
        samples = fit
    rng = np.random.default_rng(seed)
    feeds = tuple(
        {spec.name: _synthetic_array(spec, shapes[spec.name], rng) for spec in specs} for _ in range(samples)
    )
    return Feeds(feeds, real=False, source=f"synthetic (seed {seed})", warnings=tuple(warnings))


# --- real data ------------------------------------------------------------------------------


def _read_arrays(path: Path, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    label = str(path)
    if path.is_dir():
        npys = sorted(path.glob("*.npy"))
        if not npys:
            raise DataError(f"--data {label}: folder has no .npy files and no test_data_set_* folders")
        return {p.stem: _load_npy(p) for p in npys}
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _load_npz(path)
    if suffix == ".npy":
        if len(specs) != 1:
            names = ", ".join(s.name for s in specs)
            raise DataError(
                f"--data {label}: a single .npy fits a one-input model; this one has {names}; "
                "use an .npz keyed by input name"
            )
        return {specs[0].name: _load_npy(path)}
    raise DataError(f"--data {label}: unsupported format; use .npz, .npy, or a folder")


# numpy's own messages for these files suggest allow_pickle=True, which runs code from the
# file: ours say what is wrong and how to write the file instead.
_NPY_MAGIC = b"\x93NUMPY"
_OBJECTS = "holds Python objects, which are never loaded (unsafe); save numeric or string arrays"


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    label = f"--data {path}"
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as exc:
        raise DataError(f"{label}: cannot read: {exc.strerror or exc}") from exc
    if not is_zip:
        raise DataError(f"{label}: not a readable .npz archive (numpy.savez writes one, keyed by input name)")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                try:
                    arrays[key] = npz[key]
                except ValueError as exc:
                    if "pickle" in str(exc) or "Object arrays" in str(exc):
                        raise DataError(f"{label}: array '{key}' {_OBJECTS}") from exc
                    raise DataError(f"{label}: array '{key}' is not a readable .npy member") from exc
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        raise DataError(f"{label}: corrupt or truncated .npz archive ({type(exc).__name__})") from exc
    return arrays


def _load_npy(path: Path) -> np.ndarray:
    label = f"--data {path}"
    try:
        with path.open("rb") as f:
            magic = f.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise DataError(f"{label}: cannot read: {exc.strerror or exc}") from exc
    if magic != _NPY_MAGIC:
        raise DataError(f"{label}: not a readable .npy file (numpy.save writes one)")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc) or "Object arrays" in str(exc):
            raise DataError(f"{label}: {_OBJECTS}") from exc
        raise DataError(f"{label}: corrupt or truncated .npy file") from exc
    except (OSError, EOFError) as exc:
        raise DataError(f"{label}: corrupt or truncated .npy file") from exc


# The only conversions done for the user (lossless in practice, and what numpy makes by default);
# any other mismatch (int8 or float16 data for a float32 input, ...) is an error, not a guess.
_CASTS = {
    (np.dtype(np.float64), np.dtype(np.float32)),
    (np.dtype(np.int32), np.dtype(np.int64)),
}


def _cast(name: str, array: np.ndarray, spec: InputSpec, label: str, warnings: list[str]) -> np.ndarray:
    want = spec.dtype
    if want is None:
        raise UnsupportedModelError(f"input '{name}' has type {spec.type_name}, not supported in --data")
    if want.kind == "O":
        if array.dtype.kind in "USO":
            return array.astype(object)
        raise DataError(f"--data {label}: '{name}' has dtype {array.dtype}, the model expects strings")
    if array.dtype == want:
        return array
    if (array.dtype, want) in _CASTS:
        warnings.append(f"--data: '{name}' cast from {array.dtype} to {want}")
        return array.astype(want)
    raise DataError(
        f"--data {label}: '{name}' has dtype {array.dtype}, the model expects {want} ({spec.type_name}); "
        f"convert the array to {want} (only float64 and int32 arrays are converted, to float32 and int64)"
    )


def _split(
    name: str,
    array: np.ndarray,
    spec: InputSpec,
    batch: int | None,
    label: str,
) -> list[np.ndarray]:
    if array.size == 0:
        raise DataError(f"--data {label}: '{name}' is empty")
    rank = None if spec.dims is None else len(spec.dims)
    if rank is None or array.ndim == rank + 1:
        # np.asarray: a row of a 1-D array is a numpy scalar, which onnxruntime rejects
        items = [np.asarray(array[i]) for i in range(array.shape[0])]
    elif array.ndim == rank:
        if rank == 0:
            items = [array]
        else:
            fixed = spec.dims[0] if spec.dims else None
            size = fixed if isinstance(fixed, int) and fixed > 0 else (batch or 1)
            count = array.shape[0] // size
            if count == 0:
                raise DataError(
                    f"--data {label}: '{name}' has {array.shape[0]} rows, fewer than one batch of {size}"
                )
            items = [array[i * size : (i + 1) * size] for i in range(count)]
    else:
        raise DataError(
            f"--data {label}: '{name}' has shape {list(array.shape)}; the input is "
            f"{spec.shape_text()}: give an array of rank {rank} (batched) or {rank + 1} "
            "(one input per row)"
        )
    if spec.dims is not None:
        for item in items[:1]:
            _check_shape(name, item.shape, spec, label)
    return items


def _check_shape(name: str, shape: tuple[int, ...], spec: InputSpec, label: str) -> None:
    assert spec.dims is not None
    ok = len(shape) == len(spec.dims) and all(
        not isinstance(want, int) or want <= 0 or want == got
        for want, got in zip(spec.dims, shape, strict=False)
    )
    if not ok:
        raise DataError(
            f"--data {label}: '{name}' gives inputs of shape {list(shape)}, the model expects "
            f"{spec.shape_text()}"
        )


def _array_feeds(
    path: Path,
    specs: Sequence[InputSpec],
    input_shapes: Mapping[str, tuple[int, ...]],
    max_samples: int,
) -> Feeds:
    label = str(path)
    arrays = _read_arrays(path, specs)
    warnings: list[str] = []
    wanted = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        have = ", ".join(sorted(arrays)) or "nothing"
        raise DataError(
            f"--data {label}: no array for input '{missing[0]}' (the file has: {have}; the model "
            f"needs: {', '.join(s.name for s in specs)})"
        )
    extra = sorted(set(arrays) - wanted)
    if extra:
        warnings.append(f"--data: ignored arrays not named like an input: {', '.join(extra)}")
    per_input: dict[str, list[np.ndarray]] = {}
    for spec in specs:
        array = _cast(spec.name, arrays[spec.name], spec, label, warnings)
        override = input_shapes.get(spec.name)
        per_input[spec.name] = _split(spec.name, array, spec, override[0] if override else None, label)
    counts = {name: len(items) for name, items in per_input.items()}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise DataError(f"--data {label}: inputs have different numbers of samples ({detail})")
    total = next(iter(counts.values()))
    used = min(total, max_samples)
    samples = tuple({name: items[i] for name, items in per_input.items()} for i in range(used))
    for sample in samples[1:]:
        for spec in specs:
            if spec.dims is not None:
                _check_shape(spec.name, sample[spec.name].shape, spec, label)
    source = f"{label} ({used} of {total} samples)" if used < total else f"{label} ({total} samples)"
    return Feeds(samples, real=True, source=source, warnings=tuple(warnings))


def _test_data_feeds(sets: Sequence[Path], specs: Sequence[InputSpec], max_samples: int, label: str) -> Feeds:
    samples = []
    for folder in sets[:max_samples]:
        pbs = sorted(folder.glob("input_*.pb"), key=lambda p: _index(p.stem))
        if len(pbs) != len(specs):
            raise DataError(f"--data {folder}: {len(pbs)} input_*.pb files for {len(specs)} model inputs")
        feed: Feed = {}
        for i, pb in enumerate(pbs):
            tensor = onnx.TensorProto()
            try:
                tensor.ParseFromString(pb.read_bytes())
                array = numpy_helper.to_array(tensor)
            except Exception as exc:  # protobuf / numpy_helper raise various types
                raise DataError(f"--data {pb}: not a readable TensorProto ({exc})") from exc
            spec = next((s for s in specs if s.name == tensor.name), specs[i])
            feed[spec.name] = _cast(spec.name, array, spec, str(pb), [])
            if spec.dims is not None:
                _check_shape(spec.name, feed[spec.name].shape, spec, str(pb))
        samples.append(feed)
    return Feeds(tuple(samples), real=True, source=f"{label} ({len(samples)} test data sets)")


def _index(stem: str) -> int:
    match = re.search(r"(\d+)$", stem)
    return int(match.group(1)) if match else 0


def load_feeds(
    model: ir.Model,
    *,
    data: str | None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    samples: int | None = None,
) -> Feeds:
    """Feeds for ``model``: from ``data`` if given, else synthetic.

    Args:
        model: The model whose inputs are fed.
        data: Path given with ``--data``, or None.
        input_shapes: ``--input-shape`` overrides.
        seed: Seed for synthetic inputs.
        samples: At most this many feeds (default: 8 synthetic, up to 128 real).

    Raises:
        DataError: Unreadable data or data that does not match the inputs.
        ConfigError: ``--input-shape`` names an unknown input or contradicts the model.
    """
    input_shapes = dict(input_shapes or {})
    specs = input_specs(model)
    known = {s.name for s in specs}
    for name in input_shapes:
        if name not in known:
            raise ConfigError(
                f"--input-shape {name}: the model has no such input (inputs: "
                f"{', '.join(sorted(known)) or 'none'})"
            )
    if samples is not None and samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    if data is None:
        count = samples or DEFAULT_SYNTHETIC_SAMPLES
        return synthetic_feeds(specs, input_shapes=input_shapes, seed=seed, samples=count)
    path = Path(data)
    if not path.exists():
        raise DataError(f"--data {data}: no such file or folder")
    limit = samples or DEFAULT_MAX_REAL_SAMPLES
    if path.is_dir():
        sets = sorted((p for p in path.glob("test_data_set_*") if p.is_dir()), key=lambda p: _index(p.name))
        if sets:
            return _test_data_feeds(sets, specs, limit, data)
        if any(path.glob("input_*.pb")):
            return _test_data_feeds([path], specs, limit, data)
    return _array_feeds(path, specs, input_shapes, limit)
