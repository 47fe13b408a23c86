"""Test models that reproduce what real third-party models do to verification.

Each is small (built in code, seeded) but keeps the one property that broke verification on a
real model when every dynamic axis was 1 and every integer input was drawn from {0, 1}:

- :func:`streaming_audio`: a voice-activity-style model (like Silero VAD): ``input [batch,
  samples]``, a recurrent ``state [2, batch, H]`` with the batch on axis 1, and an int64
  scalar ``sr`` compared with 16000 to pick an ``If`` branch; both branches start with a
  reflect ``Pad`` (needs more samples than the pad), and the other branch frames the audio
  in a way 512 samples do not fit.
- :func:`fpn_detector`: a YOLO-style detector with dynamic H and W: stride-2 convolutions,
  a ``Resize`` upsample and a ``Concat`` of the two scales (fails when the map is 1x1).
- :func:`saturating_classifier`: an image classifier whose ``InstanceNormalization`` turns a
  1x1 feature map into its bias: at 1x1 its logits are the same for every input.
- :func:`picky_length`: a model that runs only when its sequence length is a multiple of 777
  (no guess can find it: the user must say).
- :func:`audio_lstm_decoder`: the streaming-audio shape with its decoder an ``LSTM`` inside the
  ``If`` branch an int64 rate picks (every weight of the model lives in a branch but the head).
- :func:`crnn_ocr`: a CRNN text recogniser: Conv feature extractor, the height folded into
  channels, a bidirectional ``LSTM`` over the width, per-frame class scores.

And the shapes of real model families whose weights a technique must reach:

- :func:`crnn_ocr_stacked`: a CRNN / PP-OCR-rec-style text recognizer: a small CNN feature
  extractor, two bidirectional LSTMs over the width, a Linear layer and per-frame class scores
  (most of its weights are LSTM ``W``/``R``).
- :func:`recurrent_zoo`: an LSTM, a GRU and an RNN in each direction, side by side.
- :func:`recurrent_layer`: one LSTM, GRU or RNN in a chosen direction (and layout).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from models import _model, init

__all__ = [
    "DIRECTIONS",
    "GATES",
    "audio_lstm_decoder",
    "crnn_ocr",
    "crnn_ocr_stacked",
    "fpn_detector",
    "picky_length",
    "recurrent_layer",
    "recurrent_zoo",
    "saturating_classifier",
    "streaming_audio",
]


def _conv_w(rng: np.random.Generator, cout: int, cin: int, k: int) -> np.ndarray:
    return (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)


def _branch(
    name: str, frame: int, hop: int, hidden: int, channels: int, rng: np.random.Generator, *, reshape: int = 0
) -> onnx.GraphProto:
    """x [B, L] (outer scope) -> features [B, channels] through reflect Pad and a strided Conv1d."""
    inits = [
        init(f"{name}_pads", np.array([0, 0, 32, 0, 0, 32], dtype=np.int64)),
        init(f"{name}_axes1", np.array([1], dtype=np.int64)),
        init(
            f"{name}_conv_w", (rng.standard_normal((channels, 1, frame)) / np.sqrt(frame)).astype(np.float32)
        ),
        init(f"{name}_conv_b", (0.1 * rng.standard_normal(channels)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["input", f"{name}_axes1"], [f"{name}_x3"], name=f"{name}_unsq"),
        helper.make_node(
            "Pad", [f"{name}_x3", f"{name}_pads"], [f"{name}_pad"], name=f"{name}_pad", mode="reflect"
        ),
    ]
    src = f"{name}_pad"
    if reshape:
        inits.append(init(f"{name}_frames", np.array([1, 1, -1, reshape], dtype=np.int64)))
        nodes.append(
            helper.make_node("Reshape", ["input", f"{name}_frames"], [f"{name}_framed"], name=f"{name}_frame")
        )
        nodes.append(
            helper.make_node(
                "ReduceMean", [f"{name}_framed"], [f"{name}_fm"], name=f"{name}_fmean", keepdims=0
            )
        )
    nodes += [
        helper.make_node(
            "Conv",
            [src, f"{name}_conv_w", f"{name}_conv_b"],
            [f"{name}_c"],
            name=f"{name}_conv",
            strides=[hop],
        ),
        helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"], name=f"{name}_relu"),
        helper.make_node(
            "ReduceMean", [f"{name}_r"], [f"{name}_feat"], name=f"{name}_mean", axes=[2], keepdims=0
        ),
    ]
    out = f"{name}_feat"
    if reshape:
        nodes.append(
            helper.make_node("Add", [f"{name}_feat", f"{name}_fm"], [f"{name}_sum"], name=f"{name}_add")
        )
        out = f"{name}_sum"
    return helper.make_graph(
        nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", channels])], inits
    )


def streaming_audio(
    seed: int = 0, hidden: int = 32, channels: int = 32, rate_picked: bool = False
) -> onnx.ModelProto:
    """A Silero-VAD-like streaming model (see the module docstring); outputs ``output [batch, 1]``
    and ``stateN [2, batch, hidden]``. ``rate_picked``: ``sr`` is compared as
    ``Gather(Reshape(sr, [-1]), 0)``, as silero's op18 export reads it."""
    rng = np.random.default_rng(seed)
    then_branch = _branch("k16", 64, 32, hidden, channels, rng)
    else_branch = _branch("k8", 32, 16, hidden, channels, rng, reshape=384)
    inits = [
        init("sr16k", np.array(16000, dtype=np.int64)),
        init("w_in", (rng.standard_normal((channels, hidden)) / np.sqrt(channels)).astype(np.float32)),
        init("w_rec", (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)),
        init("w_out", (rng.standard_normal((hidden, 1)) / np.sqrt(hidden)).astype(np.float32)),
        init("zero", np.array(0, dtype=np.int64)),
        init("axes0", np.array([0], dtype=np.int64)),
    ]
    rate = "sr"
    nodes = []
    if rate_picked:
        inits.append(init("flat", np.array([-1], dtype=np.int64)))
        nodes += [
            helper.make_node("Reshape", ["sr", "flat"], ["sr_flat"], name="sr_flat"),
            helper.make_node("Gather", ["sr_flat", "zero"], ["sr_first"], name="sr_first", axis=0),
        ]
        rate = "sr_first"
    nodes += [
        helper.make_node("Equal", [rate, "sr16k"], ["is16k"], name="sr_is_16k"),
        helper.make_node(
            "If", ["is16k"], ["feat"], name="by_rate", then_branch=then_branch, else_branch=else_branch
        ),
        helper.make_node("Gather", ["state", "zero"], ["h"], name="h_prev", axis=0),
        helper.make_node("MatMul", ["feat", "w_in"], ["a"], name="in_proj"),
        helper.make_node("MatMul", ["h", "w_rec"], ["b"], name="rec_proj"),
        helper.make_node("Add", ["a", "b"], ["ab"], name="mix"),
        helper.make_node("Tanh", ["ab"], ["h_new"], name="cell"),
        helper.make_node("MatMul", ["h_new", "w_out"], ["logit"], name="head"),
        helper.make_node("Sigmoid", ["logit"], ["output"], name="prob"),
        helper.make_node("Unsqueeze", ["h_new", "axes0"], ["h_new3"], name="h_unsq"),
        helper.make_node("Concat", ["h_new3", "h_new3"], ["stateN"], name="state_out", axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "streaming_audio",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "samples"]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", hidden]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", hidden]),
        ],
        inits,
    )
    return _model(graph)


