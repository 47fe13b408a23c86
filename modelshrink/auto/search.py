"""``modelshrink auto``: the smallest (or fastest) model that passes the gates, over every technique.

How it goes:

1. Every path written (the model, ``--report``, ``--plot``) is checked before any work.
2. ``--data`` is split once by sample index: one sample in ``--holdout`` K is held out for
   scoring, the others calibrate and train (``--rows %K!=K-1`` / ``--rows %K=K-1``, so every
   recipe can be run again by hand). Without ``--data`` only data-free recipes run, and the
   report says what data would unlock.
3. The gates are the user's; without a fidelity gate, the fidelity floor of every command
   (top-1 agreement >= 99 % on class-like outputs, else cosine >= 0.99).
4. Recipes run cheapest first (:mod:`.candidates`), each step on the previous one's result with
   the very config and options its printed command line builds; then the result is scored
   against the original on the held-out samples as ``modelshrink compare`` does (latency
   interleaved with the original, on the provider in use). A recipe that cannot beat the best
   result so far (its smallest reachable size; whether it can be faster at all) is skipped.
5. No recipe starts once ``--time-budget`` is spent; one still running past it by a twentieth
   is stopped (an alarm unwinds it like Ctrl-C, removing its files) and marked abandoned.
6. The best result that passes every gate is written, atomically, with the usual report of it
   against the original (on the held-out samples) and every candidate in ``details.auto``.
   Ctrl-C or SIGTERM writes nothing, unless ``--keep-best``: then the best so far is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import shlex
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelshrink import api, io
from modelshrink.auto.candidates import MIN_TRAIN_SAMPLES, Recipe, Step, Weights, recipes
from modelshrink.auto.config import AutoConfig
from modelshrink.dataset import open_run_dataset
from modelshrink.errors import ConfigError, GateError, ModelshrinkError
from modelshrink.flags import to_argv
from modelshrink.gates import Gates, floor_gates
from modelshrink.options import RunOptions, RuntimeOptions
from modelshrink.report import Report
from modelshrink.techniques.base import Progress, silent_progress

__all__ = ["Tried", "auto"]

logger = logging.getLogger(__name__)

# A recipe still running this long past the budget (as a share of it) is stopped.
OVERRUN = 0.05


@dataclass
class Tried:
    """One candidate: how it went and what it measured (one row of the table)."""

    name: str
    status: str  # passed | failed gates | error | skipped | abandoned
    commands: list[str] = field(default_factory=list)
    reason: str | None = None
    seconds: float = 0.0
    size_bytes: int | None = None
    size_ratio: float | None = None
    speedup: float | None = None
    p50_ms: float | None = None
    max_abs_error: float | None = None
    cosine: float | None = None
    top1_agreement: float | None = None
    failed_gates: list[str] = field(default_factory=list)
    path: Path | None = field(default=None, repr=False)
    report: Report | None = field(default=None, repr=False)  # its scoring against the original

    def row(self) -> dict[str, Any]:
        """The JSON row."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del out["path"], out["report"]
        return {**out, "commands": list(self.commands), "failed_gates": list(self.failed_gates)}


@dataclass(frozen=True)
class _Plan:
    src: str
    data: str | None
    calibrate: RunOptions  # what steps get (calibration samples)
    score: RunOptions  # what compare gets (held-out samples, the gates)
    fidelity_gates: Gates  # what gated steps search under


def _shown(argv: Sequence[str]) -> str:
    return "modelshrink " + shlex.join(argv)


def _gate_argv(gates: Gates) -> list[str]:
    return to_argv(RunOptions(gates=gates))


def _common_argv(options: RunOptions) -> list[str]:
    """Seed, provider, threads, input shapes and values: the same for every command of a run."""
    keep = RunOptions(
        input_shapes=options.input_shapes,
        input_values=options.input_values,
        seed=options.seed,
        runtime=RuntimeOptions(provider=options.runtime.provider, threads=options.runtime.threads),
    )
    return to_argv(keep)


