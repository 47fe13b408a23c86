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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from modelshrink.errors import (
    ConfigError,
    DataError,
    InputGuessError,
    ModelshrinkError,
    UnsupportedModelError,
)
from modelshrink.inputs import (
    Candidate,
    InputPlan,
    InputSpec,
    Scalar,
    check_value,
    input_specs,
    plan_inputs,
)
from modelshrink.options import parse_input_shapes, parse_input_values, parse_rows

__all__ = [
    "Feed",
    "Feeds",
    "InputInfo",
    "InputSpec",
    "Probe",
    "input_specs",
    "load_feeds",
    "parse_input_shapes",
    "parse_input_values",
]

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
# Runs the original on one feed and returns its outputs by name (raises ModelshrinkError).
Probe = Callable[[Feed], Mapping[str, np.ndarray]]
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
class InputInfo:
    """How one input was fed (for the report).

    Attributes:
        name: Input name.
        shape: The shape of every synthetic feed (of the first feed for real data).
        dtype: numpy dtype name.
        declared: The declared shape, e.g. ``[N,3,H,W]``.
        guessed_shape: Some axis size was guessed (not declared, not ``--input-shape``).
        value: The value every feed holds (``--input-value`` or a guess), else None.
        guessed_value: ``value`` was guessed from the graph.
        nonfinite: NaN/inf values in the feeds of this input (real data).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    declared: str
    guessed_shape: bool = False
    value: Scalar | None = None
    guessed_value: bool = False
    nonfinite: int = 0


@dataclass(frozen=True)
class Feeds:
    """Input feeds with their provenance.

    Attributes:
        samples: One dict per inference.
        real: True when from ``--data``.
        source: Where they came from (for the report).
        warnings: Things the user should know (guessed sizes, ignored keys, casts).
        inputs: How each input was fed.
        probes: Candidate feeds run on the original to find one it runs on (0: none needed).
    """

    samples: tuple[Feed, ...]
    real: bool
    source: str
    warnings: tuple[str, ...] = field(default=())
    inputs: tuple[InputInfo, ...] = field(default=())
    probes: int = 0

    @property
    def guessed(self) -> bool:
        """True when some input's shape or value was guessed."""
        return any(i.guessed_shape or i.guessed_value for i in self.inputs)

    @property
    def nonfinite(self) -> dict[str, int]:
        """NaN/inf counts per input, for inputs that have any."""
        return {i.name: i.nonfinite for i in self.inputs if i.nonfinite}

    def __len__(self) -> int:
        return len(self.samples)


# --- synthetic ------------------------------------------------------------------------------


def _check_override(spec: InputSpec, override: tuple[int, ...]) -> None:
    """``--input-shape`` must have the input's rank and keep its fixed sizes."""
    if spec.dims is None:
        return
    if len(override) != len(spec.dims):
        raise ConfigError(
            f"--input-shape {spec.name}: gives {len(override)} dims, the input has "
            f"{len(spec.dims)} {spec.shape_text()}"
        )
    for axis, (want, got) in enumerate(zip(spec.dims, override, strict=True)):
        if isinstance(want, int) and want > 0 and want != got:  # -1: dynamic (Paddle)
            raise ConfigError(
                f"--input-shape {spec.name}: axis {axis} is fixed at {want} in the model, got {got}"
            )


def _check_drawable(spec: InputSpec, input_shapes: Mapping[str, tuple[int, ...]]) -> None:
    if spec.dtype is None:
        raise UnsupportedModelError(
            f"input '{spec.name}' has type {spec.type_name}, which cannot be generated; pass --data"
        )
    if spec.dims is None and spec.name not in input_shapes:
        raise UnsupportedModelError(
            f"input '{spec.name}' has no declared shape; give one with --input-shape "
            f"{spec.name}:DIMS or pass --data"
        )


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


def _draw_feed(specs: Sequence[InputSpec], candidate: Candidate, rng: np.random.Generator) -> Feed:
    feed: Feed = {}
    for spec in specs:
        shape = candidate.shapes[spec.name]
        value = candidate.values.get(spec.name)
        if value is not None:
            assert spec.dtype is not None
            feed[spec.name] = np.full(shape, value, dtype=spec.dtype)
        else:
            feed[spec.name] = _synthetic_array(spec, shape, rng)
    return feed