def fpn_detector(seed: int = 0) -> onnx.ModelProto:
    """image [N, 3, H, W] -> strides 2, 4, 8 -> upsample the stride-8 map, concat with stride 4
    -> 1x1 head: ``boxes [N, 6, H/4, W/4]`` (4 box values, objectness, one class score)."""
    rng = np.random.default_rng(seed)
    inits = [
        init("c1_w", _conv_w(rng, 16, 3, 3)),
        init("c2_w", _conv_w(rng, 32, 16, 3)),
        init("c3_w", _conv_w(rng, 32, 32, 3)),
        init("head_w", _conv_w(rng, 6, 64, 1)),
        init("head_b", (0.1 * rng.standard_normal(6)).astype(np.float32)),
        init("up_scales", np.array([1, 1, 2, 2], dtype=np.float32)),
    ]
    conv = {"strides": [2, 2], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["image", "c1_w"], ["s2"], name="stem", **conv),
        helper.make_node("Relu", ["s2"], ["s2r"], name="stem_relu"),
        helper.make_node("Conv", ["s2r", "c2_w"], ["s4"], name="down4", **conv),
        helper.make_node("Relu", ["s4"], ["s4r"], name="down4_relu"),
        helper.make_node("Conv", ["s4r", "c3_w"], ["s8"], name="down8", **conv),
        helper.make_node("Relu", ["s8"], ["s8r"], name="down8_relu"),
        helper.make_node("Resize", ["s8r", "", "up_scales"], ["up"], name="upsample", mode="nearest"),
        helper.make_node("Concat", ["up", "s4r"], ["fused"], name="neck_concat", axis=1),
        helper.make_node("Conv", ["fused", "head_w", "head_b"], ["boxes"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "fpn_detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 6, "h", "w"])],
        inits,
    )
    return _model(graph)


def saturating_classifier(seed: int = 0) -> onnx.ModelProto:
    """image [N, 3, H, W] -> Conv -> centre each channel over H, W (x - mean) -> scale, shift ->
    Relu -> GlobalAveragePool -> Gemm: ``logits [N, 10]``. At 1x1 the centring leaves exactly 0,
    so only the shift is left: the same logits for every input."""
    rng = np.random.default_rng(seed)
    c = 32
    inits = [
        init("conv_w", _conv_w(rng, c, 3, 3)),
        init("in_scale", (1 + 0.1 * rng.standard_normal((1, c, 1, 1))).astype(np.float32)),
        init("in_bias", (0.5 * rng.standard_normal((1, c, 1, 1))).astype(np.float32)),
        init("fc_w", (rng.standard_normal((c, 10)) / np.sqrt(c)).astype(np.float32)),
        init("fc_b", (0.1 * rng.standard_normal(10)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["c"], ["mu"], name="mean", axes=[2, 3], keepdims=1),
        helper.make_node("Sub", ["c", "mu"], ["centred"], name="centre"),
        helper.make_node("Mul", ["centred", "in_scale"], ["scaled"], name="scale"),
        helper.make_node("Add", ["scaled", "in_bias"], ["n"], name="shift"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "saturating_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return _model(graph)


def picky_length(seed: int = 0) -> onnx.ModelProto:
    """x [batch, length] -> Reshape [-1, 777] -> MatMul: runs only for lengths that are multiples of 777."""
    rng = np.random.default_rng(seed)
    inits = [
        init("frame", np.array([-1, 777], dtype=np.int64)),
        init("w", (rng.standard_normal((777, 8)) / 28).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "frame"], ["frames"], name="frame"),
        helper.make_node("MatMul", ["frames", "w"], ["y"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "picky_length",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "length"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["frames", 8])],
        inits,
    )
    return _model(graph)


def _lstm_weights(
    rng: np.random.Generator, prefix: str, size: int, hidden: int, dirs: int = 1
) -> list[onnx.TensorProto]:
    scale = 1 / np.sqrt(hidden)
    return [
        init(f"{prefix}_W", (scale * rng.standard_normal((dirs, 4 * hidden, size))).astype(np.float32)),
        init(f"{prefix}_R", (scale * rng.standard_normal((dirs, 4 * hidden, hidden))).astype(np.float32)),
        init(f"{prefix}_B", (0.1 * rng.standard_normal((dirs, 8 * hidden))).astype(np.float32)),
    ]


def audio_lstm_decoder(seed: int = 0, hidden: int = 16, channels: int = 16) -> onnx.ModelProto:
    """``input [batch, samples]`` and an int64 rate per row ``sr [batch]``; ``If`` the rate is
    16000: frames (reflect Pad, strided Conv1d) -> ``LSTM`` over the frames -> its last state;
    else: a shorter-framed Conv1d averaged over time -> MatMul. Then a head: ``output [batch, 1]``.
    """
    rng = np.random.default_rng(seed)
    frames = [
        init("k16_pads", np.array([0, 0, 32, 0, 0, 32], dtype=np.int64)),
        init("k16_axes1", np.array([1], dtype=np.int64)),
        init("k16_axes0", np.array([0], dtype=np.int64)),
        init("k16_conv_w", (rng.standard_normal((channels, 1, 64)) / 8).astype(np.float32)),
        init("k16_conv_b", (0.1 * rng.standard_normal(channels)).astype(np.float32)),
        *_lstm_weights(rng, "k16_lstm", channels, hidden),
    ]
    then_branch = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["input", "k16_axes1"], ["k16_x3"], name="k16_unsq"),
            helper.make_node("Pad", ["k16_x3", "k16_pads"], ["k16_pad"], name="k16_pad", mode="reflect"),
            helper.make_node(
                "Conv", ["k16_pad", "k16_conv_w", "k16_conv_b"], ["k16_c"], name="k16_conv", strides=[32]
            ),
            helper.make_node("Relu", ["k16_c"], ["k16_r"], name="k16_relu"),
            helper.make_node("Transpose", ["k16_r"], ["k16_seq"], name="k16_time_major", perm=[2, 0, 1]),
            helper.make_node(
                "LSTM",
                ["k16_seq", "k16_lstm_W", "k16_lstm_R", "k16_lstm_B"],
                ["", "k16_h"],
                name="decoder_lstm",
                hidden_size=hidden,
            ),
            helper.make_node("Squeeze", ["k16_h", "k16_axes0"], ["k16_feat"], name="k16_last"),
        ],
        "k16",
        [],
        [helper.make_tensor_value_info("k16_feat", TensorProto.FLOAT, ["batch", hidden])],
        frames,
    )
    else_branch = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["input", "k8_axes1"], ["k8_x3"], name="k8_unsq"),
            helper.make_node("Conv", ["k8_x3", "k8_conv_w"], ["k8_c"], name="k8_conv", strides=[16]),
            helper.make_node("Relu", ["k8_c"], ["k8_r"], name="k8_relu"),
            helper.make_node("ReduceMean", ["k8_r"], ["k8_m"], name="k8_mean", axes=[2], keepdims=0),
            helper.make_node("MatMul", ["k8_m", "k8_proj"], ["k8_feat"], name="k8_project"),
        ],
        "k8",
        [],
        [helper.make_tensor_value_info("k8_feat", TensorProto.FLOAT, ["batch", hidden])],
        [
            init("k8_axes1", np.array([1], dtype=np.int64)),
            init("k8_conv_w", (rng.standard_normal((channels, 1, 32)) / 6).astype(np.float32)),
            init("k8_proj", (rng.standard_normal((channels, hidden)) / 4).astype(np.float32)),
        ],
    )
    nodes = [
        helper.make_node("ReduceMin", ["sr"], ["sr_min"], name="rate", keepdims=0),
        helper.make_node("Equal", ["sr_min", "sr16k"], ["is16k"], name="sr_is_16k"),
        helper.make_node(
            "If", ["is16k"], ["feat"], name="by_rate", then_branch=then_branch, else_branch=else_branch
        ),
        helper.make_node("MatMul", ["feat", "w_out"], ["logit"], name="head"),
        helper.make_node("Add", ["logit", "b_out"], ["logit_b"], name="head_bias"),
        helper.make_node("Sigmoid", ["logit_b"], ["output"], name="prob"),
    ]
    graph = helper.make_graph(
        nodes,
        "audio_lstm_decoder",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "samples"]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, ["batch"]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1])],
        [
            init("sr16k", np.array(16000, dtype=np.int64)),
            init("w_out", (rng.standard_normal((hidden, 1)) / np.sqrt(hidden) * 3).astype(np.float32)),
            init("b_out", np.zeros(1, dtype=np.float32)),
        ],
    )
    return _model(graph)


