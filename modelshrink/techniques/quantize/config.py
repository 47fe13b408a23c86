"""``QuantizeConfig``: every flag of ``modelshrink quantize``, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from modelshrink.errors import ConfigError
from modelshrink.flags import exclude_flag, flag, min_elements_flag

if TYPE_CHECKING:
    from modelshrink.techniques.distill import Teacher, TrainingData

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_MIN_ELEMENTS",
    "MODE_FORMATS",
    "MODE_OPS",
    "PACKED_MODES",
    "PANEL",
    "QAT_PANEL",
    "RECURRENT_OPS",
    "Calibration",
    "Format",
    "Method",
    "Mode",
    "QatData",
    "QuantizeConfig",
]

Mode = Literal["int8", "int4", "int2", "binary", "fp16", "bf16", "dynamic", "static"]
Format = Literal["qdq", "cast", "nbits"]
Calibration = Literal["minmax", "percentile", "entropy"]
Method = Literal["rtn", "gptq", "awq"]

PANEL = "Quantization"
QAT_PANEL = "Quantization-aware training"
DEFAULT_BLOCK_SIZE = 32
DEFAULT_MIN_ELEMENTS = 1024

# --format choices per mode; the first is the default.
MODE_FORMATS: dict[str, tuple[str, ...]] = {
    "int8": ("cast", "qdq"),  # the technique picks qdq where the provider runs QDQ int8 kernels
    "int4": ("nbits", "qdq"),
    "int2": ("cast",),
    "binary": ("cast",),
}
# Modes stored packed at their true width, and their width (see lowbit.py).
PACKED_MODES: dict[str, int] = {"int2": 2, "binary": 1}

# Recurrent ops: their W (input) and R (recurrence) weights are quantized, one scale per
# direction and gate row; biases B, peepholes P and initial states stay float.
RECURRENT_OPS: tuple[str, ...] = ("LSTM", "GRU", "RNN")
# Op types whose weights each mode can quantize (the default for --op-types).
MODE_OPS: dict[str, tuple[str, ...]] = {
    "int8": ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", *RECURRENT_OPS),
    # Conv and recurrent weights: 4-bit codes packed two per byte, unpacked by ops folded at load
    "int4": ("MatMul", "Gemm", "Gather", "Conv", "ConvTranspose", *RECURRENT_OPS),
    "int2": ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", *RECURRENT_OPS),
    "binary": ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", *RECURRENT_OPS),
    "fp16": (),  # every op that is safe in float16; see fp16.py
    "bf16": ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", *RECURRENT_OPS),
    # LSTM: DynamicQuantizeLSTM; GRU/RNN (no integer kernel): weight-only int8, as Conv
    "dynamic": ("MatMul", "Gemm", "Gather", "Conv", "ConvTranspose", *RECURRENT_OPS),
    "static": ("Conv", "MatMul", "Gemm"),
}

# --qat defaults (measured on the sample models, see bench/bench_lowbit.py). The default peak
# learning rate halves with every extra bit, like the grid step: 2e-3 at 1 bit, 2.5e-4 at 4 bits
# (at 4 bits, 2e-3 moved the weights off a good post-training grid and never came back).
DEFAULT_QAT_EPOCHS = 20
DEFAULT_QAT_LR_1BIT = 2e-3
DEFAULT_QAT_BATCH = 32


@dataclass(frozen=True)
class QatData:
    """What ``--qat`` trains on, loaded from the files the config names (by the API, not here).

    Attributes:
        data: Training inputs (every row of ``--data``).
        teacher: The float model the student learns to copy (None: the input model itself).
    """

    data: TrainingData
    teacher: Teacher | None = None


@dataclass(frozen=True)
class QuantizeConfig:
    """Settings of ``modelshrink quantize``.

    Attributes:
        mode: ``int8`` (weight-only, per channel), ``int4`` (weight-only, block-wise),
            ``int2`` / ``binary`` (weight-only, 2 / 1 bit, packed at that width), ``fp16``,
            ``bf16`` (bfloat16 storage, float32 compute), ``dynamic`` (int8 weights,
            activations quantized at run time) or ``static`` (QDQ with calibration data).
        bits: Weight-only width 1..8 stored packed at that width (see ``lowbit.py``); with
            ``mode`` int8 (the default) it replaces the 8, and it must agree with int2 (2)
            and binary (1); other modes do not take it.
        block_size: Values per scale: int4 blocks along the reduction axis (default 32; for
            Conv and LSTM/GRU/RNN weights that axis runs along each output channel or gate
            row); packed widths: blocks along each output channel (default: one scale per
            channel).
        format: Storage. int8: ``cast`` (``Cast + Mul``, which onnxruntime folds at load: the
            default, unless the provider runs QDQ int8 kernels) or ``qdq``
            (``DequantizeLinear``, the default for TensorRT/OpenVINO/QNN-like providers). int4: ``nbits`` (onnxruntime
            ``MatMulNBits`` / ``GatherBlockQuantized``, default) or ``qdq`` (standard opset-21
            block-wise ``DequantizeLinear``); in both, Conv and recurrent weights are packed
            4-bit codes unpacked by ops folded at load (see ``lowbit.py``).
        op_types: Only quantize weights of these op types (None: the mode's default set).
        exclude: Node names, op types, weight names or glob patterns left alone.
        min_elements: Weights with fewer elements are left in float.
        calibration: Activation range method for ``static`` (None: per tensor, the method with
            the least quantization error on the calibration rows).
        smooth: ``static``: SmoothQuant's alpha for MatMul/Gemm inputs (None: off).
        bias_correction: ``static``: shift Conv/Gemm biases by the mean output error.
        method: Weight rounding for int8/int4/``--bits``: ``rtn`` (round to nearest),
            ``gptq`` or ``awq`` (fitted to ``--data``; see ``gptq.py``). None: gptq with
            ``--data``, rtn without.
        damping: ``--method gptq``: ``λ / mean(diag H)`` (None: 0.01).
        act_order: ``--method gptq``: round the columns of largest activations first (None: on).
        sensitivity: Only measure each layer's cost (no model is written).
        fallback: With fidelity gates set, keep the most damaging layers in float until the
            gates pass.
        qat: Quantization-aware training (packed widths only) on ``--data``.
        teacher: ``--qat``: the float model to copy (path; None: the input model itself).
        epochs: ``--qat``: passes over the training rows.
        lr: ``--qat``: peak learning rate (AdamW, cosine decay); None: ``2e-3 / 2^(bits - 1)``.
        batch_size: ``--qat``: rows per training step.
        qat_data: ``--qat``: the loaded teacher and training rows (the API loads them from
            ``teacher`` and ``--data``; the technique reads no files).
    """

    mode: Mode = flag(
        "int8",
        "int8: weight-only per channel (default); int4: weight-only block-wise (MatMulNBits for "
        "MatMul/Gemm/Gather, packed 4-bit codes folded at load for Conv and LSTM/GRU/RNN); int2 / binary: 2-bit / 1-bit (sign x scale) weights packed at that width (= --bits 2 / 1); "
        "fp16: weights and compute in float16; bf16: weights stored in bfloat16, float32 compute; "
        "dynamic: int8 MatMul/Gemm/LSTM with activations quantized at run time; static: QDQ int8 calibrated "
        "on --data.",
        panel=PANEL,
    )
    bits: int | None = flag(
        None,
        "Weight-only width 1..8, packed at that width in the file and unpacked by ops onnxruntime folds at "
        "load (replaces the 8 of --mode int8; --mode int2 / binary are --bits 2 / 1).",
        panel=PANEL,
        show_default=False,
    )
    block_size: int | None = flag(
        None,
        "Values per scale (power of two >= 16). int4: blocks along the reduction axis (default 32; Conv, "
        "LSTM/GRU/RNN: along each output channel); --bits / int2 / binary: blocks along each output channel (default: one scale per channel).",
        panel=PANEL,
        show_default=False,
    )
    format: Format | None = flag(
        None,
        "int8: cast (Cast+Mul, folded at load: runs at the original's speed; default) or qdq "
        "(DequantizeLinear; default for providers that run int8 QDQ kernels: TensorRT, OpenVINO, QNN). "
        "int4: nbits (MatMulNBits, default) or qdq (opset-21 DequantizeLinear). --bits / int2 / binary: "
        "cast only (BitShift+Cast+Mul, folded at load).",
        panel=PANEL,
        show_default=False,
    )
    calibration: Calibration | None = flag(
        None,
        "static: how activation ranges are set from --data, for every tensor (default: per tensor, the "
        "one of minmax, percentile and entropy with the least quantization error on --data).",
        panel=PANEL,
        show_default=False,
    )
    method: Method | None = flag(
        None,
        "Weight rounding for int8 / int4 / --bits: rtn (round to nearest), gptq (each layer's rounding "
        "fitted to its real inputs on --data, error fed forward column by column; inputs with outlier "
        "channels are scaled first, as awq does), awq (activation-aware "
        "per-input-channel scales, searched per layer on --data). Default: gptq with --data, rtn without.",
        panel=PANEL,
        show_default=False,
    )
    damping: float | None = flag(
        None,
        "--method gptq: share of the mean of diag(XᵀX) added to its diagonal before it is inverted "
        "(default 0.01; raise it when --data has few rows).",
        panel=PANEL,
        show_default=False,
    )
    act_order: bool | None = flag(
        None,
        "--method gptq: round the columns with the largest activations first (default on).",
        negative="--no-act-order",
        panel=PANEL,
        show_default=False,
    )
    smooth: float | None = flag(
        None,
        "static: SmoothQuant with this alpha (0 < ALPHA <= 1, e.g. 0.5): MatMul/Gemm inputs with outlier "
        "channels are divided by s = max|x|^ALPHA / max|W|^(1-ALPHA) per channel and the weights "
        "multiplied by it, where that lowers the measured error.",
        panel=PANEL,
        show_default=False,
    )
    bias_correction: bool = flag(
        True,
        "static: shift each Conv/Gemm bias by the mean error quantization adds to its output on --data.",
        negative="--no-bias-correction",
        panel=PANEL,
    )
    op_types: tuple[str, ...] | None = flag(
        None,
        "Only quantize weights of these ops, e.g. MatMul,Gemm (repeatable; default: all the mode handles).",
        panel=PANEL,
        show_default=False,
    )
    exclude: tuple[str, ...] = exclude_flag(PANEL)
    min_elements: int = min_elements_flag(PANEL, DEFAULT_MIN_ELEMENTS)
    sensitivity: bool = flag(
        False, "Quantize one layer at a time and print each layer's cost; write nothing.", panel=PANEL
    )
    fallback: bool = flag(
        True,
        "With --max-error/--min-cosine/--min-agreement: keep the most damaging layers in float until the "
        "gates pass.",
        negative="--no-fallback",
        panel=PANEL,
    )
    qat: bool = flag(
        False,
        "Quantization-aware training (with --bits / int2 / binary): train the model on --data to copy "
        "--teacher through fake-quantized weights, then pack the trained weights.",
        panel=QAT_PANEL,
    )
    teacher: str | None = flag(
        None,
        "--qat: the float model to copy (.onnx path; default: the input model itself).",
        panel=QAT_PANEL,
        show_default=False,
    )
    epochs: int = flag(DEFAULT_QAT_EPOCHS, "--qat: passes over the --data rows.", panel=QAT_PANEL)
    lr: float | None = flag(
        None,
        "--qat: peak learning rate (AdamW, cosine; default 2e-3 / 2^(bits-1): 2e-3 at 1 bit, 2.5e-4 at 4 bits).",
        panel=QAT_PANEL,
        show_default=False,
    )
    batch_size: int = flag(DEFAULT_QAT_BATCH, "--qat: rows per training step.", panel=QAT_PANEL)
    qat_data: QatData | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in get_args(Mode):
            raise ConfigError(f"--mode must be one of {', '.join(get_args(Mode))}, got '{self.mode}'")
        self._check_bits()
        if self.block_size is not None:
            if self.mode != "int4" and self.width is None:
                raise ConfigError(
                    f"--block-size applies to --mode int4, int2, binary and --bits (got --mode {self.mode})"
                )
            bs = self.block_size
            if bs < 16 or bs & (bs - 1):
                raise ConfigError(f"--block-size must be a power of two >= 16, got {bs}")
        if self.format is not None:
            formats = ("cast",) if self.width is not None else MODE_FORMATS.get(self.mode)
            if formats is None:
                raise ConfigError(
                    f"--format applies to --mode int8, int4, int2, binary and --bits (got --mode {self.mode})"
                )
            if self.format not in formats:
                what = f"--bits {self.width}" if self.width is not None else f"--mode {self.mode}"
                raise ConfigError(
                    f"--format for {what} must be one of {', '.join(formats)}, got '{self.format}'"
                )
        if self.calibration is not None:
            if self.mode != "static":
                raise ConfigError(f"--calibration applies to --mode static only (got --mode {self.mode})")
            if self.calibration not in get_args(Calibration):
                raise ConfigError(
                    f"--calibration must be one of {', '.join(get_args(Calibration))}, got '{self.calibration}'"
                )
        if self.smooth is not None:
            if self.mode != "static":
                raise ConfigError(f"--smooth applies to --mode static only (got --mode {self.mode})")
            if not (math.isfinite(self.smooth) and 0 < self.smooth <= 1):
                raise ConfigError(
                    f"--smooth must be in (0, 1] (SmoothQuant's alpha, e.g. 0.5), got {self.smooth}"
                )
        if not self.bias_correction and self.mode != "static":
            raise ConfigError(f"--no-bias-correction applies to --mode static only (got --mode {self.mode})")
        self._check_method()
        if self.sensitivity and self.mode not in ("int8", "int4", "int2", "binary", "dynamic", "static"):
            raise ConfigError(
                "--sensitivity applies to --mode int8, int4, int2, binary, dynamic and static "
                f"(got --mode {self.mode})"
            )
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.teacher is not None and not self.qat:
            raise ConfigError("--teacher applies to --qat only")
        if self.qat:
            if self.width is None:
                raise ConfigError(
                    f"--qat trains weights packed at a width: add --bits N (1..8), --mode int2 or "
                    f"--mode binary (got --mode {self.mode}; int8 loses little without training)"
                )
            if self.sensitivity:
                raise ConfigError("--sensitivity only measures post-training quantization; drop --qat")
        if self.min_elements < 0:
            raise ConfigError(f"--min-elements must be >= 0, got {self.min_elements}")
        if self.op_types is not None:
            if not self.op_types:
                raise ConfigError("--op-types needs at least one op type")
            allowed = MODE_OPS[self.mode]
            if allowed:
                unknown = [op for op in self.op_types if op not in allowed]
                if unknown:
                    extra = (
                        " with int8 kernels; without --op-types it also stores LSTM/GRU/RNN and Gather "
                        "weights in int8, as --mode int8 does (--exclude leaves some out)"
                        if self.mode == "static"
                        else ""
                    )
                    raise ConfigError(
                        f"--op-types {unknown[0]}: --mode {self.mode} quantizes {', '.join(allowed)}{extra}"
                    )
        for pattern in self.exclude:
            if not pattern.strip():
                raise ConfigError("--exclude needs a node name, op type or glob pattern, got ''")

    def _check_method(self) -> None:
        if self.method is not None:
            if self.method not in get_args(Method):
                raise ConfigError(
                    f"--method must be one of {', '.join(get_args(Method))}, got '{self.method}'"
                )
            if self.mode not in ("int8", "int4", "int2", "binary"):
                raise ConfigError(
                    f"--method applies to the weight-only modes int8, int4, int2, binary and --bits "
                    f"(got --mode {self.mode})"
                )
            if self.qat and self.method != "rtn":
                raise ConfigError(
                    f"--method {self.method} rounds after training; --qat trains for the grid: drop one"
                )
        if self.damping is not None:
            if not (math.isfinite(self.damping) and 0 < self.damping <= 10):
                raise ConfigError(f"--damping must be in (0, 10], got {self.damping}")
            if self.method in ("rtn", "awq"):
                raise ConfigError(f"--damping applies to --method gptq (got --method {self.method})")
        if self.act_order is not None and self.method in ("rtn", "awq"):
            raise ConfigError(
                f"--act-order / --no-act-order apply to --method gptq (got --method {self.method})"
            )

    def _check_bits(self) -> None:
        if self.bits is None:
            return
        if not 1 <= self.bits <= 8:
            raise ConfigError(f"--bits must be in 1..8, got {self.bits}")
        implied = PACKED_MODES.get(self.mode)
        if implied is not None and implied != self.bits:
            raise ConfigError(f"--mode {self.mode} is {implied}-bit; it contradicts --bits {self.bits}")
        if implied is None and self.mode != "int8":
            raise ConfigError(
                f"--bits sets the width of packed weight-only quantization; it does not combine with "
                f"--mode {self.mode} (use --bits alone, or --mode int2 / binary)"
            )

    def lr_for(self, bits: int) -> float:
        """The ``--qat`` peak learning rate at ``bits``: ``lr``, or the default for that width."""
        return self.lr if self.lr is not None else DEFAULT_QAT_LR_1BIT / (1 << (bits - 1))

    @property
    def width(self) -> int | None:
        """The packed width in bits (``--bits``, int2, binary), or None for the other modes."""
        if self.bits is not None:
            return self.bits
        return PACKED_MODES.get(self.mode)

    @property
    def ops(self) -> tuple[str, ...]:
        """The op types this run quantizes."""
        return self.op_types if self.op_types is not None else MODE_OPS[self.mode]

    @property
    def block(self) -> int:
        """The int4 block size in effect."""
        return self.block_size if self.block_size is not None else DEFAULT_BLOCK_SIZE

    @property
    def plan_mode(self) -> str:
        """The mode whose rules plan the weights (packed widths plan like int8: per channel)."""
        return "int8" if self.width is not None else self.mode

    @property
    def storage(self) -> str:
        """The storage format in effect (``--format`` or the mode's default)."""
        if self.format is not None:
            return self.format
        if self.width is not None:
            return "cast"
        return MODE_FORMATS.get(self.mode, ("",))[0]
