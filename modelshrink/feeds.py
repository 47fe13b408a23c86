"""Inputs for verification, calibration and latency: real data from ``--data`` or synthetic.

Accepted ``--data``:
- ``file.npz``: one array per model input, keyed by input name.
- a folder of ``NAME.npy`` files, one per model input.
- ``file.npy``: the single input of a one-input model.
- a folder of ``.npz`` files (or of ``.npy`` files not named like the input of a one-input
  model): one feed per file, in natural name order (``row2`` before ``row10``).
- an ONNX test-data folder: ``test_data_set_*/input_*.pb`` (each set is one feed), or a
  single set folder holding ``input_*.pb``.

Each input stacks rows along its batch axis (:func:`modelshrink.inputs.batch_axes`, or
``--batch-axis``). In ``.npz``/``.npy`` arrays, an array with the input's rank is batched along
that axis and cut into feeds (the input's static batch size, the size ``--input-shape`` gives
that axis, or 1); an array with one more axis holds one complete input per ``array[i]``. An
input without a batch axis is given once (its own rank: the same value in every feed) or once
per feed (one more axis). In a folder of files, an array of the input's rank is one batch and
one without the batch axis is one row. ``.npy`` files and uncompressed ``.npz`` members are
memory-mapped (:class:`DataArrays`): verification reads only the feeds it uses, and training
(:mod:`modelshrink.dataset`) reads the same formats batch by batch. Values are cast only where
no information is lost in kind (float64 -> float32, int32 -> int64); anything else is an error
naming the input.

Without ``--data``, inputs are drawn from the declared shapes and types with ``--seed``:
normal floats, integers in ``[0, n)`` where ``n`` is the size of the table an input indexes
through ``Gather`` (else ``[0, 2)``), ones for inputs named like masks. Dynamic dimensions
come from ``--input-shape NAME:1x3x224x224`` or default to 1 with a warning naming them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
import re
import struct
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
    BatchAxis,
    Candidate,
    InputPlan,
    InputSpec,
    Scalar,
    check_value,
    input_specs,
    plan_inputs,
)
from modelshrink.inputs import batch_axes as find_batch_axes
from modelshrink.options import parse_input_shapes, parse_input_values, parse_rows

__all__ = [
    "ArrayRows",
    "BatchAxis",
    "DataArrays",
    "Feed",
    "Feeds",
    "InputInfo",
    "InputSpec",
    "Probe",
    "array_rows",
    "check_flags",
    "check_names",
    "check_shape",
    "data_files",
    "data_layouts",
    "describe_rows",
    "file_feed",
    "fill_values",
    "find_test_data_sets",
    "input_dtype",
    "input_specs",
    "load_feeds",
    "load_npy",
    "parse_input_shapes",
    "parse_input_values",
    "read_data_arrays",
    "read_data_file",
    "read_test_data_set",
    "take_rows",
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
        batch_axes: Each input's batch axis (None: it has none), along which feeds stack rows.
    """

    samples: tuple[Feed, ...]
    real: bool
    source: str
    warnings: tuple[str, ...] = field(default=())
    inputs: tuple[InputInfo, ...] = field(default=())
    probes: int = 0
    batch_axes: Mapping[str, int | None] = field(default_factory=dict)

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

# numpy's own messages for these files suggest allow_pickle=True, which runs code from the
# file: ours say what is wrong and how to write the file instead.
_NPY_MAGIC = b"\x93NUMPY"
_OBJECTS = "holds Python objects, which are never loaded (unsafe); save numeric or string arrays"
_ZIP_LOCAL_HEADER = b"PK\x03\x04"


class DataArrays:
    """The arrays of one ``--data`` file or folder of ``NAME.npy``, memory-mapped where possible.

    ``.npy`` files and the uncompressed members of an ``.npz`` (what ``numpy.savez`` writes;
    ``savez_compressed`` members are read whole) are mapped, not read: only the rows used are
    ever read from disk. :meth:`release` drops the pages read so far from this process (they
    stay in the system's file cache), so reading every row of data larger than memory keeps
    the process's memory flat.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], maps: Sequence[mmap.mmap] = ()) -> None:
        self.arrays = dict(arrays)
        self._maps = list(maps)

    def release(self) -> None:
        """Drop the mapped pages read so far from this process's memory (a no-op where the
        platform cannot)."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is None:
            return
        for m in self._maps:
            with contextlib.suppress(OSError, ValueError):
                m.madvise(advice)