def crnn_ocr(seed: int = 0, classes: int = 12, hidden: int = 24) -> onnx.ModelProto:
    """``image [N, 1, 16, W]`` -> Conv 3x3 (16) -> Relu -> MaxPool 2x2 -> Conv 3x3 (32) -> Relu ->
    MaxPool 2x1 -> Conv 3x3 (32) -> Relu -> the height folded into channels ``[W/2, N, 32*4]`` ->
    bidirectional ``LSTM`` -> per-frame MatMul: ``logits [N, W/2, classes]``. The middle Conv's
    channels reach only the last Conv: structured pruning can remove them."""
    rng = np.random.default_rng(seed)
    inits = [
        init("c1_w", _conv_w(rng, 16, 1, 3)),
        init("c1_b", (0.1 * rng.standard_normal(16)).astype(np.float32)),
        init("c2_w", _conv_w(rng, 32, 16, 3)),
        init("c2_b", (0.1 * rng.standard_normal(32)).astype(np.float32)),
        init("c3_w", _conv_w(rng, 32, 32, 3)),
        init("c3_b", (0.1 * rng.standard_normal(32)).astype(np.float32)),
        *_lstm_weights(rng, "rnn", 32 * 4, hidden, dirs=2),
        init("fc_w", (4 * rng.standard_normal((2 * hidden, classes)) / np.sqrt(hidden)).astype(np.float32)),
        init("fc_b", (0.1 * rng.standard_normal(classes)).astype(np.float32)),
        init("fold", np.array([0, 0, -1], dtype=np.int64)),
    ]
    same = {"pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["image", "c1_w", "c1_b"], ["a1"], name="conv1", **same),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2_w", "c2_b"], ["a2"], name="conv2", **same),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 1], strides=[2, 1]),
        helper.make_node("Conv", ["p2", "c3_w", "c3_b"], ["a3"], name="conv3", **same),
        helper.make_node("Relu", ["a3"], ["r3"], name="relu3"),
        # [N, C, H, W] -> [W, N, C, H] -> [W, N, C*H]
        helper.make_node("Transpose", ["r3"], ["t"], name="to_time_major", perm=[3, 0, 1, 2]),
        helper.make_node("Reshape", ["t", "fold"], ["seq"], name="fold_height"),
        helper.make_node(
            "LSTM",
            ["seq", "rnn_W", "rnn_R", "rnn_B"],
            ["y"],
            name="bilstm",
            hidden_size=hidden,
            direction="bidirectional",
        ),
        # [W, 2, N, H] -> [N, W, 2, H] -> [N, W, 2H]
        helper.make_node("Transpose", ["y"], ["yt"], name="to_batch_major", perm=[2, 0, 1, 3]),
        helper.make_node("Reshape", ["yt", "fold"], ["feat"], name="join_directions"),
        helper.make_node("MatMul", ["feat", "fc_w"], ["scores"], name="classifier"),
        helper.make_node("Add", ["scores", "fc_b"], ["logits"], name="classifier_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "crnn_ocr",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 16, "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "frames", classes])],
        inits,
    )
    return _model(graph)