def _step_argv(step: Step, src: str, out: str, plan: _Plan, cfg: AutoConfig) -> list[str]:
    argv = [step.command, src, "-o", out, *to_argv(step.config)]
    if plan.data is not None and step.calibrate:
        argv += ["--data", plan.data, "--rows", cfg.calibration_rows]
    if step.gated:
        argv += _gate_argv(plan.fidelity_gates)
    argv += _common_argv(plan.calibrate)
    return [*argv, "--no-latency", "--force", "-q"]


def _score_argv(candidate: str, plan: _Plan, cfg: AutoConfig) -> list[str]:
    """The compare command a candidate is scored with (what :func:`_try` runs)."""
    argv = ["compare", plan.src, candidate]
    if plan.data is not None:
        argv += ["--data", plan.data, "--rows", cfg.heldout_rows, "--samples", str(1 << 30)]
    argv += _gate_argv(plan.score.gates) + _common_argv(plan.score)
    if plan.score.latency_runs is not None:
        argv += ["--latency-runs", str(plan.score.latency_runs)]
    return [*argv, "--json", "-q"]


class _Deadline:
    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def spent(self) -> bool:
        return self.elapsed >= self.budget_s

    def left(self) -> float:
        """Seconds a running command may still take before it is stopped."""
        return max(1.0, self.budget_s * (1 + OVERRUN) - self.elapsed)


class _Abandoned(BaseException):
    """The time budget ran out while a candidate ran (raised by the alarm; unwinds like Ctrl-C,
    so the step removes its staged files)."""


@contextlib.contextmanager
def _alarm(deadline: _Deadline) -> Iterator[None]:
    """Raise :class:`_Abandoned` in this thread past the deadline (main thread only; elsewhere
    a running candidate finishes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(signum: int, frame: object) -> None:
        raise _Abandoned

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, deadline.left())
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _step_options(step: Step, plan: _Plan) -> RunOptions:
    """The options the step's command line gives (see :func:`_step_argv`)."""
    options = dataclasses.replace(
        plan.calibrate, gates=plan.fidelity_gates if step.gated else Gates(), latency=False
    )
    if plan.data is None or not step.calibrate:
        options = dataclasses.replace(options, data=None, rows=None)
    return options


def _try(recipe: Recipe, plan: _Plan, cfg: AutoConfig, folder: Path, deadline: _Deadline) -> Tried:
    """Run a recipe's steps and score the result (in this process: the same configs and options
    the printed commands build; ``tests/test_auto.py`` checks they give the same bytes)."""
    started = time.monotonic()
    tried = Tried(recipe.name, "error")
    current, shown_in = plan.src, "MODEL"
    try:
        with _alarm(deadline):
            for i, step in enumerate(recipe.steps, 1):
                out = folder / f"{recipe.name}.{i}.onnx"
                shown_out = "OUT" if i == len(recipe.steps) else f"step{i}.onnx"
                shown = _step_argv(step, shown_in, shown_out, plan, cfg)
                tried.commands.append(_shown([a for a in shown if a not in ("--force", "-q")]))
                try:
                    done = api.run(
                        step.command, current, str(out), step.config, _step_options(step, plan), force=True
                    )
                except ModelshrinkError as exc:
                    tried.reason = f"step {i} ({step.command}): {exc.message}"
                    return tried
                if not done.written:  # a gated step could not meet the gates: nothing written
                    tried.status = "failed gates"
                    failed = ", ".join(g.describe() for g in done.failed_gates)
                    tried.reason = f"step {i} ({step.command}): {failed}"
                    return tried
                current, shown_in = str(out), shown_out
            try:
                scored = api.compare(plan.src, current, plan.score)
            except ModelshrinkError as exc:
                tried.reason = f"scoring: {exc.message}"
                return tried
    except _Abandoned:
        tried.status, tried.reason = "abandoned", "stopped at the time budget"
        return tried
    finally:
        tried.seconds = time.monotonic() - started
        gc.collect()
    _fill(tried, scored.to_dict())
    tried.path, tried.report = Path(current), scored
    return tried


