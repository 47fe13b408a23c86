"""``modelshrink inspect``: what is in a model, and what each technique could act on.

Reads only the graph and tensor headers (shapes, dtypes, locations): weights in external data
stay memory-mapped and are never read, so a multi-GB model inspects in well under a second.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx_ir as ir
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from modelshrink.feeds import input_specs
from modelshrink.graph import (
    FLOAT_TYPES,
    Weight,
    all_nodes,
    dtype_name,
    in_subgraph,
    op_histogram,
    op_key,
    weights,
)
from modelshrink.io import LoadedModel
from modelshrink.report import SCHEMA_VERSION, human_bytes, human_count, jsonable, tool_versions
from modelshrink.techniques import TECHNIQUES

__all__ = ["InspectReport", "inspect_model", "render_inspect"]

_TOP_WEIGHTS = 10
# Which weights each technique can act on with its default settings: float weights of at least
# this many elements consumed only by the op types the technique handles by default.
_MIN_ELEMENTS = 1024
# From the registry: the op types each technique acts on by default (none listed: every float
# weight, as distill trains them all).
_TECHNIQUE_OPS: dict[str, frozenset[str] | None] = {
    name: frozenset(spec.op_types) if spec.op_types else None for name, spec in TECHNIQUES.items()
}


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output."""

    name: str
    type: str
    shape: str


@dataclass(frozen=True)
class WeightInfo:
    """One weight, for the largest-weights list."""

    name: str
    dtype: str
    shape: list[int]
    bytes: int
    location: str
    consumers: list[str]


@dataclass(frozen=True)
class InspectReport:
    """Everything ``inspect`` shows; ``to_dict`` is its JSON."""

    source: str
    size_bytes: int
    external_data_bytes: int
    external_files: list[str]
    ir_version: int
    producer: str
    opsets: dict[str, int]
    metadata_keys: list[str]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    nodes: int
    ops: dict[str, int]
    subgraphs: int
    params: int
    params_by_dtype: dict[str, int]
    bytes_by_dtype: dict[str, int]
    weight_locations: dict[str, dict[str, int]]
    largest_weights: list[WeightInfo]
    technique_bytes: dict[str, int]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (schema_version 1)."""
        return jsonable(
            {"schema_version": SCHEMA_VERSION, "tool": tool_versions(), "command": "inspect", **asdict(self)}
        )

    def to_json(self) -> str:
        """Pretty JSON text with a trailing newline."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"


def _location(w: Weight, model: ir.Model) -> str:
    parts = ["constant node" if w.kind == "constant" else "initializer"]
    if in_subgraph(w, model):
        parts.append("in subgraph")
    if w.external:
        parts.append("external data")
    return ", ".join(parts)


def _eligible(w: Weight, ops: frozenset[str] | None) -> bool:
    if ops is None:  # every float weight
        return w.dtype in FLOAT_TYPES and not w.is_graph_input
    if w.dtype not in FLOAT_TYPES or w.size < _MIN_ELEMENTS or w.is_graph_input:
        return False
    consumer_ops = w.consumer_ops()
    return bool(consumer_ops) and all(op in ops for op in consumer_ops)


def _io_info(values: list[ir.Value]) -> list[TensorInfo]:
    infos = []
    for v in values:
        vtype = v.type
        type_text = dtype_name(vtype.dtype) if isinstance(vtype, ir.TensorType) else str(vtype)
        shape = (
            "?"
            if v.shape is None
            else "[" + ",".join(str(d) if d is not None else "?" for d in v.shape) + "]"
        )
        infos.append(TensorInfo(v.name or "", type_text, shape))
    return infos