def synthetic_feeds(
    specs: Sequence[InputSpec],
    candidate: Candidate,
    *,
    seed: int,
    samples: int,
) -> tuple[tuple[Feed, ...], list[str]]:
    """``samples`` feeds drawn at the candidate's shapes (and values), and any warnings."""
    warnings: list[str] = []
    per_feed = _feed_bytes(specs, candidate.shapes)
    fit = max(1, _MAX_SYNTHETIC_BYTES // max(per_feed, 1))
    if samples > fit:
        warnings.append(
            f"synthetic feeds of {per_feed / 1e6:,.0f} MB each: drawing {fit} instead of {samples} to stay "
            f"under {_MAX_SYNTHETIC_BYTES / 1e6:,.0f} MB (pass --data for more)"
        )
        samples = fit
    rng = np.random.default_rng(seed)
    return tuple(_draw_feed(specs, candidate, rng) for _ in range(samples)), warnings


def _nonfinite_output(outputs: Mapping[str, np.ndarray]) -> str | None:
    for name, array in outputs.items():
        a = np.asarray(array)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            return name
    return None


def _probe(
    plan: InputPlan, specs: Sequence[InputSpec], seed: int, probe: Probe | None
) -> tuple[Candidate, int]:
    """The first candidate the original runs on with finite outputs (else the first it runs on
    at all), and how many were tried.

    Raises:
        InputGuessError: The original ran on none of them (exit 2, with the flags to pass).
        DataError: Every candidate feed is too large to draw.
    """
    if probe is None or not plan.guessed:
        candidate = plan.first()
        _feed_bytes(specs, candidate.shapes)
        return candidate, 0
    tried: list[Candidate] = []
    last = ""
    too_big: DataError | None = None
    ran: Candidate | None = None  # the first that ran, if none gives finite outputs
    for candidate in plan.candidates():
        try:
            _feed_bytes(specs, candidate.shapes)
        except DataError as exc:
            too_big = too_big or exc
            continue
        tried.append(candidate)
        feed = _draw_feed(specs, candidate, np.random.default_rng(seed))
        try:
            outputs = probe(feed)
        except ModelshrinkError as exc:
            last = exc.message
            continue
        bad = _nonfinite_output(outputs)
        if bad is None:
            return candidate, len(tried)
        ran = ran or candidate
        last = f"output '{bad}' holds NaN or infinite values"
    if ran is not None:
        # The model runs but its outputs are never finite (NaN weights, say): not the inputs'
        # fault; the verdict says the fidelity cannot be judged.
        return ran, len(tried)
    if not tried and too_big is not None:
        raise too_big
    last = last.split(": onnxruntime failed while running it: ", 1)[-1]
    raise InputGuessError(
        f"the original model runs on none of the {len(tried)} synthetic inputs tried "
        f"({plan.tried_text(tried)}); last failure: {last}; give the real sizes and values with "
        f"{plan.flag_hint()}, or pass --data"
    )


def _synthetic(
    model: ir.Model,
    specs: Sequence[InputSpec],
    *,
    input_shapes: Mapping[str, tuple[int, ...]],
    input_values: Mapping[str, Scalar],
    seed: int,
    samples: int,
    probe: Probe | None,
) -> Feeds:
    for spec in specs:
        _check_drawable(spec, input_shapes)
    plan = plan_inputs(model, specs, input_shapes=input_shapes, input_values=input_values)
    candidate, tried = _probe(plan, specs, seed, probe)
    drawn, warnings = synthetic_feeds(specs, candidate, seed=seed, samples=samples)
    guesses = plan.describe_guesses(candidate)
    if guesses and plan.guessed_beyond_batch:
        how = f"the first of {tried} tried that the original runs on" if tried else "not tried on the model"
        warnings.insert(
            0,
            f"guessed synthetic inputs ({how}): {guesses}; set them with {plan.flag_hint(candidate)} "
            "or pass --data",
        )
    guessed_inputs = {name for g in plan.axes for name, _ in g.axes}
    guessed_values = {v.name for v in plan.values if v.name not in plan.user_values}
    infos = tuple(
        InputInfo(
            name=spec.name,
            shape=tuple(int(d) for d in candidate.shapes[spec.name]),
            dtype=str(spec.dtype),
            declared=spec.shape_text(),
            guessed_shape=spec.name in guessed_inputs,
            value=candidate.values.get(spec.name),
            guessed_value=spec.name in guessed_values,
        )
        for spec in specs
    )
    return Feeds(
        drawn,
        real=False,
        source=f"synthetic (seed {seed})",
        warnings=tuple(warnings),
        inputs=infos,
        probes=tried,
    )


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
    input_values: Mapping[str, Scalar],
    max_samples: int,
    rows: str | None = None,
) -> Feeds:
    label = str(path)
    arrays = _read_arrays(path, specs)
    for name in input_values:
        if name in arrays:
            raise ConfigError(
                f"--input-value {name}: --data {label} already holds '{name}'; drop one of them"
            )
    warnings: list[str] = []
    wanted = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in arrays and s.name not in input_values]
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
        if spec.name in input_values:
            continue
        array = _cast(spec.name, arrays[spec.name], spec, label, warnings)
        override = input_shapes.get(spec.name)
        per_input[spec.name] = _split(spec.name, array, spec, override[0] if override else None, label)
    counts = {name: len(items) for name, items in per_input.items()}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise DataError(f"--data {label}: inputs have different numbers of samples ({detail})")
    total = next(iter(counts.values()))
    chosen = _selected(list(range(total)), rows)
    if not chosen:
        raise DataError(f"--data {label}: --rows {rows} selects none of its {total} samples")
    used = min(len(chosen), max_samples)
    samples = tuple({name: items[i] for name, items in per_input.items()} for i in chosen[:used])
    for sample in samples[1:]:
        for spec in specs:
            if spec.dims is not None and spec.name not in input_values:
                _check_shape(spec.name, sample[spec.name].shape, spec, label)
    samples = tuple(_fill_values(sample, specs, input_shapes, input_values) for sample in samples)
    picked = f", --rows {rows}" if rows is not None else ""
    source = f"{label} ({used} of {total} samples{picked})" if used < total else f"{label} ({total} samples)"
    return _real_feeds(samples, specs, source, warnings, input_values)