def _fill(tried: Tried, doc: dict[str, Any]) -> None:
    worst = doc["fidelity"]["worst"]
    tried.max_abs_error = worst["max_abs_error"]
    tried.cosine = worst["cosine"]
    tried.top1_agreement = worst["top1_agreement"]
    tried.size_bytes = doc["result"]["size_bytes"]
    tried.size_ratio = doc["ratios"]["size"]
    tried.speedup = doc["ratios"]["speedup"]
    if doc["latency"] is not None:
        tried.p50_ms = doc["latency"]["result"]["p50_ms"]
    tried.failed_gates = [g["flag"] for g in doc["gates"] if not g["passed"]]
    tried.status = "passed" if doc["passed"] else "failed gates"


def _better(a: Tried, b: Tried | None, goal: str) -> bool:
    """Whether ``a`` beats ``b`` under the goal (the other figure breaks ties)."""
    if b is None:
        return True
    size_a, size_b = a.size_bytes or math.inf, b.size_bytes or math.inf
    fast_a, fast_b = a.speedup or 0.0, b.speedup or 0.0
    if goal == "latency":
        return (fast_a, -size_a) > (fast_b, -size_b)
    return (-size_a, fast_a) > (-size_b, fast_b)


def _dominated(recipe: Recipe, best: Tried | None, weights: Weights, goal: str) -> str | None:
    """Why ``recipe`` cannot beat ``best``, or None."""
    if best is None:
        return None
    if goal == "size" and best.size_bytes is not None:
        bound = recipe.smallest * weights.size
        if bound >= best.size_bytes:
            return f"it cannot be smaller than {recipe.smallest:.3f}x, and '{best.name}' is {best.size_ratio:.3f}x"
    if goal == "latency" and not recipe.can_be_faster and (best.speedup or 0.0) > 1.0:
        return f"it stores weights smaller but computes as the original does; '{best.name}' is faster"
    return None


def _why_not(recipe: Recipe, plan: _Plan, samples: int, cfg: AutoConfig, provider: str) -> str | None:
    """Why ``recipe`` does not fit this run, or None."""
    if (recipe.needs_data or recipe.trains) and plan.data is None:
        return "needs --data"
    if recipe.trains and samples < MIN_TRAIN_SAMPLES:
        return f"trains: needs {MIN_TRAIN_SAMPLES}+ calibration rows in --data, has {samples}"
    if recipe.gpu_only and cfg.goal == "latency" and provider == "CPUExecutionProvider":
        return "float16 compute is for GPU providers; on CPU it runs slower"
    return None


def _weights(src: str) -> Weights:
    facts = api.inspect(src)
    tb = facts.technique_bytes
    return Weights(facts.size_bytes, tb.get("quantize", 0), tb.get("prune", 0), tb.get("factorize", 0))


def _scoring_gates(options: RunOptions, src: str, heldout: RunOptions) -> Gates:
    """The user's gates; without a fidelity gate, the fidelity floor of the original's outputs."""
    if options.gates.fidelity_gates:
        return options.gates
    probe = api.compare(src, src, dataclasses.replace(heldout, latency=False, gates=Gates()))
    assert probe.fidelity is not None
    outputs = probe.fidelity.outputs
    floor = floor_gates(
        [o.top1_agreement is not None for o in outputs], [o.top1_informative for o in outputs]
    )
    return dataclasses.replace(options.gates, min_cosine=floor.min_cosine, min_agreement=floor.min_agreement)


def _count_rows(src: str, options: RunOptions) -> int:
    """Rows of ``--data`` (along each input's batch axis, as distill counts them; ``--rows``
    splits these, whatever the batch size of a feed), read lazily."""
    assert options.data is not None
    dataset = open_run_dataset(io.load_model(src).model, dataclasses.replace(options, rows=None))
    try:
        return dataset.rows
    finally:
        dataset.release()


