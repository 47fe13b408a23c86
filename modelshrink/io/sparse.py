"""Sparse tensors: read as dense ones carrying a mark, written back sparse where that is smaller.

onnx-ir has no sparse tensors. Reading turns a model's sparse tensors into dense ones
(:func:`from_sparse_storage`, on the protobuf before onnx-ir sees it); writing turns marked
ones back (:func:`serialized`). A Constant whose tensor carries the metadata entry
``SPARSE_STORAGE_KEY: SPARSE_STORAGE_VALUE`` (prune sets it, see
``techniques/prune/_sparse.py``) is written as an ONNX sparse tensor (``sparse_value``) when
that is smaller. Sparse tensors read from a model become dense ones carrying the entry, so
sparse Constants are written back sparse; sparse initializers come back as dense initializers.
Sparse storage exists only inline: a model with marks is written as one file.

A sparse tensor is densified when read, so a tiny file declaring huge dims is refused rather
than allocated (see ``_MAX_DENSE_BYTES``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir

from modelshrink.errors import InvalidModelError
from modelshrink.io.external import all_tensors

__all__ = [
    "SPARSE_STORAGE_KEY",
    "SPARSE_STORAGE_VALUE",
    "from_sparse_storage",
    "has_sparse_marks",
    "serialized",
]

# A Constant whose tensor carries this metadata entry is written as an ONNX sparse tensor
# (``sparse_value``) when that is smaller. Sparse tensors read from a model become dense ones
# (onnx-ir has no sparse tensors) carrying the entry, so sparse Constants are written back
# sparse; sparse initializers come back as dense initializers.
SPARSE_STORAGE_KEY = "modelshrink.storage"
# A sparse tensor is densified when read: refused when its dense form would pass 2 GiB (one
# protobuf could not hold it anyway), or 256 MiB and 1000x the bytes it stores (a tiny file
# declaring huge dims must not become a multi-GB allocation).
_MAX_DENSE_BYTES = 1 << 31
_SMALL_DENSE_BYTES = 1 << 28
_MAX_DENSE_RATIO = 1000
SPARSE_STORAGE_VALUE = "sparse"


def _proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _proto_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _proto_graphs(sub)


def _is_constant(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


# --- reading ---------------------------------------------------------------------------------


def _check_dense_size(sparse: onnx.SparseTensorProto, where: str) -> None:
    """Refuse a sparse tensor whose declared dense form would be a huge allocation from little data."""
    try:
        itemsize = ir.DataType(sparse.values.data_type).itemsize
    except ValueError as exc:
        raise InvalidModelError(
            f"{where}: sparse tensor '{sparse.values.name}' has unknown data type {sparse.values.data_type}"
        ) from exc
    dense = float(np.prod(list(sparse.dims), dtype=np.float64)) * itemsize
    stored = sparse.values.ByteSize() + sparse.indices.ByteSize()
    if dense > _MAX_DENSE_BYTES or (dense > _SMALL_DENSE_BYTES and dense > _MAX_DENSE_RATIO * stored):
        raise InvalidModelError(
            f"{where}: sparse tensor '{sparse.values.name}' declares dims {list(sparse.dims)} "
            f"({dense / 1e9:.3g} GB dense) for {stored} bytes of values; refusing to densify it"
        )


def _dense_of(sparse: onnx.SparseTensorProto) -> onnx.TensorProto:
    values = onnx.numpy_helper.to_array(sparse.values)
    indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
    dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
    if indices.ndim == 1:
        dense.reshape(-1)[indices] = values
    else:
        dense[tuple(indices.T)] = values
    tensor = onnx.numpy_helper.from_array(dense, sparse.values.name)
    tensor.metadata_props.add(key=SPARSE_STORAGE_KEY, value=SPARSE_STORAGE_VALUE)
    return tensor


def from_sparse_storage(proto: onnx.ModelProto, label: str) -> None:
    """Sparse initializers and ``sparse_value`` Constants -> dense ones carrying the mark."""
    for graph in _proto_graphs(proto.graph):
        for sparse in graph.sparse_initializer:
            _check_dense_size(sparse, label)
            graph.initializer.append(_dense_of(sparse))
        del graph.sparse_initializer[:]
        for node in graph.node:
            if not _is_constant(node):
                continue
            for attr in node.attribute:
                if attr.name == "sparse_value" and attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    _check_dense_size(attr.sparse_tensor, label)
                    dense = _dense_of(attr.sparse_tensor)
                    attr.Clear()
                    attr.CopyFrom(onnx.helper.make_attribute("value", dense))


# --- writing ---------------------------------------------------------------------------------


def _pop_mark(tensor: onnx.TensorProto) -> bool:
    """Remove every sparse-storage entry (serialization may repeat it); True if one asked for it."""
    keep = [(e.key, e.value) for e in tensor.metadata_props if e.key != SPARSE_STORAGE_KEY]
    marked = any(
        e.key == SPARSE_STORAGE_KEY and e.value == SPARSE_STORAGE_VALUE for e in tensor.metadata_props
    )
    if len(keep) != len(tensor.metadata_props):
        del tensor.metadata_props[:]
        for key, value in keep:
            tensor.metadata_props.add(key=key, value=value)
    return marked


def _sparse_of(tensor: onnx.TensorProto) -> onnx.SparseTensorProto | None:
    """The sparse form (flat int64 indices) of a tensor when it is smaller, else None."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    dense = onnx.numpy_helper.to_array(tensor)
    flat = dense.reshape(-1)
    nonzero = np.flatnonzero(flat)
    values = onnx.numpy_helper.from_array(flat[nonzero], tensor.name)
    indices = onnx.numpy_helper.from_array(nonzero.astype(np.int64), "")
    sparse = onnx.helper.make_sparse_tensor(values, indices, list(tensor.dims))
    return sparse if sparse.ByteSize() < tensor.ByteSize() else None


def _to_sparse_storage(proto: onnx.ModelProto) -> None:
    """Marked Constant tensors -> ``sparse_value`` where smaller; every mark removed."""
    for graph in _proto_graphs(proto.graph):
        for tensor in graph.initializer:
            _pop_mark(tensor)
        for node in graph.node:
            if not _is_constant(node):
                continue
            for attr in node.attribute:
                if attr.name != "value" or attr.type != onnx.AttributeProto.TENSOR or not _pop_mark(attr.t):
                    continue
                sparse = _sparse_of(attr.t)
                if sparse is not None:
                    attr.Clear()
                    attr.CopyFrom(onnx.helper.make_attribute("sparse_value", sparse))


def has_sparse_marks(model: ir.Model) -> bool:
    """Whether any tensor of the model asks for sparse storage."""
    return any(t.metadata_props.get(SPARSE_STORAGE_KEY) for _, t in all_tensors(model))


def serialized(model: ir.Model) -> onnx.ModelProto:
    """The model as one protobuf, marked Constants in sparse form (tensors must be in memory)."""
    proto = ir.serde.serialize_model(model)
    _to_sparse_storage(proto)
    return proto
