"""The command line: flags -> config -> :mod:`modelshrink.api` -> report -> exit code.

The only layer that knows argv, terminals and exit codes, and a thin skin over the API. No
flag is declared here: a technique's flags are the fields of its config (declared with
:func:`modelshrink.flags.flag`), the shared ones are the fields of :class:`RunOptions` (with
its gates and runtime), :class:`Outputs` and :class:`Reporting`. One command per entry of the
technique registry is derived from them, plus ``inspect`` and ``compare``.

stdout carries exactly one thing: model bytes (``-o -``) or the JSON report (``--json``);
people-facing output goes to stderr. Importing this module (and ``--help``, ``--version``,
any command's ``--help``) loads neither onnx, onnxruntime, onnx-ir nor numpy: the API is
imported when a command runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect as pyinspect
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup
from typer.exceptions import Abort, TyperException

from modelshrink._version import __version__
from modelshrink.auto.config import AutoConfig
from modelshrink.errors import EXIT_GATE, ConfigError, ModelshrinkError
from modelshrink.flags import FLAG, Flag, comma_list, field_type, flag
from modelshrink.options import RunOptions
from modelshrink.signals import Interrupted, caught_signal, exit_interrupted
from modelshrink.techniques import TECHNIQUES
from modelshrink.techniques.spec import TechniqueSpec

if TYPE_CHECKING:
    from modelshrink.report import Report
    from modelshrink.techniques.base import Progress as ProgressSink

__all__ = ["Outputs", "Reporting", "add_technique", "app", "build", "command", "options_of"]

EXIT_CODES_HELP = (
    "Exit codes: 0 ok · 1 the model or data is bad or unsupported, or writing failed · "
    "2 usage error, or an output path refused before any work · 3 a quality gate failed (no model "
    "written) · 130/143 interrupted (SIGINT/SIGTERM). Set MODELSHRINK_DEBUG=1 to see tracebacks."
)
DOCS = "docs/{name}.md"
_OUTPUT_PANEL = "Output"
_REPORT_PANEL = "Report"


class _Unwound(BaseException):
    """An interrupt carried past Typer, which turns KeyboardInterrupt into a silent exit 130."""

    def __init__(self, interrupt: KeyboardInterrupt) -> None:
        super().__init__()
        self.interrupt = interrupt


class _Group(TyperGroup):
    """Click group whose usage errors are one line on stderr: ``error: ... (see --help)``.

    An interrupt (Ctrl-C, or SIGTERM through :mod:`modelshrink.signals`) ends in one line and
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
            # Typer words a bad Literal choice "Value error, 'x' is not one of ...": drop the noise.
            message = exc.format_message().replace("Value error, ", "")
            typer.echo(f"error: {message}{hint}", err=True)
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


# --- the shared flag bundles ----------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    """Where a compression command writes its model."""

    output: str = flag(help="Output path, or '-' for stdout.", names=("-o", "--output"), show_default=False)
    external_data: bool | None = flag(
        None,
        "Store tensors in OUTPUT.data next to the model (default: when the input did, or over 2 GB).",
        negative="--no-external-data",
        panel=_OUTPUT_PANEL,
        show_default=False,
    )


@dataclass(frozen=True)
class Reporting:
    """How a command reports, and whether it may replace files it writes."""

    json: bool = flag(False, "Print the JSON report on stdout.", panel=_REPORT_PANEL)
    report: str | None = flag(
        None,
        "Also write the JSON report to this file ('-' for stdout); --force to replace one.",
        panel=_REPORT_PANEL,
        show_default=False,
    )
    force: bool = flag(
        False,
        "Overwrite existing files: the output, its external data, the --report file.",
        panel=_OUTPUT_PANEL,
    )
    quiet: bool = flag(False, "No table or progress on stderr.", names=("-q", "--quiet"), panel=_REPORT_PANEL)
    verbose: int = flag(
        0, "More logging (-vv for debug).", names=("-v", "--verbose"), count=True, panel=_REPORT_PANEL
    )


# --- from dataclass fields to Typer parameters, and back -----------------------------------


