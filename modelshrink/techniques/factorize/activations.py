"""Collect each layer's input statistics ``XᵀX`` by running the model on the real feeds.

The model is copied with every layer input exposed as an extra graph output, run once per
feed in onnxruntime, and the Gram matrices are accumulated in float64 (Conv inputs are
unfolded into patches with the layer's own stride, padding and dilation; embedding lookups
count tokens). Only inputs of the main graph can be exposed: layers inside ``If``/``Loop``
bodies fall back to plain SVD with a reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from modelshrink.feeds import Feeds
from modelshrink.runtime import RuntimeOptions
from modelshrink.sessions import session_for_model
from modelshrink.techniques.base import Progress
from modelshrink.techniques.factorize.decompose import Gram
from modelshrink.techniques.factorize.layers import Consumer, Group
from modelshrink.techniques.layerwise import conv_patches

__all__ = ["collect_grams", "conv_patches"]

logger = logging.getLogger(__name__)

_CHUNK_ROWS = 8192


def _unavailable(c: Consumer, model: ir.Model) -> str | None:
    if c.node.graph is not model.graph:
        return "inside a subgraph, where activations are not collected"
    x = c.data
    if x is None or not x.name:
        return "its input has no name"
    if x.const_value is not None or (x.producer() is not None and x.producer().op_type == "Constant"):  # type: ignore[union-attr]
        return "its input is a constant"
    return None


def _trans_a(node: ir.Node) -> bool:
    attr = node.attributes.get("transA")
    return attr is not None and attr.as_int() != 0


def _accumulate(gram: np.ndarray, rows: np.ndarray) -> int:
    for start in range(0, rows.shape[0], _CHUNK_ROWS):
        block = rows[start : start + _CHUNK_ROWS].astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):  # inf activations: decompose() drops the Gram
            gram += block.T @ block
    return int(rows.shape[0])


def collect_grams(
    model: ir.Model,
    groups: Sequence[Group],
    feeds: Feeds,
    runtime: RuntimeOptions,
    progress: Progress,
) -> tuple[dict[int, Gram], dict[int, str]]:
    """Gram matrices for the groups that can have them, and why the others cannot.

    Returns:
        ``{group index: Gram}`` and ``{group index: reason plain SVD is used}``.
    """

    reasons: dict[int, str] = {}
    wanted: dict[int, Group] = {}
    for i, group in enumerate(groups):
        if group.mode == "spatial":
            reasons[i] = "spatial Conv split: its output error is not a whitened SVD"
            continue
        if group.orientation is None:
            reasons[i] = "shared by nodes that read the weight in different orientations"
            continue
        why = next((w for c in group.consumers if (w := _unavailable(c, model))), None)
        if why is not None:
            reasons[i] = why
            continue
        wanted[i] = group
    if not wanted:
        return {}, reasons

    probe = model.clone()
    by_name: dict[str, ir.Value] = {}
    for node in probe.graph:
        for out in node.outputs:
            if out.name:
                by_name[out.name] = out
    input_names = {v.name for v in probe.graph.inputs}
    output_names = {v.name for v in probe.graph.outputs}
    exposed: list[str] = []
    for group in wanted.values():
        for c in group.consumers:
            name = c.data.name if c.data is not None else None
            assert name is not None
            if name in input_names or name in exposed:
                continue
            if name not in output_names:
                probe.graph.outputs.append(by_name[name])
            exposed.append(name)
    session = session_for_model(probe, runtime, label="factorize activation probe")

    grams: dict[int, np.ndarray] = {}
    diags: dict[int, np.ndarray] = {}
    seen: dict[int, int] = dict.fromkeys(wanted, 0)
    total = len(feeds.samples)
    for step, feed in enumerate(feeds.samples):
        feed_in = {k: v for k, v in feed.items() if k in session.input_names}
        values = dict(zip(exposed, session.run(feed_in, exposed), strict=True)) if exposed else {}
        values.update({k: np.asarray(v) for k, v in feed.items()})
        for i, group in wanted.items():
            side_dim = group.cols if group.orientation else group.rows
            for c in group.consumers:
                assert c.data is not None and c.data.name is not None
                x = np.asarray(values[c.data.name])
                if c.kind == "gather":
                    ids = x.astype(np.int64).ravel() % side_dim
                    counts = np.bincount(ids, minlength=side_dim).astype(np.float64)
                    diags[i] = diags.get(i, np.zeros(side_dim)) + counts
                    seen[i] += int(ids.size)
                    continue
                if c.kind == "conv":
                    rows = conv_patches(x, c.node, group.weight.shape[2:])
                elif c.kind == "gemm" and _trans_a(c.node):
                    rows = x.T
                else:
                    rows = x.reshape(-1, side_dim)
                g = grams.setdefault(i, np.zeros((side_dim, side_dim)))
                seen[i] += _accumulate(g, rows)
        progress("collecting activations", step + 1, total)

    result: dict[int, Gram] = {}
    for i, group in wanted.items():
        side: Literal["rows", "cols"] = "cols" if group.orientation else "rows"
        if i in grams and i in diags:
            grams[i][np.diag_indices_from(grams[i])] += diags[i]
            result[i] = Gram(side, grams[i], None, seen[i])
        elif i in grams:
            result[i] = Gram(side, grams[i], None, seen[i])
        else:
            result[i] = Gram(side, None, diags[i], seen[i])
        if seen[i] == 0:
            reasons[i] = "no activations reached it"
            del result[i]
    return result, reasons
