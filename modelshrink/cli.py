"""The command line: flags -> config -> pipeline -> report -> exit code.

The only layer that knows argv, terminals and exit codes. stdout carries exactly one thing:
model bytes (``-o -``) or the JSON report (``--json``); people-facing output goes to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import onnxruntime as ort
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from typer.core import TyperGroup
from typer.exceptions import Abort, TyperException

from modelshrink import __version__, api, io, techniques
from modelshrink._entry import Interrupted, caught_signal, exit_interrupted
from modelshrink._entry import main as main
from modelshrink.errors import EXIT_GATE, ConfigError, ModelshrinkError
from modelshrink.feeds import parse_input_shapes, parse_input_values
from modelshrink.gates import Gates
from modelshrink.inspection import render_inspect
from modelshrink.io import targets
from modelshrink.pipeline import RunOptions, run_technique
from modelshrink.pipeline import compare as compare_models
from modelshrink.report import Report, render_report
from modelshrink.runtime import RuntimeOptions
from modelshrink.techniques.base import Progress as ProgressSink
from modelshrink.techniques.base import Technique, silent_progress
from modelshrink.techniques.distill import DistillConfig
from modelshrink.techniques.factorize import DEFAULT_OP_TYPES as FACTORIZE_OP_TYPES
from modelshrink.techniques.factorize import FactorizeConfig
from modelshrink.techniques.prune import DEFAULT_OP_TYPES as PRUNE_OP_TYPES
from modelshrink.techniques.prune import PruneConfig
from modelshrink.techniques.quantize import QuantizeConfig
from modelshrink.techniques.quantize.config import DEFAULT_QAT_BATCH, DEFAULT_QAT_EPOCHS

__all__ = ["app", "main"]

EXIT_CODES_HELP = (
    "Exit codes: 0 ok · 1 the model or data is bad or unsupported, or writing failed · "
    "2 usage error, or an output path refused before any work · 3 a quality gate failed (no model "
    "written) · 130/143 interrupted (SIGINT/SIGTERM). Set MODELSHRINK_DEBUG=1 to see tracebacks."
)


class _Unwound(BaseException):
    """An interrupt carried past Typer, which turns KeyboardInterrupt into a silent exit 130."""

    def __init__(self, interrupt: KeyboardInterrupt) -> None:
        super().__init__()
        self.interrupt = interrupt


class _Group(TyperGroup):
    """Click group whose usage errors are one line on stderr: ``error: ... (see --help)``.

    An interrupt (Ctrl-C, or SIGTERM through :mod:`modelshrink._entry`) ends in one line and
    128 + the signal number, after everything it unwound through has cleaned up.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _Unwound(exc) from exc

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except TyperException as exc:  # click-style usage errors (exit 2)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            typer.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except _Unwound as exc:
            exit_interrupted(exc.interrupt)
        except Abort as exc:
            exit_interrupted(exc.__cause__)
        if (signum := caught_signal()) is not None:  # interrupted while parsing flags
            exit_interrupted(Interrupted(signum))
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_Group,
    name="modelshrink",
    help="Make ONNX models smaller and faster, with an honest report of what changed.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

err_console = Console(stderr=True, markup=False, highlight=False)

# --- shared flags ---------------------------------------------------------------------------

InputArg = Annotated[str, typer.Argument(help="Input .onnx path, or '-' for stdin.", show_default=False)]
OutputOpt = Annotated[
    str, typer.Option("-o", "--output", help="Output path, or '-' for stdout.", show_default=False)
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force", help="Overwrite existing files: the output, its external data, the --report file."
    ),
]
ExternalDataOpt = Annotated[
    bool | None,
    typer.Option(
        "--external-data/--no-external-data",
        help="Store tensors in OUTPUT.data next to the model (default: when the input did, or over 2 GB).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON report on stdout.")]
ReportOpt = Annotated[
    Path | None,
    typer.Option(
        "--report",
        help="Also write the JSON report to this file ('-' for stdout); --force to replace one.",
        dir_okay=False,
    ),
]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="No table or progress on stderr.")]
VerboseOpt = Annotated[int, typer.Option("-v", "--verbose", count=True, help="More logging (-vv for debug).")]