def inspect_model(loaded: LoadedModel) -> InspectReport:
    """Summarize a loaded model without reading its weight bytes."""
    model = loaded.model
    ws = weights(model)
    by_dtype: Counter[str] = Counter()
    bytes_dtype: Counter[str] = Counter()
    locations: dict[str, dict[str, int]] = {}
    for w in ws:
        key = dtype_name(w.dtype)
        by_dtype[key] += w.size
        bytes_dtype[key] += w.nbytes
        loc_keys = ["constant_nodes" if w.kind == "constant" else "initializers"]
        if in_subgraph(w, model):
            loc_keys.append("subgraphs")
        if w.external:
            loc_keys.append("external_data")
        for lk in loc_keys:
            entry = locations.setdefault(lk, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += w.nbytes
    largest = sorted(ws, key=lambda w: (-w.nbytes, w.name))[:_TOP_WEIGHTS]
    technique_bytes = {
        name: sum(w.nbytes for w in ws if _eligible(w, ops)) for name, ops in _TECHNIQUE_OPS.items()
    }
    warnings = []
    specs = input_specs(model)
    for spec in specs:
        if spec.dims is not None and any(not isinstance(d, int) for d in spec.dims):
            dyn = [str(d) if d else "?" for d in spec.dims if not isinstance(d, int)]
            warnings.append(
                f"input '{spec.name}' has dynamic dims ({', '.join(dyn)}): verification uses 1 "
                f"unless --input-shape {spec.name}:... or --data is given"
            )
    producer = " ".join(p for p in (model.producer_name, model.producer_version) if p)
    return InspectReport(
        source=loaded.label,
        size_bytes=loaded.size_bytes,
        external_data_bytes=loaded.external_bytes,
        external_files=[p.name for p in loaded.external_files],
        ir_version=model.ir_version,
        producer=producer,
        opsets=dict(sorted(model.opset_imports.items())),
        metadata_keys=sorted(model.metadata_props),
        inputs=_io_info([v for v in model.graph.inputs if not v.is_initializer()]),
        outputs=_io_info(list(model.graph.outputs)),
        nodes=sum(1 for _ in all_nodes(model)),
        ops=op_histogram(model),
        subgraphs=sum(1 for _ in model.graph.subgraphs()),
        params=sum(by_dtype.values()),
        params_by_dtype=dict(sorted(by_dtype.items())),
        bytes_by_dtype=dict(sorted(bytes_dtype.items())),
        weight_locations=dict(sorted(locations.items())),
        largest_weights=[
            WeightInfo(
                name=w.name,
                dtype=dtype_name(w.dtype),
                shape=list(w.shape),
                bytes=w.nbytes,
                location=_location(w, model),
                consumers=[f"{node.name or '?'} ({op_key(node)})" for node, _ in w.consumers()],
            )
            for w in largest
        ],
        technique_bytes=technique_bytes,
        warnings=warnings,
    )


def _kv_table(rows: Mapping[str, str]) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows.items():
        table.add_row(k, Text(v))
    return table


def render_inspect(report: InspectReport, console: Console) -> None:
    """Print the inspection for people."""
    console.print(Text(f"modelshrink inspect: {report.source}", style="bold"))
    opsets = ", ".join(f"{k or 'ai.onnx'} {v}" for k, v in report.opsets.items())
    size = human_bytes(report.size_bytes)
    if report.external_data_bytes:
        size += f" ({human_bytes(report.external_data_bytes)} external: {', '.join(report.external_files)})"
    console.print(
        _kv_table(
            {
                "size": size,
                "IR version": str(report.ir_version),
                "opsets": opsets,
                "producer": report.producer or "-",
                "metadata": ", ".join(report.metadata_keys) or "-",
                "nodes": f"{report.nodes} ({len(report.ops)} op types, {report.subgraphs} subgraphs)",
                "parameters": f"{human_count(report.params)} "
                + "("
                + ", ".join(f"{k} {human_count(v)}" for k, v in report.params_by_dtype.items())
                + ")",
            }
        )
    )
    io_table = Table(box=box.SIMPLE, show_edge=False, pad_edge=False)
    for col in ("", "name", "type", "shape"):
        io_table.add_column(col)
    for kind, infos in (("input", report.inputs), ("output", report.outputs)):
        for info in infos:
            io_table.add_row(kind, Text(info.name), Text(info.type), Text(info.shape))
    console.print(io_table)
    ops = Table(box=box.SIMPLE, show_edge=False, pad_edge=False, title="ops", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in sorted(report.ops.items(), key=lambda kv: (-kv[1], kv[0]))[:20]:
        ops.add_row(Text(op), str(count))
    if len(report.ops) > 20:
        ops.add_row(f"... {len(report.ops) - 20} more", "")
    console.print(ops)
    big = Table(
        box=box.SIMPLE, show_edge=False, pad_edge=False, title="largest weights", title_justify="left"
    )
    for col in ("weight", "dtype", "shape", "size", "where", "used by"):
        big.add_column(col)
    for w in report.largest_weights:
        used = ", ".join(w.consumers[:3]) + (f" +{len(w.consumers) - 3}" if len(w.consumers) > 3 else "")
        shape = "x".join(map(str, w.shape)) or "scalar"
        big.add_row(Text(w.name), w.dtype, shape, human_bytes(w.bytes), w.location, Text(used))
    console.print(big)
    where = Table(
        box=box.SIMPLE, show_edge=False, pad_edge=False, title="where weights live", title_justify="left"
    )
    where.add_column("location")
    where.add_column("tensors", justify="right")
    where.add_column("bytes", justify="right")
    for loc, entry in report.weight_locations.items():
        where.add_row(loc.replace("_", " "), str(entry["count"]), human_bytes(entry["bytes"]))
    console.print(where)
    total = sum(report.bytes_by_dtype.values()) or 1
    tech = Table(
        box=box.SIMPLE,
        show_edge=False,
        pad_edge=False,
        title="weight bytes each technique can act on",
        title_justify="left",
    )
    tech.add_column("technique")
    tech.add_column("bytes", justify="right")
    tech.add_column("share", justify="right")
    for name, nbytes in report.technique_bytes.items():
        tech.add_row(name, human_bytes(nbytes), f"{nbytes / total:.0%}")
    console.print(tech)
    for warning in report.warnings:
        console.print(Text(f"warning: {warning}", style="yellow"))
