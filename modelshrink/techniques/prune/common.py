"""Helpers shared by the pruning modes: which weights are eligible, and writing tensors back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from modelshrink.graph import FLOAT_TYPES, Weight, excluded_by, op_key

__all__ = [
    "FLOAT_TYPES",
    "WEIGHT_INPUTS",
    "Eligible",
    "excluded_by",
    "node_label",
    "set_weight",
    "weight_uses",
]


# Which inputs of a known op are weights (the rest are data, biases, shapes...). Ops named in
# --op-types that are not listed here count every constant float input as a weight.
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "MatMul": (0, 1),
    "Gemm": (0, 1),
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gather": (0,),
    "Einsum": tuple(range(16)),
    "LSTM": (1, 2),
    "GRU": (1, 2),
    "RNN": (1, 2),
}


def node_label(node: ir.Node) -> str:
    """The node's name, or ``<OpType #i>`` when it has none."""
    if node.name:
        return node.name
    graph = node.graph
    index = -1
    if graph is not None:
        for i, other in enumerate(graph):
            if other is node:
                index = i
                break
    return f"<{node.op_type} #{index}>"


def weight_uses(
    weight: Weight, op_types: Sequence[str]
) -> tuple[list[tuple[ir.Node, int]], list[tuple[ir.Node, int]]]:
    """Split a weight's uses into (weight inputs of ``op_types``, everything else)."""
    wanted, other = [], []
    for node, idx in weight.consumers():
        key = op_key(node)
        roles = WEIGHT_INPUTS.get(key)
        if key in op_types and (roles is None or idx in roles):
            wanted.append((node, idx))
        else:
            other.append((node, idx))
    return wanted, other


@dataclass(frozen=True)
class Eligible:
    """A weight the pruner will act on, with the uses that make it eligible."""

    weight: Weight
    uses: tuple[tuple[ir.Node, int], ...]

    @property
    def node(self) -> ir.Node:
        """The first consumer: the name the report shows."""
        return self.uses[0][0]

    @property
    def label(self) -> str:
        """Report name: the consumer node."""
        return node_label(self.node)

    @property
    def op_type(self) -> str:
        """Report op type: the consumer's."""
        return op_key(self.node)


def set_weight(weight: Weight, array: np.ndarray | Callable[[], np.ndarray]) -> ir.TensorProtocol:
    """Replace a weight's data in place (initializer or Constant node); returns the new tensor.

    ``array`` may be a function making the array (same shape and dtype): the tensor is then
    computed each time it is read and never held, so a trial candidate of a big model costs
    one tensor of memory at a time while it is written out.
    """
    old = weight.tensor
    tensor: ir.TensorProtocol
    if callable(array):
        make = array

        def evaluate() -> ir.Tensor:
            return ir.Tensor(np.ascontiguousarray(make()), dtype=old.dtype)

        tensor = ir.LazyTensor(
            evaluate,
            dtype=old.dtype,
            shape=ir.Shape(old.shape.numpy()),
            name=old.name,
            doc_string=old.doc_string,
            metadata_props=dict(old.metadata_props) or None,
        )
    else:
        tensor = ir.Tensor(
            np.ascontiguousarray(array),
            dtype=old.dtype,
            name=old.name,
            doc_string=old.doc_string,
            metadata_props=dict(old.metadata_props) or None,
        )
    if weight.kind == "initializer":
        weight.value.const_value = tensor
    else:
        assert weight.node is not None
        weight.node.attributes["value"] = ir.AttrTensor("value", tensor)
    return tensor