def _selected(items: list[Any], rows: str | None) -> list[Any]:
    """The items ``--rows`` keeps (all of them without it)."""
    if rows is None:
        return items
    keep = parse_rows(rows)
    return [item for i, item in enumerate(items) if keep(i, len(items))]


def _fill_values(
    sample: Feed,
    specs: Sequence[InputSpec],
    input_shapes: Mapping[str, tuple[int, ...]],
    input_values: Mapping[str, Scalar],
) -> Feed:
    """``sample`` plus the inputs ``--input-value`` fills (shaped by the data's own sizes)."""
    if not input_values:
        return sample
    bound: dict[str, int] = {}
    for spec in specs:
        if spec.name in sample and spec.dims is not None:
            for d, size in zip(spec.dims, sample[spec.name].shape, strict=False):
                if isinstance(d, str):
                    bound.setdefault(d, int(size))
    out = dict(sample)
    for spec in specs:
        if spec.name not in input_values:
            continue
        assert spec.dtype is not None and spec.dims is not None
        shape = input_shapes.get(spec.name)
        if shape is None:
            sizes = []
            for axis, d in enumerate(spec.dims):
                size = d if isinstance(d, int) and d > 0 else bound.get(d) if isinstance(d, str) else None
                if size is None:
                    raise ConfigError(
                        f"--input-value {spec.name}: axis {axis} of {spec.shape_text()} has no size the "
                        f"data fixes; add --input-shape {spec.name}:DIMS"
                    )
                sizes.append(size)
            shape = tuple(sizes)
        out[spec.name] = np.full(shape, input_values[spec.name], dtype=spec.dtype)
    return out