# Gate rows per hidden unit of each recurrent op.
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _rnn_weights(
    rng: np.random.Generator,
    op: str,
    dirs: int,
    hidden: int,
    size: int,
    gain_w: float = 1.0,
    gain_r: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [dirs, gates*H, size], R [dirs, gates*H, H], B [dirs, 2*gates*H]: PyTorch's initial
    scale (uniform within 1/sqrt(H)), W times ``gain_w``, R times ``gain_r``."""
    rows = GATES[op] * hidden
    bound = 1 / np.sqrt(hidden)
    w = rng.uniform(-bound * gain_w, bound * gain_w, (dirs, rows, size)).astype(np.float32)
    r = rng.uniform(-bound * gain_r, bound * gain_r, (dirs, rows, hidden)).astype(np.float32)
    b = rng.uniform(-bound, bound, (dirs, 2 * rows)).astype(np.float32)
    return w, r, b


DIRECTIONS = ("forward", "reverse", "bidirectional")


def recurrent_zoo(seed: int = 0, *, hidden: int = 32, size: int = 40) -> onnx.ModelProto:
    """x [seq, batch, size] read by one LSTM, GRU and RNN in each direction (W, R, B
    initializers ``{op}_{direction}_W`` ...), each node named ``{op}_{direction}``, each giving
    its ``Y`` as an output of the same name."""
    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], []
    for op in GATES:
        for direction in DIRECTIONS:
            name = f"{op}_{direction}"
            dirs = 2 if direction == "bidirectional" else 1
            w, r, b = _rnn_weights(rng, op, dirs, hidden, size)
            inits += [init(f"{name}_W", w), init(f"{name}_R", r), init(f"{name}_B", b)]
            nodes.append(
                helper.make_node(
                    op,
                    ["x", f"{name}_W", f"{name}_R", f"{name}_B"],
                    [name],
                    name=name,
                    hidden_size=hidden,
                    direction=direction,
                )
            )
            outputs.append(
                helper.make_tensor_value_info(name, TensorProto.FLOAT, ["seq", dirs, "batch", hidden])
            )
    graph = helper.make_graph(
        nodes,
        "recurrent_zoo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", "batch", size])],
        outputs,
        inits,
    )
    return _model(graph)


def recurrent_layer(
    op: str = "LSTM",
    direction: str = "forward",
    seed: int = 0,
    *,
    hidden: int = 32,
    size: int = 40,
    layout: int = 0,
) -> onnx.ModelProto:
    """One ``op`` named ``rnn`` (W, R, B initializers): ``x [seq, batch, size]`` -> ``y [seq, dirs,
    batch, hidden]``; with ``layout=1`` (opset 14) batch-major: ``x [batch, seq, size]`` -> ``y
    [batch, seq, dirs, hidden]``."""
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    w, r, b = _rnn_weights(rng, op, dirs, hidden, size)
    x_dims: list[str | int] = ["batch", "seq", size] if layout else ["seq", "batch", size]
    y_dims: list[str | int] = ["batch", "seq", dirs, hidden] if layout else ["seq", dirs, "batch", hidden]
    attrs: dict[str, object] = {"hidden_size": hidden, "direction": direction}
    if layout:
        attrs["layout"] = layout
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "W", "R", "B"], ["y"], name="rnn", **attrs)],
        f"{op.lower()}_{direction}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_dims)],
        [init("W", w), init("R", r), init("B", b)],
    )
    return _model(graph)


def crnn_ocr_stacked(seed: int = 0, *, hidden: int = 96, classes: int = 97) -> onnx.ModelProto:
    """A CRNN-style text recognizer (like PP-OCR's CRNN rec models).

    ``x [N, 3, 32, W]`` -> 4 Conv+Relu (pooling to height 4, width W/4; BatchNormalization on
    the third) -> mean over the height -> frames ``[W/4, N, 128]`` -> bidirectional LSTM ->
    bidirectional LSTM -> Linear -> Softmax: ``probs [N, W/4, classes]``, per-frame class
    scores that a CTC decoder reads. Untrained weights give every frame the same flat scores, so
    the LSTMs' W and the Linear layer are scaled up (x4 and x48) and R down (x0.5): the top
    class then changes along the line (5 classes on the synthetic feeds). It stays a random
    model: near-ties between classes on some frames make it more sensitive to rounding than a
    trained one (bfloat16 storage alone moves 0.4 % of the frames' top class).
    """
    rng = np.random.default_rng(seed)
    chans = [(3, 32), (32, 64), (64, 128), (128, 128)]
    inits = [init(f"conv{i}_w", _conv_w(rng, co, ci, 3)) for i, (ci, co) in enumerate(chans)]
    inits += [
        init(f"conv{i}_b", (0.05 * rng.standard_normal(co)).astype(np.float32))
        for i, (_, co) in enumerate(chans)
    ]
    inits += [
        init("bn_scale", (1 + 0.1 * rng.standard_normal(128)).astype(np.float32)),
        init("bn_bias", (0.1 * rng.standard_normal(128)).astype(np.float32)),
        init("bn_mean", (0.1 * rng.standard_normal(128)).astype(np.float32)),
        init("bn_var", (1 + 0.1 * rng.uniform(size=128)).astype(np.float32)),
        init("frames_shape", np.array([0, 0, -1], dtype=np.int64)),
        init(
            "fc_w", (48 * rng.standard_normal((2 * hidden, classes)) / np.sqrt(2 * hidden)).astype(np.float32)
        ),
        init("fc_b", (0.01 * rng.standard_normal(classes)).astype(np.float32)),
    ]
    nodes = []
    x = "x"
    for i in range(4):
        nodes.append(
            helper.make_node(
                "Conv", [x, f"conv{i}_w", f"conv{i}_b"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]
            )
        )
        y = f"c{i}"
        if i == 2:
            nodes.append(
                helper.make_node(
                    "BatchNormalization", [y, "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"], name="bn"
                )
            )
            y = "bn"
        nodes.append(helper.make_node("Relu", [y], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
        if i < 3:  # pool 2x2 twice, then the height only
            kernel = [2, 2] if i < 2 else [2, 1]
            nodes.append(
                helper.make_node(
                    "MaxPool", [x], [f"p{i}"], name=f"pool{i}", kernel_shape=kernel, strides=kernel
                )
            )
            x = f"p{i}"
    nodes += [
        helper.make_node("ReduceMean", [x], ["col"], name="height_mean", axes=[2], keepdims=0),
        helper.make_node("Transpose", ["col"], ["seq0"], name="to_frames", perm=[2, 0, 1]),
    ]
    size = 128
    for layer in range(2):
        w, r, b = _rnn_weights(rng, "LSTM", 2, hidden, size, gain_w=4, gain_r=0.5)
        inits += [init(f"lstm{layer}_W", w), init(f"lstm{layer}_R", r), init(f"lstm{layer}_B", b)]
        nodes += [
            helper.make_node(
                "LSTM",
                [f"seq{layer}", f"lstm{layer}_W", f"lstm{layer}_R", f"lstm{layer}_B"],
                [f"lstm{layer}_y"],
                name=f"lstm{layer}",
                hidden_size=hidden,
                direction="bidirectional",
            ),
            # [T, 2, N, H] -> [T, N, 2, H] -> [T, N, 2H]
            helper.make_node(
                "Transpose", [f"lstm{layer}_y"], [f"lstm{layer}_t"], name=f"lstm{layer}_t", perm=[0, 2, 1, 3]
            ),
            helper.make_node(
                "Reshape", [f"lstm{layer}_t", "frames_shape"], [f"seq{layer + 1}"], name=f"lstm{layer}_cat"
            ),
        ]
        size = 2 * hidden
    nodes += [
        helper.make_node("MatMul", ["seq2", "fc_w"], ["fc"], name="fc"),
        helper.make_node("Add", ["fc", "fc_b"], ["logits"], name="fc_bias"),
        helper.make_node("Transpose", ["logits"], ["logits_nt"], name="batch_first", perm=[1, 0, 2]),
        helper.make_node("Softmax", ["logits_nt"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "crnn_ocr",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, "W"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", "T", classes])],
        inits,
    )
    return _model(graph)
