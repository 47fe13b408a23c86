"""Tiny models for tests, built in code with seeded weights (no downloads, no torch)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(graph: onnx.GraphProto, opset: int = OPSET, ir_version: int = 8, **kw: object) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kw)
    model.ir_version = ir_version
    model.producer_name = "modelshrink-tests"
    onnx.checker.check_model(model, full_check=True)
    return model


def init(name: str, array: np.ndarray) -> TensorProto:
    """An initializer from an array."""
    return numpy_helper.from_array(np.asarray(array), name)


def mlp(
    seed: int = 0, sizes: tuple[int, ...] = (16, 32, 10), *, batch: str | int = "batch"
) -> onnx.ModelProto:
    """MatMul + Add + Relu layers; input ``x`` [batch, sizes[0]], output ``logits``."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        w, b = f"W{i}", f"b{i}"
        inits += [
            init(w, (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)),
            init(b, (0.1 * rng.standard_normal(n_out)).astype(np.float32)),
        ]
        last = i == len(sizes) - 2
        mm, out = f"mm{i}", ("logits" if last else f"h{i}")
        nodes.append(helper.make_node("MatMul", [prev, w], [mm], name=f"fc{i}"))
        nodes.append(helper.make_node("Add", [mm, b], [out if last else f"a{i}"], name=f"bias{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [out], name=f"relu{i}"))
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, sizes[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, sizes[-1]])],
        inits,
    )
    model = _model(graph)
    model.metadata_props.add(key="classes", value=",".join(str(i) for i in range(sizes[-1])))
    model.doc_string = "tiny test MLP"
    return model


def conv_net(seed: int = 0) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> MaxPool -> Flatten -> Gemm; input ``image`` [N,3,8,8]."""
    rng = np.random.default_rng(seed)
    c = 8
    inits = [
        init("conv_w", (rng.standard_normal((c, 3, 3, 3)) * 0.3).astype(np.float32)),
        init("conv_b", (rng.standard_normal(c) * 0.1).astype(np.float32)),
        init("bn_scale", (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)),
        init("bn_bias", (0.1 * rng.standard_normal(c)).astype(np.float32)),
        init("bn_mean", (0.1 * rng.standard_normal(c)).astype(np.float32)),
        init("bn_var", (1 + 0.1 * rng.random(c)).astype(np.float32)),
        init("fc_w", (rng.standard_normal((10, c * 4 * 4)) * 0.1).astype(np.float32)),
        init("fc_b", (rng.standard_normal(10) * 0.1).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"], name="bn"
        ),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return _model(graph)


def constant_and_subgraph(seed: int = 0) -> onnx.ModelProto:
    """Weights in a Constant node and inside both branches of an If."""
    rng = np.random.default_rng(seed)
    w_main = rng.standard_normal((8, 8)).astype(np.float32)
    w_then = rng.standard_normal((8, 8)).astype(np.float32)
    const = helper.make_node(
        "Constant", [], ["w_const"], name="const_w", value=numpy_helper.from_array(w_main, "w_const_value")
    )
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w_then"], ["y_then"], name="then_mm")],
        "then",
        [],
        [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, ["batch", 8])],
        [init("w_then", w_then)],
    )
    else_g = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w_const"], ["y_else"], name="else_mm")],
        "else",
        [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, ["batch", 8])],
    )
    nodes = [
        const,
        helper.make_node("MatMul", ["x", "w_const"], ["h"], name="main_mm"),
        helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=then_g, else_branch=else_g),
    ]
    graph = helper.make_graph(
        nodes,
        "sub",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )
    return _model(graph)


def token_model(seed: int = 0, vocab: int = 50) -> onnx.ModelProto:
    """Gather embedding over int64 ``ids`` [batch, seq] then ReduceMean; two outputs."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
            helper.make_node("ReduceMean", ["e"], ["pooled"], name="pool", axes=[1], keepdims=0),
            helper.make_node("MatMul", ["pooled", "head"], ["logits"], name="head_mm"),
        ],
        "tok",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 16]),
        ],
        [
            init("emb", rng.standard_normal((vocab, 16)).astype(np.float32)),
            init("head", rng.standard_normal((16, 4)).astype(np.float32)),
        ],
    )
    return _model(graph)


