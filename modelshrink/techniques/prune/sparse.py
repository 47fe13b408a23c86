"""``--sparse-storage``: keep a pruned tensor as an ONNX sparse tensor where that is smaller.

The tensor becomes a ``Constant`` node whose value is written as ``sparse_value`` (a
``SparseTensorProto``: the non-zero values plus their flat int64 positions, the index type
``onnx.checker`` requires) by :mod:`modelshrink.io`. A graph-level ``sparse_initializer`` was not
used: onnx's own full check (shape inference) rejects it, while ``Constant(sparse_value)``
passes it; onnxruntime loads both, densifying at load time, so inference cost is unchanged.
Per element the sparse form costs ``itemsize + 8`` bytes per non-zero: it is smaller only
above ``8 / (itemsize + 8)`` zeros (67 % for float32, 80 % for float16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from modelshrink.graph import NameAuthority, weights
from modelshrink.io import SPARSE_STORAGE_KEY, SPARSE_STORAGE_VALUE
from modelshrink.techniques.prune.unstructured import Target

__all__ = ["SPARSE_DTYPES", "StorageResult", "store_sparse"]

# Element types verified (tests) to load as sparse Constants in onnxruntime's CPU provider.
SPARSE_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})
_INDEX_BYTES = 8
_OVERHEAD_BYTES = 32


@dataclass
class StorageResult:
    """Which pruned tensors were stored sparse, and why the others were not."""

    stored: dict[str, int]  # weight name -> estimated bytes saved
    dense: dict[str, str]  # weight name -> reason


def _marked(tensor: ir.TensorProtocol) -> ir.Tensor:
    props = dict(tensor.metadata_props)
    props[SPARSE_STORAGE_KEY] = SPARSE_STORAGE_VALUE
    return ir.Tensor(np.asarray(tensor.numpy()), dtype=tensor.dtype, name=tensor.name, metadata_props=props)


def store_sparse(model: ir.Model, targets: Sequence[Target]) -> StorageResult:
    """Mark every pruned target for sparse storage where smaller; initializers become Constants."""
    result = StorageResult({}, {})
    names = NameAuthority(model)
    wanted = {t.name for t in targets}
    for w in weights(model):
        name = w.name
        if name not in wanted:
            continue
        if w.dtype not in SPARSE_DTYPES:
            result.dense[name] = (
                f"{w.dtype.name.lower()} sparse tensors are not verified to load in onnxruntime"
            )
            continue
        itemsize = w.nbytes // max(w.size, 1)
        nonzero = int(np.count_nonzero(np.asarray(w.numpy())))
        sparse_bytes = nonzero * (itemsize + _INDEX_BYTES) + _OVERHEAD_BYTES
        if sparse_bytes >= w.nbytes:
            result.dense[name] = (
                f"dense is smaller ({100 * (1 - nonzero / max(w.size, 1)):.1f}% zeros; sparse needs "
                f"more than {100 * _INDEX_BYTES / (itemsize + _INDEX_BYTES):.0f}%)"
            )
            continue
        if w.value.is_graph_output():
            result.dense[name] = "it is also a graph output"
            continue
        tensor = _marked(w.tensor)
        if w.kind == "constant":
            assert w.node is not None
            w.node.attributes["value"] = ir.AttrTensor("value", tensor)
        else:
            _initializer_to_constant(w.graph, w.value, tensor, names)
        result.stored[name] = w.nbytes - sparse_bytes
    return result


def _initializer_to_constant(
    graph: ir.Graph, value: ir.Value, tensor: ir.Tensor, names: NameAuthority
) -> None:
    name = value.name or ""
    graph.initializers.pop(name)
    node = ir.Node(
        "",
        "Constant",
        inputs=(),
        attributes=[ir.AttrTensor("value", tensor)],
        num_outputs=1,
        name=names.fresh(f"{name}_sparse"),
    )
    out = node.outputs[0]
    value.replace_all_uses_with(out)
    value.name = None
    out.name = name
    out.dtype = tensor.dtype
    out.shape = ir.Shape(tensor.shape.numpy())
    first = next(iter(graph), None)
    if first is None:
        graph.append(node)
    else:
        graph.insert_before(first, node)