def _is_text_list(kind: Any) -> bool:
    """``tuple[str, ...]`` or ``tuple[str, ...] | None``: a repeatable, comma-separable flag."""
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        return any(_is_text_list(arg) for arg in typing.get_args(kind) if arg is not type(None))
    return typing.get_origin(kind) is tuple


def _nested(f: dataclasses.Field[Any]) -> type | None:
    """A field holding another bundle of flags (``RunOptions.gates``, ``.runtime``)."""
    factory = f.default_factory
    if isinstance(factory, type) and dataclasses.is_dataclass(factory):
        return factory
    return None


def _option(cls: type, f: dataclasses.Field[Any], meta: Flag) -> pyinspect.Parameter:
    kind = field_type(cls, f)
    names = meta.names or ("--" + f.name.replace("_", "-"),)
    if meta.negative is not None:
        names = (f"{names[0]}/{meta.negative}", *names[1:])
    listed = meta.parse is not None or _is_text_list(kind)
    option = typer.Option(
        *names,
        help=meta.help,
        rich_help_panel=meta.panel,
        show_default=meta.show_default,
        metavar=meta.metavar,
        count=meta.count,
    )
    default: Any
    if listed:
        kind, default = list[str] | None, None  # turned into the field's value by _value()
    elif f.default is not dataclasses.MISSING:
        default = f.default
    else:
        default = pyinspect.Parameter.empty  # a required flag
    return pyinspect.Parameter(
        f.name, pyinspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
    )


def options_of(cls: type) -> list[pyinspect.Parameter]:
    """Typer parameters for every flag field of ``cls`` and of the bundles it nests."""
    params = []
    for f in dataclasses.fields(cls):
        nested = _nested(f)
        meta = f.metadata.get(FLAG)
        if nested is not None and meta is None:
            params += options_of(nested)
        elif isinstance(meta, Flag):
            params.append(_option(cls, f, meta))
    return params


def _value(cls: type, f: dataclasses.Field[Any], meta: Flag, given: Any) -> Any:
    if meta.parse is not None:
        return meta.parse(given)
    if _is_text_list(field_type(cls, f)):
        return comma_list(given)
    return given