def every_weight_kind(opset: int = OPSET, ir_version: int | None = None, seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Flatten -> Gemm -> Relu -> MatMul -> MatMul -> Add, valid at opsets 7..28.

    Weights as initializers (``conv_w``, ``fc_w``), in a ``Constant`` node (``const_w``) and as
    a graph input with an initializer default (``w_in``, which callers may override). Input
    ``x`` [1, 3, 8, 8]; output ``y`` [1, 16]. ``ir_version`` defaults to the lowest the opset
    allows, but at least 4; IR 3 lists every initializer as a graph input, as it must.
    """
    rng = np.random.default_rng(seed)
    inits = [
        init("conv_w", (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)),
        init("conv_b", (0.1 * rng.standard_normal(8)).astype(np.float32)),
        init("fc_w", (rng.standard_normal((512, 32)) / np.sqrt(512)).astype(np.float32)),
        init("fc_b", (0.1 * rng.standard_normal(32)).astype(np.float32)),
        init("w_in", (rng.standard_normal((16, 16)) / 4).astype(np.float32)),
        init("bias", (0.1 * rng.standard_normal(16)).astype(np.float32)),
    ]
    const_w = (rng.standard_normal((32, 16)) / np.sqrt(32)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["g"], name="fc"),
        helper.make_node("Relu", ["g"], ["h"], name="relu2"),
        helper.make_node("Constant", [], ["const_w"], name="const", value=numpy_helper.from_array(const_w)),
        helper.make_node("MatMul", ["h", "const_w"], ["m"], name="mm_const"),
        helper.make_node("MatMul", ["m", "w_in"], ["o"], name="mm_input"),
        helper.make_node("Add", ["o", "bias"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "kinds",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
            helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [16, 16]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        inits,
    )
    lowest = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    ir_version = ir_version or max(lowest, 4)
    if ir_version < 4:  # IR 3: every initializer must also be a graph input
        listed = {i.name for i in graph.input}
        for tensor in inits:
            if tensor.name not in listed:
                graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return _model(graph, opset=opset, ir_version=ir_version)


def loop_model(seed: int = 0) -> onnx.ModelProto:
    """A Loop (3 trips) whose body multiplies the carried state by a body initializer ``w_body``."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
            helper.make_node("MatMul", ["v_in", "w_body"], ["mv"], name="body_mm"),
            helper.make_node("Tanh", ["mv"], ["v_out"], name="body_tanh"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [2, 16]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [2, 16]),
        ],
        [init("w_body", (rng.standard_normal((16, 16)) / 4).astype(np.float32))],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "go", "x"], ["y"], name="loop", body=body)],
        "loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        [init("trips", np.array(3, np.int64)), init("go", np.array(True))],
    )
    return _model(graph)


