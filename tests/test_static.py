"""--mode static with accuracy control: the fallback, range choice, bias correction, SmoothQuant.

Models are built here (seeded), data are written next to them, numbers come from onnxruntime.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from modelshrink.cli import app
from modelshrink.gates import Gates
from modelshrink.pipeline import RunOptions, run_technique
from modelshrink.report import Report
from modelshrink.techniques.quantize import QuantizeConfig, quantize
from modelshrink.techniques.quantize.calibration import RANGE_METHODS

# Bias correction must cut the mean |error| of the built Conv model's output at least this much
# (measured: 0.31x).
BIAS_CORRECTION_GAIN = 0.6
# SmoothQuant must cut the mean |error| of the outlier MatMul model at least this much
# (measured: 0.06x on the input-outlier model), and where the producer takes 1/s (measured 0.63x:
# .0756 against .120; it was 0.40x before the Relu between the two MatMuls was quantized on its
# own range, which alone took the plain model from .195 to .120).
SMOOTH_GAIN = 0.25
SMOOTH_FOLDED_GAIN = 0.7


def _model(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x: list[int], y: list[int]
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "static_test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _matmul_chain(weights: list[np.ndarray]) -> onnx.ModelProto:
    """x -> MatMul -> Relu -> ... -> MatMul -> y, nodes mm0, mm1, ..."""
    nodes, inits, prev = [], [], "x"
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"W{i}"))
        last = i == len(weights) - 1
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], ["y" if last else f"m{i}"], name=f"mm{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [f"m{i}"], [f"h{i}"], name=f"relu{i}"))
            prev = f"h{i}"
    return _model(nodes, inits, [1, weights[0].shape[0]], [1, weights[-1].shape[1]])


def _static(
    tmp_path: Path,
    model: onnx.ModelProto,
    x: np.ndarray,
    name: str,
    gates: Gates | None = None,
    **config: object,
) -> tuple[Report, Path]:
    src, data, out = tmp_path / f"{name}.onnx", tmp_path / f"{name}.npz", tmp_path / f"{name}.static.onnx"
    onnx.save(model, src)
    np.savez(data, x=x)
    report = run_technique(
        "quantize",
        quantize,
        QuantizeConfig(mode="static", **config),  # type: ignore[arg-type]
        str(src),
        str(out),
        RunOptions(data=str(data), latency=False, gates=gates or Gates()),
        force=True,
    )
    return report, out


def _outputs(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": row})[0] for row in x])


def _ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_fallback_keeps_the_damaging_layers_in_float(tmp_path: Path) -> None:
    # mm1 writes one channel 300x larger than the others and mm2 reads it: in int8 (uint8
    # activations, one scale per tensor) that channel takes the whole range and the others
    # round to nothing. mm0 and mm3 are harmless.
    rng = np.random.default_rng(0)
    w = [rng.standard_normal((64, 64)) / 8 for _ in range(3)] + [rng.standard_normal((64, 32)) / 8]
    w[1][:, 5] *= 300
    w[2][5, :] /= 300
    model = _matmul_chain(w)
    x = rng.standard_normal((64, 1, 64)).astype(np.float32)
    full, _ = _static(tmp_path, model, x, "full")
    assert full.fidelity is not None and full.fidelity.cosine < 0.9
    gates = Gates(min_cosine=0.999)
    report, out = _static(tmp_path, model, x, "gated", gates)
    assert report.written and report.fidelity is not None and report.fidelity.cosine >= 0.999
    fallback = report.details["fallback"]
    assert fallback["target_met"] and sorted(fallback["kept_in_float"]) == ["mm1", "mm2"]
    assert {c.node for c in report.changes} == {"mm0", "mm3"}
    reasons = {s.node: s.reason for s in report.skipped}
    assert "kept in float by the tolerance search" in reasons["mm1"] and "cost" in reasons["mm2"]
    assert any(n.startswith("tolerance search: 2 of 4 layer(s) kept in float") for n in report.notes)
    assert [r["layer"] for r in report.details["sensitivity"]][:2] in (["mm1", "mm2"], ["mm2", "mm1"])
    # the layers kept in float compute in float: no QDQ is left around mm1 -> mm2
    proto = onnx.load(str(out))
    nodes = {n.name: n for n in proto.graph.node}
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    assert producers[nodes["mm2"].input[0]] == "Relu" and producers[nodes["mm1"].input[0]] != "QuantizeLinear"
    assert nodes["mm1"].input[1] == "W1" and nodes["mm2"].input[1] == "W2"
    assert _ops(out)["QuantizeLinear"] > 0
    # the same numbers from onnxruntime on the file that was written
    y, y0 = _outputs(out, x), _outputs(model, x)
    cos = float((y * y0).sum() / np.linalg.norm(y) / np.linalg.norm(y0))
    assert cos >= 0.999
    again, out2 = _static(tmp_path, model, x, "gated2", gates)
    assert out2.read_bytes() == out.read_bytes() and again.details["fallback"] == fallback


def test_sensitivity_ranks_static_layers_and_writes_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = [rng.standard_normal((64, 64)) / 8 for _ in range(3)] + [rng.standard_normal((64, 32)) / 8]
    w[1][:, 5] *= 300
    w[2][5, :] /= 300
    x = rng.standard_normal((32, 1, 64)).astype(np.float32)
    report, out = _static(tmp_path, _matmul_chain(w), x, "sens", Gates(min_cosine=0.999), sensitivity=True)
    assert not report.written and not out.exists()
    rows = report.details["sensitivity"]
    assert {r["layer"] for r in rows[:2]} == {"mm1", "mm2"} and rows[0]["cost"] > 1 > rows[-1]["cost"]
    assert report.notes[0].startswith("--sensitivity: each layer alone in int8")


def test_every_layer_in_int8_when_the_gates_hold(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    model = _matmul_chain([rng.standard_normal((64, 64)) / 8, rng.standard_normal((64, 32)) / 8])
    x = rng.standard_normal((32, 1, 64)).astype(np.float32)
    report, _ = _static(tmp_path, model, x, "easy", Gates(min_cosine=0.99))
    assert report.written and "fallback" not in report.details
    assert any("no layer had to stay in float" in n for n in report.notes)
    assert {c.node for c in report.changes} == {"mm0", "mm1"}


def _dc_conv() -> onnx.ModelProto:
    """Conv whose input has a large mean and whose weights round with a systematic error."""
    rng = np.random.default_rng(2)
    w = rng.uniform(0.2, 0.45, (16, 8, 3, 3))
    w[:, 0, 1, 1] = 12.7  # one large weight per output channel: a coarse int8 step for the rest
    w *= rng.choice([-1.0, 1.0], (16, 1, 1, 1))
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    inits = [
        numpy_helper.from_array(w.astype(np.float32), "W"),
        numpy_helper.from_array(np.zeros(16, np.float32), "B"),
    ]
    return _model(nodes, inits, [1, 8, 12, 12], [1, 16, 12, 12])


def test_bias_correction_removes_the_mean_error(tmp_path: Path) -> None:
    model = _dc_conv()
    rng = np.random.default_rng(3)
    x = (4.0 + 0.5 * rng.standard_normal((24, 1, 8, 12, 12))).astype(np.float32)
    held = (4.0 + 0.5 * rng.standard_normal((16, 1, 8, 12, 12))).astype(np.float32)
    plain, out_plain = _static(tmp_path, model, x, "plain", bias_correction=False)
    corrected, out_corrected = _static(tmp_path, model, x, "corrected")
    assert "bias_correction" not in plain.changes[0].details
    shift = corrected.changes[0].details["bias_correction"]
    assert shift["max_abs_shift"] > 0
    reference = _outputs(model, held)
    err_plain = _outputs(out_plain, held) - reference
    err_corrected = _outputs(out_corrected, held) - reference
    # the error per output channel had a mean; it is gone, on rows it was not measured on
    channel_mean = np.abs(err_plain.mean(axis=(0, 2, 3))).mean()
    assert np.abs(err_corrected.mean(axis=(0, 2, 3))).mean() <= 0.2 * channel_mean
    assert np.abs(err_corrected).mean() <= BIAS_CORRECTION_GAIN * np.abs(err_plain).mean()
    assert corrected.details["bias_correction"]["conv"] == shift


def test_a_bias_shared_by_two_convs_cannot_take_another_tensors_name(tmp_path: Path) -> None:
    """tf2onnx shares one bias between Convs and names tensors like it (basic-pitch's nmp.onnx):
    onnxruntime's quantizer copies a shared bias as ``NAME`` plus a number checked against
    initializer names only, here ``b0``, a Conv's output, and the graph read the bias there (a
    model onnxruntime refused). Each Conv gets its own bias first, so the model is exact in form."""
    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, 16, 3, 3)) / 8).astype(np.float32), "w0"),
        numpy_helper.from_array((rng.standard_normal((16, 16, 3, 3)) / 8).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b"], ["b0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b"], ["y"], name="conv1", pads=[1, 1, 1, 1]),
    ]
    model = _model(nodes, inits, [1, 16, 10, 10], [1, 16, 10, 10])
    x = rng.standard_normal((16, 1, 16, 10, 10)).astype(np.float32)
    report, out = _static(tmp_path, model, x, "shared_bias")
    assert report.written and {c.node for c in report.changes} == {"conv0", "conv1"}
    assert report.fidelity is not None and report.fidelity.cosine > 0.999
    assert _ops(out)["Conv"] == 2 and _ops(out)["Relu"] == 1
    err = np.abs(_outputs(out, x) - _outputs(model, x))
    assert err.mean() < 0.05 and err.max() < 0.3  # int8 rounding (outputs of size 1-5)


def test_qdq_names_stay_short_and_no_value_info_is_added(tmp_path: Path) -> None:
    """tf2onnx names tensors like ``model_1/block/conv;model_1/block/conv2d_252`` (150
    characters): onnxruntime's quantizer names each QuantizeLinear/DequantizeLinear, its output,
    scale and zero point after them and adds a value_info per tensor, which made basic-pitch's
    static file 1.11x the float one (0.75x now). The names the report gives are kept."""
    rng = np.random.default_rng(6)
    long = "model_1/" + "encoder_block_with_a_long_exported_name/" * 3
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, 16, 3, 3)) / 8).astype(np.float32), f"{long}w{i}")
        for i in range(2)
    ]
    nodes = [
        helper.make_node(
            "Conv", ["x", f"{long}w0"], [f"{long}conv0;{long}conv0_out"], name=f"{long}conv0", pads=[1] * 4
        ),
        helper.make_node("Relu", [f"{long}conv0;{long}conv0_out"], [f"{long}relu0_out"], name=f"{long}relu0"),
        helper.make_node("Conv", [f"{long}relu0_out", f"{long}w1"], ["y"], name=f"{long}conv1", pads=[1] * 4),
    ]
    model = _model(nodes, inits, [1, 16, 10, 10], [1, 16, 10, 10])
    x = rng.standard_normal((16, 1, 16, 10, 10)).astype(np.float32)
    report, out = _static(tmp_path, model, x, "long_names")
    assert report.written and len(report.changes) == 2
    assert {c.details["weight"] for c in report.changes} == {f"{long}w0_quantized", f"{long}w1_quantized"}
    written = onnx.load(str(out))
    assert not written.graph.value_info
    qdq = [n for n in written.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(len(n.name) <= 48 for n in qdq)
    weights = {c.details["weight"] for c in report.changes}
    names = {v for n in qdq for v in [*n.output, *n.input[1:]] if v not in weights and v != "y"}
    assert names and all(len(v) <= 48 for v in names), sorted(v for v in names if len(v) > 48)
    assert out.stat().st_size < 0.6 * (tmp_path / "long_names.onnx").stat().st_size  # measured 0.53x


def _outlier_matmul(scales: dict[int, float]) -> onnx.ModelProto:
    """One MatMul; the weight rows of the outlier channels are as much smaller (outputs stay ~1)."""
    w = np.random.default_rng(4).standard_normal((64, 96)) / 8
    for channel, scale in scales.items():
        w[channel] /= scale
    return _matmul_chain([w])


def _outlier_inputs(rows: int, scales: dict[int, float], seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, 1, 64)).astype(np.float32)
    for channel, scale in scales.items():
        x[..., channel] *= scale
    return x


def test_smooth_quant_moves_input_outliers_into_the_weights(tmp_path: Path) -> None:
    scales = {3: 20.0, 17: 50.0, 40: 100.0}
    model = _outlier_matmul(scales)
    x, held = _outlier_inputs(48, scales, 5), _outlier_inputs(32, scales, 6)
    _, out_plain = _static(tmp_path, model, x, "plain")
    smooth, out_smooth = _static(tmp_path, model, x, "smooth", smooth=0.5)
    details = {c.node: c.details.get("smooth") for c in smooth.changes}
    assert details["mm0"]["applied"] and details["mm0"]["outlier_ratio"] >= 20
    assert details["mm0"]["inverse_in"] == "Mul"  # x is a graph input: a Mul divides it
    assert _ops(out_smooth)["Mul"] == 1
    reference = _outputs(model, held)
    err_plain = np.abs(_outputs(out_plain, held) - reference).mean()
    err_smooth = np.abs(_outputs(out_smooth, held) - reference).mean()
    assert err_smooth <= SMOOTH_GAIN * err_plain
    assert any(n.startswith("--smooth 0.5: SmoothQuant applied to 1 of 1") for n in smooth.notes)


def test_smooth_quant_is_a_no_op_where_it_gives_nothing(tmp_path: Path) -> None:
    model = _outlier_matmul({})
    x = _outlier_inputs(32, {}, 7)
    _, out_plain = _static(tmp_path, model, x, "plain")
    smooth, out_smooth = _static(tmp_path, model, x, "smooth", smooth=0.5)
    details = [c.details["smooth"] for c in smooth.changes]
    assert details and not any(d["applied"] for d in details)
    assert all(d["error_ratio"] > 0.8 for d in details)
    assert out_smooth.read_bytes() == out_plain.read_bytes()


def test_smooth_quant_folds_into_the_producer(tmp_path: Path) -> None:
    # mm0 writes the outlier channel: 1/s goes into its output columns, through the Relu
    rng = np.random.default_rng(8)
    w = [rng.standard_normal((64, 64)) / 8, rng.standard_normal((64, 32)) / 8]
    w[0][:, 9] *= 60
    model = _matmul_chain(w)
    x = rng.standard_normal((48, 1, 64)).astype(np.float32)
    report, out = _static(tmp_path, model, x, "fold", smooth=0.5)
    details = {c.node: c.details["smooth"] for c in report.changes}
    assert details["mm1"]["applied"] and details["mm1"]["inverse_in"] == "mm0"
    assert _ops(out)["Mul"] == (1 if details["mm0"]["applied"] else 0)  # only x (a graph input) needs one
    plain, _ = _static(tmp_path, model, x, "plain")
    assert report.fidelity is not None and plain.fidelity is not None
    assert report.fidelity.mean_abs_error <= SMOOTH_FOLDED_GAIN * plain.fidelity.mean_abs_error


def test_range_method_is_chosen_per_tensor_and_recorded(tmp_path: Path) -> None:
    # Two huge values among 1.5 million: minmax spends the uint8 range on them (a step of 3 for
    # values of about 1); clipping them costs less squared error than that rounding everywhere.
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((64, 8, 3, 3)) / 8).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1], strides=[8, 8])]
    model = _model(nodes, [numpy_helper.from_array(w, "W")], [1, 8, 64, 64], [1, 64, 8, 8])
    x = rng.standard_normal((48, 1, 8, 64, 64)).astype(np.float32)
    x[3, 0, 2, 10, 10], x[40, 0, 5, 20, 30] = 400.0, -350.0
    report, _ = _static(tmp_path, model, x, "auto", bias_correction=False)
    ranges = report.changes[0].details["activation_ranges"]
    assert set(ranges) == {"x", "y"}
    for r in ranges.values():
        assert r["method"] in RANGE_METHODS and set(r["mse"]) == set(RANGE_METHODS)
        assert r["mse"][r["method"]] == min(r["mse"].values())
    assert ranges["x"]["method"] != "minmax" and ranges["x"]["range"][1] < 100
    assert any("ranges chosen per tensor by the least quantization error" in n for n in report.notes)
    forced, _ = _static(tmp_path, model, x, "forced", calibration="minmax", bias_correction=False)
    methods = {r["method"] for c in forced.changes for r in c.details["activation_ranges"].values()}
    assert methods == {"minmax"}
    assert forced.changes[0].details["activation_ranges"]["x"]["range"] == [-350.0, 400.0]
    assert report.fidelity is not None and forced.fidelity is not None
    assert report.fidelity.mean_abs_error < forced.fidelity.mean_abs_error


def test_static_rewrites_conv_batch_norm_affine_and_hard_swish(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    f32 = np.float32
    inits = [
        numpy_helper.from_array((rng.standard_normal((32, 16, 3, 3)) / 12).astype(f32), "W"),
        numpy_helper.from_array((0.1 * rng.standard_normal(32)).astype(f32), "B"),
        numpy_helper.from_array(np.array([1.7], f32), "a"),
        numpy_helper.from_array((0.2 * rng.standard_normal((1, 32, 1, 1))).astype(f32), "b"),
        numpy_helper.from_array(np.array(3.0, f32), "three"),
        numpy_helper.from_array(np.array(0.0, f32), "zero"),
        numpy_helper.from_array(np.array(6.0, f32), "six"),
        numpy_helper.from_array((rng.standard_normal((32, 32, 1, 1)) / 6).astype(f32), "W2"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 32).astype(f32), "gamma"),
        numpy_helper.from_array((0.3 * rng.standard_normal(32)).astype(f32), "beta"),
        numpy_helper.from_array((0.3 * rng.standard_normal(32)).astype(f32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 32).astype(f32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c0"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c0", "gamma", "beta", "mean", "var"], ["c"], name="bn"),
        helper.make_node("Mul", ["a", "c"], ["ca"], name="scale"),
        helper.make_node("Add", ["ca", "b"], ["cb"], name="shift"),
        helper.make_node("Add", ["cb", "three"], ["p3"], name="hs_add"),
        helper.make_node("Clip", ["p3", "zero", "six"], ["cl"], name="hs_clip"),
        helper.make_node("Mul", ["cb", "cl"], ["m"], name="hs_mul"),
        helper.make_node("Div", ["m", "six"], ["hs"], name="hs_div"),
        helper.make_node("Conv", ["hs", "W2"], ["y"], name="conv2"),
    ]
    model = _model(nodes, inits, [1, 16, 10, 10], [1, 32, 10, 10])
    x = rng.standard_normal((24, 1, 16, 10, 10)).astype(f32)
    report, out = _static(tmp_path, model, x, "rewrites")
    ops = _ops(out)
    assert ops["HardSigmoid"] == 1 and ops["Clip"] == ops["Div"] == ops["Add"] == 0 and ops["Mul"] == 1
    assert ops["BatchNormalization"] == 0
    assert report.details["folded_affine"] == ["conv"] and report.details["hard_swish"] == 1
    assert report.fidelity is not None and report.fidelity.cosine >= 0.999
    assert {c.node for c in report.changes} == {"conv", "conv2"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "static", "--smooth", "0"], "--smooth must be in (0, 1]"),
        (["--mode", "static", "--smooth", "1.5"], "--smooth must be in (0, 1]"),
        (["--mode", "static", "--smooth", "nan"], "--smooth must be in (0, 1]"),
        (["--smooth", "0.5"], "--smooth applies to --mode static only (got --mode int8)"),
        (["--mode", "dynamic", "--no-bias-correction"], "--no-bias-correction applies to --mode static only"),
        (
            ["--mode", "static", "--op-types", "LSTM"],
            "quantizes Conv, MatMul, Gemm with int8 kernels; without --op-types it also stores "
            "LSTM/GRU/RNN and Gather weights in int8",
        ),
    ],
)
def test_static_flag_errors_are_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    src = Path(__file__).resolve().parent.parent / "sample_models" / "digits_cnn.onnx"
    result = CliRunner().invoke(app, ["quantize", str(src), "-o", str(tmp_path / "q.onnx"), *args])
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def _stem_model() -> onnx.ModelProto:
    """A stem Conv under --min-elements (216 weights: float) -> Relu -> MaxPool -> an int8 Conv."""
    rng = np.random.default_rng(3)
    stem = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    body = (rng.standard_normal((32, 8, 3, 3)) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "stem_w"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s"], ["r"], name="stem_relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "body_w"], ["y"], name="body", pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array(stem, "stem_w"), numpy_helper.from_array(body, "body_w")]
    return _model(nodes, inits, [1, 3, 16, 16], [1, 32, 8, 8])


def _extended(path: Path) -> onnx.ModelProto:
    """The graph onnxruntime runs at ORT_ENABLE_EXTENDED (its QDQ propagation and fusions done)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path.with_suffix(".extended.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def test_a_float_relu_moves_past_the_pool_before_int8(tmp_path: Path) -> None:
    """Float stem -> Relu -> MaxPool -> int8 Conv: the Relu goes after the MaxPool (the same
    values), so onnxruntime keeps the pool in float instead of moving the QuantizeLinear before it
    and running its slow uint8 NCHW MaxPool (2.0x the float model's latency on the sample CNN)."""
    x = np.random.default_rng(4).random((64, 1, 3, 16, 16)).astype(np.float32)
    report, out = _static(tmp_path, _stem_model(), x, "stem")
    assert [c.node for c in report.changes] == ["body"]
    written = onnx.load(str(out))
    producer = {o: n for n in written.graph.node for o in n.output}
    pool = next(n for n in written.graph.node if n.op_type == "MaxPool")
    assert producer[pool.input[0]].name == "stem"
    relu = next(n for n in written.graph.node if n.op_type == "Relu")
    assert relu.input[0] == pool.output[0]
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == relu.output[0] for n in written.graph.node)
    ran = _extended(out)
    ran_producer = {o: n for n in ran.graph.node for o in n.output}
    pools = [n for n in ran.graph.node if n.op_type == "MaxPool"]
    assert pools and all(ran_producer[n.input[0]].op_type != "QuantizeLinear" for n in pools)
    # the order as onnxruntime's quantizer wrote it computes the same values
    undone = onnx.ModelProto()
    undone.CopyFrom(written)
    for node in undone.graph.node:
        if node.op_type == "MaxPool":
            node.input[0] = relu.output[0]
        elif node.op_type == "Relu":
            node.input[0] = pool.input[0]
        elif node.op_type == "QuantizeLinear" and node.input[0] == relu.output[0]:
            node.input[0] = pool.output[0]
    order = {"stem": 0, "stem_relu": 1, "pool": 2}
    nodes = sorted(undone.graph.node, key=lambda n: order.get(n.name, 3))
    del undone.graph.node[:]
    undone.graph.node.extend(nodes)
    onnx.checker.check_model(undone)
    np.testing.assert_array_equal(_outputs(out, x[:8]), _outputs(undone, x[:8]))