@contextlib.contextmanager
def _workspace() -> Iterator[Path]:
    with io.temporary_folder() as folder:
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def auto(
    src: str,
    output: str,
    config: AutoConfig | None = None,
    options: RunOptions | None = None,
    *,
    force: bool = False,
    external_data: bool | None = None,
    progress: Progress = silent_progress,
    report: str | None = None,
) -> Report:
    """Search every technique for the smallest (or fastest) model that passes the gates.

    Returns:
        The report of the chosen model against the original on the held-out samples, with
        every candidate in ``details["auto"]``; ``written`` says whether it was written (not
        when no candidate passed: the caller turns that into exit code 3).

    Raises:
        ConfigError: Flags that contradict each other (``--rows``, ``-`` as input, ...).
        TargetError: An output path is refused (before any work).
        ModelshrinkError: The model or the data cannot be read.
    """
    cfg = config or AutoConfig()
    options = options or RunOptions()
    if src == io.STDIO:
        raise ConfigError("auto reads the model many times (once per candidate); pass it by path, not '-'")
    if options.rows is not None:
        raise ConfigError("auto splits --data itself (--holdout); drop --rows")
    if cfg.goal == "latency" and not options.latency:
        raise ConfigError("--goal latency needs latency measured; drop --no-latency")
    if cfg.plot is not None:
        _check_plotting()
    plan_files = io.plan_writes(
        output=output,
        report=report,
        reads=(*io.files_read(src), options.data),
        force=force,
        external_data=external_data,
        files={"--plot": cfg.plot},
    )
    deadline = _Deadline(cfg.budget_s)
    weights = _weights(src)
    calibrate = options
    heldout = options
    samples = 0
    if options.data is not None:
        samples = _count_rows(src, options)
        held = samples // cfg.holdout
        if held < 1:
            raise ConfigError(
                f"--data has {samples} rows: too few to hold one in {cfg.holdout} out for scoring; "
                "pass more data or a smaller --holdout"
            )
        calibrate = dataclasses.replace(options, rows=cfg.calibration_rows)
        heldout = dataclasses.replace(options, rows=cfg.heldout_rows, samples=1 << 30)
        samples -= held
    gates = _scoring_gates(options, src, heldout)
    score = dataclasses.replace(heldout, gates=gates)
    fidelity = Gates(
        max_error=gates.max_error, min_cosine=gates.min_cosine, min_agreement=gates.min_agreement
    )
    plan = _Plan(src, options.data, calibrate, score, fidelity)
    provider = options.runtime.provider_name
    every = recipes(weights, original=str(Path(src).resolve()), epochs=cfg.epochs)
    unknown = [n for n in cfg.only if n not in {r.name for r in every}]
    if unknown:
        raise ConfigError(
            f"--only {unknown[0]}: no such candidate (candidates: {', '.join(r.name for r in every)})"
        )
    chosen = [r for r in every if not cfg.only or r.name in cfg.only]
    table: list[Tried] = []
    best: Tried | None = None
    interrupted: BaseException | None = None
    with _workspace() as folder:
        try:
            for i, recipe in enumerate(chosen):
                label = f"auto: {recipe.name}" + (
                    f" · best {best.name} {best.size_ratio:.3f}x" if best else ""
                )
                progress(label, i, len(chosen))
                if (why := _why_not(recipe, plan, samples, cfg, provider)) is not None:
                    table.append(Tried(recipe.name, "skipped", reason=why))
                    continue
                if (why := _dominated(recipe, best, weights, cfg.goal)) is not None:
                    table.append(Tried(recipe.name, "skipped", reason=f"dominated: {why}"))
                    continue
                if deadline.spent:
                    table.append(Tried(recipe.name, "skipped", reason="the time budget was spent"))
                    continue
                tried = _try(recipe, plan, cfg, folder, deadline)
                table.append(tried)
                if tried.status == "passed" and _better(tried, best, cfg.goal):
                    best = tried
            progress("auto", len(chosen), len(chosen))
        except KeyboardInterrupt as exc:
            interrupted = exc
            if not cfg.keep_best or best is None:
                raise
        return _finish(
            src, output, cfg, score, plan_files, table, best, weights, samples, deadline, interrupted
        )


