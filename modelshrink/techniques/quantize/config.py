"""``QuantizeConfig``: every flag of ``modelshrink quantize``, validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from modelshrink.errors import ConfigError

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_MIN_ELEMENTS",
    "MODE_FORMATS",
    "MODE_OPS",
    "Calibration",
    "Format",
    "Mode",
    "QuantizeConfig",
]

Mode = Literal["int8", "int4", "fp16", "dynamic", "static"]
Format = Literal["qdq", "cast", "nbits"]
Calibration = Literal["minmax", "percentile", "entropy"]

DEFAULT_BLOCK_SIZE = 32
DEFAULT_MIN_ELEMENTS = 1024

# --format choices per mode; the first is the default.
MODE_FORMATS: dict[str, tuple[str, ...]] = {"int8": ("qdq", "cast"), "int4": ("nbits", "qdq")}

# Op types whose weights each mode can quantize (the default for --op-types).
MODE_OPS: dict[str, tuple[str, ...]] = {
    "int8": ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather"),
    "int4": ("MatMul", "Gemm", "Gather"),
    "fp16": (),  # every op that is safe in float16; see fp16.py
    "dynamic": ("MatMul", "Gemm", "Gather", "Conv", "ConvTranspose"),
    "static": ("Conv", "MatMul", "Gemm"),
}


@dataclass(frozen=True)
class QuantizeConfig:
    """Settings of ``modelshrink quantize``.

    Attributes:
        mode: ``int8`` (weight-only, per channel), ``int4`` (weight-only, block-wise),
            ``fp16``, ``dynamic`` (int8 weights, activations quantized at run time) or
            ``static`` (QDQ with calibration data).
        block_size: int4 block size along the reduction axis (int4 only; default 32).
        format: Storage. int8: ``qdq`` (``DequantizeLinear``, default) or ``cast``
            (``Cast + Mul``, which onnxruntime folds at load). int4: ``nbits`` (onnxruntime
            ``MatMulNBits`` / ``GatherBlockQuantized``, default) or ``qdq`` (standard opset-21
            block-wise ``DequantizeLinear``).
        op_types: Only quantize weights of these op types (None: the mode's default set).
        exclude: Node names, op types, weight names or glob patterns left alone.
        min_elements: Weights with fewer elements are left in float.
        calibration: Activation range method for ``static``.
        sensitivity: Only measure each layer's cost (no model is written).
        fallback: With fidelity gates set, keep the most damaging layers in float until the
            gates pass.
    """

    mode: Mode = "int8"
    block_size: int | None = None
    format: Format | None = None
    op_types: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    min_elements: int = DEFAULT_MIN_ELEMENTS
    calibration: Calibration | None = None
    sensitivity: bool = False
    fallback: bool = True

    def __post_init__(self) -> None:
        if self.mode not in get_args(Mode):
            raise ConfigError(f"--mode must be one of {', '.join(get_args(Mode))}, got '{self.mode}'")
        if self.block_size is not None:
            if self.mode != "int4":
                raise ConfigError(f"--block-size applies to --mode int4 only (got --mode {self.mode})")
            bs = self.block_size
            if bs < 16 or bs & (bs - 1):
                raise ConfigError(f"--block-size must be a power of two >= 16, got {bs}")
        if self.format is not None:
            formats = MODE_FORMATS.get(self.mode)
            if formats is None:
                raise ConfigError(f"--format applies to --mode int8 and int4 only (got --mode {self.mode})")
            if self.format not in formats:
                raise ConfigError(
                    f"--format for --mode {self.mode} must be one of {', '.join(formats)}, got '{self.format}'"
                )
        if self.calibration is not None:
            if self.mode != "static":
                raise ConfigError(f"--calibration applies to --mode static only (got --mode {self.mode})")
            if self.calibration not in get_args(Calibration):
                raise ConfigError(
                    f"--calibration must be one of {', '.join(get_args(Calibration))}, got '{self.calibration}'"
                )
        if self.sensitivity and self.mode not in ("int8", "int4", "dynamic"):
            raise ConfigError(
                f"--sensitivity applies to --mode int8, int4 and dynamic (got --mode {self.mode})"
            )
        if self.min_elements < 0:
            raise ConfigError(f"--min-elements must be >= 0, got {self.min_elements}")
        if self.op_types is not None:
            if not self.op_types:
                raise ConfigError("--op-types needs at least one op type")
            allowed = MODE_OPS[self.mode]
            if allowed:
                unknown = [op for op in self.op_types if op not in allowed]
                if unknown:
                    raise ConfigError(
                        f"--op-types {unknown[0]}: --mode {self.mode} quantizes {', '.join(allowed)}"
                    )
        for pattern in self.exclude:
            if not pattern.strip():
                raise ConfigError("--exclude needs a node name, op type or glob pattern, got ''")

    @property
    def ops(self) -> tuple[str, ...]:
        """The op types this run quantizes."""
        return self.op_types if self.op_types is not None else MODE_OPS[self.mode]

    @property
    def block(self) -> int:
        """The int4 block size in effect."""
        return self.block_size if self.block_size is not None else DEFAULT_BLOCK_SIZE

    @property
    def storage(self) -> str:
        """The storage format in effect (``--format`` or the mode's default)."""
        if self.format is not None:
            return self.format
        return MODE_FORMATS.get(self.mode, ("",))[0]
