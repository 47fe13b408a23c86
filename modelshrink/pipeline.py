"""load -> technique -> stage -> check -> verify -> measure -> gate -> commit -> Report.

Every command goes through here, so report, gates, atomic output and pipelines behave the
same everywhere. Nothing is written unless the candidate passes the ONNX checker, loads in
onnxruntime, and passes every gate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from modelshrink import io
from modelshrink.errors import ConfigError, ModelshrinkError, UnsupportedModelError
from modelshrink.feeds import Feed, Feeds, load_feeds
from modelshrink.gates import GateResult, Gates, floor_gates
from modelshrink.graph import FLOAT32_TINY, flush_subnormals
from modelshrink.io.targets import plan_writes
from modelshrink.measure import ModelStats, measure_latency, model_stats
from modelshrink.options import RunOptions
from modelshrink.report import LatencyComparison, Report
from modelshrink.runtime import RuntimeOptions, Session
from modelshrink.sessions import session_for_model
from modelshrink.techniques.base import (
    Progress,
    Technique,
    TechniqueContext,
    TechniqueResult,
    silent_progress,
)
from modelshrink.verdict import Verdict, judge
from modelshrink.verify import Fidelity, Reference

__all__ = [
    "CandidateError",
    "RunOptions",
    "compare",
    "run_technique",
]

logger = logging.getLogger(__name__)


class CandidateError(ModelshrinkError):
    """A technique produced a model that fails the checker or onnxruntime: a bug to report."""


def feeds_for(options: RunOptions, model: ir.Model, session: Session | None = None) -> Feeds:
    """The feeds ``options`` describe for ``model`` (real data or synthetic).

    With the original's ``session``, guessed synthetic sizes and values are tried on it until
    it runs (see :mod:`modelshrink.inputs`).
    """
    probe = None
    if session is not None:
        names = session.output_names

        def probe(feed: Feed) -> dict[str, np.ndarray]:
            return dict(zip(names, session.run(feed), strict=True))

    return load_feeds(
        model,
        data=options.data,
        input_shapes=options.input_shapes,
        input_values=options.input_values,
        batch_axes=options.batch_axes,
        seed=options.seed,
        samples=options.samples,
        probe=probe,
        rows=options.rows,
    )


class _Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0

    def done(self) -> dict[str, float]:
        return {
            **{k: round(v, 4) for k, v in self.phases.items()},
            "total": round(time.perf_counter() - self.start, 4),
        }


def _original_session(loaded: io.LoadedModel, runtime: RuntimeOptions) -> Session:
    source: Path | bytes = loaded.path if loaded.path is not None else (loaded.raw or b"")
    return Session(source, runtime, label=loaded.label)


def _progress_fn(progress: Progress, description: str) -> Any:
    def update(done: int, total: int) -> None:
        progress(description, done, total)

    return update


def _latency(
    original: Session,
    candidate: Session,
    feeds: Feeds,
    options: RunOptions,
    progress: Progress,
) -> LatencyComparison:
    feed = feeds.samples[0]
    stats = measure_latency(
        [original, candidate],
        feed,
        runs=options.latency_runs,
        budget_s=options.latency_budget_s,
        on_progress=_progress_fn(progress, "measuring latency"),
    )
    return LatencyComparison(
        provider=options.runtime.provider_name,
        threads=options.runtime.threads,
        feed_shapes={k: [int(d) for d in np.shape(v)] for k, v in feed.items()},
        original=stats[0],
        result=stats[1],
    )


def _check_agreement_gate(gates: Gates, fidelity: Fidelity) -> None:
    if gates.min_agreement is not None and fidelity.top1_agreement is None:
        names = ", ".join(o.name for o in fidelity.outputs)
        raise ConfigError(
            f"--min-agreement: no output looks like class scores (outputs: {names}); "
            "use --max-error or --min-cosine"
        )


def _gate_results(
    options: RunOptions, fidelity: Fidelity, stats_ratio: float | None, latency: LatencyComparison | None
) -> tuple[GateResult, ...]:
    _check_agreement_gate(options.gates, fidelity)
    return tuple(
        options.gates.check(
            max_error=fidelity.max_abs_error,
            cosine=fidelity.cosine,
            agreement=fidelity.top1_agreement,
            size_ratio=stats_ratio,
            speedup=latency.speedup if latency else None,
        )
    )


def compare(
    original_src: str,
    candidate_src: str,
    options: RunOptions,
    *,
    progress: Progress = silent_progress,
    report: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Report:
    """The full report between two models on the same feeds.

    Args:
        original_src: The original model (path or ``-``).
        candidate_src: The candidate model (path or ``-``).
        options: Feeds, gates, runtime and latency settings.
        progress: Progress sink.
        report: Also write the JSON report to this file (``-`` for stdout).
        force: Replace an existing report file.

    Raises:
        ConfigError: Both models from stdin, or contradictory flags.
        TargetError: The report path is refused (checked before anything is read).
        ModelshrinkError: Unreadable models/data, or models that cannot be compared.
    """
    if original_src == io.STDIO and candidate_src == io.STDIO:
        raise ConfigError("only one of ORIGINAL and CANDIDATE can be '-' (stdin)")
    plan_writes(report=report, reads=(*io.files_read(original_src, candidate_src), options.data), force=force)
    timer = _Timer()
    with timer.phase("load"):
        original = io.load_model(original_src)
        candidate = io.load_model(candidate_src)
    plan = plan_writes(report=report, reads=(*io.files_read(original, candidate), options.data), force=force)
    with timer.phase("feeds"):
        orig_session: Session | None = _original_session(original, options.runtime)
        assert orig_session is not None
        feeds = feeds_for(options, original.model, orig_session)
    with timer.phase("verify"):
        reference = Reference(orig_session, feeds, original.model, _progress_fn(progress, "running original"))
        if not options.latency:  # one model's session in memory at a time (2x the size otherwise)
            reference.release_session()
            orig_session = None
        cand_session = _original_session(candidate, options.runtime)
        fidelity = reference.compare(cand_session, _progress_fn(progress, "running candidate"))
    with timer.phase("measure"):
        orig_stats = model_stats(
            original.model, source=original.label, files=original.files(), raw=original.raw
        )
        cand_stats = model_stats(
            candidate.model, source=candidate.label, files=candidate.files(), raw=candidate.raw
        )
    latency = None
    if options.latency:
        assert orig_session is not None
        with timer.phase("latency"):
            latency = _latency(orig_session, cand_session, feeds, options, progress)
    size_ratio = cand_stats.size_bytes / orig_stats.size_bytes if orig_stats.size_bytes else None
    gates = _gate_results(options, fidelity, size_ratio, latency)
    result = Report(
        verdict=_verdict(fidelity, (orig_stats, cand_stats), latency, feeds),
        inputs=feeds.inputs,
        probes=feeds.probes,
        command="compare",
        original=orig_stats,
        result=cand_stats,
        fidelity=fidelity,
        latency=latency,
        latency_skipped=None if options.latency else "--no-latency",
        gates=gates,
        warnings=feeds.warnings,
        settings=options.settings(),
        timings_s=timer.done(),
    )
    if plan.report is not None:
        io.commit(None, io.stage_report(plan.report, result.to_json()))
    return result


def run_technique(
    command: str,
    technique: Technique,
    config: Any,
    source: str,
    output: str,
    options: RunOptions,
    *,
    force: bool = False,
    external_data: bool | None = None,
    progress: Progress = silent_progress,
    report: str | os.PathLike[str] | None = None,
) -> Report:
    """Run one technique end to end and write the result only if everything passes.

    Every path written (the model, its external data, ``report``) is checked before the model
    is read, and again once its external data is known; the model and the report are then put
    in place together at the end (the report also when a gate failed).

    Returns:
        The report; ``report.written`` says whether the output was written (it is not when
        a gate failed: the caller turns that into exit code 3).

    Raises:
        TargetError: An output path is refused (exit code 2), before any work.
        ModelshrinkError: Bad input, data, flags or output location; or a candidate that
            fails the checker/onnxruntime (:class:`CandidateError`).
    """
    timer = _Timer()
    also_read = _files_read(config, options)
    plan_writes(
        output=output,
        report=report,
        reads=(*io.files_read(source), *also_read),
        force=force,
        external_data=external_data,
    )
    with timer.phase("load"):
        loaded = io.load_model(source)
    plan = plan_writes(
        output=output,
        report=report,
        reads=(*io.files_read(loaded), *also_read),
        force=force,
        external_data=external_data,
        input_external=bool(loaded.external_files),
    )
    target = plan.output
    assert target is not None
    with timer.phase("feeds"):
        orig_session: Session | None = _original_session(loaded, options.runtime)
        assert orig_session is not None
        feeds = feeds_for(options, loaded.model, orig_session)
    with timer.phase("reference"):
        reference = Reference(orig_session, feeds, loaded.model, _progress_fn(progress, "running original"))
        if not options.latency:
            # Only latency needs the original's session again; without it, free its memory
            # (a copy of every weight) before the technique and the candidate need theirs.
            reference.release_session()
            orig_session = None

    def evaluate(model: ir.Model) -> Fidelity:
        return reference.compare(session_for_model(model, options.runtime))

    context = TechniqueContext(
        feeds=feeds,
        evaluate=evaluate,
        gates=options.gates,
        floor=floor_gates(reference.class_like, reference.top1_informative),
        runtime=options.runtime,
        seed=options.seed,
        progress=progress,
    )
    with timer.phase("technique"):
        result: TechniqueResult = technique(loaded.model, config, context)
    if result.model is loaded.model:
        raise AssertionError(f"technique {command} returned its input model; it must clone it")
    flushed = flush_subnormals(result.model)
    if flushed:
        result = dataclasses.replace(
            result,
            notes=(*result.notes, SUBNORMAL_NOTE.format(count=flushed, tiny=FLOAT32_TINY)),
            details={**result.details, "subnormal_weights_zeroed": flushed},
        )
    with timer.phase("save"):
        staged = io.stage_model(result.model, target)
        if staged.data_path is not None:
            # Its tensors are on disk now: read them from there and free the technique's copies
            # before onnxruntime loads the candidate (both at once took 2x the model's size).
            result = dataclasses.replace(result, model=io.load_staged(staged))
            gc.collect()  # a graph is full of reference cycles: free the arrays now, not later
    try:
        with timer.phase("check"):
            _check_candidate(staged.path, command)
            cand_session = _candidate_session(staged.path, options.runtime, command)
        with timer.phase("verify"):
            fidelity = reference.compare(cand_session, _progress_fn(progress, "verifying result"))
        with timer.phase("measure"):
            orig_stats = model_stats(loaded.model, source=loaded.label, files=loaded.files(), raw=loaded.raw)
            res_stats = model_stats(result.model, source=target.label, files=staged.files())
        latency = None
        if options.latency:
            assert orig_session is not None
            with timer.phase("latency"):
                latency = _latency(orig_session, cand_session, feeds, options, progress)
        size_ratio = res_stats.size_bytes / orig_stats.size_bytes if orig_stats.size_bytes else None
        gates = _gate_results(options, fidelity, size_ratio, latency)
        written = all(g.passed for g in gates) and result.write
        settings = {"config": _config_dict(config), **options.settings()}
        outcome = Report(
            verdict=_verdict(
                fidelity,
                (orig_stats, res_stats),
                latency,
                feeds,
                result,
                _fidelity_gate(options.gates, gates),
            ),
            inputs=feeds.inputs,
            probes=feeds.probes,
            command=command,
            original=orig_stats,
            result=res_stats,
            fidelity=fidelity,
            latency=latency,
            latency_skipped=None if options.latency else "--no-latency",
            changes=result.changed,
            skipped=result.skipped,
            notes=result.notes,
            details=result.details,
            gates=gates,
            warnings=feeds.warnings,
            settings=settings,
            output=target.label,
            written=written,
            timings_s=timer.done(),
        )
        # The model (when it passed) and the report go into place as one unit, last.
        staged_report = io.stage_report(plan.report, outcome.to_json()) if plan.report is not None else None
        io.commit(staged if written else None, staged_report)
    finally:
        staged.discard()
    return outcome


def _files_read(config: Any, options: RunOptions) -> tuple[str | Path, ...]:
    """Files a run reads besides its input model: ``--data`` and a teacher's model files."""
    files: list[str | Path] = [options.data] if options.data is not None else []
    teacher = getattr(config, "teacher", None)
    if isinstance(teacher, str) and teacher != io.STDIO:
        files.extend(io.files_read(teacher))
    qat_data = getattr(config, "qat_data", None)
    for loaded in (getattr(config, "teacher_model", None), getattr(qat_data, "teacher", None)):
        model = getattr(loaded, "model", None)
        if isinstance(model, ir.Model):
            files.extend(io.external_files(model))
    return tuple(files)