def _mapped(path: Path, start: int, label: str, maps: list[mmap.mmap]) -> np.ndarray | None:
    """The ``.npy`` array that starts at byte ``start`` of ``path``, memory-mapped (None for a
    header version this reader does not map; the caller reads it whole)."""
    with path.open("rb") as f:
        f.seek(start)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
        except ValueError as exc:
            if "pickle" in str(exc) or "Object arrays" in str(exc):
                raise DataError(f"{label} {_OBJECTS}") from exc
            raise DataError(f"{label}: corrupt or truncated .npy data") from exc
        if dtype.hasobject:
            raise DataError(f"{label} {_OBJECTS}")
        offset = f.tell()
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + nbytes > os.fstat(f.fileno()).st_size:
            raise DataError(f"{label}: corrupt or truncated .npy data")
        if nbytes == 0:
            return np.empty(shape, dtype=dtype)
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    maps.append(mapping)
    return np.ndarray(shape, dtype=dtype, buffer=mapping, offset=offset, order="F" if fortran else "C")


def _load_npz(path: Path, maps: list[mmap.mmap] | None = None) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``: uncompressed members mapped (when ``maps`` collects the
    mappings), compressed ones read whole."""
    label = f"--data {path}"
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as exc:
        raise DataError(f"{label}: cannot read: {exc.strerror or exc}") from exc
    if not is_zip:
        raise DataError(f"{label}: not a readable .npz archive (numpy.savez writes one, keyed by input name)")
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as archive, path.open("rb") as raw:
            for info in archive.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                where = f"{label}: array '{key}'"
                if maps is not None and info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1:
                    raw.seek(info.header_offset)
                    header = raw.read(30)
                    if len(header) != 30 or header[:4] != _ZIP_LOCAL_HEADER:
                        raise DataError(f"{label}: corrupt or truncated .npz archive (BadZipFile)")
                    name_len, extra_len = struct.unpack("<HH", header[26:30])
                    start = info.header_offset + 30 + name_len + extra_len
                    array = _mapped(path, start, where, maps)
                    if array is not None:
                        arrays[key] = array
                        continue
                with archive.open(info) as member:
                    try:
                        arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
                    except ValueError as exc:
                        if "pickle" in str(exc) or "Object arrays" in str(exc):
                            raise DataError(f"{where} {_OBJECTS}") from exc
                        raise DataError(f"{where} is not a readable .npy member") from exc
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, struct.error) as exc:
        raise DataError(f"{label}: corrupt or truncated .npz archive ({type(exc).__name__})") from exc
    return arrays


def load_npy(path: Path, maps: list[mmap.mmap] | None = None) -> np.ndarray:
    """An ``.npy`` file: mapped when ``maps`` collects the mappings, else read whole."""
    label = f"--data {path}"
    try:
        with path.open("rb") as f:
            magic = f.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise DataError(f"{label}: cannot read: {exc.strerror or exc}") from exc
    if magic != _NPY_MAGIC:
        raise DataError(f"{label}: not a readable .npy file (numpy.save writes one)")
    if maps is not None:
        try:
            array = _mapped(path, 0, label, maps)
        except DataError as exc:
            if _OBJECTS in exc.message:
                raise DataError(f"{label}: {_OBJECTS}") from exc
            raise DataError(f"{label}: corrupt or truncated .npy file") from exc
        except OSError as exc:
            raise DataError(f"{label}: cannot read: {exc.strerror or exc}") from exc
        if array is not None:
            return array
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc) or "Object arrays" in str(exc):
            raise DataError(f"{label}: {_OBJECTS}") from exc
        raise DataError(f"{label}: corrupt or truncated .npy file") from exc
    except (OSError, EOFError) as exc:
        raise DataError(f"{label}: corrupt or truncated .npy file") from exc


def _natural(path: Path) -> tuple[Any, ...]:
    """Sort key: ``row2`` before ``row10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name))


