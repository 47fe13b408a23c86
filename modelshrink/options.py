"""The settings every verifying command shares: inputs, gates, runtime, latency.

One bundle, declared once: each field is also its command-line flag (:mod:`modelshrink.flags`),
so ``compare``, ``quantize``, ``prune``, ``factorize`` and ``distill`` take the same flags with
the same help, and the Python API takes the same values as :class:`RunOptions`. Imports
nothing heavy (the CLI builds ``--help`` from it).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelshrink.errors import ConfigError
from modelshrink.flags import flag
from modelshrink.gates import Gates

__all__ = [
    "DATA_PANEL",
    "PROVIDERS",
    "RUNTIME_PANEL",
    "RunOptions",
    "RuntimeOptions",
    "Scalar",
    "parse_batch_axes",
    "parse_input_shapes",
    "parse_input_values",
    "parse_rows",
]

Scalar = int | float | bool

DATA_PANEL = "Data and inputs"
RUNTIME_PANEL = "Runtime and latency"

# Short names users type -> onnxruntime execution provider names.
PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "rocm": "ROCMExecutionProvider",
}


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


def parse_batch_axes(items: Sequence[str]) -> dict[str, int | None]:
    """Parse ``NAME:AXIS`` items (``--batch-axis state:1``, ``--batch-axis sr:none``).

    Raises:
        ConfigError: Malformed item.
    """
    axes: dict[str, int | None] = {}
    for item in items:
        name, sep, text = item.rpartition(":")
        text = text.strip().lower()
        if not sep or not name or not (text.isdigit() or text == "none"):
            raise ConfigError(
                f"--batch-axis '{item}': expected NAME:AXIS like state:1 (an axis number, or none "
                "for an input without one)"
            )
        axes[name] = None if text == "none" else int(text)
    return axes


def parse_input_values(items: Sequence[str]) -> dict[str, Scalar]:
    """Parse ``NAME=VALUE`` items (``--input-value sr=16000``).

    Raises:
        ConfigError: Malformed item.
    """
    values: dict[str, Scalar] = {}
    for item in items:
        name, sep, text = item.rpartition("=")
        text = text.strip()
        if not sep or not name or not text:
            raise ConfigError(f"--input-value '{item}': expected NAME=VALUE like sr=16000")
        lowered = text.lower()
        value: Scalar
        if lowered in ("true", "false"):
            value = lowered == "true"
        else:
            try:
                value = int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    value = math.nan
                if not math.isfinite(value):
                    raise ConfigError(
                        f"--input-value '{item}': '{text}' is not a finite number (or true/false)"
                    ) from None
        values[name] = value
    return values


_SLICE = re.compile(r"^\s*(-?\d*)\s*:\s*(-?\d*)\s*(?::\s*(\d*)\s*)?$")
_MODULO = re.compile(r"^\s*%\s*(\d+)\s*(!?=)\s*(\d+)\s*$")


def parse_rows(spec: str) -> Callable[[int, int], bool]:
    """``--rows``: which samples of ``--data`` to use, as ``keep(index, total)``.

    ``A:B`` or ``A:B:S`` (a Python slice over the samples), ``%K=R`` (the samples whose index
    modulo K is R) and ``%K!=R`` (the others): ``%5!=4`` and ``%5=4`` split the data into
    four-fifths and the fifth held out, the same way every time.

    Raises:
        ConfigError: Malformed spec.
    """
    if match := _MODULO.match(spec):
        k, op, r = int(match.group(1)), match.group(2), int(match.group(3))
        if k < 1 or r >= k:
            raise ConfigError(f"--rows '{spec}': %K=R needs K >= 1 and 0 <= R < K")
        if op == "=":
            return lambda i, total: i % k == r
        return lambda i, total: i % k != r
    if match := _SLICE.match(spec):
        start, stop, step = (int(g) if g else None for g in match.groups())
        if step == 0:
            raise ConfigError(f"--rows '{spec}': the step must be >= 1")
        window = slice(start, stop, step)
        return lambda i, total: i in range(*window.indices(total))
    raise ConfigError(f"--rows '{spec}': expected A:B (a slice of the samples), %K=R or %K!=R, e.g. %5!=4")


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are created; identical for original and candidate.

    Attributes:
        provider: Short provider name (``cpu``, ``cuda``, ...) or a full EP name.
        threads: Intra-op threads; 0 lets onnxruntime choose (all physical cores).
        optimize: Apply onnxruntime's graph optimizations (what deployments do).
    """

    provider: str = flag(
        "cpu", "onnxruntime execution provider: cpu, cuda, ... (CPU is the fallback).", panel=RUNTIME_PANEL
    )
    threads: int = flag(
        1, "Intra-op threads for every session; 0 = onnxruntime's default.", panel=RUNTIME_PANEL
    )
    optimize: bool = True

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ConfigError(f"--threads must be >= 0, got {self.threads}")

    @property
    def provider_name(self) -> str:
        """The full execution-provider name."""
        return PROVIDERS.get(self.provider.lower(), self.provider)

    def providers(self) -> list[str]:
        """Provider list for a session; CPU is always the fallback.

        Raises:
            ConfigError: The provider is not available in this onnxruntime build.
        """
        import onnxruntime as ort  # only when a session is made: --help must not load it

        name = self.provider_name
        available = ort.get_available_providers()
        if name not in available:
            short = [k for k, v in PROVIDERS.items() if v in available]
            raise ConfigError(
                f"--provider {self.provider}: not available in this onnxruntime build "
                f"(available: {', '.join(short or available)})"
            )
        return [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]