def _check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--plot needs matplotlib, which is not installed: pip install 'modelshrink[plot]' "
            "(or pip install matplotlib)"
        ) from None


def _finish(
    src: str,
    output: str,
    cfg: AutoConfig,
    score: RunOptions,
    plan_files: io.WritePlan,
    table: list[Tried],
    best: Tried | None,
    weights: Weights,
    samples: int,
    deadline: _Deadline,
    interrupted: BaseException | None,
) -> Report:
    ran = [t for t in table if t.path is not None]
    if not ran:
        reasons = "; ".join(f"{t.name}: {t.reason}" for t in table if t.reason)[:600]
        if any(t.status == "failed gates" for t in table):
            raise GateError(f"auto: no candidate passes the gates ({reasons})")
        raise ModelshrinkError(f"auto: no candidate could be built and scored ({reasons})")
    pick = best or max(ran, key=lambda t: (t.cosine or -1.0, t.top1_agreement or 0.0))
    # the pick's own scoring is the report (set with its path): scored once, so the table and the
    # report agree and the time budget is not overrun by scoring it again
    final = pick.report
    assert pick.path is not None and final is not None
    details = _details(cfg, table, best, pick, weights, samples, deadline, interrupted, score)
    notes = [
        f"auto: {len(ran)} candidate(s) built and scored of {len(table)}; "
        + (f"chosen '{pick.name}'" if best is not None else "none passed every gate"),
        *[f"reproduce '{pick.name}': {c}" for c in pick.commands],
    ]
    if score.data is None:
        notes.append(
            "without --data only data-free candidates ran; with --data (representative inputs) auto also "
            "tries static int8, quantization-aware training and pruning or factorization won back by "
            "distillation, and scores every candidate on held-out samples"
        )
    if interrupted is not None:
        notes.append("interrupted: --keep-best wrote the best result found so far")
    label = plan_files.output.label if plan_files.output is not None else output
    report = dataclasses.replace(
        final,
        result=dataclasses.replace(final.result, source=label),
        command="auto",
        notes=(*notes, *final.notes),
        details=details,
        output=label,
        written=best is not None,
    )
    _write(pick, best, report, plan_files, table, cfg, score)
    if interrupted is not None:
        raise interrupted
    return report


def _details(
    cfg: AutoConfig,
    table: list[Tried],
    best: Tried | None,
    pick: Tried,
    weights: Weights,
    samples: int,
    deadline: _Deadline,
    interrupted: BaseException | None,
    score: RunOptions,
) -> dict[str, Any]:
    return {
        "auto": {
            "goal": cfg.goal,
            "time_budget_s": cfg.budget_s,
            "elapsed_s": round(deadline.elapsed, 3),
            "interrupted": interrupted is not None,
            "split": None
            if score.data is None
            else {
                "calibration_rows": cfg.calibration_rows,
                "heldout_rows": cfg.heldout_rows,
                "calibration_samples": samples,
            },
            "gates": dataclasses.asdict(score.gates),
            "chosen": best.name if best is not None else None,
            "closest": pick.name,
            "original_size_bytes": weights.size,
            "candidates": [t.row() for t in table],
        }
    }


def _write(
    pick: Tried,
    best: Tried | None,
    report: Report,
    plan_files: io.WritePlan,
    table: list[Tried],
    cfg: AutoConfig,
    score: RunOptions,
) -> None:
    staged_model = None
    if best is not None and plan_files.output is not None:
        assert best.path is not None
        staged_model = io.stage_copy(best.path, plan_files.output)
    staged_report = None
    if plan_files.report is not None:
        staged_report = io.stage_report(plan_files.report, report.to_json())
    others = []
    plot_target = plan_files.files.get("--plot")
    if plot_target is not None:
        from modelshrink.auto.plot import pareto_png

        png = pareto_png(table, cfg.goal, score.gates, best.name if best else None)
        others.append(io.stage_report(plot_target, png, flag="--plot"))
    io.commit(staged_model, staged_report, others=tuple(others))