def scan_model(seed: int = 0) -> onnx.ModelProto:
    """A Scan over 4 steps: state += x_t @ w_scan (a body initializer); outputs the final state."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "w_scan"], ["m"], name="scan_mm"),
            helper.make_node("Add", ["s_in", "m"], ["s_out"], name="scan_add"),
            helper.make_node("Relu", ["m"], ["y_t"], name="scan_relu"),
        ],
        "scan_body",
        [
            helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [16]),
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [16]),
        ],
        [
            helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [16]),
            helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [16]),
        ],
        [init("w_scan", (rng.standard_normal((16, 16)) / 4).astype(np.float32))],
    )
    graph = helper.make_graph(
        [helper.make_node("Scan", ["s0", "xs"], ["s", "ys"], name="scan", body=body, num_scan_inputs=1)],
        "scan",
        [helper.make_tensor_value_info("xs", TensorProto.FLOAT, [4, 16])],
        [
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [16]),
            helper.make_tensor_value_info("ys", TensorProto.FLOAT, [4, 16]),
        ],
        [init("s0", np.zeros(16, np.float32))],
    )
    return _model(graph)


def run_time_weights_model(seed: int = 0) -> onnx.ModelProto:
    """Weights made at run time: a Conv kernel by ConstantOfShape, a MatMul weight by Transpose."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node(
            "ConstantOfShape",
            ["k_shape"],
            ["conv_w"],
            name="fill",
            value=numpy_helper.from_array(np.array([0.02], np.float32)),
        ),
        helper.make_node("Conv", ["x", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
        helper.make_node("Transpose", ["w_t"], ["fc_w"], name="tr"),
        helper.make_node("MatMul", ["f", "fc_w"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "run_time",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [
            init("k_shape", np.array([32, 3, 3, 3], np.int64)),
            init("w_t", (rng.standard_normal((10, 32 * 64)) * 0.02).astype(np.float32)),
        ],
    )
    return _model(graph)


# Input channels of the outlier model's LayerNorm outputs that are 20-100x the others.
OUTLIER_CHANNELS = {5: 20.0, 17: 45.0, 33: 70.0, 50: 100.0}


def outlier_transformer(seed: int = 0, d: int = 64, hidden: int = 256, seq: int = 8) -> onnx.ModelProto:
    """A pre-norm transformer-like block whose LayerNorm outputs carry outlier channels.

    ``x`` [batch, seq, d] -> LayerNorm (gamma 20-100x on :data:`OUTLIER_CHANNELS`) -> MatMul
    ``W1`` + bias -> Relu -> MatMul ``W2`` + bias -> residual Add -> LayerNorm (same outliers)
    -> MatMul ``W3`` -> mean over seq -> MatMul ``head`` -> ``logits`` [batch, 10]. As in
    trained LLMs, the weights reading an outlier channel are smaller (by the square root of its
    factor), so the channel still dominates the layer's output but not its weight range.
    """
    rng = np.random.default_rng(seed)
    gamma = np.ones(d, np.float32)
    for c, f in OUTLIER_CHANNELS.items():
        gamma[c] = f

    def weight(rows: int, cols: int, outliers: bool) -> np.ndarray:
        w = rng.standard_normal((rows, cols)) / np.sqrt(rows)
        if outliers:
            for c, f in OUTLIER_CHANNELS.items():
                w[c] /= np.sqrt(f)
        return w.astype(np.float32)

    inits = [
        init("gamma1", gamma),
        init("beta1", (0.1 * rng.standard_normal(d)).astype(np.float32)),
        init("W1", weight(d, hidden, True)),
        init("b1", (0.1 * rng.standard_normal(hidden)).astype(np.float32)),
        init("W2", weight(hidden, d, False)),
        init("b2", (0.1 * rng.standard_normal(d)).astype(np.float32)),
        init("gamma2", gamma.copy()),
        init("beta2", (0.1 * rng.standard_normal(d)).astype(np.float32)),
        init("W3", weight(d, d, True)),
        init("head", weight(d, 10, False)),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma1", "beta1"], ["n1"], name="ln1", axis=-1),
        helper.make_node("MatMul", ["n1", "W1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
        helper.make_node("Relu", ["a1"], ["h1"], name="act"),
        helper.make_node("MatMul", ["h1", "W2"], ["m2"], name="fc2"),
        helper.make_node("Add", ["m2", "b2"], ["a2"], name="fc2_bias"),
        helper.make_node("Add", ["a2", "x"], ["r"], name="residual"),
        helper.make_node("LayerNormalization", ["r", "gamma2", "beta2"], ["n2"], name="ln2", axis=-1),
        helper.make_node("MatMul", ["n2", "W3"], ["m3"], name="proj"),
        helper.make_node("ReduceMean", ["m3"], ["pooled"], name="pool", axes=[1], keepdims=0),
        helper.make_node("MatMul", ["pooled", "head"], ["logits"], name="head_mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "outlier_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, d])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    return _model(graph)


def outlier_rows(rows: int, seed: int = 1, d: int = 64, seq: int = 8) -> dict[str, np.ndarray]:
    """Inputs for :func:`outlier_transformer` (``x`` [rows, seq, d], standard normal)."""
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((rows, seq, d)).astype(np.float32)}


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Write a model file for a test."""
    onnx.save(model, str(path))
    return path


def save_external(model: onnx.ModelProto, path: Path, location: str | None = None) -> Path:
    """Write a model with every initializer in one external data file next to it."""
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location or path.name + ".data",
        size_threshold=0,
    )
    return path


# --- big models with external data (bench/ and the memory tests) -----------------------------


def external_tensor(name: str, dims: list[int], location: str, offset: int, length: int) -> TensorProto:
    """A float32 initializer whose bytes are ``length`` bytes at ``offset`` in ``location``."""
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def low_rank_external_model(
    folder: Path,
    total_bytes: float,
    rows: int = 1024,
    cols: int = 4096,
    rank: int = 64,
    name: str = "big.onnx",
) -> Path:
    """``y = sum_i x @ W_i`` with float32 ``W_i[rows, cols]`` in one external data file.

    Each ``W_i = A_i B_i / sqrt(rows * rank) + noise`` (``A_i [rows, rank]``, ``B_i [rank, cols]``,
    noise at 0.25% of the energy): compressible the way trained layers are, so that factorize
    has something to do, and ``x @ W_i`` stays of unit scale for any number of branches.
    Written tensor by tensor straight to disk (little memory); seeded, so reproducible.
    """
    folder.mkdir(parents=True, exist_ok=True)
    per = rows * cols * 4
    count = max(1, round(total_bytes / per))
    data_name = f"{name}.data"
    rng = np.random.default_rng(0)
    inits, nodes, outs = [], [], []
    with (folder / data_name).open("wb") as f:
        for i in range(count):
            a = rng.standard_normal((rows, rank), dtype=np.float32)
            b = rng.standard_normal((rank, cols), dtype=np.float32)
            w = (a @ b) / np.float32(np.sqrt(rows * rank))
            w += rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.05 / np.sqrt(rows))
            offset = f.tell()
            f.write(w.tobytes())
            inits.append(external_tensor(f"W{i}", [rows, cols], data_name, offset, per))
            nodes.append(helper.make_node("MatMul", ["x", f"W{i}"], [f"h{i}"], name=f"mm{i}"))
            outs.append(f"h{i}")
    nodes.append(helper.make_node("Sum", outs, ["y"], name="sum"))
    graph = helper.make_graph(
        nodes,
        "big_low_rank",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (folder / name).write_bytes(model.SerializeToString())
    return folder / name