@dataclass(frozen=True)
class RunOptions:
    """Settings shared by every command that verifies and measures.

    Attributes:
        data: ``--data`` path, or None for synthetic inputs.
        rows: Which samples of ``data`` to use (see :func:`parse_rows`), or None for all.
        input_shapes: ``--input-shape`` overrides.
        input_values: ``--input-value`` fills (a number every feed of that input holds).
        batch_axes: ``--batch-axis`` overrides: the axis an input stacks rows along (None:
            none); the others are found from the declared dims (:func:`inputs.batch_axes`).
        seed: Seed for synthetic inputs and anything random in a technique.
        samples: Max feeds (None: 8 synthetic, up to 128 real).
        gates: Quality gates.
        runtime: Session options (provider, threads).
        latency: Measure latency.
        latency_runs: Fixed timed runs per model (None adapts to ``latency_budget_s``).
        latency_budget_s: Time budget for latency when ``latency_runs`` is None.
    """

    data: str | None = flag(
        None,
        "Real inputs: .npz keyed by input name, a folder of NAME.npy, a .npy, or ONNX test_data_set_* "
        "folders. Default: synthetic inputs from the declared shapes.",
        panel=DATA_PANEL,
        show_default=False,
    )
    input_shapes: Mapping[str, tuple[int, ...]] = flag(
        help="Set an input's shape, e.g. input_ids:1x128 (repeatable); dynamic sizes not given are "
        "guessed and tried on the original (the report says which).",
        names=("--input-shape",),
        panel=DATA_PANEL,
        parse=parse_input_shapes,
        render=lambda shapes: [f"{k}:{'x'.join(map(str, v))}" for k, v in shapes.items()],
        show_default=False,
        default_factory=dict,
    )
    input_values: Mapping[str, Scalar] = flag(
        help="Fill an input with one number in every synthetic feed, e.g. sr=16000 (repeatable); "
        "with --data, fills inputs the data does not hold.",
        names=("--input-value",),
        panel=DATA_PANEL,
        parse=parse_input_values,
        render=lambda values: [
            f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()
        ],
        show_default=False,
        default_factory=dict,
    )
    rows: str | None = flag(
        None,
        "Use only these samples of --data: A:B (a slice), %K=R or %K!=R (index modulo K is / is not R), "
        "e.g. %5!=4 to calibrate on four fifths and %5=4 to score on the fifth held out.",
        panel=DATA_PANEL,
        show_default=False,
    )
    batch_axes: Mapping[str, int | None] = flag(
        help="The axis an input stacks rows along in --data, e.g. state:1, or sr:none for an input "
        "fed as it is (repeatable); default: found from the declared dims (the report says how).",
        names=("--batch-axis",),
        panel=DATA_PANEL,
        parse=parse_batch_axes,
        show_default=False,
        default_factory=dict,
    )
    seed: int = flag(0, "Seed for synthetic inputs and any randomness.", panel=DATA_PANEL)
    samples: int | None = flag(
        None,
        "Max feeds used for fidelity (default: 8 synthetic, up to 128 from --data).",
        panel=DATA_PANEL,
        show_default=False,
    )
    gates: Gates = field(default_factory=Gates)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    latency: bool = flag(
        True, "Measure latency (interleaved, after warm-up).", negative="--no-latency", panel=RUNTIME_PANEL
    )
    latency_runs: int | None = flag(
        None, "Timed runs per model (default: adapt to ~3 s).", panel=RUNTIME_PANEL, show_default=False
    )
    latency_budget_s: float = 3.0

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"--seed must be a number >= 0, got {self.seed}")
        if self.rows is not None:
            parse_rows(self.rows)
            if self.data is None:
                raise ConfigError("--rows selects samples of --data; pass --data")
        if self.samples is not None and self.samples < 1:
            raise ConfigError(f"--samples must be >= 1, got {self.samples}")
        if self.latency_runs is not None and self.latency_runs < 1:
            raise ConfigError(f"--latency-runs must be >= 1, got {self.latency_runs}")
        if self.gates.min_speedup is not None and not self.latency:
            raise ConfigError("--min-speedup needs latency; drop --no-latency")

    def settings(self) -> dict[str, Any]:
        """Flags as a plain dict for the report."""
        return {
            "data": self.data,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "input_values": dict(self.input_values),
            "rows": self.rows,
            "batch_axes": dict(self.batch_axes),
            "seed": self.seed,
            "samples": self.samples,
            "gates": dataclasses.asdict(self.gates),
            "provider": self.runtime.provider,
            "threads": self.runtime.threads,
            "latency": self.latency,
            "latency_runs": self.latency_runs,
        }