_DATA = "Data and inputs"
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Real inputs: .npz keyed by input name, a folder of NAME.npy, a .npy, or ONNX "
        "test_data_set_* folders. Default: synthetic inputs from the declared shapes.",
        rich_help_panel=_DATA,
        show_default=False,
    ),
]
InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        help="Set an input's shape, e.g. input_ids:1x128 (repeatable); dynamic sizes not given are "
        "guessed and tried on the original (the report says which).",
        rich_help_panel=_DATA,
        show_default=False,
    ),
]
InputValueOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-value",
        help="Fill an input with one number in every synthetic feed, e.g. sr=16000 (repeatable); "
        "with --data, fills inputs the data does not hold.",
        rich_help_panel=_DATA,
        show_default=False,
    ),
]
SeedOpt = Annotated[
    int,
    typer.Option(
        "--seed", help="Seed for synthetic inputs and any randomness (>= 0).", min=0, rich_help_panel=_DATA
    ),
]
SamplesOpt = Annotated[
    int | None,
    typer.Option(
        "--samples",
        help="Max feeds used for fidelity (default: 8 synthetic, up to 128 from --data).",
        rich_help_panel=_DATA,
        show_default=False,
    ),
]

_GATES = "Quality gates (exit 3 and nothing written when one fails)"
MaxErrorOpt = Annotated[
    float | None,
    typer.Option(
        "--max-error",
        help="Max allowed |result - original| over all outputs.",
        rich_help_panel=_GATES,
        show_default=False,
    ),
]
MinCosineOpt = Annotated[
    float | None,
    typer.Option(
        "--min-cosine",
        help="Min cosine similarity of every output.",
        rich_help_panel=_GATES,
        show_default=False,
    ),
]
MinAgreementOpt = Annotated[
    float | None,
    typer.Option(
        "--min-agreement",
        help="Min top-1 agreement (0..1) of class-score outputs.",
        rich_help_panel=_GATES,
        show_default=False,
    ),
]
MaxSizeRatioOpt = Annotated[
    float | None,
    typer.Option(
        "--max-size-ratio", help="Max result/original file size.", rich_help_panel=_GATES, show_default=False
    ),
]
MinSpeedupOpt = Annotated[
    float | None,
    typer.Option(
        "--min-speedup", help="Min original/result p50 latency.", rich_help_panel=_GATES, show_default=False
    ),
]

_RUNTIME = "Runtime and latency"
ProviderOpt = Annotated[
    str,
    typer.Option(
        "--provider",
        help="onnxruntime execution provider: cpu, cuda, ... (CPU is the fallback).",
        rich_help_panel=_RUNTIME,
    ),
]
ThreadsOpt = Annotated[
    int,
    typer.Option(
        "--threads",
        help="Intra-op threads for every session; 0 = onnxruntime's default.",
        rich_help_panel=_RUNTIME,
    ),
]
LatencyOpt = Annotated[
    bool,
    typer.Option(
        "--latency/--no-latency",
        help="Measure latency (interleaved, after warm-up).",
        rich_help_panel=_RUNTIME,
    ),
]
LatencyRunsOpt = Annotated[
    int | None,
    typer.Option(
        "--latency-runs",
        help="Timed runs per model (default: adapt to ~3 s).",
        rich_help_panel=_RUNTIME,
        show_default=False,
    ),
]


def run_options(
    *,
    data: str | None,
    input_shape: list[str] | None,
    seed: int,
    samples: int | None,
    max_error: float | None,
    min_cosine: float | None,
    min_agreement: float | None,
    max_size_ratio: float | None,
    min_speedup: float | None,
    provider: str,
    threads: int,
    latency: bool,
    latency_runs: int | None,
    input_value: list[str] | None = None,
) -> RunOptions:
    """Bundle the shared flags into :class:`RunOptions` (validating them)."""
    return RunOptions(
        data=data,
        input_shapes=parse_input_shapes(input_shape or []),
        input_values=parse_input_values(input_value or []),
        seed=seed,
        samples=samples,
        gates=Gates(
            max_error=max_error,
            min_cosine=min_cosine,
            min_agreement=min_agreement,
            max_size_ratio=max_size_ratio,
            min_speedup=min_speedup,
        ),
        runtime=RuntimeOptions(provider=provider, threads=threads),
        latency=latency,
        latency_runs=latency_runs,
    )


RUN_OPTION_FLAGS = (
    "data", "input_shape", "input_value", "seed", "samples", "max_error", "min_cosine", "min_agreement",
    "max_size_ratio", "min_speedup", "provider", "threads", "latency", "latency_runs",
)  # fmt: skip


def shared_options(flags: dict[str, Any]) -> Any:
    """A zero-argument factory of :class:`RunOptions` from a command's ``locals()``.

    Every command declares the shared flags under the same names; this picks them so each
    command does not repeat the list (and errors surface inside ``run_command``).
    """
    picked = {name: flags[name] for name in RUN_OPTION_FLAGS}
    return lambda: run_options(**picked)


def flag_list(values: list[str] | None) -> tuple[str, ...]:
    """Repeatable, comma-separable flag values: ``--x a,b --x c`` -> ``("a", "b", "c")``."""
    return tuple(p.strip() for v in values or () for p in v.split(",") if p.strip())


