"""The one report every command ends with: a dataclass, its JSON, and its Rich rendering.

JSON (``schema_version`` 1) carries native types only; non-finite floats become ``null``
(an output's ``snr_db`` is null exactly when ``identical`` is true, i.e. infinite SNR).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from modelshrink._version import __version__
from modelshrink.feeds import InputInfo
from modelshrink.gates import GateResult
from modelshrink.measure import LatencyStats, ModelStats
from modelshrink.techniques.base import Change, Skip
from modelshrink.verdict import Verdict
from modelshrink.verify import Fidelity

__all__ = [
    "SCHEMA_VERSION",
    "LatencyComparison",
    "Report",
    "human_bytes",
    "jsonable",
    "render_report",
    "tool_versions",
]

SCHEMA_VERSION = 1
_MAX_ROWS = 20


def tool_versions() -> dict[str, str]:
    """Versions of this tool and of the libraries that shape its results (read from the installed
    packages' metadata, so that ``inspect`` does not import onnxruntime to report it)."""
    return {
        "name": "modelshrink",
        "version": __version__,
        "onnx": _installed("onnx"),
        "onnxruntime": _installed("onnxruntime"),
        "onnx_ir": _installed("onnx-ir"),
    }


def _installed(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class LatencyComparison:
    """Interleaved latency of original and result on the same feed and options."""

    provider: str
    threads: int
    feed_shapes: Mapping[str, list[int]]
    original: LatencyStats
    result: LatencyStats

    @property
    def speedup(self) -> float:
        """original p50 / result p50 (> 1 means the result is faster)."""
        return self.original.p50_ms / self.result.p50_ms if self.result.p50_ms > 0 else math.inf


@dataclass(frozen=True)
class Report:
    """Everything a command measured and decided.

    Attributes:
        command: ``compare``, ``quantize``, ...
        original: Facts about the original model.
        result: Facts about the result (the candidate for ``compare``).
        fidelity: Output agreement, or None when not computed.
        latency: Latency comparison, or None with ``latency_skipped`` saying why.
        latency_skipped: Why latency was not measured.
        changes: What the technique changed.
        skipped: What it left alone, with reasons.
        notes: Facts from the technique worth reading.
        details: Technique-specific extras (JSON ``details``).
        gates: Gate verdicts.
        warnings: Warnings (defaulted input dims, ignored data keys, ...).
        settings: The configuration used (flags), for reproducibility.
        output: Where the result was (or would have been) written; None for ``compare``.
        written: Whether the output was written.
        timings_s: Seconds spent per phase, and ``total``.
        verdict: Sound or not, in words, with what to do (independent of the gates).
        inputs: How each input was fed during verification (shapes, guesses, values).
        probes: Synthetic candidates run on the original to find inputs it runs on.
    """

    command: str
    original: ModelStats
    result: ModelStats
    fidelity: Fidelity | None = None
    latency: LatencyComparison | None = None
    latency_skipped: str | None = None
    changes: tuple[Change, ...] = ()
    skipped: tuple[Skip, ...] = ()
    notes: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)
    gates: tuple[GateResult, ...] = ()
    warnings: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    output: str | None = None
    written: bool = False
    timings_s: Mapping[str, float] = field(default_factory=dict)
    verdict: Verdict | None = None
    inputs: tuple[InputInfo, ...] = ()
    probes: int = 0

    @property
    def passed(self) -> bool:
        """True when every gate passed (or none was set)."""
        return all(g.passed for g in self.gates)

    @property
    def failed_gates(self) -> list[GateResult]:
        """Gates that failed."""
        return [g for g in self.gates if not g.passed]

    def ratios(self) -> dict[str, float | None]:
        """result / original for sizes and params; speedup for latency."""
        o, r = self.original, self.result
        return {
            "size": _ratio(r.size_bytes, o.size_bytes),
            "size_zlib": _ratio(r.size_zlib_bytes, o.size_zlib_bytes),
            "params": _ratio(r.params, o.params),
            "speedup": self.latency.speedup if self.latency else None,
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (schema_version 1)."""
        fidelity = None
        if self.fidelity is not None:
            f = self.fidelity
            fidelity = {
                "samples": f.samples,
                "real_data": f.real_data,
                "source": f.source,
                "identical": f.identical,
                "worst": {
                    "max_abs_error": f.max_abs_error,
                    "mean_abs_error": f.mean_abs_error,
                    "cosine": f.cosine,
                    "snr_db": f.snr_db,
                    "top1_agreement": f.top1_agreement,
                },
                "outputs": [asdict(o) for o in f.outputs],
                "inputs": [asdict(i) for i in self.inputs],
                "probes": self.probes,
            }
        latency = None
        if self.latency is not None:
            lat = self.latency
            latency = {
                "provider": lat.provider,
                "threads": lat.threads,
                "feed_shapes": dict(lat.feed_shapes),
                "original": asdict(lat.original),
                "result": asdict(lat.result),
                "speedup": lat.speedup,
            }
        doc = {
            "schema_version": SCHEMA_VERSION,
            "tool": tool_versions(),
            "command": self.command,
            "passed": self.passed,
            "output": {"path": self.output, "written": self.written},
            "original": asdict(self.original),
            "result": asdict(self.result),
            "ratios": self.ratios(),
            "latency": latency,
            "latency_skipped": self.latency_skipped,
            "fidelity": fidelity,
            "verdict": self.verdict.to_dict() if self.verdict is not None else None,
            "changes": [asdict(c) for c in self.changes],
            "skipped": [asdict(s) for s in self.skipped],
            "notes": list(self.notes),
            "details": dict(self.details),
            "gates": [asdict(g) for g in self.gates],
            "warnings": list(self.warnings),
            "settings": dict(self.settings),
            "timings_s": dict(self.timings_s),
        }
        return jsonable(doc)

    def to_json(self) -> str:
        """Pretty JSON text with a trailing newline."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"


def _ratio(new: float | None, old: float | None) -> float | None:
    if new is None or old is None or old == 0:
        return None
    return new / old


def jsonable(obj: Any) -> Any:
    """Native JSON types only: tuples -> lists, numpy scalars -> Python, non-finite -> None."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, int):
        return obj
    return str(obj)


# --- rendering -------------------------------------------------------------------------------


def human_bytes(n: float | None) -> str:
    """``1.23 MB`` style (decimal units, like file managers)."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human_count(n: float | None) -> str:
    """``1.2M`` style."""
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.3f}x"


def _fmt_float(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    if math.isnan(x):
        return "nan"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def _speed_text(speedup: float) -> Text:
    if speedup >= 1.02:
        return Text(f"{speedup:.2f}x faster", style="green")
    if speedup <= 0.98:
        return Text(f"{1 / speedup:.2f}x slower", style="red")
    return Text("same", style="dim")


def _stats_table(report: Report) -> Table:
    o, r = report.original, report.result
    table = Table(box=box.SIMPLE_HEAVY, show_edge=False, pad_edge=False)
    table.add_column("", style="bold")
    table.add_column("original", justify="right")
    table.add_column("result", justify="right")
    table.add_column("result/original", justify="right")
    ratios = report.ratios()
    table.add_row(
        "file size", human_bytes(o.size_bytes), human_bytes(r.size_bytes), _fmt_ratio(ratios["size"])
    )
    table.add_row(
        "zlib size",
        human_bytes(o.size_zlib_bytes),
        human_bytes(r.size_zlib_bytes),
        _fmt_ratio(ratios["size_zlib"]),
    )
    table.add_row("parameters", human_count(o.params), human_count(r.params), _fmt_ratio(ratios["params"]))
    table.add_row("nodes", str(o.nodes), str(r.nodes), _fmt_ratio(_ratio(r.nodes, o.nodes)))
    if report.latency is not None:
        lat = report.latency
        table.add_row(
            "latency p50",
            f"{lat.original.p50_ms:.3f} ms",
            f"{lat.result.p50_ms:.3f} ms",
            _speed_text(lat.speedup),
        )
        table.add_row(
            "latency p90",
            f"{lat.original.p90_ms:.3f} ms",
            f"{lat.result.p90_ms:.3f} ms",
            _fmt_ratio(_ratio(lat.result.p90_ms, lat.original.p90_ms)),
        )
    return table


def _fidelity_table(f: Fidelity) -> Table:
    table = Table(box=box.SIMPLE_HEAVY, show_edge=False, pad_edge=False)
    for name, justify in (
        ("output", "left"),
        ("max |err|", "right"),
        ("mean |err|", "right"),
        ("cosine", "right"),
        ("SNR dB", "right"),
        ("top-1", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for o in f.outputs[:_MAX_ROWS]:
        top1 = "-" if o.top1_agreement is None else f"{o.top1_agreement:.2%}"
        style = "red" if o.nonfinite else None
        table.add_row(
            Text(o.name + (" (identical)" if o.identical else "")),
            _fmt_float(o.max_abs_error),
            _fmt_float(o.mean_abs_error),
            _fmt_float(o.cosine, 6),
            _fmt_float(o.snr_db, 3),
            top1,
            style=style,
        )
    if len(f.outputs) > _MAX_ROWS:
        table.add_row(f"... {len(f.outputs) - _MAX_ROWS} more outputs (see --json)")
    return table


def _changes_table(changes: Sequence[Change]) -> Table:
    table = Table(box=box.SIMPLE, show_edge=False, pad_edge=False)
    table.add_column("node")
    table.add_column("op")
    table.add_column("change")
    table.add_column("params", justify="right")
    for c in changes[:_MAX_ROWS]:
        params = (
            f"{human_count(c.params_before)} → {human_count(c.params_after)}"
            if c.params_before or c.params_after
            else ""
        )
        table.add_row(Text(c.node), Text(c.op_type), Text(c.what), params)
    if len(changes) > _MAX_ROWS:
        table.add_row(f"... {len(changes) - _MAX_ROWS} more (see --json)", "", "", "")
    return table


def skip_lines(skipped: Sequence[Skip], limit: int = _MAX_ROWS) -> list[str]:
    """One line per distinct reason, naming the nodes: ``fc1 (Gemm): reason`` or ``3 × reason: a, b, c``."""
    by_reason: dict[str, list[Skip]] = {}
    for skip in skipped:
        by_reason.setdefault(skip.reason, []).append(skip)
    ranked = sorted(by_reason.items(), key=lambda kv: -len(kv[1]))
    lines = []
    for reason, skips in ranked[:limit]:
        if len(skips) == 1:
            s = skips[0]
            lines.append(f"{s.node} ({s.op_type}): {reason}")
        else:
            names = ", ".join(s.node for s in skips[:3]) + (f", +{len(skips) - 3}" if len(skips) > 3 else "")
            lines.append(f"{len(skips)} × {reason}: {names}")
    if len(ranked) > limit:
        lines.append(f"... {len(ranked) - limit} more reasons (see --json)")
    return lines


def render_report(report: Report, console: Console) -> None:
    """Print the report for people (to a stderr console)."""
    title = f"modelshrink {report.command}: {report.original.source} → {report.result.source}"
    console.print(Text(title, style="bold"))
    console.print(_stats_table(report))
    if report.latency is not None:
        lat = report.latency
        console.print(
            Text(
                f"latency: {lat.original.runs} interleaved runs each, {lat.provider}, "
                f"{lat.threads or 'default'} thread(s), feed "
                + ", ".join(f"{k}{v}" for k, v in lat.feed_shapes.items()),
                style="dim",
            )
        )
    elif report.latency_skipped:
        console.print(Text(f"latency: not measured ({report.latency_skipped})", style="dim"))
    if report.fidelity is not None:
        f = report.fidelity
        console.print(_fidelity_table(f))
        where = "real data" if f.real_data else "synthetic inputs (pass --data for real-data fidelity)"
        shapes = ", ".join(
            f"{i.name} {'x'.join(map(str, i.shape)) or 'scalar'}"
            + (f"={i.value}" if i.value is not None else "")
            + (" (guessed)" if i.guessed_shape or i.guessed_value else "")
            for i in report.inputs
        )
        fed = f"; inputs {shapes}" if shapes else ""
        console.print(Text(f"fidelity: {f.samples} samples, {where}: {f.source}{fed}", style="dim"))
    if report.changes:
        console.print(Text(f"changed {len(report.changes)} node(s):", style="bold"))
        console.print(_changes_table(report.changes))
    if report.skipped:
        console.print(Text(f"skipped {len(report.skipped)} node(s):", style="bold"))
        for line in skip_lines(report.skipped):
            console.print(Text(f"  {line}"))
    for note in report.notes:
        console.print(Text(f"note: {note}", style="cyan"))
    for warning in report.warnings:
        console.print(Text(f"warning: {warning}", style="yellow"))
    if report.verdict is not None:
        _render_verdict(report.verdict, console)
    for gate in report.gates:
        mark, style = ("✓", "green") if gate.passed else ("✗", "bold red")
        console.print(Text(f"{mark} gate {gate.describe()}", style=style))
    if report.output is not None:
        if report.written:
            console.print(Text(f"wrote {report.output}", style="green"))
        elif report.passed:
            console.print(Text(f"nothing written to {report.output} (analysis only)", style="dim"))
        else:
            console.print(Text(f"nothing written to {report.output}", style="red"))


def _render_verdict(verdict: Verdict, console: Console) -> None:
    against = "" if verdict.basis == "the original" else f" (judged against {verdict.basis})"
    if verdict.sound:
        console.print(Text(f"✓ verdict: sound{against}: {verdict.summary}", style="bold green"))
        return
    problems = {f.kind for f in verdict.findings}
    if problems & {"fidelity", "nonfinite"}:
        word = "DAMAGED"
    elif problems & {"unjudged", "vacuous"}:
        word = "NOT VERIFIED"
    elif problems == {"unchanged"}:
        word = "UNCHANGED"
    else:
        word = "NO GAIN"
    console.print(Text(f"✗ verdict: {word}{against}: {verdict.summary}", style="bold red"))
    for finding in verdict.findings:
        console.print(Text(f"  - {finding.text}", style="red"))
    for line in verdict.advice:
        console.print(Text(f"  what to do: {line}", style="yellow"))