def _real_feeds(
    samples: tuple[Feed, ...],
    specs: Sequence[InputSpec],
    source: str,
    warnings: list[str],
    input_values: Mapping[str, Scalar],
) -> Feeds:
    """Real feeds with per-input facts; NaN/inf in the data is counted and said."""
    infos = []
    for spec in specs:
        nonfinite = 0
        for sample in samples:
            array = sample.get(spec.name)
            if array is not None and array.dtype.kind == "f":
                nonfinite += int(array.size - np.count_nonzero(np.isfinite(array)))
        first = samples[0].get(spec.name) if samples else None
        infos.append(
            InputInfo(
                name=spec.name,
                shape=tuple(int(d) for d in first.shape) if first is not None else (),
                dtype=str(spec.dtype),
                declared=spec.shape_text(),
                value=input_values.get(spec.name),
                nonfinite=nonfinite,
            )
        )
    bad = [f"'{i.name}' {i.nonfinite}" for i in infos if i.nonfinite]
    if bad:
        warnings.append(
            f"--data holds NaN or infinite values ({', '.join(bad)}): outputs computed from them "
            "cannot be compared, and fail every fidelity gate"
        )
    return Feeds(samples, real=True, source=source, warnings=tuple(warnings), inputs=tuple(infos))


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
    return _real_feeds(tuple(samples), specs, f"{label} ({len(samples)} test data sets)", [], {})


def _index(stem: str) -> int:
    match = re.search(r"(\d+)$", stem)
    return int(match.group(1)) if match else 0


def load_feeds(
    model: ir.Model,
    *,
    data: str | None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    input_values: Mapping[str, Scalar] | None = None,
    seed: int = 0,
    samples: int | None = None,
    probe: Probe | None = None,
    rows: str | None = None,
) -> Feeds:
    """Feeds for ``model``: from ``data`` if given, else synthetic.

    Args:
        model: The model whose inputs are fed.
        data: Path given with ``--data``, or None.
        input_shapes: ``--input-shape`` overrides.
        input_values: ``--input-value`` fills: a number every feed of that input holds.
        seed: Seed for synthetic inputs.
        samples: At most this many feeds (default: 8 synthetic, up to 128 real).
        rows: ``--rows``: which samples of ``data`` to use (:func:`options.parse_rows`).
        probe: Runs the original on a feed. When given and some synthetic size or value had to
            be guessed, candidates are tried in order until the original runs on one with
            finite outputs (see :mod:`modelshrink.inputs`); without it the first is used.

    Raises:
        DataError: Unreadable data or data that does not match the inputs.
        ConfigError: ``--input-shape``/``--input-value`` name an unknown input or contradict
            the model.
        InputGuessError: The original runs on no synthetic candidate (exit 2).
    """
    input_shapes = dict(input_shapes or {})
    input_values = dict(input_values or {})
    specs = input_specs(model)
    by_name = {s.name: s for s in specs}
    known = ", ".join(sorted(by_name)) or "none"
    for name, shape in input_shapes.items():
        if name not in by_name:
            raise ConfigError(f"--input-shape {name}: the model has no such input (inputs: {known})")
        _check_override(by_name[name], shape)
    for name, value in input_values.items():
        if name not in by_name:
            raise ConfigError(f"--input-value {name}: the model has no such input (inputs: {known})")
        check_value(by_name[name], value)
    if samples is not None and samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    if data is None:
        count = samples or DEFAULT_SYNTHETIC_SAMPLES
        return _synthetic(
            model,
            specs,
            input_shapes=input_shapes,
            input_values=input_values,
            seed=seed,
            samples=count,
            probe=probe,
        )
    path = Path(data)
    if not path.exists():
        raise DataError(f"--data {data}: no such file or folder")
    limit = samples or DEFAULT_MAX_REAL_SAMPLES
    if path.is_dir():
        sets = sorted((p for p in path.glob("test_data_set_*") if p.is_dir()), key=lambda p: _index(p.name))
        if sets or any(path.glob("input_*.pb")):
            if input_values:
                raise ConfigError(
                    "--input-value fills inputs of .npz/.npy data, not of test_data_set folders"
                )
            return _test_data_feeds(_selected(sets or [path], rows), specs, limit, data)
    return _array_feeds(path, specs, input_shapes, input_values, limit, rows)