# --- plumbing -------------------------------------------------------------------------------


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    handler = RichHandler(console=err_console, show_time=False, show_path=verbose >= 2)
    root = logging.getLogger("modelshrink")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # Libraries we call log through the root logger; their chatter is ours to show or hide.
    # Python warnings (numpy's RuntimeWarnings) go the same way: shown with -v, never as bare
    # lines next to the one `error:` line.
    logging.captureWarnings(True)
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(
        logging.ERROR if quiet else (logging.ERROR, logging.WARNING, logging.DEBUG)[min(verbose, 2)]
    )
    # Libraries' own warnings would reach stderr through logging's last-resort handler as bare
    # lines; they are for developers (-vv), not part of a command's output.
    for library in ("onnx_ir", "onnxscript"):
        logging.getLogger(library).setLevel(logging.DEBUG if verbose >= 2 else logging.CRITICAL)
    # onnxruntime's native log goes straight to fd 2; every failure it logs also reaches us as
    # an exception that becomes the one `error:` line, so keep it quiet unless -vv.
    ort.set_default_logger_severity(1 if verbose >= 2 else 4)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn :class:`ModelshrinkError` into ``error: ...`` on stderr and its exit code."""
    try:
        yield
    except ModelshrinkError as exc:
        if os.environ.get("MODELSHRINK_DEBUG"):
            raise
        err_console.print(f"error: {exc.message}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


class _RichProgress:
    """A progress sink drawing Rich bars on stderr, one per description."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
        )
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, description: str, done: int, total: int) -> None:
        # One bar per description; text after " · " is live figures (loss, ...) of the same bar.
        key = description.split(" · ", 1)[0]
        task = self._tasks.get(key)
        if task is None:
            task = self._tasks[key] = self._progress.add_task(description, total=total)
        self._progress.update(task, completed=done, total=total, description=description)

    def __enter__(self) -> _RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()


@contextlib.contextmanager
def progress_sink(quiet: bool) -> Iterator[ProgressSink]:
    """Rich bars when stderr is a terminal and not quiet; otherwise silent."""
    if quiet or not err_console.is_terminal:
        yield silent_progress
        return
    with _RichProgress() as bars:
        yield bars


def finish(report: Report, *, json_: bool, quiet: bool) -> None:
    """Render, emit JSON, and exit 3 when a gate failed (the report file is already written)."""
    if not quiet:
        render_report(report, err_console)
    if json_:
        sys.stdout.write(report.to_json())
        sys.stdout.flush()
    if not report.passed:
        for gate in report.failed_gates:
            err_console.print(
                f"error: gate failed: {gate.describe()}", markup=False, highlight=False, soft_wrap=True
            )
        raise typer.Exit(EXIT_GATE)


def _check_stdout(output: str | None, json_: bool) -> None:
    if output == io.STDIO and json_:
        raise ConfigError("-o - and --json both want stdout; use --report FILE for the JSON report")


def run_command(
    command: str,
    technique: Technique,
    config_factory: Any,
    src: str,
    output: str,
    options_factory: Any,
    *,
    force: bool,
    external_data: bool | None,
    json_: bool,
    report_file: Path | None,
    quiet: bool,
    verbose: int,
) -> None:
    """What every compression command does after parsing its flags.

    ``config_factory`` and ``options_factory`` are zero-argument callables so that
    configuration errors are reported like every other error.
    """
    _setup_logging(verbose, quiet)
    with user_errors():
        _check_stdout(output, json_)
        options = options_factory()
        # Every path written is checked before anything is read (a teacher or --data too);
        # the pipeline checks again once it knows the files it reads.
        targets.plan_writes(
            output=output,
            report=report_file,
            reads=(*io.files_read(src), options.data),
            force=force,
            external_data=external_data,
            json_stdout=json_,
        )
        config = config_factory()
        with progress_sink(quiet) as progress:
            report = run_technique(
                command,
                technique,
                config,
                src,
                output,
                options,
                force=force,
                external_data=external_data,
                progress=progress,
                report=report_file,
            )
        finish(report, json_=json_, quiet=quiet)


# --- commands -------------------------------------------------------------------------------


