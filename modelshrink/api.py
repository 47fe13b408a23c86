"""The Python API, and the one front door: every command, CLI or not, runs through here.

    from modelshrink import quantize, QuantizeConfig, RunOptions
    report = quantize("model.onnx", "model.int8.onnx", QuantizeConfig(mode="int8"),
                      RunOptions(data="inputs.npz", latency=False))
    print(report.passed, report.ratios()["size"])

:func:`run` runs any registered technique by name (the CLI calls it for every compression
command); :func:`quantize`, :func:`prune`, :func:`factorize` and :func:`distill` are the same
with their config's type spelled out, and ``modelshrink.api.<name>`` exists for every technique
in the registry. Files a config names (a teacher, the training rows of ``--data``) are loaded
here, after every output path was checked and before the run.

Every function returns the :class:`~modelshrink.report.Report` (``report.written`` says
whether the output was written: not when a gate failed) and raises
:class:`~modelshrink.errors.ModelshrinkError` subclasses for bad input, data or flags.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from modelshrink import io
from modelshrink.errors import ConfigError
from modelshrink.inspection import InspectReport, inspect_model
from modelshrink.io.targets import plan_writes
from modelshrink.options import RunOptions
from modelshrink.report import Report
from modelshrink.techniques import TECHNIQUES, DistillConfig, FactorizeConfig, PruneConfig, QuantizeConfig
from modelshrink.techniques.base import Progress, silent_progress
from modelshrink.techniques.spec import TechniqueSpec

__all__ = ["RunFunction", "compare", "distill", "factorize", "inspect", "prune", "quantize", "run"]

PathLike = str | os.PathLike[str]


def _spec(name: str | TechniqueSpec) -> TechniqueSpec:
    if not isinstance(name, str):
        return name
    spec = TECHNIQUES.get(name)
    if spec is None:
        raise ConfigError(f"no technique named '{name}' (there are: {', '.join(TECHNIQUES)})")
    return spec


def run(
    name: str | TechniqueSpec,
    src: str,
    output: str,
    config: Any = None,
    options: RunOptions | None = None,
    *,
    force: bool = False,
    external_data: bool | None = None,
    progress: Progress = silent_progress,
    report: PathLike | None = None,
) -> Report:
    """Run technique ``name`` on ``src`` and write ``output`` if every check and gate passes.

    Args:
        name: A key of :data:`modelshrink.techniques.TECHNIQUES` (``quantize``, ``prune``, ...),
            or a technique's spec (one not in the registry, e.g. a plug-in or a test's).
        src: The input model path, or ``-`` for stdin.
        output: The output path, or ``-`` for stdout.
        config: The technique's config (None: its defaults, where it has them).
        options: Data, gates, runtime and latency (:class:`RunOptions`).
        force: Replace existing output files.
        external_data: Write tensors to ``OUTPUT.data`` (None: like the input, or when needed).
        progress: Progress sink.
        report: Also write the JSON report to this file (``-`` for stdout).

    Raises:
        ConfigError: An unknown technique, a config of another type, contradictory flags.
        TargetError: An output path is refused (before any work).
        ModelshrinkError: Bad input, data or model.
    """
    spec = _spec(name)
    if config is None:
        config = spec.config()
    if not isinstance(config, spec.config):
        raise ConfigError(f"{spec.name} takes a {spec.config.__name__}, got {type(config).__name__}")
    from modelshrink.pipeline import run_technique  # onnxruntime: not loaded for inspect

    options = options or RunOptions()
    prepare = spec.preparer()
    if prepare is not None:
        # Loading a teacher or --data takes time: every path written is checked first.
        plan_writes(
            output=output,
            report=report,
            reads=(*io.files_read(src), options.data),
            force=force,
            external_data=external_data,
        )
        config = prepare(config, src, options)
    return run_technique(
        spec.name,
        spec.technique(),
        config,
        src,
        output,
        options,
        force=force,
        external_data=external_data,
        progress=progress,
        report=report,
    )


C = TypeVar("C", contravariant=True)


class RunFunction(Protocol[C]):
    """:func:`run` bound to one technique, with that technique's config type."""

    def __call__(
        self,
        src: str,
        output: str,
        config: C | None = None,
        options: RunOptions | None = None,
        *,
        force: bool = False,
        external_data: bool | None = None,
        progress: Progress = silent_progress,
        report: PathLike | None = None,
    ) -> Report: ...


def _bound(name: str, config: type[C]) -> RunFunction[C]:
    bound = functools.partial(run, name)
    functools.update_wrapper(bound, run)
    bound.__doc__ = f"``modelshrink {name}``: :func:`run` with a :class:`{config.__name__}` (see its fields)."
    return bound


quantize = _bound("quantize", QuantizeConfig)  # --qat loads options.data and config.teacher
prune = _bound("prune", PruneConfig)
factorize = _bound("factorize", FactorizeConfig)
distill = _bound("distill", DistillConfig)  # config.teacher is a path; options.data the training rows


def compare(
    original: str,
    candidate: str,
    options: RunOptions | None = None,
    *,
    progress: Progress = silent_progress,
    report: PathLike | None = None,
    force: bool = False,
) -> Report:
    """``modelshrink compare``; ``report`` also writes the JSON report there."""
    from modelshrink.pipeline import compare as _compare  # onnxruntime: not loaded for inspect

    return _compare(
        original, candidate, options or RunOptions(), progress=progress, report=report, force=force
    )


def inspect(model: str, *, report: PathLike | None = None, force: bool = False) -> InspectReport:
    """``modelshrink inspect``; ``report`` also writes the JSON report there.

    Raises:
        TargetError: The report path is refused (checked before the model is read).
        ModelshrinkError: The model cannot be read.
    """
    plan_writes(report=report, reads=io.files_read(model), force=force)
    loaded = io.load_model(model)
    plan = plan_writes(report=report, reads=io.files_read(loaded), force=force)
    result = inspect_model(loaded)
    if plan.report is not None:
        io.commit(None, io.stage_report(plan.report, result.to_json()))
    return result


def __getattr__(name: str) -> Callable[..., Report]:
    """``modelshrink.api.<technique>`` for every registered technique (e.g. one added later)."""
    if name in TECHNIQUES:
        return functools.partial(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
