"""Backpropagation through time for LSTM / GRU / RNN: the reverse recurrence as a Scan or unrolled.

    python bench/run.py recurrent

For each layer (T=64 steps, batch 32, 128 inputs, hidden 128, forward direction, and a
bidirectional LSTM), the gradient graph of sum(Y * R) with respect to X, W, R and B is built
twice, once with the reverse recurrence as one ``Scan`` over the steps (the default), once
unrolled into separate nodes per step; both run on onnxruntime CPU, one thread, interleaved
rounds, median. Printed: forward-only time of the layer, each form's time (forward + backward),
the unrolled/scan ratio, and the time to build the graph and create its session.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from modelshrink.techniques.distill import recurrent
from modelshrink.techniques.distill.autodiff import append_gradients
from modelshrink.techniques.distill.rules import RULES

STEPS, BATCH, INPUTS, HIDDEN = 64, 32, 128, 128
ROUNDS = 15
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _model(kind: str, direction: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    dirs = 2 if direction == "bidirectional" else 1
    g = GATES[kind] * HIDDEN
    feeds = {
        "x": rng.standard_normal((STEPS, BATCH, INPUTS)).astype(np.float32),
        "w": (0.1 * rng.standard_normal((dirs, g, INPUTS))).astype(np.float32),
        "r": (0.1 * rng.standard_normal((dirs, g, HIDDEN))).astype(np.float32),
        "b": (0.1 * rng.standard_normal((dirs, 2 * g))).astype(np.float32),
        "seed": rng.standard_normal((STEPS, dirs, BATCH, HIDDEN)).astype(np.float32),
    }
    node = helper.make_node(kind, ["x", "w", "r", "b"], ["y"], hidden_size=HIDDEN, direction=direction)
    graph = helper.make_graph(
        [node],
        "bench",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in feeds.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [STEPS, dirs, BATCH, HIDDEN])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, feeds


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _gradient_session(
    model: onnx.ModelProto, form: recurrent.Form
) -> tuple[ort.InferenceSession, list[str], float]:
    start = time.perf_counter()
    saved = recurrent.FORM
    recurrent.FORM = form
    try:
        grad_model, grads, _ = append_gradients(
            model, wrt=["x", "w", "r", "b"], seeds={"y": "seed"}, rules=RULES
        )
    finally:
        recurrent.FORM = saved
    names = [grads[w] for w in ("x", "w", "r", "b")]
    del grad_model.graph.output[:]
    grad_model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    session = _session(grad_model)
    return session, names, time.perf_counter() - start  # type: ignore[return-value]


def _median_ms(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(ROUNDS):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(1000 * (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in times.items()}


def run() -> bool:
    print(f"T={STEPS} batch={BATCH} inputs={INPUTS} hidden={HIDDEN}, onnxruntime {ort.__version__}, 1 thread")
    print(
        f"{'layer':22s} {'forward':>9s} {'scan':>9s} {'unrolled':>9s} {'unr/scan':>9s} {'build scan':>11s} {'build unr':>10s}"
    )
    for kind, direction in [
        ("LSTM", "forward"),
        ("GRU", "forward"),
        ("RNN", "forward"),
        ("LSTM", "bidirectional"),
    ]:
        model, feeds = _model(kind, direction)
        fwd = _session(model)
        scan, scan_names, scan_build = _gradient_session(model, "scan")
        unrolled, unr_names, unr_build = _gradient_session(model, "unroll")
        ms = _median_ms(
            {
                "forward": partial(fwd.run, ["y"], feeds),
                "scan": partial(scan.run, scan_names, feeds),
                "unroll": partial(unrolled.run, unr_names, feeds),
            }
        )
        a = scan.run(scan_names, feeds)
        b = unrolled.run(unr_names, feeds)
        assert all(np.allclose(x, y, rtol=1e-3, atol=1e-3) for x, y in zip(a, b, strict=True))
        print(
            f"{kind + ' ' + direction:22s} {ms['forward']:8.2f}ms {ms['scan']:8.2f}ms {ms['unroll']:8.2f}ms "
            f"{ms['unroll'] / ms['scan']:8.2f}x {scan_build:10.2f}s {unr_build:9.2f}s"
        )
    return True


if __name__ == "__main__":
    run()