def build(cls: type, values: dict[str, Any]) -> Any:
    """An instance of ``cls`` from parsed flag values (repeatable flags not given keep defaults)."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        nested = _nested(f)
        meta = f.metadata.get(FLAG)
        if nested is not None and meta is None:
            kwargs[f.name] = build(nested, values)
        elif isinstance(meta, Flag) and f.name in values:
            given = values[f.name]
            listed = meta.parse is not None or _is_text_list(field_type(cls, f))
            if listed and not given:  # a repeatable flag not given (None, or an empty list)
                continue
            kwargs[f.name] = _value(cls, f, meta, given)
    return cls(**kwargs)


def _help(summary: str, body: str, examples: Sequence[str], docs: str | None) -> str:
    parts = [summary.strip(), body.strip()]
    parts += [f"Example: {e}" for e in examples]
    if docs:
        parts.append(f"Docs: {docs}")
    return "\n\n".join(p for p in parts if p)


def command(
    target: typer.Typer,
    name: str,
    help_text: str,
    arguments: Sequence[pyinspect.Parameter],
    bundles: Sequence[type],
    body: Callable[[dict[str, Any]], None],
) -> None:
    """Register on ``target`` a command whose options are the flag fields of ``bundles``.

    Raises:
        AssertionError: Two bundles declare the same flag (a programming error).
    """
    params = [*arguments]
    for bundle in bundles:
        params += options_of(bundle)
    names = [p.name for p in params]
    clashes = {n for n in names if names.count(n) > 1}
    assert not clashes, f"command {name}: flags declared twice: {sorted(clashes)}"

    def callback(**values: Any) -> None:
        body(values)

    callback.__dict__["__signature__"] = pyinspect.Signature(params)  # what Typer reads the options from
    callback.__doc__ = help_text
    target.command(name)(callback)


def _argument(name: str, help_text: str) -> pyinspect.Parameter:
    return pyinspect.Parameter(
        name,
        pyinspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[str, typer.Argument(help=help_text, show_default=False)],
    )


MODEL_ARG = "Input .onnx path, or '-' for stdin."


# --- plumbing -------------------------------------------------------------------------------


def _setup_logging(verbose: int, quiet: bool) -> None:
    from rich.logging import RichHandler

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
    # onnxruntime's own log level follows (modelshrink.runtime reads it when it is imported).
    os.environ["MODELSHRINK_ORT_LOG_SEVERITY"] = "1" if verbose >= 2 else "4"
    if "onnxruntime" in sys.modules:
        sys.modules["onnxruntime"].set_default_logger_severity(1 if verbose >= 2 else 4)


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
        from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

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


def _silent(description: str, done: int, total: int) -> None:
    """A progress sink that shows nothing."""


@contextlib.contextmanager
def progress_sink(quiet: bool) -> Iterator[ProgressSink]:
    """Rich bars when stderr is a terminal and not quiet; otherwise silent."""
    if quiet or not err_console.is_terminal:
        yield _silent
        return
    with _RichProgress() as bars:
        yield bars


def finish(report: Report, *, json_: bool, quiet: bool) -> None:
    """Render, emit JSON, and exit 3 when a gate failed (the report file is already written)."""
    from modelshrink.report import render_report

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
    if output == "-" and json_:
        raise ConfigError("-o - and --json both want stdout; use --report FILE for the JSON report")


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


def _inspect(values: dict[str, Any]) -> None:
    reporting: Reporting = build(Reporting, values)
    _setup_logging(reporting.verbose, reporting.quiet)
    with user_errors():
        from modelshrink import api, io
        from modelshrink.inspection import render_inspect

        io.plan_writes(
            report=reporting.report,
            reads=io.files_read(values["model"]),
            force=reporting.force,
            json_stdout=reporting.json,
        )
        result = api.inspect(values["model"], report=reporting.report, force=reporting.force)
        if not reporting.quiet:
            render_inspect(result, err_console)
        if reporting.json:
            sys.stdout.write(result.to_json())


def _compare(values: dict[str, Any]) -> None:
    reporting: Reporting = build(Reporting, values)
    _setup_logging(reporting.verbose, reporting.quiet)
    with user_errors():
        options: RunOptions = build(RunOptions, values)
        from modelshrink import api, io

        io.plan_writes(
            report=reporting.report,
            reads=(*io.files_read(values["original"], values["candidate"]), options.data),
            force=reporting.force,
            json_stdout=reporting.json,
        )
        with progress_sink(reporting.quiet) as progress:
            report = api.compare(
                values["original"],
                values["candidate"],
                options,
                progress=progress,
                report=reporting.report,
                force=reporting.force,
            )
        finish(report, json_=reporting.json, quiet=reporting.quiet)


def add_technique(target: typer.Typer, spec: TechniqueSpec) -> None:
    """Register the command of a technique: its config's flags and the shared bundles."""
    summary, _, body = spec.help.strip().partition("\n")
    command(
        target,
        spec.name,
        _help(summary, body, spec.examples, DOCS.format(name=spec.name)),
        [_argument("src", MODEL_ARG)],
        [Outputs, spec.config, RunOptions, Reporting],
        _technique(spec),
    )


@contextlib.contextmanager
def _writing_command(values: dict[str, Any]) -> Iterator[tuple[Reporting, Outputs, RunOptions]]:
    """The shared bundles of a command that writes a model, built from the parsed ``values``;
    the block runs under :func:`user_errors`."""
    reporting: Reporting = build(Reporting, values)
    _setup_logging(reporting.verbose, reporting.quiet)
    with user_errors():
        outputs: Outputs = build(Outputs, values)
        _check_stdout(outputs.output, reporting.json)
        options: RunOptions = build(RunOptions, values)
        yield reporting, outputs, options


