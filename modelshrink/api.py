"""The Python API: the same jobs as the CLI, without argv, terminals or exit codes.

    from modelshrink import quantize, QuantizeConfig, RunOptions
    report = quantize("model.onnx", "model.int8.onnx", QuantizeConfig(mode="int8"),
                      RunOptions(data="inputs.npz", latency=False))
    print(report.passed, report.ratios()["size"])

Every function returns the :class:`~modelshrink.report.Report` (``report.written`` says
whether the output was written: not when a gate failed) and raises
:class:`~modelshrink.errors.ModelshrinkError` subclasses for bad input, data or flags.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from modelshrink import io
from modelshrink.errors import ConfigError
from modelshrink.feeds import load_feeds
from modelshrink.inspection import InspectReport, inspect_model
from modelshrink.io.targets import plan_writes
from modelshrink.pipeline import RunOptions, run_technique
from modelshrink.pipeline import compare as _compare
from modelshrink.report import Report
from modelshrink.techniques import TECHNIQUES, DistillConfig, FactorizeConfig, PruneConfig, QuantizeConfig
from modelshrink.techniques.base import Progress, silent_progress
from modelshrink.techniques.distill import Teacher, read_labels, training_data_from_feeds
from modelshrink.techniques.quantize import QatSettings

__all__ = [
    "compare",
    "distill",
    "distill_config",
    "factorize",
    "inspect",
    "prune",
    "qat_settings",
    "quantize",
]


def _run(
    name: str,
    config: Any,
    src: str,
    output: str,
    options: RunOptions | None,
    force: bool,
    external_data: bool | None,
    progress: Progress,
    report: str | os.PathLike[str] | None,
) -> Report:
    return run_technique(
        name,
        TECHNIQUES[name],
        config,
        src,
        output,
        options or RunOptions(),
        force=force,
        external_data=external_data,
        progress=progress,
        report=report,
    )


def quantize(
    src: str,
    output: str,
    config: QuantizeConfig | None = None,
    options: RunOptions | None = None,
    *,
    force: bool = False,
    external_data: bool | None = None,
    progress: Progress = silent_progress,
    report: str | os.PathLike[str] | None = None,
) -> Report:
    """``modelshrink quantize``: see :class:`QuantizeConfig`."""
    return _run(
        "quantize", config or QuantizeConfig(), src, output, options, force, external_data, progress, report
    )


def qat_settings(
    src: str,
    data: str | None,
    *,
    teacher: str | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    **training: Any,
) -> QatSettings:
    """Load the teacher and every row of ``data`` into :class:`QatSettings` for ``--qat``.

    ``data`` is read against the teacher's inputs, or the model's (``src``) when no teacher is
    given (then the input model is its own teacher). ``training`` are the other QatSettings
    fields (``epochs``, ``lr``, ``batch_size``).

    Raises:
        ConfigError: No data, or the model on stdin without a teacher.
    """
    if data is None:
        raise ConfigError(
            "--qat needs --data: the quantized model is trained to copy the float model on these "
            "inputs, so they must be representative of what the model will see"
        )
    if teacher == io.STDIO:
        raise ConfigError("--teacher must be a path (stdin is for the model, if anything)")
    if teacher is None and src == io.STDIO:
        raise ConfigError(
            "--qat with the model on stdin needs --teacher PATH (the float model to copy): stdin "
            "cannot be read twice"
        )
    loaded = io.load_model(teacher if teacher is not None else src)
    feeds = load_feeds(loaded.model, data=data, input_shapes=input_shapes, samples=1 << 62)
    return QatSettings(
        data=training_data_from_feeds(feeds),
        teacher=Teacher(loaded.model, loaded.label) if teacher is not None else None,
        **training,
    )


def prune(
    src: str,
    output: str,
    config: PruneConfig | None = None,
    options: RunOptions | None = None,
    *,
    force: bool = False,
    external_data: bool | None = None,
    progress: Progress = silent_progress,
    report: str | os.PathLike[str] | None = None,
) -> Report:
    """``modelshrink prune``: see :class:`PruneConfig`."""
    return _run(
        "prune", config or PruneConfig(), src, output, options, force, external_data, progress, report
    )


def factorize(
    src: str,
    output: str,
    config: FactorizeConfig | None = None,
    options: RunOptions | None = None,
    *,
    force: bool = False,
    external_data: bool | None = None,
    progress: Progress = silent_progress,
    report: str | os.PathLike[str] | None = None,
) -> Report:
    """``modelshrink factorize``: see :class:`FactorizeConfig`."""
    return _run(
        "factorize", config or FactorizeConfig(), src, output, options, force, external_data, progress, report
    )


def distill_config(
    teacher: str,
    data: str | None,
    *,
    labels: str | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    matches: Sequence[str] = (),
    **settings: Any,
) -> DistillConfig:
    """Load the teacher and all training rows of ``data`` into a :class:`DistillConfig`.

    ``settings`` are the remaining DistillConfig fields (``epochs``, ``lr``, ``loss``, ...);
    ``matches`` are ``STUDENT_TENSOR=TEACHER_TENSOR`` strings.

    Raises:
        ConfigError: No data, the teacher from stdin, or a malformed match.
    """
    if data is None:
        raise ConfigError(
            "distill needs --data: the student learns to copy the teacher on these inputs, so "
            "they must be representative of what the model will see; random inputs would "
            "teach it nothing useful"
        )
    if teacher == io.STDIO:
        raise ConfigError("--teacher must be a path (stdin is for the student, if anything)")
    loaded = io.load_model(teacher)
    feeds = load_feeds(loaded.model, data=data, input_shapes=input_shapes, samples=1 << 62)
    label_array = read_labels(data, labels) if labels else None
    pairs = []
    for item in matches:
        student_tensor, sep, teacher_tensor = item.partition("=")
        if not sep or not student_tensor or not teacher_tensor:
            raise ConfigError(f"--match '{item}': expected STUDENT_TENSOR=TEACHER_TENSOR")
        pairs.append((student_tensor, teacher_tensor))
    return DistillConfig(
        teacher=Teacher(loaded.model, loaded.label),
        data=training_data_from_feeds(feeds, labels=label_array, labels_name=labels),
        matches=tuple(pairs),
        **settings,
    )


def distill(
    src: str,
    output: str,
    config: DistillConfig,
    options: RunOptions | None = None,
    *,
    force: bool = False,
    external_data: bool | None = None,
    progress: Progress = silent_progress,
    report: str | os.PathLike[str] | None = None,
) -> Report:
    """``modelshrink distill``: build ``config`` with :func:`distill_config`."""
    return _run("distill", config, src, output, options, force, external_data, progress, report)


def compare(
    original: str,
    candidate: str,
    options: RunOptions | None = None,
    *,
    report: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Report:
    """``modelshrink compare``; ``report`` also writes the JSON report there."""
    return _compare(original, candidate, options or RunOptions(), report=report, force=force)


def inspect(
    model: str, *, report: str | os.PathLike[str] | None = None, force: bool = False
) -> InspectReport:
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