def _version(value: bool) -> None:
    if value:
        typer.echo(f"modelshrink {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Make ONNX models smaller and faster, with an honest report of what changed."""


@app.command()
def inspect(
    model: InputArg,
    json_: JsonOpt = False,
    report_file: ReportOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Show what is in a model: I/O, ops, weights and where they live, what each technique can act on.

    Example: modelshrink inspect sample_models/digits_cnn.onnx
    """
    _setup_logging(verbose, quiet)
    with user_errors():
        targets.plan_writes(report=report_file, reads=io.files_read(model), force=force, json_stdout=json_)
        report = api.inspect(model, report=report_file, force=force)
        if not quiet:
            render_inspect(report, err_console)
        if json_:
            sys.stdout.write(report.to_json())


@app.command()
def compare(
    original: Annotated[
        str, typer.Argument(help="Original .onnx path, or '-' for stdin.", show_default=False)
    ],
    candidate: Annotated[
        str, typer.Argument(help="Candidate .onnx path, or '-' for stdin.", show_default=False)
    ],
    data: DataOpt = None,
    input_shape: InputShapeOpt = None,
    input_value: InputValueOpt = None,
    seed: SeedOpt = 0,
    samples: SamplesOpt = None,
    max_error: MaxErrorOpt = None,
    min_cosine: MinCosineOpt = None,
    min_agreement: MinAgreementOpt = None,
    max_size_ratio: MaxSizeRatioOpt = None,
    min_speedup: MinSpeedupOpt = None,
    provider: ProviderOpt = "cpu",
    threads: ThreadsOpt = 1,
    latency: LatencyOpt = True,
    latency_runs: LatencyRunsOpt = None,
    json_: JsonOpt = False,
    report_file: ReportOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Report size, latency and output fidelity of CANDIDATE against ORIGINAL; gate on them.

    Example: modelshrink compare model.onnx model.int8.onnx --data inputs.npz --max-error 0.05
    """
    flags = locals()
    _setup_logging(verbose, quiet)
    with user_errors():
        options = shared_options(flags)()
        targets.plan_writes(
            report=report_file,
            reads=(*io.files_read(original, candidate), options.data),
            force=force,
            json_stdout=json_,
        )
        with progress_sink(quiet) as progress:
            report = compare_models(
                original, candidate, options, progress=progress, report=report_file, force=force
            )
        finish(report, json_=json_, quiet=quiet)


_QUANT = "Quantization"
_QAT = "Quantization-aware training"


def _quantize_config(
    src: str,
    settings: dict[str, Any],
    *,
    qat: bool,
    teacher: str | None,
    data: str | None,
    input_shape: list[str] | None,
    **training: Any,
) -> QuantizeConfig:
    """QuantizeConfig from the flags; with --qat, load the teacher and every row of --data."""
    if not qat:
        if teacher is not None:
            raise ConfigError("--teacher applies to --qat only")
        return QuantizeConfig(**settings)
    shapes = parse_input_shapes(input_shape or [])
    return QuantizeConfig(
        **settings, qat=api.qat_settings(src, data, teacher=teacher, input_shapes=shapes, **training)
    )


@app.command()
def quantize(
    src: InputArg,
    output: OutputOpt,
    mode: Annotated[
        Literal["int8", "int4", "int2", "binary", "fp16", "bf16", "dynamic", "static"],
        typer.Option(
            "--mode",
            help="int8: weight-only per channel (default); int4: weight-only block-wise for MatMul/Gemm/Gather; "
            "int2 / binary: 2-bit / 1-bit (sign x scale) weights packed at that width (= --bits 2 / 1); "
            "fp16: weights and compute in float16; bf16: weights stored in bfloat16, float32 compute; "
            "dynamic: int8 MatMul/Gemm with activations quantized at run time; static: QDQ int8 calibrated "
            "on --data.",
            rich_help_panel=_QUANT,
        ),
    ] = "int8",
    bits: Annotated[
        int | None,
        typer.Option(
            "--bits",
            help="Weight-only width 1..8, packed at that width in the file and unpacked by ops onnxruntime "
            "folds at load (replaces the 8 of --mode int8; --mode int2 / binary are --bits 2 / 1).",
            rich_help_panel=_QUANT,
            show_default=False,
        ),
    ] = None,
    block_size: Annotated[
        int | None,
        typer.Option(
            "--block-size",
            help="Values per scale (power of two >= 16). int4: blocks along the reduction axis (default 32); "
            "--bits / int2 / binary: blocks along each output channel (default: one scale per channel).",
            rich_help_panel=_QUANT,
            show_default=False,
        ),
    ] = None,
    format_: Annotated[
        Literal["qdq", "cast", "nbits"] | None,
        typer.Option(
            "--format",
            help="int8: cast (Cast+Mul, folded at load: runs at the original's speed; default) or qdq "
            "(DequantizeLinear; default for providers that run int8 QDQ kernels: TensorRT, OpenVINO, QNN). "
            "int4: nbits (MatMulNBits, default) or qdq (opset-21 DequantizeLinear). "
            "--bits / int2 / binary: cast only (BitShift+Cast+Mul, folded at load).",
            rich_help_panel=_QUANT,
            show_default=False,
        ),
    ] = None,
    calibration: Annotated[
        Literal["minmax", "percentile", "entropy"] | None,
        typer.Option(
            "--calibration",
            help="static: how activation ranges are set from --data (default minmax).",
            rich_help_panel=_QUANT,
            show_default=False,
        ),
    ] = None,
    op_types: Annotated[
        list[str] | None,
        typer.Option(
            "--op-types",
            help="Only quantize weights of these ops, e.g. MatMul,Gemm (repeatable; default: all the mode handles).",
            rich_help_panel=_QUANT,
            show_default=False,
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude",
            help="Leave alone: node name, weight name, op type or glob pattern (repeatable).",
            rich_help_panel=_QUANT,
            show_default=False,
        ),
    ] = None,
    min_elements: Annotated[
        int,
        typer.Option(
            "--min-elements", help="Leave weights with fewer elements in float.", rich_help_panel=_QUANT
        ),
    ] = 1024,
    sensitivity: Annotated[
        bool,
        typer.Option(
            "--sensitivity",
            help="Quantize one layer at a time and print each layer's cost; write nothing.",
            rich_help_panel=_QUANT,
        ),
    ] = False,
    fallback: Annotated[
        bool,
        typer.Option(
            "--fallback/--no-fallback",
            help="With --max-error/--min-cosine/--min-agreement: keep the most damaging layers in float "
            "until the gates pass.",
            rich_help_panel=_QUANT,
        ),
    ] = True,
    qat: Annotated[
        bool,
        typer.Option(
            "--qat",
            help="Quantization-aware training (with --bits / int2 / binary): train the model on --data to "
            "copy --teacher through fake-quantized weights, then pack the trained weights.",
            rich_help_panel=_QAT,
        ),
    ] = False,
    teacher: Annotated[
        str | None,
        typer.Option(
            "--teacher",
            help="--qat: the float model to copy (.onnx path; default: the input model itself).",
            rich_help_panel=_QAT,
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[
        int, typer.Option("--epochs", help="--qat: passes over the --data rows.", rich_help_panel=_QAT)
    ] = DEFAULT_QAT_EPOCHS,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="--qat: peak learning rate (AdamW, cosine; default 2e-3 / 2^(bits-1): 2e-3 at 1 bit, "
            "2.5e-4 at 4 bits).",
            rich_help_panel=_QAT,
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="--qat: rows per training step.", rich_help_panel=_QAT)
    ] = DEFAULT_QAT_BATCH,
    force: ForceOpt = False,
    external_data: ExternalDataOpt = None,
    data: DataOpt = None,
    input_shape: InputShapeOpt = None,
    input_value: InputValueOpt = None,
    seed: SeedOpt = 0,
    samples: SamplesOpt = None,
    max_error: MaxErrorOpt = None,
    min_cosine: MinCosineOpt = None,
    min_agreement: MinAgreementOpt = None,
    max_size_ratio: MaxSizeRatioOpt = None,
    min_speedup: MinSpeedupOpt = None,
    provider: ProviderOpt = "cpu",
    threads: ThreadsOpt = 1,
    latency: LatencyOpt = True,
    latency_runs: LatencyRunsOpt = None,
    json_: JsonOpt = False,
    report_file: ReportOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Quantize weights to int8 (default), 8..1 bits (--bits, --qat), 16-bit floats, or int8 compute.

    Example: modelshrink quantize sample_models/digits_cnn.onnx -o digits_cnn.int8.onnx
    """
    flags = locals()
    # fmt: off
    settings = dict(
        mode=mode, bits=bits, block_size=block_size, format=format_, op_types=flag_list(op_types) or None,
        exclude=flag_list(exclude), min_elements=min_elements, sensitivity=sensitivity,
        fallback=fallback, calibration=calibration,
    )
    training = dict(epochs=epochs, lr=lr, batch_size=batch_size)
    run_command(
        "quantize",
        techniques.TECHNIQUES["quantize"],
        lambda: _quantize_config(src, settings, qat=qat, teacher=teacher, data=data, input_shape=input_shape, **training),
        src,
        output,
        shared_options(flags),
        force=force, external_data=external_data, json_=json_, report_file=report_file, quiet=quiet, verbose=verbose,
    )
    # fmt: on


_PRUNE = "Pruning"


@app.command()
def prune(
    src: InputArg,
    output: OutputOpt,
    sparsity: Annotated[float | None, typer.Option("--sparsity", help="Fraction to remove: of the weights, or of each channel group with --structured. Default: the largest that keeps the fidelity floor (top-1 agreement >= 99% on class-like outputs, else cosine >= 0.99), searched in a few trial runs; with a fidelity gate, up to 0.5 as the gate allows.", rich_help_panel=_PRUNE, show_default=False)] = None,
    scope: Annotated[str, typer.Option("--scope", help="layer: each tensor loses exactly --sparsity; global: one magnitude threshold over all.", rich_help_panel=_PRUNE)] = "layer",
    pattern: Annotated[str | None, typer.Option("--pattern", help="N:M, e.g. 2:4: at most N non-zeros in every M weights along the input dimension.", rich_help_panel=_PRUNE, show_default=False)] = None,
    structured: Annotated[bool, typer.Option("--structured", help="Remove whole channels / hidden units so tensors shrink (and run faster).", rich_help_panel=_PRUNE)] = False,
    importance: Annotated[str, typer.Option("--importance", help="Channel ranking for --structured: auto (activation with --data, else l1), l1, l2, activation.", rich_help_panel=_PRUNE)] = "auto",
    op_types: Annotated[list[str] | None, typer.Option("--op-types", help="Op types whose weights are pruned (repeatable or comma-separated; default MatMul,Gemm,Conv).", rich_help_panel=_PRUNE, show_default=False)] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Node name, op type or weight name to leave alone; globs allowed (repeatable).", rich_help_panel=_PRUNE, show_default=False)] = None,
    min_elements: Annotated[int, typer.Option("--min-elements", help="Leave weights with fewer elements alone.", rich_help_panel=_PRUNE)] = 1024,
    search: Annotated[bool | None, typer.Option("--search/--no-search", help="Per-layer sensitivity search under the fidelity gates (default: on when --max-error, --min-cosine or --min-agreement is given).", rich_help_panel=_PRUNE, show_default=False)] = None,
    sparse_storage: Annotated[bool, typer.Option("--sparse-storage", help="Store pruned tensors as ONNX sparse tensors where smaller (file size only).", rich_help_panel=_PRUNE)] = False,
    force: ForceOpt = False, external_data: ExternalDataOpt = None,
    data: DataOpt = None, input_shape: InputShapeOpt = None, input_value: InputValueOpt = None, seed: SeedOpt = 0, samples: SamplesOpt = None,
    max_error: MaxErrorOpt = None, min_cosine: MinCosineOpt = None, min_agreement: MinAgreementOpt = None,
    max_size_ratio: MaxSizeRatioOpt = None, min_speedup: MinSpeedupOpt = None,
    provider: ProviderOpt = "cpu", threads: ThreadsOpt = 1, latency: LatencyOpt = True, latency_runs: LatencyRunsOpt = None,
    json_: JsonOpt = False, report_file: ReportOpt = None, quiet: QuietOpt = False, verbose: VerboseOpt = 0,
) -> None:  # fmt: skip
    """Prune weights: zero the smallest (unstructured or N:M) or remove whole channels (--structured).

    Unstructured and N:M sparsity give no speed-up in onnxruntime (dense kernels); they show
    in the zlib-compressed size. --structured makes tensors smaller and faster.

    With no --sparsity or --pattern and no fidelity gate, prune takes the largest sparsity that
    keeps the fidelity floor (top-1 agreement >= 99% on class-like outputs, else cosine >= 0.99),
    found in a few trial runs, and the report says what it reached; if none keeps it, the model
    is left unchanged. An explicit amount is applied exactly as asked.

    Example: modelshrink prune model.onnx -o pruned.onnx --sparsity 0.6
    """
    flags = locals()

    config = lambda: PruneConfig(  # noqa: E731
        sparsity=sparsity, scope=scope, pattern=pattern, structured=structured, importance=importance,
        op_types=flag_list(op_types) or PRUNE_OP_TYPES,
        exclude=flag_list(exclude), min_elements=min_elements, sparse_storage=sparse_storage, search=search,
    )  # fmt: skip
    options = shared_options(flags)
    run_command("prune", techniques.TECHNIQUES["prune"], config, src, output, options, force=force, external_data=external_data,
                json_=json_, report_file=report_file, quiet=quiet, verbose=verbose)  # fmt: skip


_FACTORIZE = "Factorize"


@app.command()
def factorize(
    src: InputArg,
    output: OutputOpt,
    rank_ratio: Annotated[float | None, typer.Option("--rank-ratio", help="Rank r = ratio x min(m, n) per layer (one rule of three; with none and no fidelity gate, the smallest ranks that keep the fidelity floor are searched).", rich_help_panel=_FACTORIZE, show_default=False)] = None,
    energy: Annotated[float | None, typer.Option("--energy", help="Smallest rank keeping this share of the squared singular values.", rich_help_panel=_FACTORIZE, show_default=False)] = None,
    target_ratio: Annotated[float | None, typer.Option("--target-ratio", help="Model parameters at most this share of the original, ranks spread by least error per parameter saved.", rich_help_panel=_FACTORIZE, show_default=False)] = None,
    rank_multiple: Annotated[int, typer.Option("--rank-multiple", help="Round ranks up to a multiple of this.", rich_help_panel=_FACTORIZE)] = 8,
    min_saving: Annotated[float, typer.Option("--min-saving", help="Factorize a layer only if it saves at least this share of its parameters.", rich_help_panel=_FACTORIZE)] = 0.2,
    conv: Annotated[str, typer.Option("--conv", help="Conv split: channel (k x k to r channels, then 1 x 1) or spatial (k x 1, then 1 x k).", rich_help_panel=_FACTORIZE)] = "channel",
    method: Annotated[str, typer.Option("--method", help="auto (data-aware with --data), svd, or data (needs --data).", rich_help_panel=_FACTORIZE)] = "auto",
    op_types: Annotated[list[str] | None, typer.Option("--op-types", help="Op types to factorize, of MatMul, Gemm, Conv, Gather (repeatable or comma-separated; default MatMul,Gemm,Conv).", rich_help_panel=_FACTORIZE, show_default=False)] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Node name, op type or weight name to leave alone; globs allowed (repeatable).", rich_help_panel=_FACTORIZE, show_default=False)] = None,
    min_elements: Annotated[int, typer.Option("--min-elements", help="Leave weights with fewer elements alone.", rich_help_panel=_FACTORIZE)] = 1024,
    force: ForceOpt = False,
    external_data: ExternalDataOpt = None,
    data: DataOpt = None,
    input_shape: InputShapeOpt = None,
    input_value: InputValueOpt = None,
    seed: SeedOpt = 0,
    samples: SamplesOpt = None,
    max_error: MaxErrorOpt = None,
    min_cosine: MinCosineOpt = None,
    min_agreement: MinAgreementOpt = None,
    max_size_ratio: MaxSizeRatioOpt = None,
    min_speedup: MinSpeedupOpt = None,
    provider: ProviderOpt = "cpu",
    threads: ThreadsOpt = 1,
    latency: LatencyOpt = True,
    latency_runs: LatencyRunsOpt = None,
    json_: JsonOpt = False,
    report_file: ReportOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = 0,
) -> None:  # fmt: skip
    """Replace weight matrices by two thinner low-rank factors (truncated SVD; fitted to real activations with --data).

    A fidelity gate without a rank rule makes a sensitivity search pick the per-layer ranks.
    With neither, factorize takes the smallest ranks that keep the fidelity floor (top-1
    agreement >= 99% on class-like outputs, else cosine >= 0.99), found in a few trial runs, and
    the report says what it reached; if none keeps it, the model is left unchanged.

    Example: modelshrink factorize model.onnx -o small.onnx --rank-ratio 0.25 --data inputs.npz
    """
    flags = locals()
    run_command(
        "factorize",
        techniques.TECHNIQUES["factorize"],
        lambda: FactorizeConfig(
            rank_ratio=rank_ratio, energy=energy, target_ratio=target_ratio, rank_multiple=rank_multiple,
            min_saving=min_saving, conv=conv, method=method,  # type: ignore[arg-type]
            op_types=flag_list(op_types) or FACTORIZE_OP_TYPES, exclude=flag_list(exclude), min_elements=min_elements,
        ),
        src,
        output,
        shared_options(flags),
        force=force, external_data=external_data, json_=json_, report_file=report_file, quiet=quiet, verbose=verbose,
    )  # fmt: skip


_DISTILL = "Distillation"


def _distill_config(
    teacher: str,
    data: str | None,
    labels: str | None,
    input_shape: list[str] | None,
    matches: list[str] | None,
    **settings: Any,
) -> DistillConfig:
    """Load the teacher and the training data (the technique itself reads no files)."""
    return api.distill_config(
        teacher,
        data,
        labels=labels,
        input_shapes=parse_input_shapes(input_shape or []),
        matches=matches or (),
        **settings,
    )


@app.command()
def distill(
    src: InputArg,
    output: OutputOpt,
    teacher: Annotated[
        str,
        typer.Option(
            "--teacher", help="The teacher model (.onnx path).", rich_help_panel=_DISTILL, show_default=False
        ),
    ],
    loss: Annotated[
        str,
        typer.Option(
            "--loss", help="auto (KL for class scores, MSE otherwise), kl or mse.", rich_help_panel=_DISTILL
        ),
    ] = "auto",
    temperature: Annotated[
        float,
        typer.Option(
            "--temperature",
            help="Softening temperature of the KL loss (scaled by T²).",
            rich_help_panel=_DISTILL,
        ),
    ] = 2.0,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            help="Array in --data holding integer class labels (adds cross-entropy).",
            rich_help_panel=_DISTILL,
            show_default=False,
        ),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            "--alpha",
            help="Weight of the label loss, 0..1 (default 0.5 with --labels).",
            rich_help_panel=_DISTILL,
            show_default=False,
        ),
    ] = None,
    match: Annotated[
        list[str] | None,
        typer.Option(
            "--match",
            help="Feature matching STUDENT_TENSOR=TEACHER_TENSOR (repeatable).",
            rich_help_panel=_DISTILL,
            show_default=False,
        ),
    ] = None,
    optimizer: Annotated[
        str, typer.Option("--optimizer", help="adamw or sgd (with momentum).", rich_help_panel=_DISTILL)
    ] = "adamw",
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.", rich_help_panel=_DISTILL)] = 1e-3,
    weight_decay: Annotated[
        float,
        typer.Option("--weight-decay", help="Weight decay on matrices/kernels.", rich_help_panel=_DISTILL),
    ] = 0.01,
    momentum: Annotated[
        float, typer.Option("--momentum", help="SGD momentum.", rich_help_panel=_DISTILL)
    ] = 0.9,
    schedule: Annotated[
        str, typer.Option("--schedule", help="cosine or constant learning rate.", rich_help_panel=_DISTILL)
    ] = "cosine",
    epochs: Annotated[
        int, typer.Option("--epochs", help="Passes over the training rows.", rich_help_panel=_DISTILL)
    ] = 10,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Rows per training step.", rich_help_panel=_DISTILL)
    ] = 32,
    train: Annotated[
        str,
        typer.Option(
            "--train",
            help="'all' or a glob on weight names to train; the rest stays frozen.",
            rich_help_panel=_DISTILL,
        ),
    ] = "all",
    bn_mode: Annotated[
        str,
        typer.Option(
            "--bn-mode",
            help="BatchNormalization: frozen (running stats) or train (batch stats).",
            rich_help_panel=_DISTILL,
        ),
    ] = "frozen",
    val_split: Annotated[
        float,
        typer.Option(
            "--val-split", help="Share of rows held out to pick the best epoch.", rich_help_panel=_DISTILL
        ),
    ] = 0.1,
    patience: Annotated[
        int | None,
        typer.Option(
            "--patience",
            help="Stop after N epochs without a better validation score.",
            rich_help_panel=_DISTILL,
            show_default=False,
        ),
    ] = None,
    keep_zeros: Annotated[
        bool,
        typer.Option(
            "--keep-zeros/--no-keep-zeros",
            help="Weights that are exactly zero stay zero (pruned models stay pruned).",
            rich_help_panel=_DISTILL,
        ),
    ] = True,
    force: ForceOpt = False,
    external_data: ExternalDataOpt = None,
    data: DataOpt = None,
    input_shape: InputShapeOpt = None,
    input_value: InputValueOpt = None,
    seed: SeedOpt = 0,
    samples: SamplesOpt = None,
    max_error: MaxErrorOpt = None,
    min_cosine: MinCosineOpt = None,
    min_agreement: MinAgreementOpt = None,
    max_size_ratio: MaxSizeRatioOpt = None,
    min_speedup: MinSpeedupOpt = None,
    provider: ProviderOpt = "cpu",
    threads: ThreadsOpt = 1,
    latency: LatencyOpt = True,
    latency_runs: LatencyRunsOpt = None,
    json_: JsonOpt = False,
    report_file: ReportOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Train the student (SRC) to reproduce --teacher on --data; the training step runs on onnxruntime.

    Example: modelshrink distill pruned.onnx --teacher model.onnx --data train.npz -o recovered.onnx
    """
    flags = locals()
    settings = dict(
        loss=loss, temperature=temperature, alpha=alpha, optimizer=optimizer, lr=lr,
        weight_decay=weight_decay, momentum=momentum, schedule=schedule, epochs=epochs,
        batch_size=batch_size, train=train, bn_mode=bn_mode, val_split=val_split,
        patience=patience, keep_zeros=keep_zeros,
    )  # fmt: skip
    run_command(
        "distill", techniques.TECHNIQUES["distill"],
        lambda: _distill_config(teacher, data, labels, input_shape, match, **settings), src, output,
        shared_options(flags),
        force=force, external_data=external_data, json_=json_, report_file=report_file,
        quiet=quiet, verbose=verbose,
    )  # fmt: skip