def _planned_run(
    values: dict[str, Any],
    outputs: Outputs,
    options: RunOptions,
    reporting: Reporting,
    run: Callable[..., Report],
    files: Mapping[str, str | None] | None = None,
) -> Report:
    """Check every path the command writes before anything is read (a teacher or --data too;
    the pipeline checks again once it knows the files it reads), then call
    ``run(src, output, **shared)`` with the shared keyword arguments, under a progress bar."""
    from modelshrink import io

    io.plan_writes(
        output=outputs.output,
        report=reporting.report,
        reads=(*io.files_read(values["src"]), options.data),
        force=reporting.force,
        external_data=outputs.external_data,
        json_stdout=reporting.json,
        files=files,
    )
    with progress_sink(reporting.quiet) as progress:
        return run(
            values["src"],
            outputs.output,
            force=reporting.force,
            external_data=outputs.external_data,
            progress=progress,
            report=reporting.report,
        )


def _technique(spec: TechniqueSpec) -> Callable[[dict[str, Any]], None]:
    def run(values: dict[str, Any]) -> None:
        with _writing_command(values) as (reporting, outputs, options):
            config = build(spec.config, values)
            from modelshrink import api

            report = _planned_run(
                values,
                outputs,
                options,
                reporting,
                lambda src, out, **shared: api.run(spec, src, out, config, options, **shared),
            )
            finish(report, json_=reporting.json, quiet=reporting.quiet)

    return run


command(
    app,
    "inspect",
    _help(
        "Show what is in a model: I/O, ops, weights and where they live, what each technique can act on.",
        "Reads only headers: weights in external data are never read.",
        ["modelshrink inspect sample_models/digits_cnn.onnx", "modelshrink inspect model.onnx --json"],
        DOCS.format(name="inspect"),
    ),
    [_argument("model", MODEL_ARG)],
    [Reporting],
    _inspect,
)
command(
    app,
    "compare",
    _help(
        "Report size, latency and output fidelity of CANDIDATE against ORIGINAL; gate on them.",
        "Use it to judge a model compressed by another tool, or to gate a CI step.",
        [
            "modelshrink compare model.onnx model.int8.onnx --data inputs.npz",
            "modelshrink compare model.onnx model.int8.onnx --max-error 0.05 --json > report.json",
        ],
        DOCS.format(name="compare"),
    ),
    [
        _argument("original", "Original .onnx path, or '-' for stdin."),
        _argument("candidate", "Candidate .onnx path, or '-' for stdin."),
    ],
    [RunOptions, Reporting],
    _compare,
)
for _spec in TECHNIQUES.values():
    add_technique(app, _spec)


def _auto(values: dict[str, Any]) -> None:
    with _writing_command(values) as (reporting, outputs, options):
        config: AutoConfig = build(AutoConfig, values)
        from modelshrink.auto import auto
        from modelshrink.auto.render import render_candidates

        report = _planned_run(
            values,
            outputs,
            options,
            reporting,
            lambda src, out, **shared: auto(src, out, config, options, **shared),
            files={"--plot": config.plot},
        )
        if not reporting.quiet:
            render_candidates(report, err_console)
        finish(report, json_=reporting.json, quiet=reporting.quiet)


command(
    app,
    "auto",
    _help(
        "Search every technique for the smallest (or fastest) model that passes your gates.",
        "Quantization modes, pruning, factorization, distillation and their chains are tried cheapest "
        "first, each scored against the original on samples of --data held out from every technique; "
        "the best that passes every gate is written, with a table of every candidate and the commands "
        "that reproduce it. Without a fidelity gate, the fidelity floor applies.",
        [
            "modelshrink auto sample_models/digits_cnn.onnx -o small.onnx --data sample_models/digits_cnn.npz",
            "modelshrink auto model.onnx -o fast.onnx --data inputs.npz --goal latency --min-agreement 0.99",
            "modelshrink auto model.onnx -o small.onnx --time-budget 2m --plot pareto.png",
        ],
        DOCS.format(name="auto"),
    ),
    [_argument("src", MODEL_ARG)],
    [Outputs, AutoConfig, RunOptions, Reporting],
    _auto,
)
