"""Test helpers: a toy technique to drive the pipeline, op counts, and ORT comparisons."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from modelshrink.flags import flag
from modelshrink.graph import weights
from modelshrink.techniques.base import Change, Skip, TechniqueContext, TechniqueResult
from modelshrink.techniques.spec import TechniqueSpec


@dataclass(frozen=True)
class ScaleConfig:
    """Multiply every float weight with at least ``min_elements`` elements by ``factor``."""

    factor: float = flag(1.0, "Multiply the weights by this.")
    min_elements: int = 1


def scale_weights(model: ir.Model, config: ScaleConfig, context: TechniqueContext) -> TechniqueResult:
    """A deliberately simple technique: enough to exercise the pipeline's contracts."""
    model = model.clone()
    changed, skipped = [], []
    for w in weights(model):
        consumer = w.consumers()[0][0] if w.consumers() else None
        name = consumer.name if consumer is not None else w.name
        op = consumer.op_type if consumer is not None else "?"
        if w.size < config.min_elements or w.dtype != ir.DataType.FLOAT:
            skipped.append(Skip(name, op, f"fewer than {config.min_elements} elements"))
            continue
        tensor = ir.Tensor((w.numpy() * np.float32(config.factor)).astype(np.float32), name=w.tensor.name)
        if w.kind == "initializer":
            w.value.const_value = tensor
        else:
            assert w.node is not None
            w.node.attributes["value"] = ir.AttrTensor("value", tensor)
        changed.append(Change(name, op, f"x{config.factor}", w.size, w.size))
    return TechniqueResult(model, tuple(changed), tuple(skipped), notes=("scaled for a test",))


# A technique outside the registry, run through the same front door (api.run, cli.add_technique).
SCALE = TechniqueSpec(
    name="scale",
    config=ScaleConfig,
    entry="helpers:scale_weights",
    help="Scale weights (test only).",
    examples=("modelshrink scale model.onnx -o out.onnx --factor 2",),
)


def op_counts(proto: onnx.ModelProto) -> Counter[str]:
    """Node count per op type in the main graph."""
    return Counter(n.op_type for n in proto.graph.node)