SUBNORMAL_NOTE = (
    "set {count:,} subnormal float32 weight value(s) (nonzero, below {tiny:.3g} in magnitude) to zero: "
    "CPUs multiply them many times slower than normal numbers, and no output a float32 can show "
    "depends on them (the fidelity figures include it)"
)


def _fidelity_gate(given: Gates, results: tuple[GateResult, ...]) -> bool | None:
    """Whether the fidelity gates held; None when none was given."""
    if not given.fidelity_gates:
        return None
    fidelity = {"max_error", "min_cosine", "min_agreement"}
    return all(g.passed for g in results if g.name in fidelity)


def _verdict(
    fidelity: Fidelity,
    stats: tuple[ModelStats, ModelStats],
    latency: LatencyComparison | None,
    feeds: Feeds,
    result: TechniqueResult | None = None,
    fidelity_gate: bool | None = None,
) -> Verdict:
    slowdown = None
    where = ""
    if latency is not None and latency.original.p50_ms > 0:
        slowdown = latency.result.p50_ms / latency.original.p50_ms
        where = f"{latency.provider.removesuffix('ExecutionProvider').lower()}, {latency.threads or 'default'} thread(s)"
    original, result_stats = stats
    return judge(
        fidelity,
        size_ratio=_ratio(result_stats.size_bytes, original.size_bytes),
        zlib_ratio=_ratio(result_stats.size_zlib_bytes, original.size_zlib_bytes),
        slowdown=slowdown,
        latency_where=where,
        real_data=feeds.real,
        judged=result.judged if result is not None else None,
        # a technique may change the graph without a per-weight change (fp16's Casts)
        changed=(bool(result.changed) or result_stats.ops != original.ops) if result is not None else None,
        fidelity_gate=fidelity_gate,
    )


def _ratio(new: int | None, old: int | None) -> float | None:
    return new / old if new is not None and old else None


def _config_dict(config: Any) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return repr(config)


def _check_candidate(path: Path, command: str) -> None:
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise CandidateError(
            f"{command} produced a model that fails the ONNX checker (a modelshrink bug; "
            f"please report it): {io.checker_message(exc)}"
        ) from exc


def _candidate_session(path: Path, runtime: RuntimeOptions, command: str) -> Session:
    try:
        return Session(path, runtime, label=f"{command} result")
    except UnsupportedModelError as exc:
        raise CandidateError(
            f"{command} produced a model onnxruntime cannot load (a modelshrink bug; please "
            f"report it): {exc.message}"
        ) from exc