def data_files(path: Path, specs: Sequence[InputSpec]) -> list[Path] | None:
    """The files of a folder that holds one row or one batch per file, in order; None for any
    other ``--data`` (a file, a folder of ``NAME.npy`` named like the inputs, test data sets).

    A folder of ``.npz`` files (each keyed by input name), or of ``.npy`` files for a one-input
    model whose names are not an input's, is such a folder.
    """
    if not path.is_dir():
        return None
    names = {s.name for s in specs}
    npys = sorted(path.glob("*.npy"), key=_natural)
    if any(p.stem in names for p in npys):
        return None
    npzs = sorted(path.glob("*.npz"), key=_natural)
    if npzs:
        return npzs
    if npys and len(specs) == 1:
        return npys
    return None


def read_data_arrays(path: Path, specs: Sequence[InputSpec], *, mapped: bool = True) -> DataArrays:
    """The arrays of an ``.npz``, an ``.npy`` (one-input models) or a folder of ``NAME.npy``.

    Raises:
        DataError: Unreadable or unsupported data.
    """
    label = str(path)
    maps: list[mmap.mmap] | None = [] if mapped else None
    if path.is_dir():
        npys = sorted(path.glob("*.npy"))
        if not npys:
            raise DataError(
                f"--data {label}: folder has no .npy or .npz files and no test_data_set_* folders"
            )
        names = ", ".join(s.name for s in specs)
        if not any(p.stem in {s.name for s in specs} for p in npys):
            raise DataError(
                f"--data {label}: no .npy file is named like an input ({names}); a folder holds "
                "NAME.npy per input, or one .npz per row or batch"
            )
        arrays = {p.stem: load_npy(p, maps) for p in npys}
        return DataArrays(arrays, maps or ())
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return DataArrays(_load_npz(path, maps), maps or ())
    if suffix == ".npy":
        if len(specs) != 1:
            names = ", ".join(s.name for s in specs)
            raise DataError(
                f"--data {label}: a single .npy fits a one-input model; this one has {names}; "
                "use an .npz keyed by input name"
            )
        return DataArrays({specs[0].name: load_npy(path, maps)}, maps or ())
    raise DataError(f"--data {label}: unsupported format; use .npz, .npy, or a folder")


def read_data_file(
    path: Path, specs: Sequence[InputSpec], maps: list[mmap.mmap] | None = None
) -> dict[str, np.ndarray]:
    """One file of a folder of rows (:func:`data_files`): its arrays by name (mapped when
    ``maps`` collects the mappings, else read whole)."""
    if path.suffix.lower() == ".npz":
        return _load_npz(path, maps)
    return {specs[0].name: load_npy(path, maps)}


# The only conversions done for the user (lossless in practice, and what numpy makes by default);
# any other mismatch (int8 or float16 data for a float32 input, ...) is an error, not a guess.
_CASTS = {
    (np.dtype(np.float64), np.dtype(np.float32)),
    (np.dtype(np.int32), np.dtype(np.int64)),
}


def input_dtype(name: str, dtype: np.dtype, spec: InputSpec, label: str, warnings: list[str]) -> np.dtype:
    """The dtype data of ``dtype`` is fed as for ``spec`` (a warning when it is a cast).

    Raises:
        UnsupportedModelError: The input's type cannot be fed from arrays.
        DataError: The data's dtype is not the input's and is not cast.
    """
    want = spec.dtype
    if want is None:
        raise UnsupportedModelError(f"input '{name}' has type {spec.type_name}, not supported in --data")
    if want.kind == "O":
        if dtype.kind in "USO":
            return want
        raise DataError(f"--data {label}: '{name}' has dtype {dtype}, the model expects strings")
    if dtype == want:
        return want
    if (dtype, want) in _CASTS:
        warnings.append(f"--data: '{name}' cast from {dtype} to {want}")
        return want
    raise DataError(
        f"--data {label}: '{name}' has dtype {dtype}, the model expects {want} ({spec.type_name}); "
        f"convert the array to {want} (only float64 and int32 arrays are converted, to float32 and int64)"
    )


def _cast(name: str, array: np.ndarray, spec: InputSpec, label: str, warnings: list[str]) -> np.ndarray:
    want = input_dtype(name, array.dtype, spec, label, warnings)
    return array if array.dtype == want else array.astype(want)


