"""The candidates table ``auto`` prints before its report (Rich, on stderr)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console, JustifyMethod
from rich.table import Table
from rich.text import Text

from modelshrink.report import Report

__all__ = ["render_candidates"]


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render_candidates(report: Report, console: Console) -> None:
    """Every candidate tried: status, size, speed, fidelity, time; the chosen one in bold."""
    auto = report.details.get("auto")
    if not auto:
        return
    table = Table(
        box=box.SIMPLE_HEAVY, show_edge=False, pad_edge=False, title=f"auto: goal {auto['goal']}", expand=True
    )
    columns: list[tuple[str, JustifyMethod]] = [
        ("candidate", "left"),
        ("status", "left"),
        ("size", "right"),
        ("speed", "right"),
        ("cosine", "right"),
        ("top-1", "right"),
        ("s", "right"),
    ]
    for name, justify in columns:
        table.add_column(name, justify=justify)
    for row in auto["candidates"]:
        style = (
            "bold green" if row["name"] == auto["chosen"] else ("dim" if row["status"] == "skipped" else None)
        )
        status = row["status"] + (f": {row['reason']}" if row["reason"] and row["status"] != "passed" else "")
        table.add_row(
            Text(row["name"]),
            Text(status if len(status) <= 60 else status[:59] + "…"),
            _num(row["size_ratio"], ".3f") + ("x" if row["size_ratio"] is not None else ""),
            _num(row["speedup"], ".2f") + ("x" if row["speedup"] is not None else ""),
            _num(row["cosine"], ".4f"),
            "-" if row["top1_agreement"] is None else f"{row['top1_agreement']:.1%}",
            _num(row["seconds"], ".1f"),
            style=style,
        )
    console.print(table)
