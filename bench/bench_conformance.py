"""Conformance table: every command over every model shipped inside onnx, and the models built
in tests/ for what those lack (opsets 7..latest, IR 3 and newest, If/Loop/Scan, Constant and
graph-input weights, run-time weights).

    make conformance        # or: python bench/run.py conformance

One row per command and setting, one column per outcome: ``ok`` (written, valid, outputs within
the setting's tolerance), ``ok (unchanged)`` (nothing to do; outputs identical), each clean
error by its reason, and ``VIOLATION`` (a traceback, an invalid model, an output out of
tolerance, a file left behind: a bug). The target: no violation. The same judgement runs in
``tests/test_conformance.py``; this adds the folded 7-12M-parameter light models and prints
the worst relative error of each near-lossless mode next to its tolerance.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import onnxruntime as ort

from common import ROOT

sys.path.insert(0, str(ROOT / "tests"))  # before importing sweep

from modelshrink import api
from modelshrink.errors import ModelshrinkError
from modelshrink.pipeline import RunOptions

import sweep  # tests/sweep.py: the judgement shared with the test suite


def _inspect(path: Path) -> str:
    try:
        api.inspect(str(path))
    except ModelshrinkError as exc:
        return sweep.known_reason(exc.message) or f"VIOLATION: {exc.message}"
    return "ok"


def _compare(path: Path) -> str:
    data = str(path.parent) if sweep.has_data(path) else None
    try:
        report = api.compare(str(path), str(path), RunOptions(data=data, latency=False, samples=1))
    except ModelshrinkError as exc:
        return sweep.known_reason(exc.message) or f"VIOLATION: {exc.message}"
    return "ok" if report.fidelity.max_abs_error == 0 else "VIOLATION: not identical to itself"


def _table(counts: dict[str, Counter[str]], seconds: dict[str, float]) -> None:
    columns = ["ok", "ok (unchanged)"]
    errors = sorted({c for row in counts.values() for c in row} - {*columns, "VIOLATION"})
    columns += [*errors, "VIOLATION"]
    width = max(len(r) for r in counts) + 2
    short = {c: c if len(c) <= 14 else c[:13] + "…" for c in columns}
    print("".ljust(width) + "".join(f"{short[c]:>16}" for c in columns) + f"{'seconds':>10}")
    for row, counter in counts.items():
        cells = "".join(f"{counter.get(c, 0):>16}" for c in columns)
        print(f"{row:<{width}}{cells}{seconds.get(row, 0.0):>10.1f}")
    print("error columns:", "; ".join(f"{short[c]} = {c}" for c in errors if short[c] != c) or "-")


def run() -> bool:
    # onnxruntime's load-time warnings about the shipped models (e.g. initializers that are also
    # graph inputs) would bury the table; the CLI keeps them off stderr the same way.
    ort.set_default_logger_severity(3)
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    seconds: dict[str, float] = defaultdict(float)
    worst: dict[str, tuple[float, str]] = {}
    violations: list[str] = []

    def record(row: str, label: str, where: str, started: float) -> None:
        seconds[row] += time.perf_counter() - started
        if label.startswith("VIOLATION"):
            violations.append(f"{row} on {where}: {label}")
            label = "VIOLATION"
        counts[row][label] += 1

    for path in sweep.MODELS:
        where = sweep.model_id(path)
        started = time.perf_counter()
        record("inspect", _inspect(path), where, started)
        started = time.perf_counter()
        record("compare", _compare(path), where, started)
        for variant in ("default", "exercised"):
            exercised = variant == "exercised"
            for name, setting in sweep.SETTINGS.items():
                row = f"{name} ({variant})"
                if exercised and sweep.exercised_copy_skipped(path, sweep.BENCH_FOLD_MAX_ELEMENTS):
                    counts[row]["not folded (25M+ params)"] += 1
                    continue
                started = time.perf_counter()
                outcome = sweep.run_one(
                    path, setting, exercised=exercised, fold_max=sweep.BENCH_FOLD_MAX_ELEMENTS
                )
                label = outcome.label if outcome.status != "violation" else f"VIOLATION: {outcome.detail}"
                record(row, label, where, started)
                if outcome.status == "ok" and outcome.changed and outcome.rel_error is not None:
                    worst[name] = max(worst.get(name, (0.0, "")), (outcome.rel_error, where))
    with tempfile.TemporaryDirectory(prefix="modelshrink-built-") as tmp:
        for model, (path, data) in sweep.save_built(Path(tmp)).items():
            for name, setting in sweep.SETTINGS.items():
                row = f"{name} (built)"
                started = time.perf_counter()
                outcome = sweep.run_built(path, data, setting)
                label = outcome.label if outcome.status != "violation" else f"VIOLATION: {outcome.detail}"
                record(row, label, model, started)
                if outcome.status == "ok" and outcome.changed and outcome.rel_error is not None:
                    worst[name] = max(worst.get(name, (0.0, "")), (outcome.rel_error, model))

    print(
        f"{len(sweep.MODELS)} shipped models (as shipped with default settings, and exercised), "
        f"{len(sweep.built_models())} built models; outcomes per command and setting:\n"
    )
    _table(dict(sorted(counts.items(), key=lambda kv: (kv[0] not in ("inspect", "compare"), kv[0]))), seconds)
    print("\nworst relative output error (max |result - original| / max |original|) among changed runs:")
    for name, setting in sweep.SETTINGS.items():
        err, where = worst.get(name, (0.0, "-"))
        bound = (
            f"tolerance {setting.tolerance:g}"
            if setting.tolerance is not None
            else "changes outputs by design"
        )
        print(f"  {name:18s} {err:10.4g}  on {where:45s} ({bound})")
    for line in violations:
        print(f"VIOLATION {line[:400]}")
    print(f"target: no violation: {'met' if not violations else f'MISSED ({len(violations)})'}")
    return not violations