def take_rows(array: np.ndarray, rows: np.ndarray, axis: int) -> np.ndarray:
    """``array``'s entries ``rows`` along ``axis``, a copy.

    Indexing, not ``np.take``: a member of an ``.npz`` starts at any byte, and ``np.take`` on an
    unaligned (memory-mapped) array first copies the whole array.
    """
    index: tuple[Any, ...] = (*([slice(None)] * axis), np.asarray(rows, dtype=np.int64))
    return array[index]


@dataclass(frozen=True)
class ArrayRows:
    """How one array of ``--data`` holds an input: feeds (items), and rows along the batch axis.

    Attributes:
        name: Input name.
        array: The array (possibly memory-mapped).
        axis: The input's batch axis, or None when it has none.
        stacked: ``array[i]`` is one complete input (the array has one more axis than the input);
            otherwise the array is the input batched along ``axis`` and cut into items.
        items: How many feeds it holds; None: one value for every feed (an input without a batch
            axis given once).
        item_rows: Rows per feed along the batch axis (0 for an input without one).
    """

    name: str
    array: np.ndarray
    axis: int | None
    stacked: bool
    items: int | None
    item_rows: int

    def item(self, i: int) -> np.ndarray:
        """Feed ``i`` of this input (a view)."""
        if self.items is None:
            return self.array
        if self.stacked:
            return np.asarray(self.array[i])  # a row of a 1-D array is a numpy scalar otherwise
        assert self.axis is not None
        index: list[Any] = [slice(None)] * self.array.ndim
        index[self.axis] = slice(i * self.item_rows, (i + 1) * self.item_rows)
        return self.array[tuple(index)]

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The given rows, stacked along the batch axis (a copy)."""
        assert self.axis is not None
        if not self.stacked:
            return take_rows(self.array, rows, self.axis)
        items, within = np.divmod(rows, self.item_rows)
        index: tuple[Any, ...] = (items, *([slice(None)] * self.axis), within)
        return np.moveaxis(self.array[index], 0, self.axis)


def array_rows(
    name: str, array: np.ndarray, spec: InputSpec, axis: int | None, batch: int | None, label: str
) -> ArrayRows:
    """How ``array`` holds input ``spec`` whose batch axis is ``axis``.

    An array of the input's rank is batched along ``axis`` and cut into feeds of ``batch`` rows
    (the input's static batch size, else ``batch``, else 1); without a batch axis it is one value
    for every feed. An array with one more axis holds one complete input per ``array[i]``.

    Raises:
        DataError: Empty, or neither of those ranks.
    """
    if array.size == 0:
        raise DataError(f"--data {label}: '{name}' is empty")
    rank = None if spec.dims is None else len(spec.dims)
    if rank is None or array.ndim == rank + 1:
        if axis is None or array.ndim < axis + 2:
            return ArrayRows(name, array, None, True, array.shape[0], 0)
        return ArrayRows(name, array, axis, True, array.shape[0], array.shape[axis + 1])
    if array.ndim == rank:
        if axis is None:
            return ArrayRows(name, array, None, False, None, 0)
        assert spec.dims is not None
        fixed = spec.dims[axis]
        size = fixed if isinstance(fixed, int) and fixed > 0 else (batch or 1)
        count = array.shape[axis] // size
        if count == 0:
            raise DataError(
                f"--data {label}: '{name}' has {array.shape[axis]} rows along its batch axis {axis}, "
                f"fewer than one batch of {size}"
            )
        return ArrayRows(name, array, axis, False, count, size)
    along = f" along axis {axis}" if axis else ""
    raise DataError(
        f"--data {label}: '{name}' has shape {list(array.shape)}; the input is "
        f"{spec.shape_text()}: give an array of rank {rank} (batched{along}) or {rank + 1} "
        "(one input per row)"
    )


def check_shape(name: str, shape: tuple[int, ...], spec: InputSpec, label: str) -> None:
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


def check_names(
    arrays: Mapping[str, Any],
    specs: Sequence[InputSpec],
    input_values: Mapping[str, Scalar],
    label: str,
    warnings: list[str],
    extra_ok: Sequence[str] = (),
) -> None:
    for name in input_values:
        if name in arrays:
            raise ConfigError(
                f"--input-value {name}: --data {label} already holds '{name}'; drop one of them"
            )
    missing = [s.name for s in specs if s.name not in arrays and s.name not in input_values]
    if missing:
        have = ", ".join(sorted(arrays)) or "nothing"
        fill = " ".join(f"--input-value {name}=VALUE" for name in missing)
        named = ", ".join(f"'{name}'" for name in missing)
        which = f"input {named}" if len(missing) == 1 else f"inputs {named}"
        how = "it to the file, or fill it" if len(missing) == 1 else "them to the file, or fill each"
        raise DataError(
            f"--data {label}: no array for {which} (the file has: {have}; the model needs: "
            f"{', '.join(s.name for s in specs)}); add {how} with one number: {fill}"
        )
    extra = sorted(set(arrays) - {s.name for s in specs} - set(extra_ok))
    if extra:
        warnings.append(f"--data: ignored arrays not named like an input: {', '.join(extra)}")


def data_layouts(
    arrays: Mapping[str, np.ndarray],
    specs: Sequence[InputSpec],
    axes: Mapping[str, int | None],
    input_shapes: Mapping[str, tuple[int, ...]],
    label: str,
) -> tuple[dict[str, ArrayRows], int]:
    """How each input's array holds it, and the number of feeds they hold together.

    Raises:
        DataError: Inputs hold different numbers of feeds.
    """
    layouts: dict[str, ArrayRows] = {}
    for spec in specs:
        if spec.name not in arrays:
            continue
        axis = axes.get(spec.name)
        override = input_shapes.get(spec.name)
        batch = override[axis] if override is not None and axis is not None and axis < len(override) else None
        layouts[spec.name] = array_rows(spec.name, arrays[spec.name], spec, axis, batch, label)
    counts = {name: rows.items for name, rows in layouts.items() if rows.items is not None}
    if len(set(counts.values())) > 1:
        raise DataError(
            f"--data {label}: inputs have different numbers of samples ({describe_rows(layouts, specs)}); "
            "each array holds its input's rows along the input's batch axis (or one input per "
            "array[i]); if an input's batch axis is not the one shown, pass --batch-axis NAME:AXIS"
        )
    return layouts, next(iter(counts.values()), 1)


def describe_rows(layouts: Mapping[str, ArrayRows], specs: Sequence[InputSpec]) -> str:
    """``input: 96 on axis 0, state: 2 on axis 1 of [2,batch,32], sr: 96 values``."""
    shapes = {s.name: s.shape_text() for s in specs}
    parts = []
    for name, rows in layouts.items():
        if rows.items is None:
            continue
        if rows.axis is None:
            parts.append(f"{name}: {rows.items} values (no batch axis)")
        elif rows.stacked:
            parts.append(f"{name}: {rows.items} x {rows.item_rows} rows (one input per array[i])")
        else:
            parts.append(f"{name}: {rows.items * rows.item_rows} rows on axis {rows.axis} of {shapes[name]}")
    return ", ".join(parts)


# Kept on purpose (a duplicates pair with _file_feeds/_array_feeds): the same parameters,
# one reader for an array file, one for a folder of files.
def _array_feeds(
    path: Path,
    specs: Sequence[InputSpec],
    axes: Mapping[str, int | None],
    input_shapes: Mapping[str, tuple[int, ...]],
    input_values: Mapping[str, Scalar],
    max_samples: int,
    rows: str | None = None,
) -> Feeds:
    label = str(path)
    data = read_data_arrays(path, specs)
    warnings: list[str] = []
    check_names(data.arrays, specs, input_values, label, warnings)
    by_name = {s.name: s for s in specs}
    dtypes = {
        name: input_dtype(name, data.arrays[name].dtype, by_name[name], label, warnings)
        for name in by_name
        if name not in input_values
    }
    layouts, total = data_layouts(data.arrays, specs, axes, input_shapes, label)
    if rows is not None and _cut_in_batches(layouts):
        layouts, total = _kept_rows(layouts, rows, specs, input_shapes, label, max_samples)
        chosen = list(range(total))
    else:
        chosen = selected(list(range(total)), rows)
    if not chosen:
        raise DataError(f"--data {label}: --rows {rows} selects none of its {total} samples")
    used = min(len(chosen), max_samples)
    samples = []
    for i in chosen[:used]:
        sample = {name: np.array(rows.item(i), dtype=dtypes[name]) for name, rows in layouts.items()}
        for spec in specs:
            if spec.dims is not None and spec.name in sample:
                check_shape(spec.name, sample[spec.name].shape, spec, label)
        samples.append(fill_values(sample, specs, input_shapes, input_values, axes))
    picked = f", --rows {rows}" if rows is not None else ""
    source = f"{label} ({used} of {total} samples{picked})" if used < total else f"{label} ({total} samples)"
    return _real_feeds(tuple(samples), specs, source, warnings, input_values)


def _cut_in_batches(layouts: Mapping[str, ArrayRows]) -> bool:
    """True when feeds hold several rows each (a batch size from the model or --input-shape)
    and every input with per-feed values has a batch axis: then ``--rows`` selects rows, as
    distill's does, not feeds."""
    per_feed = [r for r in layouts.values() if r.items is not None]
    return any(r.item_rows > 1 for r in per_feed) and all(r.axis is not None for r in per_feed)


def _kept_rows(
    layouts: Mapping[str, ArrayRows],
    rows: str,
    specs: Sequence[InputSpec],
    input_shapes: Mapping[str, tuple[int, ...]],
    label: str,
    max_samples: int,
) -> tuple[dict[str, ArrayRows], int]:
    """The layouts of only the rows ``--rows`` keeps (at most ``max_samples`` feeds of them),
    cut into feeds again. A row is one index along the batch axis, as in training, so a split
    by ``--rows`` never puts the same row on both sides whatever the batch size.

    Raises:
        DataError: It keeps fewer rows than one feed holds.
    """
    by_name = {s.name: s for s in specs}
    batched = {n: r for n, r in layouts.items() if r.items is not None}
    first = next(iter(batched.values()))
    total = (first.items or 0) * first.item_rows
    kept = np.asarray(selected(list(range(total)), rows), dtype=np.int64)
    kept = kept[: max_samples * max(r.item_rows for r in batched.values())]
    out = dict(layouts)
    for name, cut in batched.items():
        assert cut.axis is not None
        out[name] = ArrayRows(
            name, cut.rows(kept), cut.axis, False, len(kept) // cut.item_rows, cut.item_rows
        )
        if not out[name].items:
            raise DataError(
                f"--data {label}: --rows {rows} keeps {len(kept)} of its {total} rows, fewer than one "
                f"feed of {cut.item_rows} ('{name}' {by_name[name].shape_text()}, "
                f"{'--input-shape' if name in input_shapes else 'its declared batch size'})"
            )
    return out, min(r.items or 0 for r in out.values() if r.items is not None)


def selected(items: list[Any], rows: str | None) -> list[Any]:
    """The items ``--rows`` keeps (all of them without it)."""
    if rows is None:
        return items
    keep = parse_rows(rows)
    return [item for i, item in enumerate(items) if keep(i, len(items))]


def file_feed(
    path: Path,
    specs: Sequence[InputSpec],
    axes: Mapping[str, int | None],
    input_values: Mapping[str, Scalar],
    warnings: list[str],
    *,
    extra_ok: Sequence[str] = (),
    maps: list[mmap.mmap] | None = None,
) -> dict[str, np.ndarray]:
    """One file of a folder of rows as a feed: arrays of an input's rank are one batch, arrays
    with one axis less (the batch axis) one row. With ``maps``, arrays are memory-mapped views.

    Raises:
        DataError: An array missing, of the wrong rank, shape or dtype.
    """
    label = str(path)
    arrays = read_data_file(path, specs, maps)
    check_names(arrays, specs, input_values, label, warnings, extra_ok)
    feed: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in arrays:
            continue
        array = np.asarray(arrays[spec.name])
        axis = axes.get(spec.name)
        if spec.dims is not None:
            rank = len(spec.dims)
            if axis is not None and array.ndim == rank - 1:
                array = np.expand_dims(array, axis)
            elif array.ndim != rank:
                want = (
                    f"rank {rank - 1} (one row) or {rank} (one batch)" if axis is not None else f"rank {rank}"
                )
                raise DataError(
                    f"--data {label}: '{spec.name}' has shape {list(array.shape)}; the input is "
                    f"{spec.shape_text()}: give an array of {want}"
                )
            check_shape(spec.name, array.shape, spec, label)
        feed[spec.name] = _cast(spec.name, array, spec, label, warnings)
    for name in extra_ok:
        if name in arrays:
            feed[name] = np.asarray(arrays[name])
    return feed


# Kept on purpose (a duplicates pair with _file_feeds/_array_feeds): the same parameters,
# one reader for an array file, one for a folder of files.
def _file_feeds(
    files: Sequence[Path],
    label: str,
    specs: Sequence[InputSpec],
    axes: Mapping[str, int | None],
    input_shapes: Mapping[str, tuple[int, ...]],
    input_values: Mapping[str, Scalar],
    max_samples: int,
    rows: str | None = None,
) -> Feeds:
    """Feeds from a folder of files, cut as arrays are: feeds of the batch size (the input's
    static size, ``--input-shape``, or 1) within each file, so ``max_samples`` bounds the rows
    read whatever the files hold. ``rows`` counts those feeds in file order; a slice with
    negative bounds would need every file read first, so it is refused.

    Raises:
        ConfigError: ``rows`` is a slice with negative bounds.
    """
    keep = parse_rows(rows) if rows is not None else None
    if rows is not None and "-" in rows.partition("%")[0]:
        raise ConfigError(
            f"--rows {rows}: --data {label} is a folder of files, read in order: give non-negative "
            "slice bounds (A:B) or %K=R"
        )
    index = 0
    warnings: list[str] = []
    samples: list[Feed] = []
    by_name = {s.name: s for s in specs}
    read = 0
    for path in files:
        if len(samples) >= max_samples:
            break
        read += 1
        feed = file_feed(path, specs, axes, input_values, warnings, maps=[])
        layouts = {}
        for name, value in feed.items():
            axis = axes.get(name)
            override = input_shapes.get(name)
            batch = (
                override[axis] if override is not None and axis is not None and axis < len(override) else None
            )
            layouts[name] = array_rows(name, value, by_name[name], axis, batch, str(path))
        count = min((r.items for r in layouts.values() if r.items is not None), default=1)
        for i in range(count):
            if len(samples) >= max_samples:
                break
            index += 1
            if keep is not None and not keep(index - 1, 1 << 62):
                continue
            sample = {name: np.array(cut.item(i)) for name, cut in layouts.items()}
            samples.append(fill_values(sample, specs, input_shapes, input_values, axes))
    used, total = len(samples), len(files)
    if not samples:
        raise DataError(f"--data {label}: --rows {rows} selects none of its samples")
    whole = f"{read} of {total} files" if read < total else f"{total} files"
    picked = f", --rows {rows}" if rows is not None else ""
    source = f"{label} ({used} samples from {whole}{picked})"
    return _real_feeds(tuple(samples), specs, source, list(dict.fromkeys(warnings)), input_values)


def fill_values(
    sample: Feed,
    specs: Sequence[InputSpec],
    input_shapes: Mapping[str, tuple[int, ...]],
    input_values: Mapping[str, Scalar],
    axes: Mapping[str, int | None] | None = None,
) -> Feed:
    """``sample`` plus the inputs ``--input-value`` fills (shaped by the data's own sizes).

    A size the declared dims leave open comes from the same symbol in the data's inputs, or,
    on a filled input's batch axis (``axes``), from the batch the data's inputs hold: exporters
    often leave it anonymous (``state [2, ?, 128]`` beside ``input [?, ?]``).
    """
    if not input_values:
        return sample
    axes = axes or {}
    bound: dict[str, int] = {}
    batch: int | None = None
    for spec in specs:
        if spec.name in sample and spec.dims is not None:
            for d, size in zip(spec.dims, sample[spec.name].shape, strict=False):
                if isinstance(d, str):
                    bound.setdefault(d, int(size))
            axis = axes.get(spec.name)
            if batch is None and axis is not None and axis < sample[spec.name].ndim:
                batch = int(sample[spec.name].shape[axis])
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
                if size is None and axis == axes.get(spec.name):
                    size = batch
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


def read_test_data_set(folder: Path, specs: Sequence[InputSpec]) -> Feed:
    """One ONNX test data set (``input_*.pb``) as a feed.

    Raises:
        DataError: Unreadable tensors, or not one per input.
    """
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
            check_shape(spec.name, feed[spec.name].shape, spec, str(pb))
    return feed


def find_test_data_sets(path: Path) -> list[Path] | None:
    """The ONNX test data sets of a folder, in order (None when it holds none)."""
    if not path.is_dir():
        return None
    sets = sorted((p for p in path.glob("test_data_set_*") if p.is_dir()), key=lambda p: _index(p.name))
    if sets:
        return sets
    return [path] if any(path.glob("input_*.pb")) else None


def _test_data_feeds(sets: Sequence[Path], specs: Sequence[InputSpec], max_samples: int, label: str) -> Feeds:
    samples = tuple(read_test_data_set(folder, specs) for folder in sets[:max_samples])
    return _real_feeds(samples, specs, f"{label} ({len(samples)} test data sets)", [], {})


def _index(stem: str) -> int:
    match = re.search(r"(\d+)$", stem)
    return int(match.group(1)) if match else 0


def check_flags(
    specs: Sequence[InputSpec],
    input_shapes: Mapping[str, tuple[int, ...]],
    input_values: Mapping[str, Scalar],
) -> None:
    """Refuse ``--input-shape``/``--input-value`` that name an unknown input or contradict it.

    Raises:
        ConfigError: The first such flag.
    """
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


def load_feeds(
    model: ir.Model,
    *,
    data: str | None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    input_values: Mapping[str, Scalar] | None = None,
    batch_axes: Mapping[str, int | None] | None = None,
    seed: int = 0,
    samples: int | None = None,
    rows: str | None = None,
    probe: Probe | None = None,
) -> Feeds:
    """Feeds for ``model``: from ``data`` if given, else synthetic.

    Args:
        model: The model whose inputs are fed.
        data: Path given with ``--data``, or None.
        input_shapes: ``--input-shape`` overrides.
        input_values: ``--input-value`` fills: a number every feed of that input holds.
        batch_axes: ``--batch-axis`` overrides (the rest found by :func:`inputs.batch_axes`).
        seed: Seed for synthetic inputs.
        samples: At most this many feeds (default: 8 synthetic, up to 128 real).
        rows: ``--rows``: which samples of ``data`` to use (:func:`options.parse_rows`).
        probe: Runs the original on a feed. When given and some synthetic size or value had to
            be guessed, candidates are tried in order until the original runs on one with
            finite outputs (see :mod:`modelshrink.inputs`); without it the first is used.

    Raises:
        DataError: Unreadable data or data that does not match the inputs.
        ConfigError: ``--input-shape``/``--input-value``/``--batch-axis`` name an unknown input
            or contradict the model.
        InputGuessError: The original runs on no synthetic candidate (exit 2).
    """
    input_shapes = dict(input_shapes or {})
    input_values = dict(input_values or {})
    specs = input_specs(model)
    check_flags(specs, input_shapes, input_values)
    axes = {name: b.axis for name, b in find_batch_axes(specs, batch_axes).items()}
    if samples is not None and samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    if data is None:
        count = samples or DEFAULT_SYNTHETIC_SAMPLES
        feeds = _synthetic(
            model,
            specs,
            input_shapes=input_shapes,
            input_values=input_values,
            seed=seed,
            samples=count,
            probe=probe,
        )
        return dataclasses.replace(feeds, batch_axes=axes)
    path = Path(data)
    if not path.exists():
        raise DataError(f"--data {data}: no such file or folder")
    limit = samples or DEFAULT_MAX_REAL_SAMPLES
    sets = find_test_data_sets(path)
    if sets is not None:
        if input_values:
            raise ConfigError("--input-value fills inputs of .npz/.npy data, not of test_data_set folders")
        feeds = _test_data_feeds(selected(sets, rows), specs, limit, data)
    elif (files := data_files(path, specs)) is not None:
        feeds = _file_feeds(files, data, specs, axes, input_shapes, input_values, limit, rows)
    else:
        feeds = _array_feeds(path, specs, axes, input_shapes, input_values, limit, rows)
    return dataclasses.replace(feeds, batch_axes=axes)
